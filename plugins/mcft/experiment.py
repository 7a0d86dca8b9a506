"""``metareason mcft experiment``: the seeded comparison of issue 30 (design: docs/mcft.md,
"Experiment design (issue 30)").

Stages, all under ``runs/<name>/`` (every run directory is kept, so a stage that already finished
is reused with ``--reuse``):

1. **base**: the config's model trained on plain solutions (``experiment.base_task``), then
   exported (``base-model/``); every arm starts from it. Or ``experiment.base_model``: a model
   directory used as it is (the SmolLM2 part: the instruct model, critiqued on its own attempts). Its held-out accuracy is recorded and
   checked against ``experiment.base_min_accuracy`` (a refusal, unless ``--quick``).
2. **critique data**: ``mcft critiques`` on ``n_train + n_val`` training questions (split by a
   seeded shuffle into train and validation rows) and on ``n_test`` test questions
   (``experiment.test_task``: harder levels included).
3. **arms**: for each arm, the learning rate is chosen on the validation split (every lr of
   ``experiment.lrs`` trained with the first seed; the best validation accuracy wins, ties to the
   smaller lr); then every seed is trained with it, for the same steps. Arms ``t0``, ``t0.1``,
   ``t0.2``, ``t0.3`` (critique target, ``bf_beta`` = ``experiment.bf_beta``), then ``bf0`` (the
   threshold with the best mean validation accuracy, ``bf_beta`` 0), ``solution_sft`` (teacher's
   solution, no critique), ``answer_sft`` (answer only). Prompts are the same for every arm.
4. **evaluation** of every (arm, seed) on validation and test: accuracy overall, on rows whose
   attempt was wrong, per level; the entropy threshold chosen on validation (Youden's J for "flag
   => wrong"), then precision / recall on test, and the AUROC of the raw mean entropy on test.
5. **statistics**: mean and a 95% t-interval across seeds; exact McNemar on the test items,
   per seed and pooled over seeds (discordant pairs summed), each arm against ``t0`` (no masking)
   and against ``solution_sft``; overall and on the attempt-wrong rows.

``--quick`` runs every stage at a miniature size (a tiny model, a few rows, 2 seeds, 2 lrs,
2 steps): a smoke test of the driver, not a measurement.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from metareason.api import mcnemar_exact, write_jsonl_atomic, write_text_atomic

PROMPT_TEMPLATE = "{prompt}\nAttempt: {cot}\n"

DEFAULTS = {
    "seeds": [0, 1, 2],
    "lrs": [3.0e-4, 1.0e-3, 3.0e-3],
    "thresholds": [0.0, 0.1, 0.2, 0.3],
    "bf_beta": 0.05,
    "steps": 300,
    "n_train": 300,
    "n_val": 100,
    "n_test": 300,
    "train_task": {"task": "causal_loop", "seed": 0, "params": {"levels": [1], "split": "train"}},
    "test_task": {"task": "causal_loop", "seed": 1234, "params": {"levels": [1, 2, 3], "split": "test"}},
    "base_task": {"task": "causal_loop", "num_samples": 20000, "seed": 7, "params": {"levels": [1], "split": "train"}},
    "base_eval_task": {"task": "causal_loop", "num_samples": 200, "seed": 99, "params": {"levels": [1], "split": "test"}},
    "base_train": {"max_steps": 3000, "batch_size": 32, "lr": 1.0e-3},
    "base_min_accuracy": 0.95,
    "base_model": None,  # a model directory to start every arm from instead of training a base
    # "attempt": the base learns to solve from the arms' prompt (question + attempt) in their answer
    # format (target: the solution alone); "plain": the task's own prompt and plain solutions
    "base_layout": "attempt",
    "split_seed": 0,
}
QUICK = {
    "seeds": [0, 1], "lrs": [1.0e-3, 3.0e-3], "steps": 2, "n_train": 12, "n_val": 6, "n_test": 8,
    "base_task": {"task": "causal_loop", "num_samples": 32, "seed": 7, "params": {"levels": [1], "split": "train"}},
    "base_eval_task": {"task": "causal_loop", "num_samples": 4, "seed": 99, "params": {"levels": [1], "split": "test"}},
    "base_train": {"max_steps": 2, "batch_size": 4, "lr": 1.0e-3},
}
QUICK_MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


# ------------------------------------------------------------------------------ statistics
mcnemar_p = mcnemar_exact  # exact two-sided McNemar p from the discordant counts (b, c)


# two-sided 95% quantiles t_{0.975, df} for df = 1..30 (no scipy dependency)
_T975 = (12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252,
         2.306004135, 2.262157163, 2.228138852, 2.200985160, 2.178812830, 2.160368656, 2.144786688,
         2.131449546, 2.119905299, 2.109815578, 2.100922040, 2.093024054, 2.085963447, 2.079613845,
         2.073873068, 2.068657610, 2.063898562, 2.059538553, 2.055529439, 2.051830516, 2.048407142,
         2.045229642, 2.042272456)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t (a table to 30 degrees of freedom, then the
    Cornish-Fisher expansion, within 1e-4)."""
    if df <= 30:
        return _T975[df - 1]
    z = 1.959963985
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def seed_interval(values: list[float], level: float = 0.95) -> dict:
    """Mean, sample sd and the 95% t-interval of the mean across seeds (half-width nan with one seed)."""
    if level != 0.95:
        raise ValueError("seed_interval: only the 95% interval is implemented")
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(vals)
    if n == 0:
        return {"mean": math.nan, "sd": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    mean = sum(vals) / n
    if n == 1:
        return {"mean": mean, "sd": math.nan, "lo": math.nan, "hi": math.nan, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "n": n}


def choose_entropy_threshold(entropies: list[float], correct: list[bool]) -> float:
    """The threshold (flag when mean entropy > it) with the largest Youden's J = TPR - FPR for
    "flag => wrong answer" on these (validation) samples; ties to the larger threshold. With one
    class only, the largest entropy (nothing flagged)."""
    wrong = [not c for c in correct]
    pos, neg = sum(wrong), len(wrong) - sum(wrong)
    cands = sorted(set(entropies))
    if not cands:
        return 0.0
    if pos == 0 or neg == 0:
        return cands[-1]
    cands = [cands[0] - 1e-9] + cands
    best, best_j = cands[-1], -2.0
    for t in cands:
        tp = sum(w and e > t for e, w in zip(entropies, wrong))
        fp = sum((not w) and e > t for e, w in zip(entropies, wrong))
        j = tp / pos - fp / neg
        if j >= best_j:
            best, best_j = t, j
    return best


def paired(ref: dict, arm: dict, ids: Optional[set] = None) -> tuple[int, int]:
    """Discordant counts on shared item ids: ``b`` = ref right, arm wrong; ``c`` = ref wrong, arm right."""
    keys = [k for k in ref if k in arm and (ids is None or k in ids)]
    b = sum(ref[k] and not arm[k] for k in keys)
    c = sum((not ref[k]) and arm[k] for k in keys)
    return b, c


# ------------------------------------------------------------------------------ stages
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(path, rows)


def _finished(kernel) -> bool:
    """Trained to the end with the same model / data / train / mcft sections (``--reuse``)."""
    from metareason.plugins.mcft.compare import _trained_already

    return (kernel.config.run_dir / "experiment-done").exists() and _trained_already(kernel)


def _train(raw: dict, reuse: bool) -> tuple[Path, Optional[float], bool]:
    """Train one run; with ``reuse`` a finished run of the same config is kept and an interrupted
    one (a checkpoint short of the end, the same config) is resumed. Returns (run dir, training
    seconds (None when reused or resumed), reused)."""
    from metareason.api import Kernel
    from metareason.plugins.mcft.compare import checkpoint_step

    kernel = Kernel(raw)
    run_dir = kernel.config.run_dir
    if reuse and _finished(kernel):
        return run_dir, None, True
    resume = reuse and (checkpoint_step(kernel) or 0) > 0
    if run_dir.exists() and not resume:  # trained again from scratch
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    kernel.run(resume=resume)
    (run_dir / "experiment-done").write_text("1\n")
    return run_dir, None if resume else time.perf_counter() - t0, False


def train_base(raw: dict, exp: dict, root: Path, reuse: bool, quiet: bool) -> dict:
    from metareason.api import export_run, load_trained

    b = copy.deepcopy(raw)
    b["name"] = f"{raw['name']}-base"
    if exp["base_layout"] == "attempt":
        pool, held = base_rows(raw, exp, root / "data", reuse, quiet)
        b["data"] = dict(b.get("data", {}), train=[_task(pool, "solution", 10 ** 9)],
                         eval=[_task(held, "solution", 10 ** 9)])
    else:
        b["data"] = dict(b.get("data", {}), train=[exp["base_task"]], eval=[exp["base_eval_task"]])
    b["train"] = dict(b.get("train", {}), seed=0, **exp["base_train"])
    b["eval"] = dict(b.get("eval", {}), at_end=False)
    # the tags in the vocabulary already (the arms' vocabulary), no masking, no format term
    b["mcft"] = dict(b.get("mcft", {}), enabled=True, threshold=0.0, bf_beta=0.0)
    run_dir, train_s, reused = _train(b, reuse)
    out = root / "base-model"
    if not (reused and out.exists()):
        if out.exists():
            import shutil

            shutil.rmtree(out)
        export_run(run_dir, out)
    trained = load_trained(run_dir)
    metrics = trained.kernel.evaluate(trained.model, trained.tokenizer)
    acc = metrics.get("eval/accuracy")
    return {"run_dir": str(run_dir), "model": str(out), "train_s": train_s, "reused": reused,
            "accuracy": acc, "metrics": metrics, "steps": b["train"]["max_steps"]}


def base_rows(raw: dict, exp: dict, data_dir: Path, reuse: bool, quiet: bool) -> tuple[Path, Path]:
    """The base's training and held-out rows in the arms' layout (``experiment.base_layout:
    attempt``): ``base_task`` / ``base_eval_task`` questions, each with one noisy attempt, whose
    target is the teacher's correct solution alone (no critique). A base trained on them solves
    the task from the prompt the arms see (question + attempt) in the answer format they write,
    so the critique set only has to teach the critique and the correction."""
    from metareason.api import Kernel
    from metareason.plugins.mcft.critiques import build_critiques

    pool, held = data_dir / "base-pool.jsonl", data_dir / "base-eval.jsonl"
    if reuse and pool.exists() and held.exists():
        return pool, held
    c = copy.deepcopy(raw)
    c["data"] = dict(c.get("data", {}), train=[exp["base_task"]], eval=[exp["base_eval_task"]])
    c["quiet"] = quiet or c.get("quiet", False)
    kernel = Kernel(c)
    build_critiques(kernel, "train", pool, quiet)
    build_critiques(kernel, "eval", held, quiet)
    return pool, held


def given_base(raw: dict, exp: dict) -> dict:
    """``experiment.base_model``: every arm starts from this model directory (e.g. a pretrained
    instruct model); its accuracy on ``base_eval_task`` is measured when that is set."""
    from metareason.api import Kernel

    path = str(Path(os.path.expanduser(exp["base_model"])).resolve())
    acc = metrics = None
    if exp.get("base_eval_task"):
        b = copy.deepcopy(raw)
        b["model"] = dict(b.get("model", {}), path=path)
        b["model"].pop("arch", None)
        b["data"] = dict(b.get("data", {}), eval=[exp["base_eval_task"]])
        b["mcft"] = dict(b.get("mcft", {}), enabled=True)
        kernel = Kernel(b)
        model, tok = kernel.load()
        metrics = kernel.evaluate(model, tok)
        acc = metrics.get("eval/accuracy")
    return {"run_dir": None, "model": path, "train_s": None, "reused": True, "accuracy": acc,
            "metrics": metrics, "steps": 0}


def _test_specs(exp: dict) -> list[tuple[dict, Optional[str]]]:
    """``experiment.test_task``: one task spec or a list; each may name a ``group`` (e.g. a
    harder level of the same task) that its rows are counted under."""
    specs = exp["test_task"] if isinstance(exp["test_task"], list) else [exp["test_task"]]
    out = []
    for spec in specs:
        spec = dict(spec)
        group = spec.pop("group", None)
        out.append((dict(spec, num_samples=spec.get("num_samples", exp["n_test"])), group))
    return out


def build_data(raw: dict, exp: dict, data_dir: Path, quiet: bool, reuse: bool = False) -> dict:
    """Critique rows for train / val / test under ``data_dir`` (kept, with ``summary.json``, for
    ``--reuse``: two drivers started with ``--reuse`` and different ``--arms`` share them)."""
    from metareason.api import Kernel
    from metareason.plugins.mcft.critiques import build_critiques

    done = data_dir / "summary.json"
    if reuse and done.exists():
        return json.loads(done.read_text(encoding="utf-8"))
    tests = _test_specs(exp)
    c = copy.deepcopy(raw)
    c["data"] = dict(c.get("data", {}),
                     train=[dict(exp["train_task"], num_samples=exp["n_train"] + exp["n_val"])],
                     eval=[spec for spec, _ in tests])
    kernel = Kernel(c)
    summary = {"pool": build_critiques(kernel, "train", data_dir / "critiques-pool.jsonl", quiet),
               "test": build_critiques(kernel, "eval", data_dir / "critiques-test.jsonl", quiet)}
    if any(g is not None for _, g in tests):  # rows come in the order of the specs
        rows, i = _read_jsonl(data_dir / "critiques-test.jsonl"), 0
        sec = kernel.config.mcft
        for k, (_, group) in enumerate(tests):
            n = len(kernel.build_task(kernel.config.data.eval[k])) * sec.attempts
            for r in rows[i: i + n]:
                r["group"] = group or r.get("group", "all")
            i += n
        _write_jsonl(data_dir / "critiques-test.jsonl", rows)
    pool = _read_jsonl(data_dir / "critiques-pool.jsonl")
    order = list(range(len(pool)))
    random.Random(exp["split_seed"]).shuffle(order)  # validation questions never in training
    val = [pool[i] for i in order[: exp["n_val"]]]
    train = [pool[i] for i in order[exp["n_val"]:]]
    _write_jsonl(data_dir / "critiques-train.jsonl", train)
    _write_jsonl(data_dir / "critiques-val.jsonl", val)
    for split, rows in (("train", train), ("val", val)):
        summary[split] = {"rows": len(rows), "answer_match": sum(r["answer_match"] for r in rows),
                          "attempts_correct": sum(r["attempt_correct"] for r in rows)}
    test = _read_jsonl(data_dir / "critiques-test.jsonl")
    summary["test"]["groups"] = sorted({r.get("group", "all") for r in test})
    usable = [r for r in test if r["answer_match"]]
    # the trivial reference: answer with the attempt's own answer
    summary["test"]["copy_attempt_accuracy"] = (sum(bool(r["attempt_correct"]) for r in usable) / len(usable)
                                                if usable else None)
    done.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _task(path: Path, target: str, n: int) -> dict:
    return {"task": "mcft", "num_samples": n, "seed": 0,
            "params": {"path": str(path), "target": target, "template": PROMPT_TEMPLATE, "system": ""}}


def arm_config(raw: dict, exp: dict, arm: dict, lr: float, seed: int, name: str, data_dir: Path,
               base_model: str) -> dict:
    a = copy.deepcopy(raw)
    a["name"] = name
    a["model"] = dict(a.get("model", {}), path=base_model)
    a["model"].pop("arch", None)
    a["model"]["tokenizer"] = {}
    a["data"] = dict(a.get("data", {}), train=[_task(data_dir / "critiques-train.jsonl", arm["target"], 10 ** 9)],
                     eval=[_task(data_dir / "critiques-val.jsonl", arm["target"], 10 ** 9)])
    a["train"] = dict(a.get("train", {}), lr=lr, seed=seed, max_steps=exp["steps"])
    a["eval"] = dict(a.get("eval", {}), at_end=False)
    a["mcft"] = dict(a.get("mcft", {}), enabled=True, threshold=arm["threshold"], bf_beta=arm["bf_beta"])
    return a


def eval_stamp(cfg: dict) -> str:
    """What an arm's evaluation samples depend on besides the trained weights (the eval rows, the
    generation settings, the chat format): its samples are reused only while this is unchanged."""
    return json.dumps({"eval": cfg["data"]["eval"], "generation": cfg.get("generation", {}),
                       "chat": {k: cfg["data"].get(k) for k in ("chat_template", "system_prompt")}},
                      sort_keys=True, default=str)


def evaluate_arm(raw_arm: dict, run_dir: Path, data_dir: Path, target: str, reuse: bool = False,
                 splits: tuple = ("val", "test")) -> dict:
    """Samples of one trained (arm, lr, seed) on ``splits``: id -> correct, entropy, group.
    ``reuse`` (a reused run): samples already written for it are read, not generated again."""
    from metareason.api import Kernel
    from metareason.plugins.mcft.evaluation import evaluate_mcft
    from metareason.api import load_trained

    trained = None
    out = {}
    for split in splits:
        cfg = copy.deepcopy(raw_arm)
        cfg["data"]["eval"] = [_task(data_dir / f"critiques-{split}.jsonl", target, 10 ** 9)]
        samples_path = run_dir / f"experiment-{split}-samples.jsonl"
        stamp_path = run_dir / f"experiment-{split}-eval.json"
        stamp = eval_stamp(cfg)
        metrics = None
        if not (reuse and samples_path.exists() and stamp_path.exists() and stamp_path.read_text() == stamp):
            kernel = Kernel(cfg)
            trained = trained or load_trained(run_dir)
            metrics = evaluate_mcft(kernel, trained.model, trained.tokenizer, samples_path=samples_path)
            write_text_atomic(stamp_path, stamp)
        rows = {r["id"]: r for r in _read_jsonl(data_dir / f"critiques-{split}.jsonl")}
        samples = [dict(s, group=rows.get(s["id"], {}).get("group", "all"),
                        attempt_correct=rows.get(s["id"], {}).get("attempt_correct"))
                   for s in _read_jsonl(samples_path)]
        out[split] = {"metrics": metrics, "samples": samples}
    return out


def base_reference(raw: dict, exp: dict, base: dict, data_dir: Path, root: Path, reuse: bool) -> dict:
    """The base itself, not fine-tuned, on the arms' validation and test rows with the same
    evaluator (greedy, the same prompts): the level every arm starts from, so a drop below it is
    visible. Its samples are kept in ``root/base-reference-{split}-samples.jsonl``."""
    from metareason.api import Kernel
    from metareason.plugins.mcft.evaluation import evaluate_mcft

    model = tok = None
    out = {}
    for split in ("val", "test"):
        samples_path = root / f"base-reference-{split}-samples.jsonl"
        stamp_path = root / f"base-reference-{split}-eval.json"
        cfg = arm_config(raw, exp, {"target": "solution", "threshold": 0.0, "bf_beta": 0.0}, exp["lrs"][0], 0,
                         f"{raw['name']}-base-reference", data_dir, base["model"])
        cfg["data"]["eval"] = [_task(data_dir / f"critiques-{split}.jsonl", "solution", 10 ** 9)]
        stamp = eval_stamp(cfg)
        if not (reuse and samples_path.exists() and stamp_path.exists() and stamp_path.read_text() == stamp):
            kernel = Kernel(cfg)
            if model is None:
                model, tok = kernel.load()
            evaluate_mcft(kernel, model, tok, samples_path=samples_path)
            write_text_atomic(stamp_path, stamp)
        rows = {r["id"]: r for r in _read_jsonl(data_dir / f"critiques-{split}.jsonl")}
        samples = [dict(s, group=rows.get(s["id"], {}).get("group", "all"),
                        attempt_correct=rows.get(s["id"], {}).get("attempt_correct"))
                   for s in _read_jsonl(samples_path)]
        out[split] = summarise_split(samples)
        if split == "test":
            out["correct"] = {s["id"]: bool(s["correct"]) for s in samples}
            out["attempt_wrong_ids"] = sorted(s["id"] for s in samples if s.get("attempt_correct") is False)
    return out


def summarise_split(samples: list[dict]) -> dict:
    n = len(samples)
    acc = sum(s["correct"] for s in samples) / n if n else math.nan
    wrong = [s for s in samples if s.get("attempt_correct") is False]
    res = {"accuracy": acc, "n": n,
           "accuracy/attempt_wrong": (sum(s["correct"] for s in wrong) / len(wrong)) if wrong else math.nan,
           "n/attempt_wrong": len(wrong),
           "format_adherence": sum(s["well_formed"] for s in samples) / n if n else math.nan}
    for g in sorted({s["group"] for s in samples}):
        sel = [s for s in samples if s["group"] == g]
        res[f"accuracy/{g}"] = sum(s["correct"] for s in sel) / len(sel)
    return res


def arm_list(exp: dict) -> dict:
    arms = {}
    for t in exp["thresholds"]:
        arms[f"t{t:g}"] = {"threshold": float(t), "bf_beta": exp["bf_beta"], "target": "critique"}
    arms["bf0"] = {"threshold": None, "bf_beta": 0.0, "target": "critique"}  # threshold: the best on validation
    arms["solution_sft"] = {"threshold": 0.0, "bf_beta": 0.0, "target": "solution"}
    arms["answer_sft"] = {"threshold": 0.0, "bf_beta": 0.0, "target": "answer"}
    return arms


def run_arm(raw, exp, base_name, arm_name, arm, data_dir, base_model, reuse, log) -> dict:
    """lr chosen on validation with the first seed, then every seed at that lr."""
    from metareason.plugins.mcft.entropy import flag_metrics

    seeds = exp["seeds"]
    grid = {}
    runs = {}
    for lr in exp["lrs"]:
        name = f"{base_name}-{arm_name}-lr{lr:g}-s{seeds[0]}"
        cfg = arm_config(raw, exp, arm, lr, seeds[0], name, data_dir, base_model)
        log(f"arm {arm_name}: lr {lr:g} seed {seeds[0]}")
        run_dir, train_s, reused = _train(cfg, reuse)
        ev = evaluate_arm(cfg, run_dir, data_dir, arm["target"], reuse=reused, splits=("val",))
        grid[f"{lr:g}"] = summarise_split(ev["val"]["samples"])["accuracy"]
        runs[(lr, seeds[0])] = (cfg, run_dir, train_s, reused, ev)
    best_lr = max(exp["lrs"], key=lambda lr: (grid[f"{lr:g}"], -lr))
    cfg, run_dir, _, reused, ev = runs[(best_lr, seeds[0])]  # test: only the chosen lr's run
    ev.update(evaluate_arm(cfg, run_dir, data_dir, arm["target"], reuse=reused, splits=("test",)))
    per_seed = {}
    for seed in seeds:
        if (best_lr, seed) not in runs:
            name = f"{base_name}-{arm_name}-lr{best_lr:g}-s{seed}"
            cfg = arm_config(raw, exp, arm, best_lr, seed, name, data_dir, base_model)
            log(f"arm {arm_name}: lr {best_lr:g} seed {seed}")
            run_dir, train_s, reused = _train(cfg, reuse)
            runs[(best_lr, seed)] = (cfg, run_dir, train_s, reused,
                                     evaluate_arm(cfg, run_dir, data_dir, arm["target"], reuse=reused))
        cfg, run_dir, train_s, reused, ev = runs[(best_lr, seed)]
        val, test = ev["val"]["samples"], ev["test"]["samples"]
        thr = choose_entropy_threshold([s["mean_entropy"] for s in val], [s["correct"] for s in val])
        flags = flag_metrics([s["mean_entropy"] for s in test], [s["correct"] for s in test], thr)
        per_seed[str(seed)] = {
            "run_dir": str(run_dir), "train_s": train_s, "reused_training": reused,
            "val": summarise_split(val), "test": summarise_split(test),
            "entropy_threshold": thr, **{f"entropy_flag/{k}": v for k, v in flags.items()},
            "correct": {s["id"]: bool(s["correct"]) for s in test},
            "attempt_wrong_ids": sorted(s["id"] for s in test if s.get("attempt_correct") is False),
        }
    return dict(arm, lr=best_lr, lr_grid_val_accuracy=grid, seeds=per_seed)


def _mcnemar(ref: dict, arm: dict, seeds: list[int]) -> dict:
    out = {}
    for subset in ("all", "attempt_wrong"):
        per, tb, tc = {}, 0, 0
        for s in seeds:
            r, x = ref["seeds"][str(s)], arm["seeds"][str(s)]
            ids = set(r["attempt_wrong_ids"]) if subset == "attempt_wrong" else None
            b, c = paired(r["correct"], x["correct"], ids)
            per[str(s)] = {"b_ref_only": b, "c_arm_only": c, "p": mcnemar_p(b, c)}
            tb, tc = tb + b, tc + c
        out[subset] = {"per_seed": per, "pooled": {"b_ref_only": tb, "c_arm_only": tc, "p": mcnemar_p(tb, tc)}}
    return out


def statistics(arms: dict, seeds: list[int], best_threshold_arm: Optional[str] = None,
               base_ref: Optional[dict] = None) -> None:
    """Intervals across seeds per arm; McNemar of every arm against t0 and solution_sft, of bf0
    against the threshold arm it shares its threshold with (bf_beta 0 vs bf_beta > 0) and, given
    ``base_ref``, of every arm against the base it was fine-tuned from."""
    for name, a in arms.items():
        ps = [a["seeds"][str(s)] for s in seeds]
        keys = sorted({k for p in ps for k in p["test"] if k.startswith("accuracy") or k == "format_adherence"})
        a["test"] = {k: seed_interval([p["test"].get(k, math.nan) for p in ps]) for k in keys}
        a["val_accuracy"] = seed_interval([p["val"]["accuracy"] for p in ps])
        a["entropy"] = {k: seed_interval([p[f"entropy_flag/{k}"] for p in ps])
                        for k in ("precision", "recall", "auroc")}
        a["entropy"]["threshold"] = seed_interval([p["entropy_threshold"] for p in ps])
    for ref in ("t0", "solution_sft"):
        if ref not in arms:
            continue
        for name, a in arms.items():
            if name == ref:
                continue
            a.setdefault("mcnemar", {})[f"vs_{ref}"] = _mcnemar(arms[ref], a, seeds)
    if base_ref is not None:  # one model: the same base outcomes paired with every seed
        same = {"correct": base_ref["correct"], "attempt_wrong_ids": base_ref["attempt_wrong_ids"]}
        pseudo = {"seeds": {str(s): same for s in seeds}}
        for a in arms.values():
            a.setdefault("mcnemar", {})["vs_base"] = _mcnemar(pseudo, a, seeds)
    if best_threshold_arm in arms and "bf0" in arms:
        arms["bf0"].setdefault("mcnemar", {})[f"vs_{best_threshold_arm}"] = _mcnemar(arms[best_threshold_arm],
                                                                                     arms["bf0"], seeds)


# ------------------------------------------------------------------------------ report
def _ci(d: dict, digits: int = 3) -> str:
    if not d or d.get("n", 0) == 0 or math.isnan(d["mean"]):
        return "–"
    if math.isnan(d["lo"]):
        return f"{d['mean']:.{digits}f}"
    return f"{d['mean']:.{digits}f} [{d['lo']:.{digits}f}, {d['hi']:.{digits}f}]"


def _num(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def regime_check(record: dict) -> list[str]:
    """The design's precondition, read off the record: the critique arm without masking (t0) must
    at least reach copying the attempt's answer, else the regime the method is meant for was not
    reached and no hypothesis is read. Also states each arm's mean change from the base."""
    arms, copy = record["arms"], record["data"].get("test", {}).get("copy_attempt_accuracy")
    out = []
    if "t0" in arms and copy is not None:
        t0 = arms["t0"]["test"]["accuracy"]["mean"]
        verdict = ("reached: the hypotheses are read as the design says" if t0 >= copy else
                   "NOT reached: by the design no hypothesis is read; the arms' rows are reported as measured")
        out += ["", f"Regime check: t0's test accuracy {t0:.3f} vs copying the attempt's answer {copy:.3f} — {verdict}."]
    ref = record.get("base_reference")
    if ref:
        base = ref["test"]["accuracy"]
        out += ["", "Change from the base (test accuracy, mean over seeds): " + "; ".join(
            f"{n} {a['test']['accuracy']['mean'] - base:+.3f}" for n, a in arms.items()) + "."]
    return out


def render(record: dict) -> str:
    arms = record["arms"]
    lines = [
        "# MCFT experiment (issue 30)" + (" — QUICK smoke run, not a measurement" if record["quick"] else ""), "",
        f"Command: `{record['command']}`  ",
        f"Device: {record['device']}; torch {record['torch']}; seeds {record['seeds']}; {record['steps']} steps per "
        f"run; lr grid {record['lrs']} chosen per arm on validation (first seed). Intervals: 95% t-intervals of "
        "the mean across seeds.", "",
        f"Base: accuracy {record['base']['accuracy']} on its held-out questions "
        f"(required {record['base_min_accuracy']}), {record['base']['steps']} steps.", "",
        "Data: " + ", ".join(f"{k}: {v['rows']} rows" for k, v in record["data"].items() if "rows" in v)
        + f"; copying the attempt's answer scores {record['data'].get('test', {}).get('copy_attempt_accuracy')} "
        "on test", "",
        "| arm | threshold | bf_beta | target | lr | test accuracy | attempt wrong | format | val accuracy | "
        "entropy thr (val) | precision | recall | AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = record.get("base_reference")
    if ref:
        t = ref["test"]
        lines.append(f"| base, not fine-tuned | – | – | – | – | {_num(t['accuracy'])} | "
                     f"{_num(t.get('accuracy/attempt_wrong'))} | {_num(t.get('format_adherence'))} | "
                     f"{_num(ref['val']['accuracy'])} | – | – | – | – |")
    for name, a in arms.items():
        t = a["test"]
        lines.append(f"| {name} | {a['threshold']} | {a['bf_beta']} | {a['target']} | {a['lr']:g} | "
                     f"{_ci(t['accuracy'])} | {_ci(t.get('accuracy/attempt_wrong'))} | {_ci(t.get('format_adherence'))} | "
                     f"{_ci(a['val_accuracy'])} | {_ci(a['entropy']['threshold'])} | {_ci(a['entropy']['precision'])} | "
                     f"{_ci(a['entropy']['recall'])} | {_ci(a['entropy']['auroc'])} |")
    groups = sorted({k for a in arms.values() for k in a["test"] if k.startswith("accuracy/level")})
    if groups:
        lines += ["", "Test accuracy by level:", "", "| arm | " + " | ".join(g.split("/", 1)[1] for g in groups) + " |",
                  "|---|" + "---|" * len(groups)]
        if ref:
            lines.append("| base, not fine-tuned | " + " | ".join(_num(ref["test"].get(g)) for g in groups) + " |")
        for name, a in arms.items():
            lines.append(f"| {name} | " + " | ".join(_ci(a["test"].get(g)) for g in groups) + " |")
    lines += ["", "McNemar (exact, test items; pooled = discordant pairs summed over seeds; b = reference right "
              "and arm wrong, c = the reverse):", "",
              "| arm | vs | all: b / c, p | attempt wrong: b / c, p |", "|---|---|---|---|"]
    for name, a in arms.items():
        for ref, m in a.get("mcnemar", {}).items():
            cells = [f"{m[s]['pooled']['b_ref_only']} / {m[s]['pooled']['c_arm_only']}, {m[s]['pooled']['p']:.3g}"
                     for s in ("all", "attempt_wrong")]
            lines.append(f"| {name} | {ref[3:]} | {cells[0]} | {cells[1]} |")
    lines += regime_check(record)
    lines += ["", f"Best threshold on validation (bf_beta {record['bf_beta']}): {record['best_threshold']}; the "
              "`bf0` arm uses it with bf_beta 0.", ""]
    return "\n".join(lines)


def run_experiment(config: str, overrides: list[str], out: str = "bench-results/mcft-experiment",
                   quick: bool = False, quiet: bool = False, reuse: bool = False,
                   arms: Optional[str] = None, log=None) -> dict:
    import torch
    import yaml

    from metareason.api import UserError, apply_overrides, cpu_name, write_record

    log = log or (lambda msg: print(f"[mcft experiment] {msg}", file=sys.stderr))
    raw = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    exp = dict(DEFAULTS, **(raw.pop("experiment", None) or {}))
    raw = apply_overrides(raw, overrides, config)
    if quick:
        exp.update(QUICK)
        if not exp.get("base_model"):  # a given base (a real model) stays as it is
            raw["model"] = dict(raw.get("model", {}), arch=dict(QUICK_MODEL))
        raw["generation"] = dict(raw.get("generation", {}), max_new_tokens=8)
        raw["train"] = dict(raw.get("train", {}), batch_size=4, warmup_steps=0, log_every=1)
        raw["name"] = f"{raw.get('name', 'mcft-experiment')}-quick"
    raw["quiet"] = quiet or raw.get("quiet", False)
    for gen in (raw.get("generators") or {}).values():  # `local` generator paths: ~ allowed here
        if isinstance(gen, dict) and isinstance(gen.get("path"), str):
            gen["path"] = os.path.expanduser(gen["path"])
    if exp["base_layout"] not in ("attempt", "plain"):
        raise UserError(f"experiment.base_layout: {exp['base_layout']!r} is not one of 'attempt', 'plain'")
    all_arms = arm_list(exp)
    names = list(all_arms) if not arms else [a.strip() for a in arms.split(",") if a.strip()]
    unknown = [a for a in names if a not in all_arms]
    if unknown:
        raise UserError(f"--arms: unknown arm {unknown[0]!r} (known: {', '.join(all_arms)})")
    names = [n for n in all_arms if n in names]  # threshold arms first: bf0 takes the best of them
    threshold_arms = [n for n in names if n.startswith("t") and all_arms[n]["target"] == "critique"]
    if "bf0" in names and not threshold_arms:
        raise UserError("--arms: bf0 needs the threshold arms (its threshold is the best of them on validation)")
    from metareason.api import Kernel

    root = Kernel(raw).config.run_dir
    t0 = time.perf_counter()
    log("base")
    base = given_base(raw, exp) if exp.get("base_model") else train_base(raw, exp, root, reuse, quiet)
    if not quick and exp["base_min_accuracy"] > 0 and (base["accuracy"] is None
                                                       or base["accuracy"] < exp["base_min_accuracy"]):
        if base["accuracy"] is None:
            raise UserError(f"experiment.base_min_accuracy {exp['base_min_accuracy']}: the base's accuracy was not "
                            "measured (set experiment.base_eval_task, or base_min_accuracy: 0)")
        raise UserError(f"base accuracy {base['accuracy']} < experiment.base_min_accuracy "
                        f"{exp['base_min_accuracy']}: train the base longer (experiment.base_train)")
    reuse = reuse and base["reused"]  # a retrained base: every arm trains again
    log("critique data")
    data_dir = root / "data"
    data = build_data(raw, exp, data_dir, quiet, reuse)
    results = {}
    best_threshold = best_arm = None
    for name in names:
        arm = dict(all_arms[name])
        if name == "bf0":
            best_arm = max(threshold_arms, key=lambda n: (results[n]["val_mean"], -results[n]["threshold"]))
            best_threshold = arm["threshold"] = results[best_arm]["threshold"]
        results[name] = run_arm(raw, exp, raw["name"], name, arm, data_dir, base["model"], reuse, log)
        results[name]["val_mean"] = sum(p["val"]["accuracy"] for p in results[name]["seeds"].values()) / len(exp["seeds"])
    log("base reference (the base, not fine-tuned, on the arms' validation and test rows)")
    base_ref = base_reference(raw, exp, base, data_dir, root, reuse)
    statistics(results, exp["seeds"], best_arm, base_ref)
    record = {
        "command": " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "METAREASON_PLUGINS")
                            if os.environ.get(k))
                   + " metareason mcft experiment " + " ".join(shlex.quote(x) for x in [config, *overrides])
                   + (" --quick" if quick else "") + (" --reuse" if reuse else ""),
        "quick": quick, "device": cpu_name() if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "seeds": exp["seeds"], "lrs": exp["lrs"],
        "steps": exp["steps"], "bf_beta": exp["bf_beta"], "base_min_accuracy": exp["base_min_accuracy"],
        "best_threshold": best_threshold, "best_threshold_arm": best_arm, "base": base,
        "base_reference": {k: v for k, v in base_ref.items() if k in ("val", "test")}, "data": data, "arms": results,
        "wall_s": time.perf_counter() - t0,
    }
    write_record(Path(out).with_suffix(".json"), record, render(record))
    return record

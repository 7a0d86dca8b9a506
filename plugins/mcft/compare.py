"""``metareason mcft compare``: MCFT against its two baselines and a masking-threshold sweep.

1. Critique data: ``metareason mcft critiques`` on ``data.train`` and on ``data.eval`` of the
   base config (train questions and held-out questions; the demo's base generator is the noisy
   causal-loop solver, the teacher the programmatic one).
2. Every arm trains the same model from the same seed on the same critique rows for the same
   steps, and is evaluated on the same held-out critique rows (question + an attempt, right or
   wrong): accuracy against the gold answer, format adherence, entropy-flag precision / recall /
   AUROC for predicting a wrong answer.

Arms (``mcft.*`` overrides; all have ``mcft.enabled: true`` so the vocabulary is the same):

* ``mcft``          threshold 0.2, bf_beta 0.05, critique target (the method; also sweep point 0.2)
* ``critique_sft``  threshold 0,   bf_beta 0,    critique target (SFT on the same data, no masking)
* ``answer_sft``    threshold 0,   bf_beta 0,    answer-only target ``<ans>\\boxed{a}</ans>``
* ``sweep_0`` / ``sweep_0.1`` / ``sweep_0.3``: bf_beta 0.05, threshold 0 / 0.1 / 0.3
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

PROMPT_TEMPLATE = "{prompt}\nAttempt: {cot}\n"  # short: the char-level demo model reads every character

ARMS = {
    "mcft": {"threshold": 0.2, "bf_beta": 0.05, "target": "critique"},
    "critique_sft": {"threshold": 0.0, "bf_beta": 0.0, "target": "critique"},
    "answer_sft": {"threshold": 0.0, "bf_beta": 0.0, "target": "answer"},
    "sweep_0": {"threshold": 0.0, "bf_beta": 0.05, "target": "critique"},
    "sweep_0.1": {"threshold": 0.1, "bf_beta": 0.05, "target": "critique"},
    "sweep_0.3": {"threshold": 0.3, "bf_beta": 0.05, "target": "critique"},
}
TRAINING_SECTIONS = ("model", "data", "train", "mcft")
SWEEP = (("0", "sweep_0"), ("0.1", "sweep_0.1"), ("0.2", "mcft"), ("0.3", "sweep_0.3"))


def _task(path: Path, target: str, num_samples: int, seed: int) -> dict:
    return {"task": "mcft", "num_samples": num_samples, "seed": seed,
            "params": {"path": str(path), "target": target, "template": PROMPT_TEMPLATE, "system": ""}}


def build_data(config: str, overrides: list[str], data_dir: Path, quiet: bool) -> dict:
    from metareason.api import Kernel
    from metareason.plugins.mcft.critiques import build_critiques

    kernel = Kernel(config, overrides=overrides)
    return {split: build_critiques(kernel, split, data_dir / f"critiques-{split}.jsonl", quiet)
            for split in ("train", "eval")}


def same_section(stored, current, section_model=None) -> bool:
    """Whether a run's written config section equals this one's. A field the written config lacks
    (added to the kernel after the run was written) counts as equal when this config leaves it at
    its default; every other difference counts (so a run written before a new setting existed is
    reused only while that setting stays at its default)."""
    if not (isinstance(stored, dict) and isinstance(current, dict)):
        return stored == current
    fields = getattr(type(section_model), "model_fields", {}) if section_model is not None else {}
    for key in set(stored) | set(current):
        if key in stored and key in current:
            if stored[key] != current[key]:
                return False
        elif key in current and key in fields:
            from pydantic import TypeAdapter

            field = fields[key]
            default = field.get_default(call_default_factory=True)
            if TypeAdapter(field.annotation).dump_python(default, mode="json") != current[key]:
                return False
        else:
            return False
    return True


def checkpoint_step(kernel):
    """The step of the run dir's latest checkpoint, or None, when the run dir's config has the same
    model, data, train and mcft sections as this one (what decides the trained weights)."""
    import yaml

    from metareason.api import dump_config, latest_checkpoint

    run_dir = kernel.config.run_dir
    ckpt = latest_checkpoint(run_dir) if run_dir.exists() else None
    written = run_dir / "config.yaml"
    if ckpt is None or not ckpt.name.rsplit("-", 1)[-1].isdigit() or not written.exists():
        return None
    da, db = yaml.safe_load(written.read_text(encoding="utf-8")) or {}, yaml.safe_load(dump_config(kernel.config)) or {}
    if not all(same_section(da.get(k), db.get(k), getattr(kernel.config, k, None)) for k in TRAINING_SECTIONS):
        return None
    return int(ckpt.name.rsplit("-", 1)[-1])


def _trained_already(kernel) -> bool:
    """The run dir holds a checkpoint at ``train.max_steps`` and a config whose model, data, train and
    mcft sections equal this one's."""
    return checkpoint_step(kernel) == kernel.config.train.max_steps


def run_arm(config: str, overrides: list[str], name: str, arm: dict, data_dir: Path, n_train: int,
            n_eval: int, quiet: bool, reuse: bool = False) -> dict:
    from metareason.api import Kernel
    from metareason.plugins.mcft.evaluation import evaluate_mcft
    from metareason.api import load_trained

    base = Kernel(config, overrides=overrides)
    raw = dict(base.raw_config)
    raw["name"] = f"{base.config.name}-{name}"
    raw["quiet"] = quiet or base.config.quiet
    raw["data"] = dict(raw.get("data", {}),
                       train=[_task(data_dir / "critiques-train.jsonl", arm["target"], n_train, 0)],
                       eval=[_task(data_dir / "critiques-eval.jsonl", arm["target"], n_eval, 0)])
    raw["eval"] = dict(raw.get("eval", {}), at_end=False)
    raw["mcft"] = dict(raw.get("mcft", {}), enabled=True, threshold=arm["threshold"], bf_beta=arm["bf_beta"])
    kernel = Kernel(raw)
    reused = reuse and _trained_already(kernel)
    train_s = None
    if not reused:
        t0 = time.perf_counter()
        kernel.run(overwrite=True)  # not reused: trained again
        train_s = time.perf_counter() - t0
    rows = [json.loads(l) for l in (kernel.config.run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    last = [r for r in rows if "train/lm_loss" in r][-1]
    trained = load_trained(kernel.config.run_dir)
    t1 = time.perf_counter()
    metrics = evaluate_mcft(trained.kernel, trained.model, trained.tokenizer,
                            samples_path=kernel.config.run_dir / "mcft_eval_samples.jsonl")
    return dict(arm, reused_training=reused, train_s=train_s, eval_s=time.perf_counter() - t1,
                final_lm_loss=last["train/lm_loss"],
                final_format_term=last.get("train/mcft_format"), steps=last.get("step"), **metrics)


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else math.nan


def render(record: dict) -> str:
    arms = record["arms"]
    n = next(iter(arms.values()))["num_samples"] if arms else 0
    lines = [
        "# MCFT comparison (causal-loop critiques, tiny char-level Llama)", "",
        f"Command: `{record['command']}`  ",
        f"Device: {record['device']}; torch {record['torch']}; {record['steps']} steps per arm, same seed, "
        f"same data. Held-out: {n} critique rows (question + a base attempt); accuracy is against the gold "
        f"answer; ± is one binomial standard error.", "",
        "Data: " + ", ".join(f"{k}: {v['rows']} rows, {v['attempts_correct']} attempts correct, "
                              f"{v['dropped']} dropped (answer_match false)" for k, v in record["data"].items()), "",
        "| arm | threshold | bf_beta | target | accuracy | acc. (attempt right) | acc. (attempt wrong) | "
        "format adherence | entropy-flag AUROC | precision | recall | flagged | final LM loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        se = _binomial_se(a["accuracy"], a["num_samples"])
        lines.append(f"| {name} | {a['threshold']} | {a['bf_beta']} | {a['target']} | {a['accuracy']:.3f} ± {se:.3f} | "
                     f"{_fmt(a.get('accuracy/attempt_right'))} | {_fmt(a.get('accuracy/attempt_wrong'))} | "
                     f"{a['format_adherence']:.3f} | {_fmt(a['entropy_flag/auroc'])} | "
                     f"{_fmt(a['entropy_flag/precision'])} | {_fmt(a['entropy_flag/recall'])} | "
                     f"{a['entropy_flag/flagged']} | {_fmt(a['final_lm_loss'])} |")
    lines += ["", "Threshold sweep (bf_beta 0.05):", "", "| threshold | accuracy | format adherence | AUROC |",
              "|---|---|---|---|"]
    for t, name in SWEEP:
        if name in arms:
            a = arms[name]
            lines.append(f"| {t} | {a['accuracy']:.3f} | {a['format_adherence']:.3f} | {_fmt(a['entropy_flag/auroc'])} |")
    lines += ["", "Entropy flag: mean token entropy of the completion (teacher-forced) > "
              f"{record['entropy_threshold']} nats; precision / recall of the flag for a wrong answer; AUROC of "
              "the raw mean entropy as a score for a wrong answer (0.5 = no information).", ""]
    if record.get("notes"):
        lines += ["## Reading", "", record["notes"], ""]
    return "\n".join(lines)


def run_compare(config: str, overrides: list[str], out: str = "bench-results/mcft-compare", arms: str = "all",
                quiet: bool = False, reuse: bool = False) -> dict:
    import torch

    from metareason.api import Kernel, UserError, cpu_name, write_record

    names = list(ARMS) if arms == "all" else [a.strip() for a in arms.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARMS]
    if unknown:
        raise UserError(f"--arms: unknown arm {unknown[0]!r} (known: {', '.join(ARMS)})")
    base = Kernel(config, overrides=overrides)
    data_dir = base.config.run_dir / "data"
    data = build_data(config, overrides, data_dir, quiet)
    n_train, n_eval = data["train"]["answer_match"], data["eval"]["answer_match"]
    results = {}
    for name in names:
        print(f"[mcft compare] arm {name}", file=sys.stderr)
        results[name] = run_arm(config, overrides, name, ARMS[name], data_dir, n_train, n_eval, quiet, reuse)
    record = {
        "command": " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "METAREASON_PLUGINS")
                            if os.environ.get(k))
                   + " metareason mcft compare " + " ".join(shlex.quote(x) for x in [config, *overrides])
                   + (" --reuse" if reuse else ""),
        "device": cpu_name() if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "steps": base.config.train.max_steps,
        "entropy_threshold": base.config.mcft.entropy_threshold, "data": data, "arms": results,
    }
    write_record(Path(out).with_suffix(".json"), record, render(record))
    return record

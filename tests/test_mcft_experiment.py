"""`metareason mcft experiment` (issue 30): the statistics (exact McNemar, seed t-intervals, the
entropy threshold chosen on validation), the driver's choices on synthetic evaluations (lr and
best threshold chosen on validation, never on test; every seed trained with its own train.seed
from the same base for the same steps) and the quick mode end to end through the CLI."""
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from metareason.plugins.mcft import experiment as ex
from metareason.plugins.mcft.data import make_task
from tests.conftest import run_cli
from tests.test_mcft import write_rows

ENV = {"METAREASON_PLUGINS": "mcft", "OMP_NUM_THREADS": "1"}


def binom_two_sided(k, n):
    """Exact two-sided binomial p at 1/2, summing every outcome as unlikely as k (the definition)."""
    pk = math.comb(n, k)
    return min(1.0, sum(math.comb(n, i) for i in range(n + 1) if math.comb(n, i) <= pk) / 2 ** n)


def t_interval(vals):
    """95% t-interval of the mean (t_{0.975} from published tables: df 2 -> 4.302653, 4 -> 2.776445)."""
    n = len(vals)
    mean = sum(vals) / n
    sem = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) / math.sqrt(n)
    t = {2: 4.302653, 4: 2.776445}[n - 1]
    return mean - t * sem, mean + t * sem


def test_mcnemar_is_the_exact_two_sided_binomial_test():
    assert ex.mcnemar_p(0, 0) == 1.0
    assert ex.mcnemar_p(0, 5) == pytest.approx(2 / 32)
    for b, c in ((1, 9), (9, 1), (3, 4), (0, 12), (7, 20)):
        assert ex.mcnemar_p(b, c) == pytest.approx(binom_two_sided(min(b, c), b + c))
    assert ex.mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert ex.paired({"a": True, "b": False, "c": True}, {"a": False, "b": True, "c": True}) == (1, 1)
    assert ex.paired({"a": True, "b": False}, {"a": False, "b": True}, ids={"b"}) == (0, 1)


def test_seed_interval_is_the_t_interval_of_the_mean():
    for vals in ([0.5, 0.6, 0.8], [0.1, 0.4, 0.2, 0.3, 0.35]):
        got = ex.seed_interval(vals)
        lo, hi = t_interval(vals)
        assert got["mean"] == pytest.approx(sum(vals) / len(vals)) and got["n"] == len(vals)
        assert (got["lo"], got["hi"]) == (pytest.approx(lo, abs=1e-6), pytest.approx(hi, abs=1e-6))
    assert ex.t975(60) == pytest.approx(2.000298, abs=1e-4) and ex.t975(1000) == pytest.approx(1.962339, abs=1e-4)
    one = ex.seed_interval([0.4])
    assert one["mean"] == 0.4 and math.isnan(one["lo"])


def test_entropy_threshold_maximises_youden_j_for_wrong_answers():
    ent = [0.2, 0.3, 0.9, 1.0, 0.4, 1.2]
    correct = [True, True, False, False, True, False]
    t = ex.choose_entropy_threshold(ent, correct)
    assert 0.4 <= t < 0.9  # every wrong flagged, no right one
    assert t == 0.4
    assert ex.choose_entropy_threshold([0.1, 0.2], [True, True]) == 0.2  # one class: flag nothing


def test_solution_target_is_the_solution_without_the_critique(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = write_rows(data, n=3)
    ex_sol = make_task({"path": str(data), "target": "solution", "shuffle": False}, 0, 3)
    r, e = rows[0], ex_sol[0]
    assert e["completion"] == (f"<think><reasoning>{r['reasoning']}</reasoning></think>"
                               f"<ans>\\boxed{{{r['answer']}}}</ans>")
    assert "<critique>" not in e["completion"]
    crit = make_task({"path": str(data), "target": "critique", "shuffle": False}, 0, 3)[0]
    assert crit["prompt"] == e["prompt"] and r["critique"] in crit["completion"]


# ------------------------------------------------------------------ the driver, synthetic evaluations
N = 10
LRS = [1.0e-3, 3.0e-3]
BONUS_VAL = {"t0.2": 2}         # t0.2 is the best threshold on validation ...
BONUS_TEST = {"t0.3": 3}        # ... t0.3 on test: bf0 must take 0.2


def _k(split, arm, lr, seed):
    if split == "val":  # lr 1e-3 wins on validation, 3e-3 on test
        return 4 + (2 if lr == 1.0e-3 else 0) + BONUS_VAL.get(arm, 0)
    return 3 + (2 if lr == 3.0e-3 else 0) + seed + BONUS_TEST.get(arm, 0)


def _offset(arm):
    return sum(map(ord, arm)) % N


def synthetic_samples(split, arm, lr, seed):
    k, off = _k(split, arm, lr, seed), _offset(arm)
    out = []
    for i in range(N):
        correct = (i + off) % N < k
        out.append({"id": f"{split}{i}", "correct": correct, "well_formed": True, "group": f"level_{1 + i % 3}",
                    "attempt_correct": i % 2 == 0,
                    # val: wrong 2.0 / right 1.0 (Youden picks 1.0); test: wrong 1.5 / right 0.5
                    "mean_entropy": (2.0 if not correct else 1.0) if split == "val" else (1.5 if not correct else 0.5)})
    return out


def test_driver_chooses_lr_and_thresholds_on_validation_and_pairs_seeds(tmp_path, monkeypatch):
    trained = []

    def fake_base(raw, exp, root, reuse, quiet):
        return {"model": "BASE", "reused": False, "accuracy": 0.99, "steps": 1, "run_dir": "b", "train_s": 0,
                "metrics": {}}

    def fake_train(cfg, reuse):
        trained.append(cfg)
        return Path(cfg["name"]), 0.0, False

    evaluated = []

    def fake_eval(cfg, run_dir, data_dir, target, reuse=False, splits=("val", "test")):
        m = re.fullmatch(r".*?-(t[0-9.]+|bf0|solution_sft|answer_sft)-lr([0-9.e-]+)-s(\d+)", cfg["name"])
        arm, lr, seed = m.group(1), float(m.group(2)), int(m.group(3))
        evaluated.extend((arm, lr, seed, s) for s in splits)
        return {s: {"samples": synthetic_samples(s, arm, lr, seed), "metrics": {}} for s in splits}

    monkeypatch.setattr(ex, "train_base", fake_base)
    monkeypatch.setattr(ex, "build_data", lambda *a: {"train": {"rows": 1}})
    monkeypatch.setattr(ex, "_train", fake_train)
    monkeypatch.setattr(ex, "evaluate_arm", fake_eval)
    base_test = synthetic_samples("test", "base", 1.0e-3, 0)

    def fake_base_ref(raw, exp, base, data_dir, root, reuse):
        assert base["model"] == "BASE"
        return {"val": ex.summarise_split(synthetic_samples("val", "base", 1.0e-3, 0)),
                "test": ex.summarise_split(base_test), "correct": {s["id"]: s["correct"] for s in base_test},
                "attempt_wrong_ids": sorted(s["id"] for s in base_test if s["attempt_correct"] is False)}

    monkeypatch.setattr(ex, "base_reference", fake_base_ref)
    cfg = yaml.safe_load(open("configs/mcft/experiment.yaml"))
    cfg["output_dir"] = str(tmp_path)
    cfg["experiment"].update(seeds=[0, 1, 2], lrs=LRS, steps=7)
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rec = ex.run_experiment(str(path), [], out=str(tmp_path / "res"), quiet=True, log=lambda m: None)
    arms = rec["arms"]
    assert list(arms) == ["t0", "t0.1", "t0.2", "t0.3", "bf0", "solution_sft", "answer_sft"]
    assert all(a["lr"] == 1.0e-3 for a in arms.values())  # validation, not test (test prefers 3e-3)
    assert rec["best_threshold"] == 0.2 and arms["bf0"]["threshold"] == 0.2 and arms["bf0"]["bf_beta"] == 0.0
    # every run: from the base, the same steps; the grid with the first seed, then each seed at its lr
    for c in trained:
        seed = int(c["name"].rsplit("-s", 1)[1])
        assert c["train"]["seed"] == seed and c["train"]["max_steps"] == 7 and c["model"]["path"] == "BASE"
    per_arm = {}
    for c in trained:
        per_arm.setdefault(c["name"].split("-lr")[0].rsplit("-", 1)[-1], []).append((c["train"]["lr"], c["train"]["seed"]))
    assert per_arm["t0.2"] == [(1.0e-3, 0), (3.0e-3, 0), (1.0e-3, 1), (1.0e-3, 2)]
    # the test split is generated for the chosen lr's runs only (the other grid runs: validation only)
    assert {(lr, seed) for arm, lr, seed, split in evaluated if split == "test"} == {(1.0e-3, s) for s in (0, 1, 2)}
    assert sum(split == "test" for *_, split in evaluated) == 3 * len(arms)
    assert {(lr, seed) for arm, lr, seed, split in evaluated if split == "val"} == {(1.0e-3, 0), (3.0e-3, 0),
                                                                                    (1.0e-3, 1), (1.0e-3, 2)}
    mc = {c["name"]: c["mcft"] for c in trained}
    assert {(v["threshold"], v["bf_beta"]) for k, v in mc.items() if "-t0.1-" in k} == {(0.1, 0.05)}
    assert {c["data"]["train"][0]["params"]["target"] for c in trained if "solution_sft" in c["name"]} == {"solution"}
    # entropy threshold from validation (1.0; test alone would give 0.5), applied to test
    s0 = arms["t0"]["seeds"]["0"]
    assert s0["entropy_threshold"] == 1.0
    assert s0["entropy_flag/recall"] == 1.0 and s0["entropy_flag/precision"] == 1.0
    # intervals across seeds: test accuracy (3 + 0 + seed) / 10 at lr 1e-3 for t0
    accs = [(3 + s) / N for s in (0, 1, 2)]
    lo, hi = t_interval(accs)
    t = arms["t0"]["test"]["accuracy"]
    assert t["mean"] == pytest.approx(sum(accs) / 3) and (t["lo"], t["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    # McNemar of t0.3 against t0, pooled over seeds, computed here independently
    b = c = 0
    for seed in (0, 1, 2):
        ref = {x["id"]: x["correct"] for x in synthetic_samples("test", "t0", 1.0e-3, seed)}
        arm = {x["id"]: x["correct"] for x in synthetic_samples("test", "t0.3", 1.0e-3, seed)}
        b += sum(ref[i] and not arm[i] for i in ref)
        c += sum(arm[i] and not ref[i] for i in ref)
    pooled = arms["t0.3"]["mcnemar"]["vs_t0"]["all"]["pooled"]
    assert (pooled["b_ref_only"], pooled["c_arm_only"]) == (b, c) and b + c > 0
    assert pooled["p"] == pytest.approx(binom_two_sided(min(b, c), b + c))
    assert set(arms["t0.3"]["mcnemar"]["vs_t0"]["attempt_wrong"]["per_seed"]) == {"0", "1", "2"}
    assert "vs_t0.2" in arms["bf0"]["mcnemar"] and "vs_solution_sft" in arms["t0.2"]["mcnemar"]
    # every arm against the base it started from: the base's one set of outcomes paired with each seed
    for seed in (0, 1, 2):
        arm = {x["id"]: x["correct"] for x in synthetic_samples("test", "t0.1", 1.0e-3, seed)}
        b = sum(x["correct"] and not arm[x["id"]] for x in base_test)
        c = sum(arm[x["id"]] and not x["correct"] for x in base_test)
        got = arms["t0.1"]["mcnemar"]["vs_base"]["all"]["per_seed"][str(seed)]
        assert (got["b_ref_only"], got["c_arm_only"]) == (b, c)
    assert rec["base_reference"]["test"]["accuracy"] == sum(x["correct"] for x in base_test) / N
    md = (tmp_path / "res.md").read_text()
    assert "| t0.2 | 0.2 | 0.05 | critique | 0.001 |" in md and "McNemar" in md
    assert "| base, not fine-tuned |" in md and "| t0 | base |" in md and "Change from the base" in md


def test_regime_check_reads_t0_against_copying_the_attempt():
    rec = {"arms": {"t0": {"test": {"accuracy": {"mean": 0.2}}}}, "data": {"test": {"copy_attempt_accuracy": 0.55}},
           "base_reference": {"test": {"accuracy": 0.9}}}
    text = "\n".join(ex.regime_check(rec))
    assert "NOT reached" in text and "t0 -0.700" in text
    rec["arms"]["t0"]["test"]["accuracy"]["mean"] = 0.6
    assert "NOT reached" not in "\n".join(ex.regime_check(rec))


@pytest.mark.slow
def test_quick_mode_runs_every_stage_end_to_end(tmp_path):
    out = tmp_path / "res" / "exp"
    r = run_cli("mcft", "experiment", "configs/mcft/experiment.yaml", f"output_dir={tmp_path / 'runs'}", "--quick",
                "--quiet", "--out", str(out), env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["quick"] and rec["seeds"] == [0, 1] and len(rec["lrs"]) == 2
    assert list(rec["arms"]) == ["t0", "t0.1", "t0.2", "t0.3", "bf0", "solution_sft", "answer_sft"]
    assert rec["data"]["train"]["rows"] == 12 and rec["data"]["val"]["rows"] == 6 and rec["data"]["test"]["rows"] == 8
    assert rec["data"]["test"]["groups"] == ["level_1", "level_2", "level_3"]
    base_model = rec["base"]["model"]
    assert (Path(base_model) / "config.json").exists() and rec["base"]["accuracy"] is not None
    # the base learns in the arms' layout: question + attempt -> the solution alone, in their tags
    base_cfg = yaml.safe_load((Path(rec["base"]["run_dir"]) / "config.yaml").read_text())
    (base_train,), (base_eval,) = base_cfg["data"]["train"], base_cfg["data"]["eval"]
    assert base_train["task"] == base_eval["task"] == "mcft" and base_train["params"]["target"] == "solution"
    assert "Attempt: {cot}" in base_train["params"]["template"] and base_train["params"]["path"].endswith("base-pool.jsonl")
    assert len((Path(base_train["params"]["path"])).read_text().splitlines()) == 32
    for name, a in rec["arms"].items():
        assert set(a["seeds"]) == {"0", "1"} and set(a["lr_grid_val_accuracy"]) == {f"{lr:g}" for lr in rec["lrs"]}
        for key in ("accuracy", "accuracy/attempt_wrong", "accuracy/level_1", "accuracy/level_3"):
            assert {"mean", "lo", "hi", "sd", "n"} <= set(a["test"][key]) and a["test"][key]["n"] == 2
        assert {"precision", "recall", "auroc", "threshold"} <= set(a["entropy"])
        for seed, s in a["seeds"].items():
            written = yaml.safe_load((Path(s["run_dir"]) / "config.yaml").read_text())
            assert written["train"]["seed"] == int(seed) and written["train"]["lr"] == a["lr"]
            assert written["model"]["path"] == base_model and written["train"]["max_steps"] == rec["steps"]
            assert written["mcft"]["threshold"] == a["threshold"] and written["mcft"]["bf_beta"] == a["bf_beta"]
            assert len(s["correct"]) == 8
        if name != "t0":
            p = a["mcnemar"]["vs_t0"]["all"]["pooled"]["p"]
            assert 0.0 <= p <= 1.0
    ref = rec["base_reference"]
    assert ref["test"]["n"] == 8 and ref["val"]["n"] == 6 and "accuracy/level_1" in ref["test"]
    assert len((tmp_path / "runs" / "mcft-experiment-quick" / "base-reference-test-samples.jsonl")
               .read_text().splitlines()) == 8
    md = out.with_suffix(".md").read_text()
    assert "QUICK" in md and "McNemar" in md and "| solution_sft |" in md and "| base, not fine-tuned |" in md
    # --reuse: finished runs are not trained again and their samples are read, not generated again,
    # unless what the samples depend on changed (here the generation section)
    t0_dir = Path(rec["arms"]["t0"]["seeds"]["0"]["run_dir"])
    samples = t0_dir / "experiment-test-samples.jsonl"
    base_samples = tmp_path / "runs" / "mcft-experiment-quick" / "base-reference-test-samples.jsonl"
    before, base_before = samples.stat().st_mtime_ns, base_samples.stat().st_mtime_ns
    again = run_cli("mcft", "experiment", "configs/mcft/experiment.yaml", f"output_dir={tmp_path / 'runs'}", "--quick",
                    "--quiet", "--reuse", "--out", str(out), env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    rec2 = json.loads(out.with_suffix(".json").read_text())
    assert samples.stat().st_mtime_ns == before and base_samples.stat().st_mtime_ns == base_before
    assert all(s["reused_training"] for a in rec2["arms"].values() for s in a["seeds"].values())
    assert rec2["arms"]["t0"]["seeds"]["0"]["correct"] == rec["arms"]["t0"]["seeds"]["0"]["correct"]
    changed = run_cli("mcft", "experiment", "configs/mcft/experiment.yaml", f"output_dir={tmp_path / 'runs'}",
                      "generation.batch_size=3", "--quick", "--quiet", "--reuse", "--out", str(out), env=ENV)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert samples.stat().st_mtime_ns != before and base_samples.stat().st_mtime_ns != base_before


# ------------------------------------------------------------------ the real-model pieces
def chat_solver(prompt, **kw):
    """A base generator that records what it is given (JSON lines in $MCFT_SEEN) and answers the
    user turn's question. (A file: the generator may import this module under another name.)"""
    import os

    from metareason.plugins.mcft.teacher import noisy_solver

    with open(os.environ["MCFT_SEEN"], "a") as f:
        f.write(json.dumps(prompt) + "\n")
    question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
    return noisy_solver(question, **kw)


def test_arithmetic_teacher_points_to_the_first_wrong_equation_then_the_final_answer():
    from metareason.plugins.mcft.format import DEFAULT_TEACHER_PROMPT as T
    from metareason.plugins.mcft.teacher import arithmetic_critique, arithmetic_teacher

    crit, reasoning, ans = arithmetic_critique("Calculate 5 - 33 - 65.",
                                               "First 5 - 33 = -28.\nThen -28 - 65 = -92.\nSo \\boxed{-92}.")
    assert crit == "The step -28 - 65 = -92 is wrong: -28 - 65 = -93."
    assert (reasoning, ans) == ("5 - 33 = -28; -28 - 65 = -93.", -93)
    # a restated chain is checked whole, not from its middle
    assert arithmetic_critique("Calculate 5 - 33 - 65.", "5 - 33 - 65 = -93")[0] == "The final answer -93 is correct."
    assert arithmetic_critique("Calculate 8 - 2.", "It is 4.")[0] == "The final answer 4 is wrong: it should be 6."
    assert arithmetic_critique("Calculate 8 - 2.", "no idea")[0] == "The attempt gives no final answer."
    # the attempt may span lines: everything after "Attempt:" is read
    out = arithmetic_teacher(T.format(prompt="Calculate 0 - 2.", cot="Let us see.\nSo, 0 - 2 = 2."))
    assert out == "<critique>The step 0 - 2 = 2 is wrong: 0 - 2 = -2.</critique><reasoning>0 - 2 = -2.</reasoning>" \
                  "<ans>\\boxed{-2}</ans>"


def test_base_attempts_in_chat_messages_and_test_groups_per_task(tmp_path, monkeypatch):
    from metareason.plugins.mcft.critiques import build_critiques
    from metareason import Kernel

    cfg = yaml.safe_load(open("configs/mcft/experiment.yaml"))
    exp = dict(ex.DEFAULTS, **cfg.pop("experiment"))
    exp.update(n_train=4, n_val=2, test_task=[
        {"task": "causal_loop", "seed": 5, "num_samples": 3, "group": "easy", "params": {"levels": [1], "split": "test"}},
        {"task": "causal_loop", "seed": 6, "num_samples": 2, "group": "hard", "params": {"levels": [3], "split": "test"}}])
    cfg.update(output_dir=str(tmp_path))
    cfg["generators"]["base"] = {"type": "python", "function": "tests.test_mcft_experiment:chat_solver"}
    cfg["mcft"]["base_system_prompt"] = "SYS"
    seen_file = tmp_path / "seen.jsonl"
    monkeypatch.setenv("MCFT_SEEN", str(seen_file))

    def seen():
        got = [json.loads(l) for l in seen_file.read_text().splitlines()]
        seen_file.unlink()
        return got

    summary = ex.build_data(cfg, exp, tmp_path / "data", quiet=True)
    got = seen()
    assert got and all(isinstance(p, list) and p[0] == {"role": "system", "content": "SYS"}
                       and p[1]["role"] == "user" for p in got)
    test = [json.loads(l) for l in (tmp_path / "data" / "critiques-test.jsonl").read_text().splitlines()]
    assert [r["group"] for r in test] == ["easy"] * 3 + ["hard"] * 2
    assert summary["test"]["groups"] == ["easy", "hard"] and summary["train"]["rows"] == 4
    assert summary["val"]["rows"] == 2 and 0 <= summary["test"]["copy_attempt_accuracy"] <= 1
    train = [json.loads(l) for l in (tmp_path / "data" / "critiques-train.jsonl").read_text().splitlines()]
    val = [json.loads(l) for l in (tmp_path / "data" / "critiques-val.jsonl").read_text().splitlines()]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    # without base_system_prompt the generator gets the bare question, as before
    cfg["mcft"].pop("base_system_prompt")
    k = Kernel(dict(cfg, data={"train": [{"task": "causal_loop", "num_samples": 2, "params": {"levels": [1]}}]}))
    build_critiques(k, "train", tmp_path / "x.jsonl", quiet=True)
    got = seen()
    assert got and all(isinstance(p, str) for p in got)


def test_mcft_tags_start_as_distinct_rows_so_lora_can_tell_them_apart(tmp_path):
    from metareason import Kernel
    from metareason.plugins.mcft.format import TAGS
    from tests.conftest import TINY_LLAMA

    k = Kernel({"quiet": True, "output_dir": str(tmp_path), "plugins": ["mcft"], "mcft": {"enabled": True},
                "model": {"arch": dict(TINY_LLAMA), "tokenizer": {"type": "char"}}})
    model, tok = k.load()
    rows = model.get_input_embeddings().weight
    ids = [tok.convert_tokens_to_ids(t) for t in TAGS]
    assert len({tuple(rows[i].tolist()) for i in ids}) == len(TAGS)


def test_a_given_base_model_is_used_as_it_is_without_a_base_stage(tmp_path, monkeypatch):
    trained = []

    def no_base(*a, **k):
        raise AssertionError("experiment.base_model is set: no base is trained")

    def fake_eval(cfg, run_dir, data_dir, target, reuse=False, splits=("val", "test")):
        seed = cfg["train"]["seed"]
        return {s: {"samples": synthetic_samples(s, "t0", cfg["train"]["lr"], seed), "metrics": {}}
                for s in splits}

    monkeypatch.setattr(ex, "train_base", no_base)
    monkeypatch.setattr(ex, "build_data", lambda *a: {"train": {"rows": 1}})
    monkeypatch.setattr(ex, "_train", lambda cfg, reuse: (trained.append(cfg), (Path(cfg["name"]), 0.0, False))[1])
    monkeypatch.setattr(ex, "evaluate_arm", fake_eval)
    ref_of = []

    def fake_base_ref(raw, exp, base, *a):
        ref_of.append(base["model"])
        test = synthetic_samples("test", "base", 1.0e-3, 0)
        return {"val": ex.summarise_split(synthetic_samples("val", "base", 1.0e-3, 0)), "test": ex.summarise_split(test),
                "correct": {s["id"]: s["correct"] for s in test}, "attempt_wrong_ids": []}

    monkeypatch.setattr(ex, "base_reference", fake_base_ref)
    base = tmp_path / "instruct"
    base.mkdir()
    cfg = yaml.safe_load(open("configs/mcft/experiment.yaml"))
    cfg["output_dir"] = str(tmp_path)
    cfg["experiment"].update(seeds=[0, 1], lrs=LRS, base_model=str(base), base_eval_task=None, base_min_accuracy=0.5)
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(Exception, match="base's accuracy was not measured"):
        ex.run_experiment(str(path), [], out=str(tmp_path / "res"), quiet=True, arms="t0", log=lambda m: None)
    cfg["experiment"]["base_min_accuracy"] = 0.0
    path.write_text(yaml.safe_dump(cfg))
    rec = ex.run_experiment(str(path), [], out=str(tmp_path / "res"), quiet=True, arms="t0", log=lambda m: None)
    assert rec["base"]["model"] == str(base.resolve()) and rec["base"]["steps"] == 0
    assert ref_of == [str(base.resolve())]  # the reference row is the given model, not fine-tuned
    assert trained and all(c["model"]["path"] == str(base.resolve()) and "arch" not in c["model"] for c in trained)


def test_a_run_written_before_a_new_setting_is_reused_only_at_that_settings_default():
    from metareason import Kernel
    from metareason.plugins.mcft.compare import same_section

    raw = yaml.safe_load(open("configs/mcft/experiment.yaml"))
    raw.pop("experiment")
    kernel = Kernel(raw)
    train = kernel.config.train.model_dump(mode="json")
    older = {k: v for k, v in train.items() if k != "lean_activations"}  # written before the field existed
    assert same_section(older, train, kernel.config.train)  # the new field at its default
    assert not same_section(older, dict(train, lean_activations=False), kernel.config.train)
    assert not same_section(dict(older, lr=older["lr"] * 2), train, kernel.config.train)
    assert not same_section(dict(older, gone=1), train, kernel.config.train)  # a field this kernel lacks
    assert same_section(train, train, kernel.config.train)


def test_reuse_resumes_an_interrupted_run_of_the_same_config_and_retrains_a_changed_one(tmp_path, kernel_run_calls):
    """--reuse: a finished run is kept, a run stopped between checkpoints (the session ended) goes on
    from its last checkpoint, and a run dir written with another config is trained again from scratch."""
    import shutil

    from metareason.api import read_metrics
    from tests.test_mcft import tiny_config, write_rows

    data = tmp_path / "crit.jsonl"
    write_rows(data, n=16)
    cfg = tiny_config(tmp_path, data, name="arm")
    cfg["train"].update(max_steps=4, save_every=2, keep_last=5)
    calls = kernel_run_calls
    run_dir, train_s, reused = ex._train(cfg, reuse=True)
    assert (calls, reused) == ([False], False) and train_s is not None
    assert ex._train(cfg, reuse=True)[2] is True and calls == [False]  # finished: kept
    (run_dir / "experiment-done").unlink()  # stopped after step 2's checkpoint
    shutil.rmtree(run_dir / "checkpoints" / "step-0000004")
    first = {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
    _, train_s, reused = ex._train(cfg, reuse=True)
    assert calls == [False, True] and not reused and train_s is None
    again = {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
    assert again == first and sorted(again) == [1, 2, 3, 4]  # steps 3-4 again, as uninterrupted
    (run_dir / "experiment-done").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "step-0000004")
    changed = dict(cfg, train=dict(cfg["train"], lr=cfg["train"].get("lr", 1e-3) * 2))
    ex._train(changed, reuse=True)
    assert calls == [False, True, False]  # another config: from scratch

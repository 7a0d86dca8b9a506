"""The causal-loop demonstration of MERA/CSPO (``metareason cspo demo [configs/cspo]``).

Stages, each a config in the folder (each also runs alone with ``metareason run`` /
``metareason cspo takeover``):

1. ``sft``      ``causal_loop_sft.yaml``      tiny from-scratch target on overthinking traces
                                              -> "SFT without control"
2. ``takeover`` ``causal_loop_takeover.yaml`` takeover data from that target (programmatic alter)
3. ``control``  ``causal_loop_control.yaml``  SFT on the takeover data -> "SFT with control"
4. ``cspo``     ``causal_loop_cspo.yaml``     GRPO with the control mask and control reward
                                              -> "after CSPO"
5. ``nomask``   the same with ``cspo.mask_rl_loss=false`` (plain GRPO on every token; ablation)
6. ``report``   accuracy and mean generated tokens of 1, 3, 4, 5 on the same held-out problems,
                greedy and sampled -> ``bench-results/cspo-demo.md`` and ``.json``

The driver chains the stages: the takeover's target is stage 1's run, its output is the file
stage 3 reads, and stages 3 and 4 start from the previous stage's latest checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from metareason.api import UserError, write_text_atomic

STAGES = ("sft", "takeover", "control", "cspo", "nomask", "report")
FILES = {"sft": "causal_loop_sft.yaml", "takeover": "causal_loop_takeover.yaml",
         "control": "causal_loop_control.yaml", "cspo": "causal_loop_cspo.yaml"}
LABELS = {"sft": "SFT without control", "control": "SFT with control", "cspo": "after CSPO",
          "nomask": "GRPO without the control mask (ablation)"}
NOMASK = ["cspo.mask_rl_loss=false", "name=cspo-cl-grpo-nomask"]


def _latest(run_dir: Path, stage: str) -> Path:
    from metareason.api import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"{run_dir}: no checkpoint of the {stage!r} stage (run it first: --stages {stage},...)")
    return ckpt


def _last_eval(run_dir: Path) -> dict:
    from metareason.api import read_metrics

    rows = [r for r in read_metrics(run_dir) if "eval/accuracy" in r]
    if not rows:
        raise UserError(f"{run_dir}: no evaluation recorded")
    return rows[-1]


def _control_stats(run_dir: Path, name: str = "eval_samples.jsonl") -> dict:
    """Share of eval completions with control segments, their decisions, mean solution passes."""
    from metareason.plugins.cspo.alter import decision_of
    from metareason.plugins.cspo.segments import parse_segments

    path = run_dir / name
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    with_control, decisions, passes = 0, {}, []
    for r in rows:
        segs = parse_segments(r["completion"]).segments
        with_control += bool(segs)
        for s in segs:
            d = decision_of(s.content)
            decisions[d] = decisions.get(d, 0) + 1
        first = r["completion"].split(";", 1)[0]
        passes.append(r["completion"].count(first) if re.fullmatch(r"[A-Z]=.+=-?\d+", first) else 0)
    return {"with_control": with_control / max(len(rows), 1), "decisions": decisions,
            "mean_passes": sum(passes) / max(len(passes), 1)}


def sampled_eval(run_dir: Path, temperature: float = 1.0, seed: int = 0) -> dict:
    """The run's eval problems once more, sampling at ``temperature`` (seeded): the greedy
    answer hides a policy's probabilities (a 0.65 / 0.35 control decision is always the 0.65
    one), sampling shows them. Samples go to ``eval_samples_sampled.jsonl``."""
    import torch

    from metareason.api import Kernel, evaluate, load_weights_into

    kernel = Kernel(run_dir / "config.yaml", overrides=[
        "quiet=true", "generation.do_sample=true", f"generation.temperature={temperature}", "generation.top_p=1.0"])
    model, tokenizer = kernel.load()
    load_weights_into(model, _latest(run_dir, run_dir.name))
    torch.manual_seed(seed)
    metrics = evaluate(kernel, model, tokenizer, write_samples=run_dir / "eval_samples_sampled.jsonl")
    return {"accuracy": metrics["eval/accuracy"], "gen_tokens": metrics["eval/gen_tokens"],
            **_control_stats(run_dir, "eval_samples_sampled.jsonl")}


def decision_probability(run_dir: Path, first: str = "conclude", second: str = "continue") -> Optional[float]:
    """Mean over the eval problems of P(first) / (P(first) + P(second)) for the content of the
    first control segment, teacher-forced after the greedy completion's first ``<control>``:
    the control policy itself, which greedy decoding shows only as its argmax."""
    import torch

    from metareason.api import Kernel, load_weights_into
    from metareason.plugins.cspo.segments import CONTROL_OPEN

    path = run_dir / "eval_samples.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if CONTROL_OPEN in r["completion"]]
    if not rows:
        return None
    kernel = Kernel(run_dir / "config.yaml", overrides=["quiet=true"])
    model, tok = kernel.load()
    load_weights_into(model, _latest(run_dir, run_dir.name))
    model.eval()
    with torch.no_grad():
        shares = [_first_share(model, tok, r, first, second) for r in rows]
    return sum(shares) / len(shares)


def _first_share(model, tok, row: dict, first: str, second: str) -> float:
    import torch

    from metareason.api import prompt_ids
    from metareason.plugins.cspo.segments import CONTROL_CLOSE, CONTROL_OPEN

    text = row["completion"]
    head = prompt_ids(tok, row["prompt"]) + tok(text[: text.index(CONTROL_OPEN)] + CONTROL_OPEN,
                                                add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    logp = []
    for word in (first, second):
        ids = torch.tensor([head + tok(word + CONTROL_CLOSE, add_special_tokens=False)["input_ids"]], device=device)
        lp = torch.log_softmax(model(input_ids=ids).logits[0, len(head) - 1:-1].float(), -1)
        logp.append(float(lp.gather(-1, ids[0, len(head):, None]).sum()))
    return 1.0 / (1.0 + math.exp(logp[1] - logp[0]))


def _rl_summary(run_dir: Path, window: int = 10) -> dict:
    """Means of the reward parts, completion length and loss tokens over the first and the last
    ``window`` logged steps (one step's rollout is only 8 prompts: single rows are noisy)."""
    from metareason.api import read_metrics

    rows = [r for r in read_metrics(run_dir) if "rl/reward/mean" in r]
    if not rows:
        return {}
    keys = [k for k in rows[0] if (k.startswith("rl/reward/") and k.endswith("/mean"))
            or k in ("rl/completion_length/mean", "rl/loss_tokens")]

    def mean(part: list[dict]) -> dict:
        out = {k: sum(r[k] for r in part) / len(part) for k in keys}
        out["steps"] = [r["step"] for r in part]
        return out

    return {"first": mean(rows[:window]), "last": mean(rows[-window:])}


def run_demo(config_dir: str = "configs/cspo", stages: str = "all", out: str = "bench-results/cspo-demo",
             quiet: bool = False, overrides: Optional[list[str]] = None) -> dict:
    from metareason.api import Kernel, load_config
    from metareason.plugins.cspo.takeover import run_takeover

    user_overrides = list(overrides or [])
    overrides = user_overrides + (["quiet=true"] if quiet else [])
    todo = list(STAGES) if stages == "all" else [s.strip() for s in stages.split(",") if s.strip()]
    bad = [s for s in todo if s not in STAGES]
    if bad:
        raise UserError(f"--stages: unknown stage {bad[0]!r} (choose from {', '.join(STAGES)})")
    folder = Path(config_dir)
    files = {k: folder / v for k, v in FILES.items()}
    for path in files.values():
        if not path.is_file():
            raise UserError(f"{config_dir}: {path.name} not found (the demo needs {', '.join(FILES.values())})")
    cfgs = {k: load_config(p, overrides)[0] for k, p in files.items()}
    runs = {k: cfgs[k].run_dir for k in ("sft", "control", "cspo")}
    runs["nomask"] = load_config(files["cspo"], overrides + NOMASK)[0].run_dir
    takeover_out = cfgs["control"].data.train[0].params.get("path")
    if not takeover_out:
        raise UserError(f"{files['control']}: data.train[0].params.path: the takeover file is needed")

    record_path = Path(out + ".json")
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record.setdefault("timings_s", {})
    t_all = time.perf_counter()
    for stage in todo:
        t0 = time.perf_counter()
        print(f"[cspo demo] stage {stage}", file=sys.stderr, flush=True)
        if stage == "sft":
            Kernel(files["sft"], overrides=overrides).run(overwrite=True)  # a stage re-run starts it again
        elif stage == "takeover":
            record["takeover"] = run_takeover(str(files["takeover"]), overrides + [
                f"cspo.target_model_name={runs['sft']}", f"cspo.output={takeover_out}"])
        elif stage == "control":
            Kernel(files["control"], overrides=overrides + [f"model.path={_latest(runs['sft'], 'sft')}"]).run(overwrite=True)
        elif stage in ("cspo", "nomask"):
            extra = NOMASK if stage == "nomask" else []
            Kernel(files["cspo"], overrides=overrides + extra + [
                f"model.path={_latest(runs['control'], 'control')}"]).run(overwrite=True)
        if stage != "report":
            record["timings_s"][stage] = round(time.perf_counter() - t0, 1)
    if "report" in todo:
        record["results"] = {}
        for key in ("sft", "control", "cspo", "nomask"):
            if not (runs[key] / "metrics.jsonl").exists():
                continue
            ev = _last_eval(runs[key])
            record["results"][key] = {"label": LABELS[key], "run": str(runs[key]),
                                      "accuracy": ev["eval/accuracy"], "gen_tokens": ev["eval/gen_tokens"],
                                      "num_samples": ev.get("eval/num_samples"), **_control_stats(runs[key]),
                                      "p_conclude": decision_probability(runs[key]),
                                      "sampled": sampled_eval(runs[key])}
        record["cspo_training"] = _rl_summary(runs["cspo"]) if runs["cspo"].exists() else {}
        record["nomask_training"] = _rl_summary(runs["nomask"]) if runs["nomask"].exists() else {}
        args = [config_dir, *user_overrides] + (["--stages", stages] if stages != "all" else [])
        args += (["--out", out] if out != "bench-results/cspo-demo" else []) + (["--quiet"] if quiet else [])
        env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS",) if k in os.environ)
        record["command"] = env + "metareason cspo demo " + " ".join(shlex.quote(a) for a in args)
        record["machine"] = _machine()
        write_report(Path(out), record)
    print(f"[cspo demo] done in {time.perf_counter() - t_all:.0f} s", file=sys.stderr)
    return record


def _machine() -> dict:
    import torch

    from metareason.api import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_report(out: Path, record: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out.with_suffix(".json"), json.dumps(record, indent=2) + "\n"),
                       (out.with_suffix(".md"), render_markdown(record))):
        write_text_atomic(path, text)


def _table(res: dict, pick) -> list[str]:
    base = pick(res["sft"])["gen_tokens"] if "sft" in res and pick(res["sft"]) else None
    lines = ["| model | accuracy | mean generated tokens | vs. SFT without control | completions with control | "
             "decisions in control segments | mean solution passes |", "|---|---|---|---|---|---|---|"]
    for key in ("sft", "control", "cspo", "nomask"):
        r = pick(res[key]) if key in res else None
        if not r:
            lines.append(f"| {LABELS[key]} | not run | | | | | |")
            continue
        delta = f"{(r['gen_tokens'] / base - 1) * 100:+.1f}%" if base else ""
        decisions = ", ".join(f"{k} {v}" for k, v in sorted(r.get("decisions", {}).items())) or "none"
        lines.append(f"| {LABELS[key]} | {r['accuracy']:.4f} | {r['gen_tokens']:.1f} | {delta} | "
                     f"{r.get('with_control', 0):.2f} | {decisions} | {r.get('mean_passes', 0):.2f} |")
    return lines


def render_markdown(record: dict) -> str:
    res = record.get("results", {})
    lines = ["# CSPO demonstration (causal loop) — measured", "",
             f"Command: `{record.get('command', 'metareason cspo demo configs/cspo')}`", ""]
    m = record.get("machine", {})
    if m:
        lines += [f"Machine: {m.get('cpu')}, {m.get('cores')} cores, GPU: {m.get('cuda') or 'none'}, "
                  f"torch {m.get('torch')}.", ""]
    n = next((r.get("num_samples") for r in res.values() if r.get("num_samples")), None)
    lines += [f"Held-out problems: {n} causal-loop level-1 problems (`split: test`, never trained on); the same "
              "problems for every row. A *solution pass* is one computation of the chain (the overthinking "
              "target re-computes it after each validation keyword).", "",
              "### Greedy decoding (the runs' own evaluation)", ""]
    lines += _table(res, lambda r: r)
    lines += ["", "### Sampling (temperature 1, seed 0): the policies' probabilities, not only their argmax", ""]
    lines += _table(res, lambda r: r.get("sampled"))
    lines.append("")
    to = record.get("takeover")
    if to:
        lines += ["## Takeover data", "",
                  f"{to['prompts']} training prompts -> {to['records']} SFT records; target accuracy "
                  f"{to['accuracy']:.4f}, {to['mean_target_tokens']:.1f} target tokens per prompt, "
                  f"{to['takeovers_per_prompt']:.2f} takeovers per prompt, decisions {to['decisions']}, "
                  f"{to['declined_triggers']} keyword triggers declined (fewer than max_target_tokens).", ""]
    probs = [(LABELS[k], r.get("p_conclude")) for k, r in res.items() if r.get("p_conclude") is not None]
    if probs:
        lines += ["## The control decision", "",
                  "P(`conclude`) / (P(`conclude`) + P(`continue`)) for the content of the first control segment, "
                  "teacher-forced after each greedy completion's first `<control>`, mean over the held-out problems:",
                  "", "| model | P(conclude) |", "|---|---|"]
        lines += [f"| {label} | {p:.4f} |" for label, p in probs] + [""]
    for key, title in (("cspo_training", "CSPO"), ("nomask_training", "GRPO without the control mask")):
        tr = record.get(key)
        if not tr:
            continue
        first, last = tr["first"]["steps"], tr["last"]["steps"]
        lines += [f"## {title} training (sampled rollouts; means over logged steps)", "",
                  f"| metric | steps {first[0]}-{first[-1]} | steps {last[0]}-{last[-1]} |", "|---|---|---|"]
        lines += [f"| {k} | {tr['first'][k]:.4f} | {tr['last'].get(k, float('nan')):.4f} |"
                  for k in tr["first"] if k != "steps"]
        lines.append("")
    times = record.get("timings_s", {})
    if times:
        lines += ["## Wall time per stage", "", " · ".join(f"{k}: {v:.0f} s" for k, v in times.items()), ""]
    return "\n".join(lines)

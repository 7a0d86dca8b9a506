"""Issue 33's comparison: every RL objective on the quickstart task, same budget, 3 seeds.

    python bench/rl_objectives.py                       # base, lr grid, seeds, test, report
    python bench/rl_objectives.py --quick --out /tmp/rlq  # a smoke run of every stage (minutes)

Protocol (docs/grpo.md, "Objectives compared"): the base is the quickstart SFT model
(configs/quickstart.yaml, trained once); every objective starts from it and runs GRPO on
causal-loop level 2 (where the base is at about 50%) for the same number of steps, prompts and
samples. Each objective's learning rate is chosen on a validation set (split: train problems of
another seed, never the test problems) with seed 0 from the same grid; seeds 1 and 2 then run at
that rate, and every seed's final model (seed 0: its grid run at the chosen rate) is evaluated on
the held-out test problems. The report
gives reward curves, validation and test accuracy per objective (mean and range over seeds), the
steps to reach a reward threshold, and a paired exact McNemar test of each objective against
`grpo` on the same test questions (seeds pooled). Finished runs are reused, so the script resumes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

OBJECTIVES: dict[str, dict] = {
    "grpo": {"loss_type": "grpo"},
    "bnpo": {"loss_type": "bnpo"},
    "dr_grpo": {"loss_type": "dr_grpo"},
    "dapo": {"loss_type": "dapo", "epsilon_high": 0.28},
    "gspo": {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
    "cispo": {"loss_type": "cispo", "epsilon_high": 5.0},
    "sapo": {"loss_type": "sapo"},
    "luspo": {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    "vespo": {"loss_type": "vespo"},
}
LR_GRID = (1e-5, 3e-5, 1e-4)
LEVELS = [2]


def base_checkpoint(runs: Path, quick: bool) -> Path:
    """The quickstart SFT model every objective starts from (trained once, then reused)."""
    from metareason.kernel import Kernel

    name = "rlobj-base-quick" if quick else "rlobj-base"
    ckpts = runs / name / "checkpoints"
    done = sorted(ckpts.glob("step-*")) if ckpts.exists() else []
    steps = 20 if quick else 1800
    if not done or done[-1].name != f"step-{steps:07d}":
        over = [f"name={name}", f"output_dir={runs}", "quiet=true"]
        if quick:
            over += [f"train.max_steps={steps}", "train.save_every=0", "eval.at_end=false"]
        Kernel(REPO / "configs" / "quickstart.yaml", overrides=over).run(resume=bool(done))
        done = sorted(ckpts.glob("step-*"))
    return done[-1]


def run_config(name: str, runs: Path, base: Path, objective: str, lr: float, seed: int, eval_spec: dict,
               quick: bool) -> dict:
    rl = dict(OBJECTIVES[objective], num_generations=4 if quick else 8, rewards={"causal_loop_exact": 1.0},
              num_iterations=2, max_completion_length=32 if quick else 160, temperature=1.0, beta=0.0)
    return {
        "name": name, "output_dir": str(runs), "quiet": True, "plugins": [],
        "model": {"path": str(base), "dtype": "float32"},
        "data": {"train": [{"task": "causal_loop", "num_samples": 4000, "seed": 9,
                            "params": {"levels": LEVELS, "split": "train"}}],
                 "eval": [eval_spec]},
        "train": {"algorithm": "grpo", "max_steps": 3 if quick else 60, "batch_size": 2 if quick else 8,
                  "lr": lr, "schedule": "constant", "max_grad_norm": 1.0, "log_every": 1, "keep_last": 1,
                  "save_every": 0, "seed": seed},
        "rl": rl,
        "generation": {"max_new_tokens": 32 if quick else 200, "batch_size": 150},
    }


def validation_spec(quick: bool) -> dict:
    return {"task": "causal_loop", "num_samples": 20 if quick else 200, "seed": 777,
            "params": {"levels": LEVELS, "split": "train"}}


def test_spec(quick: bool) -> dict:
    return {"task": "causal_loop", "num_samples": 20 if quick else 300, "seed": 1234,
            "params": {"levels": LEVELS, "split": "test"}}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_and_eval(cfg: dict, runs: Path) -> dict:
    """Train (unless already finished), evaluate on the config's eval set; returns the summary."""
    from metareason.kernel import Kernel

    run_dir = runs / cfg["name"]
    summary = run_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text(encoding="utf-8"))
    kernel = Kernel(cfg)
    final = kernel.run(overwrite=True)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    curve = [(r["step"], r["rl/reward/mean"]) for r in rows if "rl/reward/mean" in r]
    samples = read_jsonl(run_dir / "eval_samples.jsonl")
    out = {"accuracy": final["eval/accuracy"], "curve": curve,
           "correct": {s["id"]: s["score"] >= 1.0 for s in samples}}
    summary.write_text(json.dumps(out), encoding="utf-8")
    return out


def test_eval(run_dir: Path, spec: dict, tag: str = "test") -> dict:
    """The run's final model on the held-out test problems (once; then read back)."""
    path = run_dir / f"{tag}_summary.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    from metareason.evaluate import evaluate
    from metareason.trained import load_trained

    trained = load_trained(run_dir, None, ["quiet=true", "data.eval=" + json.dumps([spec])])
    metrics = evaluate(trained.kernel, trained.model, trained.tokenizer, step=trained.step,
                       write_samples=run_dir / f"{tag}_samples.jsonl")
    samples = read_jsonl(run_dir / f"{tag}_samples.jsonl")
    out = {"accuracy": metrics["eval/accuracy"], "correct": {s["id"]: s["score"] >= 1.0 for s in samples}}
    path.write_text(json.dumps(out), encoding="utf-8")
    return out


def mcnemar(b: int, c: int) -> float:
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)


def steps_to(curve: list, threshold: float) -> int | None:
    for step, reward in curve:
        if reward >= threshold:
            return step
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "rl-objectives"))
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks every stage, measures nothing")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        p.error(f"--objectives: unknown {unknown[0]!r} (known: {', '.join(OBJECTIVES)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    tag = "rlobj-quick" if args.quick else "rlobj"
    base = base_checkpoint(runs, args.quick)
    grid = LR_GRID[:1] if args.quick else LR_GRID
    results: dict[str, dict] = {}
    def name(obj, lr, seed):
        return f"{tag}-{obj}-lr{lr:g}-s{seed}"

    for obj in objectives:
        # every run is scored on validation; seed 0's grid picks the rate, seeds 1.. run at it
        val = {lr: train_and_eval(run_config(name(obj, lr, seeds[0]), runs, base, obj, lr, seeds[0],
                                             validation_spec(args.quick), args.quick), runs) for lr in grid}
        lr = max(grid, key=lambda x: (val[x]["accuracy"], -x))  # ties: the smaller rate
        trained = {seeds[0]: val[lr]}
        for s in seeds[1:]:
            trained[s] = train_and_eval(run_config(name(obj, lr, s), runs, base, obj, lr, s,
                                                   validation_spec(args.quick), args.quick), runs)
        tests = {s: test_eval(runs / name(obj, lr, s), test_spec(args.quick)) for s in seeds}
        results[obj] = {"lr": lr, "validation": {f"{k:g}": v["accuracy"] for k, v in val.items()},
                        "test": {s: t["accuracy"] for s, t in tests.items()},
                        "curves": {s: t["curve"] for s, t in trained.items()},
                        "correct": {s: t["correct"] for s, t in tests.items()}}
        print(f"[rl-objectives] {obj}: lr {lr:g}, test {[round(t['accuracy'], 3) for t in tests.values()]}",
              file=sys.stderr)
    # the reference every objective starts from: the base itself on the same two problem sets
    base_ref = {"validation": test_eval(base.parents[1], validation_spec(args.quick), "validation")["accuracy"],
                "test": test_eval(base.parents[1], test_spec(args.quick), "test")["accuracy"]}
    write_report(results, seeds, Path(args.out), args.quick, base_ref)
    return 0


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone)."""
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[key]))
        adjusted[key] = running
    return adjusted


def write_report(results: dict, seeds: list[int], out: Path, quick: bool, base_ref: dict | None = None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    ref = results.get("grpo")
    paired, raw = {}, {}
    if ref is not None:
        for obj, r in results.items():
            if obj == "grpo":
                continue
            b = c = 0  # b: right under grpo only, c: right under this objective only (seeds pooled)
            for seed in seeds:
                for qid, ok in r["correct"][seed].items():
                    other = ref["correct"][seed].get(qid)
                    b += bool(other and not ok)
                    c += bool(ok and other is False)
            paired[obj] = (b, c)
            raw[obj] = mcnemar(b, c)
    adjusted = holm(raw) if raw else {}

    def mean(xs):
        return sum(xs) / len(xs)

    lines = [f"# RL objectives on the quickstart task{' (quick smoke, not a measurement)' if quick else ''}", "",
             "Command: `python bench/rl_objectives.py" + (" --quick" if quick else "") + "` (two drivers on "
             "disjoint `--objectives`, then one over all of them, which reuses every finished run and writes "
             "this report). Protocol, written before the runs: docs/grpo.md, \"Objectives compared\", and "
             "the module docstring of bench/rl_objectives.py.", ""]
    if base_ref is not None:
        lines += [f"Reference, the base every objective starts from (no RL): validation accuracy "
                  f"{base_ref['validation']:.3f}, test accuracy {base_ref['test']:.3f} (greedy, the same problems).", ""]
    lines += ["| objective | validation accuracy at " + " / ".join(f"{lr:g}" for lr in LR_GRID[: len(next(iter(results.values()))['validation'])])
              + " (seed 0) | lr chosen | test accuracy per seed | mean [min, max] | mean reward, steps 1-10 → 51-60 "
              "(seeds averaged) | steps to mean reward 0.7 (per seed) | vs grpo: right only under grpo / only here "
              "| McNemar p (Holm) | above grpo on every seed |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for obj, r in results.items():
        accs = [r["test"][seed] for seed in seeds]
        curves = list(r["curves"].values())
        first = mean([mean([x for _, x in c[:10]]) for c in curves])
        last = mean([mean([x for _, x in c[-10:]]) for c in curves])
        reach = [steps_to(c, 0.7) for c in curves]
        val = " / ".join(f"{v:.3f}" for v in r["validation"].values())
        if obj in paired:
            b, c = paired[obj]
            cmp, pv = f"{b} / {c}", f"{raw[obj]:.2g} ({adjusted[obj]:.2g})"
            every = "yes" if all(r["test"][seed] > ref["test"][seed] for seed in seeds) else "no"
        else:
            cmp = pv = every = "—"
        lines.append(f"| {obj} | {val} | {r['lr']:g} | {', '.join(f'{a:.3f}' for a in accs)} | "
                     f"{mean(accs):.3f} [{min(accs):.3f}, {max(accs):.3f}] | {first:.3f} → {last:.3f} | "
                     f"{', '.join('-' if x is None else str(x) for x in reach)} | {cmp} | {pv} | {every} |")
    winners = [o for o in paired if adjusted[o] < 0.05 and all(results[o]["test"][s] > ref["test"][s] for s in seeds)]
    lines += ["", "**Verdict (the rule fixed in advance: above grpo on every seed and Holm-adjusted McNemar p < 0.05):** "
              + (", ".join(winners) + " learned faster than grpo here." if winners else
                 "no objective is distinguishable from grpo at this budget."), ""]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    slim = {o: {k: v for k, v in r.items() if k != "correct"} for o, r in results.items()}
    record = {"objectives": slim, "base": base_ref, "mcnemar": {o: {"b": paired[o][0], "c": paired[o][1], "p": raw[o],
              "p_holm": adjusted[o]} for o in paired}, "winners": winners}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    _plot(results, out.with_name(out.name + "-reward.png"))
    print(f"[rl-objectives] wrote {out.with_suffix('.md')}", file=sys.stderr)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for obj, r in results.items():
        curves = list(r["curves"].values())
        steps = [s for s, _ in curves[0]]
        mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(min(len(c) for c in curves))]
        window = min(10, len(mean))  # 10 steps = 5 rollouts (num_iterations 2): one batch of prompts is noisy
        smooth = [sum(mean[max(0, i - window + 1): i + 1]) / len(mean[max(0, i - window + 1): i + 1])
                  for i in range(len(mean))]
        ax.plot(steps[: len(smooth)], smooth, label=obj)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward (seeds averaged, trailing mean over 10 steps)")
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

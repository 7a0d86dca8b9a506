"""Issue 28, part A: the behaviors method experiment on the tiny model, end to end and resumable.

    python bench/behaviors_method.py --bases-only               # the three bases and their gate
    python bench/behaviors_method.py --arms sft,bcsft &         # two drivers on disjoint arms,
    python bench/behaviors_method.py --arms bci                 # after the bases exist
    python bench/behaviors_method.py                            # reuses every run; the report
    python bench/behaviors_method.py --quick --runs /tmp/q --out /tmp/q/report  # every stage, tiny

The design, written before any run: docs/behaviors.md, "Experiment design (issue 28)". Every
stage is the documented command (``metareason run`` / ``metareason eval`` with the doc's
arguments), executed through the CLI's own entry point in this process, in the doc's order:
the base of each seed (gate: test accuracy >= 0.90, else its steps are doubled once, a run of its
own, ``-x2``, and the arms start from whatever that reaches), each arm's training
data (examples, teacher accuracy, lengths), the learning-rate grid on the validation split
(seed 0, the largest budget), every budget of every seed at the chosen rate, the test
evaluations, then the statistics (``method_stats``) into ``--out``.md/.json.

A stage is finished when its run's final checkpoint and its expected eval file are there; a
finished stage is reused, so an interrupted driver resumes. A run without its final checkpoint
is resumed from its last checkpoint (``--resume``) or, holding none, started afresh
(``--overwrite``, which deletes its partial outputs); a trained run whose evaluation is
missing is evaluated again (``metareason eval RUN_DIR``, the run's own eval set).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the design's one thread per run (before torch loads)

import argparse
import json
import math
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "behaviors" / "method"
DEFAULT_OUT = REPO / "bench" / "results" / "behaviors-method"
ARMS = ("sft", "bcsft", "bci")
ARM_PARAMS = {"sft": "answers: plain", "bcsft": "answers: cited", "bci": "block: mix"}
VAL_PARAMS = {"sft": "", "bcsft": "", "bci": ", block: ordered"}
# per-step seconds and per-question evaluation seconds of the design's compute estimate (one core)
STEP_S = {"base": 0.37, "sft": 0.79, "bcsft": 0.45, "bci": 0.86}
EVAL_Q_S = 0.1
TAG = "[behaviors-method]"


@dataclass(frozen=True)
class Sizes:
    """The design's sizes, or (``--quick``) every stage in miniature."""
    base_steps: int = 1500
    budgets: tuple = (150, 300, 600)
    lr_grid: tuple = ("5e-4", "1e-3", "2e-3")  # written as in the run names of the doc's commands
    gate: float = 0.90
    prefix: str = "behaviors-method"
    extra: tuple = ()  # overrides added to every command (quick only)
    train_samples: int = 100000
    val_samples: int = 300
    test_samples: Optional[int] = None  # None: the eval configs' own counts
    base_eval: Optional[int] = None  # None: pretrain.yaml's own eval set


FULL = Sizes()
QUICK = Sizes(base_steps=6, budgets=(2, 3, 4), lr_grid=("5e-4", "2e-3"), gate=0.0, prefix="behaviors-methodq",
              extra=("quiet=true", "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1",
                     "generation.max_new_tokens=12"),
              train_samples=48, val_samples=4, test_samples=4, base_eval=4)


# ------------------------------------------------------------------------------ the commands
@dataclass
class Plan:
    sizes: Sizes
    runs: Path
    commands: list = field(default_factory=list)  # every command executed or reused, in order
    doubled: set = field(default_factory=set)  # seeds whose base missed the gate: its steps doubled once
    executed: list = field(default_factory=list)  # the commands this invocation ran

    def show(self, argv: list[str], prog: str = "metareason") -> str:
        """The command as typed from the repository root (the doc's form)."""
        def rel(a: str) -> str:
            return a.replace(str(REPO) + os.sep, "")
        return prog + " " + " ".join(shlex.quote(rel(a)) for a in argv)

    def common(self) -> list[str]:
        out = [] if self.runs == REPO / "runs" else [f"output_dir={self.runs}"]
        return out + list(self.sizes.extra)

    def base_steps(self, seed: int) -> int:
        return self.sizes.base_steps * (2 if seed in self.doubled else 1)

    def base_name(self, seed: int) -> str:
        """The base every arm of ``seed`` starts from (``-x2``: the doubled one, a run of its own)."""
        return f"{self.sizes.prefix}-base-s{seed}" + ("-x2" if seed in self.doubled else "")

    def base_argv(self, seed: int) -> list[str]:
        n = self.sizes.train_samples
        argv = ["run", str(CONFIGS / "pretrain.yaml"), f"name={self.base_name(seed)}", f"train.seed={seed}",
                f"data.train=[{{task: behavior_chain, num_samples: {n}, seed: {seed}, "
                f"params: {{format: method, kind: pretrain}}}}]"]
        if self.base_steps(seed) != FULL.base_steps:
            argv.append(f"train.max_steps={self.base_steps(seed)}")
        if self.sizes.base_eval is not None:
            argv.append(f"data.eval=[{{task: behavior_chain, num_samples: {self.sizes.base_eval}, seed: 1234, "
                        f"params: {{format: method, kind: pretrain, split: test}}}}]")
        return argv + self.common()

    def base_checkpoint(self, seed: int) -> Path:
        return self.runs / self.base_name(seed) / "checkpoints" / f"step-{self.base_steps(seed):07d}"

    def run_name(self, arm: str, seed: int, lr: str, budget: int) -> str:
        return f"{self.sizes.prefix}-{arm}-s{seed}-lr{lr}-{budget}"

    def train_spec(self, arm: str, seed: int) -> str:
        return (f"[{{task: behavior_chain, num_samples: {self.sizes.train_samples}, seed: {seed}, "
                f"params: {{format: method, {ARM_PARAMS[arm]}}}}}]")

    def val_spec(self, arm: str) -> str:
        return (f"[{{task: behavior_chain, num_samples: {self.sizes.val_samples}, seed: 4321, "
                f"params: {{format: method, split: val{VAL_PARAMS[arm]}}}}}]")

    def student_argv(self, arm: str, seed: int, lr: str, budget: int) -> list[str]:
        return ["run", str(CONFIGS / "student.yaml"), f"name={self.run_name(arm, seed, lr, budget)}",
                f"model.path={self.base_checkpoint(seed)}", f"train.seed={seed}", f"train.lr={lr}",
                f"train.max_steps={budget}", f"data.train={self.train_spec(arm, seed)}",
                f"data.eval={self.val_spec(arm)}", "eval.at_end=true"] + self.common()

    def test_specs(self, arm: str) -> list[dict]:
        import yaml

        path = CONFIGS / ("eval-bci.yaml" if arm == "bci" else "eval.yaml")
        specs = yaml.safe_load(path.read_text(encoding="utf-8"))["data"]["eval"]
        if self.sizes.test_samples is not None:
            specs = [dict(s, num_samples=self.sizes.test_samples) for s in specs]
        return specs

    def test_argv(self, arm: str, run_dir: Path) -> list[str]:
        return ["eval", str(run_dir), "data.eval=" + json.dumps(self.test_specs(arm))] + self.common()


def metareason(plan: Plan, argv: list[str]) -> None:
    """One documented command, through the CLI's entry point; a failure stops the driver."""
    from metareason.cli import main as cli

    plan.executed.append(plan.show(argv))
    print(f"{TAG}   $ {plan.show(argv)}", file=sys.stderr, flush=True)
    rc = cli(list(argv))
    if rc != 0:
        raise SystemExit(f"{TAG} stopped: `{plan.show(argv)}` exited with {rc} (the error is above); "
                         f"run the driver again to resume")


def final_checkpoint(run_dir: Path, steps: int) -> Optional[Path]:
    from metareason.checkpoint import list_checkpoints

    found = [p for p in list_checkpoints(run_dir) if p.name == f"step-{steps:07d}"]
    return found[0] if found else None


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def train_run(plan: Plan, argv: list[str], run_dir: Path, steps: int, keep: Optional[Path]) -> bool:
    """Finish one run that its stage found unfinished (no final checkpoint, or no ``keep``: the
    copy of its at-end evaluation; for the base, ``eval_samples.jsonl`` itself). Returns whether
    it trained."""
    from metareason.checkpoint import holds_checkpoints

    samples = run_dir / "eval_samples.jsonl"
    trained = False
    if final_checkpoint(run_dir, steps) is None:
        for stale in run_dir.glob("eval_samples-*.jsonl"):  # copies of an earlier attempt's evaluations
            stale.unlink()
        resume = run_dir.exists() and holds_checkpoints(run_dir)
        metareason(plan, argv + ["--resume" if resume else "--overwrite"])
        trained = True
    else:  # trained, its evaluation missing or not copied: the run's own eval set again (what
        # eval_samples.jsonl holds then is not known to be that evaluation)
        metareason(plan, ["eval", str(run_dir)] + plan.common())
    if keep is not None:
        copy_atomic(samples, keep)
    return trained


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def accuracy_of(path: Path) -> float:
    rows = read_jsonl(path)
    return sum(r["score"] for r in rows) / len(rows)


# ------------------------------------------------------------------------------ stages
@dataclass
class Stage:
    label: str
    estimate_s: float
    done: Callable[[], bool]
    do: Callable[[], None]
    check: bool = False  # a computation on finished stages (gate, lr choice): always done again
    show: Callable[[], list] = lambda: []  # the stage's documented commands, for the report


def progress_line(i: int, n: int, stage: Stage, state: str, rest_s: float, ratio: float) -> None:
    print(f"{TAG} stage {i}/{n} {stage.label}: {state}; about {rest_s * ratio / 60:.1f} min left "
          f"(the design's per-step times x {ratio:.2f}, this machine's measured ratio)", file=sys.stderr, flush=True)


def run_stages(plan: Plan, stages: list[Stage]) -> dict:
    """Run the stages in order, skipping finished ones; one progress line each. Every stage's
    documented commands go to ``plan.commands`` (marked when reused)."""
    spent = estimated = 0.0
    counts = {"reused": 0, "ran": 0}
    for i, stage in enumerate(stages, 1):
        rest = sum(s.estimate_s for s in stages[i - 1:] if not s.done())
        ratio = spent / estimated if estimated > 0 else 1.0
        if stage.check:
            stage.do()
            continue
        done = stage.done()
        shown = stage.show()
        plan.commands += [line + ("   # reused" if done and j == 0 else "") for j, line in enumerate(shown)]
        if done:
            counts["reused"] += 1
            progress_line(i, len(stages), stage, "finished earlier, reused", rest, ratio)
            continue
        progress_line(i, len(stages), stage, "running", rest, ratio)
        t0 = time.perf_counter()
        stage.do()
        spent += time.perf_counter() - t0
        estimated += stage.estimate_s
        counts["ran"] += 1
    return counts


def data_summary(arm: str, seed: int, sizes: Sizes) -> dict:
    """An arm's training examples (the task spec of its runs), checked: the share of teacher
    answers that are exact, their lengths, and the share of prompts under a block."""
    from metareason.plugins.behaviors.demo_task import _ANSWER, make_task

    params = {"format": "method", **dict([ARM_PARAMS[arm].split(": ")])}
    task = make_task(params, seed, sizes.train_samples)
    exact = sum(1 for ex in task.examples
                if (m := _ANSWER.search(ex["completion"])) and m.group(1) == ex["answer"])
    blocks = {"bare": 0, "block": 0}
    for ex in task.examples:
        blocks["block" if "behavior_" in ex["prompt"] else "bare"] += 1
    n = len(task.examples)
    return {"examples": n, "teacher_accuracy": exact / n,
            "completion_chars": sum(len(ex["completion"]) for ex in task.examples) / n,
            "prompt_chars": sum(len(ex["prompt"]) for ex in task.examples) / n,
            "prompts_with_block": blocks["block"] / n}


def base_accuracy(run_dir: Path) -> float:
    """The base's gate accuracy: its last logged ``eval/accuracy`` (metrics.jsonl)."""
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval/accuracy" in r]
    if not rows:
        raise SystemExit(f"{TAG} {run_dir / 'metrics.jsonl'}: no eval/accuracy (the base's evaluation is missing)")
    return float(rows[-1]["eval/accuracy"])


def build(plan: Plan, seeds: list[int], arms: list[str], bases_only: bool, state: dict) -> list[Stage]:
    sz, runs = plan.sizes, plan.runs
    stages: list[Stage] = []
    top = sz.budgets[-1]
    for s in seeds:
        run_dir = runs / plan.base_name(s)

        def do_base(s=s, run_dir=run_dir):
            if set(arms) != set(ARMS) and not bases_only:
                raise SystemExit(f"{TAG} the base of seed {s} is not finished ({run_dir}): run the driver with "
                                 f"--bases-only first, so that drivers on disjoint --arms never train the same base")
            train_run(plan, plan.base_argv(s), run_dir, sz.base_steps, None)

        def gate(s=s, run_dir=run_dir):
            acc = base_accuracy(run_dir)
            state["bases"][s] = {"accuracy": acc, "steps": sz.base_steps, "passed": acc >= sz.gate}
            if acc >= sz.gate:
                return
            # the design's one allowed change (docs/behaviors.md, 'Model and base'): its steps doubled
            # once, a fresh run of its own; the arms start from whatever that reaches
            plan.doubled.add(s)
            doubled = runs / plan.base_name(s)
            steps = plan.base_steps(s)
            finished = final_checkpoint(doubled, steps) is not None and (doubled / "eval_samples.jsonl").exists()
            plan.commands.append(plan.show(plan.base_argv(s)) + ("   # reused" if finished else ""))
            if not finished:
                if set(arms) != set(ARMS) and not bases_only:
                    raise SystemExit(f"{TAG} gate: the base of seed {s} reached {acc:.3f} < {sz.gate:.2f} and its "
                                     f"doubled base ({doubled}) is not finished: run the driver with --bases-only "
                                     f"first, so that drivers on disjoint --arms never train the same base")
                print(f"{TAG} gate: the base of seed {s} ({run_dir}) reached {acc:.3f} exact on its test questions, "
                      f"below the gate {sz.gate:.2f}: its steps are doubled once ({steps}), as the design allows",
                      file=sys.stderr, flush=True)
                train_run(plan, plan.base_argv(s), doubled, steps, None)
            acc2 = base_accuracy(doubled)
            state["bases"][s] = {"accuracy": acc2, "steps": steps, "passed": acc2 >= sz.gate, "doubled": True,
                                 "accuracy_at_design_steps": acc}

        stages.append(Stage(f"base seed {s} ({sz.base_steps} steps)",
                            sz.base_steps * STEP_S["base"] + 400 * EVAL_Q_S,
                            lambda d=run_dir: final_checkpoint(d, sz.base_steps) is not None
                            and (d / "eval_samples.jsonl").exists(), do_base,
                            show=lambda s=s: [plan.show(plan.base_argv(s))]))
        stages.append(Stage(f"gate of base seed {s} (>= {sz.gate:.2f})", 0.0, lambda: False, gate, check=True))
    if bases_only:
        return stages
    for a in arms:
        for s in seeds:
            path = runs / f"{sz.prefix}-data-{a}-s{s}.json"

            def do_data(a=a, s=s, path=path):
                path.write_text(json.dumps(data_summary(a, s, sz), indent=1) + "\n", encoding="utf-8")

            stages.append(Stage(f"training data {a} seed {s}", 5.0, path.exists, do_data))

    def cp(run_dir: Path, tag: str) -> str:
        return plan.show([str(run_dir / "eval_samples.jsonl"), str(run_dir / f"eval_samples-{tag}.jsonl")], prog="cp")

    def student_stage(a, s, b, lr=None):
        """One run of arm ``a``: at ``lr``, or (None) at the arm's chosen lr. Before the choice,
        the progress estimate counts it done if it is done at any lr of the grid."""
        def dirs():
            lrs = [lr] if lr else [state["grid"][a]["lr"]] if a in state["grid"] else list(sz.lr_grid)
            return [(x, runs / plan.run_name(a, s, x, b)) for x in lrs]

        def done():
            return any(final_checkpoint(d, b) is not None and (d / "eval_samples-val.jsonl").exists() for _, d in dirs())

        def do():
            (x, d), = dirs()
            train_run(plan, plan.student_argv(a, s, x, b), d, b, d / "eval_samples-val.jsonl")

        def show():
            (x, d), = dirs()
            return [plan.show(plan.student_argv(a, s, x, b)), cp(d, "val")]
        what = f"grid {a} lr {lr} ({b} steps, seed {s}, validation)" if lr else f"train {a} seed {s} budget {b}"
        return Stage(what, b * STEP_S[a] + sz.val_samples * EVAL_Q_S, done, do, show=show)

    for a in arms:
        for lr in sz.lr_grid:
            stages.append(student_stage(a, seeds[0], top, lr))

        def choose(a=a):
            val = {lr: accuracy_of(runs / plan.run_name(a, seeds[0], lr, top) / "eval_samples-val.jsonl")
                   for lr in sz.lr_grid}
            chosen = max(sz.lr_grid, key=lambda lr: (val[lr], -float(lr)))  # ties: the lower lr
            state["grid"][a] = {"validation": val, "lr": chosen}
            print(f"{TAG} {a}: validation accuracy {', '.join(f'{k} {v:.3f}' for k, v in val.items())}; "
                  f"lr {chosen} chosen", file=sys.stderr, flush=True)

        stages.append(Stage(f"choose {a}'s lr (validation accuracy, ties: the lower)", 0.0, lambda: False, choose,
                            check=True))

    def test_stage(a, s, b):
        def dirs():
            lrs = [state["grid"][a]["lr"]] if a in state["grid"] else list(sz.lr_grid)
            return [runs / plan.run_name(a, s, x, b) for x in lrs]

        def do():
            d, = dirs()
            metareason(plan, plan.test_argv(a, d))
            copy_atomic(d / "eval_samples.jsonl", d / "eval_samples-test.jsonl")

        def show():
            d, = dirs()
            return [plan.show(plan.test_argv(a, d)), cp(d, "test")]
        n = sum(x["num_samples"] for x in plan.test_specs(a))
        return Stage(f"test {a} seed {s} budget {b}", n * EVAL_Q_S,
                     lambda: any((d / "eval_samples-test.jsonl").exists() for d in dirs()), do, show=show)

    for a in arms:
        for s in seeds:
            for b in sz.budgets:
                if not (s == seeds[0] and b == top):  # seed 0's top budget: its grid run at the chosen lr
                    stages.append(student_stage(a, s, b))
    for a in arms:
        for s in seeds:
            for b in sz.budgets:
                stages.append(test_stage(a, s, b))
    return stages


# ------------------------------------------------------------------------------ statistics
_STEP = re.compile(r"\b(rev|sort|dsum|dbl) (\d+): [^>]*-> ?(\d+)\.")
_CITE = re.compile(r"behavior_[a-z0-9_]+")


def sample_measures(s: dict) -> dict:
    """Per answer: per-step correctness, citations, and (under a block) whether the citations
    are exactly the block's task behaviors in the chain's order / in the block's order, and
    whether it cites a behavior the block does not hold."""
    from metareason.plugins.behaviors.demo_task import ALL_TOPICS, apply, behavior_order

    topic, n = s["id"].split("/")[-2], int(s["id"].split("/")[-1])
    ref, x = [], n
    for op in ALL_TOPICS[topic]:
        x = apply(op, x)
        ref.append(x)
    got = [(m.group(1), int(m.group(3))) for m in _STEP.finditer(s["completion"])]
    ops = ALL_TOPICS[topic]
    steps = sum(1 for i, y in enumerate(ref) if i < len(got) and got[i] == (ops[i], y)) / len(ref)
    cites = _CITE.findall(s["completion"])
    block = _CITE.findall(s["prompt"].split("Q: ")[0])
    chain = behavior_order(topic)
    in_chain_order = [b for b in chain if b in block]
    in_block_order = [b for b in block if b in chain]
    return {"steps": steps, "cites": bool(cites), "citations": len(cites),
            "chain_order": cites == in_chain_order, "block_order": cites == in_block_order,
            "cites_absent": any(c not in block for c in cites),
            "cites_control": any(c in block and c not in chain for c in cites)}


def wilson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    z, p = 1.959964, k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (c - h, c + h)


def topics_of(kind: str) -> Callable[[str], bool]:
    from metareason.plugins.behaviors.demo_task import HELDOUT_TOPICS

    if kind == "all":
        return lambda qid: True
    held = kind == "heldout"
    return lambda qid: (qid.split("/")[-2] in HELDOUT_TOPICS) == held


def cell(samples: dict, condition: str, kind: str) -> list[dict]:
    keep = topics_of(kind)
    return [v for (c, qid), v in sorted(samples.items()) if c == condition and keep(qid)]


# the nine comparisons of the design (A1..A5), fixed before any run: (name, hypothesis, what,
# arm a, budget a, condition a, arm b, budget b, condition b, topics, the test that enters Holm)
COMPARISONS = [
    ("A1-heldout", "A1", "bcsft vs sft, {top} steps, held-out topics",
     "bcsft", -1, "none", "sft", -1, "none", "heldout", "mcnemar"),
    ("A1-train", "A1", "bcsft vs sft, {top} steps, training topics",
     "bcsft", -1, "none", "sft", -1, "none", "train", "mcnemar"),
    ("A2-150", "A2", "bcsft vs sft, {b0} steps, all topics", "bcsft", 0, "none", "sft", 0, "none", "all", "mcnemar"),
    ("A2-300", "A2", "bcsft vs sft, {b1} steps, all topics", "bcsft", 1, "none", "sft", 1, "none", "all", "mcnemar"),
    ("A2-equal-tokens", "A2", "bcsft at {top} vs sft at {b1} steps (about equal supervised tokens), all topics",
     "bcsft", -1, "none", "sft", 1, "none", "all", "mcnemar"),
    ("A3", "A3", "bci, ordered block vs no block, {top} steps, held-out topics",
     "bci", -1, "ordered", "bci", -1, "none", "heldout", "mcnemar"),
    ("A4-accuracy", "A4", "bci, ordered vs control block, {top} steps, held-out topics",
     "bci", -1, "ordered", "bci", -1, "control", "heldout", "mcnemar"),
    ("A4-tokens", "A4", "bci, control vs ordered block, generated tokens, {top} steps, held-out topics",
     "bci", -1, "control", "bci", -1, "ordered", "heldout", "wilcoxon"),
    ("A5", "A5", "bci, ordered vs shuffled block, {top} steps, held-out topics",
     "bci", -1, "ordered", "bci", -1, "shuffled", "heldout", "mcnemar"),
    # not one of the nine: the context A4's rule needs ("keeps the no-block accuracy"), outside Holm
    ("A4-control-vs-none", "A4", "bci, control block vs no block, {top} steps, held-out topics (context, not in Holm)",
     "bci", -1, "control", "bci", -1, "none", "heldout", "context"),
]


def analyse(plan: Plan, seeds: list[int], arms: list[str], state: dict) -> dict:
    from metareason.plugins.behaviors import method_stats as ms

    sz, runs = plan.sizes, plan.runs
    samples = {(a, b, s): ms.read_samples(runs / plan.run_name(a, s, state["grid"][a]["lr"], b) / "eval_samples-test.jsonl")
               for a in arms for b in sz.budgets for s in seeds}
    table = []
    for a in arms:
        conds = sorted({c for (c, _) in samples[(a, sz.budgets[0], seeds[0])]})
        for b in sz.budgets:
            for c in conds:
                for kind in ("train", "heldout"):
                    per_seed = {s: cell(samples[(a, b, s)], c, kind) for s in seeds}
                    if not all(per_seed.values()):
                        continue
                    accs = {s: sum(x["score"] >= 1.0 for x in v) / len(v) for s, v in per_seed.items()}
                    flat = [x for v in per_seed.values() for x in v]
                    meas = [sample_measures(x) for x in flat]
                    row = {"arm": a, "budget": b, "condition": c, "topics": kind, "questions": len(per_seed[seeds[0]]),
                           "accuracy": accs, "wilson": {s: wilson(round(accs[s] * len(per_seed[s])), len(per_seed[s]))
                                                        for s in seeds},
                           "seed_interval": ms.seed_interval(list(accs.values())) if len(seeds) >= 2 else None,
                           "gen_tokens": sum(x["gen_tokens"] for x in flat) / len(flat)}
                    for k in ("steps", "cites", "citations", "chain_order", "block_order", "cites_absent", "cites_control"):
                        row[k] = sum(float(m[k]) for m in meas) / len(meas)
                    table.append(row)
    comparisons = {}
    for name, hyp, what, a1, b1, c1, a2, b2, c2, kind, test in COMPARISONS:
        if a1 not in arms or a2 not in arms:
            continue
        keep = topics_of(kind)
        pooled, diffs, per_seed_p = [], [], {}
        for s in seeds:
            x = {k: v for k, v in samples[(a1, sz.budgets[b1], s)].items() if keep(k[1])}
            y = {k: v for k, v in samples[(a2, sz.budgets[b2], s)].items() if keep(k[1])}
            pairs = ms.pair(x, y, c1, c2) if a1 == a2 else ms.pair(x, y)
            pooled += pairs
            per_seed_p[s] = ms.mcnemar(pairs)["p_value"]
            diffs.append(sum((p["score"] >= 1.0) - (q["score"] >= 1.0) for p, q in pairs) / len(pairs))
        mc, wx = ms.mcnemar(pooled), ms.wilcoxon_tokens(pooled)
        comparisons[name] = {
            "hypothesis": hyp, "what": what.format(top=sz.budgets[-1], b0=sz.budgets[0], b1=sz.budgets[1]),
            "pairs": len(pooled), "mcnemar": mc, "mcnemar_per_seed": per_seed_p,
            "wilcoxon": wx, "accuracy_difference": ms.seed_interval(diffs) if len(seeds) >= 2 else {"mean": diffs[0]},
            "token_change": wx["mean_a"] / wx["mean_b"] - 1.0 if wx["mean_b"] else float("nan"),
            "test": test, "p": wx["p_value"] if test == "wilcoxon" else mc["p_value"]}
    family = {k: v["p"] for k, v in comparisons.items() if v["test"] != "context"}
    holm = ms.holm(family) if family else {}
    for k, v in comparisons.items():
        v["p_holm"] = holm.get(k)
    return {"table": table, "comparisons": comparisons, "verdicts": verdicts(comparisons, table, sz)}


def verdicts(cmp: dict, table: list[dict], sz: Sizes) -> dict:
    """The design's fixed rules, applied mechanically (raw p as the rules state; Holm beside)."""
    out = {}

    def favours_b(c):  # b right more often, significantly
        return c["mcnemar"]["only_b"] > c["mcnemar"]["only_a"] and c["mcnemar"]["p_value"] < 0.05

    def favours_a(c):
        return c["mcnemar"]["only_a"] > c["mcnemar"]["only_b"] and c["mcnemar"]["p_value"] < 0.05

    def not_lower(c):
        return c["accuracy_difference"].get("high", c["accuracy_difference"]["mean"]) >= 0 and not favours_b(c)

    for key in ("A1-heldout", "A1-train"):
        if key in cmp:
            c = cmp[key]
            out[key] = ("refuted (sft significantly more accurate)" if favours_b(c) else
                        "supported" + (" (and the stronger claim: bcsft significantly more accurate)" if favours_a(c)
                                       and key == "A1-heldout" else "")
                        if not_lower(c) and c["token_change"] <= -0.30 else "neither")
    if "A3" in cmp:
        c = cmp["A3"]
        out["A3"] = ("refuted (significantly lower accuracy under the block)" if favours_b(c) else
                     "supported" if not_lower(c) and c["token_change"] <= -0.30 else "neither")
    if "A4-tokens" in cmp and "A4-control-vs-none" in cmp:
        ctrl = [r for r in table if r["arm"] == "bci" and r["budget"] == sz.budgets[-1] and r["topics"] == "heldout"
                and r["condition"] == "control"]
        w = cmp["A4-tokens"]["wilcoxon"]  # a: control, b: ordered
        back = w["p_value"] < 0.05 and w["mean_a"] > w["mean_b"]  # restates the methods again
        absent = bool(ctrl) and ctrl[0]["cites_absent"] > 0  # cites behaviors the block does not hold
        cites_control = bool(ctrl) and ctrl[0]["cites_control"] > 0
        keeps = not favours_b(cmp["A4-control-vs-none"])  # not significantly below the no-block accuracy
        out["A4"] = ("refuted (the control block shortens answers as the real one does)" if not back else
                     "refuted (under the control block it cites behaviors the block does not hold)" if absent else
                     "supported" if keeps and not cites_control else
                     "neither (tokens back up, but it cites the control behaviors or loses the no-block accuracy)")
    if "A5" in cmp:
        c = cmp["A5"]
        sh = [r for r in table if r["arm"] == "bci" and r["budget"] == sz.budgets[-1] and r["topics"] == "heldout"
              and r["condition"] == "shuffled"]
        follows = bool(sh) and sh[0]["block_order"] > sh[0]["chain_order"]
        out["A5"] = "supported" if favours_a(c) or follows else "null (order made no detectable difference)"
    if all(k in cmp for k in ("A2-150", "A2-300", "A1-heldout", "A1-train")):
        early = favours_a(cmp["A2-150"])
        late = favours_a(cmp["A1-heldout"]) or favours_a(cmp["A1-train"])
        out["A2"] = ("bcsft ahead only early: the difference is the speed of fitting a shorter target" if early and not late
                     else "bcsft ahead at the largest budget too" if late else "no early lead of bcsft")
    return out


# ------------------------------------------------------------------------------ the report
def fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def write_report(out: Path, plan: Plan, seeds: list[int], arms: list[str], state: dict, stats: dict, quick: bool) -> None:
    sz = plan.sizes
    out.parent.mkdir(parents=True, exist_ok=True)
    title = "# Behaviors, part A: BC-SFT and BCI on a model that can do the procedures"
    lines = [title + (" (quick smoke, not a measurement)" if quick else ""), "",
             "Design, written before any run: docs/behaviors.md, \"Experiment design (issue 28)\". Driver: "
             "`python bench/behaviors_method.py" + (" --quick" if quick else "") + "` (its docstring: stages, "
             f"resumption). Seeds {', '.join(map(str, seeds))}; arms {', '.join(arms)}"
             + ("" if set(arms) == set(ARMS) else " (a partial report: the comparisons of the other arms are absent)")
             + f"; budgets {' / '.join(map(str, sz.budgets))} steps.", ""]
    lines += [f"## Bases (gate: test accuracy >= {sz.gate:.2f})", "", "| seed | steps | accuracy | passed |",
              "|---|---|---|---|"]
    for s, b in sorted(state["bases"].items()):
        passed = "yes" if b["passed"] else ("no (the arms start from it, as the design says)" if b.get("doubled") else "no")
        lines.append(f"| {s} | {b['steps']}" + (f" (doubled: {b['accuracy_at_design_steps']:.3f} at {sz.base_steps})"
                                                  if b.get("doubled") else "") + f" | {b['accuracy']:.3f} | {passed} |")
    lines += ["", "## Training data (the teachers are programmatic; accuracy checked here)", "",
              "| arm | seed | examples | teacher accuracy | completion chars | prompt chars | prompts with a block |",
              "|---|---|---|---|---|---|---|"]
    for (a, s), d in sorted(state["data"].items()):
        lines.append(f"| {a} | {s} | {d['examples']} | {d['teacher_accuracy']:.3f} | {d['completion_chars']:.1f} | "
                     f"{d['prompt_chars']:.1f} | {d['prompts_with_block']:.2f} |")
    lines += ["", f"## Learning rate (validation accuracy, seed {seeds[0]}, {sz.budgets[-1]} steps; ties: the lower)", "",
              "| arm | " + " | ".join(f"lr {lr}" for lr in sz.lr_grid) + " | chosen |",
              "|---|" + "---|" * len(sz.lr_grid) + "---|"]
    for a in arms:
        g = state["grid"][a]
        lines.append(f"| {a} | " + " | ".join(f"{g['validation'][lr]:.3f}" for lr in sz.lr_grid) + f" | {g['lr']} |")
    lines += ["", "## Test results", "",
              "Accuracy: mean over seeds [95% t interval from the seeds, n - 1 degrees of freedom; wide with 3 "
              "seeds]; per seed with its Wilson interval. Tokens are characters. Steps: the share of the chain's "
              "steps whose result is right. Chain / block order: answers citing exactly the block's task "
              "behaviors in the chain's / the block's order. Absent: answers citing a behavior not in the block.", "",
              "| arm | steps | condition | topics | questions | accuracy | per seed [Wilson] | gen tokens | steps right | "
              "citing | citations | chain order | block order | absent |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in stats["table"]:
        si = r["seed_interval"]
        acc = f"{si['mean']:.3f} [{si['low']:.3f}, {si['high']:.3f}]" if si else f"{list(r['accuracy'].values())[0]:.3f}"
        per = ", ".join(f"{r['accuracy'][s]:.3f} [{r['wilson'][s][0]:.2f}, {r['wilson'][s][1]:.2f}]" for s in seeds)
        lines.append(f"| {r['arm']} | {r['budget']} | {r['condition']} | {r['topics']} | {r['questions']} | {acc} | {per} | "
                     f"{r['gen_tokens']:.1f} | {r['steps']:.3f} | {r['cites']:.2f} | {r['citations']:.2f} | "
                     + ("— | — | " if r["condition"] == "none" else
                        f"{r['chain_order']:.2f} | {r['block_order']:.2f} | ")
                     + f"{r['cites_absent']:.2f} |")
    lines += ["", "## The nine comparisons (paired on the same questions, seeds pooled; Holm over the nine)", "",
              "a vs b. McNemar: right only under a / only under b (pooled), p; per-seed p. Accuracy difference a - b: "
              "mean over seeds [t interval]. Tokens: mean a / mean b, change, Wilcoxon p. Holm applies to the "
              "test named in the last column; the last row is context for A4's rule, outside the family.", "",
              "| comparison | what | pairs | only a / only b | McNemar p | per seed p | accuracy a - b | tokens a / b "
              "(change) | Wilcoxon p | test | Holm p |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in stats["comparisons"].items():
        d = c["accuracy_difference"]
        diff = f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if "low" in d else f"{d['mean']:+.3f}"
        w = c["wilcoxon"]
        lines.append(f"| {name} | {c['what']} | {c['pairs']} | {c['mcnemar']['only_a']} / {c['mcnemar']['only_b']} | "
                     f"{fmt_p(c['mcnemar']['p_value'])} | {', '.join(fmt_p(p) for p in c['mcnemar_per_seed'].values())} | "
                     f"{diff} | {w['mean_a']:.1f} / {w['mean_b']:.1f} ({c['token_change']:+.0%}) | {fmt_p(w['p_value'])} | "
                     f"{c['test']} | {'—' if c['p_holm'] is None else fmt_p(c['p_holm'])} |")
    lines += ["", "## Verdicts by the rules fixed in the design (applied mechanically; raw p as the rules state)", ""]
    lines += [f"* **{k}**: {v}" for k, v in stats["verdicts"].items()] or ["* (no comparison available)"]
    lines += ["", "## Commands (in order; `# reused`: a finished run found and kept)", "",
              "As documented; the driver adds `--overwrite` to a run it starts afresh and `--resume` to one it "
              "continues, and evaluates a trained run with a missing evaluation again (`metareason eval RUN_DIR`); "
              "what this invocation executed is the JSON's `executed`.", "", "```bash",
              "export OMP_NUM_THREADS=1"] + plan.commands + ["```", ""]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    record = {"quick": quick, "seeds": seeds, "arms": arms, "budgets": list(sz.budgets), "lr_grid": list(sz.lr_grid),
              "bases": state["bases"], "data": {f"{a}/s{s}": d for (a, s), d in state["data"].items()},
              "grid": state["grid"], "table": stats["table"], "comparisons": stats["comparisons"],
              "verdicts": stats["verdicts"], "commands": plan.commands, "executed": plan.executed}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"{TAG} wrote {out.with_suffix('.md')}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs", help="the runs directory (default: runs)")
    p.add_argument("--out", default=None, help=f"report path without suffix (default: {DEFAULT_OUT.relative_to(REPO)}, "
                   "with the arms appended when not all three)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0,1)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms of sft, bcsft, bci")
    p.add_argument("--bases-only", action="store_true", help="train and gate the bases, then stop")
    p.add_argument("--gate", type=float, default=None,
                   help="the base gate (default: the design's 0.90; --quick: 0, a 6-step base learns nothing); "
                        "the report prints the gate used")
    p.add_argument("--quick", action="store_true", help="every stage in miniature: checks the pipeline, measures nothing")
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        p.error(f"--arms: unknown arm {bad[0]!r} (known: {', '.join(ARMS)})" if bad else "--arms: none given")
    try:
        seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2")).split(",")]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    sizes = QUICK if args.quick else FULL
    if args.gate is not None:
        sizes = replace(sizes, gate=args.gate)
    if args.out:
        out = Path(args.out)
    elif set(arms) == set(ARMS):
        out = DEFAULT_OUT
    else:
        out = DEFAULT_OUT.with_name(DEFAULT_OUT.name + "-" + "-".join(arms))
    plan = Plan(sizes, Path(args.runs).resolve())
    state: dict = {"bases": {}, "data": {}, "grid": {}}
    stages = build(plan, seeds, arms, args.bases_only, state)
    counts = run_stages(plan, stages)
    if args.bases_only:
        print(f"{TAG} bases done: {state['bases']}", file=sys.stderr)
        return 0
    for a in arms:
        for s in seeds:
            state["data"][(a, s)] = json.loads((plan.runs / f"{sizes.prefix}-data-{a}-s{s}.json").read_text())
    stats = analyse(plan, seeds, arms, state)
    write_report(out, plan, seeds, arms, state, stats, args.quick)
    print(f"{TAG} stages: {counts['ran']} ran, {counts['reused']} reused; {len(plan.executed)} commands executed",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

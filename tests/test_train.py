"""SFT loop: exact resume, crash during a checkpoint write, NaN stop, label masks, extra loss
terms, evaluation metrics and the report."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from metareason import Kernel, hookimpl
from metareason.checkpoint import latest_checkpoint, list_checkpoints
from metareason.data.tokenize import IGNORE_INDEX, collate, encode_examples
from metareason.models import build_char_tokenizer
from metareason.plugin_manager import PluginError
from metareason.train.loop import TrainingDiverged
from metareason.train.sft import token_loss
from tests.conftest import REPO, TINY_LLAMA, run_cli


def tiny(tmp_path, name="t", **train):
    cfg = {
        "name": name, "output_dir": str(tmp_path), "plugins": [], "quiet": True,
        "model": {"arch": dict(TINY_LLAMA), "tokenizer": {"type": "char"}},
        "data": {"max_length": 96,
                 "train": [{"task": "causal_loop", "num_samples": 40, "params": {"levels": [1, 2]}}],
                 "eval": [{"task": "causal_loop", "num_samples": 6, "seed": 9, "params": {"levels": [1, 2]}}]},
        "train": dict({"max_steps": 6, "batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2,
                       "save_every": 3, "log_every": 1, "keep_last": 5}, **train),
        "generation": {"max_new_tokens": 6, "batch_size": 8},
    }
    return cfg


def weights(ckpt):
    return load_file(str(ckpt / "model.safetensors"))


def test_resume_equals_uninterrupted(tmp_path):
    full = Kernel(tiny(tmp_path, "full"))
    full.run()

    class StopAfter4:
        @hookimpl
        def metareason_on_step_end(self, step):
            if step == 4:
                raise RuntimeError("simulated interruption")

    part = Kernel(tiny(tmp_path, "part"))
    part.register(StopAfter4(), name="stopper")
    with pytest.raises(PluginError, match="simulated interruption"):
        part.run()
    assert latest_checkpoint(part.config.run_dir).name == "step-0000003"
    Kernel(tiny(tmp_path, "part")).run(resume=True)

    a = weights(latest_checkpoint(full.config.run_dir))
    b = weights(latest_checkpoint(part.config.run_dir))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise on CPU fp32
    rows = lambda d: [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                      if "train/loss" in r]
    ra, rb = rows(full.config.run_dir), rows(part.config.run_dir)
    assert [r["train/loss"] for r in ra] == [r["train/loss"] for r in rb]
    assert [r["step"] for r in rb] == list(range(1, 7))


CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import metareason.checkpoint as ck
    from metareason import Kernel
    real, calls = ck.write_weights, []
    def crashing(model, tokenizer, path):
        calls.append(path)
        if len(calls) == 2:                       # second checkpoint: die half way through
            real(model, None, path)
            (path / "optimizer.pt").write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        real(model, tokenizer, path)
    ck.write_weights = crashing
    Kernel(sys.argv[1]).run()
""")


def test_crash_during_checkpoint_write_keeps_previous(tmp_path):
    cfg = tiny(tmp_path, "crash", save_every=2)
    path = tmp_path / "crash.yaml"
    path.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(path)], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == -9, res.stderr
    run_dir = tmp_path / "crash"
    done = list_checkpoints(run_dir)
    assert [p.name for p in done] == ["step-0000002"]
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the crash should have left a partial temp dir behind"
    # the previous checkpoint is complete and loadable
    state = torch.load(done[0] / "optimizer.pt", weights_only=True)
    assert state["state"]
    assert json.loads((done[0] / "trainer_state.json").read_text())["step"] == 2
    # resume cleans the partial dir and finishes
    Kernel(path).run(resume=True)
    names = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert not any(n.startswith(".tmp-") for n in names)
    assert latest_checkpoint(run_dir).name == "step-0000006"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    class NaNAt3:
        @hookimpl
        def metareason_extra_losses(self, step):
            return {"poison": torch.tensor(float("nan") if step == 2 else 0.0)}

    kernel = Kernel(tiny(tmp_path, "nan", save_every=2))
    kernel.register(NaNAt3(), name="nan")
    with pytest.raises(TrainingDiverged, match=r"step 3: training loss is nan.*step-0000002"):
        kernel.run()
    assert [p.name for p in list_checkpoints(kernel.config.run_dir)] == ["step-0000002"]


def test_prompt_tokens_have_zero_gradient():
    tok = build_char_tokenizer()
    enc = encode_examples(tok, ["A=1;B=A+2;B=?"], ["B=1+2=3;answer:3"], 64)
    batch = collate(enc.input_ids, enc.prompt_lengths, tok.pad_token_id)
    plen = enc.prompt_lengths[0]
    assert (batch["labels"][0, :plen] == IGNORE_INDEX).all()
    assert (batch["labels"][0, plen:len(enc.input_ids[0])] != IGNORE_INDEX).all()
    logits = torch.randn(1, batch["input_ids"].shape[1], len(tok), requires_grad=True)
    loss, n = token_loss(logits, batch["labels"])
    loss.backward()
    # logits at position t predict token t+1: positions before plen-1 are out of the loss
    assert torch.count_nonzero(logits.grad[0, : plen - 1]) == 0
    assert torch.count_nonzero(logits.grad[0, plen - 1: len(enc.input_ids[0]) - 1].abs().sum(-1)) == n


def test_label_hook_and_extra_loss_terms(tmp_path):
    seen = {}

    class Plugin:
        @hookimpl
        def metareason_sft_labels(self, batch, labels):
            out = labels.clone()
            out[:, :] = IGNORE_INDEX  # drop every token but the last label of each row
            for i in range(out.shape[0]):
                last = (labels[i] != IGNORE_INDEX).nonzero()[-1]
                out[i, last] = labels[i, last]
            seen["n"] = int((out != IGNORE_INDEX).sum())
            return out

        @hookimpl
        def metareason_extra_losses(self, model):
            l2 = sum((p.float() ** 2).sum() for p in model.parameters())
            return {"l2": (1e-4, l2)}

    kernel = Kernel(tiny(tmp_path, "hooks", max_steps=2, save_every=0, grad_accum=1))
    kernel.register(Plugin(), name="p")
    kernel.config.eval.at_end = False
    kernel.run()
    assert seen["n"] == 4  # one label per row of a batch of 4
    rows = [json.loads(l) for l in (kernel.config.run_dir / "metrics.jsonl").read_text().splitlines()]
    r = rows[-1]
    assert r["train/loss"] == pytest.approx(r["train/lm_loss"] + 1e-4 * r["train/l2"], rel=1e-5)
    # the hook's labels are the ones the loss uses: the same first step without it has another loss
    plain = Kernel(tiny(tmp_path, "plain", max_steps=1, save_every=0, grad_accum=1))
    plain.config.eval.at_end = False
    plain.run()
    first_plain = json.loads((plain.config.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert rows[0]["step"] == first_plain["step"] == 1
    assert abs(rows[0]["train/lm_loss"] - first_plain["train/lm_loss"]) > 1e-3


def test_eval_metrics_report_and_cli(tmp_path):
    cfg = tiny(tmp_path, "cli", max_steps=3, save_every=0)
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_cli("run", str(path))
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "cli"
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    for key in ("eval/accuracy", "eval/accuracy/level_1", "eval/accuracy/level_2",
                "eval/gen_tokens/level_1", "eval/gen_tokens/level_2"):
        assert key in last, key
    assert last["step"] == 3
    report = (run_dir / "report.md").read_text()
    assert "| level_1 |" in report and "plots/loss.png" in report
    assert (run_dir / "plots" / "loss.png").stat().st_size > 0
    assert (run_dir / "plots" / "accuracy.png").stat().st_size > 0
    res = run_cli("eval", str(run_dir))
    assert res.returncode == 0, res.stderr
    assert "eval/accuracy/level_1" in res.stdout
    res = run_cli("run", str(path), "--resume", "train.max_steps=3")
    assert res.returncode == 0, res.stderr
    res = run_cli("eval", str(tmp_path / "missing"))
    assert res.returncode == 2 and "no such run directory" in res.stderr


@pytest.mark.parametrize("grouped", [False, True])
def test_stream_epochs_cover_each_example_once_and_resume_by_position(grouped):
    from metareason.data.tokenize import SFTStream

    tok = build_char_tokenizer()
    lengths = [5 + (i * 7) % 60 for i in range(200)]
    examples = [{"prompt": "p", "completion": "x" * n} for n in lengths]
    enc = encode_examples(tok, [e["prompt"] for e in examples], [e["completion"] for e in examples], 128)
    a = SFTStream(examples, enc, 8, seed=3, pad_id=tok.pad_token_id, group_by_length=grouped)
    seen, pad = [], 0
    for _ in range(a.batches_per_epoch):
        batch = a.next_batch()
        seen += [id(e) for e in batch["examples"]]
        pad += int((batch["attention_mask"] == 0).sum())
    assert len(seen) == len(set(seen)) == 200  # an epoch is a permutation
    b = SFTStream(examples, enc, 8, seed=3, pad_id=tok.pad_token_id, group_by_length=grouped)
    b.position = a.position
    assert torch.equal(a.next_batch()["input_ids"], b.next_batch()["input_ids"])
    if grouped:  # sorted chunks: far less padding than random batches
        ungrouped = SFTStream(examples, enc, 8, seed=3, pad_id=tok.pad_token_id, group_by_length=False)
        pad_random = sum(int((ungrouped.next_batch()["attention_mask"] == 0).sum()) for _ in range(25))
        assert pad * 3 < pad_random


def test_adamw8bit_is_selectable(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from metareason.train.optim import build_optimizer

    kernel = Kernel(tiny(tmp_path, "adam8", optimizer="adamw8bit", max_steps=2, save_every=0))
    model, _ = kernel.load()
    opt = build_optimizer(model, kernel.config.train)
    assert isinstance(opt, bnb.optim.AdamW8bit)
    kernel.config.eval.at_end = False
    kernel.run()
    rows = [json.loads(l) for l in (kernel.config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["train/loss"] > 0


def test_eval_samples_option_writes_per_question_results(tmp_path):
    from metareason.cli import main as cli_main

    cfg = tiny(tmp_path, "samples", max_steps=1, save_every=0)
    path = tmp_path / "samples.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out" / "config-samples.jsonl"
    assert cli_main(["eval", str(path), "quiet=true", "--samples", str(out)]) == 0  # a config: only with --samples
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    n = sum(spec["num_samples"] for spec in cfg["data"]["eval"])
    assert len(rows) == n and all({"id", "group", "completion", "score", "gen_tokens"} <= set(r) for r in rows)
    assert not (tmp_path / "samples").exists()  # evaluating a config writes no run directory

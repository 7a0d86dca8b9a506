"""SFT padding-free packing: the packed batch gives the padded batch's loss and gradients,
attention stays inside each example, ``train.packing: auto`` picks packing only for models
that support it, and an SFT run has the same loss curve packed or not."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from metareason import Kernel, hookimpl
from metareason.config import ConfigError
from metareason.data.packing import pack_batch, plan, unpack
from metareason.data.tokenize import IGNORE_INDEX, collate
from metareason.train import sft
from metareason.train.sft import forward_batch, packing_mode, token_loss
from tests.conftest import TINY_LLAMA
from tests.test_train import tiny

LENGTHS = (5, 30, 9, 14, 22, 3, 30, 11)  # first-fit into rows of 30: [30] [30] [22 5 3] [14 11] [9]


def llama(seed=0):
    torch.manual_seed(seed)
    arch = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    return LlamaForCausalLM(LlamaConfig(vocab_size=60, **arch)).float()


def batch_of(lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 60, (n,), generator=g).tolist() for n in lengths]
    # odd examples have no prompt: their first token is a label, which only the packing's
    # boundary mask keeps out of the loss (the padded batch never predicts column 0)
    return collate(rows, [0 if i % 2 else max(1, n // 3) for i, n in enumerate(lengths)], pad_id=0)


def loss_and_grads(model, batch, packing):
    model.zero_grad(set_to_none=True)
    outputs, loss, n, packed = forward_batch(model, batch, batch["labels"], torch.device("cpu"), 0, packing)
    loss.backward()
    return loss.detach(), n, packed, outputs, {k: p.grad.clone() for k, p in model.named_parameters()}


def test_packed_batch_has_the_padded_batch_loss_and_gradients():
    model, batch = llama(), batch_of()
    rows = plan(batch["attention_mask"])
    assert rows is not None and max(len(r) for r in rows) == 3  # several examples share a row
    l_pad, n_pad, was_packed, _, g_pad = loss_and_grads(model, batch, packing=False)
    assert not was_packed
    l_pack, n_pack, was_packed, _, g_pack = loss_and_grads(model, batch, packing=True)
    assert was_packed
    assert n_pack == n_pad
    assert l_pack.item() == pytest.approx(l_pad.item(), rel=1e-6)
    for name in g_pad:
        torch.testing.assert_close(g_pack[name], g_pad[name], rtol=1e-5, atol=1e-7, msg=name)


def test_packed_layout_restarts_positions_and_masks_each_first_label():
    batch = batch_of()
    p = pack_batch(batch["input_ids"], batch["attention_mask"], batch["labels"], 30, 0)
    assert p.input_ids.shape == (5, 30) and p.tokens == sum(LENGTHS)
    row = p.position_ids[2].tolist()  # [22 5 3]
    assert row == list(range(22)) + list(range(5)) + list(range(3))
    assert p.labels[2, 0] == p.labels[2, 22] == p.labels[2, 27] == IGNORE_INDEX
    # every other label is the padded batch's, and unpack() puts tokens back where they were
    back = unpack(p.input_ids.unsqueeze(-1), p).squeeze(-1)
    assert torch.equal(back * batch["attention_mask"], batch["input_ids"] * batch["attention_mask"])
    lab = unpack(p.labels.unsqueeze(-1), p).squeeze(-1)
    expected = batch["labels"].clone()
    expected[:, 0] = IGNORE_INDEX
    assert torch.equal(lab[batch["attention_mask"].bool()], expected[batch["attention_mask"].bool()])


def test_attention_does_not_cross_the_example_boundary():
    model = llama().eval()
    a = batch_of((12, 9), seed=2)
    b = a["input_ids"].clone()
    b[0, :12] = torch.randint(3, 60, (12,), generator=torch.Generator().manual_seed(7))
    b = dict(a, input_ids=b)
    outs = []
    with torch.no_grad():
        for batch in (a, b):
            p = pack_batch(batch["input_ids"], batch["attention_mask"], batch["labels"], 21, 0)
            assert p.input_ids.shape == (1, 21)  # one row: example 1 then example 2
            logits = model(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=False).logits
            outs.append(logits[0])
    assert not torch.allclose(outs[0][:12], outs[1][:12])  # example 1 did change
    torch.testing.assert_close(outs[0][12:], outs[1][12:], rtol=0, atol=1e-6)  # example 2 did not
    alone = model(input_ids=a["input_ids"][1:2, :9], use_cache=False).logits[0]
    torch.testing.assert_close(outs[0][12:], alone.detach(), rtol=0, atol=1e-5)


def test_hooks_read_logits_in_the_padded_layout():
    model, batch = llama(), batch_of()
    _, _, _, padded_out, _ = loss_and_grads(model, batch, packing=False)
    _, _, _, packed_out, _ = loss_and_grads(model, batch, packing=True)
    mask = batch["attention_mask"].bool()
    assert packed_out.logits.shape == padded_out.logits.shape
    torch.testing.assert_close(packed_out.logits[mask], padded_out.logits[mask], rtol=1e-5, atol=1e-6)


def test_plan_keeps_the_padded_layout_when_packing_saves_little():
    assert plan(batch_of((30, 29, 30, 28))["attention_mask"]) is None
    assert plan(batch_of()["attention_mask"]) is not None


def test_auto_packs_llama_and_not_deepseek_mla():
    from metareason.plugins.lru import DeepSeekMLAConfig, DeepSeekMLAForCausalLM

    on, line = packing_mode("auto", llama())
    assert on and "sdpa" in line
    assert packing_mode(False, llama())[0] is False
    mla = DeepSeekMLAForCausalLM(DeepSeekMLAConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=4, kv_latent_dim=16, q_latent_dim=24,
                                                   rope_head_dim=8))
    assert packing_mode("auto", mla)[0] is False
    with pytest.raises(ConfigError, match="train.packing"):
        packing_mode(True, mla)
    flex = llama()
    flex.config._attn_implementation = "flex_attention"
    assert packing_mode("auto", flex)[0] is False


@pytest.fixture
def always_pack(monkeypatch):
    """Counts the loop's packed micro-batches, and packs every one: these tiny runs' batches
    (4-8 examples of 60-96 tokens) seldom save MIN_SAVING of their slots."""
    calls = [0]
    real = sft.pack_batch

    def counting(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(sft, "pack_batch", counting)
    monkeypatch.setattr(sft, "plan", lambda mask: plan(mask, min_saving=0.0))
    return calls


def _run(tmp_path, name, packing, plugin=None, **train):
    cfg = tiny(tmp_path, name, save_every=0, packing=packing, group_by_length=False, **train)
    cfg["eval"] = {"at_end": False}
    kernel = Kernel(cfg)
    if plugin is not None:
        kernel.register(plugin, name="p")
    kernel.run()
    return [json.loads(l) for l in (kernel.config.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_run_has_the_same_loss_curve_packed_or_padded(tmp_path, always_pack, capsys):
    padded = [r["train/loss"] for r in _run(tmp_path, "padded", False, max_steps=4, batch_size=8)]
    assert always_pack[0] == 0 and "train.packing=false: off" in capsys.readouterr().err
    packed = [r["train/loss"] for r in _run(tmp_path, "packed", True, max_steps=4, batch_size=8)]
    assert always_pack[0] == 8 and "train.packing=true: on" in capsys.readouterr().err  # 4 steps x grad_accum 2
    assert len(padded) == len(packed) == 4
    assert packed == pytest.approx(padded, rel=1e-5)


def test_extra_loss_hook_gets_padded_logits_with_gradient(tmp_path, always_pack):
    """A hook reading ``outputs.logits`` (as mcft's format term does) sees the padded layout
    and its term trains the model: with the term equal to the token loss, the loss doubles."""
    class Twice:
        @hookimpl
        def metareason_extra_losses(self, batch, outputs):
            assert outputs.logits.shape[:2] == batch["input_ids"].shape and outputs.logits.requires_grad
            return {"again": token_loss(outputs.logits, batch["labels"])[0]}

    r = _run(tmp_path, "twice", True, Twice(), max_steps=1, grad_accum=1)[0]
    assert always_pack[0] == 1
    assert r["train/again"] == pytest.approx(r["train/lm_loss"], rel=1e-5)
    assert r["train/loss"] == pytest.approx(2 * r["train/lm_loss"], rel=1e-5)


def test_mcft_labels_and_format_term_are_the_same_packed_or_padded(tmp_path, always_pack):
    """mcft masks labels per row before packing and reads the logits per row for its format
    term (through the unpacked logits): the run's numbers are the padded run's."""
    from tests.test_mcft import tiny_config, write_rows

    data = tmp_path / "crit.jsonl"
    write_rows(data, n=16)
    curves = {}
    for packing in (False, True):
        cfg = tiny_config(tmp_path, data, name=f"mcft-{packing}", threshold=0.5)
        cfg["train"].update(packing=packing, group_by_length=False, max_steps=2)
        kernel = Kernel(cfg)
        kernel.run()
        curves[packing] = [json.loads(l) for l in (kernel.config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert always_pack[0] == 2
    for key in ("train/loss", "train/lm_loss", "train/mcft_format"):
        assert [r[key] for r in curves[True]] == pytest.approx([r[key] for r in curves[False]], rel=1e-5), key

"""CSPO control segments: the token mask (rules, vectorised vs a plain loop, text parse), the
control tokens in the vocabulary, and the gradient of the GRPO loss restricted to control
segments (exactly zero at every other position; the mask really changes the gradient)."""
import random

import pytest
import torch

from metareason import Kernel
from metareason.models import build_char_tokenizer
from metareason.models.special_tokens import add_special_tokens
from metareason.plugins.cspo import CONTROL_CLOSE, CONTROL_OPEN, control_mask, control_mask_from_ids, parse_segments
from metareason.plugins.cspo.segments import strip_segments

O, C, PAD = 8, 9, 0


def reference_mask(row, open_id=O, close_id=C, pad_id=PAD):
    """The rules of the module docstring as a plain loop."""
    out, start = [False] * len(row), None
    for t, tok in enumerate(row):
        if tok == open_id and start is None:
            start = t
        elif tok == close_id and start is not None:
            for k in range(start, t + 1):
                out[k] = row[k] != pad_id
            start = None
    return out


CASES = {
    "one segment, right padding": ([1, O, 2, 3, C, 4, PAD, PAD], [0, 1, 1, 1, 1, 0, 0, 0]),
    "left padding": ([PAD, PAD, 1, O, 2, C, 3, 4], [0, 0, 0, 1, 1, 1, 0, 0]),
    "two segments": ([O, 2, C, 3, O, C, 4, 5], [1, 1, 1, 0, 1, 1, 0, 0]),
    "nested open is content, first close ends it, later close is stray": (
        [1, O, 2, O, 3, C, 4, C], [0, 1, 1, 1, 1, 1, 0, 0]),
    "stray close before a segment": ([C, 1, O, 2, C, C, 3, PAD], [0, 0, 1, 1, 1, 0, 0, 0]),
    "unclosed to the end is not a segment": ([1, O, 2, C, 3, O, 4, 5], [0, 1, 1, 1, 0, 0, 0, 0]),
    "only unclosed": ([1, 2, O, 3, 4, 5, PAD, PAD], [0] * 8),
    "no tags": ([1, 2, 3, 4, 5, 6, 7, 1], [0] * 8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mask_rules(name):
    row, want = CASES[name]
    got = control_mask_from_ids(torch.tensor([row]), O, C, PAD)
    assert got.dtype == torch.bool and got[0].int().tolist() == want
    assert reference_mask(row) == [bool(w) for w in want]
    # 1-D input gives the same row
    assert control_mask_from_ids(torch.tensor(row), O, C, PAD).int().tolist() == want


def test_vectorised_matches_loop_on_random_rows():
    rng = random.Random(0)
    rows = [[rng.choice([1, 2, 3, O, C, O, C, PAD]) for _ in range(24)] for _ in range(400)]
    got = control_mask_from_ids(torch.tensor(rows), O, C, PAD)
    assert got.tolist() == [reference_mask(r) for r in rows]


@pytest.fixture(scope="module")
def char_tok():
    tok = build_char_tokenizer()
    add_special_tokens(tok, None, [CONTROL_OPEN, CONTROL_CLOSE])
    return tok


def test_char_tokenizer_tags_are_single_tokens_and_mask_matches_text(char_tok, tmp_path):
    text = "B=1+2=3;wait<control>continue</control>:B=1+2=3;check<control>conclude</control>answer:3"
    ids = char_tok(text, add_special_tokens=False)["input_ids"]
    open_id, close_id = char_tok.convert_tokens_to_ids([CONTROL_OPEN, CONTROL_CLOSE])
    assert ids.count(open_id) == 2 and ids.count(close_id) == 2
    assert len(ids) == len(text) - 2 * (len(CONTROL_OPEN) - 1) - 2 * (len(CONTROL_CLOSE) - 1)
    mask = control_mask(torch.tensor([ids]), char_tok)[0]
    marked = char_tok.decode([i for i, m in zip(ids, mask.tolist()) if m])
    assert marked == "<control>continue</control><control>conclude</control>"
    segs = parse_segments(text)
    assert [s.content for s in segs.segments] == ["continue", "conclude"] and segs.well_formed
    assert strip_segments(text) == "B=1+2=3;wait:B=1+2=3;checkanswer:3"
    # the tags stay single tokens after save_pretrained / from_pretrained
    from transformers import AutoTokenizer

    char_tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids


def test_text_parse_reports_broken_rules():
    p = parse_segments("a</control>b<control>c<control>d</control>e<control>f")
    assert [s.content for s in p.segments] == ["c<control>d"]
    assert p.stray_closes == 1 and p.nested_opens == 1 and p.unclosed is not None and not p.well_formed


def test_missing_tags_is_a_clear_error():
    with pytest.raises(ValueError, match="cspo.enabled"):
        control_mask(torch.zeros(1, 3, dtype=torch.long), build_char_tokenizer())


def test_tokens_and_hook_only_when_enabled(tiny_model_dir):
    off = Kernel({"plugins": ["cspo"], "model": {"path": str(tiny_model_dir)}})
    model, tok = off.load()
    assert CONTROL_OPEN not in tok.get_vocab()
    ids = torch.tensor([[5, 6, 7]])
    assert off.pm.hook.metareason_rl_loss_mask(completion_ids=ids, completion_mask=ids > 0, tokenizer=tok,
                                               config=off.config) == []
    on = Kernel({"plugins": ["cspo"], "model": {"path": str(tiny_model_dir)}, "cspo": {"enabled": True}})
    model, tok = on.load()
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert len(tok(CONTROL_OPEN + "x" + CONTROL_CLOSE, add_special_tokens=False)["input_ids"]) == 3
    nomask = Kernel({"plugins": ["cspo"], "cspo": {"enabled": True, "mask_rl_loss": False}})
    assert nomask.pm.hook.metareason_rl_loss_mask(completion_ids=ids, completion_mask=ids > 0, tokenizer=tok,
                                                  config=nomask.config) == []


# ------------------------------------------------------------------------- gradient of the loss
@pytest.fixture(scope="module")
def grpo_loss_mod():
    return pytest.importorskip("metareason.train.grpo_loss", reason="the kernel's GRPO loss is not there yet")

COMPLETIONS = [
    "B=1+2=3;wait<control>conclude</control>answer:3",
    "B=1+2=3;wait:B=1+2=3;check<control>continue</control>:B=1+2=3;answer:3",
    "B=1+2=4;<control>revise</control>B=1+2=3;answer:3",
    "B=1+2=3;wait<control>continue",  # unclosed to the end: not a complete segment, not trained
]


def _batch(tok):
    rows = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in COMPLETIONS]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, ids != tok.pad_token_id


def _loss_grad(grpo_loss_mod, logits, ids, loss_mask, loss_type="grpo", beta=0.0):
    logits = logits.detach().clone().requires_grad_(True)
    logps = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    ref = (logps.detach() + 0.1 * torch.randn_like(logps)) if beta else None
    rewards = torch.tensor([1.0, 0.2, 0.5, -1.0])
    adv = grpo_loss_mod.group_advantages(rewards, 4, "group")
    loss, _ = grpo_loss_mod.grpo_loss(logps, logps.detach(), ref, adv, loss_mask, epsilon=0.2, epsilon_high=0.28,
                                      beta=beta, loss_type=loss_type, max_completion_length=ids.shape[1])
    loss.backward()
    return logits.grad


@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.0), ("dr_grpo", 0.0), ("dapo", 0.0), ("grpo", 0.04)])
def test_loss_gradient_is_zero_outside_control_segments(grpo_loss_mod, char_tok, loss_type, beta):
    torch.manual_seed(0)
    ids, completion_mask = _batch(char_tok)
    cmask = control_mask(ids, char_tok) & completion_mask
    assert not cmask[3].any()  # the unclosed segment is not a complete one
    logits = torch.randn(*ids.shape, len(char_tok))
    grad = _loss_grad(grpo_loss_mod, logits, ids, cmask, loss_type, beta)
    per_pos = grad.abs().sum(-1)
    assert torch.all(per_pos[~cmask] == 0), "gradient leaked to a non-control position"
    assert torch.all(per_pos[3] == 0)  # the completion whose segment never closes gets no gradient
    assert (per_pos[cmask] > 0).any()
    # without the control mask the same loss trains the reasoning tokens too
    full = _loss_grad(grpo_loss_mod, logits, ids, completion_mask, loss_type, beta)
    outside = completion_mask & ~cmask
    assert (full.abs().sum(-1)[outside] > 0).any()
    assert not torch.equal(full, grad)


def test_kernel_rl_path_with_real_model_and_tokenizer(grpo_loss_mod, tiny_model_dir):
    """The kernel's own mask assembly (completion mask AND every plugin's hook), log-probs from
    the real model's forward, the kernel's loss: the model's logits get no gradient outside
    control segments."""
    from metareason.generation.generate import encode_prompts
    from metareason.train.grpo import rl_loss_mask

    torch.manual_seed(0)
    kernel = Kernel({"plugins": ["cspo"], "model": {"path": str(tiny_model_dir)}, "cspo": {"enabled": True}})
    model, tok = kernel.load()
    ids, completion_mask = _batch(tok)
    mask = rl_loss_mask(kernel, ids, completion_mask, tok)
    assert torch.equal(mask, control_mask(ids, tok) & completion_mask)
    prompts = encode_prompts(tok, ["A=1;B=A+2;B=?"] * len(COMPLETIONS), torch.device("cpu"))
    input_ids = torch.cat([prompts["input_ids"], ids], 1)
    attention = torch.cat([prompts["attention_mask"], completion_mask.long()], 1)
    logps, outputs = grpo_loss_mod.completion_logps(model, input_ids, attention, ids.shape[1], return_outputs=True)
    outputs.logits.retain_grad()
    adv = grpo_loss_mod.group_advantages(torch.tensor([1.0, 0.2, 0.5, -1.0]), 4, "group")
    loss, _ = grpo_loss_mod.grpo_loss(logps, None, None, adv, mask, epsilon=0.2, epsilon_high=0.28, beta=0.0,
                                      loss_type="dapo", max_completion_length=ids.shape[1])
    loss.backward()
    per_pos = outputs.logits.grad[:, :-1].abs().sum(-1)  # the logits that predict each completion token
    assert per_pos.shape == mask.shape
    assert torch.all(per_pos[~mask] == 0) and (per_pos[mask] > 0).any()
    # the same path with the cspo plugin's mask switched off trains every completion token
    off = Kernel({"plugins": ["cspo"], "model": {"path": str(tiny_model_dir)},
                  "cspo": {"enabled": True, "mask_rl_loss": False}})
    assert torch.equal(rl_loss_mask(off, ids, completion_mask, tok), completion_mask)

"""memory_reason and mcft in one run (the shared test of both issues).

One SFT run trains on two tasks at once: typed-step questions of the synthetic world (memory_reason
rewrites them into step-token lines) and causal-loop critique rows (mcft's
<think><critique>..</critique><reasoning>..</reasoning></think><ans>..</ans> format). Each plugin's
mechanism must still hold with the other one active:

* the vocabulary holds both plugins' tokens, each row initialised by the kernel, not at random;
* memory rows are in step-token form and their labels are untouched by mcft (no <think>);
* mcft's critique masking drops label tokens only inside <think> of the critique rows, and those
  positions get exactly zero gradient in a real forward/backward of the mixed batch;
* mcft's format term is returned with its weight and has a gradient;
* the run trains, checkpoints and evaluates with both plugins' eval metrics in the result, and
  `metareason eval` on the run reproduces its final evaluation.
"""
import json

import pytest
import torch

from metareason import Kernel
from metareason.data.tokenize import IGNORE_INDEX, SFTStream, encode_examples
from metareason.train.loop import load_train_examples
from metareason.train.sft import collect_extra_losses, token_loss
from metareason.eval_command import evaluate_target

from conftest import TINY_LLAMA


def write_critique_rows(path, n=16):
    from metareason.data.causal_loop import make_task as causal_loop
    from metareason.plugins.mcft import teacher

    rows = []
    for i, e in enumerate(causal_loop({"levels": [1]}, 0, n)):
        attempt = teacher.noisy_solver(e["prompt"], seed=0)
        critique, reasoning, answer = teacher.critique(e["prompt"], attempt)
        rows.append({"id": f"r{i}", "prompt": e["prompt"], "cot": attempt, "critique": critique,
                     "reasoning": reasoning, "answer": str(answer), "answer_match": True})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def config(tmp_path, data, mode="full", **train):
    model = {"arch": dict(TINY_LLAMA, max_position_embeddings=512), "tokenizer": {"type": "char"}, "device": "cpu"}
    if "lora" in mode:
        model["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0,
                         "target_modules": ["gate_proj", "up_proj", "down_proj"]}
    world = {"entities": 4, "attributes": 1}
    return {"name": f"both-{mode}", "output_dir": str(tmp_path), "quiet": True,
            "plugins": ["memory_reason", "mcft"], "model": model,
            "data": {"max_length": 512,
                     "train": [{"task": "memory_world", "num_samples": 16, "params": world},
                               {"task": "mcft", "num_samples": 16, "params": {"path": str(data)}}],
                     "eval": [{"task": "memory_world", "num_samples": 3, "seed": 1,
                               "params": dict(world, split="heldout")},
                              {"task": "mcft", "num_samples": 3, "params": {"path": str(data)}}]},
            "train": dict({"max_steps": 3, "batch_size": 8, "log_every": 1, "seed": 0, "group_by_length": False},
                          **train),
            "generation": {"max_new_tokens": 12},
            "memory_reason": {"enabled": True, "mode": mode, "n_prefix": 2, "n_special": 2, "attention_samples": 2},
            "mcft": {"enabled": True, "threshold": 0.5, "bf_beta": 0.05}}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compose")
    data = tmp / "critiques.jsonl"
    write_critique_rows(data)
    torch.manual_seed(0)
    kernel = Kernel(config(tmp, data))
    model, tok = kernel.load()
    return kernel, model, tok, tmp, data


def mixed_batch(kernel, tok):
    """One batch of every training example, prompts through the kernel's prompt transforms."""
    examples = load_train_examples(kernel)
    prompts = [kernel.chain("metareason_transform_prompt", "prompt", e["prompt"], example=e, config=kernel.config)
               for e in examples]
    enc = encode_examples(tok, prompts, [e["completion"] for e in examples], kernel.config.data.max_length)
    stream = SFTStream(examples, enc, len(examples), 0, tok.pad_token_id, group_by_length=False)
    return stream.next_batch()


def test_both_vocabularies_are_added(both):
    _, _, tok, _, _ = both
    vocab = tok.get_vocab()
    for token in ("<think>", "</think>", "<critique>", "<reasoning>", "<ans>", "</ans>",
                  "<prefix_0>", "<prefix_1>", "<memory_0>", "<memory_1>", "<reason_0>", "<answer_1>"):
        assert token in vocab, token


def test_each_plugin_rewrites_only_its_own_rows_and_masking_stays_inside_think(both):
    kernel, model, tok, _, _ = both
    batch = mixed_batch(kernel, tok)
    think, think_end = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    memory_ids = {tok.convert_tokens_to_ids(f"<memory_{j}>") for j in range(2)}
    labels = kernel.chain("metareason_sft_labels", "labels", batch["labels"], batch=batch, tokenizer=tok,
                          config=kernel.config)
    dropped = (batch["labels"] != IGNORE_INDEX) & (labels == IGNORE_INDEX)
    n_memory_rows = n_critique_rows = 0
    for b, example in enumerate(batch["examples"]):
        row = batch["input_ids"][b].tolist()
        if example.get("cot_steps"):  # a memory_reason row: step tokens in the labels, nothing dropped
            n_memory_rows += 1
            assert memory_ids & set(batch["labels"][b].tolist())
            assert think not in row
            assert not dropped[b].any()
        else:  # an mcft row: drops only strictly inside <think> ... </think>
            n_critique_rows += 1
            lo, hi = row.index(think), row.index(think_end)
            where = dropped[b].nonzero().flatten()
            assert len(where) > 0
            assert int(where.min()) > lo and int(where.max()) < hi
    assert n_memory_rows == 16 and n_critique_rows == 16

    # the dropped positions get exactly zero gradient in a real backward of the mixed batch
    outputs = model(input_ids=batch["input_ids"], use_cache=False)
    outputs.logits.retain_grad()
    loss, _ = token_loss(outputs.logits, labels)
    loss.backward()
    grad = outputs.logits.grad.abs().sum(-1)
    rows, cols = dropped.nonzero(as_tuple=True)
    assert torch.all(grad[rows, cols - 1] == 0)
    kept = labels != IGNORE_INDEX
    kept[:, 0] = False
    rows, cols = kept.nonzero(as_tuple=True)
    assert torch.all(grad[rows, cols - 1] > 0)
    model.zero_grad(set_to_none=True)


def test_format_term_has_a_gradient_in_the_mixed_batch(both):
    kernel, model, tok, _, _ = both
    batch = mixed_batch(kernel, tok)
    batch["labels"] = kernel.chain("metareason_sft_labels", "labels", batch["labels"], batch=batch, tokenizer=tok,
                                   config=kernel.config)
    outputs = model(input_ids=batch["input_ids"], use_cache=False)
    terms = collect_extra_losses(kernel, model, batch, outputs, step=0)
    weight, term = terms["mcft_format"]
    assert weight == pytest.approx(0.05)
    term.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    model.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_a_run_with_both_trains_evaluates_and_reloads(tmp_path):
    data = tmp_path / "critiques.jsonl"
    write_critique_rows(data)
    kernel = Kernel(config(tmp_path, data, mode="lora+prompt-tuning"))
    metrics = kernel.run()
    assert "eval/mcft_format" in metrics
    assert any(k.startswith("eval/memory_reason/") for k in metrics)
    run_dir = tmp_path / "both-lora+prompt-tuning"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/mcft_format" in r for r in rows)

    # `metareason eval` on the run (adapter + new rows loaded back) reproduces the run's final evaluation
    again, _ = evaluate_target(str(run_dir), ["quiet=true"])
    for key in ("eval/accuracy", "eval/gen_tokens", "eval/mcft_format"):
        assert again[key] == pytest.approx(metrics[key]), key

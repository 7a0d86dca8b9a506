"""A real pretrained instruct model through every path of the kernel: SmolLM2-135M-Instruct
(converted once per machine by ``metareason models get``; the ``smollm2_dir`` fixture), with its
BPE tokenizer and ChatML template: chat generation, a LoRA SFT run, a GRPO step with the generic
rewards, ``export --merge`` and ``serve`` through the ``openai`` client."""
import pytest
import torch

from metareason.kernel import Kernel
from tests.conftest import run_cli
from tests.test_serve import Served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TASK = {"task": "reasoning_gym/basic_arithmetic", "num_samples": 16, "seed": 0,
        "params": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"],
                   "allow_parentheses": False, "allow_negation": False}}
SYSTEM = "Reply with only the final number."
LORA = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


def _config(tmp_path, model_dir, name, **over):
    cfg = {"name": name, "output_dir": str(tmp_path / "runs"), "plugins": [], "quiet": True,
           "model": {"path": str(model_dir), "lora": LORA},
           "data": {"system_prompt": SYSTEM, "max_length": 96, "train": [TASK],
                    "eval": [dict(TASK, num_samples=4, seed=10_000)]},
           "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1},
           "generation": {"max_new_tokens": 8}, "eval": {"at_end": False}}
    for key, value in over.items():
        cfg[key] = dict(cfg.get(key, {}), **value)
    return cfg


def test_chat_generation_equals_transformers_generate_token_for_token(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metareason.generation.generate import generate_batch
    from metareason.generators.local import LocalGenerator, load_local_model

    model, tok, kind, fmt = load_local_model(str(smollm2_dir), device="cpu")
    assert kind == "model" and fmt.enabled
    gen = LocalGenerator(model, tok, fmt=fmt)
    ours = generate_batch(model, tok, [gen.render(MESSAGES)], max_new_tokens=24, do_sample=False,
                          temperature=1.0, top_p=1.0, stop=[])[0]

    hf_tok = AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), local_files_only=True).eval()
    enc = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = hf.generate(**enc, max_new_tokens=24, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    if hf_tok.eos_token_id in out:
        out = out[: out.index(hf_tok.eos_token_id)]
    assert ours.token_ids == out
    assert "Paris" in ours.text  # a real model, answering sensibly
    assert gen.generate([MESSAGES], max_new_tokens=24, temperature=0)[0].text == ours.text


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, smollm2_dir):
    tmp = tmp_path_factory.mktemp("smol_sft")
    kernel = Kernel(_config(tmp, smollm2_dir, "sft"))
    kernel.run()
    return kernel.config.run_dir


def test_lora_sft_run_trains_the_adapters_on_chat_formatted_data(sft_run, smollm2_dir):
    import json

    from metareason.trained import load_trained

    rows = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    trained = load_trained(sft_run)
    lora_b = [p for n, p in trained.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.detach().abs().max()) > 0 for p in lora_b)  # B starts at zero: it moved


def test_export_merge_of_the_lora_run_equals_the_trained_model(sft_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from metareason.trained import load_trained

    out = tmp_path / "merged"
    proc = run_cli("export", str(sft_run), "--out", str(out), "--merge")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "adapter_model.safetensors").exists()
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2, 198]])
    with torch.no_grad():
        expected = load_trained(sft_run).model.eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    assert (out / "chat_template.jinja").exists() or "chat_template" in (out / "tokenizer_config.json").read_text()


def test_serve_answers_the_openai_chat_endpoint_like_local_generation(sft_run):
    from metareason.generators.local import LocalGenerator

    gen = LocalGenerator.from_config(type("C", (), {"path": str(sft_run), "checkpoint": None, "device": "cpu",
                                                    "dtype": "float32", "batch_size": 4})(), "local")
    question = [{"role": "user", "content": "Calculate 2 + 3."}]
    expected = gen.generate([question], max_new_tokens=8, temperature=0)[0]
    server = Served(sft_run)
    try:
        reply = server.client().chat.completions.create(model="sft", messages=question, max_tokens=8, temperature=0)
    finally:
        server.stop()
    assert reply.choices[0].message.content == expected.text
    # the run's system prompt is part of what the server renders, as in training
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert SYSTEM in gen.render(question)


def test_grpo_step_with_task_score_and_format_rewards(tmp_path, smollm2_dir):
    import json

    cfg = _config(tmp_path, smollm2_dir, "grpo", train={"algorithm": "grpo", "max_steps": 1, "batch_size": 2},
                  rl={"num_generations": 2, "rewards": {"task_score": 1.0, "format": 0.5},
                      "format_pattern": r"-?\d+", "max_completion_length": 8})
    kernel = Kernel(cfg)
    kernel.run()
    rows = [json.loads(line) for line in (kernel.config.run_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "rl/reward/mean" in r)
    for name in ("task_score", "format"):
        assert 0.0 <= step[f"rl/reward/{name}/mean"] <= 1.0

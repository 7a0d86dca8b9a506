"""Behavioural checks of kernel mechanisms that the rest of the suite does not pin down on its own
(each kills a mutant of scripts/mutants.yaml): SFT labels and loss normalisation, gradient
accumulation and clipping, the LR schedule and weight-decay groups, the NaN/inf stop, resume of the
metrics log, checkpoint pruning and failed-save cleanup, reward weighting, chained hooks, special
token initialisation of an untied head, left-padded batched generation, the backends' finish
reasons and retries, the batching engine's bounded queue, the GRPO
objective's pessimistic min, left-padding positions for absolute-position models, the EOS kept in
rollouts, and a self-contained unmerged export.

All fast, deterministic and CPU-only."""
import json
import math
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from metareason import Kernel, hookimpl
from metareason.config import TrainConfig
from metareason.data.tokenize import IGNORE_INDEX, SFTStream, collate, encode_examples
from metareason.models import build_char_tokenizer
from tests.conftest import TINY_LLAMA, save_bigram_llama


def sft_config(tmp_path, name, data=None, **train):
    return {
        "name": name, "output_dir": str(tmp_path), "plugins": [], "quiet": True,
        "model": {"arch": dict(TINY_LLAMA), "tokenizer": {"type": "char"}},
        "data": {"max_length": 64,
                 "train": data or [{"task": "causal_loop", "num_samples": 16, "params": {"levels": [1]}}]},
        "train": dict({"max_steps": 2, "batch_size": 2, "grad_accum": 1, "lr": 1e-3, "save_every": 0,
                       "log_every": 1, "keep_last": 5}, **train),
        "eval": {"at_end": False},
    }


def metric_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir):
    return [r for r in metric_rows(run_dir) if "train/loss" in r]


def capture_step_grad_norms(monkeypatch, module):
    """Wrap ``module.build_optimizer`` so every optimizer step records the total gradient norm it sees."""
    seen = []
    real = module.build_optimizer

    def build(model, cfg):
        opt = real(model, cfg)

        def pre_step(optimizer, args, kwargs):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

        opt.register_step_pre_hook(pre_step)
        return opt

    monkeypatch.setattr(module, "build_optimizer", build)
    return seen


# ------------------------------------------------------------------------------ SFT data and loss
def test_sft_example_ends_with_a_learned_eos():
    tok = build_char_tokenizer()
    enc = encode_examples(tok, ["A=1;A=?"], ["1"], 64)
    ids = enc.input_ids[0]
    assert ids[-1] == tok.eos_token_id and ids[-2] == tok.convert_tokens_to_ids("1")
    batch = collate(enc.input_ids, enc.prompt_lengths, tok.pad_token_id)
    assert batch["labels"][0, len(ids) - 1] == tok.eos_token_id  # EOS is in the loss


def test_long_example_keeps_its_prompt_and_is_counted():
    tok = build_char_tokenizer()
    prompt = "A=1;B=A+2;B=?"
    enc = encode_examples(tok, [prompt, "x"], ["9" * 100, "y"], 24)
    head = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    assert enc.truncated == 1
    assert len(enc.input_ids[0]) == 24 and enc.input_ids[0][: len(head)] == head
    assert enc.prompt_lengths[0] == len(head)
    assert enc.input_ids[0][len(head):] == [tok.convert_tokens_to_ids("9")] * (24 - len(head))


def test_sft_stream_reshuffles_each_epoch():
    tok = build_char_tokenizer()
    examples = [{"prompt": f"p{i}", "completion": "c"} for i in range(16)]
    enc = encode_examples(tok, [e["prompt"] for e in examples], [e["completion"] for e in examples], 16)
    stream = SFTStream(examples, enc, 4, seed=1, pad_id=tok.pad_token_id, group_by_length=False)
    epochs = []
    for _ in range(2):
        order = []
        for _ in range(stream.batches_per_epoch):
            order += [e["prompt"] for e in stream.next_batch()["examples"]]
        epochs.append(order)
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(e["prompt"] for e in examples)
    assert epochs[0] != epochs[1]  # a new permutation each epoch


def test_token_loss_is_the_mean_over_learned_tokens():
    from metareason.train.sft import token_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5, IGNORE_INDEX],
                           [IGNORE_INDEX, 7, 8, 9, 1, 2]])
    loss, n = token_loss(logits, labels)
    # logits at t predict the label at t+1; 3 + 5 learned tokens
    pairs = [(b, t) for b in range(2) for t in range(5) if labels[b, t + 1] != IGNORE_INDEX]
    assert n == len(pairs) == 8
    want = torch.stack([F.cross_entropy(logits[b, t][None], labels[b, t + 1][None]) for b, t in pairs]).mean()
    torch.testing.assert_close(loss, want)


# ------------------------------------------------------------------------- SFT optimizer step
def test_sft_grad_accum_averages_micro_batches(tmp_path):
    """Identical examples make every micro-batch the same: grad_accum 2 must give the gradient of one
    micro-batch (their mean), not twice it."""
    data = tmp_path / "same.jsonl"
    data.write_text("".join(json.dumps({"question": "A=1;B=A+2;B=?", "answer": "3"}) + "\n" for _ in range(8)))
    spec = [{"task": "jsonl", "num_samples": 8, "params": {"path": str(data)}}]
    norms = {}
    for accum in (1, 2):
        k = Kernel(sft_config(tmp_path, f"accum{accum}", data=spec, max_steps=1, grad_accum=accum,
                              max_grad_norm=1e9))
        k.run()
        row = train_rows(k.config.run_dir)[0]
        norms[accum] = row["train/grad_norm"]
    assert norms[1] > 0
    assert norms[2] == pytest.approx(norms[1], rel=1e-4)


def test_sft_clips_the_gradient_before_the_step(tmp_path, monkeypatch):
    import metareason.train.sft as sft

    seen = capture_step_grad_norms(monkeypatch, sft)
    k = Kernel(sft_config(tmp_path, "clip", max_steps=2, max_grad_norm=1e-3))
    k.run()
    logged = [r["train/grad_norm"] for r in train_rows(k.config.run_dir)]
    assert len(seen) == 2 and all(n > 1e-2 for n in logged)  # the raw norm is far above the limit
    assert all(n <= 1e-3 * (1 + 1e-4) for n in seen), seen  # the optimizer sees the clipped gradient


def test_sft_logged_lr_follows_warmup_and_cosine(tmp_path):
    k = Kernel(sft_config(tmp_path, "lr", max_steps=5, warmup_steps=3, lr=1e-3, min_lr_ratio=0.1,
                          schedule="cosine"))
    k.run()
    lrs = [r["train/lr"] for r in train_rows(k.config.run_dir)]
    # logged after step k: lr * f(k); warmup (k+1)/3 for k < 3, then cosine over steps 3..5 to 0.1
    want = [1e-3 * f for f in (2 / 3, 1.0, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), 0.1)]
    assert lrs == pytest.approx(want, rel=1e-9)


def test_lr_schedule_warmup_cosine_and_floor():
    from metareason.train.optim import lr_lambda

    f = lr_lambda(TrainConfig(max_steps=10, warmup_steps=4, min_lr_ratio=0.1, schedule="cosine"))
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)
    assert f(7) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert f(10) == pytest.approx(0.1) and f(12) == pytest.approx(0.1)  # the floor, not zero
    lin = lr_lambda(TrainConfig(max_steps=10, warmup_steps=0, min_lr_ratio=0.0, schedule="linear"))
    assert lin(0) == pytest.approx(1.0) and lin(5) == pytest.approx(0.5) and lin(10) == pytest.approx(0.0)


def test_weight_decay_skips_norms_and_biases():
    from transformers import AutoConfig, AutoModelForCausalLM

    from metareason.train.optim import build_optimizer

    arch = dict(TINY_LLAMA)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), vocab_size=40, **arch))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = [names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    plain = [names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert decayed and plain
    assert not any("norm" in n for n in decayed)
    assert all("norm" in n for n in plain)
    assert sorted(decayed + plain) == sorted(names.values())


# ----------------------------------------------------------------------- NaN stop, resume, checkpoints
def test_check_finite_stops_on_inf_and_nan():
    from metareason.train.loop import TrainingDiverged, check_finite

    check_finite(torch.tensor(1.5), 0, None)
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(TrainingDiverged, match="step 4: training loss is"):
            check_finite(torch.tensor(bad), 3, None)


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    from metareason.plugin_manager import PluginError

    class StopAt4:
        @hookimpl
        def metareason_on_step_end(self, step):
            if step == 4:
                raise RuntimeError("interrupted")

    cfg = sft_config(tmp_path, "trunc", max_steps=5, save_every=2)
    k = Kernel(cfg)
    k.register(StopAt4(), name="stop")
    with pytest.raises(PluginError, match="interrupted"):
        k.run()
    assert [r["step"] for r in train_rows(k.config.run_dir)] == [1, 2, 3]  # step 3 is past the step-2 checkpoint
    Kernel(cfg).run(resume=True)
    assert [r["step"] for r in train_rows(k.config.run_dir)] == [1, 2, 3, 4, 5]


def test_failed_save_leaves_no_temp_dir_and_keep_last_prunes(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from metareason.checkpoint import checkpoints_dir, list_checkpoints, save_checkpoint

    arch = dict(TINY_LLAMA)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), vocab_size=40, **arch))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, None, opt, sched, {"data_position": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002", "step-0000003"]

    def explode(directory):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 4, model, None, opt, sched, {}, keep_last=2, write_extra=explode)
    assert sorted(p.name for p in checkpoints_dir(tmp_path).iterdir()) == ["step-0000002", "step-0000003"]


# ------------------------------------------------------------------------------------ GRPO
def test_total_reward_is_weighted_and_nan_skipping():
    from metareason.train.grpo import total_reward

    nan = float("nan")
    got = total_reward(torch.tensor([[1.0, 2.0], [nan, 1.0], [nan, nan]]), torch.tensor([1.0, 0.5]))
    assert got[:2].tolist() == [2.0, 0.5] and math.isnan(got[2])


def test_grpo_clips_the_gradient_before_the_step(tmp_path, monkeypatch):
    import metareason.train.grpo as grpo

    class Varied:
        @hookimpl
        def metareason_register_rewards(self, register):
            register("varied", lambda completions, examples: [float(sum(map(ord, c)) % 7) for c in completions])

    seen = capture_step_grad_norms(monkeypatch, grpo)
    cfg = sft_config(tmp_path, "grpo_clip", max_steps=1, algorithm="grpo", batch_size=2, max_grad_norm=1e-4,
                     schedule="constant")
    cfg["rl"] = {"num_generations": 4, "rewards": {"varied": 1.0}, "max_completion_length": 8}
    k = Kernel(cfg)
    k.register(Varied(), name="varied")
    k.run()
    (row,) = train_rows(k.config.run_dir)
    assert row["rl/reward/std"] > 0 and row["train/grad_norm"] > 1e-3
    assert len(seen) == 1 and seen[0] <= 1e-4 * (1 + 1e-4), seen


# ------------------------------------------------------------------------------------ hooks
def test_chained_hooks_pass_each_value_on():
    class Prefix:
        def __init__(self, text):
            self.text = text

        @hookimpl
        def metareason_transform_prompt(self, prompt):
            return self.text + prompt

    class Observer:
        @hookimpl
        def metareason_transform_prompt(self, prompt):
            return None  # keeps the value

    k = Kernel({"plugins": []})
    k.register(Prefix("a"), name="a")
    k.register(Observer(), name="observer")
    k.register(Prefix("b"), name="b")
    out = k.chain("metareason_transform_prompt", "prompt", "x", example={}, config=k.config)
    assert out in ("abx", "bax")  # both plugins applied, each to the other's result


# ------------------------------------------------------------------------------------ models
def test_special_tokens_initialise_the_untied_output_head(tiny_model_dir):
    from metareason.config import ModelConfig
    from metareason.models import add_special_tokens
    from metareason.models.loader import load_model, load_tokenizer

    cfg = ModelConfig(path=str(tiny_model_dir))
    tok = load_tokenizer(cfg)
    model, _ = load_model(cfg, tok)
    head = model.get_output_embeddings().weight
    assert head.data_ptr() != model.get_input_embeddings().weight.data_ptr()  # untied
    before = head.detach().clone()
    (new,) = add_special_tokens(tok, model, ["<reason>"])
    after = model.get_output_embeddings().weight.detach()
    torch.testing.assert_close(after[new], before.mean(dim=0))
    torch.testing.assert_close(after[: before.shape[0]], before)


# ------------------------------------------------------------------------------------ generation
GEN_CHAIN = {"x": "1", "1": "2", "2": "3", "3": ";", ";": "4", "4": "5", "5": "</s>", "y": "z"}  # z: ends by padding


@pytest.fixture(scope="module")
def bigram_dir(tmp_path_factory):
    return save_bigram_llama(tmp_path_factory.mktemp("bigram_mech"), GEN_CHAIN)


def test_batched_prompts_of_different_lengths_generate_as_alone(bigram_dir):
    from metareason.generation.generate import generate_batch

    k = Kernel({"plugins": [], "quiet": True, "model": {"path": str(bigram_dir)}})
    model, tok = k.load()
    kw = dict(max_new_tokens=10, do_sample=False, temperature=1.0, top_p=1.0, stop=[])
    prompts = ["x", "aaaa2", "ab4"]
    batched = [g.text for g in generate_batch(model, tok, prompts, **kw)]
    alone = [generate_batch(model, tok, [p], **kw)[0].text for p in prompts]
    assert batched == alone == ["123;45", "3;45", "5"]


def test_local_backend_finish_reason_stop_when_the_model_ends(bigram_dir):
    gen = Kernel({"plugins": [], "generators": {"l": {"type": "local", "path": str(bigram_dir)}}}).generator("l")
    (c,) = gen.generate(["y"], max_new_tokens=10)  # the model ends the text itself, well within the budget
    assert c.text == "z" and c.finish_reason == "stop" and c.completion_tokens == 1
    (c,) = gen.generate(["x"], max_new_tokens=2)
    assert c.text == "12" and c.finish_reason == "length"


# ------------------------------------------------------------------------------------ generators
def _httpx():
    try:
        import httpx
    except ImportError:  # this environment ships the client as httpx2
        import httpx2 as httpx
    return httpx


class StubClient:
    """Stands in for ``openai.OpenAI``: raises the queued errors, then answers."""

    def __init__(self, errors):
        self.errors, self.calls = list(errors), 0
        self.completions = self

    def create(self, **kwargs):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return SimpleNamespace(choices=[SimpleNamespace(text="ok", finish_reason="stop")],
                               usage=SimpleNamespace(prompt_tokens=2, completion_tokens=1))

    def close(self):
        pass


def test_openai_backend_retries_transient_errors_only():
    import openai

    from metareason.generators import GeneratorError
    from metareason.generators.openai_backend import OpenAIGenerator, OpenAIGeneratorConfig

    httpx = _httpx()
    request = httpx.Request("POST", "http://127.0.0.1:1/v1/completions")
    cfg = OpenAIGeneratorConfig(base_url="http://127.0.0.1:1/v1", model="m", max_retries=3, backoff=0.001,
                                backoff_max=0.001, concurrency=1)
    gen = OpenAIGenerator(cfg, "t")
    try:
        gen.client = StubClient([openai.APIConnectionError(request=request),
                                 openai.RateLimitError("busy", response=httpx.Response(429, request=request),
                                                       body=None)])
        (c,) = gen.generate(["a"], max_new_tokens=2)
        assert c.text == "ok" and gen.client.calls == 3  # two transient failures, then the answer

        gen.client = StubClient([openai.BadRequestError("bad prompt", response=httpx.Response(400, request=request),
                                                        body=None)])
        with pytest.raises(GeneratorError, match="bad prompt"):
            gen.generate(["a"], max_new_tokens=2)
        assert gen.client.calls == 1  # a client error is not retried
    finally:
        gen.close()


class BlockingGenerator:
    """A generator whose calls wait for ``release``; answers ``"<prompt>/<sample>"``."""

    def __init__(self):
        self.release, self.started = threading.Event(), threading.Event()

    def generate(self, prompts, *, n=1, max_new_tokens=16, temperature=0.0, top_p=1.0, stop=None, seed=None):
        from metareason.generators import Completion

        self.started.set()
        assert self.release.wait(20)
        return [Completion(f"{p}/{j}", 1, 1, "stop", i, j) for i, p in enumerate(prompts) for j in range(n)]


def test_batching_queue_full_raises_and_results_are_split():
    from metareason.generators.batching import BatchingEngine, QueueFull, Request

    gen = BlockingGenerator()
    engine = BatchingEngine(gen, max_batch=1, window_s=0.0, max_queue=1)
    try:
        first = engine.submit(Request(prompts=["a"]))
        assert gen.started.wait(20)  # the worker holds the first request
        second = engine.submit(Request(prompts=["b"]))  # waits in the queue
        with pytest.raises(QueueFull):
            engine.submit(Request(prompts=["c"]))
        gen.release.set()
        assert [c.text for c in first.result(20)] == ["a/0"]
        assert [c.text for c in second.result(20)] == ["b/0"]

        # one batched call answering two requests: each gets its own rows, indexed from its own prompts
        one, two = Request(prompts=["p", "q"], n=2), Request(prompts=["r"], n=2)
        engine._run([one, two])
        assert [(c.text, c.prompt_index, c.sample_index) for c in one.future.result(5)] == [
            ("p/0", 0, 0), ("p/1", 0, 1), ("q/0", 1, 0), ("q/1", 1, 1)]
        assert [(c.text, c.prompt_index, c.sample_index) for c in two.future.result(5)] == [("r/0", 0, 0), ("r/1", 0, 1)]
    finally:
        gen.release.set()
        engine.stop(5)
    # requests with a seed are never batched with others; without one, equal parameters share a batch
    assert Request(prompts=["a"], seed=1, uid=1).key() != Request(prompts=["a"], seed=1, uid=2).key()
    assert Request(prompts=["a"], uid=1).key() == Request(prompts=["b"], uid=2).key()


# ------------------------------------------------------------------------------------ GRPO objective details
def test_grpo_objective_is_the_pessimistic_min_of_clipped_and_unclipped():
    """Where clipping would *raise* the objective, the unclipped term is used (and its gradient flows):
    a > 0 with ratio 0.5 < 1 - eps, and a < 0 with ratio 1.5 > 1 + eps."""
    from metareason.train.grpo_loss import grpo_loss

    old = torch.zeros(2, 1, dtype=torch.float64)
    logps = torch.tensor([[math.log(0.5)], [math.log(1.5)]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, _ = grpo_loss(logps, old, None, adv, torch.ones(2, 1, dtype=torch.bool), epsilon=0.2, epsilon_high=None,
                        beta=0.0, loss_type="dapo", max_completion_length=1)
    loss.backward()
    # per token: -min(r a, clip(r) a) = -0.5 and +1.5; dapo: mean over the 2 tokens
    assert float(loss.detach()) == pytest.approx((-0.5 + 1.5) / 2, rel=1e-12)
    # d/dlogp of -r a = -r a: -0.5 and +1.5, over 2 tokens
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.25], [0.75]], dtype=torch.float64))


def test_completion_logps_left_padding_with_absolute_positions():
    """A model with learned absolute positions (GPT-2) scores a left-padded prompt's completion like the
    unpadded one only if the position ids skip the padding (RoPE models cannot tell)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from metareason.train.grpo_loss import completion_logps

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    row = torch.tensor([[1, 40, 41, 42, 50, 51, 52]])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(row)], 1)
    with torch.no_grad():
        a = completion_logps(model, row, torch.ones_like(row), 3)
        b = completion_logps(model, padded, mask, 3)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rollout_completions_keep_the_eos_that_ended_them(tmp_path):
    """A completion that ended with EOS keeps it: rewards see it, and it is a loss token."""
    from metareason.train.grpo import generate_rollout

    path = save_bigram_llama(tmp_path / "bigram", {"?": "7", "7": "</s>"})
    seen = {}

    class Capture:
        @hookimpl
        def metareason_register_rewards(self, register):
            def capture(completions, examples, completion_ids, completion_lengths, truncated):
                seen.update(ids=completion_ids, lengths=completion_lengths, truncated=truncated, texts=completions)
                return [1.0] * len(completions)

            register("capture", capture)

    k = Kernel({"plugins": [], "quiet": True, "model": {"path": str(path)},
                "rl": {"num_generations": 2, "rewards": {"capture": 1.0}, "max_completion_length": 5}})
    k.register(Capture(), name="capture")
    model, tok = k.load()
    torch.manual_seed(0)
    rollout = generate_rollout(k, model, tok, [{"prompt": "B=?", "answer": "7"}] * 2)
    seven = tok.convert_tokens_to_ids("7")
    assert seen["texts"] == ["7"] * 4 and seen["truncated"] == [False] * 4
    assert seen["ids"] == [[seven, tok.eos_token_id]] * 4 and seen["lengths"] == [2] * 4
    assert rollout.loss_mask.sum(1).tolist() == [2] * 4
    assert (rollout.input_ids[:, -1] == tok.eos_token_id).all()


def test_unmerged_export_names_itself_as_the_adapters_base(tmp_path, tiny_model_dir):
    """The exported adapter's base is the exported directory (it holds the run's added tokens), so the
    export is self-contained: PEFT's own loader, which follows base_model_name_or_path, rebuilds the
    trained model from it after the model the run started from is gone."""
    import shutil

    from peft import AutoPeftModelForCausalLM

    from metareason.model_export import export_run
    from metareason.trained import load_trained

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    cfg = {"name": "lora", "output_dir": str(tmp_path / "runs"), "plugins": [], "quiet": True,
           "model": {"path": str(base), "special_tokens": ["<x>"],
                     "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}},
           "data": {"max_length": 64, "train": [{"task": "causal_loop", "num_samples": 8, "params": {"levels": [1]}}]},
           "train": {"max_steps": 1, "batch_size": 4, "lr": 5e-2, "save_every": 0}, "eval": {"at_end": False}}
    k = Kernel(cfg)
    k.run()
    ids = torch.tensor([[5, 9, 14, 3, 22, 7, 11]])
    with torch.no_grad():
        expected = load_trained(k.config.run_dir).model.eval()(input_ids=ids).logits
    out = export_run(k.config.run_dir, tmp_path / "export")
    shutil.rmtree(base)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

"""The continuous-batching scheduler in-process on a tiny random Llama: greedy text equal to
``metareason eval``'s generation for requests admitted at different steps, per-row parameters in
one batch, a cache sized by what rows hold, streaming as tokens come, cancellation, and one
failing request failing alone."""
import threading
import time

import pytest
import torch

from metareason.data.tokenize import prompt_ids
from metareason.generation.generate import generate_batch
from metareason.models import build_char_tokenizer
from metareason.serving.scheduler import Busy, Job, Params, Scheduler
from tests.conftest import TINY_LLAMA

PROMPTS = ["A=1;B=A+2;", "C=5;", "Z", "hello world", "x" * 30, "Q=7;R=Q*2;S="]


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    tok = build_char_tokenizer()
    arch = dict(TINY_LLAMA)
    cfg = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **arch)
    return AutoModelForCausalLM.from_config(cfg).eval(), tok


def reference(model, tok, prompt, max_new=20):
    return generate_batch(model, tok, [prompt], max_new_tokens=max_new, do_sample=False, temperature=1.0,
                          top_p=1.0, stop=[])[0]


class Collect:
    """Events of one job, with the time each arrived."""

    def __init__(self):
        self.events, self.finished = [], threading.Event()
        self.expected = None

    def __call__(self, kind, payload):
        self.events.append((kind, payload, time.monotonic()))
        if kind == "error" or kind == "done" and len(self.done) == self.expected:
            self.finished.set()

    @property
    def done(self):
        return sorted((p for k, p, _ in self.events if k == "done"), key=lambda r: r.index)

    @property
    def error(self):
        return next((p for k, p, _ in self.events if k == "error"), None)

    def streamed(self, index=0):
        return "".join(p[1] for k, p, _ in self.events if k == "token" and p[0] == index)


def submit(sched, tok, prompts, n=1, **params):
    c = Collect()
    job = Job([prompt_ids(tok, p) for p in prompts], n, Params(**params), c)
    c.expected, c.job = job.rows, job
    sched.submit(job)
    return c


def wait(collectors, timeout=60):
    for c in collectors:
        assert c.finished.wait(timeout), "a request did not finish"


def idle(sched, timeout=10):
    """The worker retired every row (it sends a row's last event just before)."""
    deadline = time.monotonic() + timeout
    while (sched.rows or sched.reserved) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not sched.rows and sched.reserved == 0


@pytest.mark.parametrize("fast", [True, False], ids=["decode_step", "model_forward"])
def test_greedy_equals_sequential_generation_for_requests_admitted_at_different_steps(tiny, fast):
    model, tok = tiny
    refs = [reference(model, tok, p) for p in PROMPTS]
    sched = Scheduler(model, tok, max_rows=8)
    if not fast:
        sched.fast = None
    assert (sched.fast is not None) == fast
    try:
        jobs = []
        for p in PROMPTS:  # arrive while others are mid-decode: admitted at different steps
            jobs.append(submit(sched, tok, [p], max_tokens=20, temperature=0))
            time.sleep(0.01)
        wait(jobs)
        for c, ref in zip(jobs, refs):
            (res,) = c.done
            assert res.text == ref.text and res.completion_tokens == ref.num_tokens
            assert c.streamed() == res.text  # streamed pieces join to the text
        assert sched.steps < sum(r.completion_tokens for c in jobs for r in c.done)  # rows shared steps
        assert idle(sched)
    finally:
        sched.stop(5)


def test_rows_with_their_own_parameters_share_a_batch(tiny):
    model, tok = tiny
    sched = Scheduler(model, tok, max_rows=16)
    try:
        alone = submit(sched, tok, ["C=5;", "Z"], n=2, max_tokens=12, temperature=1.0, seed=7)
        wait([alone])
        steps = sched.steps
        mixed = [submit(sched, tok, ["A=1;"], max_tokens=12, temperature=0.7, top_p=0.9),
                 submit(sched, tok, ["C=5;", "Z"], n=2, max_tokens=12, temperature=1.0, seed=7),
                 submit(sched, tok, ["Q=7;"], max_tokens=12, temperature=0),
                 submit(sched, tok, ["A=1;B=A+2;"], max_tokens=30, temperature=0, stop=["rl"]),
                 submit(sched, tok, ["C=5;"], max_tokens=12, temperature=1e-300)]  # tiny: greedy, not NaN
        wait(mixed)
        assert mixed[4].done[0].text == reference(model, tok, "C=5;", 12).text
        # a seed gives the same samples whatever else is in the batch; the samples differ from each other
        assert [r.text for r in mixed[1].done] == [r.text for r in alone.done]
        assert len({r.text for r in alone.done}) == 4
        assert mixed[2].done[0].text == reference(model, tok, "Q=7;", 12).text
        stopped = mixed[3].done[0]
        assert stopped.finish_reason == "stop" and "rl" not in stopped.text
        assert reference(model, tok, "A=1;B=A+2;", 30).text.startswith(stopped.text + "rl")
        assert mixed[3].streamed() == stopped.text  # the held-back tail never leaks the stop string
        assert sched.steps - steps < 12 * 4  # one batch, not one decode per request
    finally:
        sched.stop(5)


def test_cache_grows_with_the_rows_not_reserved_for_max_tokens(tiny):
    model, tok = tiny
    sched = Scheduler(model, tok)
    seen = []
    try:
        c = Collect()

        def on_event(kind, payload):
            if kind == "token" and sched.kv is not None:
                seen.append((sched.kv.width, sched.kv.mask.shape[1]))
                if len(seen) == 40:
                    job.cancel()  # the client goes away
            c(kind, payload)
        job = Job([prompt_ids(tok, "C=5;")], 1, Params(max_tokens=1000, temperature=0), on_event)
        c.expected = 1
        sched.submit(job)
        assert idle(sched)  # cancelled: retired, budget back
        assert len(seen) > 3
        width, capacity = seen[3]
        assert width == 5 + 4 and capacity < 5 + 1000 and capacity <= 2 * width + 16
        width, capacity = seen[-1]
        assert len(seen) < 1000 and capacity < 5 + 1000 and capacity <= 2 * width + 16
    finally:
        sched.stop(5)


def test_a_request_whose_rows_make_the_model_raise_fails_alone(tiny):
    model, tok = tiny
    refs = {p: reference(model, tok, p) for p in PROMPTS}
    bad_prompt = tok.convert_tokens_to_ids("!")
    bad_step = tok.convert_tokens_to_ids("L")  # only "Z"'s greedy completion has it (oL]Ju...)
    assert "L" in refs["Z"].text and not any("L" in refs[p].text for p in PROMPTS if p != "Z")

    def hook(module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1 and bool((ids == bad_prompt).any()):
            raise RuntimeError("injected prefill failure")
        if ids.shape[1] == 1 and bool((ids == bad_step).any()):
            raise torch.OutOfMemoryError("injected step failure")

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    sched = Scheduler(model, tok, max_rows=8)
    try:
        jobs = {p: submit(sched, tok, [p], max_tokens=20, temperature=0) for p in PROMPTS}
        jobs["bad!"] = submit(sched, tok, ["bad!"], max_tokens=20, temperature=0)
        wait(jobs.values())
        assert jobs["bad!"].error[0] == 500 and "injected prefill" in jobs["bad!"].error[1]
        assert jobs["Z"].error[0] == 500 and "injected step" in jobs["Z"].error[1]
        for p in PROMPTS:
            if p != "Z":
                assert jobs[p].error is None and jobs[p].done[0].text == refs[p].text
        assert idle(sched) and sched.alive
    finally:
        handle.remove()
        sched.stop(5)


def test_tokens_are_streamed_before_the_request_finishes_and_the_budget_is_enforced(tiny):
    model, tok = tiny
    sched = Scheduler(model, tok, token_budget=200, max_queue=2)
    try:
        c = submit(sched, tok, ["C=5;"], max_tokens=150, temperature=0)
        with pytest.raises(Busy) as info:
            submit(sched, tok, ["C=5;"], max_tokens=100, temperature=0)  # 155 + 105 > 200
        assert info.value.retry_after >= 1 and "token budget" in str(info.value)
        with pytest.raises(ValueError):
            submit(sched, tok, ["C=5;"], max_tokens=300, temperature=0)  # can never fit
        wait([c])
        tokens = [t for k, _, t in c.events if k == "token"]
        done = next(t for k, _, t in c.events if k == "done")
        assert len(tokens) >= 100 and tokens[0] < done - 0.5 * (done - tokens[0])
        wait([submit(sched, tok, ["C=5;"], max_tokens=100, temperature=0)])  # room again
    finally:
        sched.stop(5)


def test_a_request_joins_the_running_batch_at_the_next_step(tiny):
    # a short request arriving while a long one decodes is admitted between two steps of it and
    # finishes first (a static batcher would make it wait for the long one to end)
    model, tok = tiny
    sched = Scheduler(model, tok)
    try:
        long = submit(sched, tok, ["C=5;"], max_tokens=110, temperature=0)
        while not any(k == "token" for k, _, _ in long.events):
            time.sleep(0.005)
        short = submit(sched, tok, ["Z"], max_tokens=3, temperature=0)
        wait([short, long])
        short_done = next(t for k, _, t in short.events if k == "done")
        long_tokens = [t for k, _, t in long.events if k == "token"]
        assert short_done < long_tokens[-1]
        assert sum(t < short_done for t in long_tokens) < 100  # joined mid-way, not after the end
    finally:
        sched.stop(5)



def prefill_shapes(model):
    """``(rows, width)`` of every prefill forward (more than one token per row), as it happens."""
    shapes = []

    def hook(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            shapes.append(tuple(kwargs["input_ids"].shape))
    return shapes, model.register_forward_pre_hook(hook, with_kwargs=True)


def running_job(sched, tok, max_tokens=60):
    c = submit(sched, tok, ["C=5;"], max_tokens=max_tokens, temperature=0)
    while not any(k == "token" for k, _, _ in c.events):
        time.sleep(0.005)
    return c


def test_requests_admitted_in_one_step_are_prefilled_together_and_each_equals_its_solo_greedy_text(tiny):
    # prompts of different lengths (and one request of two prompts x two samples) arrive together
    # while another request decodes: one left-padded prefill forward for all six prompts, and
    # every row's greedy text equals its prompt's generation alone
    model, tok = tiny
    refs = {p: reference(model, tok, p) for p in PROMPTS}
    running_ref = reference(model, tok, "C=5;", 60)
    shapes, handle = prefill_shapes(model)
    sched = Scheduler(model, tok, max_rows=16)
    try:
        running = running_job(sched, tok)
        with sched._lock:  # the worker takes all of them at its next round
            singles = [submit(sched, tok, [p], max_tokens=20, temperature=0, logprobs=0) for p in PROMPTS[:4]]
            pair = submit(sched, tok, PROMPTS[4:], n=2, max_tokens=20, temperature=0)
        wait(singles + [pair, running])
        widest = max(len(prompt_ids(tok, p)) for p in PROMPTS)
        assert shapes[:2] == [(1, len(prompt_ids(tok, "C=5;"))), (6, widest)]
        for c, p in zip(singles, PROMPTS):
            assert c.error is None and c.done[0].text == refs[p].text and c.streamed() == refs[p].text
            alone = submit(sched, tok, [p], max_tokens=20, temperature=0, logprobs=0)
            wait([alone])  # the same log-probabilities as prefilled and decoded alone (positions, mask)
            assert [e[0] for e in c.done[0].logprobs] == [e[0] for e in alone.done[0].logprobs]
            assert torch.allclose(torch.tensor([e[1] for e in c.done[0].logprobs]),
                                  torch.tensor([e[1] for e in alone.done[0].logprobs]), atol=1e-5)
        assert [r.text for r in pair.done] == [refs[PROMPTS[4]].text] * 2 + [refs[PROMPTS[5]].text] * 2
        assert running.done[0].text == running_ref.text
        assert idle(sched)
    finally:
        handle.remove()
        sched.stop(5)


def test_the_prefill_cap_spreads_admission_over_steps(tiny):
    # prefill_tokens_per_step bounds one step's prefill (prompts x the widest, padding counted):
    # a burst is admitted over several steps, the running row decoding a token between two of
    # them, a prompt over the cap alone, and the text is unchanged
    model, tok = tiny
    refs = {p: reference(model, tok, p) for p in PROMPTS}
    shapes, handle = prefill_shapes(model)
    cap = 24
    sched = Scheduler(model, tok, max_rows=16, prefill_tokens_per_step=cap)
    at_step = []
    stepped = model.register_forward_pre_hook(
        lambda m, a, kw: at_step.append(sched.steps) if kw["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    try:
        running = running_job(sched, tok)
        del shapes[:], at_step[:]
        with sched._lock:
            jobs = [submit(sched, tok, [p], max_tokens=20, temperature=0) for p in PROMPTS]
        wait(jobs + [running])
        assert len(shapes) > 2 and sum(b for b, _ in shapes) == len(PROMPTS)
        assert all(b * w <= cap or b == 1 for b, w in shapes) and max(b for b, _ in shapes) > 1
        assert all(a < b for a, b in zip(at_step, at_step[1:]))  # a step between two prefills
        assert (1, len(prompt_ids(tok, "x" * 30))) in shapes  # over the cap: alone
        for c, p in zip(jobs, PROMPTS):
            assert c.done[0].text == refs[p].text
    finally:
        stepped.remove()
        handle.remove()
        sched.stop(5)


def test_a_failing_shared_prefill_is_retried_request_by_request(tiny):
    model, tok = tiny
    refs = {p: reference(model, tok, p) for p in PROMPTS[:4]}
    bad = tok.convert_tokens_to_ids("!")
    shapes, handle = prefill_shapes(model)

    def hook(module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1 and bool((ids == bad).any()):
            raise torch.OutOfMemoryError("injected prefill failure")

    failing = model.register_forward_pre_hook(hook, with_kwargs=True)
    sched = Scheduler(model, tok, max_rows=16)
    try:
        running = running_job(sched, tok)
        del shapes[:]
        with sched._lock:
            jobs = {p: submit(sched, tok, [p], max_tokens=20, temperature=0) for p in PROMPTS[:2]}
            jobs["bad!"] = submit(sched, tok, ["bad!"], max_tokens=20, temperature=0)
            jobs.update({p: submit(sched, tok, [p], max_tokens=20, temperature=0) for p in PROMPTS[2:4]})
        wait(list(jobs.values()) + [running])
        assert shapes[0][0] == 5 and [b for b, _ in shapes[1:]] == [1] * 5  # shared, then one by one
        assert jobs["bad!"].error[0] == 500 and "injected prefill" in jobs["bad!"].error[1]
        for p in PROMPTS[:4]:
            assert jobs[p].error is None and jobs[p].done[0].text == refs[p].text
        assert running.error is None and idle(sched) and sched.alive
    finally:
        failing.remove()
        handle.remove()
        sched.stop(5)


def test_a_padded_prefill_cache_keeps_nothing_from_its_padding():
    # the attention weighs padding by exactly 0, but 0 x NaN is NaN: padding columns are zeroed
    from types import SimpleNamespace

    from metareason.serving.kv import RowsKV

    k = torch.randn(2, 1, 3, 4)
    k[0, :, 0] = float("nan")
    kv = RowsKV.from_prefill(SimpleNamespace(layers=[SimpleNamespace(keys=k, values=k.clone())]),
                             torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert torch.isfinite(kv.k[0]).all() and torch.isfinite(kv.v[0]).all()
    assert torch.equal(kv.k[0][0, :, 1:], k[0, :, 1:]) and torch.equal(kv.k[0][1], k[1])

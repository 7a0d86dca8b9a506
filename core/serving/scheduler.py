"""Continuous batching: one worker thread decodes every running row one token per step and,
between steps, admits waiting requests and retires finished rows.

A request (:class:`Job`) is prompts (token ids) x ``n`` samples with its own :class:`Params`.
Between two steps, the requests admitted together are prefilled in one forward: their prompts
left-padded to the longest, with the attention mask and position ids of ``metareason eval``'s
batched prefill; each row's first token is chosen and the rows (a prompt's cache copied for each
of its ``n`` samples) are appended to the running batch's cache
(:class:`metareason.serving.kv.RowsKV`). ``prefill_tokens_per_step`` caps that forward (prompts x
the longest prompt, padding included) so the running rows wait at most one bounded prefill per
step; a request over the cap by itself is prefilled alone, whole. A request that scores its prompt
(``echo``: every position's logits) is prefilled alone. A step runs all rows through one forward
(:class:`metareason.generation.decode_step.DecodeStep` for Llama-family models, else the model's own
forward) with each row's own position and padding mask, then chooses each row's token with its
own parameters (:mod:`metareason.serving.sampling`). Rows end on EOS (or a generated pad token,
as :func:`metareason.generation.generate.generate_batch` cuts there), a stop string, ``max_tokens`` or the
client going away, and leave the batch at once.

Results go out as events through the job's ``on_event(kind, payload)`` (called on the worker
thread): ``("token", (choice, text, logprob))`` as text becomes final (a tail that could still
be the start of a stop string is held back), ``("done", RowResult)`` per row, and
``("error", (status, message))`` once when the request fails. Failures are the request's own:
an exception while choosing or detokenising for a row fails that row's request; a shared
prefill or a step forward that raises (an out-of-memory included) is retried request by request,
so only the request whose rows make it fail gets the error.

Admission is bounded by tokens: a job reserves ``n x (prompt + max_tokens)`` per prompt from the
server's budget until it ends; over the budget (or with ``max_queue`` requests waiting) ``submit``
raises :class:`Busy` with a retry delay estimated from the recent token rate.
"""
from __future__ import annotations

import inspect
import math
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from metareason.generation.decode import decoder_model, resolve
from metareason.generation.decode_step import DecodeStep
from metareason.models.compat import CACHE_KWARG
from metareason.serving import sampling
from metareason.serving.detok import Detokenizer
from metareason.serving.kv import RowsKV


class Busy(RuntimeError):
    """Over the token budget or the queue bound (the server answers 429 with ``Retry-After``)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Stopped(RuntimeError):
    """The scheduler is shutting down (the server answers 503)."""


@dataclass(frozen=True)
class Params:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below sampling.MIN_TEMPERATURE): greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    logprobs: Optional[int] = None  # None: none; k >= 0: the chosen token's and the top k
    prompt_logprobs: bool = False  # every prompt token's log-probability (completions' echo)


@dataclass
class RowResult:
    index: int  # choice index in the response: prompt_index * n + sample_index
    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: Optional[list[tuple[int, float, list[tuple[int, float]]]]] = None  # (token, logprob, top)
    prompt_ids: list[int] = field(default_factory=list)
    prompt_logprobs: Optional[list] = None  # (logprob, top) per prompt token, None first


class Job:
    """One request: ``prompts`` (token ids) x ``n`` rows, answered through ``on_event``."""

    def __init__(self, prompts: list[list[int]], n: int, params: Params,
                 on_event: Callable[[str, Any], None]):
        self.prompts, self.n, self.params, self.on_event = prompts, n, params, on_event
        self.rows = len(prompts) * n
        self.tokens = n * sum(len(p) + params.max_tokens for p in prompts)
        self.cancelled = False  # set by the server when the client goes away
        self.failed = False
        self.finished_rows = 0
        self.released = False

    def cancel(self) -> None:
        self.cancelled = True


class _Row:
    __slots__ = ("job", "index", "prompt_index", "sample_index", "prompt_ids", "ids", "detok", "pos", "sent",
                 "logprobs", "prompt_logprobs", "finished", "generator")

    def __init__(self, job: Job, prompt_index: int, sample_index: int, prompt_ids: list[int], tokenizer,
                 generator: Optional[torch.Generator]):
        self.job, self.prompt_index, self.sample_index = job, prompt_index, sample_index
        self.index = prompt_index * job.n + sample_index
        self.prompt_ids, self.ids, self.detok = prompt_ids, [], Detokenizer(tokenizer)
        self.pos = len(prompt_ids)  # the position of the token the next step feeds
        self.sent = 0  # characters of detok.text sent as events
        self.logprobs = [] if job.params.logprobs is not None else None
        self.prompt_logprobs = None
        self.finished = False
        self.generator = generator


class Scheduler:
    def __init__(self, model, tokenizer, *, max_rows: int = 32, max_queue: int = 256, token_budget: int = 65536,
                 prefill_tokens_per_step: int = 4096, start: bool = True):
        module = decoder_model(model)
        if module is None:
            raise ValueError(f"{type(model).__name__}: the continuous batcher runs decoder-only transformers "
                             f"with a dynamic KV cache; this model's generation path differs")
        self.model, self.tokenizer = module, tokenizer
        model.eval()
        base = dict(max_new_tokens=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    use_cache=True)
        greedy = resolve(module, do_sample=False, temperature=None, top_p=None, top_k=None, **base)
        sampled = resolve(module, do_sample=True, temperature=1.0, top_p=1.0, **base)
        if greedy is None or sampled is None:
            raise ValueError(f"{type(model).__name__}: its generation config asks for decoding the continuous "
                             f"batcher does not implement (beams, penalties, ...)")
        self.eos = set(greedy.eos)
        pad = tokenizer.pad_token_id
        self.pad_ends = pad is not None and pad not in self.eos  # generate_batch cuts the text at a pad token
        self.pad = pad
        self.suppress = list(greedy.suppress_tokens)
        self.top_k = sampled.top_k
        params = inspect.signature(module.forward).parameters
        self.takes_positions, self.takes_keep = "position_ids" in params, "logits_to_keep" in params
        self.fast = DecodeStep.build(module) if self.takes_positions else None
        self.device = next(module.parameters()).device
        self.max_rows, self.max_queue, self.token_budget = max_rows, max_queue, token_budget
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.rng = torch.Generator(device=self.device).manual_seed(int.from_bytes(os.urandom(8), "little"))

        self._lock = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.rows: list[_Row] = []
        self.kv: Optional[RowsKV] = None
        self.reserved = 0  # budget tokens held by waiting and running jobs
        self.draining = False  # no new jobs; waiting ones are refused
        self.aborting = False  # running ones are failed too
        self.steps = 0
        self.prefills = 0  # prefill forwards (one per admission round, more when one was retried)
        self.tokens_out = 0
        self.jobs_done = 0
        self._rate = (time.monotonic(), 0)  # token rate sample for Retry-After
        self.tokens_per_s = 0.0
        self._thread = threading.Thread(target=self._loop, name="continuous-batching", daemon=True)
        if start:
            self._thread.start()

    # ------------------------------------------------------------------ the server's side
    def submit(self, job: Job) -> None:
        """Queue ``job`` (raises :class:`Busy` or :class:`Stopped`)."""
        if job.rows > self.max_rows:
            raise ValueError(f"{job.rows} rows (prompts x n) exceed the batch of {self.max_rows}")
        if job.tokens > self.token_budget:
            raise ValueError(f"{job.tokens} tokens (prompt + max_tokens, x n) exceed the server's budget of "
                             f"{self.token_budget}")
        with self._lock:
            if self.draining:
                raise Stopped("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise Busy(f"request queue full ({len(self.waiting)} waiting)", self._retry_after(job.tokens))
            if self.reserved + job.tokens > self.token_budget:
                raise Busy(f"token budget exhausted ({self.reserved} of {self.token_budget} tokens in flight, "
                           f"this request needs {job.tokens})", self._retry_after(self.reserved + job.tokens
                                                                                   - self.token_budget))
            self.reserved += job.tokens
            self.waiting.append(job)
            self._lock.notify()

    def _retry_after(self, tokens: int) -> int:
        rate = self.tokens_per_s or 50.0
        return int(min(60, max(1, math.ceil(tokens / rate))))

    def stats(self) -> dict:
        return {"running_rows": len(self.rows), "waiting_requests": len(self.waiting),
                "reserved_tokens": self.reserved, "token_budget": self.token_budget, "steps": self.steps,
                "completion_tokens": self.tokens_out, "requests_done": self.jobs_done}

    def begin_shutdown(self) -> None:
        """Refuse new jobs and fail the waiting ones; running rows go on (safe in a signal handler:
        it only sets a flag the worker reads)."""
        self.draining = True

    def stop(self, grace_s: float = 10.0) -> None:
        """Drain: waiting jobs fail at once, running rows get ``grace_s`` to finish, then fail."""
        self.draining = True
        with self._lock:
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(grace_s)
        self.aborting = True
        if self._thread.is_alive():
            self._thread.join(30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        while True:
            try:
                if not self._iteration():
                    return
            except Exception as exc:  # noqa: BLE001 - never let the worker die: fail what is running
                print(f"[serve] scheduler error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                for job in {id(r.job): r.job for r in self.rows}.values():
                    self._fail(job, 500, f"generation failed: {type(exc).__name__}")
                self.rows, self.kv = [], None

    def _iteration(self) -> bool:
        """One round (admit, retire, step); False when drained and nothing is left."""
        with self._lock:
            if self.draining:
                while self.waiting:
                    self._fail(self.waiting.popleft(), 503, "the server is shutting down")
                if self.aborting:
                    for job in {id(r.job): r.job for r in self.rows}.values():
                        self._fail(job, 503, "the server is shutting down")
                    self._retire()
                if not self.rows:
                    return False
            for job in [j for j in self.waiting if j.cancelled]:
                self.waiting.remove(job)
                self._release(job)
            admit, rows, prompts, width = [], len(self.rows), 0, 0
            while self.waiting and rows + self.waiting[0].rows <= self.max_rows:
                job = self.waiting[0]
                w = max(width, max(map(len, job.prompts)))
                if admit and (prompts + len(job.prompts)) * w > self.prefill_tokens_per_step:
                    break  # the padded prefill would pass the cap: the rest waits for the next step
                admit.append(self.waiting.popleft())
                rows, prompts, width = rows + job.rows, prompts + len(job.prompts), w
            if not admit and not self.rows:
                self._lock.wait(0.05)
                return True
        if admit:
            self._admit(admit)
        self._retire()
        if self.rows:
            self._step()
            self._retire()
        return True

    def _release(self, job: Job) -> None:
        if not job.released:
            job.released = True
            with self._lock:
                self.reserved -= job.tokens
            self.jobs_done += 1

    def _fail(self, job: Job, status: int, message: str) -> None:
        if not job.failed and not job.released:
            job.failed = True
            try:
                job.on_event("error", (status, message))
            except Exception:  # noqa: BLE001 - the client side is gone
                pass
        for r in self.rows:
            if r.job is job:
                r.finished = True
        self._release(job)

    def _retire(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not (r.finished or r.job.cancelled or r.job.failed)]
        for r in self.rows:
            if r.job.cancelled and not r.job.released:
                self._release(r.job)
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.kv = None
        else:
            self.kv.keep(keep)

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the admitted jobs' prompts together, choose their rows' first tokens and add
        the live rows to the batch. A job that scores its prompt (``prompt_logprobs``: the logits
        of every position) is prefilled alone. When the shared forward raises (an out-of-memory
        included) each job is retried alone, so the failure stays the failing request's."""
        together = [j for j in jobs if not j.params.prompt_logprobs]
        groups = [[j] for j in jobs if j.params.prompt_logprobs]
        if len(together) > 1:
            try:
                self._admit_group(together)
            except Exception as exc:  # noqa: BLE001 - find whose prompts make it fail
                print(f"[serve] batched prefill failed ({type(exc).__name__}: {exc}); retrying request by request",
                      file=sys.stderr, flush=True)
                groups = [[j] for j in together] + groups
        elif together:
            groups.insert(0, together)
        for group in groups:
            try:
                self._admit_group(group)
            except Exception as exc:  # noqa: BLE001 - this request's failure only
                print(f"[serve] prefill failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                for job in group:
                    self._fail(job, 500, f"generation failed: {type(exc).__name__}: {exc}"[:300])

    @torch.inference_mode()
    def _admit_group(self, jobs: list[Job]) -> None:
        """One prefill forward for every prompt of ``jobs``; raises (having changed nothing) when
        it fails. Choosing a job's first tokens fails only that job."""
        for job in jobs:
            if job.cancelled or job.failed:
                self._release(job)
        jobs = [j for j in jobs if not (j.cancelled or j.failed)]
        prompts = [ids for job in jobs for ids in job.prompts]
        if not prompts:
            return
        logits, kv = self._prefill(prompts, all_logits=any(j.params.prompt_logprobs for j in jobs))
        self.prefills += 1
        rows, source, b = [], [], 0
        for job in jobs:
            try:
                got = self._first_tokens(job, logits[b: b + len(job.prompts)], [len(p) for p in job.prompts])
            except Exception as exc:  # noqa: BLE001 - this request's failure only
                print(f"[serve] prefill failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                self._fail(job, 500, f"generation failed: {type(exc).__name__}: {exc}"[:300])
                got = []
            if not job.failed:
                rows.extend(r for r, _ in got)
                source.extend(b + pi for _, pi in got)
            b += len(job.prompts)
        if not rows:
            return
        try:  # first tokens are out: from here a failure fails these jobs, it is not retried
            kv.keep(source)  # a prompt's cache row once per live sample
            if self.kv is None:
                self.kv = kv
            else:
                self.kv.add(kv)
        except Exception as exc:  # noqa: BLE001 - add allocates before it changes the running cache
            print(f"[serve] admission failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            for job in {id(r.job): r.job for r in rows}.values():
                self._fail(job, 500, f"generation failed: {type(exc).__name__}: {exc}"[:300])
            return
        self.rows.extend(rows)

    def _first_tokens(self, job: Job, logits: torch.Tensor, lengths: list[int]) -> list[tuple[_Row, int]]:
        """``job``'s rows with their first token chosen from its prompts' prefill ``logits``
        (``[prompts, V]``, or ``[prompts, W, V]`` left-padded with ``prompt_logprobs``), as
        ``(row, prompt index)`` for the rows still live."""
        p = job.params
        generator = torch.Generator(device=self.device).manual_seed(p.seed % 2 ** 64) if p.seed is not None else None
        live = []
        for pi, ids in enumerate(job.prompts):
            rows = [_Row(job, pi, j, ids, self.tokenizer, generator) for j in range(job.n)]
            last = logits[pi]
            if p.prompt_logprobs:
                positions = logits[pi, logits.shape[1] - lengths[pi]:]
                plp = sampling.prompt_logprobs(positions, ids, p.logprobs or 0)
                for r in rows:
                    r.prompt_logprobs = plp
                last = positions[-1]
            if p.max_tokens == 0:  # echo only: score the prompt, generate nothing
                for r in rows:
                    self._finish(r, "length")
                continue
            self._choose(rows, last[None].float().expand(job.n, -1))
            live.extend((r, pi) for r in rows if not r.finished)
        return live

    def _prefill(self, prompts: list[list[int]], all_logits: bool) -> tuple[torch.Tensor, RowsKV]:
        """``(logits, cache)`` of ``prompts`` prefilled together, left-padded to the longest, with
        the attention mask and position ids ``metareason eval``'s batched prefill gives the model
        (a batch of one prompt is exactly its prefill alone): the last position's logits
        ``[B, V]``, or every position's ``[B, W, V]`` with ``all_logits``."""
        from transformers import DynamicCache

        config = self.model.config
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        cache = DynamicCache(config=config)
        width = max(map(len, prompts))
        x = torch.full((len(prompts), width), self.pad if self.pad is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, ids in enumerate(prompts):
            x[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[i, width - len(ids):] = 1
        x, mask = x.to(self.device), mask.to(self.device)
        padded = not bool(mask.all())
        kwargs: dict[str, Any] = {CACHE_KWARG: cache, "use_cache": True}
        if padded:  # generate drops an all-ones mask
            kwargs["attention_mask"] = mask
        if self.takes_keep:
            kwargs["logits_to_keep"] = 0 if all_logits else 1
        if self.takes_positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = self.model(input_ids=x, return_dict=True, **kwargs)
        got = getattr(out, CACHE_KWARG, None)
        got = got if got is not None else getattr(out, "past_key_values", cache)
        logits = out.logits if all_logits else out.logits[:, -1]
        return logits, RowsKV.from_prefill(got, mask)

    def _forward(self, kv: RowsKV, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cache, mask = kv.step_cache()
        if self.fast is not None:
            logits = self.fast(ids, cache, pos, mask)
        else:
            kwargs: dict[str, Any] = {CACHE_KWARG: cache, "use_cache": True, "attention_mask": mask}
            if self.takes_keep:
                kwargs["logits_to_keep"] = 1
            if self.takes_positions:
                kwargs["position_ids"] = pos
            logits = self.model(input_ids=ids, return_dict=True, **kwargs).logits
        return logits[:, -1].float()

    @torch.inference_mode()
    def _step(self) -> None:
        rows = self.rows
        ids = torch.tensor([[r.ids[-1]] for r in rows], dtype=torch.long, device=self.device)
        pos = torch.tensor([[r.pos] for r in rows], dtype=torch.long, device=self.device)
        try:
            logits = self._forward(self.kv, ids, pos)
        except Exception as exc:  # noqa: BLE001 - find whose rows make it fail: one request at a time
            print(f"[serve] batched step failed ({type(exc).__name__}: {exc}); retrying request by request",
                  file=sys.stderr, flush=True)
            logits = None
            groups: dict[int, list[int]] = {}
            for i, r in enumerate(rows):
                groups.setdefault(id(r.job), []).append(i)
            for idx in groups.values():
                job = rows[idx[0]].job
                try:
                    sub = self.kv.subset(idx)
                    part = self._forward(sub, ids[idx], pos[idx])
                    self.kv.take_column(idx, sub)
                except Exception as exc2:  # noqa: BLE001
                    print(f"[serve] request failed: {type(exc2).__name__}: {exc2}", file=sys.stderr, flush=True)
                    self._fail(job, 500, f"generation failed: {type(exc2).__name__}: {exc2}"[:300])
                    continue
                if logits is None:
                    logits = part.new_zeros(len(rows), part.shape[-1])
                logits[idx] = part
            if logits is None:
                self.kv.commit()
                return
        self.kv.commit()
        self.steps += 1
        for r in rows:
            r.pos += 1
        self._choose([r for r in rows if not r.finished], logits[[i for i, r in enumerate(rows) if not r.finished]])
        now = time.monotonic()
        t0, n0 = self._rate
        if now - t0 > 1.0:
            self.tokens_per_s = (self.tokens_out - n0) / (now - t0)
            self._rate = (now, self.tokens_out)

    def _choose(self, rows: list[_Row], scores: torch.Tensor) -> None:
        """Choose each row's next token from its ``scores`` row and take it."""
        if not rows:
            return
        if self.suppress:
            scores = scores.clone()
            scores[:, self.suppress] = -float("inf")
        tokens = sampling.choose(scores, [r.job.params.temperature for r in rows],
                                 [r.job.params.top_p for r in rows], [r.generator for r in rows], self.rng, self.top_k)
        want = [i for i, r in enumerate(rows) if r.logprobs is not None]
        lps = dict(zip(want, sampling.logprobs(scores, want, tokens, max(rows[i].job.params.logprobs for i in want))))\
            if want else {}
        for i, r in enumerate(rows):
            try:
                self._take(r, tokens[i], lps.get(i))
            except Exception as exc:  # noqa: BLE001 - this request's failure only
                print(f"[serve] row failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                self._fail(r.job, 500, f"generation failed: {type(exc).__name__}: {exc}"[:300])

    def _take(self, r: _Row, token: int, lp) -> None:
        if r.finished or r.job.failed or r.job.cancelled:
            return
        p = r.job.params
        if token in self.eos or (self.pad_ends and token == self.pad):
            self._finish(r, "stop")
            return
        r.ids.append(token)
        self.tokens_out += 1
        entry = None
        if lp is not None:
            entry = (token, lp[0], lp[1][: p.logprobs])
            r.logprobs.append(entry)
        r.detok.push(token)
        text = r.detok.text
        if p.stop:
            longest = max(map(len, p.stop))
            window = text[max(0, r.sent - longest):]
            if any(s in window for s in p.stop):
                self._finish(r, "stop")
                return
            safe = len(text) - (longest - 1)
        else:
            safe = len(text)
        piece = ""
        if safe > r.sent:
            piece, r.sent = text[r.sent: safe], safe
        r.job.on_event("token", (r.index, piece, entry))
        if len(r.ids) >= p.max_tokens:
            self._finish(r, "length")

    def _finish(self, r: _Row, reason: str) -> None:
        p = r.job.params
        text = self.tokenizer.decode(r.ids, skip_special_tokens=False) if r.ids else ""
        if p.stop:
            cut = min((i for i in (text.find(s) for s in p.stop) if i != -1), default=-1)
            if cut != -1:
                text, reason = text[:cut], "stop"
        sent = r.detok.text[: r.sent]
        r.finished = True
        if len(text) > len(sent) and text.startswith(sent):  # the held-back tail, or what piecewise decoding missed
            r.job.on_event("token", (r.index, text[len(sent):], None))
        r.job.on_event("done", RowResult(r.index, r.prompt_index, r.sample_index, text, list(r.ids), reason,
                                         len(r.prompt_ids), len(r.ids), r.logprobs, r.prompt_ids,
                                         r.prompt_logprobs))
        r.job.finished_rows += 1
        if r.job.finished_rows == r.job.rows:
            self._release(r.job)

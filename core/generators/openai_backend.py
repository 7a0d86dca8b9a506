"""``type: openai``: any OpenAI-compatible endpoint (vLLM, SGLang, TGI, a hosted API,
``metareason serve``) through the official ``openai`` client.

* ``base_url`` and ``model``; the API key is read from the environment variable named by
  ``api_key_env`` (never from the config file, never logged; without one the client sends a
  placeholder, which local servers accept).
* Each (prompt, sample) is one request with ``n=1`` (exact token counts per sample; sample ``j``
  gets ``seed + j``), sent by up to ``concurrency`` threads.
* 429, 5xx, timeouts and connection errors are retried ``max_retries`` times with exponential
  backoff (``backoff`` seconds, doubling, at most ``backoff_max``, with jitter); other errors
  (400, 401, 404) fail at once with the server's message.
* A permanent failure (such an error, retries exhausted, or a malformed response) ends the
  whole ``generate`` call at once: its remaining jobs send no further request (queued ones are
  cancelled, ones waiting to retry wake and stop); requests already on the wire are left to
  finish in the background. ``close()`` does not wait for them either.
* A response is checked before use: no ``choices`` list, an empty one, a missing or non-text
  ``text`` / ``message.content``, or wrongly typed ``finish_reason`` / ``usage`` counts (or a
  body that is not JSON) is one line ``generator 'NAME': ENDPOINT: malformed response: ...``.
* Text prompts use the completions endpoint (``api: chat`` sends them as one user message);
  chat messages always use the chat endpoint.
"""
from __future__ import annotations

import os
import random
import sys
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Literal, Optional, Sequence

from pydantic import Field

from metareason.config import Section
from metareason.generators.base import Completion, Generator, GeneratorError, Prompt, check_params


class OpenAIGeneratorConfig(Section):
    type: str = "openai"
    base_url: str = Field(..., pattern=r"^https?://")
    model: str
    api_key_env: Optional[str] = None  # name of the environment variable holding the key
    api: Literal["completions", "chat"] = "completions"
    timeout: float = Field(60.0, gt=0)  # seconds per request
    max_retries: int = Field(5, ge=0)
    backoff: float = Field(0.5, gt=0)  # first retry delay, seconds
    backoff_max: float = Field(8.0, gt=0)
    concurrency: int = Field(8, gt=0)  # requests in flight at once
    extra_body: dict[str, Any] = {}  # passed through (e.g. vLLM's top_k, repetition_penalty)


class _Cancelled(Exception):
    """A job of a generate call that was stopped before sending its next request."""


class _Call:
    """The jobs of one ``generate`` call: the first permanent failure stops them all."""

    def __init__(self):
        self.stop = threading.Event()
        self.error: Optional[BaseException] = None
        self._lock = threading.Lock()

    def fail(self, error: BaseException) -> BaseException:
        with self._lock:
            if self.error is None:
                self.error = error
        self.stop.set()
        return error


class OpenAIGenerator(Generator):
    def __init__(self, cfg: OpenAIGeneratorConfig, name: str = "openai"):
        import openai

        self.cfg, self.name = cfg, name
        key = "EMPTY"
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env, "")
            if not key:
                raise GeneratorError(f"generators.{name}.api_key_env: environment variable {cfg.api_key_env} is not set")
        # retries are ours (logged, configurable); the client's own are off
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout, max_retries=0)
        self._retryable = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError,
                           openai.APITimeoutError)
        self._api_error = openai.APIError
        self._pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix=f"gen-{name}")
        self._calls: set[_Call] = set()
        self._closed = False

    @classmethod
    def from_config(cls, cfg: OpenAIGeneratorConfig, name: str) -> "OpenAIGenerator":
        return cls(cfg, name)

    def close(self) -> None:
        """Stop every job still queued or waiting to retry and return at once (requests already
        sent finish or time out in the background)."""
        self._closed = True
        for call in list(self._calls):
            call.fail(GeneratorError(f"generator {self.name!r}: closed"))
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def _endpoint(self, chat: bool) -> str:
        return self.cfg.base_url.rstrip("/") + ("/chat/completions" if chat else "/completions")

    def _job(self, call: _Call, prompt: Prompt, params: dict) -> tuple[str, str, int, int]:
        try:
            return self._request(call, prompt, params)
        except _Cancelled:
            raise
        except BaseException as exc:  # permanent: the call's other jobs stop
            raise call.fail(exc)

    def _request(self, call: _Call, prompt: Prompt, params: dict) -> tuple[str, str, int, int]:
        chat = not isinstance(prompt, str) or self.cfg.api == "chat"
        endpoint = self._endpoint(chat)
        for attempt in range(self.cfg.max_retries + 1):
            if call.stop.is_set():
                raise _Cancelled()
            try:
                if chat:
                    messages = prompt if not isinstance(prompt, str) else [{"role": "user", "content": prompt}]
                    r = self.client.chat.completions.create(model=self.cfg.model, messages=messages, **params)
                else:
                    r = self.client.completions.create(model=self.cfg.model, prompt=prompt, **params)
            except self._retryable as exc:
                if attempt == self.cfg.max_retries:
                    raise GeneratorError(f"generator {self.name!r}: {endpoint}: gave up after "
                                         f"{attempt + 1} attempts: {type(exc).__name__}: {_first_line(exc)}") from None
                delay = min(self.cfg.backoff_max, self.cfg.backoff * 2 ** attempt) * (0.75 + 0.5 * random.random())
                print(f"[generators] {self.name}: {type(exc).__name__}; retry {attempt + 1}/{self.cfg.max_retries} "
                      f"in {delay:.1f}s", file=sys.stderr)
                call.stop.wait(delay)  # a permanent failure elsewhere in the call wakes it
                continue
            except self._api_error as exc:
                raise GeneratorError(f"generator {self.name!r}: {endpoint}: {_first_line(exc)}") from None
            except ValueError as exc:  # a body that is not JSON (the client's json.loads)
                raise self._malformed(endpoint, f"not JSON ({_first_line(exc)})") from None
            return self._parse(r, chat, endpoint)
        raise AssertionError("unreachable")

    def _malformed(self, endpoint: str, why: str) -> GeneratorError:
        return GeneratorError(f"generator {self.name!r}: {endpoint}: malformed response: {why}")

    def _parse(self, r: Any, chat: bool, endpoint: str) -> tuple[str, str, int, int]:
        """(text, finish_reason, prompt tokens, completion tokens) of a checked response."""
        choices = getattr(r, "choices", None)
        if not isinstance(choices, list):
            raise self._malformed(endpoint, f"no choices list ({_kind(choices)})")
        if not choices:
            raise self._malformed(endpoint, "choices is empty")
        choice = choices[0]
        if chat:
            message = getattr(choice, "message", None)
            if message is None:
                raise self._malformed(endpoint, "choices[0].message is missing")
            text, field = getattr(message, "content", None), "choices[0].message.content"
            text = "" if text is None else text  # null content (a refusal, a tool call): no text
        else:
            text, field = getattr(choice, "text", None), "choices[0].text"
        if not isinstance(text, str):
            raise self._malformed(endpoint, f"{field} is {_kind(text)}, expected text")
        reason = getattr(choice, "finish_reason", None)
        if reason is not None and not isinstance(reason, str):
            raise self._malformed(endpoint, f"choices[0].finish_reason is {_kind(reason)}, expected text")
        counts = []
        usage = getattr(r, "usage", None)
        for key in ("prompt_tokens", "completion_tokens"):
            v = getattr(usage, key, None) if usage is not None else None
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise self._malformed(endpoint, f"usage.{key} is {_kind(v)}, expected a count")
            counts.append(v or 0)
        return text, reason or "stop", counts[0], counts[1]

    def generate(self, prompts: Sequence[Prompt], *, n: int = 1, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, stop: Optional[Sequence[str]] = None,
                 seed: Optional[int] = None) -> list[Completion]:
        stops = check_params(n, max_new_tokens, temperature, top_p, stop)
        if self._closed:
            raise GeneratorError(f"generator {self.name!r}: closed")
        call = _Call()
        self._calls.add(call)
        try:
            jobs = []
            for i, prompt in enumerate(prompts):
                for j in range(n):
                    params: dict[str, Any] = dict(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                                  n=1)
                    if stops:
                        params["stop"] = stops
                    if seed is not None:
                        params["seed"] = seed + j
                    if self.cfg.extra_body:
                        params["extra_body"] = dict(self.cfg.extra_body)
                    jobs.append((i, j, self._pool.submit(self._job, call, prompt, params)))
            wait([fut for _, _, fut in jobs], return_when=FIRST_EXCEPTION)
            if call.stop.is_set():
                for _, _, fut in jobs:
                    fut.cancel()
                raise call.error
            out = []
            for i, j, fut in jobs:
                text, reason, ptok, ctok = fut.result()
                out.append(Completion(text, ptok, ctok, "length" if reason == "length" else "stop", i, j))
            return out
        finally:
            self._calls.discard(call)


def _kind(value: Any) -> str:
    return "missing" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

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
* Text prompts use the completions endpoint (``api: chat`` sends them as one user message);
  chat messages always use the chat endpoint.
"""
from __future__ import annotations

import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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

    @classmethod
    def from_config(cls, cfg: OpenAIGeneratorConfig, name: str) -> "OpenAIGenerator":
        return cls(cfg, name)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()

    def _request(self, prompt: Prompt, params: dict) -> tuple[str, str, int, int]:
        chat = not isinstance(prompt, str) or self.cfg.api == "chat"
        for attempt in range(self.cfg.max_retries + 1):
            try:
                if chat:
                    messages = prompt if not isinstance(prompt, str) else [{"role": "user", "content": prompt}]
                    r = self.client.chat.completions.create(model=self.cfg.model, messages=messages, **params)
                    text = r.choices[0].message.content or ""
                else:
                    r = self.client.completions.create(model=self.cfg.model, prompt=prompt, **params)
                    text = r.choices[0].text
                usage = r.usage
                return (text, r.choices[0].finish_reason or "stop", usage.prompt_tokens if usage else 0,
                        usage.completion_tokens if usage else 0)
            except self._retryable as exc:
                if attempt == self.cfg.max_retries:
                    raise GeneratorError(f"generator {self.name!r}: {self.cfg.base_url}: gave up after "
                                         f"{attempt + 1} attempts: {type(exc).__name__}: {_first_line(exc)}") from None
                delay = min(self.cfg.backoff_max, self.cfg.backoff * 2 ** attempt) * (0.75 + 0.5 * random.random())
                print(f"[generators] {self.name}: {type(exc).__name__}; retry {attempt + 1}/{self.cfg.max_retries} "
                      f"in {delay:.1f}s", file=sys.stderr)
                time.sleep(delay)
            except self._api_error as exc:
                raise GeneratorError(f"generator {self.name!r}: {self.cfg.base_url}: {_first_line(exc)}") from None
        raise AssertionError("unreachable")

    def generate(self, prompts: Sequence[Prompt], *, n: int = 1, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, stop: Optional[Sequence[str]] = None,
                 seed: Optional[int] = None) -> list[Completion]:
        stops = check_params(n, max_new_tokens, temperature, top_p, stop)
        jobs = []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                params: dict[str, Any] = dict(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=1)
                if stops:
                    params["stop"] = stops
                if seed is not None:
                    params["seed"] = seed + j
                if self.cfg.extra_body:
                    params["extra_body"] = dict(self.cfg.extra_body)
                jobs.append((i, j, self._pool.submit(self._request, prompt, params)))
        out = []
        for i, j, fut in jobs:
            text, reason, ptok, ctok = fut.result()
            out.append(Completion(text, ptok, ctok, "length" if reason == "length" else "stop", i, j))
        return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

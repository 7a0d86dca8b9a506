"""What one request, and the server as a whole, may ask for (``metareason serve``'s flags).

Per request: the body's size, prompts per request, ``n``, stop strings (4, as OpenAI), rows
(prompts x n) at most the running batch, ``max_tokens`` at most ``max_tokens`` and within the
model's context; chat requests without ``max_tokens`` get ``default_max_tokens`` (bounded, not
the rest of the context), completions OpenAI's 16. Per server: a token budget, prompt plus
``max_tokens`` for every row queued or running (the scheduler's admission, 429 with
``Retry-After`` beyond it), and a bound on waiting requests.
"""
from __future__ import annotations

from dataclasses import dataclass

#: OpenAI's default max_tokens for /v1/completions
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
#: OpenAI allows at most 4 stop sequences
MAX_STOP = 4


@dataclass(frozen=True)
class Limits:
    context: int  # the model's context (prompt + completion)
    max_tokens: int  # the largest max_tokens a request may ask for
    default_max_tokens: int  # chat requests that do not say
    max_prompts: int = 32  # prompts in one /v1/completions request
    max_n: int = 8
    max_rows: int = 32  # prompts x n: at most the running batch
    max_body_bytes: int = 2 * 1024 * 1024
    token_budget: int = 65536  # prompt + max_tokens over every queued and running row
    max_queue: int = 256  # requests waiting for the batch

    @classmethod
    def defaults(cls, context: int, max_batch: int, max_tokens: int | None = None,
                 default_max_tokens: int | None = None, token_budget: int | None = None, **kw) -> "Limits":
        """Bounded defaults from the model's context: ``max_tokens`` min(context, 2048), chat's
        default min(512, that), a budget of a full batch of 2048-token rows (or of the context)."""
        limit = max_tokens or min(context, 2048)
        return cls(context=context, max_tokens=limit, default_max_tokens=min(default_max_tokens or 512, limit),
                   max_rows=max_batch, token_budget=token_budget or max_batch * min(context, 2048), **kw)

    def check(self) -> None:
        for name in ("context", "max_tokens", "default_max_tokens", "max_prompts", "max_n", "max_rows",
                     "max_body_bytes", "token_budget", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive")

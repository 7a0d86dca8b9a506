"""The OpenAI request bodies ``metareason serve`` accepts, and what it refuses.

Every field OpenAI defines for ``/v1/completions`` and ``/v1/chat/completions`` is either
implemented, accepted only at its neutral value (``logit_bias: {}``, ``best_of: 1``,
``presence_penalty: 0``, ``response_format: {"type": "text"}``, no tools, ...), or merely
informational (``user``, ``metadata``, ``store``, ``service_tier``); anything else (a different
value, an unknown field) is a 400 naming the parameter, so an evaluation harness never gets
numbers computed without what it asked for. Malformed JSON, nesting too deep for the parser, an
integer of thousands of digits, a number out of range: all a 400 naming the field.
"""
from __future__ import annotations

import json
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An OpenAI-style error answer: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 413: "invalid_request_error",
                             415: "invalid_request_error", 429: "rate_limit_error",
                             503: "service_unavailable"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


#: accepted and ignored (they do not change what is generated)
INFORMATIONAL = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}


def _neutral_response_format(v: Any) -> bool:
    return v is None or v == {"type": "text"}


#: accepted only at a value that asks for nothing this server would have to do
NEUTRAL = {
    "logit_bias": lambda v: v in (None, {}),
    "presence_penalty": lambda v: v in (None, 0, 0.0),
    "frequency_penalty": lambda v: v in (None, 0, 0.0),
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: v in (None, ""),
    "response_format": _neutral_response_format,
    "tools": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: v in (None, []),
    "function_call": lambda v: v in (None, "none"),
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None,
    "audio": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "web_search_options": lambda v: v is None,
}

SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])


class CompletionBody(_Body):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text":
                raise APIError(400, f"messages: content part type {part.type!r} is not supported (text only)",
                               param="messages")
        return "".join(p.text for p in self.content)


class ChatBody(_Body):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


def loads(raw: bytes) -> dict:
    """The body as a JSON object, or an :class:`APIError` (400) saying what is wrong with it."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"malformed JSON body: {exc}") from None
    except RecursionError:
        raise APIError(400, "malformed JSON body: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer beyond the interpreter's digit limit
        raise APIError(400, f"malformed JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    return data


def validate(data: dict, chat: bool) -> Union[ChatBody, CompletionBody]:
    """The body checked field by field (400 naming the first bad or unsupported one)."""
    try:
        body = (ChatBody if chat else CompletionBody).model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ())) or "body"
        kind = err.get("type", "")
        msg = "field required" if kind == "missing" else err.get("msg", "invalid value")
        raise APIError(400, f"{param}: {msg}", param=param.split(".")[0]) from None
    except (RecursionError, ValueError, OverflowError) as exc:
        raise APIError(400, f"invalid body: {type(exc).__name__}") from None
    for name, value in (body.model_extra or {}).items():
        if name in INFORMATIONAL:
            continue
        if name in NEUTRAL:
            if not NEUTRAL[name](value):
                raise APIError(400, f"{name}: not supported by this server (only its default is accepted)",
                               param=name)
            continue
        raise APIError(400, f"{name}: unknown or unsupported parameter", param=name)
    if chat and body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    return body

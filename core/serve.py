"""``metareason serve RUN_DIR|MODEL_DIR``: an OpenAI-compatible HTTP server for a trained model.

FastAPI + uvicorn, bound to 127.0.0.1 unless ``--host`` says otherwise. Endpoints: ``/health``,
``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (``stream: true`` answers with
server-sent events in OpenAI's chunk format). Concurrent requests are batched dynamically
(:mod:`metareason.generators.batching`); a full queue answers 429. Errors are OpenAI-style JSON
(``{"error": {"message", "type", "param", "code"}}``): 400 for a bad request (naming the field),
401 for a missing or wrong API key, 429 when busy, 503 while shutting down. SIGTERM stops
accepting connections, lets in-flight requests finish, then fails any still queued.

Streaming sends a request's completion once its batch has finished, as one chunk per token:
the framing is OpenAI's, but tokens are not delivered while they are being generated.
"""

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from metareason.errors import UserError


# ------------------------------------------------------------------------------- request models
class _Body(BaseModel):
    # fields OpenAI clients may send that this server does not use are accepted and ignored
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    seed: Optional[int] = None


class CompletionBody(_Body):
    prompt: Union[str, list[str]]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(..., min_length=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error",
                             503: "service_unavailable"}.get(status, "server_error")


# ------------------------------------------------------------------------------------- the app
class Server:
    """The model, its batching engine and the request checks (kept apart from HTTP for tests)."""

    def __init__(self, generator, model_name: str, context_length: int, max_tokens_limit: int,
                 api_key: Optional[str] = None, max_batch: int = 32, window_s: float = 0.01, max_queue: int = 256):
        from metareason.generators.batching import BatchingEngine

        self.generator, self.model_name = generator, model_name
        self.context_length, self.max_tokens_limit, self.api_key = context_length, max_tokens_limit, api_key
        self.engine = BatchingEngine(generator, max_batch=max_batch, window_s=window_s, max_queue=max_queue)

    def parse(self, raw: bytes, chat: bool):
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"malformed JSON body: {exc}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            body = (ChatBody if chat else CompletionBody).model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            param = ".".join(str(p) for p in err.get("loc", ()))
            kind = err.get("type", "")
            msg = "field required" if kind == "missing" else err.get("msg", "invalid value")
            raise APIError(400, f"{param}: {msg}", param=param) from None
        if body.model != self.model_name:
            raise APIError(400, f"model: unknown model {body.model!r} (this server serves {self.model_name!r})",
                           param="model")
        if body.max_tokens is not None and body.max_tokens > self.max_tokens_limit:
            raise APIError(400, f"max_tokens: {body.max_tokens} is over this server's limit of "
                                f"{self.max_tokens_limit}", param="max_tokens")
        return body

    def request_for(self, body) -> Any:
        from metareason.data.chat import ChatTemplateError
        from metareason.generators.batching import Request
        from metareason.generators.local import render_prompt

        if isinstance(body, ChatBody):
            prompts = [[m.model_dump() for m in body.messages]]
        else:
            prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
            if not prompts:
                raise APIError(400, "prompt: must not be empty", param="prompt")
        chat = isinstance(body, ChatBody)
        try:
            fmt = getattr(self.generator, "fmt", None)  # the run's chat format (LocalGenerator)
            lengths = [self.generator.prompt_tokens(render_prompt(self.generator.tokenizer, p, fmt)) for p in prompts]
        except ChatTemplateError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from None
        longest = max(lengths)
        if longest >= self.context_length:
            raise APIError(400, f"{'messages' if chat else 'prompt'}: {longest} tokens, the model's context is "
                                f"{self.context_length}", param="messages" if chat else "prompt")
        room = self.context_length - longest
        if body.max_tokens is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
            max_new = min(room, self.max_tokens_limit, 16 if not chat else room)
        elif longest + body.max_tokens > self.context_length:
            raise APIError(400, f"max_tokens: prompt ({longest} tokens) + max_tokens ({body.max_tokens}) exceed "
                                f"the model's context of {self.context_length}", param="max_tokens")
        else:
            max_new = body.max_tokens
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if any(not s for s in stop):
            raise APIError(400, "stop: must be non-empty strings", param="stop")
        return Request(prompts=prompts, n=body.n, max_new_tokens=max_new, temperature=body.temperature,
                       top_p=body.top_p, stop=stop, seed=body.seed)

    def check_key(self, header: Optional[str]) -> None:
        if self.api_key is None:
            return
        if not header or not header.startswith("Bearer "):
            raise APIError(401, "missing API key (Authorization: Bearer ...)")
        import hmac

        if not hmac.compare_digest(header[len("Bearer "):].encode(), self.api_key.encode()):
            raise APIError(401, "invalid API key")

    def tokens_of(self, text: str) -> list[str]:
        """The completion split at token boundaries (stream chunks); joined they give ``text``."""
        tok = self.generator.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pieces, prev = [], ""
        for k in range(1, len(ids) + 1):
            cur = tok.decode(ids[:k], skip_special_tokens=False)
            if cur.startswith(prev) and len(cur) > len(prev):
                pieces.append(cur[len(prev):])
                prev = cur
        if prev != text:  # tokenisation did not round-trip: one chunk with the rest
            pieces.append(text[len(prev):] if text.startswith(prev) else text)
        return pieces


def build_app(server: Server):
    import asyncio
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse, StreamingResponse

    from metareason.generators.batching import EngineStopped, QueueFull

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.engine.stop()

    app = FastAPI(title="metareason", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(status_code=exc.status, content={"error": {
            "message": exc.message, "type": exc.kind, "param": exc.param, "code": None}})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "batches": server.engine.batches,
                "batched_requests": server.engine.batched_requests}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        server.check_key(request.headers.get("authorization"))
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "metareason"}]}

    async def complete(request: HTTPRequest, chat: bool):
        server.check_key(request.headers.get("authorization"))
        body = server.parse(await request.body(), chat)
        req = server.request_for(body)
        try:
            fut = server.engine.submit(req)
        except QueueFull as exc:
            raise APIError(429, f"server busy: {exc}; retry later") from None
        except EngineStopped as exc:
            raise APIError(503, str(exc)) from None
        try:
            completions = await asyncio.wrap_future(fut)
        except EngineStopped as exc:
            raise APIError(503, str(exc)) from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        # one prompt_tokens per prompt, completion tokens summed over every sample
        prompt_tokens = sum(c.prompt_tokens for c in completions if c.sample_index == 0)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(c.completion_tokens for c in completions)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if body.stream:
            return StreamingResponse(_stream(completions, chat, rid, created), media_type="text/event-stream")
        if chat:
            choices = [{"index": k, "message": {"role": "assistant", "content": c.text},
                        "finish_reason": c.finish_reason, "logprobs": None} for k, c in enumerate(completions)]
            return {"id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
                    "choices": choices, "usage": usage}
        choices = [{"index": k, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                   for k, c in enumerate(completions)]
        return {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                "choices": choices, "usage": usage}

    def _stream(completions, chat, rid, created):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict) -> str:
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": server.model_name,
                                          "choices": [choice]}) + "\n\n"

        for k, c in enumerate(completions):
            if chat:
                yield event({"index": k, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            for piece in server.tokens_of(c.text):
                yield event({"index": k, "delta": {"content": piece}, "finish_reason": None} if chat
                            else {"index": k, "text": piece, "finish_reason": None, "logprobs": None})
            yield event({"index": k, "delta": {}, "finish_reason": c.finish_reason} if chat
                        else {"index": k, "text": "", "finish_reason": c.finish_reason, "logprobs": None})
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await complete(request, chat=True)

    return app


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a run directory (runs/NAME) or a Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the model id clients send (default: the directory's name)")
    p.add_argument("--checkpoint", help="run directories: a checkpoint directory (default: the latest)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--api-key-env", help="name of an environment variable holding the API key clients must send")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows per batched generate call")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long the first waiting request waits for others to share its batch")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before new ones get 429")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="the largest max_tokens a request may ask for (default: the model's context)")


def build_server(args: argparse.Namespace) -> Server:
    from pathlib import Path

    from metareason.generators.local import LocalGenerator, load_local_model

    for name in ("max_batch_size", "max_queue", "port"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise UserError(f"--{name.replace('_', '-')}: must be positive")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env: environment variable {args.api_key_env} is not set")
    model, tokenizer, _, fmt = load_local_model(args.target, args.checkpoint, args.device, args.dtype)
    config = model.config
    context = int(getattr(config, "max_position_embeddings", 0) or getattr(tokenizer, "model_max_length", 2048))
    limit = args.max_tokens or context
    generator = LocalGenerator(model, tokenizer, batch_size=args.max_batch_size, name="serve", fmt=fmt)
    return Server(generator, args.model_name or Path(args.target).resolve().name, context, limit, api_key,
                  max_batch=args.max_batch_size, window_s=args.batch_window_ms / 1000.0, max_queue=args.max_queue)


def _uvicorn_server(app, host: str, port: int):
    """uvicorn's server, except that SIGTERM/SIGINT end it with status 0 after the graceful
    shutdown (uvicorn re-raises the signal, which a supervisor reads as a crash)."""
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    return Server(config)


def run(args: argparse.Namespace) -> int:
    server = build_server(args)
    http = _uvicorn_server(build_app(server), args.host, args.port)
    print(f"[serve] {server.model_name} on http://{args.host}:{args.port}/v1 "
          f"(batch {args.max_batch_size}, window {args.batch_window_ms:g} ms, queue {args.max_queue}"
          f"{', API key required' if server.api_key else ''})", file=sys.stderr, flush=True)
    http.run()
    if not http.started:
        raise UserError(f"--port: could not serve on {args.host}:{args.port} (in use?)")
    print("[serve] stopped", file=sys.stderr, flush=True)
    return 0

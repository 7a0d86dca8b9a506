"""``metareason serve RUN_DIR|MODEL_DIR``: an OpenAI-compatible HTTP server for a trained model.

FastAPI + uvicorn over :class:`metareason.serving.scheduler.Scheduler` (continuous batching:
requests join the running batch at the next decoding step and leave it when done; tokens are
streamed as they are generated). Endpoints: ``/health``, ``/v1/models``, ``/v1/completions``
and ``/v1/chat/completions`` (``stream: true``: server-sent events in OpenAI's chunk format).

Bounded work: limits per request and a server-wide token budget (:mod:`metareason.serving.limits`;
429 with ``Retry-After`` when over it), a body-size limit (413), JSON parsing, validation and
tokenisation in worker threads (the event loop keeps answering ``/health``), and a client that
disconnects cancels its queued or running work. Safe by default: bound to 127.0.0.1, a
non-loopback ``--host`` needs ``--api-key-env`` (or ``--insecure``), ``Content-Type:
application/json`` required (415), the ``Host`` header checked against ``--allowed-host``
(DNS rebinding), ``/docs`` and ``/openapi.json`` off unless ``--docs``. Errors are OpenAI-style
JSON (:class:`metareason.serving.openai_schema.APIError`), never a plain-text 500 for bad input.
SIGTERM: waiting requests get 503 at once, running ones ``--shutdown-grace-s`` to finish, then
the process exits with status 0.
"""

import argparse
import ipaddress
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from metareason.errors import UserError
from metareason.serving.limits import COMPLETIONS_DEFAULT_MAX_TOKENS, MAX_STOP, Limits
from metareason.serving.openai_schema import APIError, loads, validate
from metareason.serving.scheduler import Busy, Job, Params, Stopped

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


@dataclass
class Prepared:
    """A checked request: what the scheduler runs and what the answer needs."""

    chat: bool
    prompts: list[list[int]]  # token ids per prompt
    prompt_texts: list[str]
    n: int
    params: Params
    stream: bool
    include_usage: bool
    echo: bool


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------------- the app
class Server:
    """The request checks and the scheduler (kept apart from HTTP for tests)."""

    def __init__(self, scheduler, tokenizer, model_name: str, limits: Limits, api_key: Optional[str] = None,
                 fmt=None, allowed_hosts: Optional[set[str]] = None, docs: bool = False, grace_s: float = 10.0):
        self.scheduler, self.tokenizer, self.model_name, self.limits = scheduler, tokenizer, model_name, limits
        self.api_key, self.fmt, self.docs, self.grace_s = api_key, fmt, docs, grace_s
        self.allowed_hosts = set(LOOPBACK_NAMES) | {"[::1]"} if allowed_hosts is None else set(allowed_hosts)
        self._token_text: dict[int, str] = {}

    # -------------------------------------------------------------- checks
    def check_key(self, header: Optional[str]) -> None:
        if self.api_key is None:
            return
        if not header or not header.startswith("Bearer "):
            raise APIError(401, "missing API key (Authorization: Bearer ...)")
        import hmac

        if not hmac.compare_digest(header[len("Bearer "):].encode(), self.api_key.encode()):
            raise APIError(401, "invalid API key")

    def host_allowed(self, host_header: Optional[str]) -> bool:
        if "*" in self.allowed_hosts:
            return True
        host = (host_header or "").strip().lower()
        if host.startswith("["):  # [::1]:8000
            host = host[: host.find("]") + 1] if "]" in host else host
        elif host.count(":") == 1:
            host = host.split(":")[0]
        return host in self.allowed_hosts or host.strip("[]") in self.allowed_hosts

    # -------------------------------------------------------------- parsing (worker threads)
    def prepare(self, raw: bytes, chat: bool) -> Prepared:
        """Parse, validate and tokenise one request body (400 naming what is wrong)."""
        from metareason.data.tokenize import prompt_ids

        body = validate(loads(raw), chat)
        lim = self.limits
        if body.model != self.model_name:
            raise APIError(400, f"model: unknown model {body.model!r} (this server serves {self.model_name!r})",
                           param="model")
        if body.n > lim.max_n:
            raise APIError(400, f"n: {body.n} is over this server's limit of {lim.max_n}", param="n")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > MAX_STOP:
            raise APIError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
        if any(not s for s in stop):
            raise APIError(400, "stop: must be non-empty strings", param="stop")
        name, max_tokens = "max_tokens", body.max_tokens
        if chat and body.max_completion_tokens is not None:
            name, max_tokens = "max_completion_tokens", body.max_completion_tokens
        if max_tokens is not None and max_tokens > lim.max_tokens:
            raise APIError(400, f"{name}: {max_tokens} is over this server's limit of {lim.max_tokens}", param=name)
        echo = not chat and body.echo
        if max_tokens == 0 and not echo:
            raise APIError(400, f"{name}: must be at least 1 (0 only with echo)", param=name)

        where = "messages" if chat else "prompt"
        if chat:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            texts = [self.render(messages)]
            prompts = [prompt_ids(self.tokenizer, texts[0])]
        else:
            raw_prompts = body.prompt
            if isinstance(raw_prompts, str):
                raw_prompts = [raw_prompts]
            elif raw_prompts and isinstance(raw_prompts[0], int):
                raw_prompts = [raw_prompts]  # one prompt as token ids
            if not raw_prompts:
                raise APIError(400, "prompt: must not be empty", param="prompt")
            if len(raw_prompts) > lim.max_prompts:
                raise APIError(400, f"prompt: {len(raw_prompts)} prompts in one request, this server's limit is "
                                    f"{lim.max_prompts}", param="prompt")
            texts, prompts = [], []
            vocab = len(self.tokenizer)
            for p in raw_prompts:
                if isinstance(p, str):
                    texts.append(p)
                    prompts.append(prompt_ids(self.tokenizer, p))
                else:
                    if any(not 0 <= t < vocab for t in p):
                        raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
                    texts.append(self.tokenizer.decode(p, skip_special_tokens=False))
                    prompts.append(list(p))
        if any(not p for p in prompts):
            raise APIError(400, f"{where}: empty (no tokens, and the tokenizer adds no BOS)", param=where)
        if len(prompts) * body.n > lim.max_rows:
            raise APIError(400, f"n: {len(prompts)} prompts x n={body.n} rows exceed this server's batch of "
                                f"{lim.max_rows}", param="n")
        longest = max(len(p) for p in prompts)
        if longest >= lim.context:
            raise APIError(400, f"{where}: {longest} tokens, the model's context is {lim.context}", param=where)
        room = lim.context - longest
        if max_tokens is None:  # completions: OpenAI's 16; chat: a bounded default, not the rest of the context
            max_tokens = min(room, COMPLETIONS_DEFAULT_MAX_TOKENS if not chat else lim.default_max_tokens)
        elif longest + max_tokens > lim.context:
            raise APIError(400, f"{name}: prompt ({longest} tokens) + {name} ({max_tokens}) exceed the model's "
                                f"context of {lim.context}", param=name)
        if chat:
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        else:
            logprobs = body.logprobs
        params = Params(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=stop,
                        seed=body.seed, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None)
        tokens = body.n * sum(len(p) + max_tokens for p in prompts)
        if tokens > lim.token_budget:
            raise APIError(400, f"{name}: the request needs {tokens} tokens (prompt + {name}, x n), over this "
                                f"server's budget of {lim.token_budget}", param=name)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Prepared(chat, prompts, texts, body.n, params, body.stream, include_usage, echo)

    def render(self, messages: list[dict]) -> str:
        from metareason.generators.local import render_prompt

        try:
            return render_prompt(self.tokenizer, messages, self.fmt)
        except Exception as exc:  # noqa: BLE001 - a template (user data) may raise anything
            raise APIError(400, f"messages: the chat template could not render them: "
                                f"{type(exc).__name__}: {exc}"[:300], param="messages") from None

    # -------------------------------------------------------------- answers
    def token_text(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def chat_logprob(self, entry) -> dict:
        token, lp, top = entry
        t = self.token_text(token)
        return {"token": t, "logprob": lp, "bytes": list(t.encode()),
                "top_logprobs": [{"token": self.token_text(i), "logprob": v, "bytes": list(self.token_text(i).encode())}
                                 for i, v in top]}

    def completion_logprobs(self, prep: Prepared, res, offset: int) -> Optional[dict]:
        """OpenAI's legacy ``logprobs`` object; with ``echo`` the prompt's tokens come first (the
        BOS this server added is not part of the prompt text, so it is left out)."""
        if prep.params.logprobs is None:
            return None
        tokens, lps, tops = [], [], []
        if prep.echo and res.prompt_logprobs is not None:
            ids, plp = res.prompt_ids, res.prompt_logprobs
            skip = 1 if ids and ids[0] == self.tokenizer.bos_token_id and \
                not prep.prompt_texts[res.prompt_index].startswith(self.tokenizer.bos_token or "\0") else 0
            for t, e in zip(ids[skip:], plp[skip:]):
                tokens.append(t)
                lps.append(None if e is None else e[0])
                tops.append(None if e is None else {self.token_text(i): v for i, v in e[1]})
        for t, lp, top in res.logprobs or []:
            tokens.append(t)
            lps.append(lp)
            tops.append({self.token_text(i): v for i, v in top})
        texts = [self.token_text(t) for t in tokens]
        offsets, at = [], 0 if prep.echo else offset
        for s in texts:
            offsets.append(at)
            at += len(s)
        return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops if prep.params.logprobs else None,
                "text_offset": offsets}


def _usage(results) -> dict:
    # prompt tokens once per prompt (as OpenAI counts them with n > 1), completion tokens of every sample
    prompt = sum(r.prompt_tokens for r in results if r.sample_index == 0)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Bridge:
    """Scheduler events (worker thread) into the event loop: every event for a stream, only the
    end of each row (or the error) otherwise."""

    def __init__(self, loop, rows: int, stream: bool):
        import asyncio

        self.loop, self.rows, self.stream = loop, rows, stream
        self.queue: asyncio.Queue = asyncio.Queue()
        self.results: list = []
        self.future = loop.create_future()

    def __call__(self, kind: str, payload: Any) -> None:
        if not self.stream and kind == "token":
            return
        try:
            self.loop.call_soon_threadsafe(self._put, kind, payload)
        except RuntimeError:  # the loop is closed: nobody is listening
            pass

    def _put(self, kind, payload):
        if self.stream:
            self.queue.put_nowait((kind, payload))
            return
        if self.future.done():
            return
        if kind == "error":
            self.future.set_exception(APIError(payload[0], payload[1]))
        else:
            self.results.append(payload)
            if len(self.results) == self.rows:
                self.future.set_result(sorted(self.results, key=lambda r: r.index))


def build_app(server: Server):
    import asyncio
    import json
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse, StreamingResponse

    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="serve-parse")

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.scheduler.stop(server.grace_s)
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="metareason", lifespan=lifespan, docs_url="/docs" if server.docs else None,
                  redoc_url=None, openapi_url="/openapi.json" if server.docs else None)

    def error_response(exc: APIError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content=exc.body(), headers=exc.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    class Guard:
        """Every request: the Host header (DNS rebinding); the docs need the key when one is set."""

        def __init__(self, app):  # starlette < 0.37 passes it as app=, later ones by position
            self.inner = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                headers = dict(scope.get("headers") or [])
                host = headers.get(b"host", b"").decode("latin-1")
                err = None
                if not server.host_allowed(host):
                    err = APIError(400, f"Host: {host!r} is not an allowed host (--allowed-host)", param="Host")
                elif server.docs and scope["path"] in ("/docs", "/openapi.json", "/docs/oauth2-redirect"):
                    try:
                        server.check_key(headers.get(b"authorization", b"").decode("latin-1") or None)
                    except APIError as exc:
                        err = exc
                if err is not None:
                    await error_response(err)(scope, receive, send)
                    return
            await self.inner(scope, receive, send)

    app.add_middleware(Guard)

    @app.get("/health")
    async def health():
        status = "draining" if server.scheduler.draining else "ok"
        return {"status": status, "model": server.model_name, **server.scheduler.stats()}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        server.check_key(request.headers.get("authorization"))
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "metareason"}]}

    async def read_body(request: HTTPRequest) -> bytes:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise APIError(415, f"Content-Type: must be application/json, got {ctype or 'none'!r}",
                           param="Content-Type")
        limit = server.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise APIError(400, "Content-Length: not a number", param="Content-Length")
            if int(declared) > limit:
                raise APIError(413, f"the body is {declared} bytes, this server's limit is {limit}")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise APIError(413, f"the body is over this server's limit of {limit} bytes")
        return bytes(raw)

    async def watch_disconnect(request: HTTPRequest, job: Job) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return

    async def complete(request: HTTPRequest, chat: bool):
        server.check_key(request.headers.get("authorization"))
        raw = await read_body(request)
        loop = asyncio.get_running_loop()
        prep = await loop.run_in_executor(pool, server.prepare, raw, chat)
        bridge = _Bridge(loop, len(prep.prompts) * prep.n, prep.stream)
        job = Job(prep.prompts, prep.n, prep.params, bridge)
        try:
            server.scheduler.submit(job)
        except Busy as exc:
            raise APIError(429, f"server busy: {exc}; retry later", headers={"Retry-After": str(exc.retry_after)}
                           ) from None
        except Stopped as exc:
            raise APIError(503, str(exc)) from None
        except ValueError as exc:
            raise APIError(400, str(exc), param="n") from None
        watcher = asyncio.ensure_future(watch_disconnect(request, job))
        created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if prep.stream:
            try:  # the first event decides the status: an error before any token is an HTTP error
                first = await _next(bridge.queue, watcher)
            except BaseException:
                job.cancel()
                watcher.cancel()
                raise
            if first is None:
                watcher.cancel()
                return JSONResponse(status_code=499, content={})
            if first[0] == "error":
                watcher.cancel()
                raise APIError(first[1][0], first[1][1])
            return StreamingResponse(_stream(prep, bridge, job, watcher, first, rid, created),
                                     media_type="text/event-stream")
        try:
            done, _ = await asyncio.wait({bridge.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not bridge.future.done():
                job.cancel()
            watcher.cancel()
        if bridge.future not in done:
            return JSONResponse(status_code=499, content={})  # the client is gone; nobody reads this
        results = bridge.future.result()
        body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": server.model_name, "usage": _usage(results)}
        if chat:
            body["choices"] = [{"index": r.index, "message": {"role": "assistant", "content": r.text},
                                "finish_reason": r.finish_reason,
                                "logprobs": None if r.logprobs is None else
                                {"content": [server.chat_logprob(e) for e in r.logprobs], "refusal": None}}
                               for r in results]
        else:
            body["choices"] = []
            for r in results:
                prefix = prep.prompt_texts[r.prompt_index] if prep.echo else ""
                body["choices"].append({"index": r.index, "text": prefix + r.text, "finish_reason": r.finish_reason,
                                        "logprobs": server.completion_logprobs(prep, r, 0)})
        return body

    async def _next(queue: asyncio.Queue, watcher):
        """The next event, or ``None`` when the client went away first."""
        if not queue.empty():
            return queue.get_nowait()
        get = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        return None

    async def _stream(prep: Prepared, bridge: _Bridge, job: Job, watcher, first, rid, created):
        obj = "chat.completion.chunk" if prep.chat else "text_completion"
        started: set[int] = set()
        results: list = []
        offsets: dict[int, int] = {}

        def event(choices: list, **extra) -> str:
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": server.model_name,
                                          "choices": choices, **extra}) + "\n\n"

        def opening(index: int) -> list[str]:
            if index in started:
                return []
            started.add(index)
            if prep.chat:
                return [event([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}])]
            if prep.echo:
                text = prep.prompt_texts[index // prep.n]
                offsets[index] = len(text)
                return [event([{"index": index, "text": text, "logprobs": None, "finish_reason": None}])]
            return []

        try:
            item = first
            while item is not None:
                kind, payload = item
                if kind == "error":
                    yield "data: " + json.dumps(APIError(payload[0], payload[1]).body()) + "\n\n"
                    break
                if kind == "token":
                    index, piece, entry = payload
                    for e in opening(index):
                        yield e
                    if piece or entry is not None:
                        if prep.chat:
                            lp = None if entry is None or prep.params.logprobs is None else \
                                {"content": [server.chat_logprob(entry)], "refusal": None}
                            yield event([{"index": index, "delta": {"content": piece}, "logprobs": lp,
                                          "finish_reason": None}])
                        else:
                            lp = None
                            if entry is not None and prep.params.logprobs is not None:
                                t = server.token_text(entry[0])
                                lp = {"tokens": [t], "token_logprobs": [entry[1]],
                                      "top_logprobs": [{server.token_text(i): v for i, v in entry[2]}],
                                      "text_offset": [offsets.get(index, 0)]}
                            offsets[index] = offsets.get(index, 0) + len(piece)
                            yield event([{"index": index, "text": piece, "logprobs": lp, "finish_reason": None}])
                else:  # done
                    res = payload
                    results.append(res)
                    for e in opening(res.index):
                        yield e
                    yield event([{"index": res.index, "delta": {}, "logprobs": None,
                                  "finish_reason": res.finish_reason} if prep.chat else
                                 {"index": res.index, "text": "", "logprobs": None,
                                  "finish_reason": res.finish_reason}])
                    if len(results) == bridge.rows:
                        if prep.include_usage:
                            yield event([], usage=_usage(results))
                        break
                item = await _next(bridge.queue, watcher)
            yield "data: [DONE]\n\n"
        finally:
            if len(results) < bridge.rows:
                job.cancel()
            watcher.cancel()

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
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; any other needs --api-key-env "
                        "or --insecure)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the model id clients send (default: the directory's name)")
    p.add_argument("--checkpoint", help="run directories: a checkpoint directory (default: the latest)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--api-key-env", help="name of an environment variable holding the API key clients must send")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key (anyone who can reach it can use it)")
    p.add_argument("--allowed-host", action="append", default=[],
                   help="a Host header value to accept besides the loopback names and --host (repeatable; "
                        "'*' accepts any)")
    p.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (behind the API key if set)")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows (prompts x n) decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before new ones get 429")
    p.add_argument("--prefill-tokens-per-step", type=int, default=4096,
                   help="the most prompt tokens (prompts x the longest, padding included) prefilled together "
                        "between two decoding steps; more waits for the next step (a request over it goes alone)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="the largest max_tokens a request may ask for (default: min(context, 2048))")
    p.add_argument("--default-max-tokens", type=int, default=512,
                   help="max_tokens of chat requests that do not say (capped by --max-tokens; completions: 16)")
    p.add_argument("--max-tokens-in-flight", type=int, default=None,
                   help="token budget: prompt + max_tokens over every queued and running row, beyond which "
                        "requests get 429 (default: max-batch-size x min(context, 2048))")
    p.add_argument("--max-prompts", type=int, default=32, help="prompts in one /v1/completions request")
    p.add_argument("--max-n", type=int, default=8, help="the largest n a request may ask for")
    p.add_argument("--max-body-kb", type=int, default=2048, help="the largest request body, in KiB")
    p.add_argument("--shutdown-grace-s", type=float, default=10.0,
                   help="on SIGTERM, how long running requests may go on before they are failed")


def server_limits(args: argparse.Namespace, context: int) -> Limits:
    limits = Limits.defaults(context, args.max_batch_size, max_tokens=args.max_tokens,
                             default_max_tokens=args.default_max_tokens, token_budget=args.max_tokens_in_flight,
                             max_prompts=args.max_prompts, max_n=args.max_n, max_body_bytes=args.max_body_kb * 1024,
                             max_queue=args.max_queue)
    try:
        limits.check()
    except ValueError as exc:
        raise UserError(f"--{str(exc).replace('_', '-')}") from None
    return limits


def check_exposure(args: argparse.Namespace) -> None:
    if not is_loopback(args.host) and not args.api_key_env and not args.insecure:
        raise UserError(f"--host: {args.host} is reachable from other machines; refusing to serve it without "
                        f"--api-key-env (or pass --insecure to allow anyone who can reach it)")


def build_server(args: argparse.Namespace) -> Server:
    from pathlib import Path

    from metareason.generators.local import load_local_model
    from metareason.serving.scheduler import Scheduler

    for name in ("max_batch_size", "max_queue", "prefill_tokens_per_step", "port"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise UserError(f"--{name.replace('_', '-')}: must be positive")
    check_exposure(args)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env: environment variable {args.api_key_env} is not set")
    model, tokenizer, _, fmt = load_local_model(args.target, args.checkpoint, args.device, args.dtype)
    config = model.config
    context = int(getattr(config, "max_position_embeddings", 0) or getattr(tokenizer, "model_max_length", 2048))
    limits = server_limits(args, context)
    if args.max_tokens is not None and args.max_tokens > context:
        raise UserError(f"--max-tokens: {args.max_tokens} is over the model's context of {context}")
    try:
        scheduler = Scheduler(model, tokenizer, max_rows=args.max_batch_size, max_queue=args.max_queue,
                              token_budget=limits.token_budget, prefill_tokens_per_step=args.prefill_tokens_per_step)
    except ValueError as exc:
        raise UserError(f"{args.target}: {exc}") from None
    hosts = set(LOOPBACK_NAMES) | {"[::1]"} | {h.lower() for h in args.allowed_host}
    wildcard = args.host in ("0.0.0.0", "::")
    if not wildcard:
        hosts.add(args.host.lower())
    elif api_key and not args.allowed_host:
        hosts.add("*")  # any address of this machine; the key keeps browsers' rebinding out
    return Server(scheduler, tokenizer, args.model_name or Path(args.target).resolve().name, limits, api_key,
                  fmt=fmt, allowed_hosts=hosts, docs=args.docs, grace_s=args.shutdown_grace_s)


def _uvicorn_server(app, host: str, port: int, on_exit=None, grace_s: float = 10.0):
    """uvicorn's server, except that SIGTERM/SIGINT end it with status 0 after the graceful
    shutdown (uvicorn re-raises the signal, which a supervisor reads as a crash), and that
    ``on_exit`` runs first (the scheduler refuses what waits and starts its grace period)."""
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

        def handle_exit(self, sig, frame):
            if on_exit is not None:
                on_exit()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace_s + 5)
    return Server(config)


def run(args: argparse.Namespace) -> int:
    server = build_server(args)
    sched = server.scheduler

    def on_exit():
        if not sched.draining:
            sched.begin_shutdown()
            timer = threading.Timer(server.grace_s, lambda: setattr(sched, "aborting", True))
            timer.daemon = True
            timer.start()

    http = _uvicorn_server(build_app(server), args.host, args.port, on_exit, server.grace_s)
    lim = server.limits
    print(f"[serve] {server.model_name} on http://{args.host}:{args.port}/v1 (batch {lim.max_rows}, "
          f"max_tokens {lim.max_tokens}, {lim.token_budget} tokens in flight, queue {lim.max_queue}"
          f"{', API key required' if server.api_key else ''})", file=sys.stderr, flush=True)
    http.run()
    if not http.started:
        raise UserError(f"--port: could not serve on {args.host}:{args.port} (in use?)")
    print("[serve] stopped", file=sys.stderr, flush=True)
    return 0

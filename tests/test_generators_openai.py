"""The OpenAI backend against a real local HTTP server on 127.0.0.1 that counts requests
(issue 34): a permanent failure ends the whole generate call (no further request is sent, close()
does not wait), and malformed responses are one line naming the endpoint."""
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from metareason.generators import GeneratorError
from metareason.generators.openai_backend import OpenAIGenerator, OpenAIGeneratorConfig

OK = {"choices": [{"text": " fine", "finish_reason": "stop"}], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}


class Server:
    """Answers by prompt: ``routes[prompt] = (status, body[, prompt to wait for])``; ``hang``
    prompts block until released. ``seen`` counts requests per prompt."""

    def __init__(self):
        self.routes: dict = {}
        self.seen: Counter = Counter()
        self.release = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                prompt = req["prompt"] if "prompt" in req else req["messages"][-1]["content"]
                with server.lock:
                    server.seen[prompt] += 1
                status, body, *after = server.routes.get(prompt, (200, OK))
                for _ in range(200 if after else 0):  # answer only once that request has arrived
                    if server.seen[after[0]]:
                        break
                    time.sleep(0.01)
                if body == "hang":
                    server.release.wait(5)
                    status, body = 200, OK
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def generator(server, **kw):
    cfg = OpenAIGeneratorConfig(**{"base_url": server.base, "model": "m", "backoff": 0.2, "backoff_max": 0.4,
                                   "max_retries": 5, "concurrency": 2, **kw})
    return OpenAIGenerator(cfg, name="teacher")


def test_a_working_endpoint_answers_every_job(server):
    gen = generator(server)
    out = gen.generate(["a", "b", "c"], n=2)
    gen.close()
    assert [(c.text, c.prompt_index, c.sample_index, c.prompt_tokens) for c in out][:2] == [(" fine", 0, 0, 2),
                                                                                           (" fine", 0, 1, 2)]
    assert server.seen == Counter({"a": 2, "b": 2, "c": 2})


def test_a_4xx_cancels_the_remaining_jobs_of_the_call(server):
    server.routes["retrying"] = (503, {"error": {"message": "overloaded"}})
    server.routes["bad"] = (400, {"error": {"message": "max_tokens is too large"}}, "retrying")
    gen = generator(server)
    t0 = time.monotonic()
    with pytest.raises(GeneratorError) as info:
        gen.generate(["retrying", "bad"] + [f"ok{i}" for i in range(10)])
    assert time.monotonic() - t0 < 2.0
    msg = str(info.value)
    assert msg == f"generator 'teacher': {server.base}/completions: Error code: 400 - max_tokens is too large"
    time.sleep(1.5)  # several backoffs: a job still retrying would have sent more by now
    gen.close()
    assert server.seen["bad"] == 1 and 1 <= server.seen["retrying"] <= 2
    assert not any(p.startswith("ok") for p in server.seen)  # no queued job sent anything


def test_retries_exhausted_is_permanent_and_cancels_the_rest(server):
    server.routes["down"] = (502, {"error": {"message": "bad gateway"}})
    gen = generator(server, max_retries=1, backoff=0.05, concurrency=1)
    with pytest.raises(GeneratorError, match=rf"{server.base}/completions: gave up after 2 attempts: InternalServerError"):
        gen.generate(["down", "x", "y", "z"])
    time.sleep(0.3)
    gen.close()
    assert server.seen == Counter({"down": 2})


def test_failure_returns_and_close_does_not_wait_for_requests_in_flight(server):
    server.routes["slow"] = (200, "hang")  # answers only when the server is released
    server.routes["bad"] = (404, {"error": {"message": "model m not found"}}, "slow")  # once slow is in flight
    gen = generator(server, concurrency=2)
    t0 = time.monotonic()
    with pytest.raises(GeneratorError, match="model m not found"):
        gen.generate(["slow", "bad", "later1", "later2"])
    t1 = time.monotonic()
    gen.close()
    t2 = time.monotonic()
    assert t1 - t0 < 2.0 and t2 - t1 < 1.0, (t1 - t0, t2 - t1)
    assert server.seen == Counter({"slow": 1, "bad": 1})
    with pytest.raises(GeneratorError, match="closed"):
        gen.generate(["again"])


MALFORMED = [
    ({"choices": []}, "choices is empty"),
    ({}, "no choices list (missing)"),
    ({"choices": "abc"}, "no choices list (str 'abc')"),
    ([1, 2], "no choices list (missing)"),
    ({"choices": [{}]}, "choices[0].text is missing, expected text"),
    ({"choices": [{"text": 5}]}, "choices[0].text is int '5', expected text"),
    ({"choices": ["abc"]}, "choices[0].text is missing"),
    ({"choices": [{"text": "x", "finish_reason": 3}]}, "choices[0].finish_reason is int '3'"),
    ({"choices": [{"text": "x"}], "usage": {"prompt_tokens": "a", "completion_tokens": 1}}, "usage.prompt_tokens is str 'a'"),
    ({"choices": [{"text": "x"}], "usage": {"prompt_tokens": 1, "completion_tokens": -1}}, "usage.completion_tokens is int '-1'"),
    ("not json at all", "not JSON (Expecting value"),
]


@pytest.mark.parametrize("body,why", MALFORMED, ids=[f"m{i}" for i in range(len(MALFORMED))])
def test_malformed_completion_is_one_line_naming_the_endpoint(server, body, why):
    server.routes["odd"] = (200, body)
    gen = generator(server, concurrency=1)
    with pytest.raises(GeneratorError) as info:
        gen.generate(["odd", "next1", "next2"])
    gen.close()
    msg = str(info.value)
    assert msg.startswith(f"generator 'teacher': {server.base}/completions: malformed response: ") and "\n" not in msg
    assert why in msg, msg
    assert server.seen == Counter({"odd": 1})  # not retried, and the rest of the call was cancelled


@pytest.mark.parametrize("body,why", [
    ({"choices": [{"finish_reason": "stop"}]}, "choices[0].message is missing"),
    ({"choices": [{"message": {"role": "assistant", "content": ["x"]}}]}, "choices[0].message.content is list"),
    ({"choices": []}, "choices is empty"),
])
def test_malformed_chat_response_names_the_chat_endpoint(server, body, why):
    server.routes["odd"] = (200, body)
    gen = generator(server, api="chat")
    with pytest.raises(GeneratorError, match=rf"{server.base}/chat/completions: malformed response: .*") as info:
        gen.generate(["odd"])
    gen.close()
    assert why in str(info.value)


def test_chat_null_content_is_empty_text(server):
    server.routes["refuse"] = (200, {"choices": [{"message": {"role": "assistant", "content": None},
                                                   "finish_reason": "stop"}]})
    gen = generator(server, api="chat")
    assert gen.generate(["refuse"])[0].text == ""
    gen.close()

"""``metareason serve``'s request checks in-process (no model: a char tokenizer and a stand-in
scheduler): every bad or unsupported input a JSON 400 naming the field, the limits and defaults,
and the HTTP guards (API key, Content-Type, body size, Host, docs, 429 with Retry-After, 503)."""
import json

import pytest
from starlette.testclient import TestClient

from metareason.data.chat import ChatFormat
from metareason.models import build_char_tokenizer
from metareason.serve import Server, build_app
from metareason.serving.limits import Limits
from metareason.serving.openai_schema import APIError
from metareason.serving.scheduler import Busy, Stopped


class StandIn:
    """What the app needs from a scheduler; ``refuse`` is raised by ``submit``."""

    draining = False

    def __init__(self):
        self.refuse, self.jobs = None, []

    def submit(self, job):
        if self.refuse is not None:
            raise self.refuse
        self.jobs.append(job)
        for row in range(job.rows):  # answer at once: one "ok" per row
            from metareason.serving.scheduler import RowResult

            job.on_event("done", RowResult(row, row // job.n, row % job.n, "ok", [5], "stop",
                                           len(job.prompts[row // job.n]), 1))

    def stats(self):
        return {}

    def stop(self, grace_s=0):
        pass


LIMITS = Limits(context=64, max_tokens=32, default_max_tokens=20, max_prompts=3, max_n=4, max_rows=8,
                max_body_bytes=4096, token_budget=300, max_queue=4)


@pytest.fixture()
def server():
    return Server(StandIn(), build_char_tokenizer(), "m", LIMITS, api_key="s3cret",
                  allowed_hosts={"127.0.0.1", "localhost", "testserver"})  # TestClient's Host


def prep(server, body: dict, chat=False):
    return server.prepare(json.dumps(body).encode(), chat)


def refused(server, raw, chat=False, status=400):
    with pytest.raises(APIError) as info:
        server.prepare(raw if isinstance(raw, bytes) else json.dumps(raw).encode(), chat)
    assert info.value.status == status
    return info.value


def test_defaults_are_bounded_and_match_openai(server):
    # completions: OpenAI's default of 16; chat: the server's bounded default, not the rest of the context
    assert prep(server, {"model": "m", "prompt": "a"}).params.max_tokens == 16
    chat = prep(server, {"model": "m", "messages": [{"role": "user", "content": "a"}]}, chat=True)
    assert chat.params.max_tokens == LIMITS.default_max_tokens
    # max_completion_tokens (current SDKs) is the chat request's max_tokens, checked against the limit
    assert prep(server, {"model": "m", "messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 7},
                chat=True).params.max_tokens == 7
    err = refused(server, {"model": "m", "messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 33},
                  chat=True)
    assert err.param == "max_completion_tokens"
    # near the end of the context the default shrinks to what is left
    assert prep(server, {"model": "m", "prompt": "a" * 55}).params.max_tokens == 64 - 56
    assert refused(server, {"model": "m", "prompt": "a", "max_tokens": 33}).param == "max_tokens"
    assert refused(server, {"model": "m", "prompt": "a" * 40, "max_tokens": 30}).param == "max_tokens"
    assert refused(server, {"model": "m", "prompt": "a" * 70, "max_tokens": 1}).param == "prompt"


def test_per_request_limits(server):
    assert refused(server, {"model": "m", "prompt": "a", "n": 5}).param == "n"
    assert refused(server, {"model": "m", "prompt": ["a", "b", "c"], "n": 3}).param == "n"  # 9 rows > batch of 8
    assert len(prep(server, {"model": "m", "prompt": ["a", "b"], "n": 4}).prompts) == 2
    assert refused(server, {"model": "m", "prompt": ["a"] * 4}).param == "prompt"
    assert refused(server, {"model": "m", "prompt": "a", "stop": ["1", "2", "3", "4", "5"]}).param == "stop"
    assert prep(server, {"model": "m", "prompt": "a", "stop": ["1", "2", "3", "4"]}).params.stop == ("1", "2", "3", "4")
    assert refused(server, {"model": "m", "prompt": "a", "stop": [""]}).param == "stop"
    # prompts x n x (prompt + max_tokens) over the server's whole budget can never run
    assert refused(server, {"model": "m", "prompt": ["a" * 20] * 3, "n": 2, "max_tokens": 32}).param == "max_tokens"


def test_unsupported_parameters_are_refused_by_name_and_neutral_values_accepted(server):
    for name, value in [("logit_bias", {"5": 10}), ("response_format", {"type": "json_object"}), ("best_of", 3),
                        ("presence_penalty", 0.5), ("frequency_penalty", 1), ("suffix", "x"), ("tools", [{}]),
                        ("top_k", 5), ("guided_json", {})]:
        err = refused(server, {"model": "m", "prompt": "a", name: value})
        assert err.param == name and err.message.startswith(name)
    ok = {"logit_bias": {}, "best_of": 1, "presence_penalty": 0, "response_format": {"type": "text"}, "user": "u"}
    assert prep(server, {"model": "m", "prompt": "a", **ok}).params.max_tokens == 16
    assert refused(server, {"model": "m", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
                   chat=True).param == "top_logprobs"  # without logprobs: true


def test_every_bad_input_is_a_400_naming_the_field(server):
    assert refused(server, {"model": "m", "prompt": "a", "seed": 2 ** 64}).param == "seed"
    assert prep(server, {"model": "m", "prompt": "a", "seed": 2 ** 64 - 1}).params.seed == 2 ** 64 - 1
    assert prep(server, {"model": "m", "prompt": "a", "temperature": 1e-300}).params.temperature == 1e-300
    assert refused(server, {"model": "m", "prompt": "a", "temperature": "hot"}).param == "temperature"
    assert "nested too deeply" in refused(server, b'{"model": "m", "prompt": ' + b"[" * 100000).message
    assert refused(server, b'{"model": "m", "prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}").status == 400
    assert refused(server, b'{"model": "m", "prompt": "a", "max_tokens": ' + b"9" * 4000 + b"}").param == "max_tokens"
    assert refused(server, b"[1, 2]").message == "the body must be a JSON object"
    assert refused(server, {"model": "m", "prompt": []}).param == "prompt"
    assert refused(server, {"model": "m", "prompt": [1000]}).param == "prompt"  # token id outside the vocabulary
    assert refused(server, {"model": "m", "prompt": "a", "max_tokens": 0}).param == "max_tokens"  # 0: echo only
    assert refused(server, {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                                     "text": ""}]}]},
                   chat=True).param == "messages"
    # an empty prompt is fine while the tokenizer adds a BOS, a 400 when it adds nothing
    assert prep(server, {"model": "m", "prompt": ""}).prompts == [[server.tokenizer.bos_token_id]]
    server.tokenizer.bos_token = None
    assert refused(server, {"model": "m", "prompt": ""}).param == "prompt"
    # a chat template that raises is the request's problem, not a 500
    server.tokenizer.chat_template = "{{ raise_exception('no system role here') }}"
    server.fmt = ChatFormat(enabled=True)
    err = refused(server, {"model": "m", "messages": [{"role": "user", "content": "a"}]}, chat=True)
    assert err.param == "messages" and "no system role here" in err.message


def test_token_id_prompts_and_logprob_requests(server):
    p = prep(server, {"model": "m", "prompt": [[5, 6, 7], [8]], "echo": True, "logprobs": 2, "max_tokens": 0})
    assert p.prompts == [[5, 6, 7], [8]] and p.params.prompt_logprobs and p.params.logprobs == 2
    p = prep(server, {"model": "m", "messages": [{"role": "user", "content": "a"}], "logprobs": True,
                      "top_logprobs": 3}, chat=True)
    assert p.params.logprobs == 3 and not p.params.prompt_logprobs


def http(server, path="/v1/completions", body=None, headers=None, **kw):
    client = TestClient(build_app(server), raise_server_exceptions=False)
    h = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"} | (headers or {})
    data = json.dumps(body if body is not None else {"model": "m", "prompt": "a", "max_tokens": 2}).encode()
    return client.post(path, content=kw.get("content", data), headers=h)


def test_http_guards(server):
    r = http(server)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"
    for header in ({"Authorization": "Bearer wrong"}, {"Authorization": ""}):
        assert http(server, headers=header).status_code == 401
    r = http(server, headers={"Content-Type": "text/plain"})  # a browser's simple request
    assert r.status_code == 415 and r.json()["error"]["param"] == "Content-Type"
    r = http(server, content=b"{" + b" " * 5000 + b"}")
    assert r.status_code == 413 and "4096" in r.json()["error"]["message"]
    r = http(server, headers={"Host": "evil.example:8000"})  # DNS rebinding
    assert r.status_code == 400 and r.json()["error"]["param"] == "Host"
    assert http(server, headers={"Host": "localhost:8000"}).status_code == 200
    client = TestClient(build_app(server))
    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404
    server.docs = True
    client = TestClient(build_app(server))
    assert client.get("/openapi.json").status_code == 401  # behind the key
    assert client.get("/openapi.json", headers={"Authorization": "Bearer s3cret"}).status_code == 200

    server.scheduler.refuse = Busy("token budget exhausted", 7)
    r = http(server)
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json()["error"]["type"] == "rate_limit_error"
    server.scheduler.refuse = Stopped("the server is shutting down")
    assert http(server).status_code == 503
    server.scheduler.refuse = None
    r = http(server, body={"model": "m", "prompt": "a", "logit_bias": {"1": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


def test_usage_counts_each_prompt_once_with_n_samples(server):
    # OpenAI's usage: prompt tokens once per prompt whatever n is; completion tokens of every sample
    r = http(server, body={"model": "m", "prompt": ["ab", "cde"], "n": 3, "max_tokens": 2})
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == 3 + 4 and usage["completion_tokens"] == 6
    assert [c["index"] for c in r.json()["choices"]] == list(range(6))


def test_loopback_only_unless_a_key_or_insecure():
    import argparse

    from metareason.errors import UserError
    from metareason.serve import check_exposure, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    ns = argparse.Namespace
    with pytest.raises(UserError, match="--host"):
        check_exposure(ns(host="0.0.0.0", api_key_env=None, insecure=False))
    check_exposure(ns(host="0.0.0.0", api_key_env="KEY", insecure=False))
    check_exposure(ns(host="0.0.0.0", api_key_env=None, insecure=True))
    check_exposure(ns(host="127.0.0.1", api_key_env=None, insecure=False))

"""``metareason serve`` as a user runs it: a real server in a subprocess on a free loopback port,
talked to with the official ``openai`` client (and raw HTTP for malformed bodies)."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from metareason import Kernel
from metareason.generate import generate_batch
from metareason.models.loader import load_model, load_tokenizer
from metareason.config import ModelConfig
from tests.conftest import REPO, save_bigram_llama

CHAIN = {c: chr(ord(c) + 1) for c in "abcdefghijklmnopqrstuvwxy"} | {"z": ";"}
STARTUP_S = 180  # model load + imports on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, target, *args, env=None, port=None):
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "metareason", "serve", str(target), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.proc.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    self.health_at_start = json.loads(r.read())
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        self.stop()
        raise AssertionError("server did not come up")

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=120, **kw)

    def health(self):
        with urllib.request.urlopen(self.base + "/health", timeout=10) as r:
            return json.loads(r.read())

    def post_raw(self, path, data: bytes):
        req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def bigram_dir(tmp_path_factory):
    return save_bigram_llama(tmp_path_factory.mktemp("served"), CHAIN)


@pytest.fixture(scope="module")
def server(bigram_dir):
    s = Served(bigram_dir, "--model-name", "bigram")
    yield s
    s.stop()


def expected(prompt, max_tokens):
    """What the bigram model writes greedily: the chain from the prompt's last letter."""
    out, c = "", prompt[-1]
    while len(out) < max_tokens and c in CHAIN:
        c = CHAIN[c]
        out += c
    return out


def test_greedy_completions_equal_local_generation(server, tiny_model_dir):
    # a real (random) transformer: the server's text equals the kernel's own greedy generation
    s = Served(tiny_model_dir, "--model-name", "tiny")
    try:
        cfg = ModelConfig(path=str(tiny_model_dir), device="cpu")
        tok = load_tokenizer(cfg)
        model, _ = load_model(cfg, tok)
        client = s.client()
        for prompt in ["A=1;B=A+2;", "C=5;", "Z"]:
            local = generate_batch(model.eval(), tok, [prompt], max_new_tokens=12, do_sample=False, temperature=1.0,
                                   top_p=1.0, stop=[])[0]
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
            assert r.choices[0].text == local.text
            assert r.usage.completion_tokens == local.num_tokens and r.usage.prompt_tokens == len(prompt) + 1
    finally:
        assert s.stop() == 0


def test_completions_chat_stop_and_models(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["bigram"]
    r = client.completions.create(model="bigram", prompt="c", max_tokens=5, temperature=0)
    assert r.choices[0].text == "defgh" and r.choices[0].finish_reason == "length"
    r = client.completions.create(model="bigram", prompt="c", max_tokens=10, temperature=0, stop=["g"])
    assert r.choices[0].text == "def" and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="bigram", prompt="w", max_tokens=10, temperature=0)
    assert r.choices[0].text == "xyz;" and r.choices[0].finish_reason == "stop"  # the chain ends: end of sequence
    r = client.completions.create(model="bigram", prompt=["a", "m"], max_tokens=3, temperature=0, n=2)
    assert [c.text for c in r.choices] == ["bcd", "bcd", "nop", "nop"] and [c.index for c in r.choices] == [0, 1, 2, 3]
    chat = client.chat.completions.create(model="bigram", messages=[{"role": "user", "content": "p"}], max_tokens=4,
                                          temperature=0)
    assert chat.choices[0].message.content == "qrst" and chat.choices[0].message.role == "assistant"


def test_streaming_yields_the_same_text(server):
    client = server.client()
    plain = client.completions.create(model="bigram", prompt="d", max_tokens=9, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="bigram", prompt="d", max_tokens=9, temperature=0, stream=True))
    assert len(chunks) >= 9 and "".join(c.choices[0].text for c in chunks) == plain
    assert chunks[-1].choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model="bigram", messages=[{"role": "user", "content": "d"}],
                                            max_tokens=9, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == plain


def test_32_concurrent_requests_are_batched_and_each_answered_correctly(server):
    client = server.client()
    prompts = [chr(ord("a") + i % 25) * (1 + i % 3) for i in range(32)]
    before = server.health()
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda p: client.completions.create(model="bigram", prompt=p, max_tokens=6,
                                                                     temperature=0), prompts))
    assert [a.choices[0].text for a in answers] == [expected(p, 6) for p in prompts]
    after = server.health()
    tokens = after["completion_tokens"] - before["completion_tokens"]
    assert tokens == sum(a.usage.completion_tokens for a in answers)
    assert after["requests_done"] - before["requests_done"] == 32
    assert after["steps"] - before["steps"] < tokens  # rows of different requests shared decoding steps


def test_bad_requests_get_400_naming_the_field_and_the_server_keeps_serving(server):
    client = server.client()
    cases = [
        (dict(model="other", prompt="a"), "model"),
        (dict(model="bigram", prompt="a", max_tokens=100000), "max_tokens"),
        (dict(model="bigram", prompt="a" * 3000, max_tokens=4), "prompt"),  # context 2048
        (dict(model="bigram", prompt="a", temperature="hot"), "temperature"),
        (dict(model="bigram", prompt="a", n=0), "n"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(**kwargs)
        assert info.value.status_code == 400
        assert info.value.body["param"] == param and info.value.body["message"].startswith(param)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="bigram", messages=[])
    assert info.value.body["param"] == "messages"
    status, body = server.post_raw("/v1/completions", b'{"model": "bigram", "prompt": ')
    assert status == 400 and body["error"]["message"].startswith("malformed JSON")
    status, body = server.post_raw("/v1/completions", b'{"prompt": "a"}')
    assert status == 400 and body["error"]["param"] == "model"
    assert client.completions.create(model="bigram", prompt="a", max_tokens=2, temperature=0).choices[0].text == "bc"


def test_api_key_missing_or_wrong_gets_401(bigram_dir):
    s = Served(bigram_dir, "--model-name", "bigram", "--api-key-env", "MR_SERVE_KEY", env={"MR_SERVE_KEY": "s3cret"})
    try:
        for key in ("wrong", "none"):
            with pytest.raises(openai.AuthenticationError) as info:
                s.client(key).completions.create(model="bigram", prompt="a", max_tokens=2)
            assert info.value.status_code == 401
        status, _ = s.post_raw("/v1/completions", b'{"model": "bigram", "prompt": "a"}')  # no header at all
        assert status == 401
        assert s.client("s3cret").completions.create(model="bigram", prompt="a", max_tokens=2,
                                                      temperature=0).choices[0].text == "bc"
    finally:
        s.stop()
    out = s.proc.stdout.read()
    assert "s3cret" not in out


def test_a_full_queue_answers_429_and_nothing_hangs(tiny_model_dir):
    s = Served(tiny_model_dir, "--model-name", "tiny", "--max-queue", "1", "--max-batch-size", "1")
    try:
        client = s.client()

        def one(i):
            try:
                client.completions.create(model="tiny", prompt="A=1;", max_tokens=100, temperature=0)
                return "ok"
            except openai.RateLimitError as exc:
                assert exc.status_code == 429 and "server busy" in exc.body["message"]
                assert int(exc.response.headers["retry-after"]) >= 1
                return "429"

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(12)))
        assert results.count("429") >= 1 and results.count("ok") >= 1, results
        assert client.completions.create(model="tiny", prompt="A", max_tokens=2).choices[0].text is not None
    finally:
        assert s.stop() == 0


def test_sigterm_lets_in_flight_requests_finish(tiny_model_dir):
    s = Served(tiny_model_dir, "--model-name", "tiny", "--max-batch-size", "1")
    client = s.client()
    results = []

    def long_request():
        try:
            r = client.completions.create(model="tiny", prompt="A=1;", max_tokens=120, temperature=0)
            results.append(("ok", r.choices[0].finish_reason))
        except openai.APIError as exc:  # a request still queued may be refused (503): never a hang
            results.append(("error", getattr(exc, "status_code", None)))

    threads = [threading.Thread(target=long_request) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert s.proc.wait(60) == 0
    assert len(results) == 3 and ("ok", "length") in results, results


def test_openai_backend_retries_through_a_server_restart(bigram_dir):
    s = Served(bigram_dir, "--model-name", "bigram")
    port = s.port
    kernel = Kernel({"plugins": [], "generators": {"remote": {
        "type": "openai", "base_url": s.base + "/v1", "model": "bigram", "max_retries": 10, "backoff": 0.5,
        "backoff_max": 4.0, "concurrency": 4}}})
    gen = kernel.generator("remote")
    assert [c.text for c in gen.generate(["a", "k"], max_new_tokens=3)] == ["bcd", "lmn"]
    assert s.stop() == 0
    restarted = {}
    t = threading.Thread(target=lambda: (time.sleep(2.0), restarted.update(s=Served(bigram_dir, "--model-name",
                                                                                     "bigram", port=port))))
    t.start()
    try:
        out = gen.generate(["c"], max_new_tokens=4, n=2)  # the server is down when this starts
        assert [c.text for c in out] == ["defg", "defg"] and out[0].completion_tokens == 4
        assert out[0].prompt_tokens == 2
    finally:
        t.join(STARTUP_S)
        if "s" in restarted:
            restarted["s"].stop()
        gen.close()

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
from metareason.generation.generate import generate_batch
from metareason.models.loader import load_model, load_tokenizer
from metareason.config import ModelConfig
from tests.conftest import REPO, save_bigram_llama

CHAIN = {c: chr(ord(c) + 1) for c in "abcdefghijklmnopqrstuvwxy"} | {"z": ";", "8": "9", "9": "<tool>"}
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
    return save_bigram_llama(tmp_path_factory.mktemp("served"), CHAIN, extra_tokens=("<tool>",))


@pytest.fixture(scope="module")
def server(bigram_dir):
    s = Served(bigram_dir, "--model-name", "bigram")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    s = Served(tiny_model_dir, "--model-name", "tiny", "--max-body-kb", "64")
    yield s
    assert s.stop() == 0


def expected(prompt, max_tokens):
    """What the bigram model writes greedily: the chain from the prompt's last letter."""
    out, c = "", prompt[-1]
    while len(out) < max_tokens and c in CHAIN:
        c = CHAIN[c]
        out += c
    return out


def local_tiny(tiny_model_dir):
    cfg = ModelConfig(path=str(tiny_model_dir), device="cpu")
    tok = load_tokenizer(cfg)
    model, _ = load_model(cfg, tok)
    return model.eval(), tok


def test_greedy_completions_equal_local_generation(tiny_server, tiny_model_dir):
    # a real (random) transformer; requests arrive while others decode (continuous batching admits
    # them at different steps): each text equals the kernel's own greedy generation of its prompt
    model, tok = local_tiny(tiny_model_dir)
    client = tiny_server.client()
    prompts = ["A=1;B=A+2;", "C=5;", "Z", "hello world", "x" * 30, "Q=7;R=Q*2;S="]
    local = [generate_batch(model, tok, [p], max_new_tokens=40, do_sample=False, temperature=1.0, top_p=1.0,
                            stop=[])[0] for p in prompts]

    def ask(i):
        time.sleep(0.05 * i)
        return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=40, temperature=0)

    before = tiny_server.health()
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, range(len(prompts))))
    for r, g, p in zip(answers, local, prompts):
        assert r.choices[0].text == g.text
        assert r.usage.completion_tokens == g.num_tokens and r.usage.prompt_tokens == len(p) + 1
    after = tiny_server.health()
    assert after["steps"] - before["steps"] < sum(g.num_tokens for g in local)  # they shared steps


def test_logprobs_and_echo_score_a_prompt_as_evaluation_harnesses_do(tiny_server, tiny_model_dir):
    import torch

    model, tok = local_tiny(tiny_model_dir)
    client = tiny_server.client()
    prompt = "A=1;B=A+2;"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=2)
    c = r.choices[0]
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    gen = tok.convert_tokens_to_ids(c.logprobs.tokens[-1])
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids + [gen]])).logits[0].float(), -1)
    want = [float(lp[k, t]) for k, t in enumerate(ids[1:] + [gen])]  # each token given all before it
    assert c.text == prompt + c.logprobs.tokens[-1] and "".join(c.logprobs.tokens) == c.text
    assert c.logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
    assert c.logprobs.text_offset[:3] == [0, 1, 2] and all(len(t) == 2 for t in c.logprobs.top_logprobs)
    assert gen == int(lp[len(ids) - 1].argmax())  # greedy: the generated token is the top one
    # chat: the chosen token's log-probability and the top alternatives per generated token
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "C=5;"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and "".join(e.token for e in content) == chat.choices[0].message.content
    assert all(e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob for e in content)
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in content)


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


def test_openai_regressions_usage_default_max_tokens_and_last_streamed_piece(server):
    client = server.client()
    # usage as OpenAI counts it: the prompt once per prompt whatever n is, completion tokens of every sample
    r = client.completions.create(model="bigram", prompt=["c", "mm"], max_tokens=3, temperature=0, n=3)
    assert r.usage.prompt_tokens == 2 + 3 and r.usage.completion_tokens == 6 * 3
    r = client.chat.completions.create(model="bigram", messages=[{"role": "user", "content": "c"}], max_tokens=3,
                                       temperature=0, n=2)
    assert r.usage.prompt_tokens == 2 and r.usage.completion_tokens == 6
    # /v1/completions without max_tokens: OpenAI's default of 16 tokens
    r = client.completions.create(model="bigram", prompt="a", temperature=0)
    assert r.choices[0].text == expected("a", 16) and r.choices[0].finish_reason == "length"
    # the last piece of a stream: a held-back tail (it could have begun a stop string) and a special
    # token that does not survive re-tokenising its text are both sent before the end
    for prompt, stop in (("c", ["zz"]), ("8", ["<tool><"]), ("8", None)):
        plain = client.completions.create(model="bigram", prompt=prompt, max_tokens=5, temperature=0, stop=stop)
        chunks = list(client.completions.create(model="bigram", prompt=prompt, max_tokens=5, temperature=0,
                                                stop=stop, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text != ""
    assert plain.choices[0].text == "9<tool>"


def raw_post(base, body: bytes, headers=(), read=True, timeout=30):
    """A POST over a plain socket: ``(status or None, seconds)``; ``read=False`` closes at once."""
    host, port = base.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    t0 = time.monotonic()
    try:
        head = ["POST /v1/completions HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
                *headers]
        if not any(h.lower().startswith("content-length") for h in headers):
            head.append(f"Content-Length: {len(body)}")
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        if not read:
            return None, 0.0
        data = sock.recv(4096)
        return int(data.split(b" ", 2)[1]), time.monotonic() - t0
    finally:
        sock.close()


def test_health_answers_while_huge_and_endless_bodies_are_refused(tiny_server):
    statuses, health_s = {}, []
    big = json.dumps({"model": "tiny", "prompt": "a" * 200}).encode()

    def declared_50mb():  # Content-Length says 50 MB: refused before a byte of it is read
        statuses["declared"] = raw_post(tiny_server.base, big, [f"Content-Length: {50 * 2 ** 20}"])

    def endless():  # chunked, no length, 50 MB in 64 KiB chunks: refused once over the limit
        host, port = tiny_server.base.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (65536, b"a" * 65536)
            try:
                for _ in range(800):
                    sock.sendall(chunk)
            except OSError:  # the server answered and closed: stop sending
                pass
            statuses["endless"] = int(sock.recv(4096).split(b" ", 2)[1])

    threads = [threading.Thread(target=declared_50mb), threading.Thread(target=endless)]
    for t in threads:
        t.start()
    for _ in range(20):
        t0 = time.monotonic()
        assert tiny_server.health()["status"] == "ok"
        health_s.append(time.monotonic() - t0)
    for t in threads:
        t.join(60)
    assert statuses["declared"][0] == 413 and statuses["endless"] == 413
    assert max(health_s) < 5.0, health_s  # bounded: nothing blocks the event loop (typically a few ms)
    # within the body limit but far beyond the context: a 400 from the tokenising thread
    status, body = tiny_server.post_raw("/v1/completions", json.dumps({"model": "tiny", "prompt": "a" * 60000})
                                        .encode())
    assert status == 400 and body["error"]["param"] == "prompt"


def test_clients_that_disconnect_leave_no_work_running(tiny_server):
    # 200 clients (plain answers, then streams) send a request and hang up without reading the
    # answer: their work is cancelled, queued or running, and nothing is left behind
    for stream in (False, True):
        before = tiny_server.health()
        bodies = [json.dumps({"model": "tiny", "prompt": f"A={i};", "max_tokens": 100, "temperature": 0,
                              "stream": stream}).encode() for i in range(100)]
        with ThreadPoolExecutor(50) as pool:
            list(pool.map(lambda b: raw_post(tiny_server.base, b, read=False), bodies))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            h = tiny_server.health()
            if h["running_rows"] == 0 and h["waiting_requests"] == 0 and h["reserved_tokens"] == 0:
                break
            time.sleep(0.2)
        assert (h["running_rows"], h["waiting_requests"], h["reserved_tokens"]) == (0, 0, 0), h
        accepted = h["requests_done"] - before["requests_done"]
        generated = h["completion_tokens"] - before["completion_tokens"]
        assert accepted >= 1 and generated < 50 * accepted, (stream, accepted, generated)  # cut short
    r = tiny_server.client().completions.create(model="tiny", prompt="A", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2  # and the server goes on serving


def _long_context_tiny(path):
    """The tiny Llama with a 4096-token context: a 2000-token request keeps the one row busy for
    seconds, so a full queue is there to see even on a loaded machine (100 tokens take ~0.2 s)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from metareason.models import build_char_tokenizer
    from tests.conftest import TINY_LLAMA

    torch.manual_seed(0)
    tok = build_char_tokenizer()
    arch = dict(TINY_LLAMA, max_position_embeddings=4096)
    cfg = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **arch)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_full_queue_429_then_sigterm_answers_every_client_and_exits(tmp_path):
    s = Served(_long_context_tiny(tmp_path / "tiny4k"), "--model-name", "tiny", "--max-queue", "4",
               "--max-batch-size", "1", "--max-tokens-in-flight", "100000", "--shutdown-grace-s", "3")
    client = s.client()

    def one(i, max_tokens=100):
        try:
            r = client.completions.create(model="tiny", prompt="A=1;", max_tokens=max_tokens, temperature=0)
            return ("ok", r.choices[0].finish_reason)
        except openai.RateLimitError as exc:
            assert "server busy" in exc.body["message"] and int(exc.response.headers["retry-after"]) >= 1
            return ("429", None)
        except openai.APIStatusError as exc:
            return (str(exc.status_code), None)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    assert [r[0] for r in results].count("429") >= 1 and ("ok", "length") in results, results
    # a full queue when SIGTERM comes: the waiting requests get 503 at once, the running one its
    # grace period; every client gets an answer (no reset, no hang) and the server exits 0
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i, 2000) for i in range(8)]
        deadline = time.monotonic() + 30
        while s.health()["waiting_requests"] < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.health()["waiting_requests"] == 4, "the queue never filled: the test needs slower requests"
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        results = [f.result(60) for f in futures]
    assert s.proc.wait(60) == 0 and time.monotonic() - t0 < 30
    kinds = [r[0] for r in results]
    assert kinds.count("503") >= 3 and set(kinds) <= {"ok", "503", "429"}, results


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


@pytest.mark.slow
def test_smollm2_concurrent_chat_equals_local_generation_and_streams_the_same_text(smollm2_dir):
    # the real pretrained model and its BPE tokenizer: requests of different lengths batched
    # continuously give the greedy text of local generation, streamed piece by piece as generated
    from metareason.generators.local import LocalGenerator, load_local_model

    model, tok, _, fmt = load_local_model(str(smollm2_dir), device="cpu")
    gen = LocalGenerator(model, tok, batch_size=1, fmt=fmt)
    questions = [[{"role": "user", "content": q}] for q in
                 ("What is 2 + 3?", "Name a colour.", "Write one sentence about the sea, with an é and a €.")]
    local = [gen.generate([q], max_new_tokens=24, temperature=0)[0] for q in questions]
    s = Served(smollm2_dir, "--model-name", "smol")
    try:
        client = s.client()

        def ask(i):
            time.sleep(0.2 * i)
            stream = client.chat.completions.create(model="smol", messages=questions[i], max_tokens=24,
                                                    temperature=0, stream=True)
            return [c.choices[0].delta.content or "" for c in stream if c.choices]

        with ThreadPoolExecutor(3) as pool:
            pieces = list(pool.map(ask, range(3)))
        plain = client.chat.completions.create(model="smol", messages=questions[2], max_tokens=24, temperature=0)
    finally:
        assert s.stop() == 0
    assert ["".join(p) for p in pieces] == [c.text for c in local]
    for p, c in zip(pieces, local):  # token by token, not one final chunk
        assert sum(1 for x in p if x) >= c.completion_tokens // 2 >= 1, (p, c)
    assert plain.choices[0].message.content == local[2].text and plain.usage.prompt_tokens == local[2].prompt_tokens

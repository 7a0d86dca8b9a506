"""The behaviors pipeline: strategist (solve -> reflect -> extract), retries and failure reports,
BCI through the prompt-transform hook (eval and training), citation counting through
``metareason_on_eval_samples``, behavior-guided self-improvement, BC-SFT, the CLI."""
import json

import pytest
import yaml

from metareason.generation.generate import Generation
from metareason.generators.python_backend import PythonGenerator
from metareason.kernel import Kernel
from metareason.plugins.behaviors import demo_task
from metareason.plugins.behaviors.behavior import trace_hash
from metareason.plugins.behaviors.config import BehaviorsSection
from metareason.plugins.behaviors.store import Handbook
from metareason.plugins.behaviors.strategist import ExtractionError, extract_behaviors

from conftest import TINY_LLAMA, run_cli

STRATEGIST = "metareason.plugins.behaviors.demo_task:strategist"
TEACHER = "metareason.plugins.behaviors.demo_task:teacher"


def config(tmp_path, **behaviors):
    beh = {"enabled": True, "handbook": str(tmp_path / "hb.db"), "embedder": "hashing", "batch_size": 4,
           "retry_backoff": 0.0}
    beh.update(behaviors)
    return {
        "name": "beh", "output_dir": str(tmp_path / "runs"), "plugins": ["behaviors"], "quiet": True,
        "behaviors": beh,
        "generators": {"strategist": {"type": "python", "function": STRATEGIST},
                       "teacher": {"type": "python", "function": TEACHER},
                       "student": {"type": "python", "function": "test_behaviors_pipeline:weak_student"}},
        "data": {"train": [{"task": "behavior_chain", "num_samples": 24, "seed": 0, "params": {"split": "train"}}],
                 "eval": [{"task": "behavior_chain", "num_samples": 6, "seed": 1, "params": {"split": "test"}}],
                 "max_length": 256},
    }


def examples(n=12, seed=0):
    return list(demo_task.make_task({"split": "train"}, seed, n))


@pytest.fixture
def section(tmp_path):
    return BehaviorsSection(enabled=True, handbook=str(tmp_path / "hb.db"), embedder="hashing", batch_size=4,
                            retry_backoff=0.0)


# ------------------------------------------------------------------ strategist
def test_strategist_end_to_end_python_backend(tmp_path):
    kernel = Kernel(config(tmp_path))
    section = kernel.config.behaviors
    exs = [ex for _, ex in __import__("metareason.plugins.behaviors.examples", fromlist=["x"]).load_examples(kernel)]
    with Handbook(section.handbook, embedder="hashing") as hb:
        rep = extract_behaviors(kernel.generator("strategist"), exs, hb, section, quiet=True)
        uses = sum(len(set(demo_task.TOPICS[ex["topic"]])) for ex in exs)
        assert (rep.examples_done, rep.parsed, rep.rejected) == (24, uses, 0)
        assert rep.inserted + rep.merged == uses
        used_ops = {op for ex in exs for op in demo_task.TOPICS[ex["topic"]]}
        assert hb.names() == {f"behavior_{op}" for op in used_ops}
        total_prov = hb.db.execute("SELECT count(*) FROM provenance").fetchone()[0]
        assert total_prov == uses
        ex0 = exs[0]
        b = hb.get(f"behavior_{demo_task.TOPICS[ex0['topic']][0]}")
        first = [p for p in b.provenance if p.example_id == ex0["id"]][0]
        solve_text = demo_task.solve(ex0["topic"], int(ex0["prompt"].split()[2]))[0]
        assert first.trace_hash == trace_hash(solve_text) and first.generator == "strategist"
        for topic in {ex["topic"] for ex in exs}:  # topic retrieval serves every topic it came from
            assert {x.name for x in hb.by_topic(topic, 5)} == {f"behavior_{op}" for op in demo_task.TOPICS[topic]}


def _stage(prompt):
    return "extract" if "Reflection:" in prompt else "reflect" if "Reflect on" in prompt else "solve"


def test_malformed_extraction_lines_rejected_and_counted(tmp_path, section):
    def fn(prompt, **_):
        if _stage(prompt) != "extract":
            return "some text"
        return ("Sure! Here you go:\nbehavior_good_rule: Keep this one.\nbehavior_Bad: no.\n"
                "behavior_too_long: One. Two. Three.\n\n  \nrandom words")

    with Handbook(section.handbook, embedder="hashing") as hb:
        rep = extract_behaviors(PythonGenerator(fn, "s"), examples(3), hb, section, quiet=True)
        assert (rep.parsed, rep.rejected) == (3, 12)
        assert rep.returned_lines == 15  # non-blank lines only
        assert hb.names() == {"behavior_good_rule"}
        assert rep.rejected_samples[0]["text"] == "Sure! Here you go:"
        # two per example at most, so one looping output cannot fill the samples
        per_example = [r["example_id"] for r in rep.rejected_samples]
        assert len(rep.rejected_samples) == 6 and all(per_example.count(i) == 2 for i in set(per_example))


def test_generator_failure_retried_then_reported_and_earlier_work_kept(tmp_path, section):
    exs = examples(12)
    bad_id = exs[9]["id"]
    bad_q = exs[9]["prompt"].split("\n")[0]
    calls = {"n": 0, "bad": 0}

    def fn(prompt, **kw):
        calls["n"] += 1
        if bad_q in prompt and _stage(prompt) == "reflect":
            calls["bad"] += 1
            raise ConnectionError("endpoint down")
        return demo_task.strategist(prompt, **kw)

    section = section.model_copy(update={"retries": 2})
    with Handbook(section.handbook, embedder="hashing") as hb:
        with pytest.raises(ExtractionError) as err:
            extract_behaviors(PythonGenerator(fn, "s"), exs, hb, section, quiet=True)
        msg = str(err.value)
        assert bad_id in msg and "reflect" in msg and "endpoint down" in msg
        # batch of 4 tried 3 times, then the example alone 3 times
        assert calls["bad"] == 6
        # batches 1-2 and the 3 healthy examples of batch 3 are in the handbook; batch 4 never ran
        ids = {r[0] for r in hb.db.execute("SELECT example_id FROM provenance")}
        assert ids == {ex["id"] for ex in exs[:12] if ex["id"] != bad_id} - {ex["id"] for ex in exs[12:]}
    with Handbook(tmp_path / "hb2.db", embedder="hashing") as hb:
        rep = extract_behaviors(PythonGenerator(fn, "s"), exs, hb, section.model_copy(update={"keep_going": True}),
                                quiet=True)
        assert [f["example_id"] for f in rep.failures] == [bad_id] and rep.examples_done == 11


def test_with_retries_attempts_retries_plus_one_times():
    from metareason.plugins.behaviors.calls import with_retries

    calls = []

    def always():
        calls.append(1)
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        with_retries(always, retries=2, backoff=0.0, what="t", quiet=True)
    assert len(calls) == 3
    state = {"left": 2}

    def flaky():
        if state["left"]:
            state["left"] -= 1
            raise TimeoutError("slow")
        return "ok"

    assert with_retries(flaky, retries=2, backoff=0.0, what="t", quiet=True) == "ok"


def test_transient_failure_is_retried_not_reported(tmp_path, section):
    state = {"fail": 1}

    def fn(prompt, **kw):
        if state["fail"]:
            state["fail"] -= 1
            raise TimeoutError("slow")
        return demo_task.strategist(prompt, **kw)

    with Handbook(section.handbook, embedder="hashing") as hb:
        rep = extract_behaviors(PythonGenerator(fn, "s"), examples(1), hb, section, quiet=True)
        assert rep.failures == [] and rep.examples_done == 1 and len(hb) > 0
    section0 = section.model_copy(update={"retries": 0, "handbook": str(tmp_path / "hb3.db")})
    state["fail"] = 1
    with Handbook(section0.handbook, embedder="hashing") as hb:
        with pytest.raises(ExtractionError):
            extract_behaviors(PythonGenerator(fn, "s"), examples(1), hb, section0, quiet=True)


# ------------------------------------------------------------------ BCI
def _fill_handbook(path):
    with Handbook(path, embedder="hashing") as hb:
        hb.add_many([demo_task_behavior(op, topic) for topic, ops in demo_task.TOPICS.items() for op in ops])


def demo_task_behavior(op, topic):
    from metareason.plugins.behaviors.behavior import Behavior

    return Behavior(f"behavior_{op}", demo_task.PROCEDURES[op], topic=topic)


@pytest.fixture(autouse=True)
def _fresh_bci_state():
    from metareason.plugins.behaviors import bci

    bci.STATE.__init__()
    yield
    bci.close_shared()
    bci.STATE.__init__()


def test_bci_transform_hook_prepends_block(tmp_path):
    _fill_handbook(tmp_path / "hb.db")
    kernel = Kernel(config(tmp_path, bci={"enabled": True, "retrieval": "topic", "k": 3}))
    ex = {"prompt": "Q: fold 472\nA: ", "topic": "fold"}
    out = kernel.chain("metareason_transform_prompt", "prompt", ex["prompt"], example=ex, config=kernel.config)
    assert out == ("Behaviors (use them where they apply and cite each one you use by its name):\n"
                   "- behavior_rev: reverse the digits.\n- behavior_dbl: double the number.\n"
                   "- behavior_dsum: add up the digits.\n\nQ: fold 472\nA: ")
    assert kernel.chain("metareason_transform_prompt", "prompt", "x", example=dict(ex, use_behaviors=False),
                        config=kernel.config) == "x"
    assert kernel.chain("metareason_transform_prompt", "prompt", "x", example={"topic": "unknown"},
                        config=kernel.config) == "x"
    for off in (config(tmp_path, bci={"enabled": False}), config(tmp_path, enabled=False, bci={"enabled": True})):
        k2 = Kernel(off)
        assert k2.chain("metareason_transform_prompt", "prompt", "Q", example=ex, config=k2.config) == "Q"


def test_bci_embedding_retrieval_top_k(tmp_path):
    _fill_handbook(tmp_path / "hb.db")
    kernel = Kernel(config(tmp_path, bci={"enabled": True, "retrieval": "embedding", "k": 1},
                           prompts={"bci": "[{behaviors}]{question}", "behavior_line": "{name}"}))
    out = kernel.chain("metareason_transform_prompt", "prompt", "please double the number 12", example={},
                       config=kernel.config)
    assert out == "[behavior_dbl]please double the number 12"


def test_eval_counts_citations_and_retrievals(tmp_path, monkeypatch):
    _fill_handbook(tmp_path / "hb.db")
    kernel = Kernel(config(tmp_path, bci={"enabled": True, "retrieval": "topic", "k": 3}))
    seen = []

    def fake_generate(kernel, model, tokenizer, prompts, examples=None, **kw):
        seen.extend(prompts)
        out = []
        for i, (p, ex) in enumerate(zip(prompts, examples)):
            text = demo_task.teacher(p)
            if i == 1:  # cites, but the answer is wrong
                text = text.rsplit("answer", 1)[0] + "answer -1"
            if i == 2:  # no citation at all
                text = demo_task.solve(ex["topic"], int(ex["prompt"].split()[2]))[0]
            out.append(Generation(prompt=p, text=text, token_ids=[], num_tokens=len(text)))
        return out

    import metareason.generation.generate

    monkeypatch.setattr(metareason.generation.generate, "generate", fake_generate)
    from metareason.evaluate import evaluate

    metrics = evaluate(kernel, None, None)
    assert all(p.startswith("Behaviors (use them") for p in seen)  # BCI reached the eval prompts
    exs = [ex for _, ex in __import__("metareason.evaluate", fromlist=["x"]).build_eval_examples(kernel)]
    expect_cited, expect_ok = {}, {}
    for i, ex in enumerate(exs):
        if i == 2:
            continue
        for op in dict.fromkeys(demo_task.TOPICS[ex["topic"]]):
            expect_cited[f"behavior_{op}"] = expect_cited.get(f"behavior_{op}", 0) + 1
            if i != 1:
                expect_ok[f"behavior_{op}"] = expect_ok.get(f"behavior_{op}", 0) + 1
    with Handbook(tmp_path / "hb.db", embedder="hashing") as hb:
        for b in hb.all():
            assert (b.cited, b.cited_correct) == (expect_cited.get(b.name, 0), expect_ok.get(b.name, 0)), b.name
        assert sum(b.retrieved for b in hb.all()) == sum(len(demo_task.TOPICS[ex["topic"]]) for ex in exs)
    assert metrics["eval/behaviors/citing_share"] == pytest.approx((len(exs) - 1) / len(exs))
    assert metrics["eval/accuracy"] == pytest.approx((len(exs) - 1) / len(exs))


def test_on_eval_samples_hook_sees_every_scored_generation(tmp_path, monkeypatch):
    """The kernel hook (core/evaluate.py): any plugin receives each example's prompt, completion and score."""
    from metareason.hookspecs import hookimpl

    got = []

    class Listener:
        @hookimpl
        def metareason_on_eval_samples(self, kernel, step, samples):
            got.append((step, samples))

    kernel = Kernel(config(tmp_path, enabled=False))
    kernel.register(Listener())

    def fake_generate(kernel, model, tokenizer, prompts, examples=None, **kw):
        return [Generation(prompt=p, text="answer 0" if i else demo_task.teacher(p), token_ids=[], num_tokens=3)
                for i, p in enumerate(prompts)]

    import metareason.generation.generate
    from metareason.evaluate import evaluate

    monkeypatch.setattr(metareason.generation.generate, "generate", fake_generate)
    evaluate(kernel, None, None, step=7)
    (step, samples), = got
    assert step == 7 and len(samples) == 6
    assert [s["score"] for s in samples] == [1.0] + [0.0] * 5
    assert samples[1]["completion"] == "answer 0" and samples[0]["example"]["id"] == samples[0]["id"]
    assert {"prompt", "gen_tokens", "answer", "group"} <= set(samples[0])


def test_bci_applies_in_a_training_run(tmp_path):
    _fill_handbook(tmp_path / "hb.db")
    cfg = config(tmp_path, bci={"enabled": True, "retrieval": "topic", "k": 3})
    cfg.update(model={"arch": dict(TINY_LLAMA, max_position_embeddings=320), "tokenizer": {"type": "char"}},
               train={"max_steps": 2, "batch_size": 4, "log_every": 1}, eval={"at_end": False})
    captured = []

    import metareason.train.sft as sft

    original = sft.encode_examples

    def spy(tokenizer, prompts, completions, max_length, **kw):
        captured.extend(prompts)
        return original(tokenizer, prompts, completions, max_length, **kw)

    sft.encode_examples = spy
    try:
        Kernel(cfg).run()
    finally:
        sft.encode_examples = original
    assert captured and all(p.startswith("Behaviors (use them") for p in captured)
    with Handbook(tmp_path / "hb.db", embedder="hashing") as hb:
        assert sum(b.retrieved for b in hb.all()) > 0  # flushed at the end of the run


# ------------------------------------------------------------------ self-improvement
def weak_student(prompt, **_):
    """Right only when behaviors are in its prompt; critique-and-revise does not fix it."""
    head = prompt.split("Q: ")[0]
    if "Critique the attempt" in prompt:
        return "The attempt looks fine."
    if "- behavior_" in head and "Critique:" not in prompt:
        return demo_task.teacher(prompt)
    return "I think answer 0"


def test_behavior_guided_self_improvement_beside_critique_and_revise(tmp_path):
    kernel = Kernel(config(tmp_path))
    from metareason.plugins.behaviors.examples import load_examples
    from metareason.plugins.behaviors.improve import self_improve

    pairs = load_examples(kernel, "eval")
    out = tmp_path / "si.jsonl"
    with Handbook(tmp_path / "hb.db", embedder="hashing") as hb:
        s = self_improve(kernel, pairs, out=out, quiet=True, handbook=hb)
        stored = hb.all(provenance=True)
        assert {b.name for b in stored} == {f"behavior_{op}" for _, ex in pairs for op in demo_task.TOPICS[ex["topic"]]}
        assert sum(len(b.provenance) for b in stored) == sum(len(set(demo_task.TOPICS[ex["topic"]])) for _, ex in pairs)
    assert s["answered"] == len(pairs) == 6
    assert (s["accuracy_attempt1"], s["accuracy_guided"], s["accuracy_revised"]) == (0.0, 1.0, 0.0)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for r in rows:
        topic = r["id"].split("/")[1]
        assert r["behaviors"] == [f"behavior_{op}" for op in dict.fromkeys(demo_task.TOPICS[topic])]
        assert r["tokens_guided_total"] > r["tokens_guided_final"] > 0 and r["tokens_revised_total"] > 0


# ------------------------------------------------------------------ BC-SFT
def test_bcsft_teacher_under_bci_student_without(tmp_path):
    _fill_handbook(tmp_path / "hb.db")
    cfg = config(tmp_path, bci={"enabled": True, "retrieval": "topic", "k": 3})  # the student must not inherit it
    cfg.update(model={"arch": dict(TINY_LLAMA, max_position_embeddings=320), "tokenizer": {"type": "char"}},
               train={"max_steps": 2, "batch_size": 4}, eval={"at_end": False})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from metareason.plugins.behaviors.bcsft import run_bcsft

    bc = run_bcsft(str(path), [], mode="bci", quiet=True)
    plain = run_bcsft(str(path), [], mode="plain", quiet=True, train=False)
    rows = [json.loads(x) for x in open(bc["teacher"]["output"])]
    prows = [json.loads(x) for x in open(plain["teacher"]["output"])]
    assert len(rows) == len(prows) == 24 and [r["id"] for r in rows] == [r["id"] for r in prows]
    assert all(r["teacher_prompt"].startswith("Behaviors") and "behavior_" in r["completion"] for r in rows)
    assert all(not r["teacher_prompt"].startswith("Behaviors") and "behavior_" not in r["completion"] for r in prows)
    assert bc["teacher"]["teacher_completion_tokens"] < plain["teacher"]["teacher_completion_tokens"]
    student_cfg = yaml.safe_load(open(f"{bc['student_run']}/config.yaml"))
    assert student_cfg["behaviors"]["bci"]["enabled"] is False
    assert student_cfg["data"]["train"][0]["params"]["path"] == bc["teacher"]["output"]
    from metareason.checkpoint import latest_checkpoint

    assert latest_checkpoint(bc["student_run"]) is not None


SEEN_BY_TEACHER: list = []


def recording_teacher(prompt, **_):
    SEEN_BY_TEACHER.append(prompt)
    return "answer: 0"


def test_bcsft_teacher_system_prompt_sends_chat_messages(tmp_path):
    _fill_handbook(tmp_path / "hb.db")
    seen = SEEN_BY_TEACHER
    from metareason.plugins.behaviors import bcsft

    for system in (None, "Solve step by step."):
        seen.clear()
        cfg = config(tmp_path, teacher_system_prompt=system, keep_incorrect=True,
                     bci={"enabled": False, "retrieval": "topic", "k": 3})
        cfg["generators"]["teacher"]["function"] = "test_behaviors_pipeline:recording_teacher"
        kernel = Kernel(cfg)
        pairs = __import__("metareason.plugins.behaviors.examples", fromlist=["x"]).load_examples(kernel, "train")[:4]
        out = bcsft.teacher_data(kernel, pairs, "bci", tmp_path / "t.jsonl", quiet=True)
        assert out["answered"] == 4
        if system is None:
            assert all(isinstance(p, str) and p.startswith("Behaviors") for p in seen)
        else:
            assert all(p[0] == {"role": "system", "content": system} and p[1]["role"] == "user"
                       and p[1]["content"].startswith("Behaviors") for p in seen)
        rows = [json.loads(x) for x in open(tmp_path / "t.jsonl")]
        assert all(r["teacher_prompt"].startswith("Behaviors") for r in rows)  # the user's text


# ------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_cli_extract_and_handbook_commands(tmp_path):
    cfg = config(tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {"METAREASON_PLUGINS": "behaviors"}
    r = run_cli("behaviors", "extract", str(path), "--quiet", "--limit", "12", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["examples_done"] == 12 and out["behaviors_in_handbook"] >= 2
    hb = ["--config", str(path)]
    r = run_cli("behaviors", "list", *hb, "--order", "name", env=env)
    assert r.returncode == 0 and "behavior_" in r.stdout
    name = r.stdout.split("\t")[0]
    r = run_cli("behaviors", "show", *hb, name, env=env)
    assert json.loads(r.stdout)["name"] == name and json.loads(r.stdout)["provenance"]
    r = run_cli("behaviors", "search", *hb, "double the number", "-k", "1", env=env)
    assert r.returncode == 0 and "behavior_dbl" in r.stdout
    export = tmp_path / "x.jsonl"
    r = run_cli("behaviors", "export", *hb, str(export), env=env)
    assert r.returncode == 0 and export.exists()
    r = run_cli("behaviors", "import", "--handbook", str(tmp_path / "copy.db"), "--embedder", "hashing",
                str(export), env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["inserted"] == out["behaviors_in_handbook"]
    r = run_cli("behaviors", "prune", *hb, "--min-cited", "1", "--older-than", "0s", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["left"] == 0
    r = run_cli("behaviors", "stats", "--handbook", str(tmp_path / "copy.db"), "--embedder", "hashing", env=env)
    assert json.loads(r.stdout)["behaviors"] == out["behaviors_in_handbook"]
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not sqlite" * 10)
    r = run_cli("behaviors", "stats", "--handbook", str(bad), env=env)
    assert r.returncode == 2 and str(bad) in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert bad.read_bytes() == b"not sqlite" * 10


def test_missing_handbook_fails_before_training(tmp_path):
    from metareason.plugin_manager import PluginError

    cfg = config(tmp_path, handbook=str(tmp_path / "nope.db"), bci={"enabled": True, "retrieval": "topic"})
    cfg.update(model={"arch": dict(TINY_LLAMA, max_position_embeddings=320), "tokenizer": {"type": "char"}},
               train={"max_steps": 2, "batch_size": 4})
    with pytest.raises(PluginError, match="nope.db: no such handbook"):
        Kernel(cfg).run()
    assert not (tmp_path / "nope.db").exists()
    assert not list((tmp_path / "runs").glob("*/checkpoints/*"))


def test_demo_task_solutions_and_teacher_citations():
    assert demo_task.long_hand("dbl", 974) == "dbl 974: 4*2=8 7*2=14 9*2+1=19 -> 1948."
    assert demo_task.long_hand("dsum", 548) == "dsum 548: 5+4=9 9+8=17 -> 17."
    assert demo_task.long_hand("rev", 470) == "rev 470: 0 7 4 -> 74."
    text, ans = demo_task.solve("fold", 472)
    assert ans == 17 and text.endswith("answer 17")
    cited = demo_task.teacher("behavior_dbl: double the number.\nQ: fold 472\nA: ")
    assert cited == "rev 472: 2 7 4 -> 274. behavior_dbl 548. dsum 548: 5+4=9 9+8=17 -> 17. answer 17"
    task = demo_task.make_task({"split": "test"}, 0, 50)
    train_numbers = {ex["prompt"].split()[2] for ex in demo_task.make_task({"split": "train"}, 0, 10**6)}
    assert all(ex["prompt"].split()[2] not in train_numbers for ex in task)  # held-out numbers
    assert all(task.score(ex["completion"], ex) == 1.0 for ex in task)
    assert task.score("answer 12x", task[0]) == 0.0


def test_retrieval_bench_writes_records(tmp_path):
    from metareason.plugins.behaviors.retrieval_bench import generate, run_retrieval_bench

    behaviors, queries = generate(300)
    assert len({b.name for b in behaviors}) == 300
    assert not set(queries) & {b.instruction for b in behaviors}
    rec = run_retrieval_bench(n=300, queries=30, out=str(tmp_path / "r.json"), embedder="hashing", quiet=True)
    assert rec["queries"] == 30 and 0.0 <= rec["recall"]["@1"] <= rec["recall"]["@10"] <= 1.0
    assert json.loads((tmp_path / "r.json").read_text())["generated"] == 300 and (tmp_path / "r.md").exists()

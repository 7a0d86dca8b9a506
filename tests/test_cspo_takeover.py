"""Takeover-based data construction: the programmatic alter's decisions, the trigger rule
(validation keyword after at least max_target_tokens; TRIGGER_TOKENS always), and the
`metareason cspo takeover` pipeline end to end on a deterministic target (atomic JSONL with
control labels)."""
import json

import pytest

from metareason.generation.generate import HandoverState
from metareason.models import build_char_tokenizer
from metareason.models.special_tokens import add_special_tokens
from metareason.plugins.cspo.alter import ControlRequest, ProgrammaticAlter, decision_of
from metareason.plugins.cspo.config import CSPOSection
from metareason.plugins.cspo.handover import HandoverController, trigger_strings
from metareason.plugins.cspo.takeover import end_after_conclusion
from tests.conftest import run_cli, save_bigram_llama


def save_bigram(path, chain: dict, control_tokens: bool = True):
    """The bigram Llama of tests/conftest.py, with the control tags as tokens."""
    return save_bigram_llama(path, chain, ("<control>", "</control>") if control_tokens else ())


EXAMPLE = {"id": "x", "prompt": "A=3;B=A+2;C=B*2;D=C-1;D=?", "completion": "B=3+2=5;C=5*2=10;D=10-1=9;answer:9",
           "answer": "9"}


def req(text, opened=False):
    return ControlRequest(EXAMPLE["prompt"], text, "<control>" if opened else "wait", opened, EXAMPLE)


def test_programmatic_alter_decides_from_the_text_so_far():
    alter = ProgrammaticAlter()
    assert alter.decide(req("B=3+2=5;C=5*2=10;wait")) == "continue"  # not done yet
    assert alter.decide(req("B=3+2=5;C=5*2=10;D=10-1=9;wait")) == "conclude"
    assert alter.decide(req("B=3+2=5;C=5*2=11;wait")) == "revise"  # a wrong step
    # an error before an earlier control segment was already handled; the new pass is correct
    text = "B=3+2=5;C=5*2=11;wait<control>revise</control>:B=3+2=5;C=5*2=10;D=10-1=9;check"
    assert alter.decide(req(text)) == "conclude"
    assert alter.control(req("B=3+2=5;C=5*2=10;D=10-1=9;wait")) == "<control>conclude</control>answer:9"
    # the target opened the segment itself: the alter does not open it again
    assert alter.control(req("B=3+2=5;<control>", opened=True)) == "continue</control>"
    assert decision_of(" I will Conclude now") == "conclude" and decision_of("hmm") == "free"
    assert end_after_conclusion("B=1;wait<control>conclude</control>answer:9;check:B") == \
        "B=1;wait<control>conclude</control>answer:9"


def test_unsure_alter_concludes_with_the_configured_probability():
    done = "B=3+2=5;C=5*2=10;D=10-1=9;"
    texts = [done + "x" * i + "wait" for i in range(200)]
    assert {ProgrammaticAlter(0.0).decide(req(t)) for t in texts} == {"continue"}
    half = ProgrammaticAlter(0.5)
    decisions = [half.decide(req(t)) for t in texts]
    assert 60 < decisions.count("conclude") < 140 and set(decisions) == {"conclude", "continue"}
    assert decisions == [half.decide(req(t)) for t in texts]  # reproducible
    assert half.decide(req("B=3+2=5;C=5*2=11;wait")) == "revise"  # errors are still caught


def test_trigger_rule_keyword_needs_max_target_tokens():
    tok = build_char_tokenizer()
    add_special_tokens(tok, None, ["<control>", "</control>"])
    calls = []
    cfg = CSPOSection(enabled=True, max_target_tokens=10, TARGET_VALIDATION_KEYWORDS=["wait", "hold on"])
    ctl = HandoverController(cfg, tok, lambda r: calls.append(r) or "<control>continue</control>")
    assert trigger_strings(cfg) == ["<control>", "wait", "Wait", "hold on", "Hold on"]

    def state(text, trigger):
        return HandoverState("p", text, trigger, EXAMPLE, 0, 0)

    assert ctl.metareason_generation_handover(state("B=3;wait", "wait")) is None  # 8 tokens < 10
    assert ctl.metareason_generation_handover(state("B=3+2=5;wait", "wait")) == "<control>continue</control>"
    # counted from the end of the last control segment, not from the start
    assert ctl.metareason_generation_handover(state("B=3+2=5;wait<control>continue</control>;wait", "wait")) is None
    # a TRIGGER_TOKENS string is always handed over, and the alter is told the segment is open
    assert ctl.metareason_generation_handover(state("B<control>", "<control>")) is not None
    assert [c.opened for c in calls] == [False, True]
    assert (ctl.takeovers, ctl.declined) == (2, 2)


# target: after "?" writes "qwait"; after </control> "z"; after "t" (not taken over) "!" -> stop
TARGET_CHAIN = {"?": "q", "q": "w", "w": "a", "a": "i", "i": "t", "t": "!", "</control>": "z"}


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return save_bigram(tmp_path_factory.mktemp("cspo_target"), TARGET_CHAIN)


def takeover_config(tmp_path, target_dir, **cspo):
    cfg = {"name": "to", "output_dir": str(tmp_path), "plugins": ["cspo"],
           "data": {"train": [{"task": "causal_loop", "num_samples": 3, "params": {"levels": [1]}}]},
           "generation": {"max_new_tokens": 20, "batch_size": 2},
           "cspo": dict({"enabled": True, "target_model_name": str(target_dir), "ray": False,
                         "max_target_tokens": 5, "keep_incorrect": True}, **cspo)}
    path = tmp_path / "takeover.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def test_takeover_cli_writes_sft_data_with_control_labels(tmp_path, target_dir):
    res = run_cli("cspo", "takeover", str(takeover_config(tmp_path, target_dir)), "--quiet",
                  env={"METAREASON_PLUGINS": "cspo"})
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    rows = [json.loads(l) for l in (tmp_path / "to" / "takeover.jsonl").read_text().splitlines()]
    assert summary["records"] == len(rows) == 3 and summary["decisions"] == {"continue": 3}
    for row in rows:
        # the target wrote "qwait", the alter the control segment, the target resumed with "z"
        assert row["completion"] == "qwait<control>continue</control>z"
        assert row["controls"] == [{"decision": "continue", "content": "continue"}]
        assert row["target_tokens"] == 6 and row["prompt"].endswith("?")
    assert not list((tmp_path / "to").glob(".*tmp*"))  # written atomically, no temp file left


def test_takeover_declines_below_max_target_tokens(tmp_path, target_dir):
    from metareason.plugins.cspo.takeover import run_takeover

    summary = run_takeover(str(takeover_config(tmp_path, target_dir, max_target_tokens=50)), quiet=True)
    rows = [json.loads(l) for l in (tmp_path / "to" / "takeover.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows] == ["qwait!"] * 3 and summary["declined_triggers"] == 3
    assert all(r["controls"] == [] for r in rows)


def test_hidden_continue_is_in_the_transcript_but_not_seen_by_the_target(tmp_path, target_dir):
    from metareason.plugins.cspo.takeover import run_takeover

    run_takeover(str(takeover_config(tmp_path, target_dir, hide_from_target=["continue"])), quiet=True)
    rows = [json.loads(l) for l in (tmp_path / "to" / "takeover.jsonl").read_text().splitlines()]
    # the target went on after "t" with "!" (had it seen the segment it would have written "z")
    assert [r["completion"] for r in rows] == ["qwait<control>continue</control>!"] * 3
    assert all(r["controls"] == [{"decision": "continue", "content": "continue"}] for r in rows)


def test_takeover_errors_name_the_field(tmp_path, target_dir):
    res = run_cli("cspo", "takeover", str(takeover_config(tmp_path, target_dir, enabled=False)),
                  env={"METAREASON_PLUGINS": "cspo"})
    assert res.returncode == 2 and "cspo.enabled: must be true" in res.stderr
    res = run_cli("cspo", "takeover", str(takeover_config(tmp_path, tmp_path / "nope")),
                  env={"METAREASON_PLUGINS": "cspo"})
    assert res.returncode == 2 and "cspo.target_model_name:" in res.stderr and "no such directory" in res.stderr
    res = run_cli("cspo", "takeover", str(takeover_config(tmp_path, target_dir, alter_model_name=str(tmp_path))),
                  env={"METAREASON_PLUGINS": "cspo"})
    assert res.returncode == 2 and "cspo.alter_model_name:" in res.stderr
    res = run_cli("cspo", "takeover", str(takeover_config(tmp_path, target_dir, max_target_tokens=-1)),
                  env={"METAREASON_PLUGINS": "cspo"})
    assert res.returncode == 2 and "cspo.max_target_tokens" in res.stderr
    assert not (tmp_path / "to" / "takeover.jsonl").exists()  # nothing half-written


def test_infer_runs_alternating_inference_on_eval_prompts(tmp_path, target_dir):
    import yaml

    from metareason.plugins.cspo.takeover import run_infer

    path = takeover_config(tmp_path, target_dir)
    raw = yaml.safe_load(path.read_text())
    raw["data"] = {"eval": [{"task": "causal_loop", "num_samples": 4, "seed": 3, "params": {"levels": [1]}}]}
    path.write_text(yaml.safe_dump(raw))
    summary = run_infer(str(path), quiet=True)
    rows = [json.loads(l) for l in (tmp_path / "to" / "alternating.jsonl").read_text().splitlines()]
    assert summary["prompts"] == len(rows) == 4 and summary["accuracy"] == 0.0
    for row in rows:
        assert row["completion"] == "qwait<control>continue</control>z"
        assert row["handovers"] == [{"round": 0, "trigger": "wait", "text": "<control>continue</control>"}]

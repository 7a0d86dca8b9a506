"""memory_reason: step-type tokens (names, counts, initialisation from word embeddings), typed
steps in data (cot_steps, [memory]/[rag]/[reason] markers), conversion through the kernel's
example hook, the synthetic world, the jsonl loader, step analysis and error attribution."""
import json

import pytest
import torch

from metareason import Kernel
from metareason.config import ConfigError
from metareason.data.base import TaskError
from metareason.plugin_manager import PluginError
from metareason.models import build_char_tokenizer
from metareason.models.special_tokens import SpecialToken, add_special_tokens
from metareason.plugins.memory_reason.analysis import analyse, attribute_error
from metareason.plugins.memory_reason.config import MemoryReasonSection
from metareason.plugins.memory_reason.steps import parse_generated, parse_markers, render
from metareason.plugins.memory_reason.tasks import build_world, make_jsonl_task, make_world_task
from metareason.plugins.memory_reason.tokens import special_tokens, vocabulary
from metareason.train.loop import load_train_examples

from conftest import TINY_LLAMA

STEPS = [{"type": "memory", "text": "Ava has 3 pens."}, {"type": "memory", "text": "Bo has 4 pens."},
         {"type": "reason", "text": "3+4=7"}]


def config(tmp_path, **mr):
    section = dict(enabled=True, mode="full")
    section.update(mr)
    return {"name": "mr", "output_dir": str(tmp_path), "quiet": True,
            "model": {"arch": dict(TINY_LLAMA, tie_word_embeddings=True), "tokenizer": {"type": "char"}, "device": "cpu"},
            "data": {"max_length": 256,
                     "train": [{"task": "memory_world", "num_samples": 16, "params": {"entities": 4, "attributes": 1}}],
                     "eval": [{"task": "memory_world", "num_samples": 4, "seed": 1,
                               "params": {"entities": 4, "attributes": 1, "split": "heldout"}}]},
            "train": {"max_steps": 2, "batch_size": 4, "log_every": 1},
            "generation": {"max_new_tokens": 8},
            "memory_reason": section}


# ------------------------------------------------------------------------------- tokens
def test_token_names_and_counts_are_configurable():
    sec = MemoryReasonSection(enabled=True, n_prefix=3, n_special=2, memory_name="rag", prefix_name="p")
    voc = vocabulary(sec)
    assert voc.prefix == "<p_0><p_1><p_2>"
    assert voc.types == {"memory": "<rag_0><rag_1>", "reason": "<reason_0><reason_1>", "answer": "<answer_0><answer_1>"}
    toks = special_tokens(sec)
    assert [t.text for t in toks] == ["<p_0>", "<p_1>", "<p_2>", "<rag_0>", "<rag_1>", "<reason_0>", "<reason_1>",
                                      "<answer_0>", "<answer_1>"]
    assert [t.init_from for t in toks] == [()] * 3 + [("memory",)] * 2 + [("reason",)] * 2 + [("answer",)] * 2


def test_bad_names_and_mode_combinations_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="memory_reason.memory_name"):
        Kernel(config(tmp_path, memory_name="a b"))
    with pytest.raises(ConfigError, match="memory_reason: .*must differ"):
        Kernel(config(tmp_path, reason_name="memory"))
    with pytest.raises(ConfigError, match="needs step_tokens: true"):
        Kernel(config(tmp_path, step_tokens=False, mode="prompt-tuning"))
    with pytest.raises(PluginError, match="memory_reason.mode: lora\\+prompt-tuning needs model.lora.enabled"):
        Kernel(config(tmp_path, mode="lora+prompt-tuning")).load()
    raw = config(tmp_path, mode="full")
    raw["model"]["lora"] = {"enabled": True, "r": 4}
    with pytest.raises(PluginError, match="memory_reason.mode: full trains every weight"):
        Kernel(raw).load()


def test_multi_piece_word_initialises_a_row_at_the_mean_of_its_pieces():
    """Kernel special-token init (core/models/special_tokens.py): the char tokenizer splits
    "memory" into m,e,m,o,r,y; the new row is their mean (m twice), in the input and the
    untied output matrix; a token without a word gets the vocabulary mean."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    tok = build_char_tokenizer()
    arch = dict(TINY_LLAMA)
    cfg = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tok), tie_word_embeddings=False, **arch)
    model = AutoModelForCausalLM.from_config(cfg)
    n_old = len(tok)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    ids = add_special_tokens(tok, model, [SpecialToken("<memory_0>", init_from=("memory",)), SpecialToken("<prefix_0>")])
    pieces = [tok.convert_tokens_to_ids(c) for c in "memory"]
    for weight, before in ((model.get_input_embeddings().weight, before_in),
                           (model.get_output_embeddings().weight, before_out)):
        assert torch.allclose(weight[ids[0]], before[pieces].mean(0), atol=1e-6)
        assert not torch.allclose(weight[ids[0]], before[pieces[:1]].mean(0))
        assert torch.allclose(weight[ids[1]], before[:n_old].mean(0), atol=1e-6)
        assert torch.equal(weight[:n_old], before)


def test_kernel_adds_the_tokens_initialised_from_their_words(tmp_path):
    kernel = Kernel(config(tmp_path, n_prefix=2, n_special=2))
    model, tok = kernel.load()
    emb = model.get_input_embeddings().weight
    reason = [tok.convert_tokens_to_ids(c) for c in "reason"]
    for j in range(2):
        assert torch.allclose(emb[tok.convert_tokens_to_ids(f"<reason_{j}>")], emb[reason].mean(0), atol=1e-6)
    assert tok("<prefix_0><memory_1> x", add_special_tokens=False)["input_ids"][:2] == [
        tok.convert_tokens_to_ids("<prefix_0>"), tok.convert_tokens_to_ids("<memory_1>")]
    off = Kernel(config(tmp_path, n_prefix=2) | {"memory_reason": {"enabled": False}})
    _, plain_tok = off.load()
    assert "<memory_0>" not in plain_tok.get_vocab()


# ------------------------------------------------------------------------------- data
def test_markers_in_text_memory_rag_reason_inline_and_multiline():
    got = parse_markers("[memory]: Ava has 3 pens. [rag]: Bo has\n 4 pens.\n[reason]: 3+4=7", "row 1")
    assert got == STEPS
    with pytest.raises(TaskError, match="row 2: text before the first step marker"):
        parse_markers("so [reason]: x", "row 2")
    with pytest.raises(TaskError, match="row 3: no step marker"):
        parse_markers("just text", "row 3")


def test_render_typed_and_plain_and_parse_back():
    sec = MemoryReasonSection(enabled=True, n_prefix=2, n_special=2)
    voc = vocabulary(sec)
    typed = render(STEPS, "7", voc, True, sec.answer_prefix)
    assert typed.split("\n") == [
        "<memory_0><memory_1> Ava has 3 pens.",
        "<prefix_0><prefix_1><memory_0><memory_1> Bo has 4 pens.",
        "<prefix_0><prefix_1><reason_0><reason_1> 3+4=7",
        "<prefix_0><prefix_1><answer_0><answer_1> The answer is: 7"]
    assert render(STEPS, "7", voc, False, sec.answer_prefix) == "Ava has 3 pens.\nBo has 4 pens.\n3+4=7\nThe answer is: 7"
    steps = parse_generated(typed, voc)
    assert [(s.type, s.text) for s in steps] == [("memory", "Ava has 3 pens."), ("memory", "Bo has 4 pens."),
                                                ("reason", "3+4=7"), ("answer", "The answer is: 7")]
    assert typed[steps[1].start: steps[1].end].endswith("Bo has 4 pens.")


def test_kernel_converts_training_examples_and_appends_prefix_to_the_prompt(tmp_path):
    kernel = Kernel(config(tmp_path, n_prefix=2, n_special=1))
    ex = load_train_examples(kernel)[0]
    lines = ex["completion"].split("\n")
    assert lines[0].startswith("<memory_0> ") and lines[1].startswith("<prefix_0><prefix_1><memory_0> ")
    assert lines[2].startswith("<prefix_0><prefix_1><reason_0> ")
    assert lines[3] == f"<prefix_0><prefix_1><answer_0> The answer is: {ex['answer']}"
    prompt = kernel.chain("metareason_transform_prompt", "prompt", ex["prompt"], example=ex, config=kernel.config)
    assert prompt == ex["prompt"] + "<prefix_0><prefix_1>"
    off = Kernel(config(tmp_path) | {"memory_reason": {"enabled": False}})
    plain = load_train_examples(off)[0]
    assert "<" not in plain["completion"] and plain["completion"].endswith(f"The answer is: {plain['answer']}")
    assert off.chain("metareason_transform_prompt", "prompt", "Q", example=plain, config=off.config) == "Q"


def test_kernel_jsonl_task_with_marker_completions_is_converted(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "Q1", "answer": "7",
                                "cot": "[rag]: Ava has 3 pens. [reason]: 3+4=7"}) + "\n")
    raw = config(tmp_path, n_prefix=1, n_special=1)
    raw["data"]["train"] = [{"task": "jsonl", "num_samples": 1, "params": {"path": str(data), "completion_field": "cot"}}]
    ex = load_train_examples(Kernel(raw))[0]
    assert ex["completion"] == "<memory_0> Ava has 3 pens.\n<prefix_0><reason_0> 3+4=7\n<prefix_0><answer_0> The answer is: 7"
    assert ex["cot_steps"][0] == {"type": "memory", "text": "Ava has 3 pens."}


def test_memory_reason_jsonl_loader_strategyqa_style(tmp_path):
    path = tmp_path / "sqa.jsonl"
    rows = [{"question": "Did X?", "answer": True, "cot_steps": [{"type": "rag", "text": "X did."},
                                                                  {"type": "reason", "text": "So yes."}]},
            {"question": "Did Y?", "answer": False, "cot_steps": "[memory]: Y did not. [reason]: So no."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = make_jsonl_task({"path": str(path), "shuffle": False}, 0, 10)
    assert [e["answer"] for e in task] == ["yes", "no"]
    assert task[0]["cot_steps"] == [{"type": "memory", "text": "X did."}, {"type": "reason", "text": "So yes."}]
    assert task[1]["prompt"] == "Q: Did Y?\n"
    assert task.score("<answer_0> The answer is: Yes", task[0]) == 1.0
    assert task.score("The answer is: no", task[0]) == 0.0
    path.write_text(json.dumps({"question": "q", "answer": "a", "cot_steps": [{"type": "guess", "text": "t"}]}) + "\n")
    with pytest.raises(TaskError, match=r"sqa.jsonl:1: cot_steps: cot_steps\[0\].type: 'guess'"):
        make_jsonl_task({"path": str(path)}, 0, 10)
    with pytest.raises(TaskError, match="^params.steps_fieldd: unknown field$"):
        make_jsonl_task({"path": str(path), "steps_fieldd": "x"}, 0, 10)
    with pytest.raises(TaskError, match=r"^params.prompt_template: Value error, must contain \{question\} \(got 'Q'\)$"):
        make_jsonl_task({"path": str(path), "prompt_template": "Q"}, 0, 10)


@pytest.mark.parametrize("params,message", [
    ({"entities": 1}, "params.entities: Input should be greater than or equal to 2 (got 1)"),
    ({"entities": True}, "params.entities: Input should be a valid integer (got True)"),
    ({"split": "test"}, "params.split: Input should be 'train', 'heldout' or 'val' (got 'test')"),
    ({"heldout_fraction": "0.2"}, "params.heldout_fraction: Input should be a valid number (got '0.2')"),
    ({"mix": {"facts": 0}}, "params.mix: Value error, at least one part needs a weight above 0 (got {'facts': 0})"),
    ({"colour": 1}, "params.colour: unknown field"),
])
def test_world_params_are_a_pydantic_model_with_the_configs_errors(params, message):
    with pytest.raises(TaskError) as err:
        make_world_task(params, 0, 4)
    assert str(err.value) == message


def test_world_facts_fixed_by_seed_and_heldout_questions_over_trained_facts():
    assert build_world(6, 2, 3, 9) == build_world(6, 2, 3, 9)
    assert build_world(6, 2, 3, 9) != build_world(6, 2, 4, 9)
    train = make_world_task({"entities": 6, "attributes": 2}, 0, 2000)
    held = make_world_task({"entities": 6, "attributes": 2, "split": "heldout"}, 0, 2000)
    assert {e["id"] for e in train}.isdisjoint({e["id"] for e in held}) and len(held) > 0
    seen = {(f["entity"], f["attribute"]) for e in train for f in e["facts"]}
    for e in held:
        assert {(f["entity"], f["attribute"]) for f in e["facts"]} <= seen
        x, y = (f["value"] for f in e["facts"])
        assert int(e["answer"]) == (x + y if e["group"] == "sum" else x - y)
        assert [s["type"] for s in e["cot_steps"]] == ["memory", "memory", "reason"]
        assert held.score(e["completion"], e) == 1.0
    with pytest.raises(TaskError, match="params.split"):
        make_world_task({"split": "test"}, 0, 1)


# ------------------------------------------------------------------------------- analysis
def _gen(lines):
    voc = vocabulary(MemoryReasonSection(enabled=True, n_prefix=1, n_special=1))
    return parse_generated("\n".join(lines), voc)


def test_error_attribution_first_wrong_step_decides():
    right = ["<memory_0> Ava has 3 pens.", "<prefix_0><memory_0> Bo has 4 pens.", "<prefix_0><reason_0> 3+4=7",
             "<prefix_0><answer_0> The answer is: 7"]
    bad_memory = right[:1] + ["<prefix_0><memory_0> Bo has 5 pens.", "<prefix_0><reason_0> 3+5=8",
                              "<prefix_0><answer_0> The answer is: 8"]
    bad_reason = right[:2] + ["<prefix_0><reason_0> 3+4=8", "<prefix_0><answer_0> The answer is: 8"]
    bad_answer = right[:3] + ["<prefix_0><answer_0> The answer is: 9"]
    missing = right[:1] + ["<prefix_0><answer_0> The answer is: 3"]
    assert attribute_error(_gen(bad_memory), STEPS) == "memory"
    assert attribute_error(_gen(bad_reason), STEPS) == "reason"
    assert attribute_error(_gen(bad_answer), STEPS) == "neither"
    assert attribute_error(_gen(missing), STEPS) == "memory"
    plain = ["Ava has 3 pens.", "Bo has 4 pens.", "3+4=1", "The answer is: 1"]  # no type tokens: same rule
    assert attribute_error(_gen(plain), STEPS) == "reason"


def test_analyse_counts_steps_types_and_shares():
    voc = vocabulary(MemoryReasonSection(enabled=True, n_prefix=1, n_special=1))
    ex = {"cot_steps": STEPS}
    samples = [
        {"completion": "<memory_0> Ava has 3 pens.\n<prefix_0><memory_0> Bo has 4 pens.\n<prefix_0><reason_0> 3+4=7\n"
                       "<prefix_0><answer_0> The answer is: 7", "score": 1.0, "example": ex},
        {"completion": "<memory_0> Ava has 2 pens.\n<prefix_0><reason_0> 2+4=6\n<prefix_0><answer_0> The answer is: 6",
         "score": 0.0, "example": ex},
        {"completion": "<memory_0> Ava has 3 pens.\n<prefix_0><memory_0> Bo has 4 pens.\n<prefix_0><reason_0> 3+4=9\n"
                       "<prefix_0><answer_0> The answer is: 9", "score": 0.0, "example": ex},
        {"completion": "<memory_0> Ava has 3 pens.\n<prefix_0><memory_0> Bo has 4 pens.\n<prefix_0><memory_0> 3+4=7\n"
                       "<prefix_0><answer_0> The answer is: 8", "score": 0.0, "example": ex},
    ]
    s = analyse(samples, voc, "The answer is: ")
    assert s["memory_steps"] == pytest.approx((2 + 1 + 2 + 3) / 4)
    assert s["reason_steps"] == pytest.approx((1 + 1 + 1 + 0) / 4)
    assert s["steps"] == pytest.approx((3 + 2 + 3 + 3) / 4)
    assert s["wrong"] == 3 and s["attributed"] == 3
    assert (s["error_memory"], s["error_reason"], s["error_neither"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    # typed steps whose type matches the gold type at the same position
    assert s["type_accuracy"] == pytest.approx((3 + 1 + 3 + 2) / (3 + 2 + 3 + 3))


def test_compare_report_averages_over_seeds():
    from metareason.plugins.memory_reason.compare import KEYS, markdown

    def row(acc, seed):
        r = {k: None for k in KEYS}
        r.update({"eval/accuracy": acc, "eval/gen_tokens": 50.0, "eval/memory_reason/wrong": 10.0,
                  "eval/memory_reason/error_reason": acc, "seed": seed, "trainable_params": 5, "total_params": 9,
                  "wall_s": 10.0})
        return r

    record = {"command": "metareason memory_reason compare --seeds 0,1", "cpu": "cpu", "torch": "t",
              "omp_threads": "1", "seeds": [0, 1], "base": {"accuracy": 1.0},
              "variants": {"plain CoT SFT": [row(0.25, 0), row(0.75, 1)]}}
    md = markdown(record)
    assert "| plain CoT SFT | 0.500 (0.250, 0.750) | 50.0 |" in md
    assert "| 0.500 | n/a |" in md and "5 of 9" in md

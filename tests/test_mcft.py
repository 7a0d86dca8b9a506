"""mcft mechanisms on a tiny Llama through the kernel: critique masking that reaches the loss
(exactly zero gradient where masked, binomial fraction, nothing outside <think>, per example and
epoch), the format term with a real gradient (bf_beta > 0 moves it, bf_beta = 0 is the plain
loss), answer extraction / equivalence, the data loader, entropy flags, the causal-loop teacher."""
import json
import math
import subprocess
import sys

import pytest
import torch

from metareason import Kernel
from metareason.data.tokenize import IGNORE_INDEX, SFTStream, collate, encode_examples
from metareason.train.sft import collect_extra_losses, token_loss
from tests.conftest import TINY_LLAMA

from metareason.plugins.mcft import answers, entropy, format as fmt, masking, teacher
from metareason.plugins.mcft.data import make_task
from metareason.plugins.mcft.format_loss import rl_format_term, sft_format_term
from metareason.data.base import TaskError


def write_rows(path, n=40, long=1, **extra):
    from metareason.data.causal_loop import make_task as cl_task

    rows = []
    for i, e in enumerate(cl_task({"levels": [1]}, 0, n)):
        att = teacher.noisy_solver(e["prompt"], seed=0)
        crit, reasoning, ans = teacher.critique(e["prompt"], att)
        rows.append(dict({"id": f"r{i}", "prompt": e["prompt"], "cot": att, "critique": crit * long,
                          "reasoning": reasoning, "answer": str(ans), "answer_match": True}, **extra))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def tiny_config(tmp_path, data, name="m", **mcft):
    return {"name": name, "output_dir": str(tmp_path), "plugins": ["mcft"], "quiet": True,
            "model": {"arch": dict(TINY_LLAMA, max_position_embeddings=512), "tokenizer": {"type": "char"}},
            "data": {"max_length": 512,
                     "train": [{"task": "mcft", "num_samples": 1000, "params": {"path": str(data), "system": "S"}}],
                     "eval": [{"task": "mcft", "num_samples": 4, "params": {"path": str(data), "system": "S"}}]},
            "train": {"max_steps": 2, "batch_size": 4, "log_every": 1, "seed": 0},
            "generation": {"max_new_tokens": 8},
            "eval": {"at_end": False},
            "mcft": dict({"enabled": True}, **mcft)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mcft")
    data = tmp / "crit.jsonl"
    write_rows(data, n=64)
    torch.manual_seed(0)
    k = Kernel(tiny_config(tmp, data))
    model, tok = k.load()
    task = k.build_task(k.config.data.train[0])
    examples = [task[i] for i in range(len(task))]
    return k, model, tok, examples, tmp, data


def batch_of(tok, examples, epoch=0):
    enc = encode_examples(tok, [e["prompt"] for e in examples], [e["completion"] for e in examples], 512)
    stream = SFTStream(examples, enc, len(examples), 0, tok.pad_token_id, group_by_length=False)
    stream.position = epoch * len(examples)
    return stream.next_batch()


def think_span(tok, ids_row):
    open_id, close_id = tok.convert_tokens_to_ids(fmt.THINK), tok.convert_tokens_to_ids(fmt.THINK_END)
    row = ids_row.tolist()
    return row.index(open_id), row.index(close_id)


# ---------------------------------------------------------------------------------- masking
def test_sft_stream_batches_carry_their_epoch(setup):
    _, _, tok, examples, _, _ = setup
    assert batch_of(tok, examples[:8], epoch=0)["epoch"] == 0
    b = batch_of(tok, examples[:8], epoch=3)
    assert b["epoch"] == 3 and isinstance(b["epoch"], int)


def test_masked_positions_get_exactly_zero_gradient_in_a_real_backward(setup):
    k, model, tok, examples, _, _ = setup
    batch = batch_of(tok, examples[:8])
    labels = k.chain("metareason_sft_labels", "labels", batch["labels"], batch=batch, tokenizer=tok, config=k.config)
    dropped = (batch["labels"] != IGNORE_INDEX) & (labels == IGNORE_INDEX)
    assert int(dropped.sum()) > 10
    outputs = model(input_ids=batch["input_ids"], use_cache=False)
    outputs.logits.retain_grad()
    loss, _ = token_loss(outputs.logits, labels)
    loss.backward()
    g = outputs.logits.grad.abs().sum(-1)  # [B, T]: the logits at t-1 predict token t
    b, t = dropped.nonzero(as_tuple=True)
    assert torch.all(g[b, t - 1] == 0)
    kept = labels != IGNORE_INDEX
    kept[:, 0] = False
    kb, kt = kept.nonzero(as_tuple=True)
    assert torch.all(g[kb, kt - 1] > 0)
    model.zero_grad(set_to_none=True)


def test_masked_fraction_is_threshold_within_binomial_error_and_only_inside_think(setup):
    k, model, tok, examples, tmp, data = setup
    dropped_total = candidates_total = 0
    for threshold in (0.2,):
        for epoch in range(6):
            batch = batch_of(tok, examples, epoch)
            labels = k.chain("metareason_sft_labels", "labels", batch["labels"], batch=batch, tokenizer=tok,
                             config=k.config)
            dropped = (batch["labels"] != IGNORE_INDEX) & (labels == IGNORE_INDEX)
            for i in range(len(examples)):
                lo, hi = think_span(tok, batch["input_ids"][i])
                inside = torch.zeros_like(dropped[i])
                inside[lo + 1: hi] = True
                assert not bool((dropped[i] & ~inside).any()), "a token outside <think> was masked"
                assert torch.equal(labels[i][~inside], batch["labels"][i][~inside])
                candidates_total += int(inside.sum())
                dropped_total += int(dropped[i].sum())
    frac = dropped_total / candidates_total
    se = math.sqrt(0.2 * 0.8 / candidates_total)
    assert abs(frac - 0.2) < 4 * se, (frac, candidates_total)


def test_masking_is_reproducible_per_example_and_epoch_and_differs_across_epochs(setup):
    k, _, tok, examples, _, _ = setup

    def masked(epoch, exs):
        batch = batch_of(tok, exs, epoch)
        labels = k.chain("metareason_sft_labels", "labels", batch["labels"], batch=batch, tokenizer=tok,
                         config=k.config)
        n = batch["attention_mask"].sum(1)
        return {e["id"]: (labels[i] == IGNORE_INDEX)[: int(n[i])] for i, e in enumerate(batch["examples"])}

    a = masked(0, examples[:8])
    b = masked(0, examples[4:12])  # another batch (other padding width), same epoch
    for key in set(a) & set(b):
        assert torch.equal(a[key], b[key])
    assert len(set(a) & set(b)) == 4
    assert masked(0, examples[:8]) .keys() == a.keys()
    c = masked(1, examples[:8])
    assert all(torch.equal(x, y) for x, y in zip(a.values(), masked(0, examples[:8]).values()))
    assert sum(not torch.equal(a[key], c[key]) for key in a) >= 6


def test_example_seed_is_a_stable_hash_not_pythons_salted_one():
    code = ("from metareason.plugins.mcft.masking import example_seed; "
            "print(example_seed('causal_loop/0/17', 3, 5))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": s, "PATH": "/usr/bin"}).stdout.strip() for s in ("1", "2")}
    assert outs == {str(masking.example_seed("causal_loop/0/17", 3, 5))}
    assert masking.example_seed("x", 0) != masking.example_seed("x", 1)


def test_offset_keeps_the_first_tokens_after_think_and_threshold_one_masks_the_rest(setup):
    k, _, tok, examples, _, _ = setup
    batch = batch_of(tok, examples[:4])
    ids = dict(think_id=tok.convert_tokens_to_ids(fmt.THINK), think_end_id=tok.convert_tokens_to_ids(fmt.THINK_END))
    new, dropped = masking.critique_mask(batch["input_ids"], batch["labels"], batch["prompt_lengths"],
                                         batch["examples"], 0, threshold=1.0, offset=5, **ids)
    for i in range(4):
        lo, hi = think_span(tok, batch["input_ids"][i])
        assert not bool(dropped[i, : lo + 6].any())
        assert bool(dropped[i, lo + 6: hi].all())
        assert not bool(dropped[i, hi:].any())


def test_chain_friendly_already_masked_labels_stay_masked_and_disabled_is_inactive(setup, tmp_path):
    k, _, tok, examples, _, data = setup
    batch = batch_of(tok, examples[:4])
    pre = batch["labels"].clone()
    pre[:, ::3] = IGNORE_INDEX  # an earlier plugin's masking
    out = k.chain("metareason_sft_labels", "labels", pre, batch=batch, tokenizer=tok, config=k.config)
    assert torch.all(out[pre == IGNORE_INDEX] == IGNORE_INDEX)
    off = Kernel(tiny_config(tmp_path, data, enabled=False))
    assert off.chain("metareason_sft_labels", "labels", pre, batch=batch, tokenizer=tok, config=off.config) is pre
    zero = Kernel(tiny_config(tmp_path, data, threshold=0.0))
    assert zero.chain("metareason_sft_labels", "labels", pre, batch=batch, tokenizer=tok, config=zero.config) is pre


# ------------------------------------------------------------------------------ format term
def _grads(k, model, tok, batch, with_extra=True):
    model.zero_grad(set_to_none=True)
    outputs = model(input_ids=batch["input_ids"], use_cache=False)
    loss, _ = token_loss(outputs.logits, batch["labels"])
    terms = collect_extra_losses(k, model, batch, outputs, 0) if with_extra else {}
    for _, (w, t) in terms.items():
        loss = loss + w * t
    loss.backward()
    g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), g, terms


def test_format_term_changes_the_gradient_and_bf_beta_zero_is_exactly_the_plain_loss(setup, tmp_path):
    k, model, tok, examples, _, data = setup
    batch = batch_of(tok, examples[:4])
    plain_loss, plain_g, _ = _grads(k, model, tok, batch, with_extra=False)
    loss, g, terms = _grads(k, model, tok, batch)
    assert set(terms) == {"mcft_format"} and terms["mcft_format"][0] == 0.05
    assert 0 < float(terms["mcft_format"][1].detach()) < 1
    assert not torch.allclose(g, plain_g, atol=0, rtol=0) and loss != plain_loss
    zero = Kernel(tiny_config(tmp_path, data, bf_beta=0.0))
    zero.config = zero.config  # the same run with bf_beta = 0
    loss0, g0, terms0 = _grads(zero, model, tok, batch)
    assert terms0 == {} and loss0 == plain_loss and torch.equal(g0, plain_g)


def test_format_term_is_one_minus_the_mean_tag_probability_and_a_step_raises_it(setup):
    k, model, tok, examples, _, _ = setup
    batch = batch_of(tok, examples[:4])
    tags = [tok.convert_tokens_to_ids(t) for t in fmt.TAGS]
    import copy
    peaked = copy.deepcopy(model)  # far from uniform, so every position has its own distribution
    with torch.no_grad():
        peaked.get_output_embeddings().weight.mul_(10.0)
    logits = peaked(input_ids=batch["input_ids"], use_cache=False).logits
    term = sft_format_term(logits, batch["input_ids"], batch["prompt_lengths"], batch["attention_mask"], tags)
    probs = torch.softmax(logits.detach().float(), -1)
    ps = []
    for b in range(4):
        for t in range(int(batch["prompt_lengths"][b]), int(batch["attention_mask"][b].sum())):
            if int(batch["input_ids"][b, t]) in tags:
                ps.append(float(probs[b, t - 1, batch["input_ids"][b, t]]))
    assert len(ps) == 4 * 8
    assert 1 - float(term.detach()) == pytest.approx(sum(ps) / len(ps), rel=1e-3)
    # one SGD step on the term alone moves the weights toward the format
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    before = sft_format_term(m(input_ids=batch["input_ids"]).logits, batch["input_ids"], batch["prompt_lengths"],
                             batch["attention_mask"], tags)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = sft_format_term(m(input_ids=batch["input_ids"]).logits, batch["input_ids"], batch["prompt_lengths"],
                                batch["attention_mask"], tags)
    assert float(after) < float(before.detach()) - 1e-4


def test_rl_format_term_has_a_gradient_through_the_completion_logps():
    logps = torch.log(torch.full((2, 4), 0.5)).requires_grad_()
    ids = torch.tensor([[5, 100, 7, 101], [100, 1, 2, 3]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    term = rl_format_term(logps, ids, mask, [100, 101])
    assert float(term) == pytest.approx(0.5)
    term.backward()
    expect = torch.zeros(2, 4)
    expect[0, 1] = expect[0, 3] = expect[1, 0] = -0.5 / 3
    assert torch.allclose(logps.grad, expect)
    assert rl_format_term(logps, torch.zeros(2, 4, dtype=torch.long), mask, [100]) is None


def test_mcft_loss_hook_in_the_rl_call_uses_the_sampled_tags(setup):
    k, _, tok, _, _, _ = setup
    tags = [tok.convert_tokens_to_ids(t) for t in fmt.TAGS]
    comp = torch.tensor([[tags[0], 40, tags[1], 0]])
    batch = {"rl": True, "width": 4, "completion_ids": comp, "input_ids": torch.cat([torch.tensor([[1, 2]]), comp], 1),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]])}
    from types import SimpleNamespace
    logps = torch.log(torch.tensor([[0.2, 0.9, 0.4, 0.9]])).requires_grad_()
    terms = collect_extra_losses(k, None, batch, SimpleNamespace(logps=logps, logits=None), 0)
    assert float(terms["mcft_format"][1]) == pytest.approx(1 - 0.3)


# ------------------------------------------------------------------------ format and answers
def test_format_regex_accepts_only_the_full_format():
    good = fmt.build_completion("c", "r", r"\frac{1}{2}")
    assert fmt.is_well_formed(good) and fmt.format_reward([good, good + "x"]) == [1.0, 0.0]
    for bad in ("<think><critique></critique><reasoning>r</reasoning></think><ans>\\boxed{1}</ans>",
                "<think><reasoning>r</reasoning><critique>c</critique></think><ans>\\boxed{1}</ans>",
                "<think><critique>c</critique><reasoning>r</reasoning><ans>\\boxed{1}</ans></think>",
                "<think><critique>c</critique><reasoning>r</reasoning></think><ans>\\boxed{1}}</ans>",
                "<think><critique>c</critique><reasoning>r</reasoning></think><ans>1</ans>"):
        assert not fmt.is_well_formed(bad), bad


@pytest.mark.parametrize("text,want", [
    (r"so \boxed{\frac{1}{2}} done", r"\frac{1}{2}"),
    (r"\boxed{a_{1}} then \boxed{\sqrt{\frac{3}{4}}}", r"\sqrt{\frac{3}{4}}"),
    ("The answer is 42.", "42"),
    ("Final answer: x+1\nmore", "x+1"),
    ("B=1+2=3;answer:3", "3"),
    ("nothing here", None),
    (r"\boxed{unclosed", None),
])
def test_answer_extraction(text, want):
    assert answers.extract_answer(text) == want


@pytest.mark.parametrize("pred,gold,same", [
    (r"\frac{1}{2}", "0.5", True), ("1/2", r"\frac12", True), ("5 cm", "5", True), ("10\\%", "10", True),
    (r"\sqrt 2", r"\sqrt{2}", True), ("x+1", "1+x", True), ("12", "13", False), ("$7$", "7", True),
    ("Paris", "London", False), ("Paris.", "Paris", True), (None, "1", False),
])
def test_answer_equivalence(pred, gold, same):
    assert answers.answers_equivalent(pred, gold) is same


def test_equivalence_falls_back_to_exact_match_when_math_verify_fails(monkeypatch):
    import math_verify

    def boom(*a, **k):
        raise RuntimeError("parser down")

    monkeypatch.setattr(math_verify, "parse", boom)
    assert answers.answers_equivalent(" 7 ", "7") and not answers.answers_equivalent("1/2", "0.5")


def test_rewards_are_registered_and_score(setup):
    k = setup[0]
    good = fmt.build_completion("c", "r", "0.5")
    assert k.rewards.get("mcft_correct")([good, "Answer: 3"], [{"answer": "1/2"}, {"answer": "4"}]) == [1.0, 0.0]
    assert k.rewards.get("mcft_format")([good, "Answer: 3"], [{}, {}]) == [1.0, 0.0]


# ------------------------------------------------------------------------------------- data
def test_csv_and_jsonl_load_and_answer_match_false_is_dropped_and_counted(tmp_path):
    rows = write_rows(tmp_path / "a.jsonl", n=10)
    rows[3]["answer_match"] = False
    rows[5]["answer_match"] = "false"
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import csv
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for name in ("a.jsonl", "a.csv"):
        task = make_task({"path": str(tmp_path / name), "shuffle": False}, 0, 100)
        assert len(task) == 8 and task.dropped == 2
        ex = task[0]
        assert ex["prompt"].startswith(fmt.SYSTEM_INSTRUCTION) and rows[0]["cot"] in ex["prompt"]
        assert ex["completion"] == fmt.build_completion(rows[0]["critique"], rows[0]["reasoning"], rows[0]["answer"])
        assert task.score(ex["completion"], ex) == 1.0
    ans = make_task({"path": str(tmp_path / "a.csv"), "target": "answer", "shuffle": False}, 0, 100)
    assert ans[0]["completion"] == fmt.build_answer_only(rows[0]["answer"])


@pytest.mark.parametrize("content,params,match", [
    ('{"prompt": "p", "cot": "c", "critique": "x", "reasoning": "r"}\n', {}, r"a\.jsonl:1: missing field 'answer'"),
    ('{"prompt": "p", "cot": "c", "critique": "x", "reasoning": "r", "answer": "1", "answer_match": "maybe"}\n', {},
     "a.jsonl:1: answer_match: expected true or false"),
    ("not json\n", {}, r"a\.jsonl:1: invalid JSON"),
    ('{"prompt": "p", "cot": "c", "critique": "x", "reasoning": "r", "answer": "1"}\n', {"target": "x"}, "params.target"),
    ('{"prompt": "p", "cot": "c", "critique": "x", "reasoning": "r", "answer": "1"}\n', {"template": "{prompt}"},
     r"^params.template: Value error, must contain \{cot\} \(got '\{prompt\}'\)$"),
    ('{"prompt": "p", "cot": "c", "critique": "x", "reasoning": "r", "answer": "1"}\n', {"target": "x"},
     r"^params.target: Input should be 'critique', 'answer' or 'solution' \(got 'x'\)$"),
    ('{"prompt": "p", "cot": "c", "critique": "x", "reasoning": "r", "answer": "1"}\n', {"shuffle": "no"},
     r"^params.shuffle: Input should be a valid boolean \(got 'no'\)$"),
    ('{"prompt": "p", "cot": "c", "critique": "x", "reasoning": "r", "answer": "1"}\n', {"targett": "answer"},
     r"^params.targett: unknown field$"),
])
def test_bad_data_is_a_one_line_error_naming_file_and_row(tmp_path, content, params, match):
    (tmp_path / "a.jsonl").write_text(content)
    with pytest.raises(TaskError, match=match):
        make_task(dict({"path": str(tmp_path / "a.jsonl")}, **params), 0, 10)


def test_csv_missing_column_is_named(tmp_path):
    (tmp_path / "b.csv").write_text("prompt,cot,critique,answer\np,c,x,1\n")
    with pytest.raises(TaskError, match="missing column 'reasoning'"):
        make_task({"path": str(tmp_path / "b.csv")}, 0, 10)


# ---------------------------------------------------------------------------------- entropy
def test_auroc_and_flag_metrics_on_known_values():
    assert entropy.auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert entropy.auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert entropy.auroc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5
    assert entropy.auroc([0.3, 0.7, 0.5], [True, False, True]) == pytest.approx(0.0)
    assert entropy.auroc([0.6, 0.4, 0.5, 0.1], [True, False, True, False]) == pytest.approx(1.0)
    assert entropy.auroc([0.6, 0.4, 0.5, 0.45], [True, True, False, False]) == pytest.approx(0.5)
    m = entropy.flag_metrics([2.0, 0.1, 1.5, 0.2, 3.0], [False, True, True, True, False], threshold=1.0)
    assert m["flagged"] == 3 and m["precision"] == pytest.approx(2 / 3) and m["recall"] == 1.0
    assert m["auroc"] == pytest.approx(1.0)


def test_completion_entropy_matches_the_distributions_of_a_forward(setup):
    _, model, tok, _, _, _ = setup
    p, c = [1, 40, 41], [42, 43, 44, 45]
    got = entropy.completion_entropies(model, [p, p[:2]], [c, c[:1]])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0].float()
    probs = torch.softmax(logits, -1)
    h = -(probs * probs.log()).sum(-1)
    assert got[0] == pytest.approx(float(h[2:6].mean()), rel=1e-5)
    with torch.no_grad():
        l2 = model(input_ids=torch.tensor([p[:2] + c[:1]])).logits[0].float()
    p2 = torch.softmax(l2, -1)
    assert got[1] == pytest.approx(float(-(p2[1] * p2[1].log()).sum()), rel=1e-5)


# ---------------------------------------------------------------------------------- teacher
def test_interpreter_reproduces_every_causal_loop_solution():
    from metareason.data.causal_loop import make_task as cl_task

    for level in (1, 2, 3, 4):
        for e in cl_task({"levels": [level]}, 3, 60):
            rounds, ans = teacher.solve(e["prompt"])
            assert f"{teacher.solution_text(rounds)};answer:{ans}" == e["completion"]


def test_teacher_points_to_the_first_wrong_step():
    problem = "A=3;B=A+2;C=B*2;D=C-1;D=?"
    crit, reasoning, ans = teacher.critique(problem, "B=3+2=5;C=5*2=11;D=11-1=10;answer:10")
    assert crit == "Step 2 C=5*2=11 is wrong: it should be C=5*2=10." and ans == 9
    assert reasoning == "B=3+2=5;C=5*2=10;D=10-1=9"
    assert teacher.critique(problem, "B=3+2=5;C=5*2=10;D=10-1=9;answer:9")[0] == "Every step is correct."
    assert "final answer 8 is wrong" in teacher.critique(problem, "B=3+2=5;C=5*2=10;D=10-1=9;answer:8")[0]
    assert "stops after step 1" in teacher.critique(problem, "B=3+2=5;answer:5")[0]
    out = teacher.causal_loop_teacher(fmt.DEFAULT_TEACHER_PROMPT.format(prompt=problem, cot="B=3+2=6;answer:1"))
    assert fmt.section(out, fmt.CRITIQUE, fmt.CRITIQUE_END).startswith("Step 1 B=3+2=6 is wrong")
    assert answers.extract_answer(out) == "9"


def test_noisy_solver_is_reproducible_and_wrong_part_of_the_time():
    from metareason.data.causal_loop import make_task as cl_task

    exs = list(cl_task({"levels": [1, 3]}, 0, 200))
    outs = [teacher.noisy_solver(e["prompt"], seed=0) for e in exs]
    assert outs == [teacher.noisy_solver(e["prompt"], seed=0) for e in exs]
    wrong = sum(answers.extract_answer(o) != e["answer"] for o, e in zip(outs, exs)) / len(exs)
    assert 0.2 < wrong < 0.6

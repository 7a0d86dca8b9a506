"""``metareason mcft critiques``: a critique training set from a base model's attempts and a teacher.

For every question of ``data.<split>`` (any task: ``prompt`` + gold ``answer``) the generator
``mcft.base_generator`` writes ``mcft.attempts`` attempts; the generator
``mcft.teacher_generator`` receives ``mcft.teacher_prompt`` filled with the question and the
attempt and answers ``<critique>…</critique><reasoning>…</reasoning><ans>\\boxed{…}</ans>``.
Each attempt becomes one row ``{id, prompt, cot, critique, reasoning, answer, answer_match,
gold, group}``; ``answer_match`` says whether the teacher's answer is equivalent to the gold
one (the ``mcft`` task drops rows where it is false). Rows are written as JSONL, atomically.
A teacher reply without the critique or reasoning section is kept with ``answer_match: false``
and counted as ``malformed``.
"""
from __future__ import annotations

from pathlib import Path

from metareason.api import ConfigError, write_jsonl_atomic
from metareason.plugins.mcft.answers import answers_equivalent, extract_answer
from metareason.plugins.mcft.format import CRITIQUE, CRITIQUE_END, REASONING, REASONING_END, section

CHUNK = 64


def build_critiques(kernel, split: str = "train", out=None, quiet: bool = False) -> dict:
    from metareason.api import progress

    cfg = kernel.config
    sec = cfg.mcft
    src = kernel.source
    for field in ("base_generator", "teacher_generator"):
        if not getattr(sec, field):
            raise ConfigError(f"{src}: mcft.{field}: required by `metareason mcft critiques` (a `generators:` name)")
    specs = getattr(cfg.data, split)
    if not specs:
        raise ConfigError(f"{src}: data.{split}: no tasks to take questions from")
    examples = []
    for i, spec in enumerate(specs):
        task = kernel.build_task(spec, field=f"data.{split}[{i}]")
        examples.extend(task[j] for j in range(len(task)))
    base, teacher = kernel.generator(sec.base_generator), kernel.generator(sec.teacher_generator)
    out = Path(out or sec.output or (cfg.run_dir / f"critiques-{split}.jsonl"))
    rows, malformed = [], 0
    bar = progress(total=len(examples), desc="critiques", quiet=quiet or cfg.quiet)
    for start in range(0, len(examples), CHUNK):
        chunk = examples[start: start + CHUNK]
        questions = [e["prompt"] if sec.base_system_prompt is None else
                     [{"role": "system", "content": sec.base_system_prompt}, {"role": "user", "content": e["prompt"]}]
                     for e in chunk]
        attempts = base.generate(questions, n=sec.attempts, max_new_tokens=sec.base_max_tokens,
                                 temperature=sec.base_temperature, seed=cfg.train.seed)
        pairs = [(chunk[a.prompt_index], a) for a in attempts]
        prompts = [sec.teacher_prompt.format(prompt=e["prompt"], cot=a.text) for e, a in pairs]
        replies = teacher.generate(prompts, n=1, max_new_tokens=sec.teacher_max_tokens, temperature=0.0,
                                   seed=cfg.train.seed)
        for (e, a), r in zip(pairs, replies):
            crit = section(r.text, CRITIQUE, CRITIQUE_END)
            reasoning = section(r.text, REASONING, REASONING_END)
            answer = extract_answer(r.text)
            ok = crit is not None and reasoning is not None and answer is not None
            malformed += not ok
            rows.append({"id": f"{e.get('id', start)}/{a.sample_index}", "prompt": e["prompt"], "cot": a.text,
                         "critique": crit or "", "reasoning": reasoning or "", "answer": answer or "",
                         "answer_match": bool(ok and answers_equivalent(answer, e["answer"])),
                         "gold": str(e["answer"]), "group": str(e.get("group", "all")),
                         "attempt_correct": answers_equivalent(extract_answer(a.text), e["answer"])})
        bar.update(len(chunk))
    bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out, rows)
    matched = sum(r["answer_match"] for r in rows)
    return {"output": str(out), "rows": len(rows), "answer_match": matched, "dropped": len(rows) - matched,
            "malformed": malformed, "attempts_correct": sum(r["attempt_correct"] for r in rows)}

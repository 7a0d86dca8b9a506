"""Behavior-guided self-improvement, with critique-and-revise beside it on the same questions.

For each question of ``data.eval`` (or ``data.train``), with the ``behaviors.student`` generator
as the model and ``behaviors.strategist`` as the reflector (the paper uses the same model for
both: point both names at one ``generators:`` entry to reproduce that):

* attempt 1: the model answers the solve prompt;
* behavior-guided: reflect + extract on attempt 1 -> behaviors (strictly parsed) -> attempt 2:
  the model answers the solve prompt under the BCI block of those behaviors;
* critique-and-revise: the model critiques attempt 1, then revises it.

Both arms start from the same attempt 1 and every call has the same ``max_new_tokens``; the
report gives accuracy and generated tokens of attempt 1, of each arm's final answer, and each
arm's total generated tokens (all calls after attempt 1), so the budgets are visible.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from metareason.api import write_jsonl_atomic
from metareason.plugins.behaviors.behavior import Provenance, parse_extraction, trace_hash
from metareason.plugins.behaviors.bci import render_block
from metareason.plugins.behaviors.calls import stage_call
from metareason.plugins.behaviors.config import fill


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def self_improve(kernel, pairs: list[tuple[object, dict]], out: Optional[Path] = None, quiet: bool = False,
                 handbook=None) -> dict:
    from metareason.api import progress
    from metareason.plugins.behaviors.examples import section_of

    section = section_of(kernel)
    model = kernel.generator(section.student)
    strategist = kernel.generator(section.strategist)
    p = section.prompts
    rows: list[dict] = []
    failures: list[dict] = []
    bar = progress(total=len(pairs), desc="self-improve", quiet=quiet)
    for start in range(0, len(pairs), section.batch_size):
        batch = pairs[start: start + section.batch_size]
        ids = [str(ex.get("id", start + j)) for j, (_, ex) in enumerate(batch)]
        q = [ex["prompt"] for _, ex in batch]
        alive = list(range(len(batch)))
        done: dict[str, dict[int, object]] = {}

        def step(name, gen, make):
            nonlocal alive
            got, failed = stage_call(gen, [make(j) for j in alive], [ids[j] for j in alive], section, name, quiet)
            failures.extend(vars(f) for f in failed)
            done[name] = {alive[i]: c for i, c in got.items()}
            alive = [j for j in alive if j in done[name]]

        step("attempt1", model, lambda j: fill(p.solve, question=q[j]))
        a1 = lambda j: done["attempt1"][j].text  # noqa: E731
        step("reflect", strategist, lambda j: fill(p.reflect, question=q[j], trace=a1(j)))
        step("extract", strategist, lambda j: fill(p.extract, question=q[j], trace=a1(j),
                                                   reflection=done["reflect"][j].text))
        parsed = {j: parse_extraction(done["extract"][j].text, section.max_instruction_sentences) for j in alive}
        step("guided", model, lambda j: render_block(section, parsed[j].behaviors, fill(p.solve, question=q[j]))
             if parsed[j].behaviors else fill(p.solve, question=q[j]))
        step("critique", model, lambda j: fill(p.critique, question=q[j], trace=a1(j)))
        step("revise", model, lambda j: fill(p.revise, question=q[j], trace=a1(j),
                                             critique=done["critique"][j].text))
        for j in alive:
            task, ex = batch[j]
            c = {k: done[k][j] for k in done}
            if handbook is not None and parsed[j].behaviors:  # --store: keep what the model taught itself
                topic = ex.get(section.bci.topic_field)
                for b in parsed[j].behaviors:
                    b.topic = None if topic is None else str(topic)
                    b.provenance = [Provenance(ids[j], trace_hash(c["attempt1"].text), section.strategist)]
                handbook.add_many(parsed[j].behaviors)
            rows.append({
                "id": ids[j], "answer": ex.get("answer"),
                "attempt1": c["attempt1"].text, "guided": c["guided"].text, "revised": c["revise"].text,
                "behaviors": [b.name for b in parsed[j].behaviors], "rejected_lines": len(parsed[j].rejected),
                "score_attempt1": float(task.score(c["attempt1"].text, ex)),
                "score_guided": float(task.score(c["guided"].text, ex)),
                "score_revised": float(task.score(c["revise"].text, ex)),
                "tokens_attempt1": c["attempt1"].completion_tokens,
                "tokens_guided_final": c["guided"].completion_tokens,
                "tokens_revised_final": c["revise"].completion_tokens,
                "tokens_guided_total": sum(c[k].completion_tokens for k in ("reflect", "extract", "guided")),
                "tokens_revised_total": sum(c[k].completion_tokens for k in ("critique", "revise")),
                "prompt_tokens_guided_final": c["guided"].prompt_tokens,
                "prompt_tokens_revised_final": c["revise"].prompt_tokens,
            })
        bar.update(len(batch))
    bar.close()
    summary = {"questions": len(pairs), "answered": len(rows), "failures": failures}
    for key in ("score_attempt1", "score_guided", "score_revised", "tokens_attempt1", "tokens_guided_final",
                "tokens_revised_final", "tokens_guided_total", "tokens_revised_total",
                "prompt_tokens_guided_final", "prompt_tokens_revised_final"):
        summary[key.replace("score_", "accuracy_")] = _mean(r[key] for r in rows)
    summary["mean_behaviors_extracted"] = _mean(len(r["behaviors"]) for r in rows)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(out, rows)
        summary["output"] = str(out)
    return summary

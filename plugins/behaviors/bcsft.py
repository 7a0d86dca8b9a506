"""Behavior-conditioned SFT: a teacher answers under BCI, the student learns those answers with
no behaviors in its prompt (the kernel's SFT loop), so the behaviors end up in its weights.

``mode="bci"`` is BC-SFT; ``mode="plain"`` is the baseline (the same teacher, the same questions,
no behaviors), i.e. ordinary SFT on teacher answers. Teacher answers are written to a JSONL file
(``question``, ``completion``, ``answer``, ``id``, ``group``, ``topic``, ``teacher_prompt``,
token counts, ``score``); with ``behaviors.keep_incorrect: false`` (default) only answers the
task scores as correct are kept. With ``behaviors.teacher_system_prompt`` the teacher gets chat
messages (that system message, then the prompt), so a chat model answers as it would in
``metareason eval`` under ``data.system_prompt``. The student run is the config's own run with ``data.train``
replaced by that file (``jsonl`` task) and ``behaviors.bci.enabled: false``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

from metareason.api import UserError, write_jsonl_atomic
from metareason.plugins.behaviors.bci import render_block, retrieve
from metareason.plugins.behaviors.calls import stage_call

MODES = ("bci", "plain")


def teacher_data(kernel, pairs: list[tuple[object, dict]], mode: str, out: Path, handbook=None,
                 quiet: bool = False) -> dict:
    from metareason.api import progress
    from metareason.plugins.behaviors.examples import section_of

    if mode not in MODES:
        raise UserError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
    section = section_of(kernel)
    teacher = kernel.generator(section.teacher)
    if mode == "bci" and handbook is None:
        from metareason.plugins.behaviors.bci import shared_handbook

        handbook = shared_handbook(section)
    rows, failures, kept = [], [], 0
    retrieved_counts: dict[str, int] = {}
    bar = progress(total=len(pairs), desc=f"teacher ({mode})", quiet=quiet)
    for start in range(0, len(pairs), section.batch_size):
        batch = pairs[start: start + section.batch_size]
        ids = [str(ex["id"]) for _, ex in batch]
        prompts = []
        for _, ex in batch:
            if mode == "bci":
                found = retrieve(section, handbook, ex["prompt"], ex)
                for b in found:
                    retrieved_counts[b.name] = retrieved_counts.get(b.name, 0) + 1
                prompts.append(render_block(section, found, ex["prompt"]) if found else ex["prompt"])
            else:
                prompts.append(ex["prompt"])
        sent = prompts if section.teacher_system_prompt is None else [
            [{"role": "system", "content": section.teacher_system_prompt}, {"role": "user", "content": p}]
            for p in prompts]
        got, failed = stage_call(teacher, sent, ids, section, f"teacher-{mode}", quiet)
        failures.extend(vars(f) for f in failed)
        for i, c in got.items():
            task, ex = batch[i]
            score = float(task.score(c.text, ex))
            row = {"id": ids[i], "question": ex["prompt"], "completion": c.text, "answer": str(ex.get("answer", "")),
                   "group": str(ex.get("group", "all")), "topic": ex.get(section.bci.topic_field),
                   "teacher_prompt": prompts[i], "teacher_prompt_tokens": c.prompt_tokens,
                   "teacher_completion_tokens": c.completion_tokens, "score": score, "mode": mode}
            rows.append(row)
            kept += bool(score >= 1.0 or section.keep_incorrect)
        bar.update(len(batch))
    bar.close()
    if mode == "bci" and retrieved_counts:
        handbook.record_retrieved(retrieved_counts)
    keep = [r for r in rows if r["score"] >= 1.0 or section.keep_incorrect]
    if not keep:
        raise UserError(f"teacher {section.teacher!r} ({mode}): no usable answer out of {len(pairs)} questions "
                        "(all wrong or failed; behaviors.keep_incorrect keeps wrong ones)")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out, keep)
    n = max(len(rows), 1)
    return {"mode": mode, "questions": len(pairs), "answered": len(rows), "kept": len(keep), "output": str(out),
            "teacher_accuracy": sum(r["score"] for r in rows) / n,
            "teacher_completion_tokens": sum(r["teacher_completion_tokens"] for r in rows) / n,
            "teacher_prompt_tokens": sum(r["teacher_prompt_tokens"] for r in rows) / n,
            "failures": failures}


def student_config(raw: dict, data_path: Path, num_samples: int, name: Optional[str] = None) -> dict:
    """The run config of the student: ``data.train`` is the teacher file, no BCI in its prompts."""
    cfg = copy.deepcopy(raw)
    seed = (cfg.get("train") or {}).get("seed", 0)
    cfg.setdefault("data", {})["train"] = [{"task": "jsonl", "num_samples": num_samples, "seed": seed,
                                           "params": {"path": str(data_path), "completion_field": "completion",
                                                      "group_field": "group", "id_field": "id"}}]
    beh = cfg.setdefault("behaviors", {})
    beh.setdefault("bci", {})["enabled"] = False
    if name:
        cfg["name"] = name
    return cfg


def run_bcsft(config: str, overrides: list[str], mode: str = "bci", quiet: bool = False,
              out: Optional[str] = None, name: Optional[str] = None, train: bool = True) -> dict:
    from metareason.api import Kernel
    from metareason.plugins.behaviors.examples import load_examples, section_of

    kernel = Kernel(config, overrides=overrides + (["quiet=true"] if quiet else []))
    section = section_of(kernel)
    pairs = load_examples(kernel, "train")
    path = Path(out or section.output or (kernel.config.run_dir / f"teacher-{mode}.jsonl"))
    if name is None:
        name = f"{kernel.config.name}-{'bcsft' if mode == 'bci' else 'sft'}"
    summary = {"teacher": teacher_data(kernel, pairs, mode, path, quiet=quiet)}
    if train:
        student = Kernel(student_config(kernel.raw_config, path, summary["teacher"]["kept"], name))
        summary["student_run"] = str(student.config.run_dir)
        summary["student_metrics"] = student.run(overwrite=True)  # the student is trained again with the new data
    return summary

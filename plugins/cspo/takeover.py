"""Takeover-based data construction (``metareason cspo takeover CONFIG``) and alternating
inference on held-out problems (``metareason cspo infer CONFIG``).

Takeover: the target generates on the prompts of ``data.train``; once it has written at least
``cspo.max_target_tokens`` tokens since the last control segment and its text hits one of
``cspo.TARGET_VALIDATION_KEYWORDS`` (or it writes a ``TRIGGER_TOKENS`` string), the alter
writes a control segment (continue / conclude with the answer / revise) and the target resumes
(see :mod:`metareason.plugins.cspo.alternating`). Each prompt gives one SFT record::

    {"id", "prompt", "completion", "answer", "group",
     "controls": [{"decision": "conclude", "content": "conclude"}, ...],
     "takeovers", "target_tokens", "correct"}

``completion`` is the transcript with its control segments; after a ``conclude`` segment
followed by an answer it ends with that answer. Records whose final answer is wrong are dropped
unless ``cspo.keep_incorrect``. The file (``cspo.output``, default
``runs/<name>/takeover.jsonl``) is written atomically; train on it with the ``jsonl`` task
(``question_field: prompt, completion_field: completion``).
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from metareason.api import write_json_atomic, write_jsonl_atomic
from metareason.plugins.cspo.alter import decision_of
from metareason.plugins.cspo.segments import parse_segments

_ANSWER_AFTER = re.compile(r"answer\s*[:=]\s*[+-]?\d+", re.IGNORECASE)


def end_after_conclusion(text: str) -> str:
    """Cut ``text`` after the answer that follows its first ``conclude`` segment, if any."""
    for seg in parse_segments(text).segments:
        if decision_of(seg.content) == "conclude":
            m = _ANSWER_AFTER.match(text, seg.end)
            if m:
                return text[: m.end()]
    return text


def control_labels(text: str) -> list[dict]:
    return [{"decision": decision_of(s.content), "content": s.content} for s in parse_segments(text).segments]


def _output_path(config: Any, default_name: str) -> Path:
    if config.cspo.output:
        return Path(config.cspo.output)
    return config.run_dir / default_name


def _tasks_and_examples(kernel, specs, field: str) -> list[tuple[Any, dict]]:
    pairs = []
    for i, spec in enumerate(specs):
        task = kernel.build_task(spec, field=f"{field}[{i}]")
        pairs.extend((task, dict(task[j])) for j in range(len(task)))
    return pairs


def _prompts(kernel, examples: list[dict]) -> list[str]:
    """Prompts after the plugins' transforms, as plain text (the pair's models load their own
    tokenizers, so takeover data is built without a chat template)."""
    from metareason.api import PLAIN_CHAT as PLAIN

    return [kernel.prompt_text(e, None, PLAIN) for e in examples]


def run_takeover(config_path: str, overrides: Optional[list[str]] = None, quiet: bool = False) -> dict:
    """Build takeover SFT data; returns a summary (also printed by the CLI)."""
    from metareason.api import ConfigError, Kernel
    from metareason.plugins.cspo.alternating import AlternatingPair, check_enabled

    kernel = Kernel(config_path, overrides=list(overrides or []) + (["quiet=true"] if quiet else []))
    cfg = kernel.config
    check_enabled(cfg, "takeover")
    if not cfg.data.train:
        raise ConfigError(f"{kernel.source}: data.train: no prompts to take over (add a task)")
    pairs = _tasks_and_examples(kernel, cfg.data.train, "data.train")
    examples = [ex for _, ex in pairs]
    out_path = _output_path(cfg, "takeover.jsonl")
    with AlternatingPair(cfg) as pair:
        gens = pair.generate(_prompts(kernel, examples), examples, quiet=cfg.quiet)
        stats = pair.stats()
    rows, decisions, kept_correct = [], Counter(), 0
    for (task, ex), g in zip(pairs, gens):
        completion = end_after_conclusion(g["text"])
        labels = control_labels(completion)
        correct = float(task.score(completion, ex))
        decisions.update(lab["decision"] for lab in labels)
        if correct < 1.0 and not cfg.cspo.keep_incorrect:
            continue
        kept_correct += int(correct >= 1.0)
        rows.append({"id": ex.get("id"), "prompt": ex["prompt"], "completion": completion, "answer": ex.get("answer"),
                     "group": ex.get("group", "all"), "controls": labels, "takeovers": len(labels),
                     "target_tokens": g["num_tokens"], "correct": correct})
    if not rows:
        raise ConfigError(f"{kernel.source}: takeover kept no example (every final answer was wrong); "
                          "set cspo.keep_incorrect: true to keep them")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out_path, rows)
    n = len(gens)
    summary = {
        "output": str(out_path), "prompts": n, "records": len(rows),
        "accuracy": sum(float(t.score(end_after_conclusion(g["text"]), e)) for (t, e), g in zip(pairs, gens)) / n,
        "mean_target_tokens": sum(g["num_tokens"] for g in gens) / n,
        "takeovers_per_prompt": sum(decisions.values()) / n,
        "decisions": dict(decisions), "declined_triggers": stats.get("declined", 0),
    }
    write_json_atomic(out_path.with_suffix(".summary.json"), summary)
    return summary


def run_infer(config_path: str, overrides: Optional[list[str]] = None, quiet: bool = False) -> dict:
    """Alternating inference on ``data.eval``: accuracy, target tokens, takeovers."""
    from metareason.api import ConfigError, Kernel
    from metareason.plugins.cspo.alternating import AlternatingPair, check_enabled

    kernel = Kernel(config_path, overrides=list(overrides or []) + (["quiet=true"] if quiet else []))
    cfg = kernel.config
    check_enabled(cfg, "alternating inference")
    if not cfg.data.eval:
        raise ConfigError(f"{kernel.source}: data.eval: no prompts to run (add a task)")
    pairs = _tasks_and_examples(kernel, cfg.data.eval, "data.eval")
    if cfg.eval.max_samples:
        pairs = pairs[: cfg.eval.max_samples]
    examples = [ex for _, ex in pairs]
    out_path = _output_path(cfg, "alternating.jsonl")
    with AlternatingPair(cfg) as pair:
        gens = pair.generate(_prompts(kernel, examples), examples, quiet=cfg.quiet)
    rows, scores, decisions = [], [], Counter()
    for (task, ex), g in zip(pairs, gens):
        score = float(task.score(g["text"], ex))
        scores.append(score)
        labels = control_labels(g["text"])
        decisions.update(lab["decision"] for lab in labels)
        rows.append({"id": ex.get("id"), "prompt": ex["prompt"], "completion": g["text"], "answer": ex.get("answer"),
                     "score": score, "target_tokens": g["num_tokens"], "controls": labels,
                     "handovers": g["handovers"], "stop_reason": g["stop_reason"]})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out_path, rows)
    summary = {"output": str(out_path), "prompts": len(rows), "accuracy": sum(scores) / len(scores),
               "mean_target_tokens": sum(r["target_tokens"] for r in rows) / len(rows),
               "takeovers_per_prompt": sum(decisions.values()) / len(rows), "decisions": dict(decisions)}
    write_json_atomic(out_path.with_suffix(".summary.json"), summary)
    return summary

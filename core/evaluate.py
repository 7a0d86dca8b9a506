"""Evaluation: generate on the eval tasks, score with each task's scorer, aggregate per group.

Metrics: ``eval/accuracy`` (all eval examples), ``eval/accuracy/<group>``, ``eval/gen_tokens``
(mean generated tokens) and ``eval/gen_tokens/<group>``; with several eval tasks the group
is prefixed by the task name when groups would collide; plus the metrics that plugins return
from ``metareason_on_eval_samples`` or add in ``metareason_on_eval``.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from metareason.config import ConfigError
from metareason.durable import write_jsonl_atomic


def build_eval_examples(kernel) -> list[tuple[object, dict]]:
    """``(task, example)`` pairs of every eval task, capped by ``eval.max_samples`` each."""
    pairs = []
    specs = kernel.config.data.eval
    multi = len(specs) > 1
    for i, spec in enumerate(specs):
        task = kernel.build_task(spec, field=f"data.eval[{i}]")
        n = len(task) if kernel.config.eval.max_samples is None else min(len(task), kernel.config.eval.max_samples)
        for j in range(n):
            ex = kernel.chain("metareason_transform_example", "example", dict(task[j]), config=kernel.config,
                              split="eval")
            group = str(ex.get("group", "all"))
            ex["_group"] = f"{spec.task}/{group}" if multi else group
            pairs.append((task, ex))
    return pairs


def evaluate(kernel, model, tokenizer, step: int = 0, write_samples: Optional[Path] = None) -> dict:
    from metareason.generation.generate import generate

    pairs = build_eval_examples(kernel)
    if not pairs:
        raise ConfigError(f"{kernel.source}: data.eval: no eval tasks configured")
    examples = [ex for _, ex in pairs]
    fmt = kernel.chat_format(tokenizer)
    prompts = [kernel.prompt_text(ex, tokenizer, fmt) for ex in examples]
    gens = generate(kernel, model, tokenizer, prompts, examples=examples, desc="eval")
    correct: dict[str, list[float]] = defaultdict(list)
    tokens: dict[str, list[int]] = defaultdict(list)
    rows = []
    for (task, ex), g in zip(pairs, gens):
        score = float(task.score(g.text, ex))
        correct[ex["_group"]].append(score)
        tokens[ex["_group"]].append(g.num_tokens)
        rows.append({"id": ex.get("id"), "group": ex["_group"], "prompt": g.prompt, "completion": g.text,
                     "answer": ex.get("answer"), "score": score, "gen_tokens": g.num_tokens})
    all_scores = [s for v in correct.values() for s in v]
    all_tokens = [t for v in tokens.values() for t in v]
    metrics = {"eval/accuracy": sum(all_scores) / len(all_scores),
               "eval/gen_tokens": sum(all_tokens) / len(all_tokens),
               "eval/num_samples": len(all_scores)}
    for group in sorted(correct):
        metrics[f"eval/accuracy/{group}"] = sum(correct[group]) / len(correct[group])
        metrics[f"eval/gen_tokens/{group}"] = sum(tokens[group]) / len(tokens[group])
    if write_samples is not None:
        write_samples.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(write_samples, rows)
    returned = kernel.call_each("metareason_on_eval_samples", kernel=kernel, step=step, model=model,
                                tokenizer=tokenizer,
                                samples=[dict(r, example=ex) for r, (_, ex) in zip(rows, pairs)])
    metrics.update(plugin_metrics(returned, metrics))
    kernel.pm.hook.metareason_on_eval(kernel=kernel, step=step, metrics=metrics)
    return metrics


def plugin_metrics(returned: list[tuple[str, Any]], metrics: dict) -> dict[str, float]:
    """The metrics ``metareason_on_eval_samples`` implementations returned, checked: a key without
    the ``eval/`` prefix gets it; a value must be a number; a key may not overwrite the kernel's
    or another plugin's metric."""
    from metareason.plugin_manager import PluginError

    hook, out, owner = "metareason_on_eval_samples", {}, {}
    for plugin, got in returned:
        if got is None:
            continue
        if not isinstance(got, dict):
            raise PluginError(f"plugin '{plugin}' hook '{hook}' returned {type(got).__name__}, expected None or "
                              f"a dict of metrics", plugin=plugin, hook=hook)
        for key, value in got.items():
            name = key if str(key).startswith("eval/") else f"eval/{key}"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PluginError(f"plugin '{plugin}' hook '{hook}': metric {key!r} is {type(value).__name__}, "
                                  f"expected a number", plugin=plugin, hook=hook)
            if name in metrics or name in out:
                by = f"plugin '{owner[name]}'" if name in owner else "the kernel"
                raise PluginError(f"plugin '{plugin}' hook '{hook}': metric {name!r} is already set by {by}",
                                  plugin=plugin, hook=hook)
            out[name], owner[name] = float(value), plugin
    return out

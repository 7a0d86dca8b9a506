"""``metareason mcft eval``: accuracy, format adherence and entropy failure flags on ``data.eval``.

Generation follows the run's ``generation:`` section (greedy by default) through the kernel's
own ``generate`` (prompt transforms included); answers are scored by each eval task's scorer
(the ``mcft`` task: extraction + math-verify equivalence). Entropies come from a
teacher-forced forward over prompt + generated tokens (see ``entropy.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from metareason.api import write_json_atomic, write_jsonl_atomic
from metareason.plugins.mcft.entropy import completion_entropies, flag_metrics
from metareason.plugins.mcft.format import is_well_formed


def evaluate_mcft(kernel, model, tokenizer, entropy_threshold: Optional[float] = None,
                  samples_path: Optional[Path] = None) -> dict:
    from metareason.api import build_eval_examples, generate, prompt_ids

    pairs = build_eval_examples(kernel)
    examples = [ex for _, ex in pairs]
    fmt = kernel.chat_format(tokenizer)
    prompts = [kernel.prompt_text(ex, tokenizer, fmt) for ex in examples]
    gens = generate(kernel, model, tokenizer, prompts, examples=examples, desc="mcft eval")
    correct = [bool(task.score(g.text, ex)) for (task, ex), g in zip(pairs, gens)]
    formatted = [is_well_formed(g.text) for g in gens]
    entropies = completion_entropies(model, [prompt_ids(tokenizer, p) for p in prompts],
                                     [g.token_ids for g in gens], batch_size=kernel.config.generation.batch_size)
    if entropy_threshold is None:
        sec = getattr(kernel.config, "mcft", None)
        entropy_threshold = sec.entropy_threshold if sec is not None else 0.8
    flags = flag_metrics(entropies, correct, entropy_threshold)
    n = len(gens)
    metrics = {"accuracy": sum(correct) / n, "format_adherence": sum(formatted) / n, "num_samples": n,
               "entropy_threshold": entropy_threshold,
               **{f"entropy_flag/{k}": v for k, v in flags.items()}}
    # critique rows made by `mcft critiques` say whether the critiqued attempt was right
    for name, want in (("attempt_right", True), ("attempt_wrong", False)):
        sel = [c for c, ex in zip(correct, examples) if ex.get("attempt_correct") is want]
        if sel:
            metrics[f"accuracy/{name}"] = sum(sel) / len(sel)
            metrics[f"num_samples/{name}"] = len(sel)
    if samples_path is not None:
        rows = [{"id": ex.get("id"), "completion": g.text, "answer": ex.get("answer"), "correct": c,
                 "well_formed": f, "mean_entropy": e}
                for ex, g, c, f, e in zip(examples, gens, correct, formatted, entropies)]
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(samples_path, rows)
    return metrics


def evaluate_run(run_dir: str, overrides: list[str], checkpoint: Optional[str] = None,
                 entropy_threshold: Optional[float] = None) -> dict:
    from metareason.api import UserError, load_trained

    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    trained = load_trained(path, checkpoint, overrides)
    metrics = evaluate_mcft(trained.kernel, trained.model, trained.tokenizer, entropy_threshold,
                            samples_path=path / "mcft_eval_samples.jsonl")
    write_json_atomic(path / "mcft_eval.json", metrics)
    return metrics

"""The real-model quickstart's results: base zero-shot vs after SFT / GRPO on the same questions.

    metareason models get smollm2-135m-instruct
    metareason run configs/smollm2/sft.yaml
    metareason run configs/smollm2/grpo.yaml
    python bench/smollm2_quickstart.py            # base eval (once), then bench/results/smollm2-*.md

The base model is evaluated with the SFT config (same eval questions, chat template and system
prompt, no training) and its samples are kept in runs/smollm2-base/. Each report gives the mean
task score (what ``eval/accuracy`` is: reasoning-gym's ``score_answer``, with partial credit),
the exact-answer rate, an exact McNemar test of base vs trained on the same questions, and how
many eval questions also occur in the training data.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from metareason.stats import mcnemar_exact

REPO = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def base_samples(config: Path, out_dir: Path) -> list[dict]:
    path = out_dir / "eval_samples.jsonl"
    if not path.exists():
        from metareason.evaluate import evaluate
        from metareason.kernel import Kernel

        kernel = Kernel(config)
        model, tokenizer = kernel.load()
        metrics = evaluate(kernel, model, tokenizer, write_samples=path)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return read_jsonl(path)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = p + z * z / (2 * n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return ((c - h) / d, (c + h) / d)


def train_questions(config: Path) -> set[str]:
    from metareason.kernel import Kernel
    from metareason.train.loop import load_train_examples

    return {e["prompt"] for e in load_train_examples(Kernel(config, overrides=["quiet=true"]))}


def summarize(name: str, config: Path, run_dir: Path, base: list[dict], command: str) -> dict:
    trained = read_jsonl(run_dir / "eval_samples.jsonl")
    by_id = {s["id"]: s for s in base}
    pairs = [(by_id[s["id"]], s) for s in trained if s["id"] in by_id]
    n = len(pairs)
    exact = lambda s: s["score"] >= 1.0  # noqa: E731
    b = sum(exact(x) and not exact(y) for x, y in pairs)
    c = sum(exact(y) and not exact(x) for x, y in pairs)
    seen = train_questions(config)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    steps = [m for m in metrics if "train/tokens_per_s" in m or "rl/reward/mean" in m]
    out = {
        "name": name, "config": str(config.relative_to(REPO)), "command": command, "questions": n,
        "base": {"mean_score": sum(x["score"] for x, _ in pairs) / n, "exact": sum(exact(x) for x, _ in pairs),
                 "mean_gen_tokens": sum(x["gen_tokens"] for x, _ in pairs) / n},
        "trained": {"mean_score": sum(y["score"] for _, y in pairs) / n, "exact": sum(exact(y) for _, y in pairs),
                    "mean_gen_tokens": sum(y["gen_tokens"] for _, y in pairs) / n},
        "mcnemar": {"base_only": b, "trained_only": c, "p_value": mcnemar_exact(b, c)},
        "eval_questions_in_train": sum(_question(y) in seen for _, y in pairs),
        "unseen": {"questions": sum(_question(y) not in seen for _, y in pairs),
                   "base_exact": sum(exact(x) for x, y in pairs if _question(y) not in seen),
                   "trained_exact": sum(exact(y) for _, y in pairs if _question(y) not in seen),
                   "trained_mean_score": sum(y["score"] for _, y in pairs if _question(y) not in seen)
                   / max(1, sum(_question(y) not in seen for _, y in pairs))},
        "train_steps": metrics[-1].get("step") if metrics else None,
        "examples": [{"question": _question(y), "answer": y["answer"], "base": x["completion"],
                      "trained": y["completion"]} for x, y in pairs[:5]],
        "last_logged": steps[-1] if steps else None,
    }
    for side in ("base", "trained"):
        lo, hi = wilson(out[side]["exact"], n)
        out[side]["exact_ci95"] = [round(lo, 3), round(hi, 3)]
    return out


def _question(sample: dict) -> str:
    """The user's question inside a rendered ChatML prompt."""
    text = sample["prompt"]
    start = text.rfind("<|im_start|>user\n")
    if start == -1:
        return text
    body = text[start + len("<|im_start|>user\n"):]
    return body.split("<|im_end|>", 1)[0]


def write_report(summary: dict, wall: str, out: Path) -> None:
    s = summary
    n = s["questions"]
    lines = [
        f"# {s['name']}: SmolLM2-135M-Instruct, held-out accuracy before and after",
        "",
        f"Config: [`{s['config']}`](../../{s['config']}). Commands, in order:",
        "",
        "```bash",
        "metareason models get smollm2-135m-instruct",
        s["command"],
        "python bench/smollm2_quickstart.py      # base zero-shot eval + this report",
        "```",
        "",
        f"{n} held-out questions (reasoning-gym `basic_arithmetic`, two 1-2 digit terms, + and -; eval seed "
        f"1000000, training seed 0); {s['eval_questions_in_train']} of them also occur in the training data "
        "(the problem space is small). Greedy decoding, the model's ChatML template and the config's "
        "system prompt for both rows. One training seed.",
        "",
        "| model | mean task score (eval/accuracy) | exact answers | exact, 95% CI (Wilson) | mean generated tokens |",
        "|---|---|---|---|---|",
    ]
    for label, key in (("base, zero-shot", "base"), (f"after {s['name'].split('-')[-1].upper()}", "trained")):
        r = s[key]
        lines.append(f"| {label} | {r['mean_score']:.3f} | {r['exact']}/{n} | "
                     f"[{r['exact_ci95'][0]:.3f}, {r['exact_ci95'][1]:.3f}] | {r['mean_gen_tokens']:.1f} |")
    m, u = s["mcnemar"], s["unseen"]
    lines += [
        "",
        f"On the {u['questions']} eval questions that do not occur in the training data: exact answers "
        f"{u['base_exact']}/{u['questions']} before, {u['trained_exact']}/{u['questions']} after "
        f"(mean task score after: {u['trained_mean_score']:.3f}). Questions recur when the space is small, "
        "so the recurring ones are mostly one-digit problems: this split mixes memorisation with difficulty"
        + (" (and GRPO drew only train.max_steps x train.batch_size prompts from the pool)." if "grpo" in s["name"]
           else "."),
        "",
        f"Paired on the same questions (exact McNemar): right only before {m['base_only']}, right only after "
        f"{m['trained_only']}, p = {m['p_value']:.2g}.",
        "",
        f"Wall time of the run on this machine (2 CPU cores, shared with other jobs while it ran): {wall}.",
        "",
        "Examples (question, gold answer, base reply, trained reply):",
        "",
    ]
    for e in s["examples"]:
        lines.append(f"- `{e['question']}` → `{e['answer']}`: base `{e['base'][:80]!s}` / trained `{e['trained'][:80]!s}`")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(s, indent=1) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--wall", action="append", default=[], help="NAME=TEXT wall time of a run, as measured")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    walls = dict(w.split("=", 1) for w in args.wall)
    base = base_samples(REPO / "configs" / "smollm2" / "sft.yaml", _mkdir(runs / "smollm2-base"))
    for algo in ("sft", "grpo"):
        run_dir = runs / f"smollm2-{algo}"
        if not (run_dir / "eval_samples.jsonl").exists():
            print(f"[smollm2] {run_dir}: no eval samples yet, skipped", file=sys.stderr)
            continue
        config = REPO / "configs" / "smollm2" / f"{algo}.yaml"
        summary = summarize(f"smollm2-{algo}", config, run_dir, base, f"metareason run configs/smollm2/{algo}.yaml")
        write_report(summary, walls.get(algo, "not recorded"), Path(args.out) / f"smollm2-{algo}")
        print(f"[smollm2] wrote {Path(args.out) / f'smollm2-{algo}.md'}", file=sys.stderr)
    return 0


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


if __name__ == "__main__":
    sys.exit(main())

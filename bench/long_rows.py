"""Rows of at least 512 SmolLM2 tokens for issue 35's SFT benchmark at 8 x 512 tokens.

    python bench/long_rows.py --out bench/data/smollm2-512.jsonl

Each row's question is a causal-loop program and its completion a worked solution of that
program followed by the worked solutions of further programs, until question + completion reach
``--tokens`` tokens of the SmolLM2 tokenizer; ``data.max_length: 512`` then cuts every row to
exactly 512, so every batch of ``bench/smollm2_512_bench.yaml`` is 8 x 512 tokens with no padding
(speed does not depend on what the text says). Deterministic for a given ``--seed``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/data/smollm2-512.jsonl")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--tokens", type=int, default=520)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=os.path.expanduser("~/.cache/metareason/models/smollm2-135m-instruct"))
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from metareason.api import make_causal_loop_task, write_jsonl_atomic

    tok = AutoTokenizer.from_pretrained(args.model)
    task = make_causal_loop_task({"levels": [1, 2, 3, 4]}, args.seed, args.rows * 40)
    examples = [task[i] for i in range(len(task))]
    rows, k = [], 0
    for r in range(args.rows):
        head = examples[k]
        k += 1
        parts = [head["completion"]]
        while len(tok(head["prompt"] + "\n" + "\n".join(parts)).input_ids) < args.tokens:
            e = examples[k % len(examples)]
            k += 1
            parts.append(e["prompt"] + " " + e["completion"])
        rows.append({"question": head["prompt"], "completion": "\n".join(parts), "answer": str(head["answer"])})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(args.out, rows)
    print(f"{args.out}: {len(rows)} rows of >= {args.tokens} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The bench's 24 chat prompts (``metareason bench serve --requests 24``) admitted at once:
prefilled one by one (the scheduler's admission before batched prefill) and in one left-padded
forward (now), SmolLM2-135M-Instruct in-process on the CPU, interleaved, 3 rounds, best of each.
Quoted in bench/results/serve-cpu.md. Run: ``python bench/serve_prefill_ratio.py``."""
import os
import time

import torch

from metareason.benchmarks.serve import requests_for
from metareason.generators.local import load_local_model
from metareason.serving.scheduler import Scheduler

MODEL = os.path.expanduser("~/.cache/metareason/models/smollm2-135m-instruct")


def main() -> None:
    model, tok, _, _ = load_local_model(MODEL, device="cpu")
    sched = Scheduler(model, tok, start=False)
    prompts = []
    for messages, _ in requests_for(24):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    print(f"{len(prompts)} prompts of {min(map(len, prompts))} to {max(map(len, prompts))} tokens "
          f"({sum(map(len, prompts))} in all), {torch.get_num_threads()} threads")
    one, together = [], []
    with torch.inference_mode():
        sched._prefill(prompts[:2], False)  # warm-up
        for r in range(3):
            t = time.perf_counter()
            for p in prompts:
                sched._prefill([p], False)
            one.append(time.perf_counter() - t)
            t = time.perf_counter()
            sched._prefill(prompts, False)
            together.append(time.perf_counter() - t)
            print(f"round {r}: one by one {one[-1]:.2f} s, together {together[-1]:.2f} s, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"best: one by one {min(one):.2f} s, together {min(together):.2f} s, ratio {min(one) / min(together):.2f}")


if __name__ == "__main__":
    main()

#!/bin/bash
# Issue 35's CPU benchmarks on SmolLM2-135M-Instruct, in one go, on a quiet machine (nothing else
# running: the figures are wall-clock ratios of interleaved runs). About 45-60 minutes on 2 cores.
#   bash bench/issue35-cpu.sh            # writes bench/results/{train-smollm2-512-lean,train-smollm2-512-b16-lean,grpo-smollm2}.{json,md}
# (train.lean_activations is on by default; the records without it, train-smollm2-512{,-b16}.md, came
# from the same commands before it existed: add --lean-activations false to reproduce them)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
metareason models get smollm2-135m-instruct >/dev/null
uptime
# SFT at 8 x 512 tokens: ours vs HF Trainer (padded: every row is 512 tokens, so no padding) and the
# plain loop as the floor; 3 interleaved runs per side; 2 threads each (one side at a time)
metareason bench train --config bench/smollm2_512_bench.yaml --batch-size 8 --steps 3 --warmup 1 --repeats 3 \
    --threads 2 --hf-mode padded --floor --out bench/results/train-smollm2-512-lean.json
# the same at 16 x 512, one timed step: the second point of each side's peak-memory line
# (peak = fixed + rows x per-row; the largest batch within 16 GB follows from the two points);
# no --floor here: the plain loop ran out of this 24 GB machine's memory at 16 x 512
metareason bench train --config bench/smollm2_512_bench.yaml --batch-size 16 --steps 1 --warmup 1 --repeats 1 \
    --threads 2 --hf-mode padded --out bench/results/train-smollm2-512-b16-lean.json
# GRPO (run before the 16 x 512 point in this session's records): ours with share_prompt_forward on and off against TRL's GRPOTrainer, the same templated prompts
metareason bench grpo --config bench/smollm2_bench.yaml --prompts 2 --num-generations 4 --completion-length 32 \
    --steps 3 --warmup 1 --repeats 3 --threads 2 --sides ours,ours_unshared,trl --out bench/results/grpo-smollm2.json
uptime

#!/usr/bin/env bash
# One command on a machine with a CUDA GPU (a fresh clone, no network needed):
#   scripts/gpu-check.sh
# 1. installs metareason editable without dependencies (the machine's torch, transformers and
#    triton are used as they are) and builds metareason._C with the CUDA ops for this GPU,
# 2. runs the CUDA and Triton tests (tests/test_ops_*.py: the `cuda` and `triton` backends
#    against the references; the interpreted Triton cases too; tests/test_linear_ce.py: the fused
#    linear cross-entropy's `cuda` and `triton` backends on the GPU),
# 3. runs `metareason bench kernels --device cuda` (module form: the CLI's serving extras are not
#    needed): lru_act, mla_decode and linear_ce (SmolLM2-135M's output layer, 4096 and 8192
#    tokens, bf16 and fp32) with Liger-Kernel's LigerFusedLinearCrossEntropyLoss as the peer when
#    liger_kernel is installed (it is not a dependency: `pip install liger-kernel` beforehand;
#    without it the rows say why and GPU_CHECK_REQUIRE_LIGER=1 makes that a failure); writes
#    bench/results/kernels-cuda.json with the device name,
# 4. prints the GPU goals: mla_decode bf16 B=64 S=4096 H=16 at >= 70% of the measured copy
#    bandwidth, lru_act faster than torch.compile of its reference, linear_ce's time and peak
#    memory against Liger's.
# Budget: well under 10 minutes (build ~2-4 min with all cores, tests ~1 min, bench ~2 min).
# Environment: PYTHON (default python3), MAX_JOBS (default: all cores), TORCH_CUDA_ARCH_LIST
# (default: this GPU's capability), GPU_CHECK_SKIP_BUILD=1 to reuse a build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
T0=$(date +%s)
log() { echo "[gpu-check +$(( $(date +%s) - T0 ))s] $*"; }
mkdir -p build bench/results

$PY - <<'PYEOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu-check: torch.cuda.is_available() is False: this script needs a CUDA GPU")
print(f"device: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}), "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF
if ! $PY -c "import liger_kernel.transformers" 2>/dev/null; then
  if [ "${GPU_CHECK_REQUIRE_LIGER:-0}" = "1" ]; then
    echo "gpu-check: liger_kernel is not importable (pip install liger-kernel) and GPU_CHECK_REQUIRE_LIGER=1"
    exit 1
  fi
  echo "gpu-check: note: liger_kernel is not importable: the linear_ce rows will have no Liger peer"
fi
CAP=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$CAP}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" METAREASON_CUDA=1

if [ "${GPU_CHECK_SKIP_BUILD:-0}" != "1" ]; then
  log "install + build metareason._C with CUDA (arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs); log: build/gpu-check-build.log"
  if ! $PY -m pip install --no-deps --no-build-isolation -v -e . >build/gpu-check-build.log 2>&1; then
    tail -40 build/gpu-check-build.log
    echo "gpu-check: the install/build failed (full log: build/gpu-check-build.log)"
    exit 1
  fi
fi
$PY -c "from metareason import ops; e = ops.extension(); assert e is not None and e.has_cuda(), 'metareason._C has no CUDA ops'; print('backends:', ops.available_backends())"

log "CUDA and Triton tests"
status=0
$PY -m pytest -q -o addopts= -p no:cacheprovider tests/test_ops_lru_act.py tests/test_ops_mla_decode.py \
  tests/test_ops_triton.py tests/test_linear_ce.py 2>&1 | tee build/gpu-check-tests.log | tail -25 || true
grep -qE "[0-9]+ passed" build/gpu-check-tests.log && ! grep -qE "[0-9]+ (failed|error)" build/gpu-check-tests.log || status=1

log "bench kernels --device cuda"
$PY -m metareason.benchmarks.kernels --device cuda --out bench/results 2>&1 | tee build/gpu-check-bench.log | tail -40

$PY - <<'PYEOF'
import json
r = json.load(open("bench/results/kernels-cuda.json"))
print(f"\nGPU goals on {r['device']} (copy {r['machine']['copy_gbps']:.0f} GB/s, sgemm {r['machine']['sgemm_gflops']:.0f} GFLOP/s):")
for row in r["rows"]:
    if row["op"] == "mla_decode" and row["shape"]["B"] == 64 and row["dtype"] == "bfloat16":
        ok = row["frac_copy_bw"] >= 0.7
        print(f"  mla_decode bf16 B=64 {row['backend']}: {row['frac_copy_bw']:.2f} of copy bandwidth "
              f"({'met' if ok else 'NOT met'}: goal 0.70)")
    if row["op"] == "lru_act":
        vs = row.get("vs_compile")
        print(f"  lru_act tokens={row['shape']['tokens']} {row['backend']}: {vs if vs is None else round(vs, 2)}x "
              f"torch.compile ({'met' if vs and vs > 1 else 'NOT met'})")
    if row["op"] == "linear_ce":
        mib = lambda b: "-" if b is None else f"{b / 2 ** 20:.0f} MiB"
        peer = (f"{row['vs_liger']:.2f}x Liger (range {row['vs_liger_range'][0]:.2f}-{row['vs_liger_range'][1]:.2f}), "
                f"peak {mib(row['peak_bytes'])} vs Liger {mib(row['liger_peak_bytes'])}") if "vs_liger" in row \
            else f"no Liger peer ({row['liger_error']})"
        print(f"  linear_ce tokens={row['shape']['tokens']} {row['dtype']} {row['backend']}: "
              f"{row['vs_reference']:.2f}x unfused, {peer}")
PYEOF
log "done (tests $([ $status = 0 ] && echo passed || echo FAILED)); results: bench/results/kernels-cuda.json"
exit $status

#!/usr/bin/env bash
# One command that proves the GPU paths on a fresh machine with one NVIDIA GPU (docs/gpu.md).
#
#   bash benchmarks/gpu_proof.sh            # from the repository root
#   bash benchmarks/gpu_proof.sh --dry-run  # rehearsal on a machine without a GPU (see below)
#
# Steps (each logged; every step runs even when an earlier one failed; exit 1 if any failed):
#   1. environment: nvidia-smi, python/torch/triton versions (written to env.txt)
#   2. install: pip install --no-build-isolation --no-deps -e .  (builds vgmr_fast._C with the
#      CUDA kernels for this GPU's architecture only: TORCH_CUDA_ARCH_LIST from the device)
#   3. vgmr-fast check: every fused backend (cpu, cuda, triton) against the reference
#   4. the GPU tests: tests/cuda, tests/backend_triton, tests/ops (CUDA and Triton cases; the
#      tests beyond 2**31 elements in a second, serial run)
#   5. compute-sanitizer memcheck and racecheck on a small script that launches every CUDA
#      kernel (gate_norm vector/generic forward and backward, the partial-sum reduction,
#      summary_pool forward/count/backward, interaction forward/backward)
#   6. vgmr-fast bench --device cuda --quick
# Everything lands in benchmarks/results/<device>-<date>/ (ready to commit), with summary.md.
#
# Time: the whole script is held to 470 s (under 8 minutes) by one deadline: each step runs
# under `timeout` with the smaller of its own limit and what is left of the deadline, and a
# step that hits its limit, or finds no time left, counts as failed. Per-step limits: install
# 150 s, check 120 s, tests 170 s (xdist, 8 workers) + 90 s (beyond 2**31 elements), sanitizers
# 60 s each, bench 120 s.
# These are estimates for an H100/H200 (16 CPU cores for the build and the Triton JIT): the
# script has not yet run on a GPU (docs/gpu.md); the first run's summary.md gives the real
# per-step times to tune them.
# Nothing is downloaded (the lent H200 image has no internet access): torch, triton, pytest,
# setuptools and ninja must be installed, as on that image; pytest-xdist is used when installed.
#
# --dry-run: every step that can run without a GPU, so that a GPU run is not spent on this
# script's own mistakes: the environment record (no nvidia-smi), the install command as
# `pip install --dry-run` (setup.py runs, nothing is compiled or installed), `vgmr-fast check`,
# the GPU tests of step 4 (each visibly skipped, the rest of the selection collected),
# the sanitizer script checked for syntax (compute-sanitizer needs a GPU), `vgmr-fast bench
# --device cpu --quick` (GPU_PROOF_BENCH_ARGS adds options), the summary. Results go to
# $GPU_PROOF_OUT (default: a new folder under /tmp), never to benchmarks/results. Its time
# limits are the GPU run's times GPU_PROOF_LIMIT_SCALE (default 5: a small shared CPU imports
# torch and Triton, and benchmarks, several times slower than a 16-core GPU host).
set -uo pipefail

DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    *) echo "gpu_proof.sh: unknown argument '$arg' (only --dry-run)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, also for scripts under $OUT
PY=${PYTHON:-python3}
SCALE=1
if [ $DRY_RUN -eq 1 ]; then SCALE=${GPU_PROOF_LIMIT_SCALE:-5}; fi
START=$(date +%s)
DEADLINE=$((START + ${GPU_PROOF_BUDGET_S:-$((470 * SCALE))}))

DATE=$(date -u +%Y-%m-%d)
if [ $DRY_RUN -eq 1 ]; then
  GPU_NAME="dry run without a GPU"
  SLUG=cpu-dry-run
  BASE=${GPU_PROOF_OUT:-$(mktemp -d /tmp/gpu_proof_dry_run.XXXXXX)}
  OUT="$BASE/$SLUG-$DATE"
else
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_proof.sh: no NVIDIA GPU found (nvidia-smi -L failed); --dry-run rehearses without one" >&2
    exit 2
  fi
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
  SLUG=$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
  OUT="$ROOT/benchmarks/results/$SLUG-$DATE"
fi
mkdir -p "$OUT"
echo "gpu_proof.sh: results in $OUT"
SUMMARY="$OUT/summary.md"
FAILED=0
echo "# GPU proof: $GPU_NAME, $DATE" >"$SUMMARY"
echo "" >>"$SUMMARY"
echo "| step | result | seconds | log |" >>"$SUMMARY"
echo "|---|---|---:|---|" >>"$SUMMARY"

# step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, record the result
step() {
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  local t0 rc left
  t0=$(date +%s)
  left=$((DEADLINE - t0))
  if [ "$left" -lt 10 ]; then
    echo "=== $name: FAIL, no time left of the budget"
    echo "| $name | FAIL (no time left of the budget) | 0 | - |" >>"$SUMMARY"
    FAILED=1
    return
  fi
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0))
  local result="pass"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    result="FAIL (timed out after ${limit}s)"
    FAILED=1
  elif [ $rc -ne 0 ]; then
    result="FAIL (exit $rc)"
    FAILED=1
  fi
  echo "    $result in ${dt}s (log: $OUT/$name.log)"
  tail -n 5 "$OUT/$name.log" | sed 's/^/    | /'
  echo "| $name | $result | $dt | $name.log |" >>"$SUMMARY"
}

# ---- 1. environment --------------------------------------------------------------------
{
  if [ $DRY_RUN -eq 1 ]; then echo "nvidia-smi: not run (dry run)"; else nvidia-smi; fi
  echo
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name(), torch.cuda.get_device_capability()) if torch.cuda.is_available() else print('device: none visible')"
  "$PY" -c "import triton; print('triton', triton.__version__)"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -n 2
  git -C "$ROOT" rev-parse HEAD 2>/dev/null
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ---- 2. install (build the extension with the CUDA kernels for this GPU only) -------------
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ $DRY_RUN -eq 1 ]; then
  # setup.py runs (toolkit and architecture choice without a GPU), nothing is built or installed
  step install 150 "$PY" -m pip install --dry-run --no-build-isolation --no-deps -e .
  step built_with_cuda 30 "$PY" -c "
import vgmr_fast.ops.backend as b
print('dry run: CUDA kernels registered:', b.has_cuda_kernels(), '; Triton available:', b.has_triton())"
else
  CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST="$CAP"
  step install 150 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  step built_with_cuda 30 "$PY" -c "
import vgmr_fast.ops.backend as b
assert b.has_cuda_kernels(), 'vgmr_fast._C was built without the CUDA kernels'
print('CUDA kernels registered; Triton available:', b.has_triton())"
fi

# pytest-xdist parallelises the JIT-heavy Triton tests; without it the tests run serially.
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n 8)
else
  echo "pytest-xdist is not installed: the tests run serially"
fi
# --dry-run: only the GPU cases of the selection (named or marked gpu), each skipped visibly
ONLY_GPU=""
if [ $DRY_RUN -eq 1 ]; then ONLY_GPU="gpu and "; fi

# ---- 3. vgmr-fast check ------------------------------------------------------------------
step check 120 "$PY" -m vgmr_fast check

# ---- 4. GPU tests -------------------------------------------------------------------------
# The tests beyond 2**31 elements hold ~20 GB each: serially, after the parallel run.
step tests 170 "$PY" -m pytest -q -rs -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} tests/cuda tests/backend_triton \
  tests/ops -k "${ONLY_GPU}not beyond" --junitxml="$OUT/tests.xml"
step tests_beyond_2_31 90 "$PY" -m pytest -q -rs -p no:cacheprovider tests/cuda tests/backend_triton tests/ops \
  -k "${ONLY_GPU}beyond" --junitxml="$OUT/tests_beyond_2_31.xml"

# ---- 5. compute-sanitizer: every CUDA kernel once, small shapes ---------------------------
cat >"$OUT/sanitize_subset.py" <<'EOF'
"""Launch every CUDA kernel of vgmr_fast._C once on small shapes (for compute-sanitizer).

gate_norm: D = 64 (vector, one warp per row), 1024 (vector), 4096 (vector, 16 per thread),
1001 (generic: D not a multiple of the vector width), 5000 (generic forward with its cache,
generic backward); with dropout; fp32 and bf16; backward through autograd (the partial sums
reduction kernel). summary_pool with and without a mask (fwd, count, bwd); interaction."""
import torch

from vgmr_fast import ops

torch.manual_seed(0)
dev = "cuda"
for dtype in (torch.float32, torch.bfloat16):
    for B, T, D in ((2, 5, 64), (2, 3, 1024), (1, 2, 4096), (2, 3, 1001), (1, 2, 5000)):
        z = torch.randn(B, T, D, device=dev, dtype=dtype, requires_grad=True)
        x = torch.randn(B, T, D, device=dev, dtype=dtype, requires_grad=True)
        br = torch.randn(B, D, device=dev, requires_grad=True)
        w = torch.randn(D, device=dev, requires_grad=True)
        b = torch.randn(D, device=dev, requires_grad=True)
        y = ops.gate_norm(z, br, x, w, b, p=0.1, seed=12345, backend="cuda")
        y.float().square().sum().backward()
    h = torch.randn(3, 7, 35, device=dev, dtype=dtype, requires_grad=True)
    mask = torch.rand(3, 7, device=dev) > 0.4
    mask[0] = False
    for m in (None, mask):
        mean, mx = ops.summary_pool(h, m, backend="cuda")
        (mean.float().sum() + mx.float().sum()).backward()
    s = torch.randn(2, 3, 35, device=dev, dtype=dtype, requires_grad=True)
    ops.interaction(s, backend="cuda").float().sum().backward()
torch.cuda.synchronize()
print("every CUDA kernel launched")
EOF
# the toolkit's bin/ need not be on PATH (nvcc may be a wrapper elsewhere)
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ $DRY_RUN -eq 1 ]; then
  step sanitizer_script_syntax 30 "$PY" -m py_compile "$OUT/sanitize_subset.py"
  echo "| sanitizer | skipped (dry run: needs a GPU; compute-sanitizer: ${SANITIZER:-not found}) | 0 | - |" >>"$SUMMARY"
elif [ -n "$SANITIZER" ]; then
  for tool in memcheck racecheck; do
    step "sanitizer_$tool" 60 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
      --target-processes all "$PY" "$OUT/sanitize_subset.py"
  done
else
  echo "| sanitizer | FAIL (compute-sanitizer not found) | 0 | - |" >>"$SUMMARY"
  FAILED=1
fi

# ---- 6. benchmark -------------------------------------------------------------------------
BENCH_DEVICE=cuda
if [ $DRY_RUN -eq 1 ]; then BENCH_DEVICE=cpu; fi
# shellcheck disable=SC2086  # GPU_PROOF_BENCH_ARGS: words on purpose
step bench 120 "$PY" -m vgmr_fast bench --device $BENCH_DEVICE --quick --no-progress --out "$OUT" \
  --name "bench-$SLUG-$DATE" ${GPU_PROOF_BENCH_ARGS:-}

TOTAL=$(($(date +%s) - START))
{
  echo ""
  echo "Total: ${TOTAL}s. Command: \`bash benchmarks/gpu_proof.sh $*\` at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)."
  if [ $FAILED -ne 0 ]; then echo "Result: FAIL"; else echo "Result: PASS"; fi
} >>"$SUMMARY"
cat "$SUMMARY"
exit $FAILED

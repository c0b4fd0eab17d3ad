#!/usr/bin/env bash
# The GPU check, in one call on a lent GPU machine (no internet there: nothing is downloaded).
# Builds the extension for sm_90, runs the CUDA tests, compute-sanitizer over every op, and the
# benchmarks; everything it prints is also written under $OUT (default: build/gpu_check).
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu_check}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() { echo; echo "== $*"; }
# run LOG CMD...: runs CMD, keeps its output in $OUT/LOG, shows the tail, records a failure.
run() {
  local log="$OUT/$1"; shift
  "$@" > "$log" 2>&1; local rc=$?
  tail -n 25 "$log"
  [ $rc = 0 ] || { echo "FAILED (exit $rc): $*"; status=1; }
}

step "machine"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader;
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee -a "$OUT/machine.txt"

step "build (sm_90)"
run build.txt python setup.py -q build_ext --inplace

step "CUDA tests (pytest)"
run pytest_ops_cuda.txt python -m pytest -q tests/test_rope2d.py tests/test_pos2d_add.py -k cuda
run pytest_model.txt python -m pytest -q tests/test_model.py

step "compute-sanitizer"
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck initcheck synccheck; do
  run "sanitizer_$tool.txt" "$SAN" --tool "$tool" --error-exitcode 1 python scripts/sanitize_ops.py
done

step "benchmarks"
for dtype in bfloat16 float32; do
  run "bench_ops_$dtype.txt" python scripts/bench_ops.py --device cuda --dtype "$dtype" --json "$OUT/bench_ops_$dtype.json"
done
run bench_model.txt python scripts/bench_model.py --device cuda --json "$OUT/bench_model.json"

step "gpu_check: $([ $status = 0 ] && echo all passed || echo FAILURES above)"
exit $status

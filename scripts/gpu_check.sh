#!/usr/bin/env bash
# The GPU check on a lent GPU machine (no internet there: nothing is downloaded).
# Builds the extension for sm_90, then parts: ops and model by default, or the ones named:
#   ops:   the CUDA tests of the ops, their benchmarks (against a copy of the same bytes and eager
#          PyTorch) and compute-sanitizer over every op;
#   model: the CUDA tests of the model (fused vs torch, torch.compile with CUDA graphs) and the
#          JiT-B/16 training-step benchmark (batch 64, bf16), eager and compiled with
#          mode="reduce-overhead", fused vs torch;
#   packed: the packed-batch checks in one call (build included, <= 10 minutes): the CUDA tests of packed batches
#          (tests/test_packing.py, test_packing_scaling.py, test_freqs_index.py,
#          test_pos2d_add_indexed.py), the packed op benchmarks (rope2d, qk_norm_rope fwd+bwd at
#          T = 64k, 128k, 256k bf16, positions new every call, vs eager per-call tables,
#          torch.compile(dynamic=True)
#          and a copy; GB/s and the fraction of HBM peak), the packed vs pad-to-max JiT-B/16
#          training step (eager, then compiled), and compute-sanitizer over the packed cases of
#          scripts/sanitize_ops.py (packed views, freqs_index, pos2d_add_indexed).
#          Steps run in that order and one that would pass $BUDGET_S (default 570 s from the
#          start) is skipped and named in the summary, so one call always ends with the summary.
#   fsdp:  train.parallel=fsdp on the GPU, world size 1 (FSDP2 over one rank: its bf16 mixed precision
#          policy, per-block compile and activation checkpointing): the tiny config trained 30 steps
#          with fsdp + compile + activation checkpointing under torchrun and with plain ddp, their
#          losses compared; then the JiT-B/4 64x64 step (configs/emoji64_b4.yaml, batch 128) with ddp
#          and fsdp compiled (per block, then the whole model), activation checkpointing off and on:
#          peak memory and step time (scripts/bench_dist.py, scripts/bench_model.py). Budgeted as
#          packed: after a cold build the last steps may be skipped; run it again on the warm machine.
# Each step has a time limit. A device call may run 10 minutes: build + one part fits in one
# call, both parts may not, so on a cold machine run them as two calls (the second call on the
# still-warm machine reuses the build). Logs go to $LOGS (default build/gpu_check); the summary
# table is printed last.
#   bash scripts/gpu_check.sh            # both parts
#   bash scripts/gpu_check.sh model      # build + the model part
#   bash scripts/gpu_check.sh packed     # build + the packed checks, one call
#   bash scripts/gpu_check.sh fsdp       # build + the fsdp checks, one call
#   bash scripts/gpu_check.sh --dry-run packed   # anywhere: print each step's command, run nothing
# A missing test dependency (e.g. expecttest) is installed from ./.whl/*.whl when that folder
# exists (wheels downloaded beforehand; see docs/benchmarks.md).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
PARTS="${*:-ops model}"
for part in $PARTS; do
  case "$part" in ops|model|packed|fsdp) ;; *) echo "gpu_check: unknown part '$part' (ops | model | packed | fsdp)"; exit 2 ;; esac
done
BUDGET_S="${BUDGET_S:-570}"
want() { [[ " $PARTS " == *" $1 "* ]]; }
LOGS="${LOGS:-build/gpu_check}"
mkdir -p "$LOGS"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
# Build with the system compiler. On the lent H200 image the build otherwise picked
# /opt/gcc/bin/g++ (a wrapper), and the extension it made crashed (SIGSEGV in
# std::ostream::operator<<(long)) as soon as an argument check formatted its error message;
# /usr/bin/g++ (the same GCC 13.3) builds a working one. JITROPE_CXX overrides.
SYS_CXX="${JITROPE_CXX:-/usr/bin/g++}"
if [ -x "$SYS_CXX" ]; then
  export CXX="$SYS_CXX" CC="${SYS_CXX/g++/gcc}" LDSHARED="$SYS_CXX -shared"
fi
status=0
summary=()
step() { echo; echo "== $*"; }
# run SECONDS LOG CMD...: runs CMD under a time limit, keeps its output in $LOGS/LOG, shows the
# tail, records the outcome for the summary.
run() {
  local limit="$1" log="$LOGS/$2"; shift 2
  local t0=$SECONDS
  if [ $DRY = 1 ]; then
    echo "[dry-run] timeout $limit $* > $log"
    summary+=("$(printf '%-28s %-22s %4ds' "${log##*/}" "dry-run" 0)")
    return
  fi
  timeout "$limit" "$@" > "$log" 2>&1; local rc=$?
  tail -n 20 "$log"
  local what="ok"
  if [ $rc = 124 ]; then what="TIMEOUT after ${limit}s"; status=1
  elif [ $rc != 0 ]; then what="FAILED (exit $rc)"; status=1; fi
  summary+=("$(printf '%-28s %-22s %4ds' "${log##*/}" "$what" $((SECONDS - t0)))")
}

# fits SECONDS LOG: true when a step of that limit still ends within $BUDGET_S; else records the skip.
fits() {
  if [ $DRY = 1 ] || (( SECONDS + $1 <= BUDGET_S )); then return 0; fi
  summary+=("$(printf '%-28s %-22s %4ds' "$2" "SKIPPED (budget)" 0)"); status=1; return 1
}

if [ $DRY = 1 ]; then
  echo "gpu_check --dry-run: parts '$PARTS'; commands only, nothing is built or run"
else
step "machine"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -n 2; echo "CXX=${CXX:-unset}: $(${CXX:-c++} --version | head -n 1)"; } 2>&1 | tee "$LOGS/machine.txt"
if ! "$PY" -c "import expecttest" 2>/dev/null && ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/jitrope_site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/jitrope_site"
fi

step "build (sm_$(echo "$TORCH_CUDA_ARCH_LIST" | tr -d .))"
run 300 build.txt env PYTHON="$PY" bash scripts/build.sh
"$PY" -c "import jitrope, sys; print('extension', jitrope.HAS_EXTENSION, 'cuda kernels', jitrope.has_cuda_kernels()); sys.exit(not jitrope.has_cuda_kernels())" \
  || { echo "no CUDA kernels: stopping"; exit 1; }

# With pytest-xdist (there on the GPU image) the tests run in worker processes: a crash fails one
# test and the rest still run.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 4)
fi

if want ops; then
  step "CUDA tests of the ops (pytest -k cuda)"
  run 180 pytest_ops_cuda.txt "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" -rfE \
    tests/test_rope2d.py tests/test_pos2d_add.py tests/test_qk_norm_rope.py -k cuda

  step "benchmarks: ops (bf16, fp32; vs a copy, eager and torch.compile of the published-style code)"
  run 180 bench_ops.txt "$PY" scripts/bench_ops.py --op all --compile --device cuda --dtype bfloat16,float32 --json "$LOGS/bench_ops.json"

  step "compute-sanitizer"
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck initcheck synccheck; do
    run 120 "sanitizer_$tool.txt" "$SAN" --tool "$tool" --error-exitcode 1 "$PY" scripts/sanitize_ops.py
  done
fi

if want model; then
  step "CUDA tests of the model (pytest -k cuda: fused vs torch, reduce-overhead training)"
  run 180 pytest_model_cuda.txt "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" -rfE \
    tests/test_model.py tests/test_compile.py -k cuda

  # Training step only: every compiled graph adds inductor's compile time on a cold machine, and
  # the sampling forward would double the graphs (add --what train sample for it).
  step "benchmarks: JiT-B/16 train step, batch 64, bf16 autocast, eager and reduce-overhead, fused vs torch"
  run 300 bench_model.txt "$PY" scripts/bench_model.py --device cuda --compile none reduce-overhead \
    --what train --json "$LOGS/bench_model.json"
fi

if want packed; then
  PACKED_TESTS=(tests/test_packing.py tests/test_packing_scaling.py tests/test_freqs_index.py
    tests/test_pos2d_add_indexed.py)
  step "CUDA tests of packed batches (pytest -k cuda: ${PACKED_TESTS[*]})"
  fits 150 pytest_packed_cuda.txt && run 150 pytest_packed_cuda.txt "$PY" -m pytest -q -p no:cacheprovider \
    "${XDIST[@]}" -rfE "${PACKED_TESTS[@]}" -k cuda

  step "benchmarks: packed rope2d / qk_norm_rope, T = 64k, 128k, 256k bf16, positions new every call"
  fits 150 bench_ops_packed.txt && run 150 bench_ops_packed.txt "$PY" scripts/bench_ops.py --packed --op all \
    --compile --device cuda --dtype bfloat16 --reps 20 --warmup 3 --json "$LOGS/bench_ops_packed.json"

  step "benchmarks: packed vs pad-to-max JiT-B/16 training step, 256..512 px mix, 16k tokens, bf16, eager"
  fits 120 bench_model_packed.txt && run 120 bench_model_packed.txt "$PY" scripts/bench_model.py --packed \
    --device cuda --compile none --iters 5 --warmup 2 --json "$LOGS/bench_model_packed.json"

  step "compute-sanitizer: the packed cases (packed views, freqs_index, pos2d_add_indexed)"
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck; do
    fits 60 "sanitizer_packed_$tool.txt" && run 60 "sanitizer_packed_$tool.txt" "$SAN" --tool "$tool" \
      --error-exitcode 1 "$PY" scripts/sanitize_ops.py --cases packed
  done

  # Last: inductor compiles JiT-B twice (packed and padded, T dynamic), the longest step.
  step "benchmarks: the same step compiled (torch.compile default, dynamic shapes)"
  fits 200 bench_model_packed_compiled.txt && run 200 bench_model_packed_compiled.txt "$PY" \
    scripts/bench_model.py --packed --device cuda --compile default --iters 5 --warmup 2 \
    --json "$LOGS/bench_model_packed_compiled.json"
fi

if want fsdp; then
  TINY_GPU=(--config configs/tiny_cpu.yaml train.device=cuda train.steps=30 train.log_every=10 train.ckpt_every=30
    train.progress=false train.tensorboard=false train.num_threads=null)
  step "fsdp on one GPU under torchrun: compile per block + activation checkpointing vs plain ddp (tiny, 30 steps)"
  fits 150 train_fsdp_gpu.txt && run 150 train_fsdp_gpu.txt "$PY" -m torch.distributed.run --standalone \
    --nproc_per_node=1 -m jitrope.train "${TINY_GPU[@]}" train.out_dir="$LOGS/run_fsdp" train.parallel=fsdp \
    train.compile_mode=default train.activation_checkpointing=true
  fits 90 train_ddp_gpu.txt && run 90 train_ddp_gpu.txt "$PY" -m jitrope.train "${TINY_GPU[@]}" \
    train.out_dir="$LOGS/run_ddp"
  fits 30 train_fsdp_vs_ddp.txt && run 30 train_fsdp_vs_ddp.txt "$PY" -c "
import sys
from jitrope.runlog import read_metrics
a, b = (read_metrics('$LOGS/run_' + k) for k in ('fsdp', 'ddp'))
for x, y in zip(a, b):
    print('step', x['step'], 'loss fsdp', round(x['loss'], 4), 'ddp', round(y['loss'], 4))
ok = all(abs(x['loss'] - y['loss']) <= 0.05 * abs(y['loss']) + 0.02 for x, y in zip(a, b)) and len(a) == len(b) == 3
print('fsdp (bf16 params, fp32 reduce) trains as ddp (bf16 autocast) within 5%:', ok); sys.exit(not ok)"

  step "fsdp vs ddp, one GPU: JiT-B/4 64x64 batch 128, compiled per block, activation checkpointing off / on"
  fits 200 bench_dist_gpu.txt && run 200 bench_dist_gpu.txt "$PY" scripts/bench_dist.py \
    --config configs/emoji64_b4.yaml --batch 128 --steps 8 --compile default --activation-checkpointing off on \
    --json "$LOGS/bench_dist_gpu.json"

  step "fsdp, one GPU: the whole model compiled instead of each block"
  fits 120 bench_dist_gpu_model.txt && run 120 bench_dist_gpu_model.txt "$PY" scripts/bench_dist.py \
    --config configs/emoji64_b4.yaml --batch 128 --steps 8 --parallel fsdp --compile default --compile-how model \
    --json "$LOGS/bench_dist_gpu_model.json"

  step "activation checkpointing off / on: JiT-B/4 64x64 batch 128, bf16, eager"
  fits 90 bench_model_ac_gpu.txt && run 90 bench_model_ac_gpu.txt "$PY" scripts/bench_model.py --device cuda \
    --config configs/emoji64_b4.yaml --batch 128 --activation-checkpointing off on --compile none --iters 5 \
    --warmup 2 --json "$LOGS/bench_model_ac_gpu.json"
fi

step "summary"
printf '%s\n' "${summary[@]}" | tee "$LOGS/summary.txt"
echo "gpu_check: $([ $status = 0 ] && echo all passed || echo FAILURES above)"
exit $status

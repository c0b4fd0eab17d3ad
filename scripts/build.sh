#!/usr/bin/env bash
# Builds the extension in place (python/jitrope/_C*.so) with ninja + ccache, so a second run only
# recompiles what changed. CUDA kernels are built when nvcc and a CUDA build of torch are present
# (JITROPE_CPU_ONLY=1 turns them off); TORCH_CUDA_ARCH_LIST picks the GPUs (default: cmake/flags.txt,
# e.g. TORCH_CUDA_ARCH_LIST=9.0 for an H100/H200 alone); PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
"${PYTHON:-python}" setup.py -q build_ext --inplace

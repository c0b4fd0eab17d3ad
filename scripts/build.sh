#!/usr/bin/env bash
# Builds the extension in place (python/jitrope/_C*.so) with ninja + ccache, so a second run only
# recompiles what changed. CUDA kernels are built when nvcc and a CUDA build of torch are present
# (JITROPE_CPU_ONLY=1 turns them off); TORCH_CUDA_ARCH_LIST picks the GPUs (default here: 9.0);
# PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
"${PYTHON:-python}" setup.py -q build_ext --inplace

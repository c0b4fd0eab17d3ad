#!/usr/bin/env bash
# Builds the extension in place (python/jitrope/_C*.so) with ninja + ccache, so a second run only
# recompiles what changed. CUDA kernels are built when nvcc and a CUDA build of torch are present
# (JITROPE_CPU_ONLY=1 turns them off); TORCH_CUDA_ARCH_LIST picks the GPUs (default: cmake/flags.txt,
# e.g. TORCH_CUDA_ARCH_LIST=9.0 for an H100/H200 alone); PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# ccache hits across clones and worktrees: paths under the checkout are hashed relative to it, and the
# working directory is left out of the hash (-g would otherwise put it in), so a fresh clone in another
# folder (CI) reuses the objects of the last build of the same sources.
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}" CCACHE_NOHASHDIR="${CCACHE_NOHASHDIR:-1}"
"${PYTHON:-python}" setup.py -q build_ext --inplace

#!/usr/bin/env bash
# Sets up a machine and runs every test: the format check (scripts/lint.sh), pytest (ops, model,
# training), then through ctest the GoogleTest binary and tests/cpp/consumer (a LibTorch
# application built against the installed CMake package). CUDA tests run where a GPU is present
# and are skipped otherwise.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh --quick    # the fast lane while developing: pytest -m "not slow", no ctest
#   bash scripts/test.sh -k rope2d  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
quick=0
if [ "${1:-}" = "--quick" ]; then
  quick=1
  shift
fi

bash scripts/install_deps.sh
bash scripts/lint.sh
bash scripts/build.sh
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$ROOT}" CCACHE_NOHASHDIR="${CCACHE_NOHASHDIR:-1}"  # as build.sh, for ctest's CMake build
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"

if [ $quick = 1 ]; then
  echo "== pytest, the fast lane (-m 'not slow')"
  exec python -m pytest -q -m "not slow" "$@"
fi

echo "== pytest"
python -m pytest -q "$@"

echo "== GoogleTest and the installed-package consumer (ctest)"
cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release > build/cmake-configure.log 2>&1 \
  || { cat build/cmake-configure.log; exit 1; }
cmake --build build/cmake -j "$(nproc)"
ctest --test-dir build/cmake --output-on-failure -j "$(nproc)"

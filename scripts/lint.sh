#!/usr/bin/env bash
# Checks formatting without changing any file; exits non-zero and lists what differs. One section per
# language. Fix C++/CUDA with: clang-format -i <files>, Python with: ruff format python tests scripts studies
# (the versions pinned in requirements-dev.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
status=0

echo "== C++/CUDA: clang-format --dry-run --Werror (.clang-format)"
mapfile -t cxx_files < <(git ls-files --cached --others --exclude-standard -- \
  'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'tests/cpp/*.h' 'tests/cpp/*.cpp')
if [ ${#cxx_files[@]} -gt 0 ]; then
  clang-format --version
  clang-format --dry-run --Werror "${cxx_files[@]}" || status=1
fi

echo "== Python: ruff check and ruff format --check (pyproject.toml)"
ruff --version
ruff check python tests scripts studies || status=1
ruff format --check python tests scripts studies || status=1

exit $status

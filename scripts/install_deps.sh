#!/usr/bin/env bash
# Installs what jitrope needs on a fresh machine: Debian packages (GoogleTest, ccache, npm for
# the emoji data) and the pinned Python packages. Safe to re-run: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -f /usr/include/gtest/gtest.h ] || missing+=(libgtest-dev)
command -v ccache >/dev/null || missing+=(ccache)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install_deps: apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

python -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt

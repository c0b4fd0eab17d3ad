#!/usr/bin/env bash
# The main job: set up this machine, train a small conditional JiT on the emoji data on the CPU,
# then write class-conditional and condition-image samples.
#   bash scripts/demo.sh [dotted.key=value ...]   # e.g. model.pos_embed=factorized2d
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
python -m pip install -q --no-build-isolation --no-deps -e .
# the console scripts, from where pip put them (a pyenv shim for a new script needs `pyenv rehash`)
bin="$(python -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
python scripts/prepare_data.py --heldout-conds samples/cond --cond-size 16  # condition images: held-out emoji
"$bin/jitrope-train" --config configs/emoji32_cpu.yaml "$@"
"$bin/jitrope-sample" --ckpt runs/emoji32_cpu --classes all --out samples/emoji32_classes.png
"$bin/jitrope-sample" --ckpt runs/emoji32_cpu --cond samples/cond --out samples/emoji32_cond.png
echo "samples written to samples/emoji32_classes.png and samples/emoji32_cond.png"

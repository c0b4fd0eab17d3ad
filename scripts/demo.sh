#!/usr/bin/env bash
# The main job: set up this machine, train a small conditional JiT on the emoji data on the CPU,
# then write class-conditional and condition-image samples.
#   bash scripts/demo.sh [dotted.key=value ...]   # e.g. model.pos_embed=factorized2d
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
python -m pip install -q --no-build-isolation --no-deps -e .
python scripts/prepare_data.py
python -m jitrope.train --config configs/emoji32_cpu.yaml "$@"
mkdir -p samples
python -m jitrope.sample --ckpt runs/emoji32_cpu --classes all --out samples/emoji32_classes.png
python - <<'PY'
# Condition images: held-out emoji at the model's condition size (16x16).
from pathlib import Path
from PIL import Image
from jitrope.data import load_emoji, heldout_mask, resize_images
ds = load_emoji(None)
held = heldout_mask(ds.split_keys, 0.05).nonzero().flatten()
# One held-out emoji (never trained on) of each of the first 8 classes, so the grid spans the data.
picks = [next(i for i in held.tolist() if ds.labels[i] == c) for c in range(8)]
out = Path("samples/cond"); out.mkdir(parents=True, exist_ok=True)
for k, i in enumerate(picks):
    img = resize_images(ds.images[i:i + 1], 16)[0].permute(1, 2, 0).numpy()  # uint8 RGB
    Image.fromarray(img).save(out / f"heldout_{k}_{ds.class_names[ds.labels[i]].split()[0].lower()}.png")
PY
python -m jitrope.sample --ckpt runs/emoji32_cpu --cond samples/cond --out samples/emoji32_cond.png
echo "samples written to samples/emoji32_classes.png and samples/emoji32_cond.png"

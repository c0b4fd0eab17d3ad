#!/usr/bin/env python
"""Thin entry point: the same as `python -m jitrope.train` (see --help), without installing the package.

    python scripts/train.py --config configs/emoji32_cpu.yaml [section.key=value ...] [--resume]
    torchrun --nproc_per_node=2 scripts/train.py --config configs/tiny_cpu.yaml
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from jitrope.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

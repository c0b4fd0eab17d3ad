#!/usr/bin/env python
"""Thin entry point: the same as `python -m jitrope.sample` (see --help), without installing the package.

    python scripts/sample.py --ckpt runs/emoji32_cpu --out samples/emoji32.png --cfg 2.5
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from jitrope.sample import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Download, verify and cache the emoji data set (SPEC §8) before training.

    python scripts/prepare_data.py                    # all four vendors into $JITROPE_DATA or ~/.cache/jitrope
    python scripts/prepare_data.py --root data/emoji --vendors google twitter
    python scripts/prepare_data.py --no-download      # only check what is there

Runs `npm pack emoji-datasource-<vendor>@16.0.0` (needs Node.js/npm), checks each tarball against
the sha512 npm reports and the checksums pinned in jitrope.data.PINS, unpacks the 64x64 PNGs once
(into a temporary folder, then renamed) and caches them as tensors. Training does the same on
first use; this script just does it up front and prints what it found.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import torch  # noqa: E402

from jitrope.data import EMOJI_CATEGORIES, EMOJI_VENDORS, EMOJI_VERSION, DataError, data_root, heldout_mask, load_emoji  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", default=None, help="cache folder (default: $JITROPE_DATA or ~/.cache/jitrope)")
    p.add_argument("--vendors", nargs="+", default=list(EMOJI_VENDORS), choices=EMOJI_VENDORS)
    p.add_argument("--skin-tones", action="store_true", help="also cache the skin-tone variants")
    p.add_argument("--holdout", type=float, default=0.05, help="held-out fraction to report (data.holdout)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading what is missing")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        ds = load_emoji(args.root, vendors=args.vendors, skin_tones=args.skin_tones, download=not args.no_download)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    held = heldout_mask(ds.split_keys, args.holdout)
    print(f"emoji-datasource {EMOJI_VERSION} in {data_root(args.root)}: {len(ds)} images of 64x64 "
          f"({int((~held).sum())} train, {int(held.sum())} held out) in {time.perf_counter() - t0:.1f}s")
    counts = torch.bincount(ds.labels, minlength=len(EMOJI_CATEGORIES)).tolist()
    for name, n in zip(EMOJI_CATEGORIES, counts):
        print(f"  {name:<18} {n}")
    for d, v in enumerate(ds.domain_names):
        print(f"  vendor {v:<11} {int((ds.domains == d).sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

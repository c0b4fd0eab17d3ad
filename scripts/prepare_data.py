#!/usr/bin/env python
"""Download, verify and cache the emoji data set (docs/training.md) before training.

    python scripts/prepare_data.py                    # all four vendors into $JITROPE_DATA or ~/.cache/jitrope
    python scripts/prepare_data.py --root data/emoji --vendors google twitter
    python scripts/prepare_data.py --no-download      # only check what is there
    python scripts/prepare_data.py --heldout-conds samples/cond --cond-size 16   # + condition images

Runs `npm pack emoji-datasource-<vendor>@16.0.0` (needs Node.js/npm), checks each tarball against
the sha512 npm reports and the checksums pinned in jitrope.data.PINS, unpacks the 64x64 PNGs once
(into a temporary folder, then renamed) and caches them as tensors. Training does the same on
first use; this script just does it up front and prints what it found. With --heldout-conds it
also writes one held-out emoji (never trained on) of each of the first 8 classes, at the model's
condition size, for `jitrope-sample --cond`.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import torch  # noqa: E402

from jitrope.data import (  # noqa: E402
    EMOJI_CATEGORIES,
    EMOJI_VENDORS,
    EMOJI_VERSION,
    DataError,
    data_root,
    heldout_mask,
    load_emoji,
    write_heldout_conditions,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--root", default=None, help="cache folder (default: $JITROPE_DATA or ~/.cache/jitrope)")
    p.add_argument("--vendors", nargs="+", default=list(EMOJI_VENDORS), choices=EMOJI_VENDORS)
    p.add_argument("--skin-tones", action="store_true", help="also cache the skin-tone variants")
    p.add_argument("--holdout", type=float, default=0.05, help="held-out fraction to report (data.holdout)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading what is missing")
    p.add_argument(
        "--heldout-conds", default=None, metavar="DIR", help="write held-out condition images (PNG) into DIR"
    )
    p.add_argument("--cond-size", type=int, default=16, help="their size (the model's model.cond_img_size)")
    p.add_argument("--cond-classes", type=int, default=8, help="one image of each of the first N classes")
    args = p.parse_args(argv)
    if args.cond_size < 1 or not 0.0 <= args.holdout < 1.0:
        print(
            f"error: --cond-size must be >= 1 and --holdout in [0, 1), got {args.cond_size}, {args.holdout}",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    try:
        ds = load_emoji(args.root, vendors=args.vendors, skin_tones=args.skin_tones, download=not args.no_download)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    held = heldout_mask(ds.split_keys, args.holdout)
    print(
        f"emoji-datasource {EMOJI_VERSION} in {data_root(args.root)}: {len(ds)} images of 64x64 "
        f"({int((~held).sum())} train, {int(held.sum())} held out) in {time.perf_counter() - t0:.1f}s"
    )
    counts = torch.bincount(ds.labels, minlength=len(EMOJI_CATEGORIES)).tolist()
    for name, n in zip(EMOJI_CATEGORIES, counts):
        print(f"  {name:<18} {n}")
    for d, v in enumerate(ds.domain_names):
        print(f"  vendor {v:<11} {int((ds.domains == d).sum())}")
    if args.heldout_conds is not None:
        try:
            paths = write_heldout_conditions(
                ds, args.heldout_conds, args.cond_size, holdout=args.holdout, num_classes=args.cond_classes
            )
        except (DataError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(
            f"wrote {len(paths)} held-out condition images of {args.cond_size}x{args.cond_size} to {args.heldout_conds}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

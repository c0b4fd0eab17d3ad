"""Training data: the emoji set from npm (docs/training.md), ImageFolder-style folders, a synthetic set.

This package gathers the public names of its modules, one concern each:

- :mod:`jitrope.data.imageset`: :class:`ImageSet` (in-memory uint8 images), the image conversions
  (:func:`to_float`, :func:`to_uint8`, :func:`to_rgba8`, :func:`resize_images`) and the fixed
  held-out split (:func:`heldout_mask`: an item is held out when the sha256 of its key falls in
  the lowest ``holdout`` fraction, whatever the vendors, sizes or order);
- :mod:`jitrope.data.emoji`: fetching the npm emoji set (pinned, verified, unpacked atomically) and
  loading it;
- :mod:`jitrope.data.datasets`: the folder and synthetic sets, :func:`build_dataset`, and the choice
  of held-out condition images (:func:`heldout_picks`, :func:`write_heldout_conditions`);
- :mod:`jitrope.data.batching`: :class:`IndexStream` and :class:`BatchMaker`;
- :mod:`jitrope.data.multires`: mixed sizes for packed batches (:func:`parse_sizes`,
  :class:`TokenPacker`, :class:`MultiResMaker`).
"""

from __future__ import annotations

from .batching import BatchMaker, IndexStream, vendor_partners
from .datasets import (
    SYNTHETIC_CLASSES,
    build_dataset,
    heldout_picks,
    image_files,
    load_image_folder,
    make_synthetic,
    write_heldout_conditions,
)
from .emoji import EMOJI_CATEGORIES, EMOJI_VENDORS, EMOJI_VERSION, PINS, data_root, fetch_emoji, load_emoji
from .imageset import (
    IMAGE_EXTENSIONS,
    DataError,
    ImageSet,
    composite_on_white,
    heldout_mask,
    resize_images,
    to_float,
    to_rgba8,
    to_uint8,
)
from .multires import MultiResMaker, TokenPacker, check_patch_multiple, padding_waste, parse_size, parse_sizes

__all__ = [
    "DataError",
    "ImageSet",
    "EMOJI_VERSION",
    "EMOJI_VENDORS",
    "EMOJI_CATEGORIES",
    "PINS",
    "IMAGE_EXTENSIONS",
    "SYNTHETIC_CLASSES",
    "data_root",
    "fetch_emoji",
    "load_emoji",
    "load_image_folder",
    "image_files",
    "make_synthetic",
    "heldout_mask",
    "build_dataset",
    "heldout_picks",
    "write_heldout_conditions",
    "IndexStream",
    "BatchMaker",
    "vendor_partners",
    "MultiResMaker",
    "TokenPacker",
    "padding_waste",
    "parse_size",
    "parse_sizes",
    "check_patch_multiple",
    "resize_images",
    "to_float",
    "to_uint8",
    "to_rgba8",
    "composite_on_white",
]

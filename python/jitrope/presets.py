"""Named JiT configurations for :meth:`jitrope.model.JiTConfig.preset` (SPEC.md §6).

Each preset is a dict of :class:`~jitrope.model.JiTConfig` fields; ``JiTConfig.preset(name, **overrides)``
replaces any of them.
"""

from __future__ import annotations

from typing import Any, Dict

__all__ = ["PRESETS"]

# Paper presets (ImageNet, 256 tokens: 256px at patch 16, 512px at patch 32) and the small ones of
# this project. Bottleneck 48 at patch 4 is 3*4*4: a patch has only 48 values to compress.
PRESETS: Dict[str, Dict[str, Any]] = {
    "JiT-B/16": dict(
        img_size=256,
        patch_size=16,
        depth=12,
        hidden_size=768,
        num_heads=12,
        bottleneck_dim=128,
        in_context_len=32,
        in_context_start=4,
        num_classes=1000,
    ),
    "JiT-B/32": dict(
        img_size=512,
        patch_size=32,
        depth=12,
        hidden_size=768,
        num_heads=12,
        bottleneck_dim=128,
        in_context_len=32,
        in_context_start=4,
        num_classes=1000,
    ),
    "JiT-L/16": dict(
        img_size=256,
        patch_size=16,
        depth=24,
        hidden_size=1024,
        num_heads=16,
        bottleneck_dim=128,
        in_context_len=32,
        in_context_start=8,
        num_classes=1000,
    ),
    "JiT-L/32": dict(
        img_size=512,
        patch_size=32,
        depth=24,
        hidden_size=1024,
        num_heads=16,
        bottleneck_dim=128,
        in_context_len=32,
        in_context_start=8,
        num_classes=1000,
    ),
    "JiT-H/16": dict(
        img_size=256,
        patch_size=16,
        depth=32,
        hidden_size=1280,
        num_heads=16,
        bottleneck_dim=256,
        in_context_len=32,
        in_context_start=10,
        num_classes=1000,
        proj_dropout=0.2,
    ),
    "JiT-H/32": dict(
        img_size=512,
        patch_size=32,
        depth=32,
        hidden_size=1280,
        num_heads=16,
        bottleneck_dim=256,
        in_context_len=32,
        in_context_start=10,
        num_classes=1000,
        proj_dropout=0.2,
    ),
    # 64x64 at patch 4: the problem statement's 16x16 grid of 256 tokens (+64 for a 32x32 condition).
    "JiT-S/4": dict(
        img_size=64,
        patch_size=4,
        depth=12,
        hidden_size=384,
        num_heads=6,
        bottleneck_dim=48,
        in_context_len=32,
        in_context_start=4,
        num_classes=9,
    ),
    "JiT-T/4": dict(
        img_size=64,
        patch_size=4,
        depth=12,
        hidden_size=192,
        num_heads=3,
        bottleneck_dim=48,
        in_context_len=32,
        in_context_start=4,
        num_classes=9,
    ),
    # CPU-sized, 32x32 at patch 4 (8x8 grid).
    "JiT-T/4-32": dict(
        img_size=32,
        patch_size=4,
        depth=12,
        hidden_size=192,
        num_heads=3,
        bottleneck_dim=48,
        in_context_len=8,
        in_context_start=4,
        num_classes=9,
    ),
    "JiT-XT/4-32": dict(
        img_size=32,
        patch_size=4,
        depth=6,
        hidden_size=128,
        num_heads=2,
        bottleneck_dim=48,
        in_context_len=8,
        in_context_start=2,
        num_classes=9,
    ),
    # Trains in seconds on a CPU (tests): 16x16 images, 4x4 grid.
    "tiny": dict(
        img_size=16,
        patch_size=4,
        depth=2,
        hidden_size=64,
        num_heads=2,
        bottleneck_dim=16,
        in_context_len=4,
        in_context_start=1,
        num_classes=9,
    ),
}

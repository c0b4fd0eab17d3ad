"""What a JiT is made of: :class:`JiTConfig`, every knob of :class:`jitrope.model.JiT`, and the named
presets (:data:`PRESETS`) that ``JiTConfig.preset(name, **overrides)`` starts from.

The run configuration (:mod:`jitrope.config`) reads its ``model.*`` keys as these fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from .attention import VARLEN_IMPLS
from .posenc import IMPLS, POS_EMBEDS, SCALINGS, check_pos_embed

__all__ = ["JiTConfig", "PRESETS"]


_CHOICES = {
    "pos_impl": IMPLS,
    "pos_scaling": SCALINGS,
    "null_cond": ("learned", "zeros", "absent"),
    "attn_impl": ("sdpa", "fp32"),
    "packed_attn": VARLEN_IMPLS,
}


@dataclass
class JiTConfig:
    """Every knob of :class:`jitrope.model.JiT`; the defaults are the ``JiT-S/4`` preset with the paper's
    encoding.

    Positional encoding: ``pos_embed`` (docs/training.md: learned1d | sincos2d | factorized2d | rope2d |
    rope2d_mixed | sincos2d+rope2d), ``pos_impl`` (fused | torch), ``pos_scaling`` (how grids other
    than the training one are placed, per axis: extrapolate | interpolate | ntk | yarn; ntk and yarn
    scale RoPE frequencies, tables interpolate under them: :mod:`jitrope.rope`; every mode works on batched
    and packed calls alike, a packed batch scaling each sequence by its own grid), ``pos_max_grid`` /
    ``pos_max_cond_grid`` (factorized2d table sizes; default twice the training grids).
    Condition image: ``cond_img_size`` (None = none), its patch size (default ``patch_size``) and
    bottleneck, ``null_cond``: what stands for "no condition image" (classifier-free guidance, condition
    dropout): ``learned`` (one learned vector in every condition slot), ``zeros``, or ``absent`` (no
    condition tokens at all: the sequence is the unconditional one, e.g. 256 tokens instead of 320; a
    dropped condition is masked out of attention, which gives the same numbers; batched training only).
    ``attn_impl``: sdpa (``F.scaled_dot_product_attention``) or fp32 (the original's float32 logits by hand).
    ``packed_attn``: how attention runs on a packed batch (:func:`jitrope.attention.varlen_attention`:
    auto | varlen | mask | loop).
    """

    img_size: int = 64
    patch_size: int = 4
    in_channels: int = 3
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    bottleneck_dim: int = 48
    num_classes: int = 9
    in_context_len: int = 32
    in_context_start: int = 4
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    pos_embed: str = "sincos2d+rope2d"
    pos_impl: str = "fused"
    pos_scaling: str = "extrapolate"
    pos_max_grid: Optional[Tuple[int, int]] = None
    pos_max_cond_grid: Optional[Tuple[int, int]] = None
    rope_theta: float = 10000.0
    cond_img_size: Optional[int] = None
    cond_patch_size: Optional[int] = None
    cond_in_channels: int = 3
    cond_bottleneck_dim: Optional[int] = None
    null_cond: str = "learned"
    attn_impl: str = "sdpa"
    packed_attn: str = "auto"

    def __post_init__(self) -> None:
        for name in ("pos_max_grid", "pos_max_cond_grid"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, int):
                    v = (v, v)
                v = tuple(int(a) for a in v)
                if len(v) != 2:
                    raise ValueError(f"{name} must be (max_h, max_w), got {getattr(self, name)!r}")
                setattr(self, name, v)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field."""

        def positive(*names):
            for n in names:
                if not (isinstance(getattr(self, n), int) and getattr(self, n) > 0):
                    raise ValueError(f"{n} must be a positive integer, got {getattr(self, n)!r}")

        positive(
            "img_size",
            "patch_size",
            "in_channels",
            "hidden_size",
            "depth",
            "num_heads",
            "bottleneck_dim",
            "num_classes",
            "cond_in_channels",
        )
        for field, choices in _CHOICES.items():
            if getattr(self, field) not in choices:
                raise ValueError(f"{field} must be one of {list(choices)}, got {getattr(self, field)!r}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {list(POS_EMBEDS)}, got {self.pos_embed!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        check_pos_embed(self.pos_embed, width=self.hidden_size, num_heads=self.num_heads)
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        for n in ("attn_dropout", "proj_dropout"):
            if not 0.0 <= getattr(self, n) < 1.0:
                raise ValueError(f"{n} must be in [0, 1), got {getattr(self, n)}")
        if self.in_context_len < 0:
            raise ValueError(f"in_context_len must be >= 0, got {self.in_context_len}")
        if self.in_context_len > 0 and not 0 <= self.in_context_start < self.depth:
            raise ValueError(
                f"in_context_start must be in [0, depth={self.depth}) when in_context_len > 0, "
                f"got {self.in_context_start}"
            )
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"rope_theta must be positive and finite, got {self.rope_theta}")
        if self.pos_max_grid is not None and any(m < g for m, g in zip(self.pos_max_grid, self.grid)):
            raise ValueError(f"pos_max_grid {self.pos_max_grid} must cover the training grid {self.grid}")
        if self.cond_img_size is not None:
            if not (isinstance(self.cond_img_size, int) and self.cond_img_size > 0):
                raise ValueError(f"cond_img_size must be a positive integer or None, got {self.cond_img_size!r}")
            for n in ("cond_patch_size", "cond_bottleneck_dim"):
                v = getattr(self, n)
                if v is not None and not (isinstance(v, int) and v > 0):
                    raise ValueError(f"{n} must be a positive integer or None, got {v!r}")
            if self.cond_img_size % self.cond_patch:
                raise ValueError(
                    f"cond_img_size ({self.cond_img_size}) must be a multiple of cond_patch_size ({self.cond_patch})"
                )
            cg = self.cond_grid
            if self.pos_max_cond_grid is not None and any(m < g for m, g in zip(self.pos_max_cond_grid, cg)):
                raise ValueError(f"pos_max_cond_grid {self.pos_max_cond_grid} must cover the condition grid {cg}")

    # Derived geometry.
    @property
    def grid(self) -> Tuple[int, int]:
        g = self.img_size // self.patch_size
        return (g, g)

    @property
    def cond_patch(self) -> int:
        return self.cond_patch_size or self.patch_size

    @property
    def cond_grid(self) -> Optional[Tuple[int, int]]:
        if self.cond_img_size is None:
            return None
        g = self.cond_img_size // self.cond_patch
        return (g, g)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        # The official SwiGLUFFN: int(int(width * mlp_ratio) * 2 / 3), e.g. 2048 for width 768.
        return int(int(self.hidden_size * self.mlp_ratio) * 2 / 3)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> JiTConfig:
        """A named preset (:data:`PRESETS`) with fields replaced by ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"unknown JiT preset {name!r}; known: {list(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JiTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown JiTConfig field(s): {unknown}")
        return cls(**d)

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


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

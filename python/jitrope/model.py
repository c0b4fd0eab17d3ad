"""JiT ("Just image Transformer", Li & He 2025) with a swappable positional encoding (docs/training.md).

The architecture follows the official ``model_jit.py``: bottleneck patch embedding, adaLN-Zero
blocks with RMSNorm (eps 1e-6, float32), attention with qkv bias and qk-norm *then* RoPE, a SwiGLU
MLP with a fused ``w12``, a timestep embedder and a label embedding with a null class, in-context
class tokens from ``in_context_start`` and a zero-initialised final layer. Added here: a condition
image (its own patch embedding; tokens appended from block 0, dropped before the final layer) and
the positional encodings of :mod:`jitrope.posenc`, chosen by ``JiTConfig.pos_embed``.

    cfg = JiTConfig.preset("JiT-S/4", pos_embed="rope2d", cond_img_size=32)
    model = JiT(cfg)
    x_pred = model(z, t, y, cond=cond_img, cond_drop=drop_mask)   # [B, 3, 64, 64]

Classifier-free guidance: the trainer drops labels by passing ``y = cfg.num_classes`` (the null
class, ``model.null_class``) and drops condition images with ``cond_drop`` (a ``[B]`` bool mask);
``cond=None`` uses the null condition for the whole batch.

Packed batches (docs/ops.md, :mod:`jitrope.packing`): images of different sizes in one token stream,
block-diagonal attention, per-token positions, adaLN through each token's sequence:

    outs = model.forward_packed([img_a, img_b, img_c], t, y, conds=[c_a, None, c_c])  # list of [3, H_s, W_s]

``forward_packed`` packs, runs :meth:`JiT.forward_tokens` (pixel tokens in and out, the part a
compiled training step traces once) and unpacks. The blocks, the attention and the encodings are
the batched path's, given a :class:`~jitrope.packing.PackedSeqs` instead of a ``SeqLayout``. Every
``pos_scaling`` mode applies per sequence (ntk / yarn: each sequence's own RoPE frequencies and YaRN
temperature), so each output is the batched forward of that image alone with the same mode.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import attention_fp32, varlen_attention
from .modelconfig import PRESETS, JiTConfig
from .packing import PackedLayout, PackedSeqs, pack_images, unpack_images
from .posenc import SCALINGS, PosEncGeometry, PositionalEncoding, SeqLayout, build_pos_encoding
from .published import ConvertError, map_published_names
from .reference import compute_dtype, rms_norm

__all__ = [
    "JiTConfig",
    "JiT",
    "JiTBlock",
    "Attention",
    "SwiGLUFFN",
    "RMSNorm",
    "QKNorm",
    "BottleneckPatchEmbed",
    "TimestepEmbedder",
    "LabelEmbedder",
    "FinalLayer",
    "PRESETS",
]


# ----------------------------------------------------------------------------------- layers
def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``shift``/``scale`` already broadcast over tokens (:func:`per_token`)."""
    return x * (1 + scale) + shift


def per_token(mod: Tensor, seq_id: Optional[Tensor]) -> Tensor:
    """adaLN parameters ``[B, k*W]`` of each sample -> ``[B, 1, k*W]`` (one sequence per row), or for a
    packed stream ``[1, T, k*W]``, each token reading its sequence's row (``seq_id [T]``)."""
    return mod.unsqueeze(1) if seq_id is None else mod[seq_id].unsqueeze(0)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (the official JiT / LLaMA one; float64 in a float64 model), returned in
    the input dtype: :func:`jitrope.reference.rms_norm`, the formula the qk norm uses too."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps).to(x.dtype)


class QKNorm(nn.Module):
    """The weights of JiT's q_norm and k_norm RMSNorms over head_dim (row 0 scales q, row 1 k).

    A holder, not a layer: the positional encoding applies the norm together with its rotation
    (:meth:`jitrope.posenc.PositionalEncoding.qk_norm_rope`), q and k in one call.
    """

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2, head_dim))
        self.eps = eps


class BottleneckPatchEmbed(nn.Module):
    """Conv p x p (in -> bottleneck, no bias) then 1x1 Conv (-> width): a low-rank patch projection."""

    def __init__(self, patch_size: int, in_chans: int, bottleneck_dim: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj1 = nn.Conv2d(in_chans, bottleneck_dim, kernel_size=patch_size, stride=patch_size, bias=False)
        self.proj2 = nn.Conv2d(bottleneck_dim, embed_dim, kernel_size=1, stride=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)  # [B, gh*gw, D], row-major

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        """The same projection of pixel tokens ``[N, p*p*C]`` (:func:`jitrope.packing.patchify` order) -> ``[N, D]``."""
        w1 = self.proj1.weight  # [bottleneck, C, p, p] -> [bottleneck, p*p*C] in (row, column, channel) order
        w1 = w1.permute(0, 2, 3, 1).reshape(w1.shape[0], -1)
        w2 = self.proj2.weight.reshape(self.proj2.weight.shape[0], -1)
        return F.linear(F.linear(tokens, w1), w2, self.proj2.bias)

    def reset_parameters(self) -> None:
        # Like nn.Linear over the flattened kernels (official init), not Conv2d's default.
        nn.init.xavier_uniform_(self.proj1.weight.view(self.proj1.weight.shape[0], -1))
        nn.init.xavier_uniform_(self.proj2.weight.view(self.proj2.weight.shape[0], -1))
        nn.init.zeros_(self.proj2.bias)


class TimestepEmbedder(nn.Module):
    """256 sinusoidal features of raw t in [0, 1], then Linear-SiLU-Linear (weights std 0.02)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
        if dim % 2:
            emb = torch.cat((emb, torch.zeros_like(emb[:, :1])), dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        # Features in float32; handed to the MLP in its parameter dtype (float64 for gradcheck).
        emb = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """``Embedding(num_classes + 1, D)``; the last row (label ``num_classes``) is the null class."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias; qk-norm and 2D RoPE are the encoding's, in one call.

    ``layer`` is this attention's index in the model (RoPE-Mixed has frequencies per layer).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        layer: int = 0,
        attn_impl: str = "sdpa",
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        packed_attn: str = "auto",
    ):
        super().__init__()
        self.layer = layer
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.qk_norm = QKNorm(self.head_dim)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_impl = attn_impl
        self.packed_attn = packed_attn

    def forward(
        self, x: Tensor, pos: PositionalEncoding, layout: SeqLayout, key_mask: Optional[Tensor] = None
    ) -> Tensor:
        """``x: [B, N, C]`` with its ``SeqLayout``, or a packed stream ``[1, T, C]`` with its ``PackedSeqs``
        (then attention is block-diagonal over ``layout.cu_seqlens``). ``key_mask``: bool ``[B, 1, 1, N]``,
        True where a key may be attended to (batched calls only; None: every key)."""
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [3,B,H,N,D] view
        # q and k together, read in place from the projection; a new [2, B, H, N, D] comes back.
        qk = pos.qk_norm_rope(qkv[:2], self.qk_norm.weight, self.layer, layout, eps=self.qk_norm.eps)
        q, k = qk.unbind(0)
        v = qkv[2]
        p = self.attn_drop if self.training else 0.0
        if isinstance(layout, PackedSeqs):
            factor = pos.packed_attn_factor(layout)  # None but for YaRN's temperature on a larger grid
            if factor is not None:
                # Per sequence, so not one scale=: folded into the queries (q_n . k times its sequence's
                # factor), which every varlen path (flash varlen, mask, loop) then reads alike.
                acc = compute_dtype(q)
                q = (q.to(acc) * factor.to(acc)[:, None]).to(q.dtype)
            out = varlen_attention(
                q[0].transpose(0, 1),
                k[0].transpose(0, 1),
                v[0].transpose(0, 1),
                layout.cu_seqlens,
                layout.max_seqlen,
                impl=self.packed_attn,
                dropout_p=p,
                fp32_logits=self.attn_impl == "fp32",
                check=False,
            )  # [T, H, D]
            return self.proj_drop(self.proj(out.reshape(1, N, C)))
        scale = pos.attn_scale(layout, self.head_dim)  # None but for YaRN's temperature on a larger grid
        if self.attn_impl == "fp32":
            out = attention_fp32(q, k, v, dropout_p=p, scale=scale, mask=key_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p, scale=scale)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))


class SwiGLUFFN(nn.Module):
    """SwiGLU MLP with the two input projections fused into one ``w12``."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=True)
        self.w3 = nn.Linear(hidden_dim, dim, bias=True)
        self.ffn_dropout = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.ffn_dropout(F.silu(x1) * x2))


class JiTBlock(nn.Module):
    """adaLN-Zero transformer block: ``x + gate * f(modulate(RMSNorm(x)))`` for attention and MLP.

    ``pos``/``layout``: the model's positional encoding and the geometry of this call, for attention.
    ``c: [B, W]`` is one conditioning vector per sample; on a packed stream (``layout`` a
    :class:`~jitrope.packing.PackedSeqs`) each token is modulated by its own sequence's.
    """

    def __init__(self, cfg: JiTConfig, *, layer: int, attn_drop: float, proj_drop: float):
        super().__init__()
        w = cfg.hidden_size
        self.norm1 = RMSNorm(w, eps=1e-6)
        self.attn = Attention(
            w,
            cfg.num_heads,
            layer=layer,
            attn_impl=cfg.attn_impl,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            packed_attn=cfg.packed_attn,
        )
        self.norm2 = RMSNorm(w, eps=1e-6)
        self.mlp = SwiGLUFFN(w, cfg.mlp_hidden, drop=proj_drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 6 * w, bias=True))

    def forward(
        self, x: Tensor, c: Tensor, pos: PositionalEncoding, layout: SeqLayout, key_mask: Optional[Tensor] = None
    ) -> Tensor:
        seq_id = layout.seq_id if isinstance(layout, PackedSeqs) else None
        mod = per_token(self.adaLN_modulation(c), seq_id)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), pos, layout, key_mask)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """RMSNorm, adaLN (shift, scale) and a Linear to p*p*C pixel values per token; all zero-init."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor, seq_id: Optional[Tensor] = None) -> Tensor:
        """``c: [B, W]``; ``seq_id [T]`` when ``x`` is a packed ``[1, T, W]`` (each token its sequence's c)."""
        shift, scale = per_token(self.adaLN_modulation(c), seq_id).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------------- model
def _accept_published_names(module, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
    """``load_state_dict`` pre-hook: a state dict of the published JiT (separate q_norm / k_norm, its
    sin-cos ``pos_embed``) loads too, mapped by :func:`jitrope.published.map_published_names`."""
    try:
        map_published_names(state_dict, module, prefix)
    except ConvertError as e:
        error_msgs.append(str(e))


class JiT(nn.Module):
    """Just image Transformer; ``forward(x, t, y, cond=None, *, cond_drop=None, pos_scaling=None)``.

    Sequence ``[in-context (L_ctx, from block in_context_start) | image (gh*gw) | condition (ch*cw)]``
    (docs/ops.md), described by :meth:`sequence_layout`.
    """

    def __init__(self, cfg: JiTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        w = cfg.hidden_size

        self.t_embedder = TimestepEmbedder(w)
        self.y_embedder = LabelEmbedder(cfg.num_classes, w)
        self.x_embedder = BottleneckPatchEmbed(cfg.patch_size, cfg.in_channels, cfg.bottleneck_dim, w)

        self.cond_embedder: Optional[BottleneckPatchEmbed] = None
        self.null_cond: Optional[nn.Parameter] = None
        if cfg.cond_img_size is not None:
            self.cond_embedder = BottleneckPatchEmbed(
                cfg.cond_patch, cfg.cond_in_channels, cfg.cond_bottleneck_dim or cfg.bottleneck_dim, w
            )
            if cfg.null_cond == "learned":
                # One vector for every null condition token: positions still tell them apart, and it
                # works for any condition grid.
                self.null_cond = nn.Parameter(torch.zeros(w))

        self.in_context_posemb: Optional[nn.Parameter] = None
        if cfg.in_context_len > 0:
            self.in_context_posemb = nn.Parameter(torch.zeros(1, cfg.in_context_len, w))

        gh, gw = cfg.grid
        cg = cfg.cond_grid
        geom = PosEncGeometry(
            width=w,
            num_heads=cfg.num_heads,
            depth=cfg.depth,
            grid=cfg.grid,
            cond_grid=cg,
            max_grid=cfg.pos_max_grid or (2 * gh, 2 * gw),
            max_cond_grid=None if cg is None else (cfg.pos_max_cond_grid or (2 * cg[0], 2 * cg[1])),
            theta=cfg.rope_theta,
            context_len=cfg.in_context_len,
        )
        self.pos = build_pos_encoding(cfg.pos_embed, geom, cfg.pos_impl)

        lo, hi = cfg.depth // 4, 3 * cfg.depth // 4  # dropout only in the middle half, as the original
        self.blocks = nn.ModuleList(
            JiTBlock(
                cfg,
                layer=i,
                attn_drop=cfg.attn_dropout if lo <= i < hi else 0.0,
                proj_drop=cfg.proj_dropout if lo <= i < hi else 0.0,
            )
            for i in range(cfg.depth)
        )
        self.final_layer = FinalLayer(w, cfg.patch_size, cfg.in_channels)
        self.initialize_weights()
        self.register_load_state_dict_pre_hook(_accept_published_names)
        # recompute each block's activations in the backward pass instead of keeping them (the trainer's
        # train.activation_checkpointing): less memory, one more forward of the blocks, the same numbers
        self.activation_checkpointing = False

    def initialize_weights(self) -> None:
        """The official JiT / DiT initialisation (adaLN-Zero, zero final layer)."""

        def _basic_init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic_init)
        self.x_embedder.reset_parameters()
        if self.cond_embedder is not None:
            self.cond_embedder.reset_parameters()
        if self.null_cond is not None:
            nn.init.normal_(self.null_cond, std=0.02)
        if self.in_context_posemb is not None:
            nn.init.normal_(self.in_context_posemb, std=0.02)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def null_class(self) -> int:
        """The label that selects the null-class embedding (classifier-free guidance)."""
        return self.cfg.num_classes

    @property
    def pos_impl(self) -> str:
        """The op implementation actually in use ('torch' when 'fused' fell back)."""
        return self.pos.impl

    # ------------------------------------------------------------------ sequence geometry
    def sequence_layout(
        self,
        img_hw: Optional[Tuple[int, int]] = None,
        cond_hw: Optional[Tuple[int, int]] = None,
        *,
        scaling: Optional[str] = None,
    ) -> SeqLayout:
        """Layout of the full sequence for an image of ``img_hw`` (default: the training size).

        With a condition image configured, ``cond_hw=None`` means the null condition, whose grid
        follows the image grid in the training ratio. ``layout.n_tokens`` is the length once the
        in-context tokens are in (e.g. 32 + 256 + 64 for JiT-S/4 with a 32x32 condition).
        """
        cfg = self.cfg
        scaling = scaling or cfg.pos_scaling
        if scaling not in SCALINGS:
            raise ValueError(f"pos_scaling must be one of {list(SCALINGS)}, got {scaling!r}")
        H, W = img_hw if img_hw is not None else (cfg.img_size, cfg.img_size)
        grid, cond_grid = self._grids((H, W), cond_hw)
        return SeqLayout(grid, cond_grid, cfg.in_context_len, cfg.grid, cfg.cond_grid, scaling)

    def _grids(
        self,
        img_hw: Tuple[int, int],
        cond_hw: Optional[Tuple[int, int]],
        what: str = "",
    ) -> Tuple[Tuple[int, int], Optional[Tuple[int, int]]]:
        """Token grids of an image of ``img_hw`` pixels and of its condition image (``cond_hw=None``: the
        null condition, whose grid follows the image grid in the training ratio). ``what`` names the
        argument in errors (e.g. ``"xs[2]: "``)."""
        cfg = self.cfg
        H, W = img_hw
        p = cfg.patch_size
        if H % p or W % p or H <= 0 or W <= 0:
            raise ValueError(f"{what}image size {H}x{W} is not a positive multiple of patch_size={p}")
        grid = (H // p, W // p)
        cond_grid = None
        if cfg.cond_img_size is not None:
            if cond_hw is not None:
                ch, cw = cond_hw
                cp = cfg.cond_patch
                if ch % cp or cw % cp or ch <= 0 or cw <= 0:
                    raise ValueError(
                        f"{what}condition image size {ch}x{cw} is not a positive multiple of cond_patch_size={cp}"
                    )
                cond_grid = (ch // cp, cw // cp)
            elif cfg.null_cond != "absent":
                (th, tw), (tch, tcw) = cfg.grid, cfg.cond_grid
                if (grid[0] * tch) % th or (grid[1] * tcw) % tw:
                    raise ValueError(
                        f"{what}the null condition has no integer grid for image grid {grid} (training grids: "
                        f"image {cfg.grid}, condition {cfg.cond_grid}); pass a condition image"
                    )
                cond_grid = (grid[0] * tch // th, grid[1] * tcw // tw)
        elif cond_hw is not None:
            raise ValueError(f"{what}a condition image was given but the model has none (cond_img_size=None)")
        return grid, cond_grid

    def packed_layout(
        self,
        img_sizes: Sequence[Tuple[int, int]],
        cond_sizes: Optional[Sequence[Optional[Tuple[int, int]]]] = None,
        *,
        pos_scaling: Optional[str] = None,
        device=None,
    ) -> PackedLayout:
        """The :class:`~jitrope.packing.PackedLayout` of images of ``img_sizes`` ((H, W) pixels each) with
        condition images of ``cond_sizes`` (None, or None entries: the null condition), built on the host
        and moved to ``device``. Checks every size and that the encoding can place every grid."""
        cfg = self.cfg
        scaling = pos_scaling or cfg.pos_scaling
        if scaling not in SCALINGS:
            raise ValueError(f"pos_scaling must be one of {list(SCALINGS)}, got {scaling!r}")
        if len(img_sizes) == 0:
            raise ValueError("img_sizes is empty: a packed batch needs at least one image")
        if cond_sizes is not None and len(cond_sizes) != len(img_sizes):
            raise ValueError(f"cond_sizes must have one entry per image ({len(img_sizes)}), got {len(cond_sizes)}")
        grids, cond_grids = [], []
        for s, hw in enumerate(img_sizes):
            chw = None if cond_sizes is None else cond_sizes[s]
            g, cg = self._grids(tuple(hw), None if chw is None else tuple(chw), f"sample {s}: ")
            grids.append(g)
            cond_grids.append(cg)
        geom = self.pos.geom
        layout = PackedLayout.build(
            grids,
            cond_grids,
            context_len=cfg.in_context_len,
            scaling=scaling,
            train_grid=cfg.grid,
            train_cond_grid=cfg.cond_grid,
            max_grid=geom.max_grid,
            max_cond_grid=geom.max_cond_grid,
        )
        self.pos.check_packed(layout)
        return layout if device is None else layout.to(device)

    # ------------------------------------------------------------------ forward
    def _absent_cond_mask(self, cond_drop: Optional[Tensor], layout: SeqLayout, B: int, device) -> Optional[Tensor]:
        """With ``null_cond="absent"``: the key mask ``[B, 1, 1, n_image + n_cond]`` (True = attend) that hides
        the condition tokens of the samples ``cond_drop`` drops, so that their image tokens see exactly
        the unconditional sequence; None when nothing is dropped (or the null condition is a token)."""
        if self.cfg.null_cond != "absent" or cond_drop is None:
            return None
        if cond_drop.shape != (B,) or cond_drop.dtype != torch.bool:
            raise ValueError(f"cond_drop must be a [B={B}] bool tensor, got {cond_drop.dtype} {tuple(cond_drop.shape)}")
        keep_cond = ~cond_drop.to(device).view(B, 1, 1, 1).expand(B, 1, 1, layout.n_cond)
        return torch.cat((keep_cond.new_ones(B, 1, 1, layout.n_image), keep_cond), dim=-1)

    def _cond_tokens(
        self, cond: Optional[Tensor], cond_drop: Optional[Tensor], layout: SeqLayout, like: Tensor
    ) -> Tensor:
        B, _, D = like.shape
        if self.cfg.null_cond == "absent":
            # Reached only with a condition image (the layout of cond=None has no condition tokens);
            # a dropped one stays in the sequence but is masked out of attention (_absent_cond_mask).
            if cond.dim() != 4 or cond.shape[0] != B or cond.shape[1] != self.cfg.cond_in_channels:
                raise ValueError(f"cond must be [B={B}, {self.cfg.cond_in_channels}, Hc, Wc], got {tuple(cond.shape)}")
            return self.cond_embedder(cond).to(like.dtype)
        if self.null_cond is not None:
            null = self.null_cond.to(like.dtype).expand(B, layout.n_cond, D)
        else:
            null = like.new_zeros(()).expand(B, layout.n_cond, D)
        if cond is None:
            return null
        if cond.dim() != 4 or cond.shape[0] != B or cond.shape[1] != self.cfg.cond_in_channels:
            raise ValueError(f"cond must be [B={B}, {self.cfg.cond_in_channels}, Hc, Wc], got {tuple(cond.shape)}")
        tokens = self.cond_embedder(cond).to(like.dtype)
        if cond_drop is None:
            if self.null_cond is None:
                return tokens
            # Route through the select anyway: the learned null vector stays in every step's graph,
            # so DDP never finds it unused in a batch that drops no condition.
            cond_drop = torch.zeros(B, dtype=torch.bool, device=like.device)
        if cond_drop.shape != (B,) or cond_drop.dtype != torch.bool:
            raise ValueError(f"cond_drop must be a [B={B}] bool tensor, got {cond_drop.dtype} {tuple(cond_drop.shape)}")
        return torch.where(cond_drop.view(B, 1, 1).to(like.device), null, tokens)

    def _cond_tokens_packed(
        self, cond: Optional[Tensor], cond_drop: Optional[Tensor], layout: PackedLayout, like: Tensor
    ) -> Tensor:
        """Condition tokens ``[T_cond, W]`` of a packed batch: embedded pixel tokens, or the null condition
        for the samples that ``cond_drop`` (``[S]`` bool) drops and for all when ``cond`` is None."""
        T_cond, D = layout.cond_seq_id.shape[0], like.shape[-1]
        if self.null_cond is not None:
            null = self.null_cond.to(like.dtype).expand(T_cond, D)
        else:
            null = like.new_zeros(()).expand(T_cond, D)
        if cond is None:
            return null
        cp, cc = self.cfg.cond_patch, self.cfg.cond_in_channels
        if cond.dim() != 2 or cond.shape[0] != T_cond or cond.shape[1] != cp * cp * cc:
            raise ValueError(
                f"cond must be the condition images' pixel tokens [T_cond={T_cond}, {cp * cp * cc}], "
                f"got {tuple(cond.shape)}"
            )
        tokens = self.cond_embedder.forward_tokens(cond).to(like.dtype)
        if self.cfg.null_cond == "absent":
            if cond_drop is not None and bool(cond_drop.any()):
                raise ValueError(
                    "null_cond='absent' in a packed batch: give the samples without a condition image no "
                    "condition grid (conds entry None) instead of cond_drop"
                )
            return tokens
        if cond_drop is None:
            if self.null_cond is None:
                return tokens
            # As in the batched path: the learned null vector stays in the graph (DDP sees it used).
            cond_drop = torch.zeros(layout.image_tokens.shape[0], dtype=torch.bool, device=like.device)
        if cond_drop.dim() != 1 or cond_drop.shape[0] != layout.image_tokens.shape[0] or cond_drop.dtype != torch.bool:
            raise ValueError(
                f"cond_drop must be a [S={layout.image_tokens.shape[0]}] bool tensor, got "
                f"{cond_drop.dtype} {tuple(cond_drop.shape)}"
            )
        drop = cond_drop.to(like.device)[layout.cond_seq_id]
        return torch.where(drop.unsqueeze(-1), null, tokens)

    def unpatchify(self, x: Tensor, grid: Tuple[int, int]) -> Tensor:
        """``[B, gh*gw, p*p*C]`` -> ``[B, C, gh*p, gw*p]``."""
        p, c = self.cfg.patch_size, self.cfg.in_channels
        gh, gw = grid
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, gh * p, gw * p)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Optional[Tensor] = None,
        cond: Optional[Tensor] = None,
        *,
        cond_drop: Optional[Tensor] = None,
        pos_scaling: Optional[str] = None,
    ) -> Tensor:
        """Predict the clean image.

        Args:
            x: noisy images ``[B, C, H, W]`` (H, W multiples of the patch size).
            t: ``[B]`` (or a scalar) noise level in [0, 1], 1 = data.
            y: ``[B]`` long class labels; ``num_classes`` (or ``y=None`` for all) is the null class.
            cond: condition images ``[B, C, Hc, Wc]``, or None for the null condition.
            cond_drop: ``[B]`` bool, True replaces that sample's condition by the null condition.
            pos_scaling: override ``cfg.pos_scaling`` for this call (other grid sizes).
        Returns:
            x-prediction ``[B, C, H, W]``.
        """
        cfg = self.cfg
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, H, W], got {tuple(x.shape)}")
        B = x.shape[0]
        layout = self.sequence_layout(
            tuple(x.shape[-2:]), None if cond is None else tuple(cond.shape[-2:]), scaling=pos_scaling
        )
        t, y = self._time_and_label(t, y, B, x.device)
        y_emb = self.y_embedder(y)
        c = self.t_embedder(t) + y_emb

        h = self.x_embedder(x)
        key_mask = None
        if self.cond_embedder is not None and layout.n_cond > 0:
            h = torch.cat((h, self._cond_tokens(cond, cond_drop, layout, h)), dim=1)
            key_mask = self._absent_cond_mask(cond_drop, layout, B, x.device)
        h = self._blocks(self.pos.add(h, layout), c, y_emb, layout, key_mask)

        # Only image tokens reach the final layer: in-context and condition tokens are dropped.
        n0 = cfg.in_context_len
        h = h[:, n0 : n0 + layout.n_image]
        h = self.final_layer(h, c)
        return self.unpatchify(h, layout.grid)

    def _time_and_label(self, t: Tensor, y: Optional[Tensor], n: int, device) -> Tuple[Tensor, Tensor]:
        """``t`` of ``n`` samples (a scalar: the same for all) and their labels (None: the null class)."""
        if t.dim() == 0:
            t = t.expand(n)
        if y is None:
            y = torch.full((n,), self.null_class, dtype=torch.long, device=device)
        return t, y

    def _blocks(
        self, h: Tensor, c: Tensor, y_emb: Tensor, layout: Union[SeqLayout, PackedLayout], key_mask=None
    ) -> Tensor:
        """The transformer blocks over the embedded tokens ``h`` (positions added), shared by the batched
        and the packed forward. The in-context tokens (each sample's ``y_emb`` plus their learned positions)
        join at block ``in_context_start``: in front of each sequence of a batch (``layout`` a ``SeqLayout``;
        ``key_mask`` grows with them), or gathered into each sequence of a packed stream (a ``PackedLayout``,
        whose blocks then see ``layout.seqs`` instead of ``layout.seqs_in``)."""
        L, start = self.cfg.in_context_len, self.cfg.in_context_start
        packed = isinstance(layout, PackedLayout)
        seqs = layout.seqs_in if packed else layout
        for i, block in enumerate(self.blocks):
            if L > 0 and i == start:
                ctx = (y_emb.unsqueeze(1) + self.in_context_posemb).to(h.dtype)  # [B or S, L, W]
                if packed:
                    h = torch.cat((ctx.reshape(1, -1, h.shape[-1]), h), dim=1)[:, layout.ctx_gather]
                    seqs = layout.seqs
                else:
                    h = torch.cat((ctx, h), dim=1)
                    if key_mask is not None:
                        key_mask = torch.cat((key_mask.new_ones(h.shape[0], 1, 1, L), key_mask), dim=-1)
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, self.pos, seqs, key_mask, use_reentrant=False)
            else:
                h = block(h, c, self.pos, seqs, key_mask)
        return h

    def forward_tokens(
        self,
        x: Tensor,
        t: Tensor,
        y: Optional[Tensor] = None,
        cond: Optional[Tensor] = None,
        *,
        cond_drop: Optional[Tensor] = None,
        layout: PackedLayout,
    ) -> Tensor:
        """Predict the clean pixel tokens of a packed batch (the compiled part of a packed step).

        Args:
            x: noisy pixel tokens ``[T_img, p*p*C]`` (:func:`jitrope.packing.pack_images`) of ``layout``.
            t: ``[S]`` (or a scalar) noise level per sample.
            y: ``[S]`` long labels (None: the null class).
            cond: condition pixel tokens ``[T_cond, cp*cp*Cc]`` of ``layout``'s condition grids, or None
                for the null condition everywhere.
            cond_drop: ``[S]`` bool, True gives that sample the null condition.
            layout: the batch's :class:`~jitrope.packing.PackedLayout` (:meth:`packed_layout`), on x's device.
        Returns:
            x-prediction tokens ``[T_img, p*p*C]``.

        Reads only the layout's tensors, so a compiled step (with :func:`jitrope.packing.mark_dynamic`)
        does not recompile for another mix of sizes.
        """
        cfg = self.cfg
        P = cfg.patch_size * cfg.patch_size * cfg.in_channels
        S = layout.image_tokens.shape[0]
        if x.dim() != 2 or x.shape[0] != layout.image_seq_id.shape[0] or x.shape[1] != P:
            raise ValueError(
                f"x must be pixel tokens [T_img={layout.image_seq_id.shape[0]}, {P}], got {tuple(x.shape)}"
            )
        t, y = self._time_and_label(t, y, S, x.device)
        if t.shape != (S,):
            raise ValueError(f"t must be [S={S}] (one noise level per sample) or a scalar, got {tuple(t.shape)}")
        if y.shape != (S,):
            raise ValueError(f"y must be [S={S}] labels, got {tuple(y.shape)}")
        y_emb = self.y_embedder(y)
        c = self.t_embedder(t) + y_emb

        h = self.x_embedder.forward_tokens(x)
        if self.cond_embedder is not None:
            # [image tokens | condition tokens] -> each sample's [image | condition] sequence in turn.
            h = torch.cat((h, self._cond_tokens_packed(cond, cond_drop, layout, h)))[layout.in_gather]
        elif cond is not None:
            raise ValueError("a condition image was given but the model has none (cond_img_size=None)")
        h = self._blocks(self.pos.add(h.unsqueeze(0), layout), c, y_emb, layout)

        h = h[:, layout.image_index]  # only image tokens reach the final layer
        return self.final_layer(h, c, layout.image_seq_id)[0]

    def forward_packed(
        self,
        xs: Sequence[Tensor],
        t: Tensor,
        y: Optional[Tensor] = None,
        conds: Optional[Sequence[Optional[Tensor]]] = None,
        *,
        cond_drop: Optional[Tensor] = None,
        pos_scaling: Optional[str] = None,
    ) -> List[Tensor]:
        """Predict the clean images of a packed batch: images of different sizes in one forward.

        Args:
            xs: S noisy images ``[C, H_s, W_s]`` (H, W multiples of the patch size; any aspect ratio).
            t: ``[S]`` (or a scalar) noise level per image.
            y: ``[S]`` long labels (None: the null class).
            conds: S condition images ``[Cc, Hc_s, Wc_s]`` (sizes may differ; a None entry is the null
                condition, as is ``conds=None`` for all).
            cond_drop: ``[S]`` bool, True gives that sample the null condition.
            pos_scaling: override ``cfg.pos_scaling`` for grids other than the training one (any mode,
                each image placed by its own grid).
        Returns:
            one x-prediction ``[C, H_s, W_s]`` per image. Each equals ``forward`` on that image alone.
        """
        cfg = self.cfg
        self._check_packed_images(xs, conds)
        S, device = len(xs), xs[0].device
        cond_sizes = None if conds is None else [None if c is None else tuple(c.shape[-2:]) for c in conds]
        layout = self.packed_layout(
            [tuple(im.shape[-2:]) for im in xs], cond_sizes, pos_scaling=pos_scaling, device=device
        )
        if t.dim() == 0:
            t = t.expand(S)
        cond_tok = None
        if conds is not None:
            cond_tok, cond_drop = self._pack_conds(xs, conds, layout, cond_drop)
        out = self.forward_tokens(
            pack_images(list(xs), cfg.patch_size, name="xs"), t, y, cond_tok, cond_drop=cond_drop, layout=layout
        )
        return unpack_images(out, layout, cfg.patch_size)

    def _check_packed_images(self, xs: Sequence[Tensor], conds: Optional[Sequence[Optional[Tensor]]]) -> None:
        """``forward_packed``'s images: a non-empty list of ``[C, H, W]``, and a condition image or None each."""
        cfg = self.cfg
        if not isinstance(xs, (list, tuple)) or len(xs) == 0:
            raise ValueError("xs must be a non-empty list of [C, H, W] images")
        for s, im in enumerate(xs):
            if not isinstance(im, Tensor) or im.dim() != 3 or im.shape[0] != cfg.in_channels:
                got = tuple(im.shape) if isinstance(im, Tensor) else type(im).__name__
                raise ValueError(f"xs[{s}] must be a [{cfg.in_channels}, H, W] image, got {got}")
        if conds is None:
            return
        if self.cond_embedder is None:
            raise ValueError("conds were given but the model has no condition image (cond_img_size=None)")
        if len(conds) != len(xs):
            raise ValueError(f"conds must have one entry (image or None) per image in xs ({len(xs)}), got {len(conds)}")
        for s, c in enumerate(conds):
            if c is not None and (not isinstance(c, Tensor) or c.dim() != 3 or c.shape[0] != cfg.cond_in_channels):
                got = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
                raise ValueError(f"conds[{s}] must be a [{cfg.cond_in_channels}, Hc, Wc] image or None, got {got}")

    def _pack_conds(
        self, xs: Sequence[Tensor], conds: Sequence[Optional[Tensor]], layout: PackedLayout, cond_drop: Optional[Tensor]
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The condition images' pixel tokens and the ``cond_drop`` that goes with them. A missing condition
        image (None) is no condition tokens with ``null_cond="absent"``, else the null condition: zeros in
        its grid, dropped."""
        cfg = self.cfg
        if cfg.null_cond == "absent":
            given = [c for c in conds if c is not None]
            return (pack_images(given, cfg.cond_patch, name="conds") if given else None), cond_drop
        device = xs[0].device
        missing = torch.tensor([c is None for c in conds], device=device)
        cp = cfg.cond_patch
        filled = [
            c if c is not None else xs[s].new_zeros(cfg.cond_in_channels, g[0] * cp, g[1] * cp)
            for s, (c, g) in enumerate(zip(conds, layout.cond_grids))
        ]
        if missing.any():
            cond_drop = missing if cond_drop is None else (cond_drop.to(device) | missing)
        return pack_images(filled, cp, name="conds"), cond_drop

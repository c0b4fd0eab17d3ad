#!/usr/bin/env python
"""Computed (not measured) per-GPU training memory of JiT-B/L/H/G with ddp, fsdp and fsdp + activation
checkpointing, at the published batch per GPU, from parameter counts and activation sizes.

    P       parameters (counted from the model, built on the meta device); Pb one block's, Pr the root's
    N       GPUs (fsdp shards over them), b images per GPU, T tokens per image (image + in-context), w width
    a       bytes a block keeps for its backward per token per unit of width under bf16 autocast; counted
            here from the tensors saved for backward (unique storages) of a narrow replica (same depth
            pattern, image, patch, heads of 64, dropout) on the CPU, by torch.autograd.graph.saved_tensors_hooks
    c       the same with activation checkpointing: what a block keeps (its inputs)

    ddp      = 4P params + 4P grads + 4P DDP's gradient buckets + 8P AdamW + 8P two EMAs (float32)
               + 2P bf16 weight copies autocast keeps for the backward + L * b * T * w * a
    fsdp     = 24P / N (params, grads, AdamW, EMAs sharded) + 2 * 2Pb (two blocks gathered in bf16: the current
               one and the prefetched next) + 4Pr (the root, float32, gathered) + 4Pb (one block's float32
               gradients before the reduce-scatter) + L * b * T * w * a
    fsdp+AC  = fsdp's state + L * b * T * w * c + b * T * w * a (one block recomputed in the backward)

Lower bounds: temporaries of a single op (attention workspace, the loss), the allocator's fragmentation,
CUDA context (~0.5 GiB) and the data are left out.

    PYTHONPATH=python python scripts/memory_estimate.py               # JiT-B/L/H/G, batch 128 per GPU, 8 GPUs
    PYTHONPATH=python python scripts/memory_estimate.py --batch 16 --gpus 8 --models JiT-G/16
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Dict, List, Optional, Tuple

import torch

from jitrope.diffusion import Diffusion
from jitrope.model import JiT, JiTConfig

# JiT-G is not in the published code (LTH14/JiT issue 18: "There is no configuration for JiT-G"; the
# maintainer points to the paper's Table 9); its width, depth and heads as the paper gives them, the
# rest as JiT-H.
JIT_G = dict(
    img_size=256,
    patch_size=16,
    depth=40,
    hidden_size=1664,
    num_heads=16,
    bottleneck_dim=256,
    in_context_len=32,
    in_context_start=10,
    num_classes=1000,
    proj_dropout=0.2,
)
MODELS = ("JiT-B/16", "JiT-L/16", "JiT-H/16", "JiT-G/16")
GIB = 2**30


def model_config(name: str) -> JiTConfig:
    if name == "JiT-G/16":
        return JiTConfig(pos_impl="torch", **JIT_G)
    return JiTConfig.preset(name, pos_impl="torch")


def param_counts(cfg: JiTConfig) -> Tuple[int, int, int]:
    """``(P, one block's, the root's)`` parameters, without allocating them."""
    with torch.device("meta"):
        model = JiT(cfg)
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.blocks[0].parameters())
    return total, block, total - cfg.depth * block


def saved_bytes_per_token_width(cfg: JiTConfig, checkpointing: bool) -> float:
    """Bytes the blocks keep for the backward, per block, token and unit of width, under bf16 autocast: a
    replica of width 128 (2 heads of 64) at batch 1, its saved tensors' unique storages counted."""
    small = dataclasses.replace(cfg, hidden_size=128, num_heads=2, depth=max(2, cfg.in_context_start + 1))
    torch.manual_seed(0)
    model = JiT(small)
    model.activation_checkpointing = checkpointing
    seen: Dict[int, int] = {}
    inside = [False]

    def pack(t):
        if inside[0]:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    def enter(*_):
        inside[0] = True

    def leave(*_):
        inside[0] = False

    def keep_inputs(module, args):  # what a checkpointed block keeps: its inputs
        for a in args:
            if torch.is_tensor(a):
                seen[a.untyped_storage().data_ptr()] = a.untyped_storage().nbytes()

    for block in model.blocks:
        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, small.img_size, small.img_size, generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        if checkpointing:
            for block in model.blocks:
                block.register_forward_pre_hook(keep_inputs)
        Diffusion().loss(model, x, torch.tensor([1]), t=torch.rand(1, generator=g), noise=torch.randn_like(x))
    tokens = small.grid[0] * small.grid[1] + small.in_context_len
    return sum(seen.values()) / (small.depth * tokens * small.hidden_size)


def estimate(name: str, batch: int, gpus: int) -> Dict[str, float]:
    cfg = model_config(name)
    a, c = saved_bytes_per_token_width(cfg, False), saved_bytes_per_token_width(cfg, True)
    P, Pb, Pr = param_counts(cfg)
    T = cfg.grid[0] * cfg.grid[1] + cfg.in_context_len
    acts = cfg.depth * batch * T * cfg.hidden_size * a
    fsdp_state = 24 * P / gpus + 2 * 2 * Pb + 4 * Pr + 4 * Pb
    return {
        "params_M": P / 1e6,
        "ddp": (28 * P + 2 * P + acts) / GIB,
        "fsdp": (fsdp_state + acts) / GIB,
        "fsdp_ac": (fsdp_state + cfg.depth * batch * T * cfg.hidden_size * c + batch * T * cfg.hidden_size * a) / GIB,
        "acts": acts / GIB,
        "a": a,
        "c": c,
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batch", type=int, default=128, help="images per GPU (default 128: 1024 on 8 GPUs, published)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs fsdp shards over (default 8)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"# computed, not measured: batch {args.batch} per GPU at 256x256 (patch 16: 256 + 32 tokens), {args.gpus} "
        "GPUs; a, c: bytes kept per block, token and unit of width (bf16 autocast), without / with checkpointing"
    )
    head = f"{'model':<10}{'params':>9}{'a':>6}{'c':>6}{'activations GiB':>17}"
    print(head + f"{'ddp GiB':>9}{'fsdp GiB':>10}{'fsdp+AC GiB':>13}")
    for name in args.models:
        e = estimate(name, args.batch, args.gpus)
        print(
            f"{name:<10}{e['params_M']:>8.0f}M{e['a']:>6.1f}{e['c']:>6.1f}{e['acts']:>17.1f}{e['ddp']:>9.1f}"
            f"{e['fsdp']:>10.1f}{e['fsdp_ac']:>13.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

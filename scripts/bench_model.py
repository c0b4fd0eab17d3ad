#!/usr/bin/env python
"""Time a JiT training step and a sampling forward, pos_impl="fused" vs pos_impl="torch", eager and compiled.

For each ``--compile`` mode (none = eager, default, reduce-overhead) and each implementation it
prints ms per step, images/s, peak memory and model FLOPs utilisation, then the fused/torch
ratio in the same mode. A training step is forward + diffusion loss + backward + AdamW step; a
sampling forward is one model call under ``torch.no_grad``. The two implementations share their
weights (docs/training.md: changing the flag changes nothing else) and are timed alternately, step by step,
so drift of a shared machine hits both alike; the median of ``--iters`` steps is reported.
``pos_impl="torch"`` is the honest baseline: cached cos/sin tables, as the published JiT code.

MFU counts the model's matmul FLOPs (linear, conv, attention; backward = 2x forward), against
``--peak-tflops`` or, on a GPU whose dense bf16 peak is known (H100/H200 SXM: 989 TFLOP/s), that
figure. On a CPU without ``--peak-tflops`` it prints n/a.

    PYTHONPATH=python python scripts/bench_model.py  # CPU: tiny preset, 1 thread; 2 min, mostly inductor compiling
    PYTHONPATH=python python scripts/bench_model.py --device cuda --compile none default reduce-overhead
    PYTHONPATH=python python scripts/bench_model.py --profile                        # top ops by device time

``--activation-checkpointing off on`` instead times a training step with the blocks' activations kept and
recomputed, and measures the step's peak tensor memory above the model's state (parameters, gradients,
AdamW): on CUDA the allocator's peak, on the CPU every tensor allocation counted (:class:`TensorMemory`).
``--config`` takes the model, batch and condition image of a training config:

    PYTHONPATH=python python scripts/bench_model.py --config configs/emoji64_cpu.yaml --activation-checkpointing off on
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time
import weakref
from typing import Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import jitrope
from jitrope.config import load_config
from jitrope.diffusion import Diffusion
from jitrope.model import JiT, JiTConfig
from jitrope.packing import mark_dynamic, pack_images
from jitrope.posenc import POS_EMBEDS

COMPILE_MODES = ("none", "default", "reduce-overhead")
IMPLS = ("torch", "fused")
# Dense (no sparsity) bf16 tensor-core peaks of the SXM parts, from NVIDIA's data sheets.
DENSE_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
DEFAULTS = {  # device type -> preset, batch, warmup, iters
    "cuda": ("JiT-B/16", 64, 3, 10),
    "cpu": ("tiny", 8, 2, 5),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_case_args(p)
    _add_measure_args(p)
    _add_packed_args(p)
    _add_memory_args(p)
    return p


def _add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--activation-checkpointing",
        nargs="+",
        choices=("off", "on"),
        default=None,
        help="time a training step and measure its peak tensor memory with the blocks' activations kept "
        "(off) and recomputed in the backward pass (on), instead of the fused/torch table",
    )
    p.add_argument(
        "--config",
        default=None,
        help="a training config (configs/*.yaml): its model, train.batch_size and condition image "
        "(--batch and --preset override)",
    )


def _add_case_args(p: argparse.ArgumentParser) -> None:
    """What runs: device, model, encodings, compile modes, training or sampling, batch, condition, autocast."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    p.add_argument("--preset", default=None, help="JiTConfig preset (default: JiT-B/16 on CUDA, tiny on CPU)")
    p.add_argument(
        "--pos-embed",
        nargs="+",
        default=["sincos2d+rope2d"],
        help=f"encodings to time (default: the paper's sincos2d+rope2d); any of {list(POS_EMBEDS)} or 'all'",
    )
    p.add_argument(
        "--compile",
        nargs="+",
        default=["none", "default"],
        choices=COMPILE_MODES,
        help="torch.compile modes to run, 'none' = eager (default: none default)",
    )
    p.add_argument(
        "--what",
        nargs="+",
        default=["train", "sample"],
        choices=("train", "sample"),
        help="what to time (default: both)",
    )
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64 on CUDA, 8 on CPU)")
    p.add_argument("--cond", type=int, default=0, help="condition image size, 0 for none (default 0, as the paper)")
    p.add_argument(
        "--amp",
        nargs="?",
        const="bf16",
        choices=("auto", "bf16", "off"),
        default="auto",
        help="bf16 autocast: auto (default) = on for CUDA, off on CPU; --amp alone = bf16",
    )


def _add_measure_args(p: argparse.ArgumentParser) -> None:
    """How it is measured and reported: steps, threads, the MFU peak, the profile, the JSON file."""
    p.add_argument("--iters", type=int, default=None, help="timed steps per implementation (default 10 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, compilation included (default 3 / 2)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads on CPU (default 1: on cores shared with other jobs, OpenMP's "
        "barriers made a 2-thread step 60x slower than 1 thread; 0 keeps torch's default)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak for MFU in TFLOP/s (default: the GPU's dense bf16 peak when known; n/a otherwise)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile a few training steps of each case and list the top ops by device time",
    )
    p.add_argument("--profile-rows", type=int, default=15, help="rows of the profile table (default 15)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _add_packed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--packed",
        action="store_true",
        help="packed training steps vs pad-to-max with a mask on the same mixed-size images (tiny at "
        "patch 4 on the emoji mix on CPU, JiT-B/16 on 256..512 px on CUDA); --compile none "
        "default only",
    )
    p.add_argument(
        "--tokens-per-batch",
        type=int,
        default=None,
        help="--packed: image-token budget per packed batch (default 1024 CPU, 16384 CUDA)",
    )
    p.add_argument("--packed-batches", type=int, default=4, help="--packed: batches per timed pass (default 4)")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.preset_given = args.preset is not None
    args.model_cfg = None
    if args.config is not None:
        cfg = load_config(args.config, [])
        args.model_cfg = cfg.model_config()
        args.batch = args.batch or cfg.train.batch_size
        args.cond = args.cond or (args.model_cfg.cond_img_size or 0)
    device = torch.device(args.device)
    preset, batch, warmup, iters = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    args.preset = args.preset or preset
    args.batch = args.batch or batch
    args.warmup = warmup if args.warmup is None else args.warmup
    args.iters = iters if args.iters is None else args.iters
    if args.pos_embed == ["all"]:
        args.pos_embed = list(POS_EMBEDS)
    for pe in args.pos_embed:
        if pe not in POS_EMBEDS:
            p.error(f"--pos-embed {pe!r}: not one of {list(POS_EMBEDS)}")
    if args.iters < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--iters and --batch must be >= 1, --warmup >= 0")
    if args.packed:
        if "reduce-overhead" in args.compile:
            p.error("--packed: --compile takes none and default (each batch has its own shapes: no CUDA graphs)")
        if args.packed_batches < 1 or (args.tokens_per_batch is not None and args.tokens_per_batch < 1):
            p.error("--packed-batches and --tokens-per-batch must be >= 1")
    if "reduce-overhead" in args.compile and args.warmup < 3:
        args.warmup = 3  # CUDA graphs are recorded on the third call
    return args


def model_flops(model: JiT, batch: int) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add): linears, convolutions, attention."""
    cfg = model.cfg
    layout = model.sequence_layout()
    w, h, p = cfg.hidden_size, cfg.mlp_hidden, cfg.patch_size
    n0 = layout.n_image + layout.n_cond
    per_sample = 2 * (256 * w + w * w)  # timestep MLP
    per_sample += 2 * layout.n_image * (cfg.in_channels * p * p * cfg.bottleneck_dim + cfg.bottleneck_dim * w)
    if cfg.cond_img_size is not None:
        cp, cb = cfg.cond_patch, cfg.cond_bottleneck_dim or cfg.bottleneck_dim
        per_sample += 2 * layout.n_cond * (cfg.cond_in_channels * cp * cp * cb + cb * w)
    for i in range(cfg.depth):
        n = n0 + (cfg.in_context_len if cfg.in_context_len and i >= cfg.in_context_start else 0)
        per_sample += 2 * w * 6 * w  # adaLN modulation
        per_sample += 2 * n * (3 * w * w + w * w + 2 * w * h + h * w)  # qkv, proj, w12, w3
        per_sample += 2 * 2 * n * n * w  # q k^T and attention @ v
    per_sample += 2 * w * 2 * w + 2 * layout.n_image * w * p * p * cfg.in_channels  # final layer
    return float(per_sample * batch)


def peak_tflops(args, device: torch.device):
    """(TFLOP/s, what it is) for MFU, or (None, reason)."""
    if args.peak_tflops:
        return args.peak_tflops, f"{args.peak_tflops:g} TFLOP/s (--peak-tflops)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in DENSE_BF16_PEAK_TFLOPS.items():
            if key in name:
                return tf, f"{tf:g} TFLOP/s ({key} SXM dense bf16)"
        return None, f"n/a (no known dense bf16 peak for {name}; pass --peak-tflops)"
    return None, "n/a (CPU; pass --peak-tflops to state one)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> Optional[float]:
    """GiB: the CUDA allocator's peak since the last reset; on CPU the process's peak RSS (never resets)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Case:
    """One implementation in one compile mode: its model, optimizer and step functions."""

    def __init__(self, model: JiT, mode: str, amp: bool, device: torch.device, inputs):
        self.model, self.mode, self.device, self.inputs = model, mode, device, inputs
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
        self.net = model if mode == "none" else torch.compile(model, mode=mode)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
        self.diffusion = Diffusion()
        self.peak: Dict[str, float] = {}

    def _mark(self) -> None:
        # CUDA graphs: each call starts a new step, so the last step's outputs may be overwritten.
        if self.mode == "reduce-overhead" and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()

    def train(self) -> None:
        x, t, y, cond, noise = self.inputs
        self._mark()
        with self.autocast:
            loss = self.diffusion.loss(self.net, x, y, cond, t=t, noise=noise)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def sample(self) -> None:
        x, t, y, cond, _ = self.inputs
        self._mark()
        with torch.no_grad(), self.autocast:
            self.net(x, t, y, cond=cond) if cond is not None else self.net(x, t, y)

    def run(self, what: str) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        getattr(self, what)()
        sync(self.device)
        return time.perf_counter() - t0


def build_models(args, pos_embed: str, device: torch.device) -> Dict[str, JiT]:
    cfg = JiTConfig.preset(args.preset, pos_embed=pos_embed, pos_impl="torch", cond_img_size=args.cond or None)
    torch.manual_seed(0)
    models = {"torch": JiT(cfg).to(device)}
    fused = JiT(dataclasses.replace(cfg, pos_impl="fused")).to(device)
    fused.load_state_dict(models["torch"].state_dict())
    if fused.pos_impl == "fused":
        models["fused"] = fused
    return models


def make_inputs(cfg: JiTConfig, batch: int, cond: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.img_size, cfg.img_size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    c = torch.randn(batch, cfg.cond_in_channels, cond, cond, generator=g) if cond else None
    noise = torch.randn(x.shape, generator=g)
    return tuple(None if a is None else a.to(device) for a in (x, t, y, c, noise))


def bench_mode(args, pos_embed: str, mode: str, device: torch.device, amp: bool, peak, rows: List[Dict]):
    """Times every implementation in compile ``mode``; returns ``{(impl, what): row}`` and the cases."""
    if mode != "none":
        torch._dynamo.reset()
    models = build_models(args, pos_embed, device)
    inputs = make_inputs(next(iter(models.values())).cfg, args.batch, args.cond, device)
    cases = {impl: Case(m, mode, amp, device, inputs) for impl, m in models.items()}
    flops = model_flops(models["torch"], args.batch)
    flops = {"train": 3 * flops, "sample": flops}
    times: Dict[str, Dict[str, List[float]]] = {impl: {w: [] for w in args.what} for impl in cases}
    for what in args.what:
        for _impl, case in cases.items():  # warm up (and compile) one at a time: peak memory per case
            for i in range(args.warmup):
                if i == args.warmup - 1 and device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                case.run(what)
            case.peak[what] = peak_memory(device)
        for _ in range(args.iters):
            for impl, case in cases.items():
                times[impl][what].append(case.run(what))
    out = {}
    for impl, case in cases.items():
        for what in args.what:
            ms = 1e3 * statistics.median(times[impl][what])
            row = {
                "pos_embed": pos_embed,
                "compile": mode,
                "impl": impl,
                "what": what,
                "ms": ms,
                "images_per_s": args.batch / ms * 1e3,
                "peak_gib": case.peak[what],
                "tflops": flops[what] / ms * 1e-9,
            }
            row["mfu"] = row["tflops"] / peak if peak else None
            rows.append(row)
            out[(impl, what)] = row
    return out, cases


def profile(case: Case, args, title: str) -> str:
    """The top ops of a few training steps by device self time, as a printable table."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = case.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps = 3
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            case.run("train")
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return (
        f"\n# profile: {title}, {steps} steps, top {args.profile_rows} by {'GPU' if cuda else 'CPU'} self time\n"
        + prof.key_averages().table(sort_by=key, row_limit=args.profile_rows, max_name_column_width=60)
    )


# ---------------------------------------------------------------- packed vs pad-to-max (--packed)

# The realistic size mix (pixels, H x W), per device type: the emoji size mix at patch 4 on the CPU
# (tiny preset); on CUDA JiT-B/16 on 256..512 px squares plus 384x512 / 512x384 (the same mix scaled).
PACKED_MIX = {
    "cpu": ("tiny", 4, [(16, 16), (24, 24), (32, 32), (40, 40), (48, 48), (32, 48), (48, 32)], 1024),
    "cuda": (
        "JiT-B/16",
        16,
        [(256, 256), (320, 320), (384, 384), (448, 448), (512, 512), (384, 512), (512, 384)],
        16384,
    ),
}


def draw_packed_batches(mix, patch: int, budget: int, batches: int, seed: int = 0):
    """``batches`` lists of (H, W) sizes, each packed greedily as a loader would: images of the mix in
    random order join the batch while they fit the image-token budget (one that does not fit waits for a
    later batch) until not even the smallest fits, so each batch mixes sizes and wastes less than the
    smallest image."""
    g = torch.Generator().manual_seed(seed)
    tokens = [(h // patch) * (w // patch) for h, w in mix]
    if min(tokens) > budget:
        raise ValueError(f"--tokens-per-batch {budget}: smaller than the smallest image ({min(tokens)} tokens)")
    out = []
    for _ in range(batches):
        sizes, used = [], 0
        while used + min(tokens) <= budget:
            i = int(torch.randint(len(mix), (1,), generator=g))
            if used + tokens[i] <= budget:
                sizes.append(mix[i])
                used += tokens[i]
        out.append(sizes)
    return out


def _masked_attention_forward(self, x, pos, layout, key_mask=None):
    """jitrope.model.Attention.forward for pad-to-max: the same projections, qk-norm and RoPE, then SDPA
    with a key-padding mask (``self._key_mask`` [B, N_image], True = a real token; in-context tokens,
    prepended from block ``in_context_start`` on, are always real). ``key_mask``: the model's own, which
    only a model with a condition image and ``null_cond="absent"`` passes; the models here have none."""
    if key_mask is not None:
        raise ValueError("pad-to-max: the benchmark's models have no condition image, so no key mask of their own")
    B, N, C = x.shape
    qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    qk = pos.qk_norm_rope(qkv[:2], self.qk_norm.weight, self.layer, layout, eps=self.qk_norm.eps)
    q, k = qk.unbind(0)
    keep = self._key_mask
    if keep.shape[1] != N:
        keep = torch.cat((keep.new_ones(B, N - keep.shape[1]), keep), dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, qkv[2], attn_mask=keep[:, None, None, :])
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class PaddedModel(torch.nn.Module):
    """A JiT whose attention ignores padding keys: ``forward(x, t, y, key_mask)`` on images padded to the
    batch's largest size (top left, so a real token keeps its own grid position)."""

    def __init__(self, model: JiT):
        super().__init__()
        self.model = model
        for block in model.blocks:
            block.attn.forward = _masked_attention_forward.__get__(block.attn)

    def forward(self, x, t, y, key_mask):
        for block in self.model.blocks:
            block.attn._key_mask = key_mask
        return self.model(x, t, y)


class PackedCase:
    """One training step on one batch of images, packed or padded to the largest with a mask."""

    def __init__(self, model: JiT, how: str, sizes, device, amp: bool, compile_mode: str, seed: int):
        self.how, self.device = how, device
        cfg = model.cfg
        p, C = cfg.patch_size, cfg.in_channels
        g = torch.Generator().manual_seed(seed)
        images = [torch.randn(C, h, w, generator=g) for h, w in sizes]
        S = len(sizes)
        self.t = torch.rand(S, generator=g).to(device)
        self.y = torch.randint(0, cfg.num_classes, (S,), generator=g).to(device)
        self.useful = sum((h // p) * (w // p) for h, w in sizes)
        self.diffusion = Diffusion()
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
        self.model = model
        if how == "packed":
            self.layout = model.packed_layout(sizes, device=device)
            self.x = pack_images(images, p).to(device)
            self.noise = torch.randn(self.x.shape, generator=g).to(device)
            self.net = model.forward_tokens
            if compile_mode != "none":
                mark_dynamic(self.layout, self.x, self.noise, self.t, self.y)
                self.net = torch.compile(model.forward_tokens, mode=compile_mode, dynamic=True)
            self.tokens = self.layout.n_image
        else:
            Hm, Wm = max(h for h, _ in sizes), max(w for _, w in sizes)
            x = torch.zeros(S, C, Hm, Wm)
            mask = torch.zeros(S, 1, Hm, Wm)
            for s, im in enumerate(images):
                x[s, :, : im.shape[1], : im.shape[2]] = im
                mask[s, :, : im.shape[1], : im.shape[2]] = 1
            self.x, self.mask = x.to(device), mask.to(device)
            self.key_mask = mask[:, 0, ::p, ::p].reshape(S, -1).bool().to(device)
            self.noise = torch.randn(self.x.shape, generator=g).to(device)
            self.padded = PaddedModel(model)
            self.net = (
                self.padded if compile_mode == "none" else torch.compile(self.padded, mode=compile_mode, dynamic=True)
            )
            self.tokens = S * (Hm // p) * (Wm // p)

    def loss(self):
        if self.how == "packed":
            return self.diffusion.loss(self.net, self.x, self.y, t=self.t, noise=self.noise, layout=self.layout)
        d = self.diffusion
        z = d.noisy(self.x, self.t, self.noise)
        x_pred = self.net(z, self.t, self.y, self.key_mask).float()
        err = (d.to_velocity(self.x, z, self.t) - d.to_velocity(x_pred, z, self.t)).pow(2) * self.mask
        return err.sum() / (self.mask.sum() * self.x.shape[1])  # the mean over real pixels only

    def run(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        with self.autocast:
            loss = self.loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - t0


def packed_main(args, device: torch.device, amp: bool) -> int:
    """Packed training steps against pad-to-max with a mask on the same images (equal useful tokens)."""
    preset, patch, mix, budget = PACKED_MIX["cuda" if device.type == "cuda" else "cpu"]
    preset = args.preset if args.preset_given else preset
    budget = args.tokens_per_batch or budget
    largest = max(max(hw) for hw in mix)
    cfg = JiTConfig.preset(preset, pos_embed=args.pos_embed[0], img_size=largest, patch_size=patch)
    batches = draw_packed_batches(mix, patch, budget, args.packed_batches)
    dev_name = device_name(device)
    mix_txt = ", ".join(f"{h}x{w}" for h, w in mix)
    print(
        f"# packed vs pad-to-max training step (forward + loss + backward + AdamW), {preset} at patch {patch}, "
        f"pos_embed={cfg.pos_embed}, {'bf16 autocast' if amp else 'float32'}, {dev_name}, torch {torch.__version__}"
    )
    print(
        f"# size mix (px, drawn uniformly): {mix_txt}; {len(batches)} batches packed greedily into "
        f"{budget} image tokens each; pad-to-max = the same images padded to the batch's largest H and W, "
        f"attention key-masked, loss masked"
    )
    print(
        f"# median over {args.iters} passes of every batch after {args.warmup} warm-up passes; tokens/s counts "
        f"useful (image) tokens only"
    )
    results = {}
    for mode in args.compile:
        for how, row in time_packed(args, cfg, batches, budget, mode, device, amp).items():
            results[(mode, how)] = row
    ratios = print_packed(results, args.compile)
    if args.json:
        meta = {
            "preset": preset,
            "patch": patch,
            "mix": mix,
            "tokens_per_batch": budget,
            "device": dev_name,
            "amp": amp,
            "torch": torch.__version__,
            "iters": args.iters,
            "warmup": args.warmup,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": list(results.values()), "ratios": ratios}, f, indent=2)
    return 0


def time_packed(
    args, cfg: JiTConfig, batches, budget: int, mode: str, device: torch.device, amp: bool
) -> Dict[str, Dict]:
    """Packed and pad-to-max training passes over ``batches`` in compile ``mode``, alternately; one row each."""
    if mode != "none":
        torch._dynamo.reset()
    torch.manual_seed(0)
    base = JiT(cfg).to(device)
    cases = {}
    for how in ("packed", "pad-to-max"):
        m = JiT(cfg).to(device)
        m.load_state_dict(base.state_dict())
        cases[how] = [PackedCase(m, how, sizes, device, amp, mode, seed=i) for i, sizes in enumerate(batches)]
    # Shared optimizer per model: every batch's case of one kind steps the same weights.
    for cs in cases.values():
        for c in cs[1:]:
            c.opt = cs[0].opt
    times = {how: [] for how in cases}
    for it in range(args.warmup + args.iters):
        for how, cs in cases.items():  # alternate: drift of a shared machine hits both alike
            total = sum(c.run() for c in cs)
            if it >= args.warmup:
                times[how].append(total)
    useful = sum(c.useful for c in cases["packed"])
    rows = {}
    for how, cs in cases.items():
        sec = statistics.median(times[how])
        computed = sum(c.tokens for c in cs)
        if how == "packed":
            waste = 1 - useful / (budget * len(cs))  # against the budget: a fixed-size step pads to it
        else:
            waste = 1 - useful / computed
        rows[how] = {
            "compile": mode,
            "how": how,
            "batches": len(cs),
            "images": sum(len(b) for b in batches),
            "useful_tokens": useful,
            "computed_tokens": computed,
            "ms_per_batch": 1e3 * sec / len(cs),
            "tokens_per_s": useful / sec,
            "padding_waste": waste,
        }
    return rows


def print_packed(results: Dict, modes: List[str]) -> List[Dict]:
    """The table of :func:`time_packed`'s rows and, per compile mode, packed against pad-to-max with the
    goals; returns those ratios."""
    print(
        f"\n{'compile':<9}{'layout':<12}{'batches':>8}{'images':>8}{'useful tok':>11}{'computed tok':>13}"
        f"{'ms/batch':>10}{'useful tok/s':>13}{'padding waste':>15}"
    )
    for r in results.values():
        print(
            f"{r['compile']:<9}{r['how']:<12}{r['batches']:>8}{r['images']:>8}{r['useful_tokens']:>11}"
            f"{r['computed_tokens']:>13}{r['ms_per_batch']:>10.1f}{r['tokens_per_s']:>13.0f}"
            f"{100 * r['padding_waste']:>14.1f}%"
        )
    ratios = []
    for mode in modes:
        pk, pd = results[(mode, "packed")], results[(mode, "pad-to-max")]
        ratio = pk["tokens_per_s"] / pd["tokens_per_s"]
        ratios.append({"compile": mode, "packed_over_padded": ratio})
        print(
            f"compile={mode}: packed / pad-to-max useful tokens/s = {ratio:.2f}x (goal >= 1.4x: "
            f"{'met' if ratio >= 1.4 else 'NOT met'}); packed padding waste {100 * pk['padding_waste']:.1f}% "
            f"(goal <= 3%: {'met' if pk['padding_waste'] <= 0.03 else 'NOT met'}), pad-to-max "
            f"{100 * pd['padding_waste']:.1f}%"
        )
    return ratios


class TensorMemory(TorchDispatchMode):
    """The bytes of the tensors created inside it and still alive (each storage once, until it is freed),
    and their peak: the CPU has no allocator statistics, so every operator's outputs are counted."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._keys = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if n and key not in self._keys:
                    self._keys.add(key)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, n)
        return out

    def _free(self, key: int, n: int) -> None:
        self._keys.discard(key)
        self.live -= n


def memory_step(case: Case, device: torch.device) -> float:
    """Bytes: the peak of one training step (forward, backward, AdamW) above what was allocated before it."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        case.train()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with TensorMemory() as mem:
        case.train()
    return mem.peak


def memory_main(args, device: torch.device, amp: bool) -> int:
    """Activation checkpointing off / on: ms per training step and the step's peak memory above the state."""
    cfg = args.model_cfg or JiTConfig.preset(args.preset, cond_img_size=args.cond or None)
    cfg = dataclasses.replace(cfg, pos_impl="fused" if jitrope.HAS_EXTENSION else "torch")
    inputs = make_inputs(cfg, args.batch, args.cond, device)
    n_tok = cfg.grid[0] * cfg.grid[1] + (0 if not args.cond else cfg.cond_grid[0] * cfg.cond_grid[1])
    print(
        f"# {args.config or args.preset}: {cfg.img_size}x{cfg.img_size} at patch {cfg.patch_size}, {n_tok} tokens "
        f"+ {cfg.in_context_len} in-context, width {cfg.hidden_size}, depth {cfg.depth}, batch {args.batch}, "
        f"{'bf16 autocast' if amp else 'float32'}, {device_name(device)}, torch {torch.__version__}"
    )
    how = "CUDA allocator" if device.type == "cuda" else "every tensor allocation counted"
    print(
        f"# median of {args.iters} steps after {args.warmup} warm-up steps; state = parameters + AdamW; peak = "
        f"the step's peak above the state ({how})"
    )
    print(f"{'activation ckpt':<17}{'compile':<10}{'ms/step':>10}{'CPU ms/step':>12}{'state MiB':>11}{'peak MiB':>10}")
    rows = []
    for mode in args.compile:
        for ac in args.activation_checkpointing:
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = JiT(cfg).to(device)
            model.activation_checkpointing = ac == "on"
            case = Case(model, mode, amp, device, inputs)
            for _ in range(max(1, args.warmup)):  # the first step allocates the gradients and AdamW's state
                case.run("train")
            state = sum(t.numel() * t.element_size() for t in _state_tensors(case))
            peak = memory_step(case, device)
            ms, cpu_ms = _median_step_ms(case, args.iters)
            rows.append(
                dict(
                    activation_checkpointing=ac, compile=mode, ms=ms, cpu_ms=cpu_ms, state_bytes=state, peak_bytes=peak
                )
            )
            print(f"{ac:<17}{mode:<10}{ms:>10.1f}{cpu_ms:>12.1f}{state / 2**20:>11.1f}{peak / 2**20:>10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"config": args.config, "batch": args.batch, "device": device_name(device), "rows": rows}, f, indent=2
            )
    return 0


def _median_step_ms(case: Case, iters: int):
    """Medians of a training step's wall time and of this process's CPU time (ms): on a shared machine the
    CPU time is the steadier one."""
    wall, cpu = [], []
    for _ in range(iters):
        c0 = time.process_time()
        wall.append(case.run("train"))
        cpu.append(time.process_time() - c0)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def _state_tensors(case: Case):
    """Parameters, gradients (none between steps: zero_grad sets them to None) and AdamW state of a case."""
    for p in case.model.parameters():
        yield p
        if p.grad is not None:
            yield p.grad
    for st in case.opt.state.values():
        yield from (v for v in st.values() if isinstance(v, torch.Tensor))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"


def fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    amp = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
    if args.packed:
        return packed_main(args, device, amp)
    if args.activation_checkpointing:
        return memory_main(args, device, amp)
    peak, peak_what = peak_tflops(args, device)
    cfg = JiTConfig.preset(args.preset, cond_img_size=args.cond or None)
    dev_name = device_name(device)
    meta = {
        "preset": args.preset,
        "img_size": cfg.img_size,
        "batch": args.batch,
        "cond": args.cond,
        "amp": amp,
        "device": dev_name,
        "torch": torch.__version__,
        "has_extension": jitrope.HAS_EXTENSION,
        "iters": args.iters,
        "warmup": args.warmup,
        "peak": peak_what,
    }
    print(
        f"# {args.preset} {cfg.img_size}x{cfg.img_size}, condition {args.cond or 'none'}, batch {args.batch}, "
        f"{'bf16 autocast' if amp else 'float32'}, {dev_name}, torch {torch.__version__}"
    )
    print(
        f"# median of {args.iters} steps after {args.warmup} warm-up steps; MFU against {peak_what}; "
        f"peak memory: {'CUDA allocator peak' if device.type == 'cuda' else 'process peak RSS so far (CPU)'}"
    )
    if not jitrope.HAS_EXTENSION:
        print(f"# the extension is not loaded ({jitrope.EXTENSION_ERROR}): torch rows only")
    rows: List[Dict] = []
    ratios: List[Dict] = []
    profiles: List[str] = []
    for pe in args.pos_embed:
        bench_pos_embed(args, pe, device, amp, peak, rows, ratios, profiles)
    for table in profiles:
        print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows, "ratios": ratios}, f, indent=2)
    return 0


def bench_pos_embed(args, pe: str, device, amp: bool, peak, rows: List[Dict], ratios: List[Dict], profiles: List[str]):
    """Every compile mode of encoding ``pe``: its table, the fused/torch ratios (appended to ``ratios``) and,
    with ``--profile``, the profiles of its cases (appended to ``profiles``)."""
    print(f"\n## pos_embed={pe}")
    print(
        f"{'compile':<16}{'pos_impl':<9}{'what':<8}{'ms/step':>10}{'images/s':>11}{'peak GiB':>10}"
        f"{'TFLOP/s':>9}{'MFU':>8}"
    )
    for mode in args.compile:
        res, cases = bench_mode(args, pe, mode, device, amp, peak, rows)
        for (impl, what), r in res.items():
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(
                f"{mode:<16}{impl:<9}{what:<8}{r['ms']:>10.2f}{r['images_per_s']:>11.1f}"
                f"{fmt(r['peak_gib'], '.2f'):>10}{r['tflops']:>9.3f}{mfu:>8}"
            )
        for what in args.what:
            if ("fused", what) in res:
                ratio = res[("fused", what)]["ms"] / res[("torch", what)]["ms"]
                ratios.append({"pos_embed": pe, "compile": mode, "what": what, "fused_over_torch": ratio})
        if args.profile:  # now: the next mode's torch._dynamo.reset() drops these compiled graphs
            profiles.extend(
                profile(c, args, f"{pe}, compile={mode}, pos_impl={impl}, training step") for impl, c in cases.items()
            )
        del cases
    if ratios:
        print(
            "fused/torch time (same compile mode both sides; < 1: fused is faster): "
            + ", ".join(
                f"{r['compile']} {r['what']} {r['fused_over_torch']:.3f}" for r in ratios if r["pos_embed"] == pe
            )
        )


if __name__ == "__main__":
    sys.exit(main())

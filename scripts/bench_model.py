#!/usr/bin/env python
"""Time a JiT training step and a sampling forward, pos_impl="fused" vs pos_impl="torch", eager and compiled.

For each ``--compile`` mode (none = eager, default, reduce-overhead) and each implementation it
prints ms per step, images/s, peak memory and model FLOPs utilisation, then the fused/torch
ratio in the same mode. A training step is forward + diffusion loss + backward + AdamW step; a
sampling forward is one model call under ``torch.no_grad``. The two implementations share their
weights (SPEC §5: changing the flag changes nothing else) and are timed alternately, step by step,
so drift of a shared machine hits both alike; the median of ``--iters`` steps is reported.
``pos_impl="torch"`` is the honest baseline: cached cos/sin tables, as the published JiT code.

MFU counts the model's matmul FLOPs (linear, conv, attention; backward = 2x forward), against
``--peak-tflops`` or, on a GPU whose dense bf16 peak is known (H100/H200 SXM: 989 TFLOP/s), that
figure. On a CPU without ``--peak-tflops`` it prints n/a.

    PYTHONPATH=python python scripts/bench_model.py          # CPU: tiny preset, 1 thread; 2 min, mostly inductor compiling
    PYTHONPATH=python python scripts/bench_model.py --device cuda --compile none default reduce-overhead
    PYTHONPATH=python python scripts/bench_model.py --profile                        # top ops by device time
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

import jitrope
from jitrope.diffusion import Diffusion
from jitrope.model import JiT, JiTConfig
from jitrope.posenc import POS_EMBEDS

COMPILE_MODES = ("none", "default", "reduce-overhead")
IMPLS = ("torch", "fused")
# Dense (no sparsity) bf16 tensor-core peaks of the SXM parts, from NVIDIA's data sheets.
DENSE_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
DEFAULTS = {  # device type -> preset, batch, warmup, iters
    "cuda": ("JiT-B/16", 64, 3, 10),
    "cpu": ("tiny", 8, 2, 5),
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    p.add_argument("--preset", default=None, help="JiTConfig preset (default: JiT-B/16 on CUDA, tiny on CPU)")
    p.add_argument("--pos-embed", nargs="+", default=["sincos2d+rope2d"],
                   help=f"encodings to time (default: the paper's sincos2d+rope2d); any of {list(POS_EMBEDS)} or 'all'")
    p.add_argument("--compile", nargs="+", default=["none", "default"], choices=COMPILE_MODES,
                   help="torch.compile modes to run, 'none' = eager (default: none default)")
    p.add_argument("--what", nargs="+", default=["train", "sample"], choices=("train", "sample"),
                   help="what to time (default: both)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64 on CUDA, 8 on CPU)")
    p.add_argument("--cond", type=int, default=0, help="condition image size, 0 for none (default 0, as the paper)")
    p.add_argument("--amp", nargs="?", const="bf16", choices=("auto", "bf16", "off"), default="auto",
                   help="bf16 autocast: auto (default) = on for CUDA, off on CPU; --amp alone = bf16")
    p.add_argument("--iters", type=int, default=None, help="timed steps per implementation (default 10 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, compilation included (default 3 / 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads on CPU (default 1: on cores shared with other jobs, OpenMP's "
                        "barriers made a 2-thread step 60x slower than 1 thread; 0 keeps torch's default)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for MFU in TFLOP/s (default: the GPU's dense bf16 peak when known; n/a otherwise)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile a few training steps of each case and list the top ops by device time")
    p.add_argument("--profile-rows", type=int, default=15, help="rows of the profile table (default 15)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
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
        for impl, case in cases.items():  # warm up (and compile) one at a time: peak memory per case
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
            row = {"pos_embed": pos_embed, "compile": mode, "impl": impl, "what": what, "ms": ms,
                   "images_per_s": args.batch / ms * 1e3, "peak_gib": case.peak[what],
                   "tflops": flops[what] / ms * 1e-9}
            row["mfu"] = row["tflops"] / peak if peak else None
            rows.append(row)
            out[(impl, what)] = row
    return out, cases


def profile(case: Case, args, title: str) -> str:
    """The top ops of a few training steps by device self time, as a printable table."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    cuda = case.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps = 3
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            case.run("train")
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return (f"\n# profile: {title}, {steps} steps, top {args.profile_rows} by {'GPU' if cuda else 'CPU'} self time\n"
            + prof.key_averages().table(sort_by=key, row_limit=args.profile_rows, max_name_column_width=60))


def fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    amp = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
    peak, peak_what = peak_tflops(args, device)
    cfg = JiTConfig.preset(args.preset, cond_img_size=args.cond or None)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    meta = {"preset": args.preset, "img_size": cfg.img_size, "batch": args.batch, "cond": args.cond, "amp": amp,
            "device": dev_name, "torch": torch.__version__, "has_extension": jitrope.HAS_EXTENSION,
            "iters": args.iters, "warmup": args.warmup, "peak": peak_what}
    print(f"# {args.preset} {cfg.img_size}x{cfg.img_size}, condition {args.cond or 'none'}, batch {args.batch}, "
          f"{'bf16 autocast' if amp else 'float32'}, {dev_name}, torch {torch.__version__}")
    print(f"# median of {args.iters} steps after {args.warmup} warm-up steps; MFU against {peak_what}; "
          f"peak memory: {'CUDA allocator peak' if device.type == 'cuda' else 'process peak RSS so far (CPU)'}")
    if not jitrope.HAS_EXTENSION:
        print(f"# the extension is not loaded ({jitrope.EXTENSION_ERROR}): torch rows only")
    rows: List[Dict] = []
    ratios: List[Dict] = []
    profiles = []
    for pe in args.pos_embed:
        print(f"\n## pos_embed={pe}")
        print(f"{'compile':<16}{'pos_impl':<9}{'what':<8}{'ms/step':>10}{'images/s':>11}{'peak GiB':>10}"
              f"{'TFLOP/s':>9}{'MFU':>8}")
        for mode in args.compile:
            res, cases = bench_mode(args, pe, mode, device, amp, peak, rows)
            for (impl, what), r in res.items():
                mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
                print(f"{mode:<16}{impl:<9}{what:<8}{r['ms']:>10.2f}{r['images_per_s']:>11.1f}"
                      f"{fmt(r['peak_gib'], '.2f'):>10}{r['tflops']:>9.3f}{mfu:>8}")
            for what in args.what:
                if ("fused", what) in res:
                    ratio = res[("fused", what)]["ms"] / res[("torch", what)]["ms"]
                    ratios.append({"pos_embed": pe, "compile": mode, "what": what, "fused_over_torch": ratio})
            if args.profile:  # now: the next mode's torch._dynamo.reset() drops these compiled graphs
                profiles.extend(profile(c, args, f"{pe}, compile={mode}, pos_impl={impl}, training step")
                                for impl, c in cases.items())
            del cases
        if ratios:
            print("fused/torch time (same compile mode both sides; < 1: fused is faster): " + ", ".join(
                f"{r['compile']} {r['what']} {r['fused_over_torch']:.3f}" for r in ratios if r["pos_embed"] == pe))
    for table in profiles:
        print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows, "ratios": ratios}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

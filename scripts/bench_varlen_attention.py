"""Block-diagonal attention on packed sequences: the "mask" and "loop" paths of
jitrope.attention.varlen_attention, timed forward + backward, to set its "auto" rule on the CPU.

    PYTHONPATH=python python scripts/bench_varlen_attention.py [--threads 1] [--heads 3] [--head-dim 64]

Each row packs sequences of the emoji multi-size mix (grids 4x4 .. 12x12 at patch 4, plus 8
in-context tokens) up to a token budget, and prints the median time of forward + backward per call
for both paths. With ``--json PATH`` the rows are also written as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from jitrope.attention import varlen_attention


def pack(budget: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    sizes = [4, 6, 8, 10, 12]
    lens = []
    while sum(lens) + sizes[0] ** 2 + 8 <= budget:  # greedy: draw sizes until not even the smallest fits
        n = sizes[int(torch.randint(len(sizes), (1,), generator=g))] ** 2 + 8
        if sum(lens) + n <= budget:
            lens.append(n)
    if not lens:
        raise ValueError(f"budget {budget} is smaller than the smallest sequence ({sizes[0] ** 2 + 8} tokens)")
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu, max(lens)


def time_call(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--budgets", default="128,256,384,512,768,1024,2048,4096")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        print(f"error: --budgets must be comma-separated integers, got {args.budgets!r}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    H, D = args.heads, args.head_dim
    rows = []
    print(f"threads={args.threads} heads={H} head_dim={D} float32, forward+backward, median of {args.reps}")
    print(f"{'budget':>7} {'T':>6} {'S':>4} {'mask ms':>9} {'loop ms':>9} {'loop/mask':>9}")
    for budget in budgets:
        cu, max_len = pack(budget, seed=budget)
        T = int(cu[-1])
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(T, H, D, generator=g, requires_grad=True) for _ in range(3))
        grad = torch.randn(T, H, D, generator=g)
        res = {}
        for impl in ("mask", "loop"):

            def step():
                out = varlen_attention(q, k, v, cu, max_len, impl=impl)
                torch.autograd.grad(out, (q, k, v), grad)

            res[impl] = time_call(step, args.reps) * 1e3
        rows.append(dict(budget=budget, T=T, S=len(cu) - 1, mask_ms=res["mask"], loop_ms=res["loop"]))
        print(
            f"{budget:>7} {T:>6} {len(cu) - 1:>4} {res['mask']:>9.2f} {res['loop']:>9.2f} "
            f"{res['loop'] / res['mask']:>9.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(threads=args.threads, heads=H, head_dim=D, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/bench_ops.py on the CPU: the timing rounds, the --packed baselines compute the fused ops' results,
and a tiny run prints every row with its goal."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import jitrope
from jitrope.rope import axial_freqs

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_ops", ROOT / "scripts" / "bench_ops.py")
bench_ops = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_ops)

needs_ext = pytest.mark.skipif(not jitrope.HAS_EXTENSION, reason="jitrope extension not built")


@pytest.mark.parametrize("order", ["interleaved", "blocked"])
def test_time_ms_calls_each_function_warmup_plus_reps_times_in_the_asked_order(order):
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = bench_ops.time_ms(fns, torch.device("cpu"), warmup=1, reps=3, order=order)
    assert sorted(times) == ["a", "b", "c"] and all(t >= 0 for t in times.values())
    if order == "interleaved":  # warm-up round, then rounds starting one function later each
        assert "".join(calls) == "abc" + "abc" + "bca" + "cab"
    else:
        assert "".join(calls) == "aaaabbbbcccc"


def test_packed_mixes_fill_the_budget_with_each_image_on_its_own_grid():
    batches = bench_ops.packed_inputs(100, 3, 2, 8, torch.device("cpu"), torch.float32, seed=3)
    smallest = min(h * w for h, w in bench_ops.PACKED_GRIDS["cpu"])
    for x, coords, g in batches:
        T = coords.shape[0]
        assert 100 - smallest < T <= 100 and x.shape == g.shape == (2, 1, 2, T, 8)
        assert not x.is_contiguous()  # the q/k view of a qkv projection
        starts = (coords == 0).all(1).nonzero().flatten().tolist()  # each image's grid starts at (0, 0)
        assert starts[0] == 0
    assert len({c.shape[0] for _, c, _ in batches} | {tuple(c[:, 0].tolist()) for _, c, _ in batches}) > 1


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_baselines_compute_the_fused_ops(dtype):
    # The baselines must do the same work as the op they are timed against.
    from jitrope import ops

    ((x, coords, _),) = bench_ops.packed_inputs(90, 1, 3, 16, torch.device("cpu"), dtype, seed=1)
    freqs = axial_freqs(16)
    weight = 1 + 0.1 * torch.randn(2, 16)
    # The baseline builds its tables in float32 (float32 coords and freqs, as the published code); the fused
    # op's float64 angles are exact, so float64 agrees to float32's table precision.
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=1e-6)
    torch.testing.assert_close(bench_ops.packed_rope_eager(x, coords, freqs), ops.rope2d(x, coords, freqs), **tol)
    torch.testing.assert_close(
        bench_ops.packed_qk_norm_rope_eager(x, weight, coords, freqs), ops.qk_norm_rope(x, weight, coords, freqs), **tol
    )


@needs_ext
def test_packed_cpu_run_prints_every_row_with_its_goal(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        bench_ops.main(
            [
                "--packed",
                "--device",
                "cpu",
                "--threads",
                "1",
                "--packed-tokens",
                "64,100",
                "--packed-calls",
                "2",
                "--reps",
                "1",
                "--warmup",
                "0",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["op"], r["pass"], r["case"].split()[0]) for r in rows) == sorted(
        (op, p, t) for op in ("rope2d", "qk_norm_rope") for p in ("fwd", "fwd+bwd") for t in ("T~64", "T~100")
    )
    for r in rows:
        assert r["fused_ms"] > 0 and r["copy_ms"] > 0 and r["gbs"] > 0 and len(r["tokens"]) == 2
        assert r["compiled_ms"] is None and r["goal"] == ">=1.5x compiled: n/a (no --compile)"
    assert "fused GB/s" in text and "packed batches, 2 size mixes per run" in text


def test_packed_flags_are_checked(capsys):
    with pytest.raises(SystemExit) as e:
        bench_ops.main(["--packed", "--device", "cpu", "--packed-calls", "0"])
    assert e.value.code == 2 and "--packed-calls" in capsys.readouterr().err

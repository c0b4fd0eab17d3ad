"""scripts/bench_model.py on the CPU: its FLOP count is the model's, and a short run prints every row."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import jitrope
from jitrope.model import JiT, JiTConfig

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_model", ROOT / "scripts" / "bench_model.py")
bench_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_model)


@pytest.mark.parametrize("cond", [None, 8])
def test_model_flops_match_the_flop_counter(cond):
    # With the float32 attention (plain matmuls), torch's counter sees every FLOP the formula counts.
    cfg = JiTConfig.preset("tiny", attn_impl="fp32", pos_impl="torch", cond_img_size=cond, cond_patch_size=2)
    model = JiT(cfg)
    B = 3
    x, t, y = torch.randn(B, 3, 16, 16), torch.rand(B), torch.randint(0, 9, (B,))
    c = None if cond is None else torch.randn(B, 3, cond, cond)
    with FlopCounterMode(display=False) as counter:
        model(x, t, y, cond=c)
    assert bench_model.model_flops(model, B) == counter.get_total_flops()


def test_short_cpu_run_prints_every_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        bench_model.main(
            [
                "--device",
                "cpu",
                "--compile",
                "none",
                "--iters",
                "1",
                "--warmup",
                "1",
                "--batch",
                "2",
                "--pos-embed",
                "rope2d_mixed",
                "--profile",
                "--profile-rows",
                "3",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    impls = ["torch", "fused"] if jitrope.HAS_EXTENSION else ["torch"]
    assert sorted((r["impl"], r["what"]) for r in res["results"]) == sorted(
        (i, w) for i in impls for w in ("train", "sample")
    )
    assert all(r["ms"] > 0 and r["mfu"] is None for r in res["results"])  # CPU: no stated peak
    assert "MFU against n/a" in text and text.count("# profile:") == len(impls)
    if jitrope.HAS_EXTENSION:
        assert {r["what"] for r in res["ratios"]} == {"train", "sample"} and "fused/torch" in text


def test_packed_batches_are_greedy_mixes_within_the_budget():
    _, patch, mix, _ = bench_model.PACKED_MIX["cpu"]
    batches = bench_model.draw_packed_batches(mix, patch, 300, 3, seed=1)
    smallest = min((h // patch) * (w // patch) for h, w in mix)
    assert len(batches) == 3
    for sizes in batches:
        used = sum((h // patch) * (w // patch) for h, w in sizes)
        assert 300 - smallest < used <= 300 and set(sizes) <= set(mix)
    assert any(len(set(sizes)) > 1 for sizes in batches)  # mixed sizes, not buckets
    with pytest.raises(ValueError, match="--tokens-per-batch 8"):
        bench_model.draw_packed_batches(mix, patch, 8, 1)


def test_pad_to_max_with_the_key_mask_predicts_what_the_packed_model_does():
    # The baseline must compute the same model: padded images with padding keys masked give, on their real
    # pixels, the packed batch's predictions (in-context tokens included).
    torch.manual_seed(0)
    cfg = JiTConfig.preset("tiny", img_size=24, pos_embed="rope2d", pos_impl="torch")
    model = JiT(cfg).eval()
    sizes = [(8, 12), (24, 16), (16, 24)]
    xs = [torch.randn(3, h, w) for h, w in sizes]
    t, y = torch.rand(3), torch.tensor([1, 2, 3])
    with torch.no_grad():
        want = model.forward_packed(xs, t, y)
        x = torch.zeros(3, 3, 24, 24)
        keep = torch.zeros(3, 6, 6, dtype=torch.bool)
        for s, im in enumerate(xs):
            x[s, :, : im.shape[1], : im.shape[2]] = im
            keep[s, : im.shape[1] // 4, : im.shape[2] // 4] = True
        got = bench_model.PaddedModel(model)(x, t, y, keep.reshape(3, -1))
    for s, im in enumerate(xs):
        torch.testing.assert_close(got[s, :, : im.shape[1], : im.shape[2]], want[s], rtol=1e-5, atol=1e-5)


def test_short_packed_cpu_run_prints_both_layouts_and_the_goals(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        bench_model.main(
            [
                "--packed",
                "--device",
                "cpu",
                "--compile",
                "none",
                "--iters",
                "1",
                "--warmup",
                "0",
                "--tokens-per-batch",
                "100",
                "--packed-batches",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert [r["how"] for r in res["results"]] == ["packed", "pad-to-max"]
    packed, padded = res["results"]
    assert packed["useful_tokens"] == padded["useful_tokens"] == packed["computed_tokens"] <= 200
    assert padded["computed_tokens"] >= padded["useful_tokens"] and packed["padding_waste"] < 16 / 100
    assert all(r["tokens_per_s"] > 0 for r in res["results"]) and len(res["ratios"]) == 1
    assert "goal >= 1.4x" in text and "goal <= 3%" in text


def test_packed_flags_are_checked(capsys):
    with pytest.raises(SystemExit) as e:
        bench_model.main(["--packed", "--device", "cpu", "--compile", "reduce-overhead"])
    assert e.value.code == 2 and "--packed" in capsys.readouterr().err

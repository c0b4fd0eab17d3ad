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
    assert bench_model.main(["--device", "cpu", "--compile", "none", "--iters", "1", "--warmup", "1",
                             "--batch", "2", "--pos-embed", "rope2d_mixed", "--profile", "--profile-rows", "3",
                             "--json", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    impls = ["torch", "fused"] if jitrope.HAS_EXTENSION else ["torch"]
    assert sorted((r["impl"], r["what"]) for r in res["results"]) == sorted((i, w) for i in impls for w in ("train", "sample"))
    assert all(r["ms"] > 0 and r["mfu"] is None for r in res["results"])  # CPU: no stated peak
    assert "MFU against n/a" in text and text.count("# profile:") == len(impls)
    if jitrope.HAS_EXTENSION:
        assert {r["what"] for r in res["ratios"]} == {"train", "sample"} and "fused/torch" in text

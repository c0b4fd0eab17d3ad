"""The scripts behind the memory numbers of docs/training.md ("Training on many GPUs"), on the CPU:
bench_dist.py (per-rank bytes, ddp vs fsdp), bench_model.py --activation-checkpointing (a step's peak
tensor memory) and memory_estimate.py (computed per-GPU memory)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench_dist, bench_model, memory_estimate = (_script(n) for n in ("bench_dist", "bench_model", "memory_estimate"))


def test_bench_dist_counts_each_ranks_bytes(tmp_path, capsys):
    out = tmp_path / "d.json"
    cfg = str(ROOT / "configs" / "tiny_cpu.yaml")
    assert (
        bench_dist.main(
            ["--config", cfg, "--steps", "2", "--activation-checkpointing", "off", "on", "--json", str(out)]
        )
        == 0
    )
    rows = [r[0] for r in json.loads(out.read_text())["rows"]]
    assert [(r["parallel"], r["ac"]) for r in rows] == [("ddp", "off"), ("ddp", "on"), ("fsdp", "off"), ("fsdp", "on")]
    n = rows[0]["params_n"]
    for r in rows:  # one rank: float32 parameters, gradients, AdamW (2 moments + a step count each), 2 EMAs
        assert (r["params"], r["grads"], r["emas"]) == (4 * n, 4 * n, 8 * n)
        assert 8 * n < r["adamw"] < 8 * n + 4 * 64
    assert "total MiB" in capsys.readouterr().out


def test_tensor_memory_counts_live_storages_once():
    with bench_model.TensorMemory() as mem:
        a = torch.zeros(1000)  # 4000 bytes
        b = a.view(10, 100)  # the same storage
        c = a + 1
        del c
    assert mem.peak == 8000 and mem.live == 4000
    del a, b


def test_activation_checkpointing_lowers_a_steps_peak(tmp_path):
    out = tmp_path / "m.json"
    # batch 64: the activations, not AdamW's temporaries, make the peak of the tiny model's step
    args = [
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--batch",
        "64",
        "--iters",
        "1",
        "--warmup",
        "1",
        "--compile",
        "none",
    ]
    assert bench_model.main(args + ["--activation-checkpointing", "off", "on", "--json", str(out)]) == 0
    off, on = json.loads(out.read_text())["rows"]
    assert off["state_bytes"] == on["state_bytes"] > 0
    assert 0 < on["peak_bytes"] < off["peak_bytes"]


def test_memory_estimate_counts_the_published_models():
    counts = {n: memory_estimate.param_counts(memory_estimate.model_config(n))[0] for n in memory_estimate.MODELS}
    # the paper's parameter counts: 131M, 459M, 953M, 2B
    assert [round(c / 1e6) for c in counts.values()] == [131, 459, 953, 2007]
    e = memory_estimate.estimate("JiT-B/16", batch=16, gpus=8)
    assert e["fsdp_ac"] < e["fsdp"] < e["ddp"] and e["a"] > 10 * e["c"] > 0

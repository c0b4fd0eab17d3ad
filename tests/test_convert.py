"""Published JiT checkpoints (official model_jit.py) convert into jitrope run folders and load.

The published names and shapes of JiT-B/16 are in tests/data/published_jit_b16_state_dict.json (a
copy of the project's shared/data one, listed from the published model_jit.py); its sin-cos
pos_embed is computed here with MAE's formula (numpy, as the published code does), not with
jitrope's, so the check of that table is against an independent reference.
"""

import argparse
import fractions
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from jitrope import checkpoint as CK
from jitrope import convert as C
from jitrope import evaluate as E
from jitrope import published as P
from jitrope import sample as S
from jitrope.fileio import exclusive_lock
from jitrope.model import JiT, JiTConfig

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED_B16 = ROOT / "tests" / "data" / "published_jit_b16_state_dict.json"


def mae_sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed (which the published JiT uses): [grid*grid, embed_dim], float64."""

    def one_axis(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))  # w first
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_axis(embed_dim // 2, grid[0]), one_axis(embed_dim // 2, grid[1])], axis=1)


def to_published(sd, cfg: JiTConfig, prefix: str = ""):
    """A jitrope state dict as the published model names it: q_norm / k_norm apart, the pos_embed table."""
    out = {}
    for k, v in sd.items():
        if k.endswith("attn.qk_norm.weight"):
            base = k[: -len("qk_norm.weight")]
            out[prefix + base + "q_norm.weight"], out[prefix + base + "k_norm.weight"] = v[0].clone(), v[1].clone()
        else:
            out[prefix + k] = v.clone()
    g = cfg.img_size // cfg.patch_size
    out[prefix + "pos_embed"] = torch.from_numpy(mae_sincos_2d(cfg.hidden_size, g)).float()[None]
    return out


def randomized(cfg: JiTConfig, seed: int) -> JiT:
    """A model whose every parameter is random (the zero-initialised layers too), so outputs depend on all."""
    torch.manual_seed(seed)
    m = JiT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


def tiny(**kw) -> JiTConfig:
    return JiTConfig.preset("tiny", pos_impl="torch", **kw)


@pytest.mark.slow  # a full JiT-B/16 (131M parameters) built, converted and loaded
def test_published_b16_state_dict_converts_and_loads_with_nothing_left_over():
    pub_shapes = json.loads(PUBLISHED_B16.read_text())
    assert pub_shapes["persistent_buffers"] == []  # RoPE tables are not stored: only pos_embed is derived
    cfg = JiTConfig.preset("JiT-B/16")
    torch.manual_seed(0)
    model = JiT(cfg).eval()
    # the mapping accounts for every published name: jitrope's names, renamed, are exactly the published ones
    renamed = {k: list(v.shape) for k, v in to_published(model.state_dict(), cfg).items()}
    assert renamed == pub_shapes["state_dict"]
    g = torch.Generator().manual_seed(1)
    pub = {k: torch.randn(shape, generator=g) * 0.02 for k, shape in pub_shapes["state_dict"].items()}
    pub["pos_embed"] = torch.from_numpy(mae_sincos_2d(768, 16)).float()[None]
    mapped, dropped = P.convert_state_dict({f"net.{k}": v for k, v in pub.items()}, model)
    assert dropped == ["pos_embed"] and list(mapped) == list(model.state_dict())
    # the mapped dict, built here by hand: q/k stacked, pos_embed dropped, the rest as published
    by_hand = {k: v for k, v in pub.items() if not k.endswith(("attn.q_norm.weight", "attn.k_norm.weight"))}
    del by_hand["pos_embed"]
    for i in range(cfg.depth):
        a = f"blocks.{i}.attn."
        by_hand[a + "qk_norm.weight"] = torch.stack([pub[a + "q_norm.weight"], pub[a + "k_norm.weight"]])
    assert set(by_hand) == set(mapped) and all(torch.equal(by_hand[k], mapped[k]) for k in mapped)
    model.load_state_dict(by_hand)
    x = torch.randn(1, 3, 256, 256, generator=g)
    t, y = torch.tensor([0.3]), torch.tensor([207])
    with torch.no_grad():
        want = model(x, t, y)
        for p in model.parameters():
            p.fill_(float("nan"))
        model.load_state_dict(pub)  # the published names directly (strict)
        got = model(x, t, y)
    assert torch.isfinite(want).all() and want.abs().max() > 0
    assert torch.equal(got, want)


def test_load_state_dict_takes_published_names_under_a_prefix_and_checks_pos_embed():
    cfg = tiny()
    src = randomized(cfg, 0)

    class Denoiser(nn.Module):  # the published training wrapper: the model is its .net
        def __init__(self):
            super().__init__()
            self.net = JiT(cfg)

    d = Denoiser()
    d.load_state_dict(to_published(src.state_dict(), cfg, prefix="net."))
    for k, v in src.state_dict().items():
        assert torch.equal(d.net.state_dict()[k], v), k
    bad = to_published(src.state_dict(), cfg)
    bad["pos_embed"] = bad["pos_embed"].flip(1)
    with pytest.raises(RuntimeError, match="pos_embed is not the fixed 2D sin-cos table of a 4x4 grid"):
        JiT(cfg).load_state_dict(bad)
    # a state dict of jitrope's own names is untouched by the hook
    JiT(cfg).load_state_dict(src.state_dict())


@pytest.fixture(scope="module")
def published_ckpt(tmp_path_factory):
    """A full checkpoint-last.pth of a tiny published-format JiT: three different weight sets, the
    net. prefix, the optimizer, the epoch and the training's Namespace."""
    cfg = tiny()
    sets = {name: randomized(cfg, seed).state_dict() for seed, name in enumerate(P.WEIGHTS.values())}
    path = tmp_path_factory.mktemp("published") / "checkpoint-last.pth"
    obj = {name: to_published(sd, cfg, prefix="net.") for name, sd in sets.items()}
    obj.update(
        optimizer={"state": {}, "param_groups": [{"lr": 1e-4}]},
        epoch=599,
        args=argparse.Namespace(model="JiT-B/16", img_size=256, P_mean=-0.8, cfg=2.9),
    )
    torch.save(obj, path)
    return path, sets


@pytest.mark.parametrize("weights", [None, "model", "ema1", "ema2"])
def test_a_full_checkpoint_converts_each_weight_set(published_ckpt, tmp_path, capsys, weights):
    path, sets = published_ckpt
    out = tmp_path / "run"
    argv = [str(path), "--preset", "tiny", "--out", str(out), "model.pos_impl=torch"]
    assert C.main(argv + (["--weights", weights] if weights else [])) == 0, capsys.readouterr().err
    assert "published epoch 599" in capsys.readouterr().out
    model, cfg, info = CK.load_model(out, ema="none")
    want = sets[P.WEIGHTS[weights or "ema1"]]
    assert info["step"] == 0 and info["weights"] == "model" and cfg.sample.ema == "none"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "step_00000000" / "manifest.json").is_file()
    # a second conversion into the same folder does not overwrite it
    assert C.main(argv) == 2
    assert "already holds a run (config.yaml) and checkpoints (step_00000000); " in capsys.readouterr().err


def test_the_converted_run_samples_and_evaluates(published_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        C.main(
            [str(published_ckpt[0]), "--preset", "tiny", "--out", str(out), "model.pos_impl=torch", "sample.steps=2"]
        )
        == 0
    )
    grid = tmp_path / "g.png"
    assert S.main(["--ckpt", str(out), "--out", str(grid), "--classes", "0,null", "--n", "2", "--no-progress"]) == 0
    assert grid.is_file() and "step 0 model, heun 2 steps" in capsys.readouterr().out
    m = tmp_path / "m.json"
    assert (
        E.main(
            [
                "--ckpt",
                str(out),
                "--out",
                str(m),
                "--data",
                "synthetic",
                "--metrics",
                "vloss",
                "--max-images",
                "4",
                "--t-grid",
                "0.5",
            ]
        )
        == 0
    )
    assert json.loads(m.read_text())["weights"] == "model"


def test_a_bare_state_dict_in_torch_or_safetensors_format(tmp_path):
    from safetensors.torch import save_file

    cfg = tiny()
    src = randomized(cfg, 5).state_dict()
    pub = to_published(src, cfg)
    torch.save(pub, tmp_path / "sd.pth")
    save_file(pub, str(tmp_path / "sd.safetensors"))
    for f in ("sd.pth", "sd.safetensors"):
        ck = C.convert(
            tmp_path / f, tmp_path / f"out_{f}", preset="tiny", overrides=["model.pos_impl=torch"], log=lambda *a: None
        )
        model, _, _ = CK.load_model(ck, ema="none")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in src.items())
    with pytest.raises(P.ConvertError, match="is a bare state dict, one set of weights; drop --weights"):
        C.convert(tmp_path / "sd.pth", tmp_path / "o2", preset="tiny", weights="ema2", log=lambda *a: None)


class _System:
    """Unpickling this would run a shell command (os.system): refused, and named."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Runs:
    """Unpickling this would create a file: the converter must refuse it without running it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_of_any_other_object_is_refused_not_run(published_ckpt, tmp_path, capsys):
    marker = tmp_path / "ran"
    obj = torch.load(published_ckpt[0], weights_only=False)
    for extra, named in (
        (_Runs(marker), f"{open.__module__}.open"),
        (_System(marker), f"{os.system.__module__}.system"),  # a blocked module: torch words it otherwise
        (fractions.Fraction(1, 3), "fractions.Fraction"),
    ):
        f = tmp_path / "evil.pth"
        torch.save({**obj, "extra": extra}, f)
        assert C.main([str(f), "--preset", "tiny", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {f} holds an object of {named}: refused") and err.count("\n") == 1, err
        assert "weights_only=True" in err
    assert not marker.exists() and not (tmp_path / "o" / "checkpoints").exists()


def _published_tiny(**changes):
    cfg = tiny()
    pub = to_published(randomized(cfg, 3).state_dict(), cfg, prefix="net.")
    for k, v in changes.items():
        if v is None:
            del pub[k]
        else:
            pub[k] = v
    return pub


@pytest.mark.parametrize(
    "changes,overrides,message",
    [
        ({"net.blocks.1.mlp.w3.bias": None}, [], "jitrope entries not filled: blocks.1.mlp.w3.bias"),
        (
            {"net.blocks.0.attn.k_norm.weight": None},
            [],
            "published keys left over: blocks.0.attn.q_norm.weight; jitrope entries not filled: "
            "blocks.0.attn.qk_norm.weight",
        ),
        ({"net.decoder.weight": torch.ones(3)}, [], "published keys left over: decoder.weight"),
        (
            {"net.final_layer.linear.bias": torch.ones(5)},
            [],
            "shape mismatch (published vs jitrope): final_layer.linear.bias (5,) vs (48,)",
        ),
        (
            {"net.y_embedder.embedding_table.weight": torch.ones(10, 64, dtype=torch.float64)},
            [],
            "dtype mismatch (published vs jitrope): y_embedder.embedding_table.weight torch.float64 vs torch.float32",
        ),
        ({"net.pos_embed": torch.ones(1, 16, 64)}, [], "pos_embed is not the fixed 2D sin-cos table of a 4x4 grid"),
        ({}, ["model.pos_embed=rope2d"], "model.pos_embed='rope2d' does not"),
        ({}, ["model.depth=3"], "jitrope entries not filled: blocks.2.norm1.weight"),
        ({}, ["model.depht=3"], "model.depht (did you mean model.depth?)"),
    ],
)
def test_keys_that_do_not_fit_are_named(tmp_path, capsys, changes, overrides, message):
    torch.save(_published_tiny(**changes), tmp_path / "sd.pth")
    out = tmp_path / "out"
    assert (
        C.main([str(tmp_path / "sd.pth"), "--preset", "tiny", "--out", str(out), "model.pos_impl=torch", *overrides])
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (out / "checkpoints").exists()


def test_unreadable_inputs_are_one_error_line(tmp_path, capsys):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    torch.save({"model_ema1": {"a": 1}}, tmp_path / "odd.pth")
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    torch.save({"model": {}}, tmp_path / "only_model.pth")
    for args, message in (
        ([str(tmp_path / "nope.pth")], "nope.pth does not exist"),
        ([str(tmp_path / "junk.pth")], "junk.pth: not a readable torch checkpoint"),
        ([str(tmp_path / "odd.pth")], "[model_ema1] is not a state dict of tensors"),
        ([str(tmp_path / "list.pth")], "is neither a published JiT checkpoint"),
        ([str(tmp_path / "only_model.pth")], "has no 'model_ema1' (--weights ema1); it has ['model']"),
        ([str(tmp_path / "nope.pth"), "--preset", "JiT-Z/9"], "unknown JiT preset 'JiT-Z/9'"),
    ):
        argv = [*args, "--out", str(tmp_path / "o")]
        if "--preset" not in args:
            argv += ["--preset", "tiny"]
        assert C.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and err.count("\n") == 1, err


def test_an_out_that_holds_a_run_a_checkpoint_or_a_lock_is_refused_and_add_waits_for_the_lock(
    published_ckpt, tmp_path, capsys
):
    """convert used to write into a running trainer's folder: past its .lock, over its config.yaml."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("train: {steps: 10}\n")
    argv = [str(published_ckpt[0]), "--preset", "tiny", "--out", str(out), "model.pos_impl=torch"]
    assert C.main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: --out {out} already holds a run (config.yaml); choose another folder, or pass --add to add "
        "the converted checkpoint to it\n"
    )
    with exclusive_lock(out, "train.out_dir"):  # a trainer at work in it
        assert C.main(argv) == 2
        assert "already holds a run (config.yaml) and a lock (.lock); " in capsys.readouterr().err
        assert C.main(argv + ["--add"]) == 2
        assert capsys.readouterr().err.startswith(
            f"error: --out {out} is in use by another process (pid {os.getpid()}, holding {out / '.lock'}); "
        )
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    assert C.main(argv + ["--add"]) == 0  # the lock let go: added, the run's own config.yaml kept
    assert (out / "config.yaml").read_text() == "train: {steps: 10}\n"
    assert CK.load_checkpoint(out)["step"] == 0 and not (out / ".lock").exists()
    capsys.readouterr()
    assert C.main(argv + ["--add"]) == 2  # never over a checkpoint
    assert f"--out {out} already holds checkpoints/step_00000000; " in capsys.readouterr().err
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / ".lock").write_text("4242\n")
    assert C.main(argv[:3] + ["--out", str(stale)]) == 2
    assert "already holds a lock (.lock); " in capsys.readouterr().err


@pytest.mark.parametrize(
    "scale,message",
    [(float("nan"), "hold(s) nan or inf values; weights that are not finite are refused"), (1e30, "probe batch")],
)
def test_weights_that_are_not_finite_or_give_no_finite_forward_are_refused(tmp_path, capsys, scale, message):
    pub = {k: v if k == "net.pos_embed" else v * scale for k, v in _published_tiny().items()}
    torch.save(pub, tmp_path / "sd.pth")
    out = tmp_path / "out"
    assert C.main([str(tmp_path / "sd.pth"), "--preset", "tiny", "--out", str(out), "model.pos_impl=torch"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"error: {tmp_path / 'sd.pth'}") and err.count("\n") == 1, err
    assert sorted(p.name for p in out.iterdir()) == []

"""Packed mixed-size training and sampling: sizes, the token-budget packer,
the mixed-size batch maker, packed training with exact resume, jitrope-sample --sizes, the errors."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jitrope import checkpoint as CK
from jitrope import sample as S
from jitrope import train as T
from jitrope import training as TR
from jitrope.config import load_config
from jitrope.data import MultiResMaker, TokenPacker, make_synthetic, padding_waste, parse_sizes
from jitrope.grids import make_grid
from jitrope.sampling import generate_sizes

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
BASE = ["model.pos_impl=torch", "train.progress=false", "train.tensorboard=false"]
# tiny: 16x16 at patch 4 with an 8x8 condition (half the grid): grids 2..6 keep an integer condition grid
SIZES = ["8x8", "16x16", "16x24", "24x16", "24x24"]
PACKED = [f"data.sizes=[{','.join(SIZES)}]", "train.tokens_per_batch=400"]
quiet = dict(log=lambda *a, **k: None)


def _cfg(out_dir, *extra):
    return load_config(TINY, BASE + PACKED + [f"train.out_dir={out_dir}", *extra])


def test_sizes_parse_as_height_by_width():
    assert parse_sizes("16x16, 32x48,48X32", "s") == [(16, 16), (32, 48), (48, 32)]
    assert parse_sizes(["8x12"], "s") == [(8, 12)]
    for bad in ("16", "16x", "x16", "16x16x16", "0x8", "ax8", "-8x8", ""):
        with pytest.raises(ValueError, match="^s: "):
            parse_sizes(bad, "s")


def test_packer_fills_the_budget_and_reports_the_waste():
    sizes = [(16, 16), (24, 24), (48, 48), (32, 48)]
    costs = [24, 44, 152, 104]  # 8 in-context tokens + the image grid at patch 4
    packer = TokenPacker(sizes, costs, 500)
    seen = set()
    for seed in range(50):
        picks = packer.draw(torch.Generator().manual_seed(seed))
        used = sum(costs[k] for k in picks)
        assert picks and used <= 500
        assert 500 - used < min(costs)  # nothing else fits: the waste is below the smallest image
        assert packer.waste(picks) == pytest.approx((500 - used) / 500)
        assert packer.draw(torch.Generator().manual_seed(seed)) == picks  # a function of the generator
        seen.update(picks)
    assert seen == {0, 1, 2, 3}
    assert packer.waste([2, 2, 2]) == pytest.approx(44 / 500)
    with pytest.raises(
        ValueError,
        match=r"image size 48x48 takes 152 tokens, over the budget "
        r"train.tokens_per_batch=100",
    ):
        TokenPacker(sizes, costs, 100)
    with pytest.raises(ValueError, match="empty batch"):
        padding_waste([], 100)
    with pytest.raises(ValueError, match="takes 152 tokens, over the budget train.tokens_per_batch=100"):
        padding_waste([152], 100)


@pytest.mark.parametrize("cond", ["none", "downsample"])
def test_mixed_size_images_sit_on_white_canvases(cond):
    ds = make_synthetic(18, 48, seed=1)
    sizes = [(16, 16), (32, 48), (48, 32)]
    cond_sizes = [(8, 8), (16, 24), (24, 16)] if cond != "none" else None
    maker = MultiResMaker(ds, sizes, cond=cond, cond_sizes=cond_sizes)
    idx = torch.tensor([3, 5, 7, 5])
    picks = [0, 1, 2, 1]
    u = torch.tensor([[0.5, 0.9, 0.0], [0.5, 0.9, 0.0], [0.5, 0.9, 0.999], [0.5, 0.9, 0.999]])
    xs, y, conds = maker(idx, picks, u)
    assert [tuple(x.shape) for x in xs] == [(3, 16, 16), (3, 32, 48), (3, 48, 32), (3, 32, 48)]
    assert torch.equal(y, ds.labels[idx])
    assert all(x.min() >= -1 and x.max() <= 1 for x in xs)
    # the 32x32 emoji sits at the left (offset 0) or the right (u ~ 1) of a wide canvas, white elsewhere
    assert torch.equal(xs[1][:, :, 32:], torch.ones(3, 32, 16))
    assert not torch.equal(xs[1][:, :, :32], torch.ones(3, 32, 32))
    assert torch.equal(xs[3][:, :, :16], torch.ones(3, 32, 16))
    assert torch.equal(xs[1][:, :, :32], xs[3][:, :, 16:])  # the same image, only moved
    assert torch.equal(xs[2][:, :16], torch.ones(3, 16, 32))  # tall canvas: the emoji at the bottom
    if cond == "none":
        assert conds is None
    else:
        assert [tuple(c.shape) for c in conds] == [(3, 8, 8), (3, 16, 24), (3, 24, 16), (3, 16, 24)]
        ref = torch.nn.functional.avg_pool2d(xs[1][None], 2)[0]  # downsample: the same canvas, halved
        torch.testing.assert_close(conds[1], ref)
    flipped = MultiResMaker(ds, sizes, cond=cond, cond_sizes=cond_sizes, hflip=True)(idx, picks, u * 0.1)[0]
    unflipped = maker(idx, picks, u * 0.1)[0]
    assert torch.equal(flipped[0], unflipped[0].flip(-1))


def test_packed_training_logs_the_padding_waste(tmp_path):
    lines = []
    out = TR.train(_cfg(tmp_path, "train.steps=4", "train.log_every=2"), log=lines.append)
    assert out["step"] == 4 and math.isfinite(out["loss"])
    assert "packed batches of 400 tokens over sizes 8x8, 16x16, 16x24, 24x16, 24x24" in lines[0]
    logged = [ln for ln in lines if ln.startswith("step ")]
    assert len(logged) == 2 and all(" waste " in ln and ln.endswith("%") for ln in logged), lines


def _weights(run_dir, step):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{step:08d}" / "weights.safetensors"))


@pytest.mark.parametrize("cond", ["downsample", "none"])
def test_mixed_size_resume_is_bit_exact(tmp_path, cond):
    extra = ["train.ckpt_every=5"] + ([] if cond != "none" else ["data.cond=none", "model.cond_img_size=null"])
    TR.train(_cfg(tmp_path / "straight", "train.steps=10", *extra), **quiet)
    TR.train(_cfg(tmp_path / "split", "train.steps=5", *extra), **quiet)
    out = TR.train(_cfg(tmp_path / "split", "train.steps=10", *extra), resume=True, **quiet)
    assert out["step"] == 10
    a, b = _weights(tmp_path / "straight", 10), _weights(tmp_path / "split", 10)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a["model.final_layer.linear.weight"].abs().sum() > 0  # it trained
    sa = torch.load(tmp_path / "straight/checkpoints/step_00000010/state.pt", weights_only=True)
    sb = torch.load(tmp_path / "split/checkpoints/step_00000010/state.pt", weights_only=True)
    assert sa["data"] == sb["data"] and sa["data"]["pos"] + sa["data"]["epoch"] * 226 > 10 * 2  # several per step


def test_resume_refuses_another_budget(tmp_path):
    TR.train(_cfg(tmp_path, "train.steps=2"), **quiet)
    from jitrope.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="train.tokens_per_batch: checkpoint 400 vs now 300"):
        TR.train(_cfg(tmp_path, "train.steps=4", "train.tokens_per_batch=300"), resume=True, **quiet)


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["data.sizes=[8x8,10x12]", "train.tokens_per_batch=400"],
            "config key data.sizes: 10x12 is not a multiple of the patch size 4 (model.patch_size)",
        ),
        (
            ["data.sizes=[8x8,16by16]", "train.tokens_per_batch=400"],
            "config key data.sizes: cannot parse '16by16' as HEIGHTxWIDTH",
        ),
        (["data.sizes=[8x8,16x16]"], "data.sizes (packed mixed-size batches) needs train.tokens_per_batch"),
        (["train.tokens_per_batch=400"], "train.tokens_per_batch=400 is set but data.sizes is empty"),
        (
            ["data.sizes=[8x8,24x24]", "train.tokens_per_batch=40"],
            "image size 24x24 takes 49 tokens, over the budget train.tokens_per_batch=40",
        ),  # 36 + 9 cond + 4 ctx
        (
            ["data.sizes=[8x8,12x12]", "train.tokens_per_batch=400"],
            "data.sizes 12x12: the null condition has no integer grid",
        ),
        (["data.sizes=[8x8]", "train.tokens_per_batch=0"], "train.tokens_per_batch must be >= 1, got 0"),
    ],
)
def test_bad_sizes_and_budgets_are_one_error_line(tmp_path, capsys, args, message):
    rc = T.main(["--config", TINY, *BASE, "train.steps=2", f"train.out_dir={tmp_path / 'run'}", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any work


def test_packing_trains_on_several_ranks_whatever_the_batch_size(tmp_path):
    # each rank packs its own train.tokens_per_batch: train.batch_size (here 16) only sets the lr
    cfg = _cfg(tmp_path, "train.grad_accum_steps=3")
    TR._check_data_fits(cfg, cfg.model_config(), make_synthetic(20, 16), 5)


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("packed_run")
    TR.train(_cfg(run, "train.steps=3"), **quiet)
    return run


def test_sample_sizes_writes_one_grid_of_classes_by_sizes(packed_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    sizes = "8x8,16x16,24x16,16x24"
    rc = S.main(
        [
            "--ckpt",
            str(packed_run),
            "--out",
            str(out),
            "--sizes",
            sizes,
            "--classes",
            "disc,square,null",
            "--n",
            "1",
            "--steps",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert "12 samples at 4 sizes in one packed batch" in capsys.readouterr().out
    # cells of the largest height and width (24x24) at scale 64 // 24 = 2, pad 2, a label margin on the left
    labels = ["disc", "square", "null"]
    margin = make_grid(torch.zeros(1, 3, 1, 1), 1, row_labels=labels).size[0] - 3 - 2
    with Image.open(out) as im:
        assert im.size == (margin + 4 * (48 + 2) + 2, 3 * (48 + 2) + 2)
        cell = im.crop((margin + 2 + 50 * 0, 2, margin + 2 + 48, 2 + 48))  # the 8x8 image (16 px) centred in white
        px = torch.from_numpy(np.asarray(cell.convert("RGB")).copy())
        assert (px[:16] == 255).all() and (px[32:] == 255).all() and (px[:, :16] == 255).all()
    singles = sorted(p.name for p in (tmp_path / "grid").iterdir())
    assert len(singles) == 12 and singles[2] == "r00_c02_24x16_disc.png"
    with Image.open(tmp_path / "grid" / singles[2]) as im:
        assert im.size == (16, 24)  # PIL: width x height


def test_sample_sizes_is_one_packed_forward_per_step(packed_run, monkeypatch):
    from jitrope.model import JiT

    model, cfg, _ = CK.load_model(packed_run, pos_impl="torch")
    calls = []
    real = JiT.forward_tokens

    def counting(self, x, *a, **k):
        calls.append(k["layout"].num_samples)
        return real(self, x, *a, **k)

    monkeypatch.setattr(JiT, "forward_tokens", counting)
    from jitrope.diffusion import Diffusion

    labels = torch.tensor([0, 1, 2])
    xs = generate_sizes(model, Diffusion(), labels, [(8, 8), (16, 24), (24, 16)], steps=3, sampler="heun", cfg=2.0)
    assert [tuple(x.shape) for x in xs] == [(3, 8, 8), (3, 16, 24), (3, 24, 16)]
    assert calls == [6] * 5  # heun: 2 * 3 - 1 evaluations, each one forward of both CFG branches (2 x 3 images)
    calls.clear()
    again = generate_sizes(model, Diffusion(), labels, [(8, 8), (16, 24), (24, 16)], steps=3, sampler="euler")
    assert calls == [3] * 3 and all(x.isfinite().all() for x in again)


def test_sample_sizes_takes_every_pos_scaling(packed_run, tmp_path, capsys, monkeypatch):
    # ntk / yarn on a packed batch: the override reaches the packed forward, each size is placed
    # by its own grid; the training size and a smaller one are the plain model's, bit for bit.
    from jitrope.diffusion import Diffusion
    from jitrope.model import JiT

    seen = []
    real = JiT.forward_tokens

    def spy(self, x, *a, **k):
        seen.append((k["layout"].scaling, k["layout"].seqs.freq_scale is not None))
        return real(self, x, *a, **k)

    monkeypatch.setattr(JiT, "forward_tokens", spy)
    for mode in ("ntk", "yarn"):
        seen.clear()
        out = tmp_path / f"{mode}.png"
        args = ["--ckpt", str(packed_run), "--out", str(out), "--sizes", "8x8,16x16,24x24", "--classes", "disc"]
        rc = S.main(args + ["--n", "1", "--steps", "2", "--no-progress", f"model.pos_scaling={mode}"])
        assert rc == 0, capsys.readouterr().err
        assert "3 samples at 3 sizes in one packed batch" in capsys.readouterr().out
        assert seen and set(seen) == {(mode, True)}
    monkeypatch.undo()
    # the numbers (the tiny run's images round to the same grey; its float outputs do not)
    model, _, _ = CK.load_model(packed_run, pos_impl="torch")
    outs = {}
    for mode in ("extrapolate", "ntk", "yarn"):
        model.cfg.pos_scaling = mode
        labels = torch.tensor([0, 1, 2])
        outs[mode] = generate_sizes(model, Diffusion(), labels, [(8, 8), (16, 16), (24, 24)], steps=2, cfg=2.0)
    for mode in ("ntk", "yarn"):
        for k in (0, 1):
            assert torch.equal(outs[mode][k], outs["extrapolate"][k]), (mode, k)
    big = [outs[m][2] for m in ("extrapolate", "ntk", "yarn")]
    assert not torch.equal(big[0], big[1]) and not torch.equal(big[1], big[2])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sizes", "8x8,16x"], "--sizes (sample.sizes): cannot parse '16x' as HEIGHTxWIDTH"),
        (["--sizes", "8x8,10x10"], "--sizes (sample.sizes): 10x10 is not a multiple of the patch size 4"),
        (["--sizes", "8x8,12x12"], "--sizes (sample.sizes): the model cannot sample 12x12"),
        (["--sizes", "8x8", "--img-size", "16"], "both give the size; keep one"),
    ],
)
def test_bad_sample_sizes_are_one_error_line(packed_run, tmp_path, capsys, args, message):
    out = tmp_path / "g.png"
    rc = S.main(["--ckpt", str(packed_run), "--out", str(out), "--steps", "2", "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()

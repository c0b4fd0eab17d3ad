"""The sampling and evaluation CLIs on a tiny checkpoint, and their errors on bad input."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from jitrope import evaluate as E
from jitrope import sample as S
from jitrope import train as T
from jitrope.checkpoint import CheckpointError
from jitrope.config import load_config
from jitrope.diffusion import Diffusion

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
BASE = ["model.pos_impl=torch", "train.progress=false", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny_run")
    T.train(load_config(TINY, BASE + [f"train.out_dir={run}", "train.steps=6", "train.ckpt_every=6",
                                      "train.sample_every=6"]), log=lambda *a, **k: None)
    assert (run / "samples" / "step_00000006.png").is_file()  # the periodic grid
    return run


@pytest.fixture(scope="module")
def tiny_uncond_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny_uncond")
    T.train(load_config(TINY, BASE + [f"train.out_dir={run}", "train.steps=2", "model.cond_img_size=null",
                                      "data.cond=none"]), log=lambda *a, **k: None)
    return run


def test_class_grid_and_single_images(tiny_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = S.main(["--ckpt", str(tiny_run), "--out", str(out), "--classes", "disc,3,null", "--n", "3", "--steps", "3",
                 "--batch-size", "4", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    im = Image.open(out)
    # 3 rows of 3 images at scale 4 (16 px -> 64 px) plus a label margin
    assert im.size[1] == 3 * (64 + 2) + 2 and im.size[0] > 3 * 66
    singles = sorted(p.name for p in (tmp_path / "grid").iterdir())
    assert len(singles) == 9 and singles[0] == "r00_c00_disc.png" and singles[-1].startswith("r02_c02_null")
    assert Image.open(tmp_path / "grid" / singles[0]).size == (16, 16)


def test_condition_images_from_a_folder(tiny_run, tmp_path):
    folder = tmp_path / "conds"
    folder.mkdir()
    Image.new("RGBA", (8, 8), (255, 0, 0, 255)).save(folder / "red.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(folder / "blue.jpg")
    out = tmp_path / "cond.png"
    assert S.main(["--ckpt", str(tiny_run), "--out", str(out), "--cond", str(folder), "--classes", "square", "--n", "2",
                   "--steps", "2", "--sampler", "euler", "--cfg", "3", "--cfg-interval", "0.2,0.8", "--ema", "1",
                   "--no-progress"]) == 0
    assert Image.open(out).size[1] == 2 * 66 + 2  # a row per condition image: [condition | 2 samples]
    assert len(list((tmp_path / "cond").iterdir())) == 4


def test_samples_do_not_depend_on_the_batch_size(tiny_run):
    model, cfg, info = S.load_model(tiny_run, ema="0")
    assert info["step"] == 6 and info["class_names"][0] == "disc"
    d = Diffusion.from_config(cfg.diffusion)
    y = torch.tensor([0, 1, 2])
    a = S.generate(model, d, y, steps=2, cfg=2.0, seed=5, batch_size=3)
    b = S.generate(model, d, y, steps=2, cfg=2.0, seed=5, batch_size=1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert a.shape == (3, 3, 16, 16)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--classes", "Dinosaurs"], "unknown class 'Dinosaurs'; the model's classes are 0: disc"),
        (["--classes", "12"], "class index 12 is out of range"),
        (["--cond", "{tmp}/wrong_size.png"], "is 12x12, the model expects 8x8"),
        (["--cond", "{tmp}/not_an_image.png"], "cannot read condition image"),
        (["--cond", "{tmp}/missing.png"], "does not exist"),
        (["--img-size", "18"], "not a multiple of the patch size"),
        (["--ema", "7"], "--ema '7' is not one of them"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--n", "0"], "--n must be >= 1, got 0"),
        (["--cfg", "-3"], "--cfg (guidance scale) must be a finite number >= 0, got -3.0"),
        (["--cfg", "nan"], "--cfg (guidance scale) must be a finite number >= 0, got nan"),
        (["--img-size", "0"], "--img-size must be >= 1, got 0"),
        (["--img-size", "-4"], "--img-size must be >= 1, got -4"),
        (["--scale", "0"], "--scale must be >= 1"),
        (["--device", "gpu0"], "--device 'gpu0' is not a device"),
        (["--classes", ""], "no classes in ''"),
        (["--classes", ",", "--cond", "{tmp}/c8.png"], "no classes in ','"),
        (["--cond", "{tmp}/float_out_of_range.tif"], "float image values must lie in [0, 1]"),
    ],
)
def test_bad_inputs_give_clear_errors(tiny_run, tmp_path, capsys, args, message):
    Image.new("RGB", (12, 12)).save(tmp_path / "wrong_size.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "c8.png")
    Image.new("F", (8, 8), 3.5).save(tmp_path / "float_out_of_range.tif")
    (tmp_path / "not_an_image.png").write_bytes(b"hello")
    args = [a.format(tmp=tmp_path) for a in args]
    assert S.main(["--ckpt", str(tiny_run), "--out", str(tmp_path / "x.png"), "--steps", "1", "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_one_error_line(tiny_run, tmp_path, capsys):
    for main in (S.main, E.main):
        assert main(["--ckpt", str(tiny_run), "--out", str(tmp_path / "x.json"), "--device", "cuda", "--steps", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --device cuda: this machine has no usable CUDA device") and err.count("\n") == 1


def test_unwritable_output_fails_before_sampling(tiny_run, capsys, monkeypatch):
    called = []
    monkeypatch.setattr(S, "generate", lambda *a, **k: called.append(1))
    assert S.main(["--ckpt", str(tiny_run), "--out", "/proc/x/out.png", "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the folder of --out /proc/x is not writable") and err.count("\n") == 1
    assert not called


def test_evaluate_refuses_nonsense_numbers_and_unwritable_output(tiny_run, capsys):
    for args, message in ((["--max-images", "0"], "--max-images must be >= 1, got 0"),
                          (["--n-per-class", "0"], "--n-per-class must be >= 1"),
                          (["--cfg", "nan"], "--cfg (guidance scale) must be a finite number"),
                          (["--out", "/proc/x/e.json"], "the folder of --out /proc/x is not writable"),
                          (["--device", "gpu0"], "--device 'gpu0' is not a device"),
                          (["--res-px", "-8"], "--res-px wants positive image sizes"),
                          (["--res-px", "16", "--featnet", "none"], "the resolution study needs the feature network"),
                          (["--res-px", "7", "--metrics", "res"], "not a multiple of the model's patch_size")):
        assert E.main(["--ckpt", str(tiny_run), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and err.count("\n") == 1, err


def test_wrong_size_condition_can_be_resized(tiny_run, tmp_path):
    Image.new("RGB", (12, 12), (0, 200, 0)).save(tmp_path / "c.png")
    assert S.main(["--ckpt", str(tiny_run), "--out", str(tmp_path / "x.png"), "--steps", "1", "--n", "1",
                   "--cond", str(tmp_path / "c.png"), "--cond-resize", "--no-progress", "--no-singles"]) == 0


def test_missing_or_corrupt_checkpoint(tmp_path, capsys):
    assert S.main(["--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert S.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=str(bad)):
        S.load_model(bad)


def test_condition_on_a_model_without_one(tiny_uncond_run, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "c.png")
    assert S.main(["--ckpt", str(tiny_uncond_run), "--out", str(tmp_path / "x.png"), "--cond", str(tmp_path / "c.png"),
                   "--steps", "1"]) == 2
    assert "takes no condition image" in capsys.readouterr().err
    assert S.main(["--ckpt", str(tiny_uncond_run), "--out", str(tmp_path / "x.png"), "--steps", "1", "--n", "1",
                   "--no-progress"]) == 0


def test_evaluate_writes_json_metrics(tiny_run, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert E.main(["--ckpt", str(tiny_run), "--out", str(out), "--steps", "2", "--n-per-class", "1", "--n-cond", "3",
                   "--t-grid", "0.2,0.8", "--max-images", "16"]) == 0
    m = json.loads(out.read_text())
    assert m["step"] == 6 and m["vloss"]["t"] == [0.2, 0.8] and len(m["vloss"]["per_t"]) == 2
    assert 0 <= m["class_samples"]["nn_class_acc"] <= 1 and m["cond_samples"]["n"] == 3
    assert "held-out v-loss" in capsys.readouterr().out
    # fixed noise: the v-loss is reproducible
    again = E.evaluate(tiny_run, t_grid=(0.2, 0.8), max_images=16, n_per_class=1, n_cond=1, steps=1, log=lambda *a: None)
    assert again["vloss"]["per_t"] == pytest.approx(m["vloss"]["per_t"], rel=1e-6)
    assert E.main(["--ckpt", str(tiny_run), "--t-grid", "2"]) == 2


def test_help_texts_explain():
    assert "labelled grid" in S.build_parser().format_help()
    assert "held-out" in E.build_parser().format_help()

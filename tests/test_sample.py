"""The sampling and evaluation CLIs on a tiny checkpoint, and their errors on bad input."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from jitrope import checkpoint as CK
from jitrope import evaluate as E
from jitrope import sample as S
from jitrope import training as TR
from jitrope.checkpoint import CheckpointError
from jitrope.config import ConfigError, load_config
from jitrope.data import to_uint8
from jitrope.diffusion import Diffusion
from jitrope.eval import evaluate as EV
from jitrope.grids import condition_rows
from jitrope.sampling import NonFiniteSamples, generate, generate_sizes

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
BASE = ["model.pos_impl=torch", "train.progress=false", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny_run")
    TR.train(
        load_config(
            TINY, BASE + [f"train.out_dir={run}", "train.steps=6", "train.ckpt_every=6", "train.sample_every=6"]
        ),
        log=lambda *a, **k: None,
    )
    assert (run / "samples" / "step_00000006.png").is_file()  # the periodic grid
    return run


@pytest.fixture(scope="module")
def tiny_uncond_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny_uncond")
    TR.train(
        load_config(
            TINY, BASE + [f"train.out_dir={run}", "train.steps=2", "model.cond_img_size=null", "data.cond=none"]
        ),
        log=lambda *a, **k: None,
    )
    return run


def test_class_grid_and_single_images(tiny_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = S.main(
        [
            "--ckpt",
            str(tiny_run),
            "--out",
            str(out),
            "--classes",
            "disc,3,null",
            "--n",
            "3",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--no-progress",
        ]
    )
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
    assert (
        S.main(
            [
                "--ckpt",
                str(tiny_run),
                "--out",
                str(out),
                "--cond",
                str(folder),
                "--classes",
                "square",
                "--n",
                "2",
                "--steps",
                "2",
                "--sampler",
                "euler",
                "--cfg",
                "3",
                "--cfg-interval",
                "0.2,0.8",
                "--ema",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert Image.open(out).size[1] == 2 * 66 + 2  # a row per condition image: [condition | 2 samples]
    assert len(list((tmp_path / "cond").iterdir())) == 4


def test_condition_rows_show_each_condition_at_the_sample_size_before_its_samples():
    """The one layout of condition rows, used by the trainer's periodic grid and by jitrope.sample."""
    g = torch.Generator().manual_seed(0)
    n, samples = 3, torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    small, large = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    enlarged = small.repeat_interleave(2, -2).repeat_interleave(2, -1)  # nearest-neighbour, 2x
    reduced = large.double().reshape(2, 3, 8, 2, 8, 2).mean((3, 5))  # box filter, 2x
    for conds, shown in ((small, enlarged), (large, reduced)):
        cells = condition_rows(conds, samples, n)
        assert cells.shape == (8, 3, 8, 8)
        for r in range(2):
            torch.testing.assert_close(cells[r * (n + 1)].double(), shown[r].double(), rtol=0, atol=1e-6)
            assert torch.equal(cells[r * (n + 1) + 1 : (r + 1) * (n + 1)], samples[r * n : (r + 1) * n])
    u8 = condition_rows(small, to_uint8(samples), n)  # uint8 samples: the condition converted alike
    assert u8.dtype == torch.uint8 and torch.equal(u8[0], to_uint8(enlarged[0]))
    assert torch.equal(u8[1:4], to_uint8(samples[:3]))
    with pytest.raises(ValueError, match="5 samples for 2 conditions of 3 each"):
        condition_rows(small, samples[:5], n)


def test_samples_do_not_depend_on_the_batch_size(tiny_run):
    model, cfg, info = CK.load_model(tiny_run, ema="0")
    assert info["step"] == 6 and info["class_names"][0] == "disc"
    d = Diffusion.from_config(cfg.diffusion)
    y = torch.tensor([0, 1, 2])
    a = generate(model, d, y, steps=2, cfg=2.0, seed=5, batch_size=3)
    b = generate(model, d, y, steps=2, cfg=2.0, seed=5, batch_size=1)
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
        (["--img-size", "18"], "--img-size (sample.img_size): 18 is not a multiple of the patch size 4"),
        (["--ema", "7"], "--ema (sample.ema) must be 'none' or an index into train.ema_decays (0..1), got '7'"),
        (["--steps", "0"], "--steps (sample.steps) must be >= 1, got 0"),
        (["--n", "0"], "--n (sample.n) must be >= 1, got 0"),
        (["--cfg", "-3"], "--cfg (sample.cfg) (guidance scale) must be a finite number >= 0, got -3.0"),
        (["--cfg", "nan"], "--cfg (sample.cfg) (guidance scale) must be a finite number >= 0, got nan"),
        (["--img-size", "0"], "--img-size (sample.img_size) must be >= 1, got 0"),
        (["--img-size", "-4"], "--img-size (sample.img_size) must be >= 1, got -4"),
        (["--scale", "0"], "--scale (sample.scale) must be >= 1"),
        (["--device", "gpu0"], "--device (sample.device): 'gpu0' is not a device"),
        (["sample.n=0"], "config key sample.n must be >= 1, got 0"),  # an override, not a flag: the key alone
        (["sample.stpes=3"], "unknown config key(s): sample.stpes (did you mean sample.steps?)"),
        (["--cfg-interval", "0.9,0.1"], "--cfg-interval (sample.cfg_interval) must be [lo, hi]"),
        (["--out", "{tmp}/grid.xyz"], "--out (sample.out): grid.xyz: '.xyz' is not an image format"),
        (["--out", "{tmp}/grid"], "--out (sample.out): grid: the name has no image extension"),
        (["--out", "{tmp}/a_folder.png"], "--out (sample.out): {tmp}/a_folder.png is a folder"),
        (["--out", "{tmp}/singles_file.png"], "the single images go to {tmp}/singles_file, which is a file"),
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
    (tmp_path / "a_folder.png").mkdir()
    (tmp_path / "singles_file").write_text("mine")
    args = [a.format(tmp=tmp_path) for a in args]
    base = ["--ckpt", str(tiny_run), "--out", str(tmp_path / "x.png"), "--steps", "1", "--no-progress"]
    assert S.main([*base, *args]) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists() and (tmp_path / "singles_file").read_text() == "mine"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_one_error_line(tiny_run, tmp_path, capsys):
    for main in (S.main, E.main):
        assert main(["--ckpt", str(tiny_run), "--out", str(tmp_path / "x.json"), "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --device (") and err.count("\n") == 1
        assert "device): cuda: this machine has no usable CUDA device; use cpu or auto" in err


def test_unwritable_output_fails_before_sampling(tiny_run, capsys, monkeypatch):
    called = []
    monkeypatch.setattr(S, "generate", lambda *a, **k: called.append(1))
    assert S.main(["--ckpt", str(tiny_run), "--out", "/proc/x/out.png", "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the folder of --out (sample.out) /proc/x is not writable") and err.count("\n") == 1
    assert not called


def test_evaluate_refuses_nonsense_numbers_and_unwritable_output(tiny_run, capsys):
    for args, message in (
        (["--max-images", "0"], "--max-images (eval.max_images) must be >= 1, got 0"),
        (["--n-per-class", "0"], "--n-per-class (eval.n_per_class) must be >= 1"),
        (["--cfg", "nan"], "--cfg (sample.cfg) (guidance scale) must be a finite number"),
        (["--out", "/proc/x/e.json"], "the folder of --out (eval.out) /proc/x is not writable"),
        (["--device", "gpu0"], "--device (eval.device): 'gpu0' is not a device"),
        (["--res-px", "-8"], "--res-px (eval.res_px) wants positive image sizes"),
        (["--res-px", "16", "--featnet", "none"], "the resolution study needs the feature network"),
        (["--res-px", "7", "--metrics", "res"], "not a multiple of the model's patch_size"),
        (["--res-hw", "8x7", "--metrics", "res"], "--res-hw (eval.res_hw): [(8, 7)] not a multiple"),
        (["--res-hw", "8by16"], "--res-hw (eval.res_hw) wants sizes HxW"),
        (["--res-scalings", "pi"], "--res-scalings (eval.res_scalings) wants a subset of"),
        (["--t-grid", "0.5,1"], "--t-grid (eval.t_grid) wants values in [0, 1), got [0.5, 1.0]"),
        (["eval.max_images=0"], "config key eval.max_images must be >= 1, got 0"),
        (["eval.metircs=[vloss]"], "eval.metircs (did you mean eval.metrics?)"),
        (["--featnet", "/nope.safetensors"], "--featnet (eval.featnet): no feature network file"),
        (["--grids", "/proc/x/grids"], "--grids (eval.grids) /proc/x/grids is not writable"),
    ):
        assert E.main(["--ckpt", str(tiny_run), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and err.count("\n") == 1, err


def test_wrong_size_condition_can_be_resized(tiny_run, tmp_path):
    Image.new("RGB", (12, 12), (0, 200, 0)).save(tmp_path / "c.png")
    assert (
        S.main(
            [
                "--ckpt",
                str(tiny_run),
                "--out",
                str(tmp_path / "x.png"),
                "--steps",
                "1",
                "--n",
                "1",
                "--cond",
                str(tmp_path / "c.png"),
                "--cond-resize",
                "--no-progress",
                "--no-singles",
            ]
        )
        == 0
    )


def test_missing_or_corrupt_checkpoint(tmp_path, capsys):
    assert S.main(["--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert S.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=str(bad)):
        CK.load_model(bad)


def test_condition_on_a_model_without_one(tiny_uncond_run, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "c.png")
    assert (
        S.main(
            [
                "--ckpt",
                str(tiny_uncond_run),
                "--out",
                str(tmp_path / "x.png"),
                "--cond",
                str(tmp_path / "c.png"),
                "--steps",
                "1",
            ]
        )
        == 2
    )
    assert "takes no condition image" in capsys.readouterr().err
    assert (
        S.main(
            [
                "--ckpt",
                str(tiny_uncond_run),
                "--out",
                str(tmp_path / "x.png"),
                "--steps",
                "1",
                "--n",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )


def test_evaluate_writes_json_metrics(tiny_run, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert (
        E.main(
            [
                "--ckpt",
                str(tiny_run),
                "--out",
                str(out),
                "--steps",
                "2",
                "--n-per-class",
                "1",
                "--n-cond",
                "3",
                "--t-grid",
                "0.2,0.8",
                "--max-images",
                "16",
            ]
        )
        == 0
    )
    m = json.loads(out.read_text())
    assert m["step"] == 6 and m["vloss"]["t"] == [0.2, 0.8] and len(m["vloss"]["per_t"]) == 2
    assert 0 <= m["class_samples"]["nn_class_acc"] <= 1 and m["cond_samples"]["n"] == 3
    assert "held-out v-loss" in capsys.readouterr().out
    # fixed noise: the v-loss is reproducible
    again = EV.evaluate(
        tiny_run,
        overrides=[
            "eval.t_grid=[0.2,0.8]",
            "eval.max_images=16",
            "eval.n_per_class=1",
            "eval.n_cond=1",
            "sample.steps=1",
        ],
        log=lambda *a: None,
    )
    assert again["vloss"]["per_t"] == pytest.approx(m["vloss"]["per_t"], rel=1e-6)
    assert E.main(["--ckpt", str(tiny_run), "--t-grid", "2"]) == 2


def test_help_texts_explain():
    assert "labelled grid" in S.build_parser().format_help()
    assert "held-out" in E.build_parser().format_help()


def test_evaluate_checks_its_output_before_any_metric(tiny_run, tmp_path, capsys, monkeypatch):
    called = []
    monkeypatch.setattr(E, "evaluate_weights", lambda *a, **k: called.append(1))
    (tmp_path / "taken.json").mkdir()
    for out in (tmp_path, tmp_path / "taken.json"):
        assert E.main(["--ckpt", str(tiny_run), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: --out (eval.out): {out} is a folder; give the path of a file in it\n"
    assert E.main(["--ckpt", str(tiny_run), "--fid-inception", str(tmp_path / "nope.pth")]) == 2
    assert "--fid-inception (eval.fid_inception): no Inception weights file" in capsys.readouterr().err
    assert E.main(["--ckpt", str(tiny_run), "--metrics", "vloss,fid"]) == 2
    assert "--metrics (eval.metrics) wants a subset of ['vloss', 'class', 'cond', 'res']" in capsys.readouterr().err
    assert not called


def test_evaluate_refuses_a_hand_built_resolution_study_without_featnet_before_any_metric(tiny_run, monkeypatch):
    w = CK.load_checkpoint(tiny_run)
    cfg = CK.run_config(w, overrides=["eval.res_px=[16]", "eval.metrics=[vloss,res]"])
    cfg.eval.featnet = "none"  # set after the config's own checks, as a caller of evaluate(cfg=...) may

    def no_work(*a, **k):
        raise AssertionError("a metric ran before the check")

    monkeypatch.setattr(EV, "heldout_vloss", no_work)
    with pytest.raises(ConfigError, match="eval.res_px: the resolution study needs the feature network"):
        EV.evaluate(tiny_run, cfg)


def test_settings_come_from_the_run_then_the_file_then_overrides_then_flags(tiny_run, tmp_path, monkeypatch):
    seen = {}

    def fake_generate(model, diffusion, labels, cond, **kw):
        seen.update(kw, n=len(labels))
        return torch.zeros(len(labels), 3, kw["img_size"], kw["img_size"])

    monkeypatch.setattr(S, "generate", fake_generate)
    (tmp_path / "s.yaml").write_text("sample:\n  steps: 7\n  n: 2\n  sampler: euler\n  singles: false\n  seed: 3\n")
    base = [
        "--ckpt",
        str(tiny_run),
        "--out",
        str(tmp_path / "g.png"),
        "--config",
        str(tmp_path / "s.yaml"),
        "--classes",
        "0",
        "--no-progress",
    ]
    assert S.main(base) == 0
    # the file over the run's sample.* (tiny_cpu: 4 steps, heun); cfg from the run
    assert (seen["steps"], seen["sampler"], seen["seed"], seen["n"], seen["cfg"]) == (7, "euler", 3, 2, 2.0)
    assert not (tmp_path / "g").exists()
    assert S.main([*base, "sample.steps=5", "sample.cfg=1.5", "--seed", "9"]) == 0
    assert (seen["steps"], seen["cfg"], seen["seed"]) == (5, 1.5, 9)
    assert S.main([*base, "sample.steps=5", "--steps", "6"]) == 0  # a flag wins over an override of its key
    assert seen["steps"] == 6


def test_evaluate_reads_the_eval_section_and_flags(tiny_run, tmp_path, monkeypatch):
    got = {}
    monkeypatch.setattr(
        E, "evaluate_weights", lambda w, cfg, device, **k: got.update(cfg=cfg, device=device) or {"step": 6}
    )
    (tmp_path / "e.yaml").write_text("eval:\n  metrics: [vloss]\n  t_grid: [0.3]\n  max_images: 5\n")
    out = tmp_path / "m.json"
    assert (
        E.main(
            [
                "--ckpt",
                str(tiny_run),
                "--config",
                str(tmp_path / "e.yaml"),
                "--out",
                str(out),
                "--steps",
                "2",
                "eval.seed=4",
                "--data",
                str(tmp_path),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    cfg = got["cfg"]
    assert cfg.eval.metrics == ("vloss",) and cfg.eval.t_grid == (0.3,) and cfg.eval.max_images == 5
    assert cfg.eval.seed == 4 and cfg.sample.steps == 2 and cfg.eval.out == str(out)
    assert cfg.data.name == "folder" and cfg.data.root == str(tmp_path) and got["device"] == torch.device("cpu")
    assert E.main(["--ckpt", str(tiny_run), "--out", str(out), "--data", "emoji"]) == 0
    assert got["cfg"].data.name == "emoji" and got["cfg"].eval.metrics == ("vloss", "class", "cond", "res")


def test_sampler_names_live_in_one_registry():
    from jitrope import config as C
    from jitrope.diffusion import SAMPLERS

    assert C._CHOICES["sample", "sampler"] == tuple(SAMPLERS) == ("heun", "euler")
    for parser in (S.build_parser(), E.build_parser()):
        action = next(a for a in parser._actions if a.dest == "sample.sampler")
        assert tuple(action.choices) == tuple(SAMPLERS)


def test_no_private_name_is_imported_across_modules():
    import ast

    pkg = ROOT / "python" / "jitrope"
    bad = []
    for f in sorted(pkg.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("jitrope")):
                names = [a.name for a in node.names if a.name.startswith("_") and a.name != "_C"]
                bad += [f"{f.relative_to(pkg)}: {n}" for n in names]
    assert not bad


def test_allow_unverified_reaches_the_checkpoint_loader(tiny_run, tmp_path, monkeypatch, capsys):
    import shutil

    step = next((tiny_run / "checkpoints").iterdir())
    bare = tmp_path / "step_00000006"
    shutil.copytree(step, bare)
    (bare / "manifest.json").unlink()  # nothing to verify its files by
    out = tmp_path / "g.png"
    assert (
        S.main(
            [
                "--ckpt",
                str(bare),
                "--out",
                str(out),
                "--steps",
                "1",
                "--n",
                "1",
                "--classes",
                "0",
                "--no-progress",
                "--no-singles",
                "--allow-unverified",
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert out.is_file()
    seen = []
    real_resolve, real_load = CK.resolve_checkpoint, CK.load_weights

    def resolve(path, allow_unverified=False):
        seen.append(("resolve", allow_unverified))
        return real_resolve(path, allow_unverified=allow_unverified)

    def load(path, allow_unverified=False):  # it resolves the path too, through the spy above
        seen.append(("load", allow_unverified))
        return real_load(path, allow_unverified=allow_unverified)

    monkeypatch.setattr(CK, "resolve_checkpoint", resolve)
    monkeypatch.setattr(CK, "load_weights", load)
    monkeypatch.setattr(E, "evaluate_weights", lambda *a, **k: {"step": 6})
    for main, args in (
        (S.main, ["--steps", "1", "--n", "1", "--classes", "0", "--no-progress", "--no-singles"]),
        (E.main, []),
    ):
        seen.clear()
        assert main(["--ckpt", str(tiny_run), "--out", str(tmp_path / "x.png"), *args, "--allow-unverified"]) == 0
        assert {what for what, _ in seen} == {"resolve", "load"} and all(flag for _, flag in seen), seen
        seen.clear()
        assert main(["--ckpt", str(tiny_run), "--out", str(tmp_path / "x.png"), *args]) == 0
        assert {what for what, _ in seen} == {"resolve", "load"} and not any(flag for _, flag in seen), seen


def _scaled_checkpoint(run: Path, dest: Path, factor: float) -> Path:
    """A copy of ``run``'s newest checkpoint with every weight times ``factor`` (a verified manifest):
    what a diverged run writes when its weights are huge but finite."""
    w = CK.load_checkpoint(run)
    big = [{k: v * factor if v.is_floating_point() else v for k, v in sd.items()} for sd in [w["model"], *w["emas"]]]
    kw = dict(ema_decays=w["ema_decays"], config=w["config"], class_names=w["class_names"])
    return CK.save_checkpoint(dest, w["step"], model=big[0], emas=big[1:], model_config=w["model_config"], **kw)


def test_weights_whose_forward_is_not_finite_are_refused_on_load(tiny_run, tmp_path, capsys):
    ck = _scaled_checkpoint(tiny_run, tmp_path / "big", 1e30)
    out = tmp_path / "x.png"
    assert S.main(["--ckpt", str(tmp_path / "big"), "--out", str(out)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: {ck / 'weights.safetensors'} [ema0]: these weights give a probe loss of ")
    assert line.endswith("load an earlier checkpoint (a checkpoints/step_* folder) or other weights (sample.ema)")
    assert not out.exists()
    assert E.main(["--ckpt", str(ck), "--out", str(tmp_path / "e.json"), "--metrics", "vloss"]) == 2
    assert "[ema0]: these weights give a probe loss of " in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


def test_samples_that_come_out_non_finite_are_an_error_never_a_black_image(tiny_run, tmp_path, capsys, monkeypatch):
    model, cfg, _ = CK.load_model(tiny_run)
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteSamples, match=r"nan or inf values \(image 0 and 1 more of 4\): "):
        generate(model, Diffusion(), torch.arange(4), None, steps=2, batch_size=2)
    with pytest.raises(NonFiniteSamples, match=r"nan or inf values \(image 0 and 1 more of 2\): "):
        generate_sizes(model, Diffusion(), torch.arange(2), [(16, 16), (8, 16)], steps=2)
    # past the load check (a probe it passes), the sampling itself refuses to write them
    _scaled_checkpoint(tiny_run, tmp_path / "nan", float("nan"))
    monkeypatch.setattr(CK, "probe_loss", lambda *a, **k: 0.0)
    out = tmp_path / "x.png"
    assert S.main(["--ckpt", str(tmp_path / "nan"), "--out", str(out), "--steps", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: sampling gave nan or inf values (image 0 and ")
    assert not out.exists() and not (tmp_path / "x").exists()


def test_sampled_sizes_are_checked_before_anything_is_allocated(tiny_run, tmp_path, capsys):
    """--sizes 16x16,100000x100000 used to build the packed batch and die in the allocator."""
    out = str(tmp_path / "x.png")
    for args, line in [
        (
            ["--sizes", "16x16,100000x100000"],
            "error: --sizes (sample.sizes): 100000x100000 takes 625000000 image tokens at patch 4, over the "
            "sampler's limit sample.max_tokens=262144",
        ),
        (["--sizes", "0x8,16x16"], "error: --sizes (sample.sizes): '0x8' must have a positive height and width"),
        (["--sizes", "16x16,16x16"], "error: --sizes (sample.sizes) gives 16x16 2 times; give each size once"),
        (
            ["--sizes", "16x16,32x32", "--max-tokens", "1000", "--n", "4"],
            "error: --sizes (sample.sizes): 9 classes x 2 sizes x 4 samples take 2880 image tokens in one packed "
            "batch, over the sampler's limit --max-tokens (sample.max_tokens)=1000; sample fewer classes, sizes or "
            "samples (--n (sample.n)), or raise sample.max_tokens",
        ),
        (
            ["--img-size", "100000"],
            "error: --img-size (sample.img_size): a batch of 64 images of 100000x100000 takes 40000000000 image "
            "tokens, over the sampler's limit sample.max_tokens=262144; lower sample.batch_size, or raise "
            "sample.max_tokens",
        ),
    ]:
        assert S.main(["--ckpt", str(tiny_run), "--out", out, *args]) == 2
        assert capsys.readouterr().err == line + "\n"
    assert not Path(out).exists()


def test_a_published_checkpoint_given_to_ckpt_points_to_the_converter(tmp_path, capsys):
    from safetensors.torch import save_file

    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "checkpoint-last.pth")
    save_file({"w": torch.ones(2)}, str(tmp_path / "state_dict.safetensors"))
    for name in ("checkpoint-last.pth", "state_dict.safetensors"):
        f = tmp_path / name
        hint = (
            f"error: {f} is not a jitrope checkpoint; to use a published JiT checkpoint, convert it first: "
            f"jitrope-convert {f} --preset JiT-B/16 (its model) --out <folder>, then give --ckpt that folder\n"
        )
        assert S.main(["--ckpt", str(f), "--out", str(tmp_path / "x.png")]) == 2
        assert capsys.readouterr().err == hint  # not --allow-unverified, which would not help
        assert E.main(["--ckpt", str(f), "--out", str(tmp_path / "x.json")]) == 2
        assert capsys.readouterr().err == hint

"""scripts/ablate_posenc.py on a 2-step budget: the GPU (--scale seed) script run at a tiny scale on
the CPU through every stage (train, eval with FD-emoji / class accuracy / PSNR / resolution study,
report with tables, plots and sample grids); a second call resumes everything instead of
training or evaluating again; the seed config is the problem statement's 256 -> 320 tokens;
bad arguments are refused."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")


def _load():
    spec = importlib.util.spec_from_file_location("ablate_posenc", ROOT / "scripts" / "ablate_posenc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_seed_scale_script_on_a_tiny_budget_reports_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("JITROPE_DATA", str(tmp_path / "cache"))  # the feature network of the synthetic data goes here
    ab = _load()
    out = tmp_path / "page" / "results.md"
    argv = ["--scale", "seed", "--config", TINY, "--device", "cpu", "--steps", "2", "--ckpt-every", "1",
            "--log-every", "1", "--encodings", "learned1d,rope2d", "--seeds", "0", "--jobs", "2",
            "--out-dir", str(tmp_path / "runs"), "--report", str(out), "--n-per-class", "2", "--n-cond", "2",
            "--max-images", "8", "--sample-steps", "2", "--res-px", "8,24", "--res-n-per-class", "1",
            "--step-n-per-class", "2"]
    assert ab.main(argv) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    rows = res["runs"]
    assert [r["pos_embed"] for r in rows] == ["learned1d", "rope2d"]
    for r in rows:
        assert r["step"] == 2 and r["vloss"]["mean"] > 0 and r["params"] > 0 and r["step_ms"] > 0
        assert r["class_samples"]["fd_emoji"] > 0 and 0 <= r["class_samples"]["class_acc"] <= 1
        assert r["cond_samples"]["psnr"] > 0 and -1 <= r["cond_samples"]["ssim"] <= 1
        assert r["fd_vs_step"]["steps"] == [1, 2] and r["loss_curve"]["steps"] == [1, 2]
        done = {(x["px"], x["scaling"]) for x in r["resolution"] if "fd_emoji" in x}
        want = {(8, "interpolate"), (24, "interpolate")} | (set() if r["pos_embed"] == "learned1d" else {(8, "extrapolate"), (24, "extrapolate")})
        assert done == want
    # The encodings really differ: same seed and data, different held-out losses.
    assert rows[0]["vloss"]["mean"] != rows[1]["vloss"]["mean"]
    assert res["fd_sanity"]["identical (training split vs itself)"] == pytest.approx(0, abs=1e-6)
    page = out.read_text()
    for want in ("| `learned1d` |", "| `rope2d` |", "± ", "## Other resolutions", "## Sanity checks of FD-emoji",
                 "## Conclusion", "the GPU run is still owed", "python scripts/ablate_posenc.py --scale seed"):
        assert want in page
    for name in ("loss", "bars", "fd_steps", "resolution", "samples"):
        assert (out.parent / f"results_{name}.png").stat().st_size > 1000
        assert f"results_{name}.png" in page
    # Second call: every run has its step-2 checkpoint and evaluations, so nothing is trained or evaluated again.
    logs = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.log")}
    assert ab.main(argv) == 0
    assert {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.log")} == logs


def test_seed_scale_is_the_problem_statements_setting():
    ab = _load()
    args = ab.parse_args(["--scale", "seed"])
    assert args.seed_list == [0, 1, 2] and args.device == "cuda" and args.res_list == [48, 80, 96]
    from jitrope.config import load_config
    from jitrope.model import JiT

    mc = load_config(args.config).model_config()
    assert (mc.img_size, mc.patch_size, mc.cond_img_size) == (64, 4, 32)
    layout = JiT(mc).sequence_layout()
    assert layout.n_image == 256 and layout.n_image + layout.n_cond == 320
    cpu = ab.parse_args([])
    assert cpu.scale == "cpu" and cpu.seed_list == [0, 1] and cpu.res_list == [24, 40, 48]


@pytest.mark.parametrize("argv, message", [
    (["--encodings", "rope3d"], "--encodings: unknown ['rope3d']"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--seeds", "0,0"], "--seeds: give distinct integers"),
    (["--res-px", "a"], "want comma-separated integers"),
    (["model.pos_embed=rope2d"], "the ablation sets model.pos_embed itself"),
    (["train.seed=3"], "the ablation sets train.seed itself"),
    (["train.lr"], "is not dotted.key=value"),
])
def test_bad_arguments_are_refused_with_a_message(argv, message, capsys):
    ab = _load()
    with pytest.raises(SystemExit) as e:
        ab.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err

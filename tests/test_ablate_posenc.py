"""scripts/ablate_posenc.py, the whole pipeline at a tiny scale: the issue-17 study design (--scale study)
on the tiny config, 2 steps, through every stage (train with metrics.jsonl, the main evaluation,
FD-emoji vs step, the every-size study at square and non-square sizes under every scaling mode, the
report with tables, plots, sample grids and the answer); a second call resumes everything instead of
training or evaluating again; a regime whose overrides do not fit the config is refused with one line naming them;
the existing results JSON still makes a page; the presets are the issue's and the problem statement's
settings; bad arguments are refused."""

import importlib.util
import json
from pathlib import Path

import pytest

from jitrope.eval.report import README_BEGIN, README_END

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")


def _load():
    spec = importlib.util.spec_from_file_location("ablate_posenc", ROOT / "scripts" / "ablate_posenc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_study_pipeline_on_a_tiny_budget_reports_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JITROPE_DATA", str(tmp_path / "cache"))  # the feature network of the synthetic data goes here
    ab = _load()
    out = tmp_path / "page" / "results.md"
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{README_BEGIN}\nold answer\n{README_END}\n\nafter\n")
    regimes = "single,mixed"
    argv = [
        "--scale",
        "study",
        "--config",
        TINY,
        "--device",
        "cpu",
        "--steps",
        "2",
        "--ckpt-every",
        "1",
        "--log-every",
        "1",
        "--encodings",
        "learned1d,rope2d",
        "--seeds",
        "0,1",
        "--res-seeds",
        "0",
        "--jobs",
        "2",
        "--out-dir",
        str(tmp_path / "runs"),
        "--report",
        str(out),
        "--readme",
        str(readme),
        "--n-per-class",
        "1",
        "--n-cond",
        "2",
        "--max-images",
        "8",
        "--res-max-images",
        "4",
        "--sample-steps",
        "1",
        "--t-grid",
        "0.3,0.7",
        "--res-px",
        "8,16,24",
        "--res-hw",
        "8x16,24x16",
        "--res-n-per-class",
        "1",
        "--step-n-per-class",
        "1",
        "--step-seeds",
        "0",
        "--regimes",
        regimes,
    ]
    assert ab.main(argv) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    rows = res["runs"]
    main = [r for r in rows if r["regime"] == "single"]
    assert [(r["pos_embed"], r["seed"]) for r in main] == [
        ("learned1d", 0),
        ("rope2d", 0),
        ("learned1d", 1),
        ("rope2d", 1),
    ]
    for r in main:
        assert r["step"] == 2 and r["vloss"]["mean"] > 0 and r["params"] > 0
        assert r["step_ms"] > 0 and r["cpu_ms"] > 0 and r["train_wall_s"] > 0  # from metrics.jsonl
        assert r["class_samples"]["fd_emoji"] > 0 and 0 <= r["class_samples"]["class_acc"] <= 1
        assert r["cond_samples"]["psnr"] > 0 and -1 <= r["cond_samples"]["ssim"] <= 1
        assert r["fd_vs_step"]["steps"] == ([1, 2] if r["seed"] == 0 else []) and r["loss_curve"]["steps"] == [1, 2]
        assert (Path(r["run"]) / "metrics.jsonl").is_file()
    for r in rows:
        if r["seed"] == 1:  # the every-size study runs for --res-seeds only
            assert "resolution" not in r
            continue
        sizes = {tuple(x["hw"]) for x in r["resolution"]}
        assert sizes == {(8, 8), (16, 16), (24, 24), (8, 16), (24, 16)}
        done = {(tuple(x["hw"]), x["scaling"]) for x in r["resolution"] if "fd_emoji" in x}
        if r["pos_embed"] == "learned1d":  # no extrapolation; ntk / yarn interpolate its table
            assert done == {(hw, m) for hw in sizes for m in ("interpolate", "ntk", "yarn")}
        else:
            assert done == {(hw, m) for hw in sizes for m in ("extrapolate", "interpolate", "ntk", "yarn")}
        assert all(x["vloss"] > 0 for x in r["resolution"] if "fd_emoji" in x)
        grids = Path(r["grids"])
        assert (grids / "px24_interpolate.png").is_file() and (grids / "px24x16_interpolate.png").is_file()
    # The encodings really differ: same seed and data, different held-out losses.
    assert main[0]["vloss"]["mean"] != main[1]["vloss"]["mean"]
    assert res["fd_sanity"]["identical (training split vs itself)"] == pytest.approx(0, abs=1e-6)
    page = out.read_text()
    for want in (
        "| `learned1d` |",
        "| `rope2d` |",
        "± ",
        "## Sanity checks of FD-emoji",
        "## FD-emoji as training goes on",
        "## Every size: one model for many image sizes",
        "| 8x16 |",
        "24x16",
        "(`learned1d` trains it with model.pos_scaling=interpolate)",
        "### v-loss / oracle",
        "`sincos2d` (300 steps, 2 seeds)",
        "`rope2d_mixed` (300 steps, 2 seeds)",
        "## Conclusion",
        "### Answer",
        "For one model across sizes",
        "the GPU run is still owed",
        "python scripts/ablate_posenc.py --scale study",
    ):
        assert want in page, want
    # The README's answer: the page's answer sentences, the main metrics with spreads, the limits and a link.
    text = readme.read_text()
    assert text.startswith("# title\n\n" + README_BEGIN) and text.endswith(README_END + "\n\nafter\n")
    assert "old answer" not in text and "](page/results.md)" in text
    answer = page.split("### Answer\n\n", 1)[1].split("\n", 1)[0]
    assert answer in text and "For one model across sizes" in text
    assert "| `rope2d` |" in text and "± " in text and "the GPU run is still owed" in text
    for name in (
        "loss",
        "bars",
        "fd_steps",
        "size_fd_emoji",
        "size_class_acc",
        "size_vloss",
        "size_vloss_ratio",
        "size_samples",
    ):
        assert (out.parent / f"results_{name}.png").stat().st_size > 1000
        assert f"results_{name}.png" in page
    # Second call: every run has its step-2 checkpoint and evaluations, so nothing is trained or evaluated again.
    logs = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.log")}
    assert ab.main(argv) == 0
    assert {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.log")} == logs
    # --plan reads what the runs trained from their metrics.jsonl
    capsys.readouterr()
    assert ab.main(argv + ["--plan"]) == 0
    out = capsys.readouterr().out
    assert f"progress in {tmp_path / 'runs'}: 6 of 6 runs trained, 0 partial; training is done" in out


def test_a_regime_that_does_not_fit_the_config_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    ab = _load()
    monkeypatch.setitem(ab.REGIMES["mixed"], "overrides", ["data.sizes={sizes}"])  # no tokens_per_batch
    argv = ["--scale", "study", "--config", TINY, "--out-dir", str(tmp_path / "runs"), "--stage", "train"]
    assert ab.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --regimes: the mixed regime") and err.count("\n") == 1
    assert "data.sizes" in err and "train.tokens_per_batch" in err and "--regimes single" in err
    assert not (tmp_path / "runs").exists()  # refused before any work


@pytest.mark.parametrize("text", [None, "# no markers\n"])
def test_a_readme_without_the_answer_markers_is_refused_before_any_work(tmp_path, capsys, text):
    ab = _load()
    readme = tmp_path / "README.md"
    if text is not None:
        readme.write_text(text)
    argv = ["--config", TINY, "--out-dir", str(tmp_path / "runs"), "--readme", str(readme)]
    with pytest.raises(SystemExit) as e:
        ab.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --readme {readme}" in err and README_END in err
    assert not (tmp_path / "runs").exists()
    if text is not None:
        assert readme.read_text() == text


def test_the_existing_results_json_still_makes_the_page(tmp_path):
    """docs/results.json through the report alone: every number of its tables is there, and the answer is the
    page's (the JSON names its study's scale, so no --scale is needed)."""
    ab = _load()
    out = tmp_path / "p.md"
    assert (
        ab.main(
            [
                "--stage",
                "report",
                "--from-json",
                str(ROOT / "docs" / "results.json"),
                "--report",
                str(out),
                "--out-dir",
                str(tmp_path / "runs"),
            ]
        )
        == 0
    )
    page = out.read_text()
    old = (ROOT / "docs" / "results.md").read_text()
    for row in [line for line in old.splitlines() if line.startswith("| `")][:6]:  # the main table's rows
        cells = row.split(" | ")[:8]  # name and quality metrics (step times gained a CPU column since)
        assert " | ".join(cells) in page, row
    assert "sincos2d+rope2d | single | ntk" in page and "## Every size" in page
    answer = old.split("### Answer", 1)[1].split("##", 1)[0]
    assert answer.strip() and answer in page
    for name in ("loss", "bars", "fd_steps", "size_fd_emoji", "size_samples"):
        assert (tmp_path / f"p_{name}.png").is_file()


def test_presets_are_the_issues_and_the_problem_statements_settings(capsys):
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
    assert cpu.scale == "cpu" and cpu.seed_list == [0, 1] and cpu.res_list == [24, 40, 48] and cpu.steps == 300
    study = ab.parse_args(["--scale", "study"])
    assert study.names == ["learned1d", "factorized2d", "rope2d", "sincos2d+rope2d"]
    assert study.seed_list == [0, 1, 2] and study.steps >= 2000 and study.res_seeds_list == [0, 1]
    assert study.res_list == [16, 24, 32, 40, 48] and study.hw_list == [(32, 48), (48, 32)]
    assert study.regime_list == ["single", "mixed"]
    assert study.scaling_list == ["extrapolate", "interpolate", "ntk", "yarn"]
    assert ab.regime_sizes("mixed", 32, 4) == [16, 32, 48] and ab.regime_sizes("single", 32, 4) == [32]
    earlier = json.loads((ROOT / study.earlier).read_text())["runs"]
    assert {r["pos_embed"] for r in earlier} - set(study.names) == {"sincos2d", "rope2d_mixed"}
    assert all(r["step"] == 300 for r in earlier)
    # --plan: the runs and the time estimate, nothing run
    assert ab.main(["--scale", "study", "--plan"]) == 0
    text = capsys.readouterr().out
    assert "20 runs (single: 12, mixed: 8) of 2000 steps" in text and "s/step (measured)" in text and " h" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--encodings", "rope3d"], "--encodings: unknown ['rope3d']"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--seeds", "0,0"], "--seeds: give distinct integers"),
        (["--res-px", "a"], "--res-px wants comma-separated integers, got 'a'"),
        (["--seeds", "0,b"], "--seeds wants comma-separated integers, got '0,b'"),
        (["--step-seeds", "x"], "--step-seeds wants 'all' or comma-separated integers, got 'x'"),
        (["--seeds", "0,1", "--res-seeds", "1,5"], "--res-seeds: [5] not among --seeds [0, 1]"),
        (["--res-hw", "32x"], "--res-hw wants comma-separated sizes HxW"),
        (["--scalings", "ntk,rope"], "--scalings: comma-separated modes of"),
        (["--regimes", "mixed"], "'single' first"),
        (["--regimes", "single,packed"], "--regimes: comma-separated names of"),
        (["--from-json", "x.json"], "use it with --stage report"),
        (["model.pos_embed=rope2d"], "the ablation sets model.pos_embed itself"),
        (["train.seed=3"], "the ablation sets train.seed itself"),
        (["train.lr"], "is not dotted.key=value"),
    ],
)
def test_bad_arguments_are_refused_with_a_message(argv, message, capsys):
    ab = _load()
    with pytest.raises(SystemExit) as e:
        ab.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err

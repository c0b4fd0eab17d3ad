"""studies/posenc/run.py, the study's driver, and its plans: the whole pipeline at a tiny scale (the 32x32
study's design, --scale study, on the tiny config, 2 steps) through every stage (train with metrics.jsonl,
the main evaluation, FD-emoji vs step, the every-size study at square and non-square sizes under every
scaling mode, the report with tables, plots, sample grids, the answer and the README's block); a second call
resumes everything instead of training or evaluating again; a lead plan shows an earlier study's section
from the records its page kept, and the page's JSON alone rebuilds the page; the existing docs/results.json
still makes its page; the plans are the issues' and the problem statement's settings, with the measured step
time --plan prints; a regime whose overrides do not fit the config and bad arguments are refused."""

import ast
import importlib.util
import json
from pathlib import Path

import pytest

from studies.posenc import plan as P
from studies.posenc import report as R

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
OLD_BEGIN = "<!-- answer: written by scripts/ablate_posenc.py --readme (edits here are overwritten) -->"


def _load():
    spec = importlib.util.spec_from_file_location("posenc_run", ROOT / "studies" / "posenc" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY_ARGS = [
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
    "single,mixed",
]


def _check_records(rows):
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
        assert r["cond_samples"]["fd_emoji"] > 0  # FD-emoji with the condition, beside the class samples'
        assert r["fd_vs_step"]["steps"] == ([1, 2] if r["seed"] == 0 else []) and r["loss_curve"]["steps"] == [1, 2]
        assert (Path(r["run"]) / "metrics.jsonl").is_file()
    for r in rows:
        if r["seed"] == 1:  # the every-size study runs for --res-seeds only
            assert "resolution" not in r
            continue
        sizes = {tuple(x["hw"]) for x in r["resolution"]}
        assert sizes == {(8, 8), (16, 16), (24, 24), (8, 16), (24, 16)}
        done = {(tuple(x["hw"]), x["scaling"]) for x in r["resolution"] if "fd_emoji" in x}
        modes = ("interpolate", "ntk", "yarn") if r["pos_embed"] == "learned1d" else SCALINGS  # no extrapolation
        assert done == {(hw, m) for hw in sizes for m in modes}
        assert all(x["vloss"] > 0 for x in r["resolution"] if "fd_emoji" in x)
        grids = Path(r["grids"])
        assert (grids / "px24_interpolate.png").is_file() and (grids / "px24x16_interpolate.png").is_file()
    # The encodings really differ: same seed and data, different held-out losses.
    assert main[0]["vloss"]["mean"] != main[1]["vloss"]["mean"]


SCALINGS = ("extrapolate", "interpolate", "ntk", "yarn")


@pytest.mark.slow  # trains and evaluates every run of a tiny study: minutes
def test_study_pipeline_on_a_tiny_budget_reports_resumes_and_rebuilds(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JITROPE_DATA", str(tmp_path / "cache"))  # the feature network of the synthetic data goes here
    run = _load()
    out = tmp_path / "page" / "results.md"
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{OLD_BEGIN}\nold answer\n{R.README_END}\n\nafter\n")
    argv = ["--scale", "study", *TINY_ARGS, "--out-dir", str(tmp_path / "runs"), "--report", str(out)]
    assert run.main([*argv, "--readme", str(readme)]) == 0
    sections = json.loads(out.with_suffix(".json").read_text())["sections"]
    assert [s["plan"] for s in sections] == ["study"]
    _check_records(sections[0]["runs"])
    assert sections[0]["fd_sanity"]["identical (training split vs itself)"] == pytest.approx(0, abs=1e-6)
    page = out.read_text()
    for want in (
        "## 16x16 at patch 4, 16 -> 20 tokens",
        "| `learned1d` |",
        "| `rope2d` |",
        "± ",
        "pooled sd",
        "### The 16 -> 20 question: with and without the condition image",
        "| held-out v-loss, with (20) | held-out v-loss, without (20) |",  # tiny_cpu: null condition tokens
        "### Where each encoding puts the condition tokens",
        "- `learned1d`: a learned vector per slot: the 4 condition tokens take slots 16..19",
        "### FD-emoji's feature network at 16x16: sanity checks",
        "### FD-emoji as training goes on",
        "### Step time and wall time",
        "Measured before the study: 1.040 CPU-s/step of `configs/emoji32_cpu.yaml`",
        "for `configs/tiny_cpu.yaml`: ",
        "### Every size: one model for many image sizes",
        "| 8x16 |",
        "24x16",
        "(`learned1d` trains it with model.pos_scaling=interpolate)",
        "#### v-loss / oracle",
        "`sincos2d` (300 steps, 2 seeds)",
        "`rope2d_mixed` (300 steps, 2 seeds)",
        "### Answer at 16x16",
        "For one model across sizes",
        "python studies/posenc/run.py --scale seed-cpu` on a CPU",
        "python studies/posenc/run.py --scale study --config",
    ):
        assert want in page, want
    # The README's answer: the page's claims, the main metrics with spreads, the limits and a link; the old
    # script's opening line is replaced by this driver's.
    text = readme.read_text()
    assert text.startswith("# title\n\n" + R.README_BEGIN) and text.endswith(R.README_END + "\n\nafter\n")
    assert "old answer" not in text and "](page/results.md)" in text
    claim = page.split("## Answer\n\n", 1)[1].split("\n\n", 2)[1].split("\n")[0]
    assert claim.startswith("- ") and claim in text and "| `rope2d` |" in text and "± " in text
    for name in ("loss", "bars", "fd_steps", "size_fd_emoji", "size_class_acc", "size_vloss", "size_vloss_ratio"):
        assert (out.parent / f"results_study_{name}.png").stat().st_size > 1000 and f"results_study_{name}.png" in page
    assert "results_study_size_samples.png" in page  # the runs' grids are on disk
    # Second call: every run has its step-2 checkpoint and evaluations, so nothing is trained or evaluated again.
    logs = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.log")}
    assert run.main(argv) == 0
    assert {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.log")} == logs
    # --plan reads what the runs trained from their metrics.jsonl
    capsys.readouterr()
    assert run.main(argv + ["--plan"]) == 0
    assert (
        f"progress in {tmp_path / 'runs'}: 6 of 6 runs trained, 0 partial; training is done" in capsys.readouterr().out
    )
    _lead_plan_shows_the_earlier_section(run, tmp_path, out)


def _lead_plan_shows_the_earlier_section(run, tmp_path, earlier_page):
    """A plan file that starts from the study plan and shows the study's section below its own, from the
    records the first page kept; then the new page's JSON alone rebuilds it."""
    plan = tmp_path / "lead.yaml"
    plan.write_text(
        f"base: {ROOT / 'studies' / 'posenc' / 'plans' / 'study.yaml'}\n"
        f"also_show: [{{plan: study, records: {earlier_page.with_suffix('.json')}}}]\n"
    )
    out = tmp_path / "lead" / "results.md"
    argv = ["--plan-file", str(plan), *TINY_ARGS, "--out-dir", str(tmp_path / "runs"), "--stage", "report"]
    assert run.main([*argv, "--report", str(out)]) == 0
    page = out.read_text()
    sections = json.loads(out.with_suffix(".json").read_text())["sections"]
    assert [s["plan"] for s in sections] == ["lead", "study"]
    assert "- Did the 16x16 answer hold at 16x16? Yes:" in page and "Sections: 16x16 at patch 4" in page
    assert (out.parent / "results_lead_loss.png").is_file() and (out.parent / "results_study_loss.png").is_file()
    rebuilt = tmp_path / "rebuilt" / "results.md"
    assert run.main(["--stage", "report", "--from-json", str(out.with_suffix(".json")), "--report", str(rebuilt)]) == 0
    new, old = (p.read_text().split("\n", 3)[3].split("## Reproduce")[0] for p in (rebuilt, out))
    assert new == old  # all but the command that made it


def _study_records():
    """The 32x32 study's records, from docs/results.json: one study's JSON of older pages, or its section."""
    d = json.loads((ROOT / "docs" / "results.json").read_text())
    if "sections" not in d:
        return d
    s = next(s for s in d["sections"] if s["plan"] == "study")
    return {"runs": s["runs"], "fd_sanity": s["fd_sanity"], "timing": s["timing"], "study": {"scale": "study"}}


def test_the_existing_results_json_still_makes_the_page(tmp_path):
    """docs/results.json through the report alone, and the 32x32 study's records in the one-study JSON of older
    pages (which names its plan, the scale): every number of the main table is there, with the verdicts of the
    pooled rule."""
    run = _load()
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_study_records()))
    for i, src in enumerate((ROOT / "docs" / "results.json", old)):
        out = tmp_path / f"p{i}.md"
        assert run.main(["--stage", "report", "--from-json", str(src), "--report", str(out)]) == 0
        page = out.read_text()
        assert "## 32x32 at patch 4, 64 -> 80 tokens" in page and "The `study` study: 4 encodings x seeds 0/1/2" in page
        want = {"learned1d": "0.3031 ± 0.0099", "factorized2d": "0.2958 ± 0.0090", "rope2d": "0.2615 ± 0.0041"}
        for n, v in want.items():  # held-out v-loss of the 32x32 study, as its page had it
            row = next(line for line in page.split("## 32x32")[1].splitlines() if line.startswith(f"| `{n}` | "))
            assert row.split(" | ")[2] == v
        assert "- held-out v-loss: best `sincos2d+rope2d` (0.2590 ± 0.0098; pooled sd 0.0085, df 8" in page
        assert "sincos2d+rope2d | single | ntk" in page and "### Every size" in page
        for name in ("loss", "bars", "fd_steps", "size_fd_emoji"):
            assert (tmp_path / f"p{i}_study_{name}.png").is_file()


def test_plans_are_the_issues_and_the_problem_statements_settings(capsys):
    run = _load()
    assert P.plan_names() == ["cpu", "seed", "seed-cpu", "study"]
    for name in P.plan_names():
        plan = P.load_plan(P.PLANS / f"{name}.yaml")
        assert (ROOT / plan["config"]).is_file() and "base" not in plan
        st = plan["step_time"]
        assert st["seconds"] is None or (st["seconds"] > 0 and st["measured_by"])  # measured, with its command
    seed = run.parse_args(["--scale", "seed"])
    assert seed.seed_list == [0, 1, 2] and seed.device == "cuda" and seed.res_list == [48, 80, 96]
    from jitrope.config import load_config
    from jitrope.model import JiT

    for args in (seed, run.parse_args(["--scale", "seed-cpu"])):
        mc = load_config(args.config).model_config()
        assert (mc.img_size, mc.patch_size, mc.cond_img_size) == (64, 4, 32)
        layout = JiT(mc).sequence_layout(cond_hw=(32, 32))
        assert layout.n_image == 256 and layout.n_image + layout.n_cond == 320
    cpu = run.parse_args([])
    assert cpu.plan_name == "cpu" and cpu.seed_list == [0, 1] and cpu.res_list == [24, 40, 48] and cpu.steps == 300
    study = run.parse_args(["--scale", "study"])
    assert study.names == ["learned1d", "factorized2d", "rope2d", "sincos2d+rope2d"]
    assert study.seed_list == [0, 1, 2] and study.steps >= 2000 and study.res_seeds_list == [0, 1]
    assert study.res_list == [16, 24, 32, 40, 48] and study.hw_list == [(32, 48), (48, 32)]
    assert study.regime_list == ["single", "mixed"] and study.scaling_list == list(SCALINGS)
    assert P.regime_sizes(study.regime_defs["mixed"], 32, 4) == [16, 32, 48]
    assert P.regime_sizes(study.regime_defs["single"], 32, 4) == [32]
    earlier = json.loads((ROOT / study.earlier).read_text())["runs"]
    assert {r["pos_embed"] for r in earlier} - set(study.names) == {"sincos2d", "rope2d_mixed"}
    # an option on the command line wins over the plan
    short = run.parse_args(["--scale", "seed-cpu", "--steps", "4", "--seeds", "0,1", "--t-grid", "0.5"])
    assert short.steps == 4 and short.seed_list == [0, 1] and short.t_list == [0.5] and short.n_cond == 216
    # --plan: the runs, the measured step time and its command, the estimate; nothing run
    assert run.main(["--scale", "seed-cpu", "--plan", "--out-dir", "/nonexistent/runs"]) == 0
    text = capsys.readouterr().out
    assert "12 runs (single: 12) of 2000 steps" in text
    assert "measured step time: 1.035 CPU-s/step of configs/emoji64_cpu.yaml" in text
    assert "  PYTHONPATH=python python scripts/step_time.py configs/emoji64_cpu.yaml --steps 30 --log-every 10" in text
    assert "training 3.4 h" in text and "progress in /nonexistent/runs: 0 of 12 runs trained" in text
    assert run.main(["--scale", "study", "--plan"]) == 0
    assert "20 runs (single: 12, mixed: 8) of 2000 steps" in capsys.readouterr().out
    assert run.main(["--scale", "seed", "--plan"]) == 0
    assert (
        "step time: not measured (not yet measured (no GPU has run this plan)); no time estimate"
        in capsys.readouterr().out
    )


def test_the_estimate_scales_the_measured_step_time_to_another_config():
    run = _load()
    a = run.parse_args(["--scale", "seed-cpu", "--config", "configs/emoji32_cpu.yaml"])
    st = P.step_time(a)  # 32x32 at patch 4: 64 + 16 + 8 tokens x 32 images against 256 + 64 + 16 x 24
    assert st["seconds"] == pytest.approx(1.035 * (88 * 32) / (336 * 24)) and "scaled by" in st["scaled"]


def test_plan_files_are_checked(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: cpu.yaml\nstepz: 3\n")
    with pytest.raises(P.PlanError, match=r"unknown keys \['stepz'\]"):
        P.load_plan(bad)
    bad.write_text("regimes: {mixed: {size_factor: [1.0]}}\n")
    with pytest.raises(P.PlanError, match="regime 'mixed' has unknown keys"):
        P.load_plan(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(P.PlanError, match="loop"):
        P.load_plan(loop)
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {P.PLANS / 'study.yaml'}\nsteps: 7\nregimes: {{mixed: {{size_factors: [1.0, 2.0]}}}}\n")
    plan = P.load_plan(child)  # mappings merge key by key, the rest replaces
    assert plan["steps"] == 7 and plan["seeds"] == [0, 1, 2] and plan["regimes"]["mixed"]["size_factors"] == [1.0, 2.0]
    assert plan["regimes"]["mixed"]["overrides"] and set(plan["regimes"]) == {"single", "mixed"}


def test_a_regime_that_does_not_fit_the_config_is_refused_before_any_work(tmp_path, capsys):
    run = _load()
    plan = tmp_path / "p.yaml"
    plan.write_text(f"base: {P.PLANS / 'study.yaml'}\nregimes: {{mixed: {{overrides: ['data.sizes={{sizes}}']}}}}\n")
    argv = ["--plan-file", str(plan), "--config", TINY, "--out-dir", str(tmp_path / "runs"), "--stage", "train"]
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --regimes: the mixed regime") and err.count("\n") == 1
    assert "data.sizes" in err and "--regimes single" in err
    assert not (tmp_path / "runs").exists()  # refused before any work


@pytest.mark.parametrize("text", [None, "# no markers\n"])
def test_a_readme_without_the_answer_markers_is_refused_before_any_work(tmp_path, capsys, text):
    run = _load()
    readme = tmp_path / "README.md"
    if text is not None:
        readme.write_text(text)
    with pytest.raises(SystemExit) as e:
        run.main(["--config", TINY, "--out-dir", str(tmp_path / "runs"), "--readme", str(readme)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --readme {readme}" in err and R.README_END in err
    assert not (tmp_path / "runs").exists()
    if text is not None:
        assert readme.read_text() == text


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
        (["--scale", "study", "--regimes", "mixed"], "'single' first"),
        (["--regimes", "single,mixed"], "--regimes: comma-separated names of the plan's regimes ['single']"),
        (["--from-json", "x.json"], "use it with --stage report"),
        (["--scale", "gpu"], "argument --scale: invalid choice: 'gpu'"),
        (["--scale", "cpu", "--plan-file", "x.yaml"], "not allowed with argument"),
        (["--plan-file", "/nonexistent.yaml"], "plan /nonexistent.yaml:"),
        (["model.pos_embed=rope2d"], "the ablation sets model.pos_embed itself"),
        (["train.seed=3"], "the ablation sets train.seed itself"),
        (["train.lr"], "is not dotted.key=value"),
    ],
)
def test_bad_arguments_are_refused_with_a_message(argv, message, capsys):
    run = _load()
    with pytest.raises(SystemExit) as e:
        run.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_study_code_has_functions_that_fit_on_a_screen():
    """No function of studies/ over 60 lines (the package's limit is 100, with few over 60)."""
    long = []
    for f in sorted((ROOT / "studies").rglob("*.py")):
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60:
                long.append(f"{f.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert not long, long

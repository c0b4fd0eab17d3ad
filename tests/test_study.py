"""The study library (jitrope.eval.study, jitrope.eval.report) on small synthetic inputs: statistics and the
within-noise rule, readers of metrics.jsonl and evaluation JSONs, the every-size records (repeated modes,
oracle ratios, the best mode, the answer across sizes), FD-emoji sanity checks, the time estimate, and
the page with its tables and plots."""

import json
import math
import statistics

import pytest
import torch

from jitrope.eval import report as R
from jitrope.eval import study as S
from jitrope.runlog import MetricsLogger


# ----------------------------------------------------------------------------------- statistics
def test_mean_sd_is_the_sample_standard_deviation_of_the_finite_values():
    vals = [0.31, 0.27, 0.35, 0.29]
    m, sd = S.mean_sd(vals + [None, float("nan")])
    assert m == pytest.approx(statistics.mean(vals), rel=1e-15) and sd == pytest.approx(statistics.stdev(vals))
    assert S.mean_sd([2.5]) == (2.5, None) and S.mean_sd([None]) == (None, None)
    assert S.fmt_pm(1.23456, 0.01, ".3f") == "1.235 ± 0.010" and S.fmt_pm(1.0, None, ".2f") == "1.00"
    assert S.fmt_pm(None, None, ".2f") == "-"
    assert S.get({"a": {"b": 3}}, ("a", "b")) == 3.0 and S.get({"a": {}}, ("a", "b")) is None
    assert S.get({"a": None}, ("a",)) is None


def test_within_noise_rule_and_verdicts():
    vals = {"a": [1.0, 1.1, 0.9], "b": [2.0, 2.1, 1.9], "c": [1.05, 1.25, 0.95]}
    c = S.compare(vals, lower=True)
    # b: gap 1.0 > 2 * sqrt(0.1^2 + 0.1^2) = 0.28 -> apart; c: gap 0.083 -> within noise
    assert c.best == "a" and [n for n, _ in c.apart] == ["b"] and [n for n, _ in c.near] == ["c"]
    assert c.top == ["a", "c"] and S.top_group(vals, True) == ["a", "c"]
    v = S.verdict(vals, True, ".2f", "FD")
    assert (
        v == "FD: best `a` (1.00 ± 0.10); clearly worse (gap > 2x the combined seed spread): `b` 2.00; "
        "within noise of it: `c` 1.08."
    )
    assert S.compare(vals, lower=False).best == "b"  # higher is better
    one = S.verdict({"a": [1.0], "b": [0.5]}, False, ".1f", "acc")
    assert one == "acc (one seed, no noise estimate): `a` 1.0 > `b` 0.5 (higher is better)."
    assert S.top_group({"a": [1.0], "b": [0.5]}, False) == []  # no spread, no group
    assert S.verdict({"a": [1.0]}, True, ".1f", "x") == "x: too few runs to compare."
    # two runs with the same numbers have no spread: nothing is "clearly" apart
    assert S.compare({"a": [1.0, 1.0], "b": [2.0, 2.0]}, True).apart == []


# ----------------------------------------------------------------------------------- readers
def _write_run(run, losses, *, steps_per_log=10, startup_at=(), ms=500.0):
    log = MetricsLogger(run, resume_step=0)
    wall = cpu = 0.0
    for i, loss in enumerate(losses):
        step = (i + 1) * steps_per_log
        first = i == 0 or step in startup_at
        wall += steps_per_log * ms / 1000 + (30.0 if first else 0.0)  # a (re)start costs 30 s
        cpu += steps_per_log * ms / 2000
        log.log(
            {
                "loss": loss,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "images_per_s": 32.0,
                "interval_steps": steps_per_log,
                "wall_s": wall,
                "cpu_s": cpu,
                "time": 0.0,
                "startup": first,
            },
            step,
        )
    log.close()


def test_run_record_reads_metrics_jsonl_and_the_evaluations(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    losses = [1.0 - 0.01 * i for i in range(30)]
    _write_run(run, losses, startup_at=(150,))
    (run / "eval.json").write_text(json.dumps({"step": 300, "vloss": {"mean": 0.5}, "params": 10}))
    (run / "sizes.json").write_text(json.dumps({"step": 300, "resolution": [{"hw": [8, 8], "scaling": "ntk"}]}))
    steps = run / "eval_steps"
    steps.mkdir()
    for s, fd in ((200, 3.0), (100, 5.0), (400, 1.0)):  # out of order, and one beyond the run's steps
        (steps / f"step_{s:08d}.json").write_text(
            json.dumps({"step": s, "class_samples": {"fd_emoji": fd, "class_acc": 0.5}})
        )
    r = S.run_record(
        run,
        steps=250,
        seed=1,
        regime="single",
        pos_embed="rope2d",
        final=run / "eval.json",
        sizes=run / "sizes.json",
        steps_folder=steps,
    )
    assert r["vloss"]["mean"] == 0.5 and r["seed"] == 1 and r["regime"] == "single" and r["steps"] == 250
    assert r["resolution"] == [{"hw": [8, 8], "scaling": "ntk"}]
    assert r["loss_curve"]["steps"] == list(range(10, 251, 10))  # up to --steps only
    assert r["final_train_loss"] == pytest.approx(sum(losses[23:25]) / 2)  # the last 10% of 25 records: 2
    # the intervals that include a (re)start are not step time
    assert r["step_ms"] == pytest.approx(500.0) and r["cpu_ms"] == pytest.approx(250.0)
    assert r["train_wall_s"] == pytest.approx(25 * 5.0 + 2 * 30.0)
    assert r["fd_vs_step"] == {"steps": [100, 200], "fd_emoji": [5.0, 3.0], "class_acc": [0.5, 0.5]}
    empty = S.run_record(tmp_path / "none", steps=10, seed=0, regime="mixed", pos_embed="rope2d")
    assert "loss_curve" not in empty and empty["regime"] == "mixed"


# ----------------------------------------------------------------------------------- every size
def _size_rows(enc, seed, regime, fd, vloss, *, modes=("extrapolate", "interpolate", "ntk")):
    """A run's every-size study: sizes 8, 16 (training) and 8x16; ntk repeats extrapolate at 8 and 8x16."""
    rows = []
    for hw in ([8, 8], [16, 16], [8, 16]):
        for i, m in enumerate(modes):
            row = {"hw": hw, "grid_hw": [hw[0] // 4, hw[1] // 4], "scaling": m}
            if enc == "learned1d" and m == "extrapolate" and hw != [16, 16]:
                rows.append({**row, "skipped": "learned1d has no slots beyond its training grid"})
                continue
            base = fd + 0.1 * i + 0.01 * hw[1]
            rec = {**row, "fd_emoji": base, "class_acc": 0.5, "vloss": vloss + 0.01 * i + 0.001 * hw[0], "n": 9}
            if m == "ntk" and hw != [16, 16] and enc != "learned1d":
                rec.update(fd_emoji=fd + 0.01 * hw[1], vloss=vloss + 0.001 * hw[0], same_as="extrapolate")
            rows.append(rec)
    return {"pos_embed": enc, "seed": seed, "regime": regime, "resolution": rows}


def test_size_records_oracle_ratios_best_mode_and_the_answer_across_sizes(monkeypatch):
    rows = [_size_rows("rope2d", s, "single", 2.0 + 0.05 * s, 1.0 + 0.01 * s) for s in (0, 1)]
    rows += [_size_rows("learned1d", s, "single", 3.0 + 0.05 * s, 1.5) for s in (0, 1)]
    rows += [_size_rows("rope2d", s, "mixed", 1.0 + 0.05 * s, 0.8 + 0.01 * s) for s in (0, 1)]
    flat = S.size_records(rows, train_px=16)
    assert not any("skipped" in x for x in flat)
    assert {tuple(x["hw"]) for x in flat} == {(8, 8), (16, 16), (8, 16)}
    rep = [x for x in flat if x.get("same_as")]
    assert rep and all(x["scaling"] == "ntk" and x["pos_embed"] == "rope2d" for x in rep)
    trained = {"single": [(16, 16)], "mixed": [(8, 8), (16, 16)]}
    S.add_oracle_ratios(flat, trained, ["single", "mixed"])
    pick = {(x["pos_embed"], x["regime"], x["seed"], tuple(x["hw"]), x["scaling"]): x for x in flat}
    x = pick["rope2d", "single", 0, (8, 8), "interpolate"]
    o = pick["rope2d", "mixed", 0, (8, 8), "extrapolate"]  # the oracle at 8x8: the mixed run, as it trained
    assert x["vloss_ratio"] == pytest.approx(x["vloss"] / o["vloss"]) and x["oracle"] == "mixed"
    t = pick["rope2d", "mixed", 1, (16, 16), "extrapolate"]  # at 16x16 the single run is the oracle
    assert t["vloss_ratio"] == pytest.approx(t["vloss"] / pick["rope2d", "single", 1, (16, 16), "extrapolate"]["vloss"])
    assert "vloss_ratio" not in pick["rope2d", "single", 0, (8, 16), "extrapolate"]  # nobody trained at 8x16
    li = pick["learned1d", "single", 0, (16, 16), "interpolate"]
    at_train = pick["learned1d", "single", 0, (16, 16), "extrapolate"]
    assert li["vloss_ratio"] == pytest.approx(li["vloss"] / at_train["vloss"])
    # an oracle that cannot extrapolate (learned1d off its grid) places its training sizes by interpolation
    sub = [dict(x) for x in flat if x["pos_embed"] == "learned1d" and x["scaling"] != "extrapolate"]
    S.add_oracle_ratios(sub, {"single": [(8, 8)]}, ["single"])
    y = next(x for x in sub if tuple(x["hw"]) == (8, 8) and x["scaling"] == "ntk")
    z = next(x for x in sub if tuple(x["hw"]) == (8, 8) and x["scaling"] == "interpolate")
    assert y["vloss_ratio"] == pytest.approx(y["vloss"] / z["vloss"]) and z["vloss_ratio"] == 1.0
    stats = S.size_stats(flat, "fd_emoji")
    m, sd, n = stats["rope2d", "single", "extrapolate", (8, 8)]
    assert n == 2 and m == pytest.approx(2.025 + 0.08) and sd == pytest.approx(statistics.stdev([2.08, 2.13]))
    sizes = [(8, 8), (16, 16), (8, 16)]
    assert S.best_scalings(flat, "fd_emoji", True, sizes) == {
        ("rope2d", "single"): "extrapolate",
        ("learned1d", "single"): "interpolate",
        ("rope2d", "mixed"): "extrapolate",
    }
    vals = S.across_sizes_values(flat, "fd_emoji", sizes)
    assert "learned1d | single | extrapolate" not in vals  # it cannot place 8x8: no score
    want = statistics.mean([1.0 + 0.01 * 8, 1.0 + 0.01 * 16, 1.0 + 0.01 * 16])
    assert vals["rope2d | mixed | extrapolate"] == pytest.approx([want, want + 0.05])
    c = S.across_sizes(flat, "fd_emoji", True, sizes)
    assert c.best == "rope2d | mixed | extrapolate" and c.has_noise
    # a mode that only ever repeats another one is that mode: not a candidate of its own
    only_rep = [dict(x, same_as="interpolate") if x["scaling"] == "ntk" else x for x in flat]
    assert not any(k.endswith("| ntk") for k in S.across_sizes_values(only_rep, "fd_emoji", sizes))
    sent = R.answer_sentences([], [], flat, sizes, {"mixed": "on 8² and 16² images together"})
    near = ", ".join(f"`rope2d` {n.split(' | ')[2]} (mixed regime) ({v:.3f})" for n, v in c.near)
    assert [n for n, _ in c.near] == ["rope2d | mixed | interpolate", "rope2d | mixed | ntk"]
    v = S.across_sizes(flat, "vloss", True, sizes)
    assert v.best == "rope2d | mixed | extrapolate" and len(v.near) == 2 and len(v.apart) == 5
    vnear = ", ".join(f"`rope2d` {n.split(' | ')[2]} (mixed regime) ({m:.4f})" for n, m in v.near)
    vloss = (
        f"On held-out v-loss averaged over the sizes the best is `rope2d` with `extrapolate` scaling, trained "
        f"on 8² and 16² images together ({S.fmt_pm(*v.stats[v.best], '.4f')}); within noise of it: {vnear}; "
        f"the other 5 are clearly worse."
    )
    assert sent == [
        f"For one model across sizes (8², 16², 8x16): use `rope2d` with `extrapolate` scaling, trained on "
        f"8² and 16² images together (FD-emoji averaged over the sizes "
        f"{S.fmt_pm(*c.stats[c.best], '.3f')}); within noise of it: {near}.",
        vloss,
    ]
    # when more than MAX_NEAR tie with the best, the answer names no winner, counts the tie and lists the
    # clearly worse; the v-loss sentence (as many ties) is left out rather than name a winner
    monkeypatch.setattr(R, "MAX_NEAR", 1)
    worse = ", ".join(
        f"`{n.split(' | ')[0]}` {n.split(' | ')[2]} ({n.split(' | ')[1]} regime) ({m:.3f})" for n, m in c.apart
    )
    assert R.answer_sentences([], [], flat, sizes, {"mixed": "on 8² and 16² images together"}) == [
        f"For one model across sizes (8², 16², 8x16): no encoding, scaling and regime is clearly best on FD-emoji "
        f"averaged over the sizes; 3 of {len(c.stats)} are within noise of the lowest, `rope2d` with `extrapolate` "
        f"scaling, trained on 8² and 16² images together ({S.fmt_pm(*c.stats[c.best], '.3f')}); clearly worse: "
        f"{worse}."
    ]


def test_old_records_get_their_training_size_from_the_main_evaluation():
    old = {
        "pos_embed": "rope2d",
        "seed": 0,
        "class_samples": {"fd_emoji": 4.0, "class_acc": 0.3},
        "resolution": [
            {"px": 24, "grid": 6, "scaling": "extrapolate", "fd_emoji": 6.0, "class_acc": 0.2, "n": 36},
            {"px": 24, "grid": 6, "scaling": "interpolate", "fd_emoji": 5.0, "class_acc": 0.25},
        ],
    }
    flat = S.size_records([old], train_px=32)
    got = {(x["hw"], x["scaling"]): x["fd_emoji"] for x in flat}
    assert got == {
        ((24, 24), "extrapolate"): 6.0,
        ((24, 24), "interpolate"): 5.0,
        ((32, 32), "extrapolate"): 4.0,
        ((32, 32), "interpolate"): 4.0,
    }
    assert all(x["regime"] == "single" for x in flat) and S.size_label((32, 48)) == "32x48"
    # in a fixed order (not a set's, which changes with the hash seed): ties on the page depend on it
    assert [x["scaling"] for x in flat if x["hw"] == (32, 32)] == ["extrapolate", "interpolate"]


def test_ranking_by_step():
    rows = [
        {"pos_embed": "a", "fd_vs_step": {"steps": [100, 200], "fd_emoji": [5.0, 2.0]}},
        {"pos_embed": "a", "fd_vs_step": {"steps": [100, 200], "fd_emoji": [5.2, 2.2]}},
        {"pos_embed": "b", "fd_vs_step": {"steps": [100, 200], "fd_emoji": [4.0, 3.0]}},
    ]
    assert S.ranking_by_step(rows, ["a", "b"]) == {100: ["b", "a"], 200: ["a", "b"]}


# ----------------------------------------------------------------------------------- FD sanity
def test_fd_sanity_checks_on_synthetic_images():
    from jitrope.eval.metrics import frechet_distance, gaussian_stats

    g = torch.Generator().manual_seed(0)
    proj = torch.randn(3 * 4 * 4, 6, generator=g, dtype=torch.float64)

    def feats(x):  # a fixed "feature network": 4x4 average pooling, then a random projection
        return torch.nn.functional.adaptive_avg_pool2d(x.double(), 4).flatten(1) @ proj

    smooth = torch.nn.functional.interpolate(
        torch.rand(400, 3, 4, 4, generator=g) * 1.6 - 0.8, size=16, mode="bilinear", align_corners=False
    )
    train, held = smooth[:300], smooth[300:]
    ref = gaussian_stats(feats(train))

    def fd(x):
        return frechet_distance(*gaussian_stats(feats(x)), *ref)

    out = S.fd_sanity_checks(
        fd,
        train,
        held,
        50,
        generator=torch.Generator().manual_seed(1),
        featnet_info={"val_cat_acc": 0.7, "chance_cat_acc": 0.2},
    )
    assert out["identical (training split vs itself)"] == pytest.approx(0.0, abs=1e-8)
    assert out["uniform noise images"] > 4 * out["real held-out images (all 100)"]
    assert out["real training images (50, the sample count)"] > 0
    assert out["featnet class accuracy, held-out"] == 0.7 and math.isnan(out["featnet vendor accuracy, held-out"])
    exact = out["Gaussians N(0, I) vs N(0.5, 2.25 I), d=16, from their exact mean and covariance: FD"]
    assert exact == pytest.approx(out["... closed form |dmu|^2 + d (1.5 - 1)^2"], rel=1e-9) and exact == 8.0
    assert out["... the same from 20000 samples of each"] == pytest.approx(8.0, rel=0.05)


# ----------------------------------------------------------------------------------- time
def test_estimate_seconds_by_hand():
    plan = S.StudyPlan(
        train_runs=4,
        extra_train_runs=2,
        steps=100,
        batch=8,
        checkpoints=2,
        size_sets=2,
        size_units=3.0,
        n_classes=2,
        n_per_class=3,
        step_n_per_class=1,
        res_n_per_class=2,
        n_cond=4,
        max_images=5,
        res_max_images=6,
        t_points=2,
        sample_steps=3,
        jobs=2,
    )
    e = S.estimate_seconds(plan, step_s=1.2)
    fwd = 1.2 / 24
    per_sample = 2 * 5
    assert e["train"] == pytest.approx(6 * 100 * 1.2 / 2)
    assert e["eval"] == pytest.approx(4 * ((6 + 4) * per_sample + 2 * 2 * 5 + 2 * 2 * 1 * per_sample) * fwd / 2)
    assert e["sizes"] == pytest.approx(2 * 3.0 * (2 * 2 * per_sample + 2 * 6) * fwd / 2)
    assert e["total"] == pytest.approx(e["train"] + e["eval"] + e["sizes"])


# ----------------------------------------------------------------------------------- the page
def _main_row(enc, seed, base):
    g = torch.Generator().manual_seed(seed)
    j = float(torch.rand((), generator=g)) * 0.01
    return {
        "pos_embed": enc,
        "seed": seed,
        "regime": "single",
        "params": 1_900_000,
        "step": 20,
        "final_train_loss": base + j,
        "vloss": {"mean": base + 0.5 + j, "t": [0.3, 0.7], "n_images": 8},
        "vloss_null_cond": {"mean": base + 0.6 + j},
        "class_samples": {
            "fd_emoji": 10 * base + j,
            "class_acc": 0.3 - base / 10,
            "n": 18,
            "fd_emoji_real": 0.5,
            "class_acc_real": 0.7,
            "n_real": 18,
        },
        "cond_samples": {"psnr": 12.0 - base, "ssim": 0.2, "n": 4},
        "sampling": {"cfg": 2.0},
        "step_ms": 500.0 + j,
        "cpu_ms": 400.0,
        "train_wall_s": 100.0,
        "loss_curve": {"steps": [10, 20], "loss": [base + 0.3, base + j]},
        "fd_vs_step": {"steps": [10, 20], "fd_emoji": [20 * base + j, 10 * base + j]},
    }


def test_results_page_from_synthetic_records(tmp_path):
    rows = []
    for seed in (0, 1):
        for enc, base in (("rope2d", 0.2), ("learned1d", 0.4)):
            r = _main_row(enc, seed, base)
            r.update(_size_rows(enc, seed, "single", 10 * base, base + 0.5))
            rows.append(r)
    earlier = [{**_main_row("sincos2d", s, 0.3), "step": 5} for s in (0, 1)]
    info = R.PageInfo(
        command="python scripts/ablate_posenc.py --x",
        config="configs/tiny_cpu.yaml",
        img_size=16,
        patch_size=4,
        cond_img_size=8,
        width=64,
        depth=2,
        heads=2,
        in_context=4,
        steps=20,
        batch=16,
        lr=2e-3,
        names=["learned1d", "rope2d"],
        n_per_class=2,
        sample_steps=2,
        step_n_per_class=1,
        res_n_per_class=1,
        machine="test",
        device="cpu",
        jobs=2,
        out_dir="runs/x",
        regimes={"single": "at 16x16 only"},
        trained_sizes={"single": [(16, 16)]},
        study_sizes=[(8, 8), (16, 16), (8, 16)],
        timing={"eval": 60.0},
        gpu_run="python scripts/ablate_posenc.py --scale seed",
        earlier_label="5 steps, 2 seeds",
        reproduce=["python scripts/ablate_posenc.py --x"],
    )
    sanity = {"identical (training split vs itself)": 0.0, "_featnet_seconds": 12.0}
    out = R.write_results_page(rows, info, tmp_path / "p.md", sanity=sanity, earlier=earlier)
    page = out.read_text()
    m, sd = S.mean_sd([r["vloss"]["mean"] for r in rows if r["pos_embed"] == "rope2d"])
    assert "| `rope2d` | " in page and S.fmt_pm(m, sd, ".4f") in page
    assert "| `sincos2d` (5 steps, 2 seeds) |" in page and "left out of the verdicts" in page
    assert "| 8² | 8x16 | 16² (train) |" in page and "ntk" in page and "= " in page
    assert "- held-out v-loss: best `rope2d`" in page and "clearly worse" in page
    assert "At the training size: `rope2d` is the best or within noise of the best on" in page
    # every combination ties here (their spreads are 0): the answer names none as the winner
    assert (
        "For one model across sizes (8², 8x16, 16²): no encoding, scaling and regime is clearly best on FD-emoji "
        "averaged over the sizes; 5 of 5 are within noise of the lowest, `rope2d` with `extrapolate` scaling" in page
    )
    assert "the GPU run is still owed" in page and "## FD-emoji as training goes on" in page
    assert "| order | rope2d < learned1d | rope2d < learned1d |" in page
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
        assert (tmp_path / f"p_{name}.png").stat().st_size > 1000 and f"p_{name}.png" in page
    saved = json.loads((tmp_path / "p.json").read_text())
    assert len(saved["runs"]) == 4 and saved["fd_sanity"] == sanity and saved["timing"] == {"eval": 60.0}
    assert R.md_table(["a", "b"], [["1", "2"]]) == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    with pytest.raises(ValueError, match="no evaluated run"):
        R.write_results_page([{**rows[0], "regime": "mixed"}], info, tmp_path / "q.md", sanity=sanity)
    assert "Samples of seed 0 at every size" in page
    # the sample panel's seed is one with an every-size study (its grids), not the main ablation's first
    only1 = [r if r["seed"] == 1 else {k: v for k, v in r.items() if k != "resolution"} for r in rows]
    page1 = R.write_results_page(only1, info, tmp_path / "r.md", sanity=sanity).read_text()
    assert "Samples of seed 1 at every size" in page1


def test_training_progress_counts_runs_and_times_the_rest_at_their_own_rate():
    def recs(steps, cpu, startup=()):
        return [{"step": k, "cpu_s": c, "startup": k in startup} for k, c in zip(steps, cpu)]

    runs = [
        recs([10, 20, 30], [5.0, 7.0, 9.0]),  # done: 0.2 CPU-s/step
        recs([10, 20], [5.0, 8.0], startup=(20,)),  # resumed at 20: that interval holds a start-up, not counted
        recs([10, 15], [1.0, 2.0]),  # 0.2 CPU-s/step
        [],  # not started
    ]
    p = S.training_progress(runs, steps=30, jobs=2)
    assert (p["done"], p["partial"], p["todo"], p["remaining"]) == (1, 2, 1, 10 + 15 + 30)
    assert p["cpu_s_per_step"] == pytest.approx(5.0 / 25)
    assert p["hours"] == pytest.approx(55 * 0.2 / 2 / 3600)
    assert S.training_progress([[], []], steps=5, jobs=1) == {
        "done": 0,
        "partial": 0,
        "todo": 2,
        "remaining": 10,
        "cpu_s_per_step": None,
        "hours": None,
    }

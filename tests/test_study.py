"""The study beside the library (studies/posenc: study, answer, everysize, report) on small synthetic inputs:
statistics and the verdict rule with its pooled spread, readers of metrics.jsonl and evaluation JSONs, the
every-size records (repeated modes, oracle ratios, the best mode, the answer across sizes), FD-emoji sanity
checks, where each encoding puts the condition tokens, and the page with its sections, answer and README block."""

import json
import math
import statistics

import pytest
import torch

from jitrope.runlog import MetricsLogger
from studies.posenc import answer as A
from studies.posenc import everysize as E
from studies.posenc import plan as P
from studies.posenc import report as R
from studies.posenc import study as S


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


def test_t_quantile_and_the_pooled_standard_deviation():
    # two-sided 95% critical values of Student's t (tables)
    for df, t in ((1, 12.706), (2, 4.303), (3, 3.182), (6, 2.447), (8, 2.306), (22, 2.074), (1000, 1.962)):
        assert S.t_quantile(0.95, df) == pytest.approx(t, abs=1e-3)
    assert S.t_quantile(0.90, 8) == pytest.approx(1.860, abs=1e-3)
    with pytest.raises(ValueError):
        S.t_quantile(0.95, 0)
    groups = [[1.0, 2.0, 3.0], [5.0, 7.0], [4.0], [None, 2.0, float("nan")]]
    sp, df = S.pooled_sd(groups)  # (2 + 2) / (2 + 1): groups of one value add nothing
    assert df == 3 and sp == pytest.approx(math.sqrt(4.0 / 3.0))
    assert S.pooled_sd([[1.0], [2.0]]) == (None, 0)


def test_verdicts_use_the_pooled_spread_of_every_encoding():
    vals = {"a": [1.0, 1.1, 0.9], "b": [2.0, 2.1, 1.9], "c": [1.05, 1.25, 0.95]}
    c = S.compare(vals, lower=True)
    sp = math.sqrt((0.02 + 0.02 + sum((x - 3.25 / 3) ** 2 for x in vals["c"])) / 6)
    assert c.df == 6 and c.sd_pooled == pytest.approx(sp)
    # b: gap 1.0 > t(0.975, 6) * s_p * sqrt(2/3) = 0.24 -> apart; c: gap 0.083 -> within noise
    assert c.margin(3, 3) == pytest.approx(2.4469 * sp * math.sqrt(2 / 3), rel=1e-4)
    assert c.best == "a" and [n for n, _ in c.apart] == ["b"] and [n for n, _ in c.near] == ["c"]
    assert c.top == ["a", "c"] and S.top_group(vals, True) == ["a", "c"]
    assert S.verdict(vals, True, ".2f", "FD") == (
        "FD: best `a` (1.00 ± 0.10; pooled sd 0.12, df 6; margin 0.24 at 3 vs 3 seeds); clearly worse: `b` 2.00; "
        "within noise of it: `c` 1.08."
    )
    assert S.compare(vals, lower=False).best == "b"  # higher is better
    one = S.verdict({"a": [1.0], "b": [0.5]}, False, ".1f", "acc")
    assert one == "acc (one seed, no noise estimate): `a` 1.0 > `b` 0.5 (higher is better)."
    assert S.top_group({"a": [1.0], "b": [0.5]}, False) == []  # no spread, no group
    assert S.verdict({"a": [1.0]}, True, ".1f", "x") == "x: too few runs to compare."
    # two runs with the same numbers have no spread: nothing is "clearly" apart
    assert S.compare({"a": [1.0, 1.0], "b": [2.0, 2.0]}, True).apart == []
    # a one-seed encoding is compared with the others' pooled spread: sqrt(1/1 + 1/3)
    c1 = S.compare({"a": [1.0, 1.1, 0.9], "b": [1.5]}, True)
    assert c1.df == 2 and c1.margin(3, 1) == pytest.approx(4.3027 * 0.1 * math.sqrt(4 / 3), rel=1e-4)


def test_two_near_identical_seeds_do_not_make_a_gap_clearly_worse():
    """The issue's case: the best of many combinations has two seeds that agree by chance (0.3589 ± 0.0006).
    Its own spread made a gap of 0.006 "clearly worse" under the old rule (2x the combined spread of the two);
    the spread pooled over every combination does not collapse with it."""
    vals = {"best": [0.3585, 0.3593], "x": [0.3650, 0.3660], "y": [0.360, 0.375], "z": [0.370, 0.355]}
    (_, sd_b), (_, sd_x) = S.mean_sd(vals["best"]), S.mean_sd(vals["x"])
    gap = statistics.mean(vals["x"]) - statistics.mean(vals["best"])
    assert gap > 2 * math.sqrt(sd_b**2 + sd_x**2)  # what the old rule called clearly worse
    c = S.compare(vals, lower=True)
    assert c.best == "best" and c.apart == [] and {n for n, _ in c.near} == {"x", "y", "z"}
    # ... while a gap well beyond the pooled spread still is
    far = dict(vals, w=[0.45, 0.46])
    assert [n for n, _ in S.compare(far, lower=True).apart] == ["w"]


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
    sent = E.sizes_claims(flat, sizes)
    near = ", ".join(f"`rope2d` {n.split(' | ')[2]} (mixed regime) ({v:.3f})" for n, v in c.near)
    # every combination's two seeds differ by 0.05: pooled sd 0.035 (df 8), margin 0.083 at 2 vs 2 seeds, so
    # interpolate (0.033 above extrapolate at every size) is apart and ntk (which repeats it at 8², 8x16) is not
    assert c.df == 8 and c.sd_pooled == pytest.approx(0.05 / math.sqrt(2))
    assert [n for n, _ in c.near] == ["rope2d | mixed | ntk"]
    v = S.across_sizes(flat, "vloss", True, sizes)
    assert v.best == "rope2d | mixed | extrapolate" and len(v.near) == 2 and len(v.apart) == 5
    vnear = ", ".join(f"`rope2d` {n.split(' | ')[2]} (mixed regime) ({m:.4f})" for n, m in v.near)
    best, vbest = c.stats[c.best], v.stats[v.best]
    assert sent == [
        f"For one model across sizes (8², 16², 8x16): use `rope2d` with `extrapolate` scaling (mixed regime) "
        f"(FD-emoji averaged over the sizes {S.fmt_pm(best.mean, best.sd, '.3f')}); within noise of it: {near}.",
        f"On held-out v-loss averaged over the sizes the best is `rope2d` with `extrapolate` scaling (mixed regime) "
        f"({S.fmt_pm(vbest.mean, vbest.sd, '.4f')}); within noise of it: {vnear}; the other 5 are clearly worse.",
    ]
    # when more than MAX_NEAR tie with the best, the answer names no winner and counts the tie and the clearly
    # worse (the verdicts list them); the v-loss sentence (as many ties) is left out rather than name a winner
    monkeypatch.setattr(E, "MAX_NEAR", 0)
    assert E.sizes_claims(flat, sizes) == [
        f"For one model across sizes (8², 16², 8x16): no encoding, scaling and regime is clearly best on FD-emoji "
        f"averaged over the sizes: 2 of {len(c.stats)} are within noise of the lowest, `rope2d` with `extrapolate` "
        f"scaling (mixed regime) ({S.fmt_pm(best.mean, best.sd, '.3f')}); {len(c.apart)} are clearly worse."
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
    plan = P.StudyPlan(
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
    e = P.estimate_seconds(plan, step_s=1.2)
    fwd = 1.2 / 24
    per_sample = 2 * 5
    assert e["train"] == pytest.approx(6 * 100 * 1.2 / 2)
    assert e["eval"] == pytest.approx(4 * ((6 + 4) * per_sample + 2 * 2 * 5 + 2 * 2 * 1 * per_sample) * fwd / 2)
    assert e["sizes"] == pytest.approx(2 * 3.0 * (2 * 2 * per_sample + 2 * 6) * fwd / 2)
    assert e["total"] == pytest.approx(e["train"] + e["eval"] + e["sizes"])


# ----------------------------------------------------------------------------------- the page
def _main_row(enc, seed, base, *, cond_fd=True):
    g = torch.Generator().manual_seed(seed)
    j = float(torch.rand((), generator=g)) * 0.01
    r = {
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
        "cond_samples": {"psnr": 12.0 - base, "ssim": 0.2, "n": 18},
        "sampling": {"cfg": 2.0},
        "step_ms": 500.0 + j,
        "cpu_ms": 400.0,
        "train_wall_s": 100.0,
        "loss_curve": {"steps": [10, 20], "loss": [base + 0.3, base + j]},
        "fd_vs_step": {"steps": [10, 20], "fd_emoji": [20 * base + j, 10 * base + j]},
    }
    if cond_fd:
        r["cond_samples"].update(fd_emoji=8 * base + j, class_acc=0.4 - base / 10)
    return r


def _info(**kw):
    base = dict(
        plan="tiny",
        config="configs/tiny_cpu.yaml",
        img_size=16,
        patch_size=4,
        cond_img_size=8,
        null_cond="absent",
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
        runs_command="python studies/posenc/run.py --x",
        regimes={"single": "at 16x16 only"},
        trained_sizes={"single": [(16, 16)]},
        study_sizes=[(8, 8), (16, 16), (8, 16)],
        step_time={
            "seconds": 0.5,
            "clock": "cpu",
            "measured_by": "python scripts/step_time.py x",
            "note": "t",
            "config": "c.yaml",
        },
        placement={"learned1d": "slots 16..19", "rope2d": "aligned centres"},
        setting_runs={"cpu": "python studies/posenc/run.py --scale seed-cpu"},
    )
    return R.PageInfo(**{**base, **kw})


def test_results_page_of_one_study_from_synthetic_records(tmp_path, monkeypatch):
    rows = []
    for seed in (0, 1):
        for enc, base in (("rope2d", 0.2), ("learned1d", 0.4)):
            r = _main_row(enc, seed, base)
            r.update(_size_rows(enc, seed, "single", 10 * base, base + 0.5))
            rows.append(r)
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"runs": [{**_main_row("sincos2d", s, 0.3), "step": 5} for s in (0, 1)]}))
    monkeypatch.setattr(R, "ROOT", tmp_path)  # a section's earlier / previous JSONs are the repository's
    info = _info(earlier="earlier.json", earlier_label="5 steps, 2 seeds")
    sanity = {"identical (training split vs itself)": 0.0, "_featnet_seconds": 12.0, "_featnet_px": 16}
    sec = R.Section(info, rows, sanity, {"eval": 60.0})
    out = R.write_page([sec], tmp_path / "p.md", command="python studies/posenc/run.py --x")
    page = out.read_text()
    m, sd = S.mean_sd([r["vloss"]["mean"] for r in rows if r["pos_embed"] == "rope2d"])
    assert "## 16x16 at patch 4, 16 -> 20 tokens" in page and "| `rope2d` | " in page and S.fmt_pm(m, sd, ".4f") in page
    assert "| `sincos2d` (5 steps, 2 seeds) |" in page and "left out of the verdicts" in page
    assert "| 8² | 8x16 | 16² (train) |" in page and "ntk" in page and "= " in page
    assert "- held-out v-loss: best `rope2d`" in page and "clearly worse" in page and "pooled sd" in page
    assert "- `rope2d` is the best or within noise of the best on" in page
    # with and without the condition: 20 and 16 tokens (null_cond absent), a change column, verdicts
    assert "### The 16 -> 20 question: with and without the condition image" in page
    assert "| pos_embed | held-out v-loss, with (20) | held-out v-loss, without (16) | change |" in page
    assert "- With the condition (20 tokens), best: " in page and "- Without it (16 tokens), best: " in page
    assert "- `learned1d`: slots 16..19." in page  # the placement lines, as the info has them
    assert "### FD-emoji's feature network at 16x16: sanity checks" in page
    assert "Measured before the study: 0.500 CPU-s/step of `c.yaml` (t), with `python scripts/step_time.py x`." in page
    assert "training 0.1 h of 4 runs, 2 at a time" in page and "evaluation 1 min" in page
    assert "not on this page yet (`python studies/posenc/run.py --scale seed-cpu` on a CPU)" in page
    assert "| order | rope2d < learned1d | rope2d < learned1d |" in page
    assert "is the same at the last two checkpoints (steps 10 and 20)" in page
    for name in ("loss", "bars", "fd_steps", "size_fd_emoji", "size_class_acc", "size_vloss", "size_vloss_ratio"):
        assert (tmp_path / f"p_tiny_{name}.png").stat().st_size > 1000 and f"p_tiny_{name}.png" in page
    # no grids on disk: no sample panel is drawn (one an earlier build drew would be kept)
    assert not (tmp_path / "p_tiny_size_samples.png").exists() and "size_samples" not in page
    saved = json.loads((tmp_path / "p.json").read_text())["sections"]
    assert len(saved) == 1 and len(saved[0]["runs"]) == 4 and saved[0]["fd_sanity"] == sanity
    assert saved[0]["timing"] == {"eval": 60.0} and saved[0]["info"]["plan"] == "tiny"
    # the JSON alone rebuilds the same page
    again = R.write_page([R.Section.from_json(saved[0])], tmp_path / "p.md", command="python studies/posenc/run.py --x")
    assert again.read_text() == page
    assert R.md_table(["a", "b"], [["1", "2"]]) == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    with pytest.raises(ValueError, match="no evaluated run"):
        R.write_page([R.Section(info, [{**rows[0], "regime": "mixed"}], sanity)], tmp_path / "q.md", command="x")


def test_a_page_leads_with_the_setting_and_says_whether_the_earlier_answer_held(tmp_path):
    """Two sections: a 64x64 one leads (its answer first, the with/without question), the 32x32 one follows,
    labelled with its size; the answer says whether the 32x32 answer held; the README block is short lines."""
    lead = [_main_row(e, s, b) for s in (0, 1, 2) for e, b in (("rope2d", 0.2), ("learned1d", 0.4))]
    old = [_main_row(e, s, b, cond_fd=False) for s in (0, 1, 2) for e, b in (("rope2d", 0.4), ("learned1d", 0.2))]
    big = _info(plan="seed-cpu", img_size=64, cond_img_size=32, config="configs/emoji64_cpu.yaml")
    small = _info(plan="study", img_size=32, cond_img_size=16, null_cond="learned", placement={})
    secs = [R.Section(big, lead, {}), R.Section(small, old, {})]
    out = R.write_page(secs, tmp_path / "results.md", command="python studies/posenc/run.py --scale seed-cpu")
    page = out.read_text()
    first, second = (
        page.index("## 64x64 at patch 4, 256 -> 320 tokens"),
        page.index("## 32x32 at patch 4, 64 -> 80 tokens"),
    )
    assert page.index("## Answer") < first < second
    answer = page.split("## Answer\n\n", 1)[1].split("\n## ", 1)[0]
    assert answer.startswith("**64x64 at patch 4, 256 -> 320 tokens** (20 steps, seeds 0/1/2):")
    assert "- `rope2d` is the best or within noise of the best on 9 of 9 quality metrics." in answer
    assert "- Did the 32x32 answer hold at 64x64? No: `learned1d` led at 32x32 (7 of 7 quality metrics both " in answer
    assert "  - held-out v-loss: best or within noise `learned1d` at 32x32, `rope2d` at 64x64." in answer
    assert "### The 256 -> 320 question" in page[first:second] and "### The 80" not in page  # 32x32: no cond FD
    assert "`null_cond: learned`" in page[second:] and "the first section of this page" in page[second:]
    assert "its GPU plan" not in page and (tmp_path / "results_seed-cpu_loss.png").is_file()
    assert (tmp_path / "results_study_loss.png").is_file()
    readme = tmp_path / "README.md"
    readme.write_text("# t\n\n<!-- answer: written by an older script -->\nold\n<!-- /answer -->\n\nafter\n")
    R.write_readme_answer(readme, R.readme_answer(secs, "results.md", "python studies/posenc/run.py --x"))
    text = readme.read_text()
    assert text.startswith(
        "# t\n\n" + R.README_BEGIN + "\n**At the problem statement's setting, 64x64 at patch 4, 256 -> 320 tokens** "
        "(20 steps, seeds 0/1/2, on a CPU):\n"
    )
    assert text.endswith(R.README_END + "\n\nafter\n") and "\nold\n" not in text
    block = R.split_readme(text, readme)[1]
    assert (
        "- Did the 32x32 answer hold at 64x64? No:" in block
        and "  - The best-or-within-noise groups differ on: " in block
    )
    assert "**32x32 at patch 4, 64 -> 80 tokens**" in block and "](results.md)" in block
    assert max(len(line) for line in block.splitlines()) < 300  # one claim a line, no 1,000-character line
    with pytest.raises(ValueError, match="needs one line"):
        R.split_readme("no markers\n", "x")


def test_held_claims_say_yes_partly_or_no():
    def prep(rows):
        return R.Prepared(rows, ["a", "b", "c"], [0, 1, 2], [], [], [], None)

    def rows(vals):
        return [
            {"pos_embed": n, "seed": s, "vloss": {"mean": v + 0.01 * s}, "class_samples": {"fd_emoji": v + 0.01 * s}}
            for n, v in vals.items()
            for s in (0, 1, 2)
        ]

    big, small = _info(img_size=64), _info(img_size=32)
    ab = prep(rows({"a": 1.0, "b": 1.0, "c": 2.0}))
    assert A.held_claims(ab, big, ab, small)[0].startswith("Did the 32x32 answer hold at 64x64? Yes: `a` and `b` led")
    a_only = prep(rows({"a": 1.0, "b": 1.5, "c": 2.0}))
    assert A.held_claims(a_only, big, ab, small)[0].startswith(
        "Did the 32x32 answer hold at 64x64? Partly: `a` and `b`"
    )
    c_only = prep(rows({"a": 2.0, "b": 2.0, "c": 1.0}))
    held = A.held_claims(c_only, big, ab, small)
    assert held[0].startswith("Did the 32x32 answer hold at 64x64? No: `a` and `b` led at 32x32 (2 of 2")
    assert held[1:] == [
        "held-out v-loss: best or within noise `a` and `b` at 32x32, `c` at 64x64.",
        "FD-emoji: best or within noise `a` and `b` at 32x32, `c` at 64x64.",
    ]


def test_with_without_claims_name_the_best_each_way_and_the_change():
    rows = []
    for s in (0, 1, 2):
        for n, w, wo in (("a", 0.30, 0.40), ("b", 0.35, 0.38)):
            rows.append(
                {
                    "pos_embed": n,
                    "seed": s,
                    "vloss": {"mean": w + 0.001 * s},
                    "vloss_null_cond": {"mean": wo + 0.001 * s + 0.003 * (s % 2)},
                    "cond_samples": {"fd_emoji": 1.0 + s * 0.1, "class_acc": 0.5},
                    "class_samples": {"fd_emoji": 1.1 + s * 0.1, "class_acc": 0.5},
                }
            )
    got = A.with_without_claims(rows, ["a", "b"], 320, 256)
    assert got[0] == (
        "With the condition (320 tokens), best: held-out v-loss `a` alone; FD-emoji all 2 within noise; class acc "
        "all 2 within noise."
    )
    assert got[1].startswith("Without it (256 tokens), best: held-out v-loss `b` alone;")
    assert got[2:] == [
        "Change from 256 to 320 tokens (mean per encoding): held-out v-loss -0.1010 to -0.0310; FD-emoji -0.100 to "
        "-0.100; class acc +0.000 to +0.000.",
        "The change differs clearly between encodings on held-out v-loss, where `a` gains most and `b` clearly less.",
    ]
    assert A.with_without_claims([{**r, "cond_samples": {}} for r in rows], ["a", "b"], 320, 256) == []


def test_condition_placement_is_read_from_the_models():
    from jitrope.config import load_config

    mc = load_config(str(R.ROOT / "configs" / "emoji64_cpu.yaml")).model_config()
    lines = S.condition_placement(mc, ["learned1d", "factorized2d", "rope2d", "sincos2d+rope2d"])
    assert "the 64 condition tokens take slots 256..319 of its 320-slot table" in lines["learned1d"]
    assert "token (i, j) of the 8x8 grid gets `cond_pos_h[i] + cond_pos_w[j]`" in lines["factorized2d"]
    assert "y = (i + 0.5) * 16 / 8 - 0.5: rows 0.5, 2.5, ..., 14.5 among the image's 0..15" in lines["rope2d"]
    assert lines["sincos2d+rope2d"] == (
        "the fixed sin-cos table evaluated at the aligned centres (0.5, 2.5, ..., 14.5), plus the same rotation as "
        "`rope2d`"
    )


def test_training_progress_counts_runs_and_times_the_rest_at_their_own_rate():
    def recs(steps, cpu, startup=()):
        return [{"step": k, "cpu_s": c, "startup": k in startup} for k, c in zip(steps, cpu)]

    runs = [
        recs([10, 20, 30], [5.0, 7.0, 9.0]),  # done: 0.2 CPU-s/step
        recs([10, 20], [5.0, 8.0], startup=(20,)),  # resumed at 20: that interval holds a start-up, not counted
        recs([10, 15], [1.0, 2.0]),  # 0.2 CPU-s/step
        [],  # not started
    ]
    p = P.training_progress(runs, steps=30, jobs=2)
    assert (p["done"], p["partial"], p["todo"], p["remaining"]) == (1, 2, 1, 10 + 15 + 30)
    assert p["cpu_s_per_step"] == pytest.approx(5.0 / 25)
    assert p["hours"] == pytest.approx(55 * 0.2 / 2 / 3600)
    assert P.training_progress([[], []], steps=5, jobs=1) == {
        "done": 0,
        "partial": 0,
        "todo": 2,
        "remaining": 10,
        "cpu_s_per_step": None,
        "hours": None,
    }

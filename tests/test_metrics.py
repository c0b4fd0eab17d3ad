"""Metrics without downloads (jitrope.metrics, jitrope.featnet) and the resolution sampler of
jitrope.evaluate, on tiny inputs: FD against closed forms and an independent float64 formula, the
feature network's sanity checks (identical sets ~0, real held-out small, noise and blur large),
PSNR/SSIM against direct formulas, the cache, the resolution study for every encoding, and the
errors of the optional standard FID."""

import math

import pytest
import torch
import torch.nn.functional as F

from jitrope.config import DataConfig, DiffusionConfig
from jitrope.data import BatchMaker, build_dataset, to_float
from jitrope.diffusion import Diffusion
from jitrope.eval import evaluate as ev
from jitrope.eval.featnet import FeatNetConfig, featnet_path, load_or_train_featnet
from jitrope.eval.metrics import fd_from_features, frechet_distance, gaussian_stats, inception_fid, psnr, ssim
from jitrope.model import JiT, JiTConfig
from jitrope.posenc import POS_EMBEDS


def _spd(d, g):
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.t() / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_fd_matches_the_closed_form_of_shifted_and_scaled_gaussians():
    g = torch.Generator().manual_seed(0)
    d = 7
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    a, b = torch.rand(d, generator=g, dtype=torch.float64) + 0.2, torch.rand(d, generator=g, dtype=torch.float64) + 0.2
    # Diagonal (commuting) covariances: FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
    want = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(want, rel=1e-10)
    # The same in a rotated basis (non-diagonal matrices; the distance is rotation-invariant).
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    got = frechet_distance(q @ mu1, q @ torch.diag(a) @ q.t(), q @ mu2, q @ torch.diag(b) @ q.t())
    assert got == pytest.approx(want, rel=1e-9)
    # A pure shift: FD = |shift|^2.
    s = _spd(d, g)
    assert frechet_distance(mu1, s, mu1 + 0.5, s) == pytest.approx(0.25 * d, rel=1e-9)


def test_fd_agrees_with_the_eigenvalues_of_s1_s2_for_general_covariances():
    g = torch.Generator().manual_seed(1)
    for d in (1, 3, 16):
        s1, s2 = _spd(d, g), _spd(d, g)
        mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
        # Independent formula: Tr((S1 S2)^1/2) = sum of square roots of the (real, positive) eigenvalues of S1 S2.
        tr = torch.linalg.eigvals(s1 @ s2).real.clamp_min(0).sqrt().sum()
        want = float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_fd_of_samples_identical_sets_and_shifted_gaussian_samples():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(300, 5, generator=g)
    assert fd_from_features(a, a) == pytest.approx(0.0, abs=1e-9)
    # Large samples of N(0, I) and N(m, 4 I): FD -> |m|^2 + d (2 - 1)^2.
    x = torch.randn(40000, 5, generator=g, dtype=torch.float64)
    m = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0], dtype=torch.float64)
    y = 2 * torch.randn(40000, 5, generator=g, dtype=torch.float64) + m
    want = float(m.pow(2).sum()) + 5.0
    assert fd_from_features(x, y) == pytest.approx(want, rel=0.03)
    mu, sigma = gaussian_stats(y)
    assert sigma.dtype == torch.float64 and torch.allclose(mu, m, atol=0.05)


def test_fd_and_stats_refuse_bad_shapes():
    with pytest.raises(ValueError, match=r"features must be \[N, D\] with N >= 2"):
        gaussian_stats(torch.randn(1, 3))
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(2), torch.eye(2))


def test_psnr_and_ssim_against_direct_formulas():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 12, 13, generator=g) * 2 - 1
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr(x, y), 10 * torch.log10(4.0 / mse))
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    # Direct SSIM (window 11, sigma 1.5, valid positions) written out position by position.
    r = torch.arange(11, dtype=torch.float64) - 5
    w1 = torch.exp(-(r**2) / (2 * 1.5**2))
    w = (w1[:, None] * w1[None, :]) / w1.sum() ** 2
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    want = []
    for n in range(3):
        vals = []
        for c in range(3):
            for i in range(12 - 10):
                for j in range(13 - 10):
                    a, b = x[n, c, i : i + 11, j : j + 11].double(), y[n, c, i : i + 11, j : j + 11].double()
                    ma, mb = (w * a).sum(), (w * b).sum()
                    va, vb = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2
                    cab = (w * a * b).sum() - ma * mb
                    vals.append((2 * ma * mb + c1) * (2 * cab + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
        want.append(torch.stack(vals).mean())
    assert torch.allclose(ssim(x, y), torch.stack(want), rtol=1e-10)
    noise = torch.rand(x.shape, generator=g) * 2 - 1
    assert (ssim(x, noise) < ssim(x, y)).all() and (ssim(x, y) < 1).all()
    assert torch.allclose(ssim(x, y), ssim(y, x))
    assert ssim(x[:, :, :5, :5], y[:, :, :5, :5]).shape == (3,)  # smaller than the window: a 5x5 window
    with pytest.raises(ValueError, match="one shape"):
        psnr(x, y[:, :, :-1])


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A feature network trained on the synthetic shapes (seconds), cached in a temporary data dir."""
    root = tmp_path_factory.mktemp("featnet_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("JITROPE_DATA", str(root))
    torch.set_num_threads(1)
    dcfg = DataConfig(name="synthetic", img_size=16, num_images=600, holdout=0.2)
    fcfg = FeatNetConfig(epochs=6, batch_size=64)
    logs = []
    net, extra = load_or_train_featnet(dcfg, fcfg, log=logs.append)
    yield dict(dcfg=dcfg, fcfg=fcfg, net=net, extra=extra, logs=logs, root=root)
    mp.undo()


def test_featnet_sanity_checks(synth):
    net, extra, dcfg = synth["net"], synth["extra"], synth["dcfg"]
    train, val = build_dataset(dcfg, "train"), build_dataset(dcfg, "val")
    info = extra["info"]
    assert info["val_cat_acc"] > 2 * info["chance_cat_acc"]  # the category head learned something real
    ref = (extra["train_mu"], extra["train_sigma"])

    def fd(x):
        return frechet_distance(*gaussian_stats(net.embed(x)[0]), *ref)

    held = to_float(val.images)
    g = torch.Generator().manual_seed(0)
    fd_held = fd(held)
    fd_noise = fd(torch.rand(held.shape, generator=g) * 2 - 1)
    fd_blur = fd(F.avg_pool2d(held, 4).repeat_interleave(4, -1).repeat_interleave(4, -2))
    assert fd(to_float(train.images)) == pytest.approx(0.0, abs=1e-6)  # identical to the reference set
    assert fd_held < fd_blur < fd_noise
    assert fd_noise > 10 * fd_held and fd_blur > 3 * fd_held
    # Any image size is judged at the net's size.
    assert net.embed(F.interpolate(held, size=24, mode="bilinear"))[0].shape == (len(val), synth["fcfg"].feat_dim)


def test_featnet_cache_is_keyed_by_config_and_reused(synth):
    p = featnet_path(synth["dcfg"], synth["fcfg"])
    assert p.is_file() and p.parent.parent == synth["root"] and synth["extra"]["path"] == str(p)
    assert not list(p.parent.glob(".tmp-*"))  # written atomically, nothing left behind
    logs = []
    net2, extra2 = load_or_train_featnet(synth["dcfg"], synth["fcfg"], log=logs.append)
    assert logs == []  # loaded, not trained again
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    assert torch.equal(net2.embed(x)[0], synth["net"].embed(x)[0])
    other = DataConfig(name="synthetic", img_size=32, num_images=600, holdout=0.2)
    assert featnet_path(other, synth["fcfg"]) != p
    assert featnet_path(synth["dcfg"], FeatNetConfig(epochs=7, batch_size=64)) != p
    with pytest.raises(FileNotFoundError, match="--featnet: no feature network file"):
        load_or_train_featnet(synth["dcfg"], path=synth["root"] / "missing.safetensors")


@pytest.mark.parametrize("pos_embed", POS_EMBEDS)
def test_resolution_sampler_at_two_unseen_grids(synth, pos_embed):
    torch.manual_seed(0)
    cfg = JiTConfig.preset("tiny", pos_embed=pos_embed, pos_impl="torch", cond_img_size=8, num_classes=9)
    model = JiT(cfg).eval()
    with torch.no_grad():  # zero-init output layers would make every encoding give the same samples
        for p in model.final_layer.parameters():
            p.normal_(0, 0.05)
        for b in model.blocks:
            b.adaLN_modulation[-1].weight.normal_(0, 0.05)
    net, extra = synth["net"], synth["extra"]

    def judge(x, asked):
        assert x.shape[-1] in (8, 24) and x.shape[0] == len(asked)
        f, pred = net.embed(x)
        return {
            "fd_emoji": frechet_distance(*gaussian_stats(f), extra["train_mu"], extra["train_sigma"]),
            "class_acc": float((pred == asked).float().mean()),
        }

    kw = dict(steps=2, sampler="euler", cfg=2.0, cfg_interval=(0.1, 1.0), batch_size=32, device="cpu")
    vl_calls = []

    def vloss(hw):
        vl_calls.append((hw, model.cfg.pos_scaling))
        return {"mean": float(hw[0] + len(vl_calls)), "per_t": [1.0]}

    rows = ev.resolution_study(
        model,
        Diffusion.from_config(DiffusionConfig()),
        kw,
        [8, 24],
        n_per_class=2,
        seed=0,
        judge=judge,
        log=lambda *a: None,
        vloss=vloss,
    )
    modes = ["extrapolate", "interpolate", "ntk", "yarn"]
    assert [(r["px"], r["grid"], r["scaling"]) for r in rows] == [(px, px // 4, m) for px in (8, 24) for m in modes]
    assert all(r["hw"] == [r["px"]] * 2 and r["grid_hw"] == [r["grid"]] * 2 for r in rows)
    rotary = pos_embed in ("rope2d", "rope2d_mixed", "sincos2d+rope2d")
    # which modes give samples of their own; the others repeat an earlier mode's numbers (same_as)
    same = {}
    for px in (8, 24):
        if not rotary:  # tables interpolate under ntk / yarn
            same[px, "ntk"] = same[px, "yarn"] = "interpolate"
        elif px == 8 and pos_embed == "sincos2d+rope2d":  # table interpolated, RoPE untouched on a smaller grid
            same[px, "yarn"] = "ntk"
        elif px == 8:  # a smaller grid: ntk and yarn change no frequency
            same[px, "ntk"] = same[px, "yarn"] = "extrapolate"
    by = {(r["px"], r["scaling"]): r for r in rows}
    for (px, m), r in by.items():
        if pos_embed == "learned1d" and m == "extrapolate":
            assert "no slots beyond its training grid" in r["skipped"]
            continue
        assert "skipped" not in r and math.isfinite(r["fd_emoji"]) and r["n"] == 18 and 0 <= r["class_acc"] <= 1
        assert r.get("same_as") == same.get((px, m)), (px, m)
        if "same_as" in r:
            src = by[px, r["same_as"]]
            assert (r["fd_emoji"], r["class_acc"], r["vloss"]) == (src["fd_emoji"], src["class_acc"], src["vloss"])
    # the v-loss ran once per measured record, at its size and under its scaling
    assert vl_calls == [((r["px"], r["px"]), r["scaling"]) for r in rows if "n" in r and "same_as" not in r]
    assert model.cfg.pos_scaling == "extrapolate"  # restored after the study
    if pos_embed in ("rope2d", "sincos2d", "factorized2d"):  # the two placements are really different samples
        assert rows[4]["fd_emoji"] != rows[5]["fd_emoji"]
    if rotary:  # ntk and yarn too, on a larger grid
        assert len({by[24, m]["fd_emoji"] for m in modes}) == 4
    # The factorized table only reaches twice the training grid.
    if pos_embed == "factorized2d":
        why = ev.resolution_scalings(model, 4 * 10)  # a 10x10 grid
        assert "exceeds the factorized table" in why["extrapolate"] and why["interpolate"] is None


def test_resolution_study_at_non_square_sizes_with_held_out_vloss(synth):
    """A wide and a tall size (rows x columns): per-axis scaling, the samples squeezed to the feature
    network's square, and the held-out v-loss on held-out images resized to each size."""
    torch.manual_seed(0)
    cfg = JiTConfig.preset("tiny", pos_embed="rope2d", pos_impl="torch", cond_img_size=8, num_classes=9)
    model = JiT(cfg).eval()
    with torch.no_grad():  # zero-init output layers would make every placement give the same numbers
        for p in model.final_layer.parameters():
            p.normal_(0, 0.05)
        for b in model.blocks:
            b.adaLN_modulation[-1].weight.normal_(0, 0.05)
    net, extra = synth["net"], synth["extra"]
    shapes = []

    def judge(x, asked):
        shapes.append(tuple(x.shape[-2:]))
        f, pred = net.embed(x)
        return {
            "fd_emoji": frechet_distance(*gaussian_stats(f), extra["train_mu"], extra["train_sigma"]),
            "class_acc": float((pred == asked).float().mean()),
        }

    ds = build_dataset(synth["dcfg"], "val")
    maker = BatchMaker(ds, cond="downsample", cond_size=8)
    diff = Diffusion.from_config(DiffusionConfig())

    def vloss(hw):
        return ev.heldout_vloss(
            model, diff, maker, (0.3, 0.7), max_images=8, batch_size=4, seed=0, device="cpu", img_size=hw
        )

    kw = dict(steps=2, sampler="euler", cfg=2.0, cfg_interval=(0.1, 1.0), batch_size=32, device="cpu")
    rows = ev.resolution_study(
        model,
        diff,
        kw,
        [(16, 24), (24, 16)],
        n_per_class=1,
        seed=0,
        judge=judge,
        log=lambda *a: None,
        scalings=("extrapolate", "ntk", "yarn"),
        vloss=vloss,
    )
    assert [(r["hw"], r["grid_hw"], r["scaling"]) for r in rows] == [
        ([16, 24], [4, 6], "extrapolate"),
        ([16, 24], [4, 6], "ntk"),
        ([16, 24], [4, 6], "yarn"),
        ([24, 16], [6, 4], "extrapolate"),
        ([24, 16], [6, 4], "ntk"),
        ([24, 16], [6, 4], "yarn"),
    ]
    assert shapes == [(16, 24)] * 3 + [(24, 16)] * 3 and all("px" not in r for r in rows)
    assert all(r["vloss"] > 0 and len(r["vloss_per_t"]) == 2 for r in rows)
    assert len({r["vloss"] for r in rows}) == 6  # every placement is its own model of the same images
    at_train = ev.heldout_vloss(
        model, diff, maker, (0.3, 0.7), max_images=8, batch_size=4, seed=0, device="cpu", img_size=(16, 16)
    )
    model.cfg.pos_scaling = "yarn"  # at the training size every mode is the plain model
    again = ev.heldout_vloss(
        model, diff, maker, (0.3, 0.7), max_images=8, batch_size=4, seed=0, device="cpu", img_size=16
    )
    model.cfg.pos_scaling = "extrapolate"
    assert again["per_t"] == at_train["per_t"]


def test_inception_fid_errors_name_the_file_and_the_package(tmp_path):
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(FileNotFoundError, match="no Inception weights file"):
        inception_fid(x, x, tmp_path / "nope.pth")
    (tmp_path / "w.pth").write_bytes(b"0")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install torch-fidelity"):
            inception_fid(x, x, tmp_path / "w.pth")
    # the CLI's checks of --fid-inception and --metrics (before any work) are in test_sample.py, on a checkpoint

"""Scaling modes of 2D RoPE for other grids (``model.pos_scaling``: extrapolate | interpolate | ntk | yarn),
per axis: the frequency math of :mod:`jitrope.rope` against float64 references written straight from the
papers' formulas, and the model using it (frequencies per grid, YaRN's temperature on the logits, tables
interpolating under ntk/yarn, fused and torch paths alike, non-square grids)."""

import math

import pytest
import torch
import torch.nn.functional as F

from jitrope import model as model_mod
from jitrope.model import JiT, JiTConfig
from jitrope.rope import (
    SCALING_MODES,
    attn_logit_factor,
    axial_freqs,
    ntk_theta,
    scale_freqs,
    scaled_axial_freqs,
    yarn_attn_factor,
)

F64 = torch.float64


# ----------------------------------------------------------------------------- float64 references
def ref_axis(head_dim, theta):
    """Per-axis RoPE frequencies as in RoFormer / EVA-02: ``theta^(-2k/d)``, d = head_dim / 2, k < d / 2."""
    d = head_dim // 2
    return [theta ** (-2 * k / d) for k in range(d // 2)]


def ref_ntk_axis(head_dim, theta, s):
    """bloc97's NTK-aware scaled RoPE: the base becomes ``theta * s^(d / (d - 2))``; FiT's VisionNTK takes
    ``s = max(L_test / L_train, 1)`` per axis."""
    s = max(s, 1.0)
    d = head_dim // 2
    base = theta * s ** (d / (d - 2))
    return [base ** (-2 * k / d) for k in range(d // 2)]


def ref_yarn_axis(head_dim, theta, s, L, alpha=1.0, beta=32.0):
    """YaRN (Peng et al. 2023, eqs. 16-18): ``lambda = 2 pi / f``, ``r = L / lambda``, ``gamma = 0`` if
    ``r < alpha``, 1 if ``r > beta``, else ``(r - alpha) / (beta - alpha)``; ``h(f) = (1 - gamma) f / s + gamma f``."""
    s = max(s, 1.0)
    out = []
    for f in ref_axis(head_dim, theta):
        r = L / (2 * math.pi / f)
        gamma = 0.0 if r < alpha else (1.0 if r > beta else (r - alpha) / (beta - alpha))
        out.append((1 - gamma) * f / s + gamma * f)
    return out


def ref_pi_axis(head_dim, theta, s):
    """Position interpolation (Chen et al. 2023): position m -> m / s, i.e. every frequency divided by s."""
    return [f / s for f in ref_axis(head_dim, theta)]


def layout_2d(rows, cols):
    """[2, D/2] of docs/ops.md: row frequencies in the first quarter-pairs, column ones in the second."""
    z = [0.0] * len(rows)
    return torch.tensor([rows + z, z + cols], dtype=F64)


def ref_freqs(mode, head_dim, theta, s_hw, train_grid):
    sh, sw = s_hw
    if mode == "extrapolate":
        return layout_2d(ref_axis(head_dim, theta), ref_axis(head_dim, theta))
    if mode == "interpolate":
        return layout_2d(ref_pi_axis(head_dim, theta, sh), ref_pi_axis(head_dim, theta, sw))
    if mode == "ntk":
        return layout_2d(ref_ntk_axis(head_dim, theta, sh), ref_ntk_axis(head_dim, theta, sw))
    return layout_2d(
        ref_yarn_axis(head_dim, theta, sh, train_grid[0]), ref_yarn_axis(head_dim, theta, sw, train_grid[1])
    )


# ----------------------------------------------------------------------------- the pure functions
@pytest.mark.parametrize("mode", SCALING_MODES)
@pytest.mark.parametrize(
    "head_dim, theta, s_hw, train_grid",
    [
        (64, 10000.0, (1.5, 1.0), (8, 8)),  # a 48x32 image from 32x32: rows stretch, columns do not
        (64, 10000.0, (1.5, 2.0), (8, 8)),
        (32, 100.0, (3.0, 1.25), (16, 24)),  # long axes: some YaRN frequencies sit on the ramp
        (24, 10000.0, (0.75, 2.0), (64, 64)),  # a shorter axis: ntk / yarn leave it alone, PI stretches it
        (128, 500.0, (2.0, 2.0), (200, 200)),  # r > beta for the fastest pairs: YaRN keeps them
    ],
)
def test_scaled_axial_freqs_match_the_published_formulas(mode, head_dim, theta, s_hw, train_grid):
    got, factor = scaled_axial_freqs(head_dim, theta, s_hw, mode, train_grid=train_grid, dtype=F64)
    want = ref_freqs(mode, head_dim, theta, s_hw, train_grid)
    assert got.shape == (2, head_dim // 2) and got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    t_inv = (0.1 * math.log(s_hw[0] * s_hw[1]) + 1) ** 2 if mode == "yarn" and s_hw[0] * s_hw[1] > 1 else 1.0
    assert factor == pytest.approx(t_inv, rel=1e-15)
    f32, _ = scaled_axial_freqs(head_dim, theta, s_hw, mode, train_grid=train_grid)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32, want.float(), rtol=1e-6, atol=0)


def test_ntk_keeps_the_fastest_and_interpolates_the_slowest_pair_exactly():
    d = 64
    f, _ = scaled_axial_freqs(d, 10000.0, (2.0, 3.0), "ntk", dtype=F64)
    base = axial_freqs(d, dtype=F64)
    q = d // 4
    assert f[0, 0] == base[0, 0] and f[1, q] == base[1, q]  # k = 0 untouched on both axes
    torch.testing.assert_close(f[0, q - 1], base[0, q - 1] / 2, rtol=1e-13, atol=0)
    torch.testing.assert_close(f[1, 2 * q - 1], base[1, 2 * q - 1] / 3, rtol=1e-13, atol=0)
    assert ntk_theta(10000.0, 2.0, 32) == pytest.approx(10000.0 * 2 ** (32 / 30), rel=1e-15)


def test_yarn_temperature_and_identity_at_the_training_grid():
    assert yarn_attn_factor(1.0) == 1.0 and yarn_attn_factor(0.5) == 1.0
    assert yarn_attn_factor(math.e) == pytest.approx(1.1**2)
    assert attn_logit_factor((1.5, 1.5), "ntk") == 1.0
    assert attn_logit_factor((1.5, 1.0), "yarn") == pytest.approx((0.1 * math.log(1.5) + 1) ** 2)
    assert attn_logit_factor((0.75, 1.0), "yarn") == 1.0  # fewer tokens than in training: no temperature
    for mode in SCALING_MODES:
        f, factor = scaled_axial_freqs(16, 10000.0, (1.0, 1.0), mode, train_grid=(4, 4), dtype=F64)
        assert torch.equal(f, axial_freqs(16, dtype=F64)) and factor == 1.0


def test_learned_frequencies_scale_per_axis_by_magnitude():
    """RoPE-Mixed: ``[..., 2, D/2]`` learned coefficients mixing both axes, any sign; every row (column)
    coefficient is scaled as an axial row (column) frequency of the same magnitude would be."""
    g = torch.Generator().manual_seed(0)
    d, theta = 32, 10000.0
    base = axial_freqs(d, theta, dtype=F64)
    q = d // 4
    axis = base[0, :q]
    # pick coefficients equal (up to sign) to axial frequencies, mixed over both axes and 3 heads
    idx = torch.randint(0, q, (3, 2, d // 2), generator=g)
    sign = torch.randint(0, 2, (3, 2, d // 2), generator=g) * 2 - 1
    freqs = axis[idx] * sign
    for mode in ("ntk", "yarn", "interpolate"):
        got = scale_freqs(freqs, (2.0, 1.5), mode, theta=theta, head_dim=d, train_grid=(8, 6))
        ax, _ = scaled_axial_freqs(d, theta, (2.0, 1.5), mode, train_grid=(8, 6), dtype=F64)
        want = torch.stack((ax[0, :q][idx[:, 0]], ax[1, q:][idx[:, 1]]), dim=1) * sign
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # zero coefficients (pairs that do not turn with an axis) stay zero and finite
    z = scale_freqs(torch.zeros(2, 8, dtype=F64), (2.0, 2.0), "ntk", theta=theta, head_dim=16)
    assert torch.equal(z, torch.zeros_like(z))
    # a learned frequency slower than the axial range is interpolated no more than PI
    slow = torch.tensor([[1e-9], [0.0]], dtype=F64)
    torch.testing.assert_close(
        scale_freqs(slow, (2.0, 1.0), "ntk", theta=theta, head_dim=16)[0, 0], torch.tensor(0.5e-9, dtype=F64)
    )


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(mode="stretch"), "pos_scaling must be one of"),
        (dict(s_hw=(0.0, 1.0)), "scale must be positive"),
        (dict(mode="yarn", train_grid=None), "yarn needs the training length"),
        (dict(mode="ntk", head_dim=4), "rotary dim"),
    ],
)
def test_bad_arguments_name_what_is_wrong(bad, match):
    kw = dict(head_dim=16, theta=10000.0, s_hw=(2.0, 2.0), mode="ntk", train_grid=(4, 4)) | bad
    with pytest.raises(ValueError, match=match):
        scaled_axial_freqs(kw["head_dim"], kw["theta"], kw["s_hw"], kw["mode"], train_grid=kw["train_grid"])


# ----------------------------------------------------------------------------- the model
def _model(pos_embed, impl="torch", seed=0, **kw):
    torch.manual_seed(seed)
    m = JiT(JiTConfig.preset("tiny", pos_embed=pos_embed, pos_impl=impl, cond_img_size=8, **kw)).eval()
    g = torch.Generator().manual_seed(1)  # the zero-initialised layers would hide every difference
    with torch.no_grad():
        for lin in [b.adaLN_modulation[-1] for b in m.blocks] + [
            m.final_layer.adaLN_modulation[-1],
            m.final_layer.linear,
        ]:
            for p in (lin.weight, lin.bias):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def _batch(hw, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, *hw, generator=g), torch.rand(2, generator=g), torch.tensor([1, 9])


@pytest.mark.parametrize("pos_embed", ["rope2d", "rope2d_mixed", "sincos2d+rope2d"])
def test_model_rotates_with_the_scaled_frequencies_of_its_grid(pos_embed):
    m = _model(pos_embed)
    rot = m.pos.rotary
    lay = m.sequence_layout((24, 16), scaling="ntk")  # 6x4 from the 4x4 training grid: rows 1.5, columns 1
    assert lay.scale_hw == (1.5, 1.0)
    f = rot.scaled_freqs(1, lay)
    want = scale_freqs(rot.layer_freqs(1).double(), (1.5, 1.0), "ntk", theta=10000.0, head_dim=32)
    torch.testing.assert_close(f.double(), want, rtol=1e-6, atol=0)
    assert torch.equal(lay.coords(0), m.sequence_layout((24, 16)).coords(0))  # coordinates stay integer
    same = m.sequence_layout(scaling="yarn")  # the training grid: nothing scaled
    assert rot.scaled_freqs(0, same) is rot.layer_freqs(0) or torch.equal(rot.scaled_freqs(0, same), rot.layer_freqs(0))
    x, t, y = _batch((24, 16))
    outs = {mode: m(x, t, y, pos_scaling=mode) for mode in SCALING_MODES}
    for a in SCALING_MODES:  # four different placements
        for b in SCALING_MODES:
            if a < b:
                assert not torch.allclose(outs[a], outs[b]), (a, b)
    x, t, y = _batch((16, 16))
    at_train = [m(x, t, y, pos_scaling=mode) for mode in SCALING_MODES]
    for o in at_train[1:]:
        torch.testing.assert_close(o, at_train[0], rtol=0, atol=0)


@pytest.mark.parametrize("attn_impl", ["sdpa", "fp32"])
def test_yarn_tempers_the_logits_only_on_a_larger_grid(monkeypatch, attn_impl):
    m = _model("rope2d", attn_impl=attn_impl)
    seen = []
    if attn_impl == "sdpa":
        real = F.scaled_dot_product_attention

        def spy(q, k, v, **kw):
            seen.append(kw.get("scale"))
            return real(q, k, v, **kw)

        monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention", spy)
    else:
        real = model_mod.attention_fp32

        def spy(q, k, v, dropout_p=0.0, scale=None, mask=None):
            seen.append(scale)
            return real(q, k, v, dropout_p, scale, mask)

        monkeypatch.setattr(model_mod, "attention_fp32", spy)
    d = m.cfg.head_dim
    for hw, mode, want in [
        ((24, 16), "yarn", (0.1 * math.log(1.5) + 1) ** 2 / math.sqrt(d)),
        ((24, 24), "yarn", (0.1 * math.log(2.25) + 1) ** 2 / math.sqrt(d)),
        ((24, 16), "ntk", None),
        ((8, 16), "yarn", None),
        ((16, 16), "yarn", None),
    ]:
        seen.clear()
        m(*_batch(hw), pos_scaling=mode)
        assert seen == [pytest.approx(want) if want else None] * m.cfg.depth, (hw, mode)
    # the temperature is the same as scaling q.k by hand
    x, t, y = _batch((24, 24))
    a = m(x, t, y, pos_scaling="yarn")
    monkeypatch.setattr(m.pos, "attn_scale", lambda layout, head_dim: None)
    assert not torch.allclose(a, m(x, t, y, pos_scaling="yarn"))


@pytest.mark.parametrize("pos_embed", ["learned1d", "sincos2d", "factorized2d", "sincos2d+rope2d"])
def test_tables_interpolate_under_ntk_and_yarn(pos_embed):
    m = _model(pos_embed)
    name = {"sincos2d+rope2d": "sincos2d"}.get(pos_embed, pos_embed)
    table = m.pos.parts[name]
    for hw in ((24, 16), (32, 32), (8, 16)):
        itp = m.sequence_layout(hw, scaling="interpolate")
        h = torch.randn(1, itp.n_image + itp.n_cond, m.cfg.hidden_size, generator=torch.Generator().manual_seed(2))
        for mode in ("ntk", "yarn"):
            lay = itp._replace(scaling=mode)
            torch.testing.assert_close(table.add(h, lay), table.add(h, itp), rtol=0, atol=0)
    if pos_embed != "sincos2d+rope2d":  # no rotary part: ntk and yarn are interpolation, model-wide
        x, t, y = _batch((24, 16))
        want = m(x, t, y, pos_scaling="interpolate")
        for mode in ("ntk", "yarn"):
            torch.testing.assert_close(m(x, t, y, pos_scaling=mode), want, rtol=0, atol=0)


@pytest.mark.parametrize("pos_embed", ["rope2d", "rope2d_mixed", "sincos2d+rope2d"])
@pytest.mark.parametrize("mode", ["ntk", "yarn"])
def test_fused_and_torch_paths_agree_under_frequency_scaling(pos_embed, mode):
    a, b = _model(pos_embed, "fused"), _model(pos_embed, "torch")
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(2, 3, 32, 24, generator=g), torch.rand(2, generator=g), torch.tensor([0, 3])
    cond = torch.randn(2, 3, 8, 8, generator=g)
    torch.testing.assert_close(
        a(x, t, y, cond=cond, pos_scaling=mode), b(x, t, y, cond=cond, pos_scaling=mode), rtol=1e-5, atol=1e-5
    )


def test_pos_scaling_config_accepts_the_new_modes():
    from jitrope.config import ConfigError, load_config

    for mode in SCALING_MODES:
        cfg = load_config(None, ["model.preset=tiny", f"model.pos_scaling={mode}"])
        assert cfg.model_config().pos_scaling == mode
    with pytest.raises(ConfigError, match="pos_scaling must be one of"):
        load_config(None, ["model.preset=tiny", "model.pos_scaling=ntk-by-parts"])
    m = _model("rope2d", pos_scaling="yarn")
    x, t, y = _batch((24, 24))
    torch.testing.assert_close(m(x, t, y), m(x, t, y, pos_scaling="yarn"), rtol=0, atol=0)

"""The x-prediction / v-loss objective, the samplers, guidance and EMA on cases with known answers."""

import pytest
import torch
from torch import nn

from jitrope.diffusion import EMA, Diffusion, guidance_weight


class ExactDenoiser:
    """E[x | z_t] for data x ~ N(mu, s^2) per pixel and noise N(0, sigma^2); s = 0 is one point."""

    def __init__(self, mu, s, sigma):
        self.mu, self.s, self.sigma = mu, s, sigma
        self.calls = []

    def __call__(self, z, t, y, cond=None, cond_drop=None):
        self.calls.append((t.clone(), y.clone(), None if cond_drop is None else cond_drop.clone()))
        t = t.view(-1, 1, 1, 1).double()
        var = t**2 * self.s**2 + (1 - t) ** 2 * self.sigma**2
        gain = t * self.s**2 / var
        return (self.mu + gain * (z.double() - t * self.mu)).to(z.dtype)


def test_loss_is_zero_for_the_exact_prediction_and_matches_the_formula():
    d = Diffusion()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1
    y = torch.zeros(6, dtype=torch.long)
    assert d.loss(lambda z, t, y: x, x, y, generator=g).item() == 0.0

    t = torch.tensor([0.0, 0.3, 0.5, 0.9, 0.97, 1.0])
    noise = torch.randn(x.shape, generator=g)
    # predicting 0: v - v_pred = x / max(1 - t, t_eps)
    loss = d.loss(lambda z, t, y: torch.zeros_like(z), x, y, t=t, noise=noise)
    expect = (x / (1 - t).clamp_min(0.05).view(-1, 1, 1, 1)).pow(2).mean()
    torch.testing.assert_close(loss, expect)


def test_noisy_path_and_noise_scale():
    d = Diffusion(noise_scale=3.0)
    x, e = torch.ones(2, 1, 1, 1), torch.ones(2, 1, 1, 1)
    z = d.noisy(x, torch.tensor([0.0, 1.0]), e)
    assert z.flatten().tolist() == [3.0, 1.0]  # t = 0 is pure noise * noise_scale, t = 1 is data


def test_training_times_are_logit_normal():
    d = Diffusion(P_mean=-0.8, P_std=0.8)
    t = d.sample_t(200_000, generator=torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() + 0.8) < 0.01 and abs(logit.std().item() - 0.8) < 0.01
    assert 0 < t.min() and t.max() < 1


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_one_point_data_set_is_reached(sampler):
    target = torch.linspace(-1, 1, 2 * 3 * 4 * 4).view(2, 3, 4, 4)
    net = ExactDenoiser(target, 0.0, 1.0)
    d = Diffusion()
    y = torch.zeros(2, dtype=torch.long)
    # 10 steps: every evaluation has 1 - t >= 0.1 > t_eps, and the last (Euler) step lands exactly
    out = d.sample(net, y, shape=target.shape, steps=10, sampler=sampler, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)
    # 50 steps (the default): t_eps clamps the last step, which still closes 40% of a tiny gap
    out = d.sample(net, y, shape=target.shape, steps=50, sampler=sampler, generator=torch.Generator().manual_seed(1))
    assert (out - target).abs().max() < 0.1 and (out - target).abs().mean() < 0.02


def test_heun_beats_euler_on_gaussian_data_and_both_converge():
    mu, s, sigma = 0.3, 0.5, 1.0
    net = ExactDenoiser(mu, s, sigma)
    d = Diffusion(noise_scale=sigma)
    noise = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(64, dtype=torch.long)
    exact = mu + s * noise  # the probability-flow map of a Gaussian is affine
    err = {}
    for sampler, steps in [("euler", 10), ("heun", 10), ("euler", 19), ("heun", 19)]:
        # up to 19 steps every evaluation has 1 - t > t_eps, so the exact flow is the limit
        out = d.sample(net, y, noise=noise, steps=steps, sampler=sampler)
        err[sampler, steps] = (out - exact).abs().max().item()
    assert err["heun", 10] < 0.25 * err["euler", 10]
    assert 0.4 < err["euler", 19] / err["euler", 10] < 0.7  # first order
    assert err["heun", 19] / err["heun", 10] < 0.35  # about second order
    assert err["heun", 19] < 0.02


@pytest.mark.parametrize("sampler,evals", [("euler", 7), ("heun", 13)])
def test_number_of_network_evaluations(sampler, evals):
    net = ExactDenoiser(0.0, 0.5, 1.0)
    Diffusion().sample(net, torch.zeros(1, dtype=torch.long), shape=(1, 3, 2, 2), steps=7, sampler=sampler)
    assert len(net.calls) == evals
    assert net.calls[0][0].item() == 0.0 and net.calls[-1][0].item() == pytest.approx(6 / 7)


def test_guidance_weight_interval():
    t = torch.tensor([0.0, 0.05, 0.1, 0.5, 1.0])
    assert guidance_weight(t, 3.0, (0.1, 1.0)).tolist() == [1.0, 1.0, 3.0, 3.0, 3.0]
    assert guidance_weight(t, 3.0, (0.0, 0.5)).tolist() == [3.0, 3.0, 3.0, 3.0, 1.0]


def test_cfg_combines_conditional_and_null_branches():
    # x_pred = 1 for class labels, 0 for the null class (9): v_c = (1 - z)/(1 - t), v_u = -z/(1 - t)
    calls = []

    def net(z, t, y, cond=None, cond_drop=None):
        calls.append((y.clone(), cond_drop.clone() if cond_drop is not None else None))
        return (y != 9).float().view(-1, 1, 1, 1).expand_as(z).clone()

    d = Diffusion()
    z = torch.zeros(2, 1, 2, 2)
    y = torch.tensor([3, 5])
    cond = torch.zeros(2, 3, 1, 1)
    for t, w in [(0.5, 4.0), (0.05, 1.0)]:  # inside / outside the interval [0.1, 1]
        calls.clear()
        v = d.velocity(net, z, torch.full((2,), t), y, cond, cfg=4.0, cfg_interval=(0.1, 1.0), null_class=9)
        torch.testing.assert_close(v, torch.full_like(z, w / (1 - t)))
        ((yy, drop),) = calls  # one batched call: [conditional | unconditional]
        assert yy.tolist() == [3, 5, 9, 9] and drop.tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="null_class"):
        d.velocity(net, z, torch.full((2,), 0.5), y, cfg=2.0)


def test_sampler_rejects_bad_arguments():
    d = Diffusion()
    y = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="sampler"):
        d.sample(lambda z, t, y: z, y, shape=(1, 1, 1, 1), sampler="rk4")
    with pytest.raises(ValueError, match="steps"):
        d.sample(lambda z, t, y: z, y, shape=(1, 1, 1, 1), steps=0)


def test_ema_two_decays_warmup_and_state_dict():
    m = nn.Linear(2, 1)
    m.register_buffer("stat", torch.tensor([5.0]))
    with torch.no_grad():
        m.weight.fill_(0.0)
        m.bias.fill_(0.0)
    ema = EMA(m, (0.9, 0.5))
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update()
    torch.testing.assert_close(ema.parameters_dict(0)["weight"], torch.full((1, 2), 0.1))
    torch.testing.assert_close(ema.parameters_dict(1)["weight"], torch.full((1, 2), 0.5))
    sd = ema.state_dict(1)
    assert set(sd) == {"weight", "bias", "stat"} and sd["stat"].item() == 5.0
    copy = ema.averaged_module(0)
    torch.testing.assert_close(copy.weight, torch.full((1, 2), 0.1))
    assert not copy.training and m.weight[0, 0].item() == 1.0

    warm = EMA(m, (0.999,), warmup=True)  # first update: decay min(0.999, 1/10) = 0.1
    with torch.no_grad():
        m.weight.fill_(2.0)
    warm.update()
    torch.testing.assert_close(warm.parameters_dict(0)["weight"], torch.full((1, 2), 0.1 * 1.0 + 0.9 * 2.0))
    with pytest.raises(ValueError, match="shape"):
        warm.load_parameters(0, {"weight": torch.zeros(3), "bias": torch.zeros(1)})


# ----------------------------------------------------------------------------- resolution-aware time shift
def old_sample(net, y, noise, steps, sampler, noise_scale=1.0):
    """The sampler as it was before the shift existed (python-float time grid), for bit-for-bit comparison."""
    z = noise_scale * noise
    ts = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
    d = Diffusion(noise_scale=noise_scale)

    def vel(z_, t_):
        t = torch.full((z_.shape[0],), t_)
        return (net(z_, t, y).float() - z_) / (1 - t).view(-1, 1, 1, 1).clamp_min(d.t_eps)

    for i in range(steps):
        t0, t1 = ts[i], ts[i + 1]
        v0 = vel(z, t0)
        if sampler == "euler" or i == steps - 1:
            z = z + (t1 - t0) * v0
        else:
            z = z + (t1 - t0) * 0.5 * (v0 + vel(z + (t1 - t0) * v0, t1))
    return z


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_default_shift_keeps_the_old_behaviour_bit_for_bit(sampler):
    d = Diffusion()
    assert d.shift == "none" and d.shift_ref_tokens == 256
    from jitrope.config import DiffusionConfig

    assert Diffusion.from_config(DiffusionConfig()) == d
    # training times: the logit-normal draw, untouched by a token count
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    expect = torch.sigmoid(torch.randn(64, generator=g2) * 0.8 - 0.8)
    assert torch.equal(d.sample_t(64, generator=g1, n_tokens=1024), expect)
    # loss: the same draws in the same order give the same bits
    net = ExactDenoiser(0.1, 0.4, 1.0)
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(5, dtype=torch.long)
    loss = d.loss(net, x, y, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.sigmoid(torch.randn(5, generator=g) * 0.8 - 0.8)
    e = torch.randn(x.shape, generator=g)
    z = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * e
    k = (1 - t).view(-1, 1, 1, 1).clamp_min(0.05)
    assert torch.equal(loss, ((x - z) / k - (net(z, t, y).float() - z) / k).pow(2).mean())
    # sampler
    noise = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    out = d.sample(net, y[:4], noise=noise, steps=5, sampler=sampler, n_tokens=4096)
    assert torch.equal(out, old_sample(net, y[:4], noise, 5, sampler))


def test_sqrt_tokens_shift_formula_and_its_noise_scale_equivalence():
    d = Diffusion(shift="sqrt_tokens", shift_ref_tokens=64)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    assert torch.equal(d.shift_t(t, 64), t)  # alpha = 1 at the reference count
    t4 = d.shift_t(t, 256)  # 4x the tokens: alpha = 2
    torch.testing.assert_close(t4, t / (t + 2 * (1 - t)), rtol=0, atol=0)
    assert t4[0] == 0 and t4[-1] == 1 and (t4[1:-1] < t[1:-1]).all()  # towards noise, ends kept
    # SD3 §5.3.2 in their convention (sigma = 1 - t): sigma' = a sigma / (1 + (a - 1) sigma)
    sig, a = 1 - t, 2.0
    torch.testing.assert_close(1 - t4, a * sig / (1 + (a - 1) * sig))
    # Same signal-to-noise ratio as noise_scale = alpha at the unshifted time (JiT's 2.0 at 512px).
    inner = t[1:-1]
    torch.testing.assert_close(t4[1:-1] / (1 - t4[1:-1]), inner / (2 * (1 - inner)))
    # Per sample: one count each.
    torch.testing.assert_close(d.shift_t(torch.tensor([0.5, 0.5]), torch.tensor([64, 576])), torch.tensor([0.5, 0.25]))
    # Training times are drawn, then shifted per sample.
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    tt = d.sample_t(3, generator=g1, n_tokens=torch.tensor([64, 256, 16]))
    base = Diffusion().sample_t(3, generator=g2)
    torch.testing.assert_close(tt, d.shift_t(base, torch.tensor([64, 256, 16])))
    assert tt[0] == base[0] and tt[1] < base[1] and tt[2] > base[2]


def test_shifted_sampler_walks_each_samples_own_grid_and_still_reaches_the_data():
    d = Diffusion(shift="sqrt_tokens", shift_ref_tokens=16)
    target = torch.linspace(-1, 1, 2 * 3 * 4 * 4).view(2, 3, 4, 4)
    net = ExactDenoiser(target, 0.0, 1.0)
    y = torch.zeros(2, dtype=torch.long)
    out = d.sample(
        net,
        y,
        shape=target.shape,
        steps=10,
        sampler="euler",
        n_tokens=torch.tensor([16, 64]),
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)
    grid = torch.linspace(0, 1, 11, dtype=torch.float64)
    seen = torch.stack([c[0] for c in net.calls])  # [steps, 2]
    torch.testing.assert_close(seen[:, 0], grid[:-1].float())  # alpha 1: today's grid
    torch.testing.assert_close(seen[:, 1], d.shift_t(grid[:-1], 64).float())  # alpha 2: shifted


def test_shift_errors_name_the_argument():
    with pytest.raises(ValueError, match="shift must be one of"):
        Diffusion(shift="sd3")
    with pytest.raises(ValueError, match="shift_ref_tokens"):
        Diffusion(shift="sqrt_tokens", shift_ref_tokens=0)
    d = Diffusion(shift="sqrt_tokens")
    with pytest.raises(ValueError, match="sample_t: .*needs n_tokens"):
        d.sample_t(3)
    with pytest.raises(ValueError, match="sample: .*needs n_tokens"):
        d.sample(lambda z, t, y: z, torch.zeros(1, dtype=torch.long), shape=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="n_tokens must be positive"):
        d.shift_t(torch.rand(2), torch.tensor([4, 0]))
    from jitrope.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="diffusion.shift must be one of"):
        load_config(None, ["diffusion.shift=sd3"])
    with pytest.raises(ConfigError, match="diffusion.shift_ref_tokens"):
        load_config(None, ["diffusion.shift_ref_tokens=0"])
    assert load_config(None, ["diffusion.shift=sqrt_tokens"]).diffusion.shift == "sqrt_tokens"

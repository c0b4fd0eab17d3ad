"""x-prediction diffusion with a velocity loss, samplers and guidance (docs/training.md, JiT defaults).

Path: ``z_t = t * x + (1 - t) * e`` with ``e ~ N(0, noise_scale^2)``; ``t = 1`` is data, ``t = 0`` noise.
The network predicts ``x``; both the target and the prediction are turned into velocities
``v = (x - z) / max(1 - t, t_eps)`` and the loss is their mean squared difference. Training draws
``t = sigmoid(N(P_mean, P_std))``. Sampling integrates ``dz/dt = v`` from ``t = 0`` to 1 on
``linspace(0, 1, steps + 1)`` with Heun (the last step Euler, as 1 - t = 0 there) or Euler.
Classifier-free guidance: ``v = v_u + w(t) (v_c - v_u)``, ``w = cfg`` for t in ``cfg_interval`` and
1 outside; the unconditional branch has the null class (``y = num_classes``) and the null
condition image.

The network is any callable ``net(z, t, y, cond=None, cond_drop=None) -> x_pred`` (``JiT`` is one);
``cond_drop`` is a ``[B]`` bool mask selecting the samples whose condition image is replaced by the
null condition, and ``cond`` is omitted for networks without a condition image.

Packed batches (images of different sizes, :mod:`jitrope.packing`): pass ``layout=`` (a
:class:`~jitrope.packing.PackedLayout`) and pixel tokens ``[T_img, p*p*C]`` for ``x`` / ``noise`` /
``z``; ``t`` stays one value per sample (``[S]``) and reaches each pixel through its sample. The
network is then called ``net(z, t, y, cond, cond_drop=..., layout=layout)`` (``JiT.forward_tokens``).
The packed loss is the mean over every pixel of every image (each pixel weighs the same, so a large
image weighs more than a small one, as a token-level loss does); for S images of one size it is
today's batch mean.

Resolution-aware schedules (``shift="sqrt_tokens"``): a larger image keeps more of its structure at
the same noise level, so its times are shifted towards noise by ``alpha = sqrt(n / shift_ref_tokens)``
(n = the image's tokens): ``t' = t / (t + alpha (1 - t))`` for training times and the sampling grid.
This is SD3's resolution-dependent shift (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis", §5.3.2: ``t_m = sqrt(m/n) t_n / (1 + (sqrt(m/n) - 1) t_n)`` with
their t = noise level = our ``1 - t``). Flux uses the same map ``exp(mu) / (exp(mu) + (1/s - 1))``
(``time_shift`` with sigma 1 in black-forest-labs/flux ``sampling.py``) with ``mu`` linear in the
sequence length (0.5 at 256 tokens, 1.15 at 4096), i.e. ``alpha = exp(mu)``. In signal-to-noise terms
the shift by alpha equals multiplying the noise by alpha: JiT's ``noise_scale`` 2.0 at 512px (1.0 at
256px) is alpha = sqrt(512^2 / 256^2) = 2 on pixel counts. With ``shift="none"`` (default) nothing
changes, bit for bit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["Diffusion", "EMA", "guidance_weight", "SAMPLERS", "SHIFTS"]

SHIFTS = ("none", "sqrt_tokens")


def _expand(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def _per_pixel(v: Tensor, layout) -> Tensor:
    """A per-sample ``[S]`` value for each pixel token of a packed batch (``[T_img]``); ``v`` itself for a
    batch of images (``_expand`` broadcasts it)."""
    return v if layout is None else v[layout.image_seq_id]


def guidance_weight(t: Tensor, cfg: float, interval: Sequence[float] = (0.1, 1.0)) -> Tensor:
    """``w(t)``: ``cfg`` where ``lo <= t <= hi``, else 1."""
    lo, hi = interval
    inside = (t >= lo) & (t <= hi)
    return torch.where(inside, torch.full_like(t, float(cfg)), torch.ones_like(t))


Velocity = Callable[[Tensor, float], Tensor]


def euler_step(vel: Velocity, z: Tensor, t0, t1, dt, last: bool) -> Tensor:
    return z + dt * vel(z, t0)


def heun_step(vel: Velocity, z: Tensor, t0, t1, dt, last: bool) -> Tensor:
    """Heun's second-order step; the last one is Euler's (the velocity divides by 1 - t = 0 at t = 1)."""
    v0 = vel(z, t0)
    z_euler = z + dt * v0
    if last:
        return z_euler
    return z + dt * 0.5 * (v0 + vel(z_euler, t1))


# The one list of samplers: Diffusion.sample dispatches on it, the config and the CLIs offer its names.
# A step maps (velocity function, z at t0, t0, t1, the step length t1 - t0 (a float, or a tensor
# broadcast to z when each sample walks its own shifted times), whether it is the last step) to z at t1.
SAMPLERS: Dict[str, Callable[..., Tensor]] = {
    "heun": heun_step,
    "euler": euler_step,
}


@dataclass
class Diffusion:
    """The denoising objective and the samplers; holds no weights.

    ``shift``: ``"none"`` or ``"sqrt_tokens"`` (resolution-aware times, module docstring) with
    ``shift_ref_tokens``, the token count at which the shift is 1.
    """

    P_mean: float = -0.8
    P_std: float = 0.8
    t_eps: float = 0.05
    noise_scale: float = 1.0
    shift: str = "none"
    shift_ref_tokens: int = 256

    def __post_init__(self) -> None:
        if self.shift not in SHIFTS:
            raise ValueError(f"shift must be one of {list(SHIFTS)}, got {self.shift!r}")
        if not (isinstance(self.shift_ref_tokens, int) and self.shift_ref_tokens > 0):
            raise ValueError(f"shift_ref_tokens must be a positive integer, got {self.shift_ref_tokens!r}")

    @classmethod
    def from_config(cls, cfg) -> Diffusion:
        """From a ``DiffusionConfig`` (or anything with the same attributes)."""
        return cls(
            P_mean=cfg.P_mean,
            P_std=cfg.P_std,
            t_eps=cfg.t_eps,
            noise_scale=cfg.noise_scale,
            shift=cfg.shift,
            shift_ref_tokens=cfg.shift_ref_tokens,
        )

    # ------------------------------------------------------------------------------ resolution shift
    def shift_t(self, t: Tensor, n_tokens) -> Tensor:
        """``t' = t / (t + alpha (1 - t))``, ``alpha = sqrt(n_tokens / shift_ref_tokens)`` (module docstring),
        computed in float64 and returned in t's dtype; ``t`` unchanged for ``shift="none"``.
        ``n_tokens``: an int or a tensor broadcasting against ``t`` (one count per sample)."""
        if self.shift == "none":
            return t
        n = torch.as_tensor(n_tokens, dtype=torch.float64, device=t.device)
        if (n <= 0).any():
            raise ValueError(f"n_tokens must be positive token counts, got {n.tolist()}")
        alpha = (n / self.shift_ref_tokens).sqrt()
        td = t.to(torch.float64)
        return (td / (td + alpha * (1 - td))).to(t.dtype)

    def _need_tokens(self, n_tokens, what: str):
        if self.shift != "none" and n_tokens is None:
            raise ValueError(
                f"{what}: diffusion shift={self.shift!r} needs n_tokens (the image tokens of each "
                "sample), or layout= for a packed batch"
            )
        return n_tokens

    # ------------------------------------------------------------------------------ training
    def sample_t(self, n: int, *, generator: Optional[torch.Generator] = None, device=None, n_tokens=None) -> Tensor:
        """Logit-normal training times ``sigmoid(N(P_mean, P_std))``, ``[n]``; shifted by each sample's
        token count (``n_tokens``: int or ``[n]``) when ``shift`` is set."""
        t = torch.sigmoid(torch.randn(n, generator=generator, device=device) * self.P_std + self.P_mean)
        if self.shift == "none":
            return t
        return self.shift_t(t, self._need_tokens(n_tokens, "sample_t"))

    def noisy(self, x: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``z_t = t x + (1 - t) * noise_scale * noise`` (``noise`` standard normal)."""
        t = _expand(t, x)
        return t * x + (1 - t) * (self.noise_scale * noise)

    def to_velocity(self, x_pred: Tensor, z: Tensor, t: Tensor) -> Tensor:
        return (x_pred - z) / _expand(1 - t, z).clamp_min(self.t_eps)

    def loss(
        self,
        net: Callable,
        x: Tensor,
        y: Tensor,
        cond: Optional[Tensor] = None,
        cond_drop: Optional[Tensor] = None,
        *,
        t: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        layout=None,
        n_tokens=None,
    ) -> Tensor:
        """Mean ``(v - v_pred)^2`` over a batch. ``t`` ([B]) and ``noise`` (standard normal, x's
        shape) are drawn when not given (``t`` shifted by ``n_tokens``, or the layout's image tokens, when
        ``shift`` is set). Labels / condition dropout is the caller's (pass the null class in ``y`` and a
        ``cond_drop`` mask). With ``layout`` (a packed batch) ``x`` is pixel tokens ``[T_img, p*p*C]``,
        ``t`` is ``[S]`` and the mean runs over every pixel of every image (module docstring)."""
        B = x.shape[0] if layout is None else layout.image_tokens.shape[0]
        if t is None:
            if layout is not None and n_tokens is None:
                n_tokens = layout.image_tokens
            t = self.sample_t(B, generator=generator, device=x.device, n_tokens=n_tokens)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        tx = _per_pixel(t, layout)
        z = self.noisy(x, tx, noise)
        x_pred = _call(net, z, t, y, cond, cond_drop, layout).float()
        v = self.to_velocity(x, z, tx)
        v_pred = self.to_velocity(x_pred, z, tx)
        return (v - v_pred).pow(2).mean()

    # ------------------------------------------------------------------------------ sampling
    def velocity(
        self,
        net: Callable,
        z: Tensor,
        t: Tensor,
        y: Tensor,
        cond: Optional[Tensor] = None,
        *,
        cfg: float = 1.0,
        cfg_interval: Sequence[float] = (0.1, 1.0),
        null_class: Optional[int] = None,
        layout=None,
    ) -> Tensor:
        """The (guided) velocity at ``(z, t)``. With ``cfg != 1`` the conditional and the
        unconditional branch (null class, null condition) run as one batch of 2B. With ``layout`` (a
        packed batch) ``z`` is pixel tokens, ``t`` is ``[S]``, and both branches run as one packed batch."""
        if cfg == 1.0:
            return self.to_velocity(_call(net, z, t, y, cond, None, layout).float(), z, _per_pixel(t, layout))
        if null_class is None:
            raise ValueError("classifier-free guidance needs null_class (= the model's num_classes)")
        B, n = t.shape[0], z.shape[0]
        layout2 = None if layout is None else layout.repeat(2)
        zz, tt = torch.cat([z, z]), torch.cat([t, t])
        yy = torch.cat([y, torch.full_like(y, null_class)])
        cc = torch.cat([cond, cond]) if cond is not None else None
        drop = torch.arange(2 * B, device=z.device) >= B if cond is not None else None
        v = self.to_velocity(_call(net, zz, tt, yy, cc, drop, layout2).float(), zz, _per_pixel(tt, layout2))
        v_c, v_u = v[:n], v[n:]
        return v_u + _expand(_per_pixel(guidance_weight(t, cfg, cfg_interval), layout), v_c) * (v_c - v_u)

    @torch.no_grad()
    def sample(
        self,
        net: Callable,
        y: Tensor,
        cond: Optional[Tensor] = None,
        *,
        shape: Optional[Tuple[int, ...]] = None,
        steps: int = 50,
        sampler: str = "heun",
        cfg: float = 1.0,
        cfg_interval: Sequence[float] = (0.1, 1.0),
        null_class: Optional[int] = None,
        noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        progress: Optional[Callable[[int], None]] = None,
        layout=None,
        n_tokens=None,
    ) -> Tensor:
        """Integrate from ``z0 = noise_scale * noise`` at t = 0 to t = 1; returns the final ``z``.

        ``shape`` ([B, C, H, W]) or ``noise`` gives the size. ``progress(k)`` is called after each
        step. ``sampler``: a name of :data:`SAMPLERS`; Heun takes ``2 * steps - 1`` network evaluations,
        Euler ``steps``. With ``layout`` (a
        packed batch of S images) ``noise``/``shape`` are pixel tokens ``[T_img, p*p*C]`` and the
        result is too (:func:`jitrope.packing.unpack_images` makes images of it). With ``shift`` set,
        each sample walks its own shifted grid ``shift_t(linspace(0, 1, steps + 1), n_tokens)``
        (``n_tokens``: int or ``[B]``; a packed batch's are its layout's).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
        step = SAMPLERS[sampler]
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        device = y.device
        if noise is None:
            if shape is None:
                raise ValueError("sample: give shape or noise")
            noise = torch.randn(shape, generator=generator, device=device)
        z = self.noise_scale * noise.to(device=device, dtype=torch.float32)
        n_samples = z.shape[0] if layout is None else layout.image_tokens.shape[0]
        ts = self._time_grid(steps, n_samples, device, layout, n_tokens)
        kw = dict(cfg=cfg, cfg_interval=cfg_interval, null_class=null_class, layout=layout)

        def vel(z_, t_):  # t_: a float of the shared grid, or each sample's time (a shifted grid's row)
            if self.shift == "none":
                t_ = torch.full((n_samples,), t_, device=device)
            return self.velocity(net, z_, t_, y, cond, **kw)

        for i in range(steps):
            t0, t1 = ts[i], ts[i + 1]
            # with a shift, (t1 - t0) is each sample's, broadcast to every pixel of it
            dt = t1 - t0 if self.shift == "none" else _expand(_per_pixel(t1 - t0, layout), z)
            z = step(vel, z, t0, t1, dt, i == steps - 1)
            if progress is not None:
                progress(i + 1)
        return z

    def _time_grid(self, steps: int, n_samples: int, device, layout, n_tokens) -> List:
        """The times ``linspace(0, 1, steps + 1)`` as floats; with ``shift`` set, each sample's shifted
        times instead, one float32 ``[n_samples]`` row per step (``n_tokens``: int or ``[B]``; a packed
        batch's are its layout's)."""
        ts = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
        if self.shift == "none":
            return ts
        if layout is not None and n_tokens is None:
            n_tokens = layout.image_tokens
        n_tokens = self._need_tokens(n_tokens, "sample")
        grid = self.shift_t(
            torch.tensor(ts, dtype=torch.float64, device=device)[:, None],
            torch.as_tensor(n_tokens, device=device).expand(n_samples),
        )
        return [row.float() for row in grid]


def _call(
    net: Callable, z: Tensor, t: Tensor, y: Tensor, cond: Optional[Tensor], cond_drop: Optional[Tensor], layout=None
) -> Tensor:
    if layout is not None:
        return net(z, t, y, cond, cond_drop=cond_drop, layout=layout)
    if cond is None:
        return net(z, t, y)
    return net(z, t, y, cond=cond, cond_drop=cond_drop)


class EMA:
    """Exponential moving averages of a module's parameters, one per decay (default 0.9999, 0.9996).

    ``update()`` after each optimizer step: ``ema <- decay * ema + (1 - decay) * param``; with
    ``warmup`` the decay of update k is ``min(decay, (1 + k) / (10 + k))``. Buffers are not averaged;
    :meth:`state_dict` takes them from the live module.
    """

    def __init__(self, module: nn.Module, decays: Sequence[float] = (0.9999, 0.9996), *, warmup: bool = False):
        self.module = module
        self.decays = tuple(float(d) for d in decays)
        self.warmup = warmup
        self.names = [n for n, p in module.named_parameters()]
        self.shadows: List[List[Tensor]] = [[p.detach().clone() for p in module.parameters()] for _ in self.decays]
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        params = [p.detach() for p in self.module.parameters()]
        k = self.num_updates
        for decay, shadow in zip(self.decays, self.shadows):
            d = min(decay, (1 + k) / (10 + k)) if self.warmup else decay
            torch._foreach_lerp_(shadow, params, 1.0 - d)
        self.num_updates += 1

    def state_dict(self, index: int) -> Dict[str, Tensor]:
        """A full module state dict with the parameters of EMA ``index``."""
        sd = dict(self.module.state_dict())
        sd.update(zip(self.names, self.shadows[index]))
        return sd

    def parameters_dict(self, index: int) -> Dict[str, Tensor]:
        return dict(zip(self.names, self.shadows[index]))

    @torch.no_grad()
    def load_parameters(self, index: int, params: Dict[str, Tensor]) -> None:
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"EMA {index}: missing parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for n, s in zip(self.names, self.shadows[index]):
            src = params[n]
            if src.shape != s.shape:
                raise ValueError(
                    f"EMA {index}: parameter {n} has shape {tuple(src.shape)}, the model has {tuple(s.shape)}"
                )
            s.copy_(src)

    def copy_to(self, index: int, target: nn.Module) -> nn.Module:
        """Load EMA ``index`` into ``target`` (a module of the same architecture); returns it."""
        target.load_state_dict(self.state_dict(index))
        return target

    def averaged_module(self, index: int) -> nn.Module:
        """A deep copy of the module holding EMA ``index``, in eval mode."""
        m = copy.deepcopy(self.module)
        return self.copy_to(index, m).eval()

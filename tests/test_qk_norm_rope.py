"""Tests of jitrope::qk_norm_rope (SPEC §3a, §4): one input generator feeding parity, gradient,
opcheck, low-precision, determinism, error and torch.compile tests, on every device present."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, assert_kernel_error_within_eager
from torch import Tensor

import jitrope
from jitrope import ops
from jitrope.reference import qk_norm_rope_ref
from jitrope.rope import axial_freqs, sequence_coords

pytestmark = pytest.mark.skipif(not jitrope.HAS_EXTENSION, reason=f"extension not built: {jitrope.EXTENSION_ERROR}")

LOW_PRECISION = [torch.float16, torch.bfloat16]


@dataclass
class Sample:
    name: str
    base: Tensor  # the leaf that owns qk's memory
    view: Callable[[Tensor], Tensor]  # qk = view(base), often a non-contiguous view
    weight: Tensor
    coords: Optional[Tensor]
    freqs: Optional[Tensor]
    interleaved: bool
    eps: float

    @property
    def qk(self) -> Tensor:
        return self.view(self.base)

    def kwargs(self):
        return dict(eps=self.eps, interleaved=self.interleaved)

    def call(self, fn, qk=None, weight=None, freqs=None):
        qk = self.qk if qk is None else qk
        weight = self.weight if weight is None else weight
        freqs = self.freqs if freqs is None else freqs
        return fn(qk, weight, self.coords, freqs, **self.kwargs())

    def __repr__(self) -> str:
        f = None if self.freqs is None else tuple(self.freqs.shape)
        return f"Sample({self.name}, qk={tuple(self.qk.shape)}, freqs={f}, interleaved={self.interleaved})"


def _qkv_view(B, N, H, D):
    return lambda t: t.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)[:2]


def sample_inputs(device, dtype, requires_grad=False, *, freqs_grad=None) -> List[Sample]:
    """Random [2, B, H, N, D] inputs: views of a qkv projection, odd sizes, channel strides, B = 0,
    shared / per-head / no frequencies, both pair conventions, rows of very different scales."""
    freqs_grad = requires_grad if freqs_grad is None else freqs_grad
    gen = torch.Generator().manual_seed(20260301)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    contiguous = lambda t: t  # noqa: E731
    # (name, base shape, view, (B, H, N, D), freqs: None | "shared" | "per_head", interleaved)
    specs = [
        ("qkv_view", (2, 5, 3 * 3 * 8), _qkv_view(2, 5, 3, 8), (2, 3, 5, 8), "shared", True),
        ("qkv_view_per_head_half", (1, 7, 3 * 2 * 12), _qkv_view(1, 7, 2, 12), (1, 2, 7, 12), "per_head", False),
        ("contiguous_odd", (2, 3, 2, 9, 6), contiguous, (3, 2, 9, 6), "shared", False),
        ("norm_only", (2, 3, 3 * 4 * 10), _qkv_view(2, 3, 4, 10), (2, 4, 3, 10), None, True),
        ("channel_stride_2", (2, 1, 2, 4, 16), lambda t: t[..., ::2], (1, 2, 4, 8), "per_head", True),
        ("heads_tokens_transposed", (2, 2, 5, 3, 4), lambda t: t.transpose(2, 3), (2, 3, 5, 4), "shared", True),
        ("batch_0", (2, 0, 2, 3, 4), contiguous, (0, 2, 3, 4), "shared", True),
        ("one_pair", (2, 3, 1, 1, 2), contiguous, (3, 1, 1, 2), "per_head", False),
        ("wide_head", (2, 1, 2, 3, 160), contiguous, (1, 2, 3, 160), "shared", False),
        ("jit_like", (2, 70, 3 * 2 * 64), _qkv_view(2, 70, 2, 64), (2, 2, 70, 64), "shared", True),
    ]
    samples = []
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, shape, view, (B, H, N, D), kind, interleaved in specs:
        base = rnd(*shape)
        if base.numel():
            base = base * torch.exp(rnd(*shape[:-1], 1))  # rows of different scales
        weight = 1 + 0.5 * rnd(2, D)
        coords = freqs = None
        if kind is not None:
            coords = torch.rand(N, 2, generator=gen, dtype=torch.float64) * 20 - 4
            coords[0] = 0
            freqs = rnd(H, 2, D // 2) if kind == "per_head" else rnd(2, D // 2)
            coords = coords.to(device=device, dtype=acc)
            freqs = freqs.to(device=device, dtype=acc).requires_grad_(freqs_grad)
            if name == "qkv_view":
                coords = coords.t().contiguous().t()  # non-contiguous coords
        samples.append(
            Sample(
                name,
                base.to(device=device, dtype=dtype).requires_grad_(requires_grad),
                view,
                weight.to(device=device, dtype=acc).requires_grad_(requires_grad),
                coords,
                freqs,
                interleaved,
                1e-6 if name != "one_pair" else 0.25,
            )
        )
    assert samples[0].qk.shape == (2, 2, 3, 5, 8) and not samples[0].qk.is_contiguous()
    return samples


SAMPLE_NAMES = [s.name for s in sample_inputs("cpu", torch.float64)]


def _ref64(s: Sample) -> Tensor:
    return qk_norm_rope_ref(
        s.qk.double(), s.weight.double(), None if s.coords is None else s.coords.double(),
        None if s.freqs is None else s.freqs.double(), **s.kwargs())


# ---------------------------------------------------------------- forward parity


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_matches_reference(device, dtype):
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for s in sample_inputs(device, dtype):
        out = s.call(ops.qk_norm_rope)
        assert out.shape == s.qk.shape and out.dtype == dtype and out.is_contiguous(), s
        torch.testing.assert_close(out, _ref64(s).to(dtype), **tol, msg=lambda m: f"{s}: {m}")
        torch.testing.assert_close(out, s.call(qk_norm_rope_ref), **tol, msg=lambda m: f"{s}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_norm_only_equals_norm_then_rope2d(device):
    """With coords/freqs the op is its normalize-only result rotated by rope2d (in float64, where the
    intermediate rounding of the published order is exact enough to compare to 1e-12)."""
    for s in sample_inputs(device, torch.float64):
        if s.freqs is None:
            continue
        normed = ops.qk_norm_rope(s.qk, s.weight, eps=s.eps)
        want = ops.rope2d(normed, s.coords, s.freqs, interleaved=s.interleaved)
        torch.testing.assert_close(s.call(ops.qk_norm_rope), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_view_equals_separate_q_and_k(device, dtype):
    B, N, H, D = 3, 11, 4, 16
    qkv = torch.randn(B, N, 3 * H * D, device=device).to(dtype)
    coords = sequence_coords((3, 3), prefix=2, device=device)
    weight = torch.rand(2, D, device=device) + 0.5
    for freqs in (axial_freqs(D, device=device), torch.randn(H, 2, D // 2, device=device)):
        x = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        both = ops.qk_norm_rope(x[:2], weight, coords, freqs)
        again = ops.qk_norm_rope(x[:2].contiguous(), weight, coords, freqs)
        assert torch.equal(both, again)
        # q alone, as a [2, ...] stack with itself, gives the q half
        q_only = ops.qk_norm_rope(x[0:1].expand(2, -1, -1, -1, -1), weight[0:1].expand(2, -1), coords, freqs)
        assert torch.equal(both[0], q_only[0])


def test_jit_axial_prefix_tokens_not_rotated():
    B, H, N, D = 2, 3, 4 + 9, 16
    qk = torch.randn(2, B, H, N, D)
    weight = torch.rand(2, D) + 0.5
    out = ops.qk_norm_rope(qk, weight, sequence_coords((3, 3), prefix=4), axial_freqs(D))
    normed = ops.qk_norm_rope(qk, weight)
    assert torch.equal(out[..., :1, :], normed[..., :1, :])


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("freqs_grad", [True, False], ids=["all", "no_freqs"])
def test_gradcheck(device, freqs_grad):
    for s in sample_inputs(device, torch.float64, requires_grad=True, freqs_grad=freqs_grad):
        use_freqs = freqs_grad and s.freqs is not None
        inputs = (s.base, s.weight, s.freqs) if use_freqs else (s.base, s.weight)

        def fn(base, weight, freqs=s.freqs, s=s):
            return ops.qk_norm_rope(s.view(base), weight, s.coords, freqs, **s.kwargs())

        big = s.base.numel() > 2000
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=big), s


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference_autograd(device):
    for s in sample_inputs(device, torch.float64, requires_grad=True):
        leaves = [s.base, s.weight] + ([s.freqs] if s.freqs is not None else [])
        out = s.call(ops.qk_norm_rope)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, g)
        want = torch.autograd.grad(s.call(qk_norm_rope_ref), leaves, g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{s}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_raises(device):
    """gradgradcheck does not apply: the backward is a kernel of its own without a derivative."""
    s = sample_inputs(device, torch.float64, requires_grad=True)[0]
    out = s.call(ops.qk_norm_rope)
    gx, gw = torch.autograd.grad(out, (s.base, s.weight), torch.randn_like(out), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        (gx.sum() + gw.sum()).backward()


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    s = next(s for s in sample_inputs(device, torch.float32, requires_grad=True) if s.name == "jit_like")
    out = s.call(ops.qk_norm_rope)
    g = torch.randn_like(out)
    leaves = (s.base, s.weight, s.freqs)
    first = torch.autograd.grad(out, leaves, g, retain_graph=True)
    for threads in (1, torch.get_num_threads()):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            again = torch.autograd.grad(out, leaves, g, retain_graph=True)
        finally:
            torch.set_num_threads(prev)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_gradient_dtype_follows_weight(device):
    qk = torch.randn(2, 2, 2, 3, 8, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(2, 8, device=device, requires_grad=True)  # float32, as under autocast
    freqs = axial_freqs(8, device=device).requires_grad_()
    out = ops.qk_norm_rope(qk, weight, sequence_coords((1, 3), device=device), freqs)
    gq, gw, gf = torch.autograd.grad(out.float().sum(), (qk, weight, freqs))
    assert gq.dtype == torch.bfloat16 and gw.dtype == torch.float32 and gf.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_error_within_twice_eager(device, dtype):
    """flash-attention's rule: against a float64 reference, the kernel's error is at most about
    twice that of the same-precision eager implementation (jitrope.reference), forward and backward."""
    for s in sample_inputs(device, dtype, requires_grad=True):
        if s.qk.numel() == 0:
            continue
        leaves = [s.base, s.weight] + ([s.freqs] if s.freqs is not None else [])
        out = s.call(ops.qk_norm_rope)
        eager = s.call(qk_norm_rope_ref)
        g = torch.randn_like(out)
        base64 = s.base.detach().double().requires_grad_()
        w64 = s.weight.detach().double().requires_grad_()
        f64 = None if s.freqs is None else s.freqs.detach().double().requires_grad_()
        ref = qk_norm_rope_ref(
            s.view(base64), w64, None if s.coords is None else s.coords.double(), f64, **s.kwargs())
        leaves64 = [base64, w64] + ([f64] if f64 is not None else [])
        names = ["out", "grad_qk", "grad_weight", "grad_freqs"]
        got = [out, *torch.autograd.grad(out, leaves, g)]
        eag = [eager, *torch.autograd.grad(eager, leaves, g)]
        want = [ref, *torch.autograd.grad(ref, leaves64, g.double())]
        for name, k, e, r in zip(names, got, eag, want):
            assert_kernel_error_within_eager(f"{s} {name}", k, e, r)


# ---------------------------------------------------------------- opcheck and torch.compile


OPCHECK_SAMPLES = ["qkv_view", "norm_only", "channel_stride_2", "batch_0"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPCHECK_SAMPLES)
def test_opcheck(device, name):
    s = next(s for s in sample_inputs(device, torch.float32, requires_grad=True) if s.name == name)
    args = (s.qk, s.weight, s.coords, s.freqs, s.eps, s.interleaved)
    torch.library.opcheck(torch.ops.jitrope.qk_norm_rope.default, args)
    # qk_norm_rope_backward is not differentiable itself (see test_double_backward_raises).
    g = torch.randn(s.qk.shape, device=device)
    freqs = None if s.freqs is None else s.freqs.detach()
    for freqs_grad in ([True, False] if freqs is not None else [False]):
        torch.library.opcheck(
            torch.ops.jitrope.qk_norm_rope_backward.default,
            (g, s.qk.detach(), s.weight.detach(), s.coords, freqs, s.eps, s.interleaved, freqs_grad),
        )


def _attention(qkv, weight, coords, freqs, H, D, fused):
    B, N, _ = qkv.shape
    x = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    fn = ops.qk_norm_rope if fused else qk_norm_rope_ref
    q, k = fn(x[:2], weight, coords, freqs).unbind(0)
    return F.scaled_dot_product_attention(q, k, x[2]).transpose(1, 2).reshape(B, N, H * D)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    B, H, D, N = 2, 2, 8, 6
    qkv = torch.randn(B, N, 3 * H * D, device=device, requires_grad=True)
    weight = (torch.rand(2, D, device=device) + 0.5).requires_grad_()
    coords = torch.rand(N, 2, device=device) * 3
    freqs = torch.randn(H, 2, D // 2, device=device, requires_grad=True)
    compiled = torch.compile(_attention, fullgraph=True, backend=backend)
    out = compiled(qkv, weight, coords, freqs, H, D, True)
    ref = _attention(qkv, weight, coords, freqs, H, D, False)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, (qkv, weight, freqs), g), torch.autograd.grad(ref, (qkv, weight, freqs), g))
    no_rope = torch.compile(_attention, fullgraph=True, backend=backend)(qkv, weight, None, None, H, D, True)
    torch.testing.assert_close(no_rope, _attention(qkv, weight, None, None, H, D, False))


# ---------------------------------------------------------------- bad input


def _bad_inputs(device):
    qk = torch.randn(2, 2, 3, 5, 8, device=device)
    w = torch.ones(2, 8, device=device)
    c = torch.rand(5, 2, device=device)
    f = torch.rand(2, 4, device=device)
    f_ = ops.qk_norm_rope
    return [
        ("qk rank", lambda: f_(qk[0], w), r"qk must have shape \[2, B, H, N, D\] \(q and k\), got \[2, 3, 5, 8\]"),
        ("qk first dim", lambda: f_(qk[:1], w), r"qk must have shape \[2, B, H, N, D\] \(q and k\), got \[1, 2, 3, 5, 8\]"),
        ("D odd", lambda: f_(qk[..., :7], w[:, :7]), r"qk must have an even last dim D"),
        ("qk integer", lambda: f_(qk.long(), w), r"qk must be float16, bfloat16, float32 or float64, got torch.int64"),
        ("weight shape", lambda: f_(qk, w[:, :6]), r"weight must have shape \[2, D\] = \[2, 8\].*got \[2, 6\]"),
        ("weight integer", lambda: f_(qk, w.long()), r"weight must be a floating tensor \[2, D\], got dtype torch.int64"),
        ("eps", lambda: f_(qk, w, eps=-1.0), r"eps must be a finite number >= 0, got -1"),
        ("coords alone", lambda: f_(qk, w, c, None), r"coords and freqs must be given together"),
        ("coords N", lambda: f_(qk, w, c[:4], f), r"coords must have shape \[N, 2\] = \[5, 2\].*got \[4, 2\]"),
        ("freqs H", lambda: f_(qk, w, c, torch.rand(2, 2, 4, device=device)), r"freqs must have shape .*\[H, 2, D/2\] = \[3, 2, 4\]"),
        ("freqs integer", lambda: f_(qk, w, c, f.long()), r"freqs must be a floating tensor"),
        ("backward grad_out", lambda: torch.ops.jitrope.qk_norm_rope_backward(qk[:, :1], qk, w, c, f, 1e-6, True, True),
         r"qk_norm_rope_backward: grad_out must have qk's shape \[2, 2, 3, 5, 8\], got \[2, 1, 3, 5, 8\]"),
        ("backward dtype", lambda: torch.ops.jitrope.qk_norm_rope_backward(qk.double(), qk, w, c, f, 1e-6, True, True),
         r"grad_out must have qk's dtype torch.float32, got torch.float64"),
        ("backward freqs_grad", lambda: torch.ops.jitrope.qk_norm_rope_backward(qk, qk, w, None, None, 1e-6, True, True),
         r"freqs_grad needs coords and freqs"),
    ]


BAD_NAMES = [b[0] for b in _bad_inputs("cpu")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_inputs_raise_clear_errors(device, name):
    _, call, pattern = next(b for b in _bad_inputs(device) if b[0] == name)
    with pytest.raises(RuntimeError, match=pattern):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_raises():
    qk = torch.randn(2, 2, 3, 5, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"weight must be on qk's device cuda:0, got cpu"):
        ops.qk_norm_rope(qk, torch.ones(2, 8))
    with pytest.raises(RuntimeError, match=r"coords must be on qk's device cuda:0, got cpu"):
        ops.qk_norm_rope(qk, torch.ones(2, 8, device="cuda"), torch.rand(5, 2), torch.rand(2, 4, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_graph_capture():
    """The CUDA kernels agree with the CPU ones and run inside a CUDA graph (no host syncs)."""
    s_cpu = sample_inputs("cpu", torch.float32, requires_grad=True)
    s_gpu = sample_inputs("cuda", torch.float32, requires_grad=True)
    for a, b in zip(s_cpu, s_gpu):
        torch.testing.assert_close(a.call(ops.qk_norm_rope), b.call(ops.qk_norm_rope).cpu(), rtol=1e-5, atol=1e-5)
    s = next(s for s in s_gpu if s.name == "jit_like")
    qk = s.qk.detach().clone()
    g = torch.randn(qk.shape, device="cuda")
    args = (qk, s.weight.detach(), s.coords, s.freqs.detach(), s.eps, s.interleaved)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.jitrope.qk_norm_rope(*args)
        torch.ops.jitrope.qk_norm_rope_backward(g, *args[:4], s.eps, s.interleaved, True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.jitrope.qk_norm_rope(*args)
        grads = torch.ops.jitrope.qk_norm_rope_backward(g, *args[:4], s.eps, s.interleaved, True)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, torch.ops.jitrope.qk_norm_rope(*args))
    for a, b in zip(grads, torch.ops.jitrope.qk_norm_rope_backward(g, *args[:4], s.eps, s.interleaved, True)):
        assert torch.equal(a, b)

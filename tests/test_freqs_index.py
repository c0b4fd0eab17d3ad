"""Per-sequence frequencies (SPEC §10): rope2d, rope2d_ and qk_norm_rope with ``freqs_index``
(int64 [N]), where ``freqs`` gains a leading table dim ([F, 2, D/2] or [F, H, 2, D/2]) and token n
turns by table ``freqs_index[n]``. Parity with the float64 reference, float64 gradcheck, opcheck,
the low-precision rule, the single-table case bit for bit, deterministic per-table gradients, the
argument errors, and the packed [2, 1, H, T, D] layout; on every device present."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, List

import pytest
import torch
from conftest import DEVICES, INPLACE_OPCHECK_UTILS, assert_kernel_error_within_eager
from torch import Tensor

import jitrope
from jitrope import ops
from jitrope.reference import qk_norm_rope_ref, rope2d_ref
from jitrope.rope import axial_freqs, grid_coords

pytestmark = pytest.mark.skipif(not jitrope.HAS_EXTENSION, reason=f"extension not built: {jitrope.EXTENSION_ERROR}")

LOW_PRECISION = [torch.float16, torch.bfloat16]


@dataclass
class Sample:
    name: str
    base: Tensor  # the leaf that owns qk's memory
    view: Callable[[Tensor], Tensor]  # qk = view(base): [2, B, H, N, D], often non-contiguous
    coords: Tensor
    freqs: Tensor  # [F, 2, D/2] or [F, H, 2, D/2]
    index: Tensor  # int64 [N]
    weight: Tensor  # [2, D], for qk_norm_rope
    interleaved: bool

    @property
    def x(self) -> Tensor:
        return self.view(self.base)

    def rope(self, fn=ops.rope2d, x=None, freqs=None):
        x = self.x if x is None else x
        freqs = self.freqs if freqs is None else freqs
        return fn(x, self.coords, freqs, interleaved=self.interleaved, freqs_index=self.index)

    def qk_norm(self, fn=ops.qk_norm_rope, x=None, weight=None, freqs=None):
        x = self.x if x is None else x
        weight = self.weight if weight is None else weight
        freqs = self.freqs if freqs is None else freqs
        return fn(x, weight, self.coords, freqs, interleaved=self.interleaved, freqs_index=self.index)

    def __repr__(self) -> str:
        shapes = f"x={tuple(self.x.shape)}, freqs={tuple(self.freqs.shape)}"
        return f"Sample({self.name}, {shapes}, index={self.index.tolist()})"


def _qkv_view(B, N, H, D):
    return lambda t: t.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)[:2]


def sample_inputs(device, dtype, requires_grad=False) -> List[Sample]:
    """Random inputs: views of a qkv projection, strided and transposed views, B = 0, shared and
    per-head tables, both pair conventions, fractional coordinates with a (0, 0) prefix token, table
    indices in runs (packed sequences), shuffled, strided, and leaving some tables unused."""
    gen = torch.Generator().manual_seed(20260101)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def runs(*lengths):
        return torch.cat([torch.full((n,), f, dtype=torch.int64) for f, n in enumerate(lengths)])

    contiguous = lambda t: t  # noqa: E731
    # (name, base shape, view, (B, H, N, D), F, per_head, interleaved, index)
    specs = [
        ("qkv_view_runs", (2, 9, 3 * 3 * 8), _qkv_view(2, 9, 3, 8), (2, 3, 9, 8), 3, False, True, runs(1, 4, 4)),
        (
            "qkv_view_per_head_half_split",
            (1, 7, 3 * 2 * 12),
            _qkv_view(1, 7, 2, 12),
            (1, 2, 7, 12),
            2,
            True,
            False,
            torch.tensor([1, 0, 0, 1, 1, 0, 1]),
        ),
        ("shuffled_odd_half", (2, 2, 1, 11, 6), contiguous, (2, 1, 11, 6), 5, False, False, None),
        ("channel_stride_2", (2, 1, 2, 5, 16), lambda t: t[..., ::2], (1, 2, 5, 8), 2, True, True, runs(3, 2)),
        (
            "heads_tokens_transposed",
            (2, 2, 6, 3, 4),
            lambda t: t.transpose(2, 3),
            (2, 3, 6, 4),
            4,
            True,
            True,
            torch.tensor([3, 3, 0, 3, 2, 0]),
        ),
        ("batch_0", (2, 0, 2, 3, 4), contiguous, (0, 2, 3, 4), 2, False, True, torch.tensor([1, 0, 1])),
        ("unused_tables", (2, 3, 2, 10, 8), contiguous, (3, 2, 10, 8), 6, False, True, runs(0, 5, 0, 5)),
        (
            "jit_like_packed",
            (1, 40, 3 * 2 * 64),
            _qkv_view(1, 40, 2, 64),
            (1, 2, 40, 64),
            3,
            False,
            True,
            runs(16, 9, 15),
        ),
    ]
    samples = []
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, shape, view, (B, H, N, D), F, per_head, interleaved, index in specs:
        base = rnd(*shape)
        coords = torch.rand(N, 2, generator=gen, dtype=torch.float64) * 20 - 4
        coords[0] = 0  # a prefix / class token
        freqs = rnd(F, H, 2, D // 2) if per_head else rnd(F, 2, D // 2)
        if index is None:
            index = torch.randint(0, F, (N,), generator=gen)
        index = index.to(device)
        if name == "heads_tokens_transposed":
            index = torch.stack([index, index], 1)[:, 1]  # a strided index
            freqs = freqs.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous tables
        weight = torch.rand(2, D, generator=gen, dtype=torch.float64) + 0.5
        samples.append(
            Sample(
                name,
                base.to(device=device, dtype=dtype).requires_grad_(requires_grad),
                view,
                coords.to(device=device, dtype=acc),
                freqs.to(device=device, dtype=acc).requires_grad_(requires_grad),
                index,
                weight.to(device=device, dtype=acc).requires_grad_(requires_grad),
                interleaved,
            )
        )
        assert samples[-1].x.shape == (2, B, H, N, D), name
    assert not samples[4].index.is_contiguous() and not samples[4].freqs.is_contiguous()
    return samples


SAMPLE_NAMES = [s.name for s in sample_inputs("cpu", torch.float64)]


# ---------------------------------------------------------------- the reference


def test_reference_is_the_plain_reference_per_table():
    """Token n of the indexed reference is token n of the plain reference with freqs[index[n]]."""
    for s in sample_inputs("cpu", torch.float64):
        out = s.rope(rope2d_ref)
        for f in range(s.freqs.shape[0]):
            plain = rope2d_ref(s.x, s.coords, s.freqs[f], interleaved=s.interleaved)
            mask = s.index == f
            assert torch.equal(out[..., mask, :], plain[..., mask, :]), (s, f)


# ---------------------------------------------------------------- forward parity


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_matches_reference(device, dtype):
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for s in sample_inputs(device, dtype):
        x64, c64, f64, w64 = s.x.double(), s.coords.double(), s.freqs.double(), s.weight.double()
        ref = rope2d_ref(x64, c64, f64, interleaved=s.interleaved, freqs_index=s.index)
        torch.testing.assert_close(s.rope().double(), ref, **tol, msg=lambda m: f"{s} rope2d: {m}")
        ref = qk_norm_rope_ref(x64, w64, c64, f64, interleaved=s.interleaved, freqs_index=s.index)
        torch.testing.assert_close(s.qk_norm().double(), ref, **tol, msg=lambda m: f"{s} qk_norm_rope: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_inplace_matches_out_of_place(device, dtype):
    for s in sample_inputs(device, dtype):
        expected = s.rope()
        base = s.base.detach().clone()
        y = s.view(base)
        ret = ops.rope2d_(y, s.coords, s.freqs.detach(), interleaved=s.interleaved, freqs_index=s.index)
        assert ret is y
        assert torch.equal(y, expected), s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_error_within_twice_eager(device, dtype):
    """flash-attention's rule against a float64 reference, forward and every gradient."""
    for s in sample_inputs(device, dtype, requires_grad=True):
        if s.x.numel() == 0:
            continue
        base64 = s.base.detach().double().requires_grad_()
        freqs64 = s.freqs.detach().double().requires_grad_()
        weight64 = s.weight.detach().double().requires_grad_()
        for op, ref_op, leaves, call in [
            (ops.rope2d, rope2d_ref, (s.base, s.freqs), lambda fn, x, w, f: s.rope(fn, x, f)),
            (
                ops.qk_norm_rope,
                qk_norm_rope_ref,
                (s.base, s.weight, s.freqs),
                lambda fn, x, w, f: s.qk_norm(fn, x, w, f),
            ),
        ]:
            out = call(op, s.x, s.weight, s.freqs)
            eager = call(ref_op, s.x, s.weight, s.freqs)
            ref = call(ref_op, s.view(base64), weight64, freqs64)
            leaves64 = (base64, freqs64) if len(leaves) == 2 else (base64, weight64, freqs64)
            g = torch.randn_like(out)
            grads = torch.autograd.grad(out, leaves, g)
            grads_eager = torch.autograd.grad(eager, leaves, g)
            grads_ref = torch.autograd.grad(ref, leaves64, g.double())
            assert_kernel_error_within_eager(f"{s} {op.__name__} out", out, eager, ref)
            for i, (k, e, r) in enumerate(zip(grads, grads_eager, grads_ref)):
                assert_kernel_error_within_eager(f"{s} {op.__name__} grad {i}", k, e, r)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_rope2d(device):
    for s in sample_inputs(device, torch.float64, requires_grad=True):

        def fn(base, freqs, s=s):
            return s.rope(x=s.view(base), freqs=freqs)

        assert torch.autograd.gradcheck(fn, (s.base, s.freqs), fast_mode=s.base.numel() > 2000), s


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_qk_norm_rope(device):
    for s in sample_inputs(device, torch.float64, requires_grad=True):

        def fn(base, weight, freqs, s=s):
            return s.qk_norm(x=s.view(base), weight=weight, freqs=freqs)

        assert torch.autograd.gradcheck(fn, (s.base, s.weight, s.freqs), fast_mode=s.base.numel() > 2000), s


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference_autograd(device):
    for s in sample_inputs(device, torch.float64, requires_grad=True):
        for op, ref_op, leaves, call in [
            (ops.rope2d, rope2d_ref, (s.base, s.freqs), s.rope),
            (ops.qk_norm_rope, qk_norm_rope_ref, (s.base, s.weight, s.freqs), s.qk_norm),
        ]:
            out = call(op)
            g = torch.randn_like(out)
            got = torch.autograd.grad(out, leaves, g)
            want = torch.autograd.grad(call(ref_op), leaves, g)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{s} {op.__name__}: {m}")
            unused = torch.ones(s.freqs.shape[0], dtype=torch.bool, device=device)
            unused[s.index] = False
            assert torch.equal(got[-1][unused], torch.zeros_like(got[-1][unused])), s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_freqs_gradient_is_deterministic(device, dtype):
    for s in sample_inputs(device, dtype, requires_grad=True):
        for call, leaves in [(s.rope, (s.base, s.freqs)), (s.qk_norm, (s.base, s.weight, s.freqs))]:
            out = call()
            g = torch.randn_like(out)
            first = torch.autograd.grad(out, leaves, g, retain_graph=True)
            for threads in (1, torch.get_num_threads()):
                prev = torch.get_num_threads()
                torch.set_num_threads(threads)
                try:
                    again = torch.autograd.grad(call(), leaves, g)
                finally:
                    torch.set_num_threads(prev)
                for a, b in zip(first, again):
                    assert torch.equal(a, b), s


# ---------------------------------------------------------------- one table is the plain op


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_single_table_equals_plain_call_bit_for_bit(device, dtype):
    """F = 1 (every index 0) gives the plain op's bits: output and every gradient."""
    for s in sample_inputs(device, dtype, requires_grad=True):
        plain_freqs = s.freqs.detach()[0].clone().requires_grad_()
        table = s.freqs.detach()[:1].clone().requires_grad_()
        zeros = torch.zeros_like(s.index)
        for op in ("rope2d", "qk_norm_rope"):
            if op == "rope2d":
                plain = ops.rope2d(s.x, s.coords, plain_freqs, interleaved=s.interleaved)
                indexed = ops.rope2d(s.x, s.coords, table, interleaved=s.interleaved, freqs_index=zeros)
                leaves = (s.base,)
            else:
                plain = ops.qk_norm_rope(s.x, s.weight, s.coords, plain_freqs, interleaved=s.interleaved)
                indexed = ops.qk_norm_rope(s.x, s.weight, s.coords, table, interleaved=s.interleaved, freqs_index=zeros)
                leaves = (s.base, s.weight)
            assert torch.equal(plain, indexed), (s, op)
            g = torch.randn_like(plain)
            got_plain = torch.autograd.grad(plain, (*leaves, plain_freqs), g)
            got_indexed = torch.autograd.grad(indexed, (*leaves, table), g)
            for a, b in zip(got_plain, got_indexed):
                assert torch.equal(a, b.reshape(a.shape)), (s, op)


@pytest.mark.parametrize("device", DEVICES)
def test_one_table_of_many_equals_the_plain_call_with_it(device):
    s = sample_inputs(device, torch.float32)[0]
    for f in range(s.freqs.shape[0]):
        index = torch.full_like(s.index, f)
        got = ops.rope2d(s.x, s.coords, s.freqs, interleaved=s.interleaved, freqs_index=index)
        assert torch.equal(got, ops.rope2d(s.x, s.coords, s.freqs[f], interleaved=s.interleaved))


# ---------------------------------------------------------------- opcheck


OPCHECK_SAMPLES = ["qkv_view_runs", "heads_tokens_transposed", "batch_0", "shuffled_odd_half"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPCHECK_SAMPLES)
def test_opcheck(device, name):
    s = next(s for s in sample_inputs(device, torch.float32, requires_grad=True) if s.name == name)
    x, c, f, w, i, il = s.x, s.coords, s.freqs, s.weight, s.index, s.interleaved
    jit = torch.ops.jitrope
    torch.library.opcheck(jit.rope2d.default, (x, c, f, il, i))
    torch.library.opcheck(jit.qk_norm_rope.default, (x, w, c, f, 1e-6, il, i))
    with torch.no_grad():
        y = s.view(s.base.detach().clone())
        torch.library.opcheck(jit.rope2d_.default, (y, c, f.detach(), il, i), test_utils=INPLACE_OPCHECK_UTILS)
    g = torch.randn(x.shape, device=device)
    for fwd_x in (x.detach(), None):
        torch.library.opcheck(jit.rope2d_backward.default, (g, c, f.detach(), fwd_x, il, i))
    for freqs_grad in (True, False):
        args = (g, x.detach(), w.detach(), c, f.detach(), 1e-6, il, freqs_grad, i)
        torch.library.opcheck(jit.qk_norm_rope_backward.default, args)


# ---------------------------------------------------------------- packed sequences


def _packed(device, sizes, H, D, prefix):
    """A packed batch of images of `sizes` (grids), each with `prefix` tokens at (0, 0): a
    [1, T, 3*H*D] qkv projection, its [2, 1, H, T, D] q/k view, per-token coords, each image's
    token range and table index."""
    coords, spans, index = [], [], []
    t = 0
    for k, (gh, gw) in enumerate(sizes):
        c = torch.cat([torch.zeros(prefix, 2), grid_coords(gh, gw)])
        coords.append(c)
        spans.append((t, t + c.shape[0]))
        index.append(torch.full((c.shape[0],), k, dtype=torch.int64))
        t += c.shape[0]
    qkv = torch.randn(1, t, 3 * H * D, device=device)
    return qkv, _qkv_view(1, t, H, D)(qkv), torch.cat(coords).to(device), spans, torch.cat(index).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_view_equals_one_call_per_image(device):
    """rope2d and qk_norm_rope on a packed [2, 1, H, T, D] view with per-token coords: nothing to
    change, each image's tokens come out as a call on that image alone gives them."""
    H, D = 2, 16
    sizes = [(4, 4), (2, 6), (3, 5)]
    qkv, qk, coords, spans, _ = _packed(device, sizes, H, D, prefix=2)
    freqs = axial_freqs(D).to(device)
    weight = torch.rand(2, D, device=device) + 0.5
    packed_rope = ops.rope2d(qk, coords, freqs)
    packed_norm = ops.qk_norm_rope(qk, weight, coords, freqs)
    for a, b in spans:
        assert torch.equal(packed_rope[..., a:b, :], ops.rope2d(qk[..., a:b, :], coords[a:b], freqs))
        assert torch.equal(packed_norm[..., a:b, :], ops.qk_norm_rope(qk[..., a:b, :], weight, coords[a:b], freqs))


@pytest.mark.parametrize("device", DEVICES)
def test_packed_view_with_a_table_per_image(device):
    """Per-image frequencies (e.g. NTK-scaled per resolution) through freqs_index equal one call
    per image with its own table, forward and gradients."""
    H, D = 2, 16
    sizes = [(4, 4), (2, 6), (3, 5)]
    qkv, _, coords, spans, index = _packed(device, sizes, H, D, prefix=1)
    qkv.requires_grad_()
    qk = _qkv_view(1, qkv.shape[1], H, D)(qkv)
    tables = torch.stack([axial_freqs(D, theta=theta) for theta in (100.0, 1000.0, 10000.0)]).to(device)
    tables.requires_grad_()
    out = ops.rope2d(qk, coords, tables, freqs_index=index)
    g = torch.randn_like(out)
    gx, gf = torch.autograd.grad(out, (qkv, tables), g)
    want_gf = torch.zeros_like(tables)
    for k, (a, b) in enumerate(spans):
        part = qk[..., a:b, :].detach().requires_grad_()
        table = tables.detach()[k].clone().requires_grad_()
        one = ops.rope2d(part, coords[a:b], table)
        assert torch.equal(out[..., a:b, :], one)
        px, pf = torch.autograd.grad(one, (part, table), g[..., a:b, :])
        torch.testing.assert_close(_qkv_view(1, qkv.shape[1], H, D)(gx)[..., a:b, :], px, rtol=0, atol=0)
        want_gf[k] = pf
    torch.testing.assert_close(gf, want_gf, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- errors


def _error_cases(device):
    x = torch.randn(2, 2, 3, 5, 8, device=device)
    c = torch.rand(5, 2, device=device)
    f = torch.randn(4, 2, 4, device=device)
    i = torch.tensor([0, 1, 2, 3, 0], device=device)
    w = torch.ones(2, 8, device=device)
    jit = torch.ops.jitrope

    def rope(freqs=f, index=i):
        return ops.rope2d(x, c, freqs, freqs_index=index)

    def idx(*values):
        return torch.tensor(values, device=device)

    shape_hint = "(per head) with freqs_index for x of shape [2, 2, 3, 5, 8]"
    return [
        (
            "int32",
            lambda: rope(index=i.int()),
            "rope2d: freqs_index must be an int64 tensor [N], got dtype torch.int32",
        ),
        ("float", lambda: rope(index=i.float()), "freqs_index must be an int64 tensor [N], got dtype torch.float32"),
        ("too long", lambda: rope(index=idx(0, 0, 0, 0, 0, 0)), "freqs_index must have shape [N] = [5]"),
        ("2-D", lambda: rope(index=i[None]), "freqs_index must have shape [N] = [5] (one table per token of x"),
        ("negative", lambda: rope(index=idx(0, 1, -1, 3, 0)), "freqs_index values must be in [0, F) = [0, 4)"),
        ("too large", lambda: rope(index=idx(0, 4, 2, 3, 0)), "got values in [0, 4]"),
        ("meta", lambda: rope(index=i.to("meta")), f"rope2d: freqs_index must be on x's device {x.device}, got meta"),
        (
            "shared freqs without table dim",
            lambda: rope(freqs=f[0]),
            f"freqs must have shape [F, 2, D/2] = [F, 2, 4] (shared) or [F, H, 2, D/2] = [F, 3, 2, 4] {shape_hint}, "
            "got [2, 4]",
        ),
        (
            "per-head freqs, wrong H",
            lambda: rope(freqs=torch.randn(4, 2, 2, 4, device=device)),
            f"{shape_hint}, got [4, 2, 2, 4]",
        ),
        ("no tables", lambda: rope(freqs=f[:0]), "freqs_index values must be in [0, F) = [0, 0)"),
        (
            "in place",
            lambda: ops.rope2d_(x.clone(), c, f, freqs_index=i.int()),
            "rope2d_: freqs_index must be an int64 tensor",
        ),
        (
            "backward",
            lambda: jit.rope2d_backward(x, c, f, x, True, i + 4),
            "rope2d_backward: freqs_index values must be in [0, F) = [0, 4)",
        ),
        (
            "qk_norm_rope",
            lambda: ops.qk_norm_rope(x, w, c, f, freqs_index=i[:4]),
            "qk_norm_rope: freqs_index must have shape [N] = [5]",
        ),
        (
            "qk_norm_rope without rotation",
            lambda: ops.qk_norm_rope(x, w, freqs_index=i),
            "qk_norm_rope: freqs_index needs coords and freqs",
        ),
        (
            "qk_norm_rope_backward",
            lambda: jit.qk_norm_rope_backward(x, x, w, c, f, 1e-6, True, True, -i),
            "qk_norm_rope_backward: freqs_index values must be in [0, F)",
        ),
    ]


ERROR_NAMES = [name for name, _, _ in _error_cases("cpu")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ERROR_NAMES)
def test_bad_freqs_index_is_refused(device, name):
    _, call, message = next(case for case in _error_cases(device) if case[0] == name)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call()

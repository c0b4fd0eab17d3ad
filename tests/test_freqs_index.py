"""Per-sequence frequencies (docs/ops.md, packed batches): rope2d, rope2d_ and qk_norm_rope with ``freqs_index``
(int64 [N]), where ``freqs`` gains a leading table dim ([F, 2, D/2] or [F, H, 2, D/2]) and token n
turns by table ``freqs_index[n]``. The op battery (tests/op_battery.py) runs rope2d and qk_norm_rope
over one input generator with ``freqs_index=`` (parity with the float64 reference, float64 gradcheck,
opcheck of the op, its in-place twin and its backward, the low-precision rule, deterministic
per-table gradients, views, B = 0, torch.compile, CUDA against CPU); beside it: the reference per
table, the in-place op, zero gradients of unused tables, the single-table case bit for bit, the
argument errors, and the packed [2, 1, H, T, D] layout; on every device present."""

from __future__ import annotations

import re
from typing import List

import pytest
import test_qk_norm_rope
import test_rope2d
import torch
from conftest import DEVICES
from op_battery import Leaf, OpSample

import jitrope
from jitrope import ops
from jitrope.reference import rope2d_ref
from jitrope.rope import axial_freqs, grid_coords

pytestmark = pytest.mark.skipif(not jitrope.HAS_EXTENSION, reason=f"extension not built: {jitrope.EXTENSION_ERROR}")

OPS = {"rope2d": ops.rope2d, "qk_norm_rope": ops.qk_norm_rope}


def _qkv_view(B, N, H, D):
    return lambda t: t.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)[:2]


def sample_inputs(device, dtype, requires_grad=False, op="rope2d") -> List[OpSample]:
    """Random inputs of ``op`` (rope2d or qk_norm_rope): views of a qkv projection, strided and
    transposed views, B = 0, shared and per-head tables, both pair conventions, fractional coordinates
    with a (0, 0) prefix token, table indices in runs (packed sequences), shuffled, strided, and leaving
    some tables unused. Both ops get the same values; leaves: x's base (``x`` or ``qk``), for
    qk_norm_rope ``weight``, and ``freqs``."""
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
        base = base.to(device=device, dtype=dtype).requires_grad_(requires_grad)
        coords = coords.to(device=device, dtype=acc)
        freqs = freqs.to(device=device, dtype=acc).requires_grad_(requires_grad)
        kwargs = dict(interleaved=interleaved, freqs_index=index)
        if op == "rope2d":
            samples.append(OpSample(name, (Leaf("x", view), coords, Leaf("freqs")), kwargs, dict(x=base, freqs=freqs)))
        else:
            weight = weight.to(device=device, dtype=acc).requires_grad_(requires_grad)
            leaves = dict(qk=base, weight=weight, freqs=freqs)
            args = (Leaf("qk", view), Leaf("weight"), coords, Leaf("freqs"))
            samples.append(OpSample(name, args, dict(eps=1e-6, **kwargs), leaves))
        assert samples[-1].inputs()[0][0].shape == (2, B, H, N, D), name
    strided = samples[4]
    assert not strided.kwargs["freqs_index"].is_contiguous() and not strided.leaves["freqs"].is_contiguous()
    return samples


OPCHECK_SAMPLES = ("qkv_view_runs", "heads_tokens_transposed", "batch_0", "shuffled_odd_half")


# ---------------------------------------------------------------- the battery


class TestRope2DFreqsIndex(test_rope2d.TestRope2D):
    """TestRope2D's battery (its reference, layout check and opcheck of rope2d, rope2d_ and
    rope2d_backward, which pass freqs_index on) over the freqs_index samples."""

    opcheck_samples = OPCHECK_SAMPLES
    compile_samples = ("qkv_view_per_head_half_split",)  # a strided qkv view, per-head tables, half-split

    def sample_inputs(self, device, dtype, requires_grad=False):
        return sample_inputs(device, dtype, requires_grad, op="rope2d")


class TestQkNormRopeFreqsIndex(test_qk_norm_rope.TestQkNormRope):
    """TestQkNormRope's battery (opcheck of qk_norm_rope and qk_norm_rope_backward, which pass
    freqs_index on) over the freqs_index samples."""

    opcheck_samples = OPCHECK_SAMPLES
    compile_samples = ("qkv_view_per_head_half_split",)
    gradcheck_fast_above = 2000  # TestQkNormRope's 1000 is for its wide head; these full Jacobians are quick

    def sample_inputs(self, device, dtype, requires_grad=False):
        return sample_inputs(device, dtype, requires_grad, op="qk_norm_rope")


# ---------------------------------------------------------------- the reference


def test_reference_is_the_plain_reference_per_table():
    """Token n of the indexed reference is token n of the plain reference with freqs[index[n]]."""
    for s in sample_inputs("cpu", torch.float64):
        (x, coords, freqs), kw = s.inputs()
        out = s.call(rope2d_ref)
        for f in range(freqs.shape[0]):
            plain = rope2d_ref(x, coords, freqs[f], interleaved=kw["interleaved"])
            mask = kw["freqs_index"] == f
            assert torch.equal(out[..., mask, :], plain[..., mask, :]), (s, f)


# ---------------------------------------------------------------- in place


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_inplace_matches_out_of_place(device, dtype):
    for s in sample_inputs(device, dtype):
        (_, coords, freqs), kw = s.inputs()
        expected = s.call(ops.rope2d)
        y = s.inputs(s.map_leaves(lambda t: t.detach().clone()))[0][0]  # the same view of a copy
        ret = ops.rope2d_(y, coords, freqs.detach(), **kw)
        assert ret is y
        assert torch.equal(y, expected), s


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(OPS))
def test_tables_no_token_uses_get_a_zero_gradient(device, op):
    """The battery compares the freqs gradient with the reference's; a table no token picks gets
    exactly zero, not a leftover of another table's sum."""
    for s in sample_inputs(device, torch.float64, requires_grad=True, op=op):
        out = s.call(OPS[op])
        (grad,) = torch.autograd.grad(out, s.leaves["freqs"], torch.randn_like(out))
        unused = torch.ones(grad.shape[0], dtype=torch.bool, device=device)
        unused[s.kwargs["freqs_index"]] = False
        assert torch.equal(grad[unused], torch.zeros_like(grad[unused])), s


# ---------------------------------------------------------------- one table is the plain op


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_single_table_equals_plain_call_bit_for_bit(device, dtype):
    """F = 1 (every index 0) gives the plain op's bits: output and every gradient."""
    for op, fn in OPS.items():
        for s in sample_inputs(device, dtype, requires_grad=True, op=op):
            others = {k: t for k, t in s.leaves.items() if k != "freqs"}
            plain_freqs = s.leaves["freqs"].detach()[0].clone().requires_grad_()
            table = s.leaves["freqs"].detach()[:1].clone().requires_grad_()
            args, kw = s.inputs({**others, "freqs": plain_freqs})
            plain = fn(*args, **{k: v for k, v in kw.items() if k != "freqs_index"})
            args, kw = s.inputs({**others, "freqs": table})
            indexed = fn(*args, **{**kw, "freqs_index": torch.zeros_like(kw["freqs_index"])})
            assert torch.equal(plain, indexed), (s, op)
            g = torch.randn_like(plain)
            got_plain = torch.autograd.grad(plain, (*others.values(), plain_freqs), g)
            got_indexed = torch.autograd.grad(indexed, (*others.values(), table), g)
            for a, b in zip(got_plain, got_indexed):
                assert torch.equal(a, b.reshape(a.shape)), (s, op)


@pytest.mark.parametrize("device", DEVICES)
def test_one_table_of_many_equals_the_plain_call_with_it(device):
    (x, coords, freqs), kw = sample_inputs(device, torch.float32)[0].inputs()
    for f in range(freqs.shape[0]):
        index = torch.full_like(kw["freqs_index"], f)
        got = ops.rope2d(x, coords, freqs, interleaved=kw["interleaved"], freqs_index=index)
        assert torch.equal(got, ops.rope2d(x, coords, freqs[f], interleaved=kw["interleaved"]))


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

"""The formulas of jitrope.reference (rope_angles, rotate_pairs, rms_norm) and the ``freqs_index`` keyword
of the references (docs/ops.md). Pure PyTorch: these run without the extension."""

import math

import pytest
import torch

from jitrope import posenc
from jitrope.model import RMSNorm
from jitrope.reference import qk_norm_rope_ref, rms_norm, rope2d_ref, rope_angles, rotate_pairs
from jitrope.rope import axial_freqs


def _inputs(dtype, per_head, *, F=None, seed=0):
    """x [2, 3, H, N, D] (a strided view), fractional coords with a prefix token, freqs [(F,) (H,) 2, D/2]."""
    g = torch.Generator().manual_seed(seed)
    H, N, D = 3, 7, 12
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(2, 3, N, H, D, generator=g, dtype=torch.float64).to(dtype).transpose(2, 3)
    coords = (torch.rand(N, 2, generator=g, dtype=torch.float64) * 9 - 2).to(acc)
    coords[0] = 0
    shape = ((H,) if per_head else ()) + (2, D // 2)
    freqs = torch.randn(*(((F,) if F else ()) + shape), generator=g, dtype=torch.float64).to(acc)
    return x, coords, freqs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_one_table_indexed_by_zeros_is_the_plain_call(dtype, per_head):
    x, coords, freqs = _inputs(dtype, per_head)
    N = coords.shape[0]
    zeros = torch.zeros(N, dtype=torch.int64)
    acc = coords.dtype
    assert torch.equal(rope_angles(coords, freqs[None], acc, freqs_index=zeros), rope_angles(coords, freqs, acc))
    for interleaved in (True, False):
        plain = rope2d_ref(x, coords, freqs, interleaved=interleaved)
        assert torch.equal(rope2d_ref(x, coords, freqs[None], interleaved=interleaved, freqs_index=zeros), plain)
    w = 1 + 0.5 * torch.randn(2, x.shape[-1], dtype=acc)
    indexed = qk_norm_rope_ref(x, w, coords, freqs[None], freqs_index=zeros)
    assert torch.equal(indexed, qk_norm_rope_ref(x, w, coords, freqs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_each_token_uses_its_own_table(dtype, per_head):
    F = 3
    x, coords, freqs = _inputs(dtype, per_head, F=F, seed=1)
    index = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    w = 1 + 0.5 * torch.randn(2, x.shape[-1], dtype=coords.dtype)
    out = rope2d_ref(x, coords, freqs, freqs_index=index, interleaved=False)
    qk = qk_norm_rope_ref(x, w, coords, freqs, freqs_index=index)
    normed = qk_norm_rope_ref(x, w)
    for n, f in enumerate(index.tolist()):
        # token n alone with table f, as a plain call: the same products and sum, the same bits
        one = rope2d_ref(x[..., n : n + 1, :], coords[n : n + 1], freqs[f], interleaved=False)
        assert torch.equal(out[..., n : n + 1, :], one), n
        assert torch.equal(qk[..., n : n + 1, :], rope2d_ref(normed[..., n : n + 1, :], coords[n : n + 1], freqs[f])), n


def test_hand_built_per_token_angles():
    """One pair, two tables: token n turns (1, 0) by coords[n] . (freqs[f, 0], freqs[f, 1])."""
    freqs = torch.tensor([[[0.5], [0.25]], [[-1.0], [2.0]]], dtype=torch.float64)  # [F=2, 2, D/2=1]
    coords = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], dtype=torch.float64)
    index = torch.tensor([1, 0, 1, 1])
    want = [0.0, 1 * 0.5 + 2 * 0.25, 3 * -1.0 + -1 * 2.0, 0.5 * -1.0 + 0.5 * 2.0]
    phi = rope_angles(coords, freqs, torch.float64, freqs_index=index)
    assert phi.shape == (1, 4, 1) and phi.flatten().tolist() == want
    x = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(1, 4, 2)  # [H=1, N=4, D=2]
    out = rope2d_ref(x, coords, freqs, freqs_index=index)
    expect = torch.tensor([[math.cos(p), math.sin(p)] for p in want], dtype=torch.float64)
    torch.testing.assert_close(out[0], expect, rtol=1e-15, atol=1e-15)


def test_freqs_gradient_is_per_table():
    x, coords, freqs = _inputs(torch.float64, True, F=4, seed=2)
    index = torch.tensor([0, 2, 2, 0, 2, 0, 2])  # table 1 and 3 are not used
    freqs.requires_grad_()
    fn = lambda f: rope2d_ref(x, coords, f, freqs_index=index)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (freqs,))
    (grad,) = torch.autograd.grad(fn(freqs), freqs, torch.randn(x.shape, dtype=torch.float64))
    assert not grad[1].any() and not grad[3].any() and grad[0].any() and grad[2].any()


def test_freqs_index_errors_name_the_argument():
    x, coords, freqs = _inputs(torch.float32, False, F=2)
    N = coords.shape[0]
    good = torch.zeros(N, dtype=torch.int64)
    cases = [
        (dict(freqs_index=good.int()), r"freqs_index must be an int64 tensor \[N\] = \[7\], got torch.int32"),
        (dict(freqs_index=good[:-1]), r"freqs_index must be an int64 tensor \[N\] = \[7\].*shape \(6,\)"),
        (dict(freqs_index=good - 1), r"freqs_index must be in \[0, F\) = \[0, 2\).*got values in \[-1, -1\]"),
        (dict(freqs_index=good + 2), r"freqs_index must be in \[0, F\) = \[0, 2\).*got values in \[2, 2\]"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match="rope2d: " + match):
            rope2d_ref(x, coords, freqs, **kw)
        with pytest.raises(ValueError, match="rope_angles: " + match):
            rope_angles(coords, freqs, torch.float32, **kw)
    with pytest.raises(ValueError, match=r"with freqs_index, freqs must be \[F, 2, D/2\] or \[F, H, 2, D/2\]"):
        rope2d_ref(x, coords, freqs[0, 0], freqs_index=good)
    with pytest.raises(ValueError, match=r"rope2d: freqs must be \[F, 2, 6\] or \[F, 3, 2, 6\], got \(2, 2, 5\)"):
        rope2d_ref(x, coords, freqs[..., :5], freqs_index=good)
    with pytest.raises(ValueError, match="freqs_index needs coords and freqs"):
        qk_norm_rope_ref(x, torch.ones(2, 12), freqs_index=good)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_statistics_dtype(dtype):
    """float32 statistics (float64 for float64), result in that precision: the caller rounds."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 5, 16, generator=g, dtype=torch.float64) * 30).to(dtype)
    w = torch.randn(16, generator=g)
    out = rms_norm(x, w, 1e-6)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == acc
    h = x.to(acc)
    assert torch.equal(out, w.to(acc) * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)))
    exact = x.double() / x.double().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * w.double()
    torch.testing.assert_close(out.double(), exact, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-6)
    module = RMSNorm(16)
    module.weight.data.copy_(w)
    assert torch.equal(module(x), out.to(dtype))  # the model's RMSNorm is this formula


def test_rotate_pairs_conventions_and_inverse():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    phi = torch.randn(5, 4, generator=g, dtype=torch.float64)
    cos, sin = phi.cos(), phi.sin()
    to_half = torch.cat((torch.arange(0, 8, 2), torch.arange(1, 8, 2)))
    inter = rotate_pairs(x, cos, sin, interleaved=True)
    assert torch.equal(inter[..., to_half], rotate_pairs(x[..., to_half], cos, sin, interleaved=False))
    torch.testing.assert_close(rotate_pairs(inter, cos, -sin, interleaved=True), x, rtol=1e-14, atol=1e-14)
    # a rotation keeps each pair's length
    torch.testing.assert_close(inter.pow(2).unflatten(-1, (4, 2)).sum(-1), x.pow(2).unflatten(-1, (4, 2)).sum(-1))


def test_torch_path_tables_are_the_reference_formulas():
    """posenc's pos_impl="torch" helpers are rope_angles / rms_norm / rotate_pairs, rounded once."""
    x, coords, _ = _inputs(torch.bfloat16, False)
    freqs = axial_freqs(x.shape[-1])
    w = 1 + 0.5 * torch.randn(2, x.shape[-1])
    cos, sin = posenc.rope_cos_sin(coords, freqs, torch.float32)
    phi = rope_angles(coords, freqs, torch.float32)
    assert torch.equal(cos, phi.cos()) and torch.equal(sin, phi.sin())
    want = rotate_pairs(rms_norm(x, w[:, None, None, None, :], 1e-6), cos, sin, interleaved=True).to(x.dtype)
    assert torch.equal(posenc.qk_norm_rope_tables(x, w, (cos, sin), 1e-6), want)

"""Tests of jitrope::rope2d (docs/ops.md): the op battery (tests/op_battery.py) over one input generator,
then the in-place twin, special cases, torch.compile, errors and the coordinate helpers."""

from __future__ import annotations

from typing import List

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, INPLACE_OPCHECK_UTILS
from op_battery import DTYPES, OPCHECK_UTILS, Leaf, OpBattery, OpSample

import jitrope
from jitrope import ops
from jitrope.reference import rope2d_ref
from jitrope.rope import axial_freqs, grid_coords, sequence_coords

pytestmark = pytest.mark.skipif(not jitrope.HAS_EXTENSION, reason=f"extension not built: {jitrope.EXTENSION_ERROR}")


def _qkv_view(B, N, H, D):
    return lambda t: t.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)[:2]


def sample_inputs(device, dtype, requires_grad=False) -> List[OpSample]:
    """Random [..., H, N, D] inputs: odd sizes, views of a qkv projection, strided and offset views,
    B = 0, more leading dims than the kernels coalesce, fractional coordinates with a prefix token
    at (0, 0), shared and per-head frequencies, both pair conventions. Leaves: x's base and freqs."""
    gen = torch.Generator().manual_seed(20251215)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    # (name, base shape, view, (H, N, D), per_head, interleaved)
    specs = [
        ("qkv_view", (2, 5, 3 * 3 * 8), _qkv_view(2, 5, 3, 8), (3, 5, 8), False, True),
        ("qkv_view_per_head_half", (1, 7, 3 * 2 * 12), _qkv_view(1, 7, 2, 12), (2, 7, 12), True, False),
        ("no_leading_odd_half", (3, 9, 6), None, (3, 9, 6), False, False),
        ("channel_stride_2", (2, 1, 4, 8), lambda t: t[..., ::2], (1, 4, 4), True, True),
        ("heads_tokens_transposed", (3, 5, 2, 4), lambda t: t.transpose(1, 2), (2, 5, 4), True, True),
        ("offset_view", (2, 3, 5, 9), lambda t: t[..., 1:], (3, 5, 8), False, True),
        ("batch_0", (0, 2, 3, 4), None, (2, 3, 4), False, True),
        (
            "seven_leading_dims",
            (2,) * 7 + (1, 3, 4),
            lambda t: t.permute(6, 5, 4, 3, 2, 1, 0, 7, 8, 9),
            (1, 3, 4),
            False,
            True,
        ),
        ("one_token_one_pair", (3, 1, 2), None, (3, 1, 2), True, False),
        ("wide_head", (1, 2, 3, 160), None, (2, 3, 160), False, False),
        ("jit_like", (2, 17, 3 * 2 * 64), _qkv_view(2, 17, 2, 64), (2, 17, 64), False, True),
    ]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    samples = []
    for name, shape, view, (H, N, D), per_head, interleaved in specs:
        base = rnd(*shape)
        coords = torch.rand(N, 2, generator=gen, dtype=torch.float64) * 20 - 4
        coords[0] = 0  # a prefix / class token
        freqs = rnd(H, 2, D // 2) if per_head else rnd(2, D // 2)
        coords = coords.to(device=device, dtype=acc)
        if name == "qkv_view":
            coords = coords.t().contiguous().t()  # non-contiguous coords
        leaves = dict(
            x=base.to(device=device, dtype=dtype).requires_grad_(requires_grad),
            freqs=freqs.to(device=device, dtype=acc).requires_grad_(requires_grad),
        )
        samples.append(OpSample(name, (Leaf("x", view), coords, Leaf("freqs")), dict(interleaved=interleaved), leaves))
    assert samples[1].inputs()[0][0].shape == (2, 1, 2, 7, 12) and samples[3].inputs()[0][0].stride(-1) == 2
    return samples


class TestRope2D(OpBattery):
    op = staticmethod(ops.rope2d)
    reference = staticmethod(rope2d_ref)
    overload = torch.ops.jitrope.rope2d.default if jitrope.HAS_EXTENSION else None
    opcheck_samples = ("qkv_view", "heads_tokens_transposed", "batch_0", "offset_view")
    compile_samples = ("qkv_view_per_head_half",)  # a strided qkv view, per-head freqs, the other pairing

    def sample_inputs(self, device, dtype, requires_grad=False):
        return sample_inputs(device, dtype, requires_grad)

    def check_layout(self, sample, out):
        # rope2d keeps x's layout when x is dense (a transposed x gives a transposed output).
        x = sample.inputs()[0][0]
        assert out.stride() == torch.empty_like(x).stride(), sample

    def opcheck_calls(self, s):
        (x, coords, freqs), kw = s.inputs()
        calls = super().opcheck_calls(s)
        with torch.no_grad():
            y = s.inputs(s.map_leaves(lambda t: t.detach().clone()))[0][0]
        calls.append((torch.ops.jitrope.rope2d_.default, (y, coords, freqs.detach()), kw, INPLACE_OPCHECK_UTILS))
        # rope2d_backward is not differentiable itself (test_double_backward): inputs without grad. A
        # freqs_index= of a subclass's samples (tests/test_freqs_index.py) goes to the backward op too.
        g = torch.randn(x.shape, device=x.device)
        index = {k: v for k, v in kw.items() if k == "freqs_index"}
        for fwd_x in (x.detach(), None):
            calls.append(
                (
                    torch.ops.jitrope.rope2d_backward.default,
                    (g, coords, freqs.detach(), fwd_x, kw["interleaved"]),
                    index,
                    OPCHECK_UTILS,
                )
            )
        return calls


# ---------------------------------------------------------------- op-specific


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half_split"])
@pytest.mark.parametrize("freqs_kind", ["fixed", "shared", "per_head"])
def test_cpu_vector_rows_equal_scalar_rows_bitwise(dtype, interleaved, freqs_kind):
    """CPU rows of D = 64 with unit channel stride run eight lanes at a time (where the CPU has AVX2);
    the same values read through a channel stride of 2 run the scalar rows. The forward, the in-place
    op and the backward (with a freqs gradient or without: fixed freqs) have the same bits."""
    B, H, N, D = 2, 3, 37, 64
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(2, B, H, N, 2 * D, generator=gen).to(dtype)
    coords = torch.rand(N, 2, generator=gen) * 12 - 2
    freqs = torch.randn(*((H, 2, D // 2) if freqs_kind == "per_head" else (2, D // 2)), generator=gen)
    grad = torch.randn(2, B, H, N, D, generator=gen).to(dtype)
    results = []
    for x in (wide[..., ::2], wide[..., ::2].contiguous()):
        xs = x.detach().requires_grad_()
        fs = freqs.clone().requires_grad_(freqs_kind != "fixed")
        out = ops.rope2d(xs, coords, fs, interleaved=interleaved)
        leaves = (xs, fs) if freqs_kind != "fixed" else (xs,)
        inplace = ops.rope2d_(x.clone(), coords, freqs, interleaved=interleaved)
        results.append([out.detach(), inplace, *torch.autograd.grad(out, leaves, grad)])
    for a, b in zip(*results):
        assert torch.equal(a, b), (dtype, interleaved, freqs_kind)


def _with_special_bfloat16(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x (bfloat16) with one in 7 values replaced by NaNs of both signs and several payloads, infinities,
    subnormals, zeros of both signs and the largest finite values (which overflow when turned)."""
    bits = [0x7FC0, 0xFFC0, 0x7F81, 0xFFFF, 0x7F80, 0xFF80, 0x0001, 0x807F, 0x0000, 0x8000, 0x7F7F, 0xFF7F]
    special = torch.tensor([b - (1 << 16) if b >= 1 << 15 else b for b in bits], dtype=torch.int16)
    special = special.view(torch.bfloat16)
    pick = torch.randint(0, 7 * len(bits), x.shape, generator=gen)
    return torch.where(pick < len(bits), special[pick.clamp(max=len(bits) - 1)], x)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half_split"])
def test_cpu_vector_rows_round_special_values_as_scalar_rows(interleaved):
    """bfloat16 rows round each float32 result in the vector rows as c10::BFloat16 does in the scalar
    rows, special values included: every NaN to 0x7FC0, overflow to infinity, subnormal results kept.
    Compared bit for bit (as int16), forward, in place and backward."""
    B, H, N, D = 1, 2, 37, 64
    gen = torch.Generator().manual_seed(11)
    wide = _with_special_bfloat16(torch.randn(2, B, H, N, 2 * D, generator=gen).to(torch.bfloat16), gen)
    coords = torch.rand(N, 2, generator=gen) * 12 - 2
    freqs = torch.randn(2, D // 2, generator=gen)
    grad = _with_special_bfloat16(torch.randn(2, B, H, N, D, generator=gen).to(torch.bfloat16), gen)
    results = []
    for x in (wide[..., ::2], wide[..., ::2].contiguous()):
        xs = x.detach().requires_grad_()
        out = ops.rope2d(xs, coords, freqs, interleaved=interleaved)
        inplace = ops.rope2d_(x.clone(), coords, freqs, interleaved=interleaved)
        results.append([out.detach(), inplace, *torch.autograd.grad(out, (xs,), grad)])
    assert results[0][0].isnan().any() and results[0][0].isinf().any()
    for a, b in zip(*results):
        assert torch.equal(a.view(torch.int16), b.reshape(a.shape).view(torch.int16)), interleaved


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_inplace_matches_out_of_place(device, dtype):
    for s in sample_inputs(device, dtype):
        (x, coords, freqs), kw = s.inputs()
        expected = ops.rope2d(x, coords, freqs, **kw)
        y = s.inputs(s.map_leaves(lambda t: t.detach().clone()))[0][0]  # the same view of a copy
        version = y._version
        ret = ops.rope2d_(y, coords, freqs, **kw)
        assert ret is y
        assert y._version > version or y.numel() == 0
        assert torch.equal(y, expected), s
        assert torch.equal(x, s.inputs()[0][0])  # the input of the out-of-place op is untouched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefix_tokens_untouched(device, dtype):
    for s in sample_inputs(device, dtype):
        out = s.call(ops.rope2d)
        x = s.inputs()[0][0]
        assert torch.equal(out[..., :1, :], x[..., :1, :]), s  # token 0 sits at (0, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_views_equal_separate_q_and_k(device, dtype):
    B, N, H, D = 3, 11, 4, 16
    qkv = torch.randn(B, N, 3 * H * D, device=device).to(dtype)
    coords = sequence_coords((3, 3), prefix=2, device=device)
    for freqs in (axial_freqs(D, device=device), torch.randn(H, 2, D // 2, device=device)):
        x = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        both = ops.rope2d(x[:2], coords, freqs)
        q = ops.rope2d(x[0].contiguous(), coords, freqs)
        k = ops.rope2d(x[1].contiguous(), coords, freqs)
        assert torch.equal(both[0], q) and torch.equal(both[1], k)


@pytest.mark.parametrize("device", DEVICES)
def test_half_split_equals_interleaved_under_channel_permutation(device):
    for s in sample_inputs(device, torch.float32):
        x, coords, freqs = s.inputs()[0]
        D = x.shape[-1]
        # interleaved pair m is channels (2m, 2m+1); half-split pair m is (m, m + D/2)
        to_half = torch.cat((torch.arange(0, D, 2), torch.arange(1, D, 2))).to(device)
        a = ops.rope2d(x, coords, freqs, interleaved=True)[..., to_half]
        b = ops.rope2d(x[..., to_half], coords, freqs, interleaved=False)
        assert torch.equal(a, b), s


@pytest.mark.parametrize("device", DEVICES)
def test_per_head_freqs_equal_shared_freqs_head_by_head(device):
    B, H, N, D = 2, 3, 6, 8
    x = torch.randn(B, H, N, D, device=device)
    coords = torch.rand(N, 2, device=device) * 7
    freqs = torch.randn(H, 2, D // 2, device=device)
    out = ops.rope2d(x, coords, freqs)
    for h in range(H):
        assert torch.equal(out[:, h : h + 1], ops.rope2d(x[:, h : h + 1], coords, freqs[h]))


# EVA-02 VisionRotaryEmbeddingFast / JiT: per-token cos/sin tables over D channels (each frequency
# repeated for both channels of an interleaved pair; rows first, then columns), identity rows for
# class tokens, and x * cos + rotate_half(x) * sin.
def _eva_tables(head_dim, gh, gw, n_prefix, theta=10000.0, dtype=torch.float64):
    dim = head_dim // 2
    f = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype)[: dim // 2] / dim))
    fh = torch.einsum("i,f->if", torch.arange(gh, dtype=dtype), f).repeat_interleave(2, -1)
    fw = torch.einsum("j,f->jf", torch.arange(gw, dtype=dtype), f).repeat_interleave(2, -1)
    ang = torch.cat((fh[:, None, :].expand(gh, gw, dim), fw[None, :, :].expand(gh, gw, dim)), -1).reshape(gh * gw, -1)
    ang = torch.cat((torch.zeros(n_prefix, head_dim, dtype=dtype), ang))
    return ang.cos(), ang.sin()


def _rotate_half_interleaved(x):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), -1).flatten(-2)


def _eva_apply(x, cos, sin):
    return x * cos + _rotate_half_interleaved(x) * sin


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_eva_style_table_implementation(device, dtype):
    B, H, D, (gh, gw), prefix = 2, 3, 32, (5, 7), 4
    N = prefix + gh * gw
    qkv = torch.randn(B, N, 3 * H * D, dtype=dtype, device=device)
    x = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)[:2]
    cos, sin = (t.to(device=device, dtype=dtype) for t in _eva_tables(D, gh, gw, prefix))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = ops.rope2d(
        x, sequence_coords((gh, gw), prefix=prefix, dtype=acc, device=device), axial_freqs(D, dtype=acc, device=device)
    )
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, _eva_apply(x, cos, sin), **tol)


# ---------------------------------------------------------------- torch.compile


def _attention_with_rope(qkv, coords, freqs, H, D):
    B, N, _ = qkv.shape
    x = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k = ops.rope2d(x[:2], coords, freqs).unbind(0)
    return F.scaled_dot_product_attention(q, k, x[2]).transpose(1, 2).reshape(B, N, H * D)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    B, H, D, N = 2, 2, 8, 6
    qkv = torch.randn(B, N, 3 * H * D, device=device, requires_grad=True)
    coords = torch.rand(N, 2, device=device) * 3
    freqs = torch.randn(H, 2, D // 2, device=device, requires_grad=True)
    compiled = torch.compile(_attention_with_rope, fullgraph=True, backend=backend)
    out = compiled(qkv, coords, freqs, H, D)
    ref = _attention_with_rope(qkv, coords, freqs, H, D)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (qkv, freqs), g), torch.autograd.grad(ref, (qkv, freqs), g))


# ---------------------------------------------------------------- bad input


def _bad_inputs(device):
    x = torch.randn(2, 3, 5, 8, device=device)
    c = torch.zeros(5, 2, device=device)
    f = torch.zeros(2, 4, device=device)
    return [
        (
            "x 2-D",
            (torch.randn(5, 8, device=device), c, f),
            r"x must have shape \[\.\.\., H, N, D\] \(at least 3 dims\), got \[5, 8\]",
        ),
        (
            "D odd",
            (torch.randn(2, 5, 7, device=device), c, torch.zeros(2, 3, device=device)),
            r"x must have an even last dim D",
        ),
        ("x integer", (x.long(), c, f), r"x must be float16, bfloat16, float32 or float64, got torch.int64"),
        (
            "coords N",
            (x, torch.zeros(4, 2, device=device), f),
            r"coords must have shape \[N, 2\] = \[5, 2\].*got \[4, 2\]",
        ),
        ("coords 3 cols", (x, torch.zeros(5, 3, device=device), f), r"coords must have shape \[N, 2\] = \[5, 2\]"),
        ("coords integer", (x, c.long(), f), r"coords must be a floating tensor"),
        (
            "freqs D/2",
            (x, c, torch.zeros(2, 3, device=device)),
            r"freqs must have shape \[2, D/2\] = \[2, 4\] \(shared\) or \[H, 2, D/2\] = \[3, 2, 4\]",
        ),
        (
            "freqs H",
            (x, c, torch.zeros(2, 2, 4, device=device)),
            r"freqs must have shape .*\[H, 2, D/2\] = \[3, 2, 4\].*got \[2, 2, 4\]",
        ),
        ("freqs integer", (x, c, f.long()), r"freqs must be a floating tensor"),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    for _what, (x, c, f), match in _bad_inputs(device):
        for fn in (ops.rope2d, ops.rope2d_):
            with pytest.raises((RuntimeError, ValueError), match=match):
                fn(x.clone(), c, f)
        with pytest.raises((RuntimeError, ValueError), match=match.replace("x must", "grad_out must")):
            torch.ops.jitrope.rope2d_backward(x, c, f, None, True)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_backward_and_inplace_inputs(device):
    x = torch.randn(2, 3, 5, 8, device=device)
    c, f = torch.zeros(5, 2, device=device), torch.zeros(2, 4, device=device)
    with pytest.raises(
        RuntimeError, match=r"x \(the forward input\) must have grad_out's shape \[2, 3, 5, 8\], got \[2, 3, 5, 6\]"
    ):
        torch.ops.jitrope.rope2d_backward(x, c, f, torch.randn(2, 3, 5, 6, device=device), True)
    with pytest.raises(RuntimeError, match=r"x \(the forward input\) must have grad_out's dtype"):
        torch.ops.jitrope.rope2d_backward(x, c, f, x.double(), True)
    with pytest.raises(RuntimeError, match="overlapping memory"):
        ops.rope2d_(torch.randn(1, 5, 8, device=device).expand(3, 5, 8), c, f)
    xg = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="in-place op is for inference"):
        ops.rope2d_(xg, c, f)
    with pytest.raises(RuntimeError, match="in-place op is for inference"):
        torch.ops.jitrope.rope2d_(xg, c, f, True)  # the C++ autograd kernel refuses too
    with pytest.raises(RuntimeError, match="in-place op is for inference"):
        torch.ops.jitrope.rope2d_(x.clone(), c, f.clone().requires_grad_(), True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_raises():
    x = torch.randn(2, 3, 5, 8, device="cuda")
    c, f = torch.zeros(5, 2), torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match=r"coords must be on x's device cuda:0, got cpu"):
        ops.rope2d(x, c, f.cuda())
    with pytest.raises(RuntimeError, match=r"freqs must be on x's device cuda:0, got cpu"):
        ops.rope2d(x, c.cuda(), f)


# ---------------------------------------------------------------- coordinates (docs/ops.md)


def test_condition_grid_sits_at_aligned_centres():
    gh = gw = 16
    ch = cw = 8
    cond = grid_coords(ch, cw, ref_grid=(gh, gw), dtype=torch.float64)
    i = torch.arange(ch, dtype=torch.float64)
    expect = (i + 0.5) * gh / ch - 0.5  # condition token centres, docs/ops.md
    assert torch.equal(cond[:, 0], expect.repeat_interleave(cw))
    assert torch.equal(cond[:, 1], expect.repeat(ch))
    # each condition token sits at the centre of the 2x2 image patches it covers
    img = grid_coords(gh, gw, dtype=torch.float64).view(ch, 2, cw, 2, 2).permute(0, 2, 1, 3, 4).reshape(ch * cw, 4, 2)
    torch.testing.assert_close(cond, img.mean(1), rtol=0, atol=0)
    seq = sequence_coords((gh, gw), prefix=32, cond_grid=(ch, cw))
    assert seq.shape == (32 + 256 + 64, 2)
    assert torch.equal(seq[:32], torch.zeros(32, 2)) and torch.equal(seq[288:], cond.float())


def test_axial_freqs_layout_and_grid_helpers():
    D, theta = 16, 100.0
    f = axial_freqs(D, theta, dtype=torch.float64)
    k = torch.arange(D // 4, dtype=torch.float64)
    fk = theta ** (-k / (D // 4))
    assert f.shape == (2, D // 2)
    # pairs m < D/4 turn with the row, pairs m >= D/4 with the column
    assert torch.equal(f[0], torch.cat((fk, torch.zeros(D // 4, dtype=torch.float64))))
    assert torch.equal(f[1], torch.cat((torch.zeros(D // 4, dtype=torch.float64), fk)))
    with pytest.raises(ValueError, match="multiple of 4"):
        axial_freqs(6)
    # row-major grid: token n is (n // gw, n % gw)
    g = grid_coords(3, 4)
    assert torch.equal(g[6], torch.tensor([1.0, 2.0])) and g.shape == (12, 2)
    # interpolation: a 32x32 sampling grid laid over a 16x16 training grid stays in its range
    big = grid_coords(32, 32, ref_grid=(16, 16))
    assert big.min().item() == -0.25 and big.max().item() == 15.25
    # a token of the image grid and a prefix token rotate as docs/ops.md says
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    coords = sequence_coords((2, 2), prefix=1, dtype=torch.float64)
    out = ops.rope2d(x, coords, f)
    assert torch.equal(out[:, 0], x[:, 0])
    torch.testing.assert_close(out, rope2d_ref(x, coords, f), rtol=1e-12, atol=1e-12)

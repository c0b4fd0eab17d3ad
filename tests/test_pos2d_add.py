"""Tests of jitrope::pos2d_add (docs/ops.md): the op battery (tests/op_battery.py) over one input
generator, then the in-place twin, the rounding, errors, torch.compile and the CUDA-only checks."""

from typing import List

import pytest
import torch
from conftest import DEVICES, INPLACE_OPCHECK_UTILS
from op_battery import LOW_PRECISION, OPCHECK_UTILS, Leaf, OpBattery, OpSample

import jitrope
from jitrope import ops
from jitrope.reference import pos2d_add_ref

pytestmark = pytest.mark.skipif(not jitrope.HAS_EXTENSION, reason="the C++ extension is not built")

# B, prefix tokens, grid (gh, gw), trailing tokens, D, tables (max_h, max_w), (row_offset, col_offset), layout
CASES = [
    (2, 0, (4, 4), 0, 8, (4, 4), (0, 0), "contiguous"),
    (3, 3, (3, 5), 4, 6, (5, 7), (1, 2), "contiguous"),  # non-square, prefix + trailing, offsets
    (2, 1, (2, 3), 2, 5, (3, 3), (0, 0), "transposed"),  # odd D; x is a [N, B, D] buffer seen as [B, N, D]
    (2, 2, (3, 2), 1, 7, (4, 2), (1, 0), "channel_strided"),  # x[..., ::2]: a copy path
    (3, 1, (2, 2), 3, 4, (2, 3), (0, 1), "token_slice"),  # x[:, 1:-1] of a longer sequence
    (0, 1, (2, 3), 0, 4, (2, 3), (0, 0), "contiguous"),  # B = 0
    (2, 2, (0, 3), 1, 4, (1, 3), (1, 0), "contiguous"),  # an empty grid: a plain copy
    (1, 0, (1, 7), 0, 16, (1, 8), (0, 1), "tables_strided"),  # tables are non-contiguous views
    (3, 4, (6, 5), 2, 32, (8, 8), (2, 3), "contiguous"),  # D a multiple of every 16-byte pack width
    (2, 0, (3, 3), 1, 16, (3, 3), (0, 0), "misaligned"),  # x starts one element into its storage
    (37, 2, (7, 9), 3, 40, (9, 9), (1, 0), "contiguous"),  # table sums long enough to be split in chunks
    (4, 1, (16, 16), 64, 64, (16, 16), (0, 0), "contiguous"),  # the 256 -> 320 sequence at a small width
]


def _layout(t, layout, B, N, D, g):
    """t: a contiguous [B, N, D]; returns an equal tensor with the layout's strides."""
    if layout == "transposed":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "channel_strided":
        wide = torch.zeros(B, N, 2 * D, dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "misaligned":
        flat = torch.zeros(B * N * D + 1, dtype=t.dtype, device=t.device)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(B, N, D)
    if layout == "token_slice":
        long = torch.randn(B, N + 2, D, generator=g, dtype=torch.float64).to(t.dtype).to(t.device)
        long[:, 1:-1] = t
        return long[:, 1:-1]
    return t


def _name(case):
    return f"B{case[0]}-grid{case[2][0]}x{case[2][1]}-D{case[4]}-{case[7]}"


def sample_inputs(device, dtype, requires_grad=False, cases=CASES) -> List[OpSample]:
    """Calls of ops.pos2d_add covering the layouts above; leaves x, pos_h, pos_w (strided views kept:
    detach() makes a leaf with the view's strides)."""
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).to(device)

    samples = []
    for case in cases:
        B, prefix, (gh, gw), trailing, D, (max_h, max_w), (ro, co), layout = case
        N = prefix + gh * gw + trailing
        x = _layout(rnd(B, N, D), layout, B, N, D, g)
        if layout == "tables_strided":
            pos_h = rnd(D, max_h).t()
            pos_w = rnd(2 * max_w, D)[::2]
        else:
            pos_h, pos_w = rnd(max_h, D), rnd(max_w, D)
        leaves = {k: t.detach().requires_grad_(requires_grad) for k, t in dict(x=x, pos_h=pos_h, pos_w=pos_w).items()}
        kwargs = dict(token_offset=prefix, row_offset=ro, col_offset=co)
        samples.append(OpSample(_name(case), (Leaf("x"), Leaf("pos_h"), Leaf("pos_w"), (gh, gw)), kwargs, leaves))
    return samples


class TestPos2dAdd(OpBattery):
    op = staticmethod(ops.pos2d_add)
    reference = staticmethod(pos2d_add_ref)
    overload = torch.ops.jitrope.pos2d_add.default if jitrope.HAS_EXTENSION else None
    opcheck_samples = tuple(_name(CASES[i]) for i in (1, 2, 3, 5))
    compile_samples = (_name(CASES[1]),)  # prefix and trailing tokens, row and column offsets
    tolerances = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-6, rtol=1e-5)}
    grad_tolerances = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-5, rtol=1e-5)}
    double_backward = True  # grad_x = grad_out and the table sums are linear: the backward is differentiable
    gradcheck_fast_above = 400

    def sample_inputs(self, device, dtype, requires_grad=False):
        return sample_inputs(device, dtype, requires_grad)

    def opcheck_calls(self, s):
        (x, pos_h, pos_w, grid), kw = s.inputs()
        args = (x, pos_h, pos_w, list(grid), kw["token_offset"], kw["row_offset"], kw["col_offset"])
        calls = [(torch.ops.jitrope.pos2d_add.default, args, {}, OPCHECK_UTILS)]
        with torch.no_grad():
            plain = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
        calls.append((torch.ops.jitrope.pos2d_add_.default, plain, {}, INPLACE_OPCHECK_UTILS))
        grad_out = torch.randn_like(x).requires_grad_()
        bargs = (grad_out, list(grid), pos_h.shape[0], pos_w.shape[0], *args[4:])
        calls.append((torch.ops.jitrope.pos2d_add_backward.default, bargs, {}, OPCHECK_UTILS))
        return calls


# ---------------------------------------------------------------- op-specific


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_rounds_once_like_eager(device, dtype):
    """Kernel and reference both round x + (pos_h + pos_w), formed in float32, once: the same bits (the
    battery's 2x-eager rule holds trivially, and this is the stronger claim)."""
    for s in sample_inputs(device, dtype):
        assert torch.equal(s.call(ops.pos2d_add), s.call(pos2d_add_ref)), s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_inplace_twin(device, dtype):
    for s in sample_inputs(device, dtype):
        (x, pos_h, pos_w, grid), kw = s.inputs()
        want = ops.pos2d_add(x, pos_h, pos_w, grid, **kw)
        y = x.clone() if x.is_contiguous() else x  # keep the strided views: they are written through
        version = y._version
        assert ops.pos2d_add_(y, pos_h, pos_w, grid, **kw) is y
        assert torch.equal(y, want)
        if y.numel() and grid[0] * grid[1]:
            assert y._version > version


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_refuses_grad(device):
    (x, pos_h, pos_w, grid), kw = sample_inputs(device, torch.float32, requires_grad=True)[0].inputs()
    with pytest.raises(RuntimeError, match="in-place op is for inference"):
        ops.pos2d_add_(x, pos_h, pos_w, grid, **kw)
    with pytest.raises(RuntimeError, match="pos2d_add_: the in-place op is for inference"):
        torch.ops.jitrope.pos2d_add_(x, pos_h, pos_w, list(grid), kw["token_offset"], 0, 0)
    with torch.no_grad():
        ops.pos2d_add_(x, pos_h, pos_w, grid, **kw)  # allowed for inference


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_refuses_overlap(device):
    x = torch.randn(1, 4, 8, device=device).expand(3, 4, 8)
    pos = torch.randn(2, 8, device=device)
    with pytest.raises(RuntimeError, match="pos2d_add_: x has overlapping memory"):
        ops.pos2d_add_(x, pos, pos, (2, 2))
    buf = torch.randn(4, 8, device=device)
    with pytest.raises(RuntimeError, match="pos2d_add_: x shares memory with an input it reads"):
        ops.pos2d_add_(buf[None], buf, buf, (2, 2))


def test_conditional_sequence_256_to_320():
    """The problem statement's case: 16x16 image tokens then an 8x8 condition grid (256 -> 320)."""
    D = 32
    x = torch.randn(2, 320, D)
    img_h, img_w = torch.randn(16, D), torch.randn(16, D)
    cond_h, cond_w = torch.randn(8, D), torch.randn(8, D)
    out = ops.pos2d_add(x, img_h, img_w, (16, 16))
    out = ops.pos2d_add(out, cond_h, cond_w, (8, 8), token_offset=256)
    want = x.clone()
    for n in range(256):
        want[:, n] += img_h[n // 16] + img_w[n % 16]
    for n in range(64):
        want[:, 256 + n] += cond_h[n // 8] + cond_w[n % 8]
    torch.testing.assert_close(out, want)


def _bad_inputs(device):
    """(description, call, regex the message must match): each names the argument and shapes."""
    x = torch.randn(2, 10, 6, device=device)
    h, w = torch.randn(3, 6, device=device), torch.randn(4, 6, device=device)
    f = ops.pos2d_add
    return [
        ("x rank", lambda: f(x[0], h, w, (2, 2)), r"x must be a 3-D tensor \[B, N, D\], got shape \[10, 6\]"),
        (
            "pos_h D",
            lambda: f(x, h[:, :5], w, (2, 2)),
            r"pos_h must be \[max_h, D\] with x's D = 6, got shape \[3, 5\]",
        ),
        (
            "pos_w rank",
            lambda: f(x, h, w[None], (2, 2)),
            r"pos_w must be \[max_w, D\] with x's D = 6, got shape \[1, 4, 6\]",
        ),
        (
            "int x",
            lambda: f(x.long(), h.long(), w.long(), (2, 2)),
            r"x must be float16, bfloat16, float32 or float64, got torch.int64",
        ),
        ("dtype", lambda: f(x, h.double(), w, (2, 2)), r"pos_h must have x's dtype torch.float32, got torch.float64"),
        (
            "rows",
            lambda: f(x, h, w, (3, 2), row_offset=1),
            r"grid rows need pos_h\[1 : 1 \+ gh\] with gh = 3, but pos_h has max_h = 3",
        ),
        (
            "cols",
            lambda: f(x, h, w, (2, 5)),
            r"grid columns need pos_w\[0 : 0 \+ gw\] with gw = 5, but pos_w has max_w = 4",
        ),
        (
            "N",
            lambda: f(x, h, w, (3, 3), token_offset=2),
            r"wanted N >= token_offset \+ gh\*gw, got N = 10 \(x of shape \[2, 10, 6\]\)",
        ),
        ("token_offset", lambda: f(x, h, w, (2, 2), token_offset=-1), r"token_offset must be >= 0, got -1"),
        ("row_offset", lambda: f(x, h, w, (2, 2), row_offset=-2), r"row_offset must be >= 0, got -2"),
        ("col_offset", lambda: f(x, h, w, (2, 2), col_offset=-3), r"col_offset must be >= 0, got -3"),
        ("grid sign", lambda: f(x, h, w, (-1, 2)), r"grid \(gh, gw\) must be non-negative"),
        ("grid length", lambda: torch.ops.jitrope.pos2d_add(x, h, w, [2, 2, 2]), r"grid|int\[2\]|expected"),
        ("inplace rows", lambda: ops.pos2d_add_(x.clone(), h, w, (4, 2)), r"pos2d_add_: grid rows need pos_h"),
        (
            "backward N",
            lambda: torch.ops.jitrope.pos2d_add_backward(x, [4, 4], 4, 4, 0, 0, 0),
            r"pos2d_add_backward: grid \[4, 4\] has gh\*gw tokens .* more than grad_out holds",
        ),
        (
            "backward max_h",
            lambda: torch.ops.jitrope.pos2d_add_backward(x, [2, 2], 1, 4, 0, 0, 0),
            r"pos2d_add_backward: grid rows need pos_h\[0 : 0 \+ gh\] with gh = 2, but pos_h has max_h = 1",
        ),
    ]


BAD_NAMES = [b[0] for b in _bad_inputs("cpu")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_inputs_raise_clear_errors(device, name):
    """The C++ checks name the argument, what it got and what it wanted (the fake kernels only
    compute output shapes, as pytorch/extension-cpp's do)."""
    _, call, pattern = next(b for b in _bad_inputs(device) if b[0] == name)
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_device_mismatch():
    x = torch.randn(2, 4, 6, device="cuda")
    h = torch.randn(2, 6, device="cuda")
    with pytest.raises(RuntimeError, match=r"pos_w must be on x's device cuda:0, got cpu"):
        ops.pos2d_add(x, h, torch.randn(2, 6), (2, 2))


def test_torch_compile_inductor():
    torch._dynamo.reset()
    x = torch.randn(2, 14, 8, requires_grad=True)
    pos_h, pos_w = torch.randn(3, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)

    def block(x, pos_h, pos_w):
        return ops.pos2d_add(x, pos_h, pos_w, (3, 4), token_offset=2).square().sum()

    compiled = torch.compile(block, fullgraph=True)
    got = torch.autograd.grad(compiled(x, pos_h, pos_w), (x, pos_h, pos_w))
    want = torch.autograd.grad(block(x, pos_h, pos_w), (x, pos_h, pos_w))
    torch.testing.assert_close(got, want)


cuda_only = pytest.mark.skipif(
    not (torch.cuda.is_available() and jitrope.has_cuda_kernels()), reason="needs a CUDA device and the CUDA kernels"
)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu_bit_for_bit(dtype):
    """Both devices run the same arithmetic in the same order (math/pos2d_add_math.h)."""
    cases = CASES + [(70, 1, (16, 16), 64, 768, (16, 16), (0, 0), "contiguous")]
    for s in sample_inputs("cpu", dtype, requires_grad=True, cases=cases):
        (x, pos_h, pos_w, grid), kw = s.inputs()
        xc, hc, wc = (t.detach().cuda().requires_grad_() for t in (x, pos_h, pos_w))
        grad = torch.randn(x.shape, dtype=torch.float64).to(dtype)
        out = ops.pos2d_add(x, pos_h, pos_w, grid, **kw)
        outc = ops.pos2d_add(xc, hc, wc, grid, **kw)
        assert torch.equal(out, outc.cpu())
        for a, b in zip(
            torch.autograd.grad(out, (pos_h, pos_w), grad), torch.autograd.grad(outc, (hc, wc), grad.cuda())
        ):
            assert torch.equal(a, b.cpu())


@cuda_only
@pytest.mark.parametrize("D", [1024, 1025], ids=["packed-int32-index", "scalar-int64-index"])
def test_cuda_64bit_indexing(D):
    """Over 2^31 elements: offsets past 2^31 are written and summed correctly, with 16-byte packs
    and 32-bit item indices (D = 1024) and with single elements and 64-bit indices (D = 1025)."""
    free, _ = torch.cuda.mem_get_info()
    B, N = 2, (1 << 20) + 8  # > 2^31 elements of bfloat16
    if free < 3 * B * N * D * 2 + (1 << 30):
        pytest.skip("not enough GPU memory")
    x = torch.zeros(B, N, D, dtype=torch.bfloat16, device="cuda")
    pos_h = torch.arange(4, dtype=torch.bfloat16, device="cuda")[:, None].expand(4, D).contiguous()
    pos_w = 10 * pos_h
    t0 = N - 16
    out = ops.pos2d_add(x, pos_h, pos_w, (4, 4), token_offset=t0)
    want = (pos_h[:, None] + pos_w[None]).reshape(16, D)
    assert torch.equal(out[1, t0:], want) and torch.equal(out[0, t0:], want)
    assert not out[:, :t0].any()
    del out
    grad_h, grad_w = torch.ops.jitrope.pos2d_add_backward(x.fill_(1), [4, 4], 4, 4, t0, 0, 0)
    assert torch.equal(grad_h, torch.full_like(grad_h, 8)) and torch.equal(grad_w, torch.full_like(grad_w, 8))
    ops.pos2d_add_(x, pos_h, pos_w, (4, 4), token_offset=t0)
    assert torch.equal(x[:, t0:], (want + 1).expand(B, 16, D))

"""Battery for jitrope::pos2d_add_indexed (docs/ops.md): parity with the float64 reference for every
dtype, gradients, opcheck, layouts (any leading dims, any strides, B = 0), -1 and repeated indices,
determinism of the table gradients, equality with pos2d_add on a grid, torch.compile, errors. Every
test runs on CPU and CUDA (skipped without a GPU); one input generator feeds them all."""

import pytest
import torch
from conftest import DEVICES, assert_kernel_error_within_eager
from op_battery import OPCHECK_UTILS, Leaf, OpBattery, OpSample

import jitrope
from jitrope import ops
from jitrope.reference import pos2d_add_indexed_ref

pytestmark = pytest.mark.skipif(not jitrope.HAS_EXTENSION, reason="the C++ extension is not built")

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# leading dims, N, D, (max_h, max_w), index pattern, layout
CASES = [
    ((2,), 24, 8, (5, 6), "packed", "contiguous"),
    ((), 37, 6, (7, 4), "random", "contiguous"),  # x [N, D], no leading dim; odd sizes
    ((3,), 20, 5, (4, 4), "random", "transposed"),  # odd D; x is an [N, B, D] buffer seen as [B, N, D]
    ((2,), 19, 7, (3, 5), "random", "channel_strided"),  # x[..., ::2]: a copy path
    ((2,), 17, 4, (4, 3), "packed", "token_slice"),  # x[:, 1:-1] of a longer sequence
    ((2, 1, 3), 21, 16, (6, 6), "random", "contiguous"),  # a [2, 1, H, T, D]-like view, leading dims merge
    ((2, 2, 2, 2, 2), 9, 8, (3, 3), "random", "unmergeable"),  # 5 leading dims that cannot merge: a copy
    ((2,), 30, 16, (6, 7), "packed", "misaligned"),  # x starts one element into its storage
    ((1,), 23, 16, (5, 5), "random", "tables_strided"),  # tables are non-contiguous views
    ((2,), 16, 8, (4, 4), "minus_one", "contiguous"),  # every index -1: a copy
    ((0,), 12, 8, (3, 4), "random", "contiguous"),  # B = 0
    ((2,), 0, 8, (3, 4), "random", "contiguous"),  # N = 0
    ((3,), 10, 8, (0, 0), "minus_one", "contiguous"),  # empty tables
    ((5,), 300, 32, (3, 70), "repeated", "contiguous"),  # > 64 tokens per row: several segments a row
]


def packed_indices(sizes, prefix=1):
    """rows, cols of a packed batch: per image (gh, gw), `prefix` class tokens (-1, -1), then its grid."""
    rows, cols = [], []
    for gh, gw in sizes:
        rows += [-1] * prefix + [i for i in range(gh) for _ in range(gw)]
        cols += [-1] * prefix + [j for _ in range(gh) for j in range(gw)]
    return torch.tensor(rows), torch.tensor(cols)


def _indices(pattern, N, max_h, max_w, g):
    if pattern == "minus_one":
        return torch.full((N,), -1), torch.full((N,), -1)
    if pattern == "packed":
        # Images of different sizes, each with a class token, and the rest condition-like tokens
        # with a row only (cols -1), cycling through the table rows.
        sizes, used = [], 0
        for gh, gw in [(2, 3), (3, 2), (1, 4), (4, 4), (2, 2)]:
            if used + 1 + gh * gw <= N and gh <= max_h and gw <= max_w:
                sizes.append((gh, gw))
                used += 1 + gh * gw
        rows, cols = packed_indices(sizes)
        rest = N - rows.numel()
        return torch.cat((rows, torch.arange(rest) % max_h)), torch.cat((cols, torch.full((rest,), -1)))
    lo_h, lo_w = -1, -1
    if pattern == "repeated":  # few rows of pos_h, each used by ~100 tokens; pos_w never -1
        lo_w = 0
    rows = torch.randint(lo_h, max_h, (N,), generator=g) if max_h else torch.full((N,), -1)
    cols = torch.randint(lo_w, max_w, (N,), generator=g) if max_w else torch.full((N,), -1)
    return rows, cols


def _layout(t, layout, g):
    """t: a contiguous [..., N, D]; returns an equal tensor with the layout's strides."""
    if layout == "transposed":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "channel_strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "misaligned":
        flat = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(t.shape)
    if layout == "token_slice":
        shape = list(t.shape)
        shape[-2] += 2
        long = torch.randn(shape, generator=g, dtype=torch.float64).to(t.dtype).to(t.device)
        long[..., 1:-1, :] = t
        return long[..., 1:-1, :]
    if layout == "unmergeable":
        nd = t.dim() - 2
        perm = list(reversed(range(nd))) + [nd, nd + 1]
        return t.permute(perm).contiguous().permute(perm)
    return t


def sample_inputs(device, dtype, requires_grad=False, cases=CASES):
    """Yields (x, pos_h, pos_w, rows, cols) for ops.pos2d_add_indexed, covering the cases above."""
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)

    for lead, N, D, (max_h, max_w), pattern, layout in cases:
        x = _layout(rnd(*lead, N, D), layout, g)
        if layout == "tables_strided":
            pos_h, pos_w = rnd(D, max_h).t(), rnd(2 * max_w, D)[::2]
        else:
            pos_h, pos_w = rnd(max_h, D), rnd(max_w, D)
        rows, cols = (i.to(device) for i in _indices(pattern, N, max_h, max_w, g))
        # detach() keeps the view's strides and makes a leaf.
        x, pos_h, pos_w = (t.detach().requires_grad_(requires_grad) for t in (x, pos_h, pos_w))
        yield x, pos_h, pos_w, rows, cols


def _ids(cases=CASES):
    return [f"{'x'.join(map(str, c[0])) or 'none'}-N{c[1]}-D{c[2]}-{c[4]}-{c[5]}" for c in cases]


class TestPos2dAddIndexed(OpBattery):
    """The shared battery (tests/op_battery.py) on the cases above; the tests below add what is
    particular to this op (index patterns by hand, segmented sums, errors, compile, CUDA)."""

    op = staticmethod(ops.pos2d_add_indexed)
    reference = staticmethod(pos2d_add_indexed_ref)
    overload = torch.ops.jitrope.pos2d_add_indexed.default if jitrope.HAS_EXTENSION else None
    # opcheck of the op and of its backward (opcheck_calls): packed, no leading dim, transposed, a copy path,
    # merged and unmergeable leading dims, B = 0.
    opcheck_samples = tuple(_ids([CASES[i] for i in (0, 1, 2, 3, 5, 6, 10)]))
    compile_samples = tuple(_ids(CASES[:1]))  # a packed pattern: class tokens and row-only tokens (-1)
    tolerances = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-6, rtol=1e-5)}
    grad_tolerances = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-5, rtol=1e-5)}
    double_backward = True  # the backward is linear in grad_out
    gradcheck_fast_above = 400

    def sample_inputs(self, device, dtype, requires_grad=False):
        out = []
        for name, (x, pos_h, pos_w, rows, cols) in zip(_ids(), sample_inputs(device, dtype, requires_grad)):
            args = (Leaf("x"), Leaf("pos_h"), Leaf("pos_w"), rows, cols)
            out.append(OpSample(name, args, {}, dict(x=x, pos_h=pos_h, pos_w=pos_w)))
        return out

    def opcheck_calls(self, s):
        (x, pos_h, pos_w, rows, cols), _ = s.inputs()
        calls = [(torch.ops.jitrope.pos2d_add_indexed.default, (x, pos_h, pos_w, rows, cols), {}, OPCHECK_UTILS)]
        grad_out = torch.randn_like(x).requires_grad_()
        bargs = (grad_out, rows, cols, pos_h.shape[0], pos_w.shape[0])
        calls.append((torch.ops.jitrope.pos2d_add_indexed_backward.default, bargs, {}, OPCHECK_UTILS))
        return calls


def test_indices_cover_every_kind_of_token():
    """The generator's cases hold what the tests claim: both, row-only, column-only and no-table
    tokens, and table rows shared by many tokens (several 64-token segments)."""
    kinds, most = set(), 0
    for _, pos_h, _, rows, cols in sample_inputs("cpu", torch.float32):
        kinds |= {(bool(r >= 0), bool(c >= 0)) for r, c in zip(rows.tolist(), cols.tolist())}
        if rows.numel() and pos_h.shape[0]:
            most = max(most, int(torch.bincount(rows[rows >= 0], minlength=1).max()))
    assert kinds == {(True, True), (True, False), (False, True), (False, False)}
    assert most > 64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_forward_matches_reference(device, dtype):
    """The kernel and the reference form (pos_h + pos_w) in float32 (float64), add x and round once:
    the same bits, for every dtype and layout."""
    for x, pos_h, pos_w, rows, cols in sample_inputs(device, dtype):
        out = ops.pos2d_add_indexed(x, pos_h, pos_w, rows, cols)
        ref = pos2d_add_indexed_ref(x, pos_h, pos_w, rows, cols)
        assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
        assert torch.equal(out, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_flash_attention_rule_against_float64(device, dtype):
    """Forward and every gradient: the kernel's error against a float64 reference is at most ~2x that
    of the same-precision eager reference (conftest.assert_kernel_error_within_eager)."""
    g = torch.Generator().manual_seed(3)
    cases = CASES + [((4,), 260, 64, (16, 16), "packed", "contiguous")]
    for x, pos_h, pos_w, rows, cols in sample_inputs(device, dtype, requires_grad=True, cases=cases):
        if x.numel() == 0:
            continue
        grad = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
        leaves64 = [t.detach().double().requires_grad_() for t in (x, pos_h, pos_w)]
        ref = pos2d_add_indexed_ref(*leaves64, rows, cols)
        ref_grads = torch.autograd.grad(ref, leaves64, grad.double())
        out = ops.pos2d_add_indexed(x, pos_h, pos_w, rows, cols)
        eager = pos2d_add_indexed_ref(x, pos_h, pos_w, rows, cols)
        got_grads = torch.autograd.grad(out, (x, pos_h, pos_w), grad)
        eager_grads = torch.autograd.grad(eager, (x, pos_h, pos_w), grad)
        assert_kernel_error_within_eager("out", out, eager, ref)
        for name, a, b, want in zip(("x", "pos_h", "pos_w"), got_grads, eager_grads, ref_grads):
            if want.numel():
                assert_kernel_error_within_eager(f"grad {name}", a, b, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_matches_reference(device, dtype):
    g = torch.Generator().manual_seed(7)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    for x, pos_h, pos_w, rows, cols in sample_inputs(device, dtype, requires_grad=True):
        grad = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
        got = torch.autograd.grad(ops.pos2d_add_indexed(x, pos_h, pos_w, rows, cols), (x, pos_h, pos_w), grad)
        want = torch.autograd.grad(pos2d_add_indexed_ref(x, pos_h, pos_w, rows, cols), (x, pos_h, pos_w), grad)
        assert got[0].data_ptr() == grad.data_ptr() or torch.equal(got[0], grad)  # grad_x is grad_out
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, **tol)


def test_table_gradients_by_hand():
    """grad_pos_h[r] = sum over leading dims and tokens with rows[n] == r; rows no token uses are 0."""
    x = torch.zeros(2, 4, 1, dtype=torch.float64, requires_grad=True)
    pos_h = torch.zeros(3, 1, dtype=torch.float64, requires_grad=True)
    pos_w = torch.zeros(2, 1, dtype=torch.float64, requires_grad=True)
    rows, cols = torch.tensor([0, 0, -1, 2]), torch.tensor([1, -1, 1, 1])
    grad = torch.tensor([[1.0, 2.0, 4.0, 8.0], [16.0, 32.0, 64.0, 128.0]], dtype=torch.float64)[..., None]
    gx, gh, gw = torch.autograd.grad(ops.pos2d_add_indexed(x, pos_h, pos_w, rows, cols), (x, pos_h, pos_w), grad)
    assert torch.equal(gx, grad)
    assert gh.flatten().tolist() == [1 + 2 + 16 + 32, 0, 8 + 128]
    assert gw.flatten().tolist() == [0, 1 + 4 + 8 + 16 + 64 + 128]


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck(device):
    for x, pos_h, pos_w, rows, cols in sample_inputs(device, torch.float64, requires_grad=True):
        fn = lambda a, h, w: ops.pos2d_add_indexed(a, h, w, rows, cols)  # noqa: E731
        fast = x.numel() > 400
        assert torch.autograd.gradcheck(fn, (x, pos_h, pos_w), fast_mode=fast)
        assert torch.autograd.gradgradcheck(fn, (x, pos_h, pos_w), fast_mode=fast)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 37], ids=["packed-B1", "batched-B37"])
def test_table_gradients_are_deterministic(device, dtype, B):
    """Same bits every run and for every thread count: a packed sequence (B = 1) and a batch (B > 1,
    chunked), rows shared by hundreds of tokens (several segments each)."""
    N, D = 2000, 40
    g = torch.Generator().manual_seed(11)
    x = torch.randn(B, N, D, generator=g).to(dtype).to(device)
    pos_h = torch.randn(9, D, generator=g).to(dtype).to(device).requires_grad_()
    pos_w = torch.randn(13, D, generator=g).to(dtype).to(device).requires_grad_()
    rows = torch.randint(-1, 9, (N,), generator=g).to(device)
    cols = torch.randint(-1, 13, (N,), generator=g).to(device)
    grad = torch.randn(B, N, D, generator=g).to(dtype).to(device)

    def grads():
        return torch.autograd.grad(ops.pos2d_add_indexed(x, pos_h, pos_w, rows, cols), (pos_h, pos_w), grad)

    first = grads()
    threads = torch.get_num_threads()
    try:
        for n in {1, threads}:
            torch.set_num_threads(n)
            for a, b in zip(first, grads()):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3, 20])
def test_equals_pos2d_add_on_a_grid(device, dtype, B):
    """rows/cols describing a gh x gw grid at a token offset (table offsets too), -1 elsewhere, give
    pos2d_add's output bit for bit and its table gradients."""
    gh, gw, t0, ro, co, N, D = 5, 7, 3, 1, 2, 3 + 35 + 4, 24
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, N, D, generator=g).to(dtype).to(device).requires_grad_()
    pos_h = torch.randn(8, D, generator=g).to(dtype).to(device).requires_grad_()
    pos_w = torch.randn(9, D, generator=g).to(dtype).to(device).requires_grad_()
    rows = torch.full((N,), -1)
    cols = torch.full((N,), -1)
    rows[t0 : t0 + gh * gw] = ro + torch.arange(gh).repeat_interleave(gw)
    cols[t0 : t0 + gh * gw] = co + torch.arange(gw).repeat(gh)
    rows, cols = rows.to(device), cols.to(device)
    out = ops.pos2d_add_indexed(x, pos_h, pos_w, rows, cols)
    want = ops.pos2d_add(x, pos_h, pos_w, (gh, gw), token_offset=t0, row_offset=ro, col_offset=co)
    assert torch.equal(out, want)
    grad = torch.randn(B, N, D, generator=g).to(dtype).to(device)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    if dtype == torch.bfloat16:
        tol = dict(atol=0.05, rtol=0.01)  # one rounding of sums of up to 140 values, summed in other orders
    got = torch.autograd.grad(out, (x, pos_h, pos_w), grad)
    for a, b in zip(got, torch.autograd.grad(want, (x, pos_h, pos_w), grad)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_batch_equals_per_image_pos2d_add(device):
    """Three images of different sizes packed into one [1, T, D] stream with a class token each: every
    image's tokens get what pos2d_add gives that image alone."""
    sizes, D = [(3, 5), (4, 4), (2, 6)], 16
    rows, cols = packed_indices(sizes)
    T = rows.numel()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, T, D, generator=g).to(device)
    pos_h, pos_w = torch.randn(4, D, generator=g).to(device), torch.randn(6, D, generator=g).to(device)
    out = ops.pos2d_add_indexed(x, pos_h, pos_w, rows.to(device), cols.to(device))
    start = 0
    for gh, gw in sizes:
        seq = x[:, start : start + 1 + gh * gw]
        alone = ops.pos2d_add(seq, pos_h, pos_w, (gh, gw), token_offset=1)
        assert torch.equal(out[:, start : start + 1 + gh * gw], alone)
        start += 1 + gh * gw


def _bad_inputs(device):
    """(description, call, regex the message must match): each names the argument and the shape."""
    x = torch.randn(2, 5, 6, device=device)
    h, w = torch.randn(3, 6, device=device), torch.randn(4, 6, device=device)
    r = torch.tensor([0, 1, 2, -1, 0], device=device)
    c = torch.tensor([3, -1, 0, 1, 2], device=device)
    f = ops.pos2d_add_indexed

    def bwd(*args):  # looked up when called: the module is collected (and skipped) without the extension
        return torch.ops.jitrope.pos2d_add_indexed_backward(*args)

    index_of_x = r"\(one index per token of x: \[\.\.\., N, D\] = \[2, 5, 6\]\)"
    return [
        (
            "x rank",
            lambda: f(x[0, 0], h, w, r, c),
            r"x must have shape \[\.\.\., N, D\] \(at least 2 dims\), got shape \[6\]",
        ),
        (
            "int x",
            lambda: f(x.long(), h.long(), w.long(), r, c),
            r"x must be float16, bfloat16, float32 or float64, got torch.int64",
        ),
        ("pos_h D", lambda: f(x, h[:, :5], w, r, c), r"pos_h must be \[max_h, D\] with x's D = 6, got shape \[3, 5\]"),
        (
            "pos_w rank",
            lambda: f(x, h, w[None], r, c),
            r"pos_w must be \[max_w, D\] with x's D = 6, got shape \[1, 4, 6\]",
        ),
        (
            "pos_h dtype",
            lambda: f(x, h.double(), w, r, c),
            r"pos_h must have x's dtype torch.float32, got torch.float64",
        ),
        (
            "rows dtype",
            lambda: f(x, h, w, r.int(), c),
            r"rows must be an int64 tensor \[N\] \(one index per token\), got dtype torch.int32",
        ),
        (
            "cols float",
            lambda: f(x, h, w, r, c.float()),
            r"cols must be an int64 tensor \[N\].*got dtype torch.float32",
        ),
        (
            "rows length",
            lambda: f(x, h, w, r[:4], c),
            r"rows must have shape \[N\] = \[5\] " + index_of_x + r", got shape \[4\]",
        ),
        ("cols rank", lambda: f(x, h, w, r, c[None]), r"cols must have shape \[N\] = \[5\] .* got shape \[1, 5\]"),
        (
            "rows high",
            lambda: f(x, h, w, r + 1, c),
            r"rows must hold values in \[-1, max_h\) = \[-1, 3\) \(a pos_h row, or -1 for none\), "
            r"got values in \[0, 3\]",
        ),
        (
            "rows low",
            lambda: f(x, h, w, r - 1, c),
            r"rows must hold values in \[-1, max_h\) = \[-1, 3\) .* got values in \[-2, 1\]",
        ),
        (
            "cols high",
            lambda: f(x, h, w, r, c + 1),
            r"cols must hold values in \[-1, max_w\) = \[-1, 4\) \(a pos_w row, or -1 for none\), "
            r"got values in \[0, 4\]",
        ),
        ("cols empty table", lambda: f(x, h, w[:0], r, c), r"cols must hold values in \[-1, max_w\) = \[-1, 0\)"),
        ("rows meta", lambda: f(x, h, w, r.to("meta"), c), r"rows must be on x's device .*, got meta"),
        ("cols meta", lambda: f(x, h, w, r, c.to("meta")), r"cols must be on x's device .*, got meta"),
        ("pos_w meta", lambda: f(x, h, w.to("meta"), r, c), r"pos_w must be on x's device .*, got meta"),
        (
            "backward rows",
            lambda: bwd(x, r, c, 2, 4),
            r"pos2d_add_indexed_backward: rows must hold values in \[-1, max_h\) = \[-1, 2\)",
        ),
        (
            "backward max",
            lambda: bwd(x, r, c, -1, 4),
            r"pos2d_add_indexed_backward: max_h and max_w must be >= 0, got -1 and 4",
        ),
        (
            "backward cols",
            lambda: bwd(x, r, c[:2], 3, 4),
            r"pos2d_add_indexed_backward: cols must have shape \[N\] = \[5\] \(one index per token of grad_out",
        ),
        (
            "backward int",
            lambda: bwd(x.long(), r, c, 3, 4),
            r"pos2d_add_indexed_backward: grad_out must be float16, bfloat16, float32 or float64",
        ),
        (
            "backward meta",
            lambda: bwd(x, r.to("meta"), c, 3, 4),
            r"pos2d_add_indexed_backward: rows must be on grad_out's device .*, got meta",
        ),
    ]


BAD_NAMES = [b[0] for b in _bad_inputs("cpu")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_inputs_raise_clear_errors(device, name):
    """The C++ checks (and, for a meta index beside real tensors, the fake kernel) name the argument,
    what it got and what it wanted; nothing is read out of bounds."""
    _, call, pattern = next(b for b in _bad_inputs(device) if b[0] == name)
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        call()


def test_meta_tensors_trace_shapes():
    """All-meta inputs (no values to check) give the output's shape, as the fake kernels do."""
    x = torch.empty(2, 7, 8, device="meta")
    idx = torch.empty(7, dtype=torch.long, device="meta")
    out = ops.pos2d_add_indexed(x, torch.empty(3, 8, device="meta"), torch.empty(4, 8, device="meta"), idx, idx)
    assert out.shape == x.shape and out.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_device_mismatch():
    x = torch.randn(2, 4, 6, device="cuda")
    h, w = torch.randn(2, 6, device="cuda"), torch.randn(2, 6, device="cuda")
    idx = torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"rows must be on x's device cuda:0, got cpu"):
        ops.pos2d_add_indexed(x, h, w, idx, idx.cuda())


def test_torch_compile_inductor_new_indices_every_call():
    """Inductor, fullgraph; a packed batch whose indices change every call reuses the compiled graph."""
    torch._dynamo.reset()
    D, T = 8, 30
    pos_h, pos_w = torch.randn(5, D, requires_grad=True), torch.randn(6, D, requires_grad=True)

    def block(x, pos_h, pos_w, rows, cols):
        return ops.pos2d_add_indexed(x, pos_h, pos_w, rows, cols).square().sum()

    compiled = torch.compile(block, fullgraph=True)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(1, T, D, generator=g, requires_grad=True)
        rows, cols = torch.randint(-1, 5, (T,), generator=g), torch.randint(-1, 6, (T,), generator=g)
        got = torch.autograd.grad(compiled(x, pos_h, pos_w, rows, cols), (x, pos_h, pos_w))
        want = torch.autograd.grad(block(x, pos_h, pos_w, rows, cols), (x, pos_h, pos_w))
        torch.testing.assert_close(got, want)


cuda_only = pytest.mark.skipif(
    not (torch.cuda.is_available() and jitrope.has_cuda_kernels()), reason="needs a CUDA device and the CUDA kernels"
)


@cuda_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_cuda_matches_cpu_bit_for_bit(dtype):
    """Both devices add in the order of math/pos2d_add_indexed_math.h: the same bits."""
    cases = CASES + [
        ((70,), 260, 768, (16, 16), "packed", "contiguous"),
        ((1,), 5000, 64, (40, 40), "random", "contiguous"),
    ]
    for x, pos_h, pos_w, rows, cols in sample_inputs("cpu", dtype, requires_grad=True, cases=cases):
        xc, hc, wc = (t.detach().cuda().requires_grad_() for t in (x, pos_h, pos_w))
        grad = torch.randn(x.shape, dtype=torch.float64).to(dtype)
        out = ops.pos2d_add_indexed(x, pos_h, pos_w, rows, cols)
        outc = ops.pos2d_add_indexed(xc, hc, wc, rows.cuda(), cols.cuda())
        assert torch.equal(out, outc.cpu())
        got = torch.autograd.grad(out, (pos_h, pos_w), grad)
        gotc = torch.autograd.grad(outc, (hc, wc), grad.cuda())
        for a, b in zip(got, gotc):
            assert torch.equal(a, b.cpu())


@cuda_only
@pytest.mark.parametrize("D", [1024, 1025], ids=["packed-int32-index", "scalar-int64-index"])
def test_cuda_64bit_indexing(D):
    """Over 2^31 elements: offsets past 2^31 are read, written and summed correctly, with 16-byte packs
    and 32-bit item indices (D = 1024) and with single elements and 64-bit indices (D = 1025)."""
    free, _ = torch.cuda.mem_get_info()
    B, N = 2, (1 << 20) + 8  # > 2^31 elements of bfloat16
    if free < 4 * B * N * D * 2 + (1 << 30):
        pytest.skip("not enough GPU memory")
    x = torch.zeros(B, N, D, dtype=torch.bfloat16, device="cuda")
    pos_h = torch.arange(4, dtype=torch.bfloat16, device="cuda")[:, None].expand(4, D).contiguous()
    pos_w = 10 * pos_h
    rows = torch.full((N,), -1, device="cuda")
    cols = torch.full((N,), -1, device="cuda")
    t0 = N - 16
    rows[t0:] = torch.arange(4, device="cuda").repeat_interleave(4)
    cols[t0:] = torch.arange(4, device="cuda").repeat(4)
    out = ops.pos2d_add_indexed(x, pos_h, pos_w, rows, cols)
    want = (pos_h[:, None] + pos_w[None]).reshape(16, D)
    assert torch.equal(out[1, t0:], want) and torch.equal(out[0, t0:], want)
    assert not out[:, :t0].any()
    del out
    grad_h, grad_w = torch.ops.jitrope.pos2d_add_indexed_backward(x.fill_(1), rows, cols, 4, 4)
    assert torch.equal(grad_h, torch.full_like(grad_h, 8)) and torch.equal(grad_w, torch.full_like(grad_w, 8))

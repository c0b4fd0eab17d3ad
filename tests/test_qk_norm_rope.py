"""Tests of jitrope::qk_norm_rope (docs/ops.md): the op battery (tests/op_battery.py) over one input
generator, then special cases, torch.compile, errors and CUDA graph capture."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from op_battery import OPCHECK_UTILS, Leaf, OpBattery, OpSample
from test_rope2d import _with_special_bfloat16

import jitrope
from jitrope import ops
from jitrope.reference import qk_norm_rope_ref
from jitrope.rope import axial_freqs, sequence_coords

pytestmark = pytest.mark.skipif(not jitrope.HAS_EXTENSION, reason=f"extension not built: {jitrope.EXTENSION_ERROR}")


def _qkv_view(B, N, H, D):
    return lambda t: t.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)[:2]


def sample_inputs(device, dtype, requires_grad=False) -> List[OpSample]:
    """Random [2, B, H, N, D] inputs: views of a qkv projection, odd sizes, channel strides, B = 0,
    shared / per-head / no frequencies, both pair conventions, rows of very different scales.
    Leaves: qk's base, weight and (when there are any) freqs."""
    gen = torch.Generator().manual_seed(20260301)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    # (name, base shape, view, (B, H, N, D), freqs: None | "shared" | "per_head", interleaved)
    specs = [
        ("qkv_view", (2, 5, 3 * 3 * 8), _qkv_view(2, 5, 3, 8), (2, 3, 5, 8), "shared", True),
        ("qkv_view_per_head_half", (1, 7, 3 * 2 * 12), _qkv_view(1, 7, 2, 12), (1, 2, 7, 12), "per_head", False),
        ("contiguous_odd", (2, 3, 2, 9, 6), None, (3, 2, 9, 6), "shared", False),
        ("norm_only", (2, 3, 3 * 4 * 10), _qkv_view(2, 3, 4, 10), (2, 4, 3, 10), None, True),
        ("channel_stride_2", (2, 1, 2, 4, 16), lambda t: t[..., ::2], (1, 2, 4, 8), "per_head", True),
        ("heads_tokens_transposed", (2, 2, 5, 3, 4), lambda t: t.transpose(2, 3), (2, 3, 5, 4), "shared", True),
        ("batch_0", (2, 0, 2, 3, 4), None, (0, 2, 3, 4), "shared", True),
        ("one_pair", (2, 3, 1, 1, 2), None, (3, 1, 1, 2), "per_head", False),
        ("wide_head", (2, 1, 2, 3, 160), None, (1, 2, 3, 160), "shared", False),
        ("jit_like", (2, 70, 3 * 2 * 64), _qkv_view(2, 70, 2, 64), (2, 2, 70, 64), "shared", True),
    ]
    samples = []
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, shape, view, (_B, H, N, D), kind, interleaved in specs:
        base = rnd(*shape)
        if base.numel():
            base = base * torch.exp(rnd(*shape[:-1], 1))  # rows of different scales
        weight = 1 + 0.5 * rnd(2, D)
        leaves = dict(
            qk=base.to(device=device, dtype=dtype).requires_grad_(requires_grad),
            weight=weight.to(device=device, dtype=acc).requires_grad_(requires_grad),
        )
        coords = freqs = None
        if kind is not None:
            coords = torch.rand(N, 2, generator=gen, dtype=torch.float64) * 20 - 4
            coords[0] = 0
            freqs = rnd(H, 2, D // 2) if kind == "per_head" else rnd(2, D // 2)
            coords = coords.to(device=device, dtype=acc)
            if name == "qkv_view":
                coords = coords.t().contiguous().t()  # non-contiguous coords
            leaves["freqs"] = freqs.to(device=device, dtype=acc).requires_grad_(requires_grad)
            freqs = Leaf("freqs")
        kwargs = dict(eps=1e-6 if name != "one_pair" else 0.25, interleaved=interleaved)
        samples.append(OpSample(name, (Leaf("qk", view), Leaf("weight"), coords, freqs), kwargs, leaves))
    qk0 = samples[0].inputs()[0][0]
    assert qk0.shape == (2, 2, 3, 5, 8) and not qk0.is_contiguous()
    return samples


class TestQkNormRope(OpBattery):
    op = staticmethod(ops.qk_norm_rope)
    reference = staticmethod(qk_norm_rope_ref)
    overload = torch.ops.jitrope.qk_norm_rope.default if jitrope.HAS_EXTENSION else None
    opcheck_samples = ("qkv_view", "norm_only", "channel_stride_2", "batch_0")
    compile_samples = ("qkv_view_per_head_half",)  # a strided qkv view, per-head freqs, the other pairing
    gradcheck_fast_above = 1000  # wide_head's full Jacobian takes minutes through the op's backward

    def sample_inputs(self, device, dtype, requires_grad=False):
        return sample_inputs(device, dtype, requires_grad)

    def opcheck_calls(self, s):
        (qk, weight, coords, freqs), kw = s.inputs()
        calls = super().opcheck_calls(s)
        # qk_norm_rope_backward is not differentiable itself (test_double_backward): inputs without grad. A
        # freqs_index= of a subclass's samples (tests/test_freqs_index.py) goes to the backward op too.
        g = torch.randn(qk.shape, device=qk.device)
        freqs = None if freqs is None else freqs.detach()
        index = {k: v for k, v in kw.items() if k == "freqs_index"}
        for freqs_grad in [True, False] if freqs is not None else [False]:
            args = (g, qk.detach(), weight.detach(), coords, freqs, kw["eps"], kw["interleaved"], freqs_grad)
            calls.append((torch.ops.jitrope.qk_norm_rope_backward.default, args, index, OPCHECK_UTILS))
        return calls


# ---------------------------------------------------------------- special cases


@pytest.mark.parametrize("device", DEVICES)
def test_norm_only_equals_norm_then_rope2d(device):
    """With coords/freqs the op is its normalize-only result rotated by rope2d (in float64, where the
    intermediate rounding of the published order is exact enough to compare to 1e-12)."""
    for s in sample_inputs(device, torch.float64):
        (qk, weight, coords, freqs), kw = s.inputs()
        if freqs is None:
            continue
        normed = ops.qk_norm_rope(qk, weight, eps=kw["eps"])
        want = ops.rope2d(normed, coords, freqs, interleaved=kw["interleaved"])
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("freqs_kind", ["none", "shared", "per_head", "indexed"])
def test_backward_of_a_qkv_view_equals_contiguous_bitwise(dtype, freqs_kind):
    """The CPU backward reads a qkv view chunk by chunk of tokens (memory order) and a contiguous qk
    plane by plane; both add every partial's rows in the same order, so the gradients of qk,
    weight and freqs have the same bits. B * N = 3 * 45 rows: three chunks, the last one short."""
    B, N, H, D = 3, 45, 2, 16
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(B, N, 3 * H * D, generator=g).to(dtype)
    view = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)[:2]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (1 + 0.5 * torch.randn(2, D, generator=g)).to(acc)
    coords = freqs = None
    kw = {}
    if freqs_kind != "none":
        coords = (torch.rand(N, 2, generator=g) * 12 - 2).to(acc)
        shape = {"shared": (2, D // 2), "per_head": (H, 2, D // 2), "indexed": (3, 2, D // 2)}[freqs_kind]
        freqs = torch.randn(*shape, generator=g).to(acc)
        if freqs_kind == "indexed":
            kw["freqs_index"] = torch.tensor([0] * 20 + [2] * 15 + [1] * 10)
    grad = torch.randn(view.shape, generator=g).to(dtype)
    results = []
    for qk in (view, view.contiguous()):
        leaves = [t.detach().requires_grad_() for t in (qk, weight, freqs) if t is not None]
        out = ops.qk_norm_rope(leaves[0], leaves[1], coords, leaves[2] if freqs is not None else None, **kw)
        results.append([out.detach(), *torch.autograd.grad(out, leaves, grad)])
    for a, b in zip(*results):
        assert torch.equal(a, b), (dtype, freqs_kind)


def test_jit_axial_prefix_tokens_not_rotated():
    B, H, N, D = 2, 3, 4 + 9, 16
    qk = torch.randn(2, B, H, N, D)
    weight = torch.rand(2, D) + 0.5
    out = ops.qk_norm_rope(qk, weight, sequence_coords((3, 3), prefix=4), axial_freqs(D))
    normed = ops.qk_norm_rope(qk, weight)
    assert torch.equal(out[..., :1, :], normed[..., :1, :])


@pytest.mark.parametrize("device", DEVICES)
def test_weight_gradient_dtype_follows_weight(device):
    qk = torch.randn(2, 2, 2, 3, 8, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(2, 8, device=device, requires_grad=True)  # float32, as under autocast
    freqs = axial_freqs(8, device=device).requires_grad_()
    out = ops.qk_norm_rope(qk, weight, sequence_coords((1, 3), device=device), freqs)
    gq, gw, gf = torch.autograd.grad(out.float().sum(), (qk, weight, freqs))
    assert gq.dtype == torch.bfloat16 and gw.dtype == torch.float32 and gf.dtype == torch.float32


# ---------------------------------------------------------------- CPU row kernels


def _row_kernel_results(qk, freqs_kind, interleaved, seed=7):
    """Output and gradients (qk, weight, freqs) of one call on `qk` (a leaf of any layout)."""
    g = torch.Generator().manual_seed(seed)
    _, _, H, N, D = qk.shape
    weight = (1 + 0.5 * torch.randn(2, D, generator=g)).requires_grad_()
    coords = freqs = None
    if freqs_kind != "none":
        coords = torch.rand(N, 2, generator=g) * 12 - 2
        shape = (H, 2, D // 2) if freqs_kind == "per_head" else (2, D // 2)
        freqs = torch.randn(*shape, generator=g).requires_grad_()
    out = ops.qk_norm_rope(qk, weight, coords, freqs, interleaved=interleaved)
    leaves = [t for t in (qk, weight, freqs) if t is not None]
    grads = torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=g).to(out.dtype))
    return [out.detach(), *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half_split"])
@pytest.mark.parametrize("freqs_kind", ["none", "shared", "per_head"])
@pytest.mark.parametrize("D", [64, 96])
def test_cpu_vector_rows_equal_scalar_rows_bitwise(dtype, interleaved, freqs_kind, D):
    """Rows of D channels (a multiple of 16) with unit channel stride run eight lanes at a time (where
    the CPU has AVX2; D = 64 with a compile-time row length); the same values read through a channel
    stride of 2 run the scalar rows. The output and every gradient (qk, weight, freqs) have the same
    bits: the same operations in the same order."""
    B, H, N = 2, 3, 37  # B * N = 74 rows per (s, h): two chunks of the backward's reduction
    wide = torch.randn(2, B, H, N, 2 * D, generator=torch.Generator().manual_seed(3)).to(dtype)
    strided = wide[..., ::2].detach().requires_grad_()
    dense = strided.detach().contiguous().requires_grad_()
    assert strided.stride(-1) == 2 and dense.stride(-1) == 1
    for a, b in zip(
        _row_kernel_results(strided, freqs_kind, interleaved), _row_kernel_results(dense, freqs_kind, interleaved)
    ):
        assert torch.equal(a, b.reshape(a.shape)), (dtype, interleaved, freqs_kind)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half_split"])
def test_cpu_vector_rows_round_special_values_as_scalar_rows(interleaved):
    """bfloat16 rows with NaNs, infinities, subnormals and the largest finite values (test_rope2d's
    mix, in a few rows; the other rows hold tiny and huge values): the vector rows give the bits of
    the scalar rows, output and gradients, except that a NaN of the float32 weight and freqs
    gradients may differ in sign and payload (IEEE leaves them to the order of an operation's
    operands) while staying NaN."""
    B, H, N, D = 1, 2, 37, 64
    gen = torch.Generator().manual_seed(13)
    wide = torch.randn(2, B, H, N, 2 * D, generator=gen) * torch.logspace(-30, 30, N).view(N, 1)
    wide = wide.to(torch.bfloat16)
    wide[:, :, :, :4] = _with_special_bfloat16(wide[:, :, :, :4], gen)
    results = [
        _row_kernel_results(x.detach().requires_grad_(), "shared", interleaved)
        for x in (wide[..., ::2], wide[..., ::2].contiguous())
    ]
    assert results[0][0].isnan().any()
    for a, b in zip(*results):
        b = b.reshape(a.shape)
        if a.dtype == torch.float32:  # the weight and freqs gradients
            assert torch.equal(a.isnan(), b.isnan()), interleaved
            a, b = a.masked_fill(a.isnan(), 0.0), b.masked_fill(b.isnan(), 0.0)
        bits = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
        assert torch.equal(a.view(bits), b.view(bits)), interleaved


_ISA_SCRIPT = """
import sys, torch
import jitrope
from jitrope import ops
torch.manual_seed(0)
out = []
for dtype in (torch.float32, torch.bfloat16):
    qkv = torch.randn(2, 37, 3 * 3 * 64).to(dtype)
    qk = qkv.view(2, 37, 3, 3, 64).permute(2, 0, 3, 1, 4)[:2].detach().requires_grad_()
    w = (torch.rand(2, 64) + 0.5).requires_grad_()
    coords, freqs = torch.rand(37, 2) * 10, torch.randn(3, 2, 32).requires_grad_()
    for il in (True, False):
        y = ops.qk_norm_rope(qk, w, coords, freqs, interleaved=il)
        out += [y.detach(), *torch.autograd.grad(y, (qk, w, freqs), torch.randn(y.shape).to(dtype))]
        r = ops.rope2d(qk, coords, freqs, interleaved=il)
        out += [r.detach(), *torch.autograd.grad(r, (qk, freqs), torch.randn(r.shape).to(dtype))]
    x = torch.randn(4, 40, 96).to(dtype).requires_grad_()
    ph, pw = torch.randn(5, 96).to(dtype).requires_grad_(), torch.randn(6, 96).to(dtype).requires_grad_()
    p = ops.pos2d_add(x, ph, pw, (5, 6), token_offset=3)
    out += [p.detach(), *torch.autograd.grad(p, (ph, pw), torch.randn(p.shape).to(dtype))]
torch.save(out, sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the AVX2 build exists on x86-64 only")
def test_cpu_isa_builds_give_the_same_bits(tmp_path):
    """The CPU row loops are compiled for the baseline ISA and for AVX2, picked at run time;
    JITROPE_CPU_ISA=baseline forces the baseline build. Both give the same bits (qk_norm_rope, rope2d
    and pos2d_add, outputs and gradients, float32 and bfloat16, strided q/k views)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(jitrope.__file__).parent.parent), *sys.path]))
    results = []
    for isa in ("baseline", "auto"):
        path = tmp_path / f"{isa}.pt"
        run_env = dict(env, JITROPE_CPU_ISA=isa, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], env=run_env, check=True, timeout=600)
        results.append(torch.load(path))
    assert len(results[0]) == len(results[1])
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), i


# ---------------------------------------------------------------- torch.compile


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
        torch.autograd.grad(out, (qkv, weight, freqs), g), torch.autograd.grad(ref, (qkv, weight, freqs), g)
    )
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
        (
            "qk first dim",
            lambda: f_(qk[:1], w),
            r"qk must have shape \[2, B, H, N, D\] \(q and k\), got \[1, 2, 3, 5, 8\]",
        ),
        ("D odd", lambda: f_(qk[..., :7], w[:, :7]), r"qk must have an even last dim D"),
        ("qk integer", lambda: f_(qk.long(), w), r"qk must be float16, bfloat16, float32 or float64, got torch.int64"),
        ("weight shape", lambda: f_(qk, w[:, :6]), r"weight must have shape \[2, D\] = \[2, 8\].*got \[2, 6\]"),
        (
            "weight integer",
            lambda: f_(qk, w.long()),
            r"weight must be a floating tensor \[2, D\], got dtype torch.int64",
        ),
        ("eps", lambda: f_(qk, w, eps=-1.0), r"eps must be a finite number >= 0, got -1"),
        ("coords alone", lambda: f_(qk, w, c, None), r"coords and freqs must be given together"),
        ("coords N", lambda: f_(qk, w, c[:4], f), r"coords must have shape \[N, 2\] = \[5, 2\].*got \[4, 2\]"),
        (
            "freqs H",
            lambda: f_(qk, w, c, torch.rand(2, 2, 4, device=device)),
            r"freqs must have shape .*\[H, 2, D/2\] = \[3, 2, 4\]",
        ),
        ("freqs integer", lambda: f_(qk, w, c, f.long()), r"freqs must be a floating tensor"),
        (
            "backward grad_out",
            lambda: torch.ops.jitrope.qk_norm_rope_backward(qk[:, :1], qk, w, c, f, 1e-6, True, True),
            r"qk_norm_rope_backward: grad_out must have qk's shape \[2, 2, 3, 5, 8\], got \[2, 1, 3, 5, 8\]",
        ),
        (
            "backward dtype",
            lambda: torch.ops.jitrope.qk_norm_rope_backward(qk.double(), qk, w, c, f, 1e-6, True, True),
            r"grad_out must have qk's dtype torch.float32, got torch.float64",
        ),
        (
            "backward freqs_grad",
            lambda: torch.ops.jitrope.qk_norm_rope_backward(qk, qk, w, None, None, 1e-6, True, True),
            r"freqs_grad needs coords and freqs",
        ),
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
def test_cuda_graph_capture():
    """The CUDA kernels run inside a CUDA graph (no host syncs); CPU parity is the battery's."""
    s = next(s for s in sample_inputs("cuda", torch.float32) if s.name == "jit_like")
    (qk, weight, coords, freqs), kw = s.inputs()
    eps, interleaved = kw["eps"], kw["interleaved"]
    qk = qk.clone()
    g = torch.randn(qk.shape, device="cuda")
    args = (qk, weight, coords, freqs, eps, interleaved)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.jitrope.qk_norm_rope(*args)
        torch.ops.jitrope.qk_norm_rope_backward(g, *args[:4], eps, interleaved, True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.jitrope.qk_norm_rope(*args)
        grads = torch.ops.jitrope.qk_norm_rope_backward(g, *args[:4], eps, interleaved, True)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, torch.ops.jitrope.qk_norm_rope(*args))
    for a, b in zip(grads, torch.ops.jitrope.qk_norm_rope_backward(g, *args[:4], eps, interleaved, True)):
        assert torch.equal(a, b)

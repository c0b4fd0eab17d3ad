"""Every jitrope op, and every backward op, refuses tensor arguments on different devices (the meta
device included) with an error naming the argument and both devices; all-meta calls still trace.

A CPU x with meta coords used to reach the meta (fake) kernel and come back as uninitialised CPU
memory: the device check now runs at each op's entry, before any backend kernel."""

import re

import pytest
import torch
from conftest import DEVICES

import jitrope  # loads the extension

if not jitrope.HAS_EXTENSION:  # the cases below are built from the ops themselves, at import
    pytest.skip(f"the extension is not built: {jitrope.EXTENSION_ERROR}", allow_module_level=True)

ops = torch.ops.jitrope


def _inputs(device):
    """One call per op: (op name, the op, positional args, index of the reference tensor, names
    of the tensor arguments by position)."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    B, H, N, D = 2, 3, 5, 8
    x = rnd(2, B, H, N, D)
    coords = torch.rand(N, 2, generator=g).to(device) * 4
    freqs = rnd(2, D // 2)
    weight = rnd(2, D)
    tokens = rnd(B, 7, D)
    pos_h, pos_w = rnd(3, D), rnd(4, D)
    rows = torch.tensor([-1, 0, 1, 2, 0, 1, 2]).to(device)
    cols = torch.tensor([-1, 0, 1, 2, 3, 0, 1]).to(device)
    return [
        ("rope2d", ops.rope2d.default, [x, coords, freqs, True], {0: "x", 1: "coords", 2: "freqs"}),
        ("rope2d_", ops.rope2d_.default, [x.clone(), coords, freqs, True], {0: "x", 1: "coords", 2: "freqs"}),
        (
            "rope2d_backward",
            ops.rope2d_backward.default,
            [x, coords, freqs, x.clone(), True],
            {0: "grad_out", 1: "coords", 2: "freqs", 3: "x (the forward input)"},
        ),
        (
            "qk_norm_rope",
            ops.qk_norm_rope.default,
            [x, weight, coords, freqs, 1e-6, True],
            {0: "qk", 1: "weight", 2: "coords", 3: "freqs"},
        ),
        (
            "qk_norm_rope_backward",
            ops.qk_norm_rope_backward.default,
            [x.clone(), x, weight, coords, freqs, 1e-6, True, True],
            {1: "qk", 0: "grad_out", 2: "weight", 3: "coords", 4: "freqs"},
        ),
        ("pos2d_add", ops.pos2d_add.default, [tokens, pos_h, pos_w, [2, 3], 1, 0, 0], {0: "x", 1: "pos_h", 2: "pos_w"}),
        (
            "pos2d_add_",
            ops.pos2d_add_.default,
            [tokens.clone(), pos_h, pos_w, [2, 3], 1, 0, 0],
            {0: "x", 1: "pos_h", 2: "pos_w"},
        ),
        (
            "pos2d_add_indexed",
            ops.pos2d_add_indexed.default,
            [tokens, pos_h, pos_w, rows, cols],
            {0: "x", 1: "pos_h", 2: "pos_w", 3: "rows", 4: "cols"},
        ),
        (
            "pos2d_add_indexed_backward",
            ops.pos2d_add_indexed_backward.default,
            [tokens, rows, cols, 3, 4],
            {0: "grad_out", 1: "rows", 2: "cols"},
        ),
    ]


def _ref_index(names):
    # The tensor the others are checked against: the first of x / grad_out / qk.
    for i, n in names.items():
        if n in ("x", "qk") or (n == "grad_out" and "qk" not in names.values()):
            return i
    raise AssertionError(names)


CASES = [(name, i) for name, _, _, names in _inputs("cpu") for i in names if i != _ref_index(names)]


def _case_id(case):
    name, i = case
    return f"{name}-{dict((n, t) for n, _, _, t in _inputs('cpu'))[name][i]}"


def _message(op, arg, ref, ref_device, got_device):
    return re.escape(f"{op}: {arg} must be on {ref}'s device {ref_device}, got {got_device}")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
@pytest.mark.parametrize("moved", ["argument", "reference"])
def test_meta_mixed_with_cpu_is_refused(case, moved):
    name, i = case
    op, args, names = next((o, a, n) for n_, o, a, n in _inputs("cpu") if n_ == name)
    r = _ref_index(names)
    if moved == "argument":
        args[i] = args[i].to("meta")
        pattern = _message(name, names[i], names[r], "cpu", "meta")
    else:  # everything but argument i on meta
        for j in names:
            if j != i:
                args[j] = args[j].to("meta")
        pattern = _message(name, names[i], names[r], "meta", "cpu")
    with pytest.raises(RuntimeError, match=pattern):
        op(*args)


def test_the_reported_case_raises_instead_of_returning_garbage():
    # ops.rope2d(qk, coords.to('meta'), freqs) returned uninitialised CPU memory.
    qk = torch.randn(2, 1, 2, 4, 8)
    coords, freqs = torch.rand(4, 2), torch.randn(2, 4)
    with pytest.raises(RuntimeError, match=r"rope2d: coords must be on x's device cpu, got meta"):
        jitrope.ops.rope2d(qk, coords.to("meta"), freqs)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "requires_grad"])
def test_python_api_and_autograd_refuse_mixed_devices(grad):
    x = torch.randn(2, 2, 3, 5, 8, requires_grad=grad)
    coords, freqs = torch.rand(5, 2), torch.randn(2, 4, requires_grad=grad)
    weight = torch.ones(2, 8, requires_grad=grad)
    with pytest.raises(RuntimeError, match=r"rope2d: freqs must be on x's device cpu, got meta"):
        jitrope.ops.rope2d(x, coords, freqs.detach().to("meta"))
    with pytest.raises(RuntimeError, match=r"qk_norm_rope: weight must be on qk's device cpu, got meta"):
        jitrope.ops.qk_norm_rope(x, weight.detach().to("meta"), coords, freqs)
    with pytest.raises(RuntimeError, match=r"qk_norm_rope: coords must be on qk's device cpu, got meta"):
        jitrope.ops.qk_norm_rope(x, weight, coords.to("meta"), freqs)
    t = torch.randn(2, 7, 8, requires_grad=grad)
    with pytest.raises(RuntimeError, match=r"pos2d_add: pos_w must be on x's device cpu, got meta"):
        jitrope.ops.pos2d_add(t, torch.randn(3, 8), torch.randn(4, 8).to("meta"), (2, 3), token_offset=1)
    idx = torch.zeros(7, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"pos2d_add_indexed: pos_h must be on x's device cpu, got meta"):
        jitrope.ops.pos2d_add_indexed(t, torch.randn(3, 8).to("meta"), torch.randn(4, 8), idx, idx)


def test_all_meta_calls_still_give_meta_results():
    for name, op, args, _names in _inputs("meta"):
        out = op(*args)
        outs = out if isinstance(out, tuple) else (out,)
        assert all(o.device.type == "meta" for o in outs), name


@pytest.mark.parametrize("device", [d for d in DEVICES if (d.values[0] if hasattr(d, "values") else d) == "cuda"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_cpu_mixed_with_cuda_is_refused(case, device):
    name, i = case
    op, args, names = next((o, a, n) for n_, o, a, n in _inputs(device) if n_ == name)
    args[i] = args[i].cpu()
    r = _ref_index(names)
    with pytest.raises(RuntimeError, match=_message(name, names[i], names[r], "cuda:0", "cpu")):
        op(*args)


def _indexed_calls(device, index_device):
    """The ops that take freqs_index, with every other tensor on `device`."""
    x = torch.randn(2, 2, 3, 5, 8, device=device)
    coords, weight = torch.rand(5, 2, device=device), torch.ones(2, 8, device=device)
    freqs = torch.randn(3, 2, 4, device=device)
    index = torch.tensor([0, 1, 2, 2, 0], device=index_device)
    return [
        ("rope2d", "x", lambda: ops.rope2d.default(x, coords, freqs, True, index)),
        ("rope2d_", "x", lambda: ops.rope2d_.default(x.clone(), coords, freqs, True, index)),
        ("rope2d_backward", "grad_out", lambda: ops.rope2d_backward.default(x, coords, freqs, x, True, index)),
        ("qk_norm_rope", "qk", lambda: ops.qk_norm_rope.default(x, weight, coords, freqs, 1e-6, True, index)),
        (
            "qk_norm_rope_backward",
            "qk",
            lambda: ops.qk_norm_rope_backward.default(x, x, weight, coords, freqs, 1e-6, True, True, index),
        ),
    ]


@pytest.mark.parametrize("op", [name for name, _, _ in _indexed_calls("cpu", "cpu")])
def test_freqs_index_on_another_device_is_refused(op):
    name, ref, call = next(c for c in _indexed_calls("cpu", "meta") if c[0] == op)
    with pytest.raises(RuntimeError, match=_message(name, "freqs_index", ref, "cpu", "meta")):
        call()
    name, ref, call = next(c for c in _indexed_calls("meta", "cpu") if c[0] == op)
    with pytest.raises(RuntimeError, match=_message(name, "freqs_index", ref, "meta", "cpu")):
        call()

"""The op-test battery every jitrope op test subclasses (torchvision ``test/test_ops.py``'s ``RoIOpTester``
is the model): a subclass gives a sample generator, the op, its reference and tolerances; the battery runs
every op through the same checks, on every device of ``conftest.DEVICES`` (CUDA cases are skipped, not
absent, without a GPU).

What it checks, per sample (one call of the op):

- ``test_forward_matches_reference``: float64 and float32 against the reference in the same dtype and in
  float64 (1e-12 / 1e-5, docs/ops.md), output shape, dtype and layout (:meth:`OpBattery.check_layout`);
- ``test_backward_matches_reference``: the gradient of every leaf against the reference's autograd;
- ``test_gradcheck``: float64 ``gradcheck`` with all leaves differentiable, and with each leaf alone (the
  kernels skip the gradients nobody asked for, a code path of its own);
- ``test_double_backward``: ``gradgradcheck`` when :attr:`OpBattery.double_backward`, else a clear
  "double backward" error;
- ``test_opcheck``: ``torch.library.opcheck`` (test_schema, test_autograd_registration, test_faketensor,
  test_aot_dispatch_dynamic) of every call :meth:`OpBattery.opcheck_calls` lists (in-place twins and backward
  ops included), for the samples named in :attr:`OpBattery.opcheck_samples`;
- ``test_torch_compile_fullgraph``: the op (and a reduction of its output) in ``torch.compile(fullgraph=True,
  backend="aot_eager")``, static and dynamic shapes, gives eager's output and gradients (fake kernels, the
  autograd registration and the backward op's fake under AOT autograd), for the samples named in
  :attr:`OpBattery.compile_samples`;
- ``test_low_precision_error_within_twice_eager``: float16 and bfloat16, output and gradients: the kernel's
  error against a float64 reference is at most twice that of the reference run in the same dtype
  (flash-attention's rule, ``conftest.assert_kernel_error_within_eager``);
- ``test_deterministic``: every dtype, the same bits twice for the output and every gradient, also with one
  thread instead of all;
- ``test_views_match_contiguous``: strided views (qkv slices, transposes, offsets) give the bits of
  contiguous copies, forward and gradients;
- ``test_cuda_matches_cpu``: on a GPU, float64 and float32 against the CPU kernels within the tolerances;
- ``test_samples_cover_views_and_empty_batch``: the generator has a non-contiguous input and an empty
  (B = 0) one, so the checks above cover both.

How to subclass (``tests/test_rope2d.py`` is a full example)::

    class TestPos2dAddIndexed(OpBattery):
        op = staticmethod(ops.pos2d_add_indexed)
        reference = staticmethod(pos2d_add_indexed_ref)
        overload = torch.ops.jitrope.pos2d_add_indexed.default
        opcheck_samples = ("strided", "batch_0")

        def sample_inputs(self, device, dtype, requires_grad=False):
            gen = torch.Generator().manual_seed(0)  # draw on the CPU, then move: equal on every device
            ...
            return [OpSample("strided", (Leaf("x", lambda t: t.transpose(0, 1)), Leaf("pos_h"), Leaf("pos_w"),
                                         rows, cols), {}, dict(x=base, pos_h=pos_h, pos_w=pos_w)), ...]

- ``op`` and ``reference`` take the same ``(*args, **kwargs)``; wrap them in ``staticmethod``. The default
  :meth:`OpBattery.opcheck_calls` passes that call to ``overload`` as it is, so the wrapper's argument
  names must be the schema's (they are for all of jitrope's ops); set ``overload`` only when
  ``jitrope.HAS_EXTENSION`` (the module is imported, and skipped, without the extension).
- A sample's ``args``/``kwargs`` are the call; a :class:`Leaf` placeholder stands for a differentiable input
  (optionally seen through a view of the leaf that owns its memory). Everything else is passed as it is:
  index tensors (``rows``/``cols`` of ``pos2d_add_indexed``, a ``freqs_index=`` keyword), coordinates,
  grids, flags. The battery makes float64, detached or cloned copies of the leaves only, so the reference
  must accept the other tensors as the op gets them (it upcasts them itself); only
  ``test_views_match_contiguous`` copies every tensor argument (``.contiguous()``, values unchanged).
- Leaves are floating tensors: the input in ``dtype``, parameters (weights, frequencies) in float32 for the
  low-precision dtypes where the op wants that. With ``requires_grad`` every leaf requires grad.
- Sample names must be unique: they are the test ids.
- To reuse an op's subclass (say the ``freqs_index=`` variant of rope2d: the same op and reference, other
  samples), subclass it through its module, ``import test_rope2d`` then
  ``class TestRope2DFreqsIndex(test_rope2d.TestRope2D)``, so pytest does not collect the imported class a
  second time; override :meth:`OpBattery.sample_inputs`, :attr:`OpBattery.opcheck_samples` and
  :attr:`OpBattery.compile_samples` (they name the new samples), and :meth:`OpBattery.opcheck_calls` where the
  parent's does not pass the new argument on (TestRope2D's and TestQkNormRope's give a sample's ``freqs_index=``
  to the backward ops too; ``tests/test_freqs_index.py`` subclasses both).
- Override :meth:`opcheck_calls` to add the in-place twin (with ``conftest.INPLACE_OPCHECK_UTILS``) and the
  backward op, :meth:`check_layout` for outputs that are not contiguous, and the tolerance dicts where an
  op needs other ones. Tests of errors, in-place twins, ``torch.compile`` inside a larger function (an
  attention block, inductor) and special cases stay in the op's test file, beside its subclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import pytest
import torch
from conftest import DEVICES, assert_kernel_error_within_eager
from torch import Tensor

__all__ = ["Leaf", "OpSample", "OpBattery", "DTYPES", "LOW_PRECISION", "OPCHECK_UTILS"]

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
OPCHECK_UTILS = tuple(torch.library._OPCHECK_DEFAULT_UTILS)
FLOAT_IDS = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
CUDA_ONLY = [d for d in DEVICES if getattr(d, "values", (d,))[0] == "cuda"]


@dataclass(frozen=True)
class Leaf:
    """Placeholder in a sample's args/kwargs for the differentiable leaf ``name``, seen through ``view``
    (``None``: the leaf itself)."""

    name: str
    view: Optional[Callable[[Tensor], Tensor]] = None


@dataclass
class OpSample:
    """One call of an op: ``name`` (the test id), ``args``/``kwargs`` with :class:`Leaf` placeholders, and
    ``leaves``, the differentiable inputs by name."""

    name: str
    args: tuple
    kwargs: Dict[str, Any] = field(default_factory=dict)
    leaves: Dict[str, Tensor] = field(default_factory=dict)

    def inputs(self, leaves: Optional[Mapping[str, Tensor]] = None) -> Tuple[tuple, Dict[str, Any]]:
        """The call's ``(args, kwargs)``, with ``leaves`` (default: the sample's own) in the placeholders."""
        leaves = self.leaves if leaves is None else leaves

        def fill(a):
            if isinstance(a, Leaf):
                t = leaves[a.name]
                return t if a.view is None else a.view(t)
            return a

        return tuple(fill(a) for a in self.args), {k: fill(v) for k, v in self.kwargs.items()}

    def call(self, fn: Callable, leaves: Optional[Mapping[str, Tensor]] = None):
        args, kwargs = self.inputs(leaves)
        return fn(*args, **kwargs)

    def map_leaves(self, fn: Callable[[Tensor], Tensor]) -> Dict[str, Tensor]:
        return {k: fn(t) for k, t in self.leaves.items()}

    def __repr__(self) -> str:
        args, kwargs = self.inputs()
        shapes = [tuple(a.shape) if isinstance(a, Tensor) else a for a in args]
        return f"OpSample({self.name}, args={shapes}, kwargs={sorted(kwargs)})"


def _tensors(args: tuple, kwargs: Mapping[str, Any]) -> List[Tensor]:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]


def _outputs(out) -> List[Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _cotangents(outs: Sequence[Tensor], seed: int = 7) -> List[Tensor]:
    """Random upstream gradients, the same on every device and every call."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype).to(o.device) for o in outs]


def _grads(outs: Sequence[Tensor], inputs: Sequence[Tensor], cotangents: Sequence[Tensor]) -> Tuple[Tensor, ...]:
    return torch.autograd.grad(outs, inputs, cotangents, retain_graph=True, allow_unused=False)


class OpBattery:
    """Base of every op test class; see the module docstring for what it checks and how to subclass it."""

    op: Callable  # staticmethod(ops.x)
    reference: Callable  # staticmethod(reference.x_ref)
    overload: Any = None  # torch.ops.jitrope.x.default, for opcheck
    opcheck_samples: Sequence[str] = ()  # opcheck is slow (AOT tracing): a few samples that differ in kind
    compile_samples: Sequence[str] = ()  # the samples test_torch_compile_fullgraph traces (one is enough)
    tolerances: Dict[torch.dtype, dict] = {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
    }
    # Gradients of parameters (freqs, tables, weights) are sums over tokens, made in another order than
    # autograd's: in float32 they differ by a few rounding errors of the sum, not of an element.
    grad_tolerances: Dict[torch.dtype, dict] = {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-4, atol=1e-5),
    }
    double_backward = False  # True: the backward is differentiable (gradgradcheck), else it must refuse
    gradcheck_fast_above = 2000  # numel of the largest leaf above which gradcheck runs in fast mode

    def sample_inputs(self, device: str, dtype: torch.dtype, requires_grad: bool = False) -> List[OpSample]:
        """The op's cases (every subclass defines them, as torchvision's RoIOpTester subclasses do)."""
        raise NotImplementedError(f"{type(self).__name__} must define sample_inputs (the op's cases)")

    def opcheck_calls(self, sample: OpSample) -> List[Tuple[Any, tuple, Dict[str, Any], Sequence[str]]]:
        """``(op overload, args, kwargs, test_utils)`` for each opcheck of ``sample`` (a float32 sample
        whose leaves require grad); the default checks the op itself."""
        args, kwargs = sample.inputs()
        return [(self.overload, args, kwargs, OPCHECK_UTILS)]

    def check_layout(self, sample: OpSample, out: Tensor) -> None:
        """Layout of the output; the default: a new contiguous tensor."""
        assert out.is_contiguous(), f"{sample}: output strides {out.stride()}"

    # ------------------------------------------------------------------ parametrization

    def pytest_generate_tests(self, metafunc):
        """pytest calls this hook of the class: parametrize ``sample_name`` by this subclass's samples
        and ``opcheck_name`` by :attr:`opcheck_samples`."""
        if "sample_name" in metafunc.fixturenames:
            metafunc.parametrize("sample_name", self._sample_names())
        if "opcheck_name" in metafunc.fixturenames:
            names = self._sample_names()
            missing = [n for n in self.opcheck_samples if n not in names]
            assert self.opcheck_samples and not missing, f"opcheck_samples must name samples: {missing or 'none'}"
            metafunc.parametrize("opcheck_name", list(self.opcheck_samples))
        if "compile_name" in metafunc.fixturenames:
            names = self._sample_names()
            missing = [n for n in self.compile_samples if n not in names]
            assert self.compile_samples and not missing, f"compile_samples must name samples: {missing or 'none'}"
            metafunc.parametrize("compile_name", list(self.compile_samples))

    def _sample_names(self) -> List[str]:
        names = [s.name for s in self.sample_inputs("cpu", torch.float64)]
        assert len(set(names)) == len(names), f"sample names must be unique: {names}"
        return names

    def sample(self, name: str, device: str, dtype: torch.dtype, requires_grad: bool = False) -> OpSample:
        return next(s for s in self.sample_inputs(device, dtype, requires_grad) if s.name == name)

    # ------------------------------------------------------------------ the battery

    def test_samples_cover_views_and_empty_batch(self):
        samples = self.sample_inputs("cpu", torch.float32)
        tensors = [t for s in samples for t in _tensors(*s.inputs()) if t.is_floating_point()]
        assert any(not t.is_contiguous() for t in tensors), "no sample has a non-contiguous input"
        assert any(t.numel() == 0 for s in samples for t in _tensors(*s.inputs())[:1]), "no sample with B = 0"

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=FLOAT_IDS.get)
    def test_forward_matches_reference(self, device, dtype, sample_name):
        s = self.sample(sample_name, device, dtype)
        out = s.call(self.op)
        same = s.call(self.reference)
        exact = s.call(self.reference, s.map_leaves(lambda t: t.double()))
        tol = self.tolerances[dtype]
        for o, r, e in zip(_outputs(out), _outputs(same), _outputs(exact)):
            assert o.shape == r.shape and o.dtype == r.dtype == dtype, f"{s}: {o.shape} {o.dtype} vs {r.dtype}"
            self.check_layout(s, o)
            torch.testing.assert_close(o, r, **tol, msg=lambda m: f"{s} vs reference: {m}")
            torch.testing.assert_close(o, e.to(dtype), **tol, msg=lambda m: f"{s} vs float64 reference: {m}")

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=FLOAT_IDS.get)
    def test_backward_matches_reference(self, device, dtype, sample_name):
        s = self.sample(sample_name, device, dtype, requires_grad=True)
        leaves = list(s.leaves.values())
        outs = _outputs(s.call(self.op))
        g = _cotangents(outs)
        got = _grads(outs, leaves, g)
        want = _grads(_outputs(s.call(self.reference)), leaves, g)
        for name, a, b in zip(s.leaves, got, want):
            assert a.dtype == b.dtype and a.shape == b.shape, f"{s} grad {name}"
            torch.testing.assert_close(a, b, **self.grad_tolerances[dtype], msg=lambda m: f"{s} grad {name}: {m}")

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("wrt", ["all", "each"])
    def test_gradcheck(self, device, wrt, sample_name):
        s = self.sample(sample_name, device, torch.float64)
        groups = [list(s.leaves)] if wrt == "all" else [[n] for n in s.leaves]
        fast = max(t.numel() for t in s.leaves.values()) > self.gradcheck_fast_above
        for names in groups:
            leaves = s.map_leaves(lambda t: t.detach())
            inputs = tuple(leaves[n].requires_grad_() for n in names)

            def fn(*ts, names=names, leaves=leaves):
                return s.call(self.op, {**leaves, **dict(zip(names, ts))})

            assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast), f"{s} wrt {names}"

    @pytest.mark.parametrize("device", DEVICES)
    def test_double_backward(self, device, sample_name):
        s = self.sample(sample_name, device, torch.float64, requires_grad=True)
        leaves = tuple(s.leaves.values())
        if self.double_backward:
            fast = max(t.numel() for t in leaves) > self.gradcheck_fast_above
            fn = lambda *ts: s.call(self.op, dict(zip(s.leaves, ts)))  # noqa: E731
            assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=fast), s
            return
        outs = _outputs(s.call(self.op))
        vs = [torch.randn_like(o, requires_grad=True) for o in outs]
        grads = torch.autograd.grad(outs, leaves, vs, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.backward([t.sum() for t in grads])

    @pytest.mark.parametrize("device", DEVICES)
    def test_opcheck(self, device, opcheck_name):
        s = self.sample(opcheck_name, device, torch.float32, requires_grad=True)
        for overload, args, kwargs, utils in self.opcheck_calls(s):
            torch.library.opcheck(overload, args, kwargs, test_utils=utils)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
    def test_torch_compile_fullgraph(self, device, dynamic, compile_name):
        torch._dynamo.reset()
        s = self.sample(compile_name, device, torch.float32, requires_grad=True)
        names, leaves = list(s.leaves), list(s.leaves.values())

        def block(*ts):
            return [(o * o).sum(dim=-1) for o in _outputs(s.call(self.op, dict(zip(names, ts))))]

        try:
            compiled = torch.compile(block, fullgraph=True, dynamic=dynamic, backend="aot_eager")
            out, want = compiled(*leaves), block(*leaves)
            g = _cotangents(want)
            torch.testing.assert_close(out, want, msg=lambda m: f"{s}: {m}")
            got = torch.autograd.grad(out, leaves, g)  # no retain_graph: a compiled backward may donate buffers
            torch.testing.assert_close(got, torch.autograd.grad(want, leaves, g), msg=lambda m: f"{s} grads: {m}")
        finally:
            torch._dynamo.reset()

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", LOW_PRECISION, ids=FLOAT_IDS.get)
    def test_low_precision_error_within_twice_eager(self, device, dtype, sample_name):
        """flash-attention's rule: against a float64 reference, the kernel's error is at most about twice
        that of the same-precision eager implementation (the reference run in ``dtype``), forward and
        backward."""
        s = self.sample(sample_name, device, dtype, requires_grad=True)
        leaves = list(s.leaves.values())
        leaves64 = s.map_leaves(lambda t: t.detach().double().requires_grad_())
        out, eager = _outputs(s.call(self.op)), _outputs(s.call(self.reference))
        ref = _outputs(s.call(self.reference, leaves64))
        g = _cotangents(out)
        results = {
            "out": (out, eager, ref),
            "grads": (
                _grads(out, leaves, g),
                _grads(eager, leaves, g),
                _grads(ref, list(leaves64.values()), [t.double() for t in g]),
            ),
        }
        for what, (kernel, same, exact) in results.items():
            for i, (k, e, r) in enumerate(zip(kernel, same, exact)):
                name = what if what == "out" else f"grad {list(s.leaves)[i]}"
                assert k.shape == r.shape and k.dtype == e.dtype, f"{s} {name}"
                if r.numel():
                    assert_kernel_error_within_eager(f"{s} {name}", k, e, r)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", DTYPES, ids=FLOAT_IDS.get)
    def test_deterministic(self, device, dtype, sample_name):
        """The same bits twice, output and gradients, and with one thread as with all (the kernels'
        chunking depends on shapes only)."""
        s = self.sample(sample_name, device, dtype, requires_grad=True)
        leaves = list(s.leaves.values())

        def run():
            outs = _outputs(s.call(self.op))
            return [o.detach() for o in outs] + list(_grads(outs, leaves, _cotangents(outs)))

        first = run()
        threads = torch.get_num_threads()
        try:
            for n in (threads, 1):
                torch.set_num_threads(n)
                for a, b in zip(first, run()):
                    assert torch.equal(a, b), f"{s} with {n} thread(s)"
        finally:
            torch.set_num_threads(threads)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=FLOAT_IDS.get)
    def test_views_match_contiguous(self, device, dtype, sample_name):
        s = self.sample(sample_name, device, dtype, requires_grad=True)
        args, kwargs = s.inputs()
        inputs = [t for t in _tensors(args, kwargs) if t.requires_grad]
        outs = _outputs(self.op(*args, **kwargs))

        def dense(a):
            return a.detach().contiguous().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a

        dargs, dkwargs = tuple(dense(a) for a in args), {k: dense(v) for k, v in kwargs.items()}
        douts = _outputs(self.op(*dargs, **dkwargs))
        dinputs = [t for t in _tensors(dargs, dkwargs) if t.requires_grad]
        g = _cotangents(outs)
        for a, b in zip(outs + list(_grads(outs, inputs, g)), douts + list(_grads(douts, dinputs, g))):
            assert torch.equal(a, b), s

    @pytest.mark.parametrize("device", CUDA_ONLY)
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=FLOAT_IDS.get)
    def test_cuda_matches_cpu(self, device, dtype, sample_name):
        cpu = self.sample(sample_name, "cpu", dtype, requires_grad=True)
        gpu = self.sample(sample_name, device, dtype, requires_grad=True)
        outs, gouts = _outputs(cpu.call(self.op)), _outputs(gpu.call(self.op))
        g = _cotangents(outs)
        got = gouts + list(_grads(gouts, list(gpu.leaves.values()), [t.to(device) for t in g]))
        want = outs + list(_grads(outs, list(cpu.leaves.values()), g))
        for a, b in zip(got, want):
            torch.testing.assert_close(a.cpu(), b, **self.tolerances[dtype], msg=lambda m: f"{cpu}: {m}")

"""jitrope: fused 2D positional-encoding ops (2D RoPE, factorized 2D position add) and a JiT
diffusion transformer built from them.

Importing the package loads the C++/CUDA extension ``jitrope._C``, which registers the
``torch.ops.jitrope.*`` operators. Without it, everything still runs with the pure-PyTorch
references (``pos_impl="torch"``), and a warning says so.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

import torch

__version__ = "0.1.0"

try:
    from . import _C  # noqa: F401  (registers torch.ops.jitrope.*)

    HAS_EXTENSION = True
    EXTENSION_ERROR: str | None = None
except ImportError as e:  # not built, or built against another torch
    HAS_EXTENSION = False
    EXTENSION_ERROR = str(e)
    warnings.warn(
        "jitrope: the C++/CUDA extension jitrope._C could not be loaded "
        f"({e}); the fused ops are unavailable and models fall back to pos_impl='torch'. "
        "Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


OPS = (
    "pos2d_add",
    "pos2d_add_",
    "pos2d_add_backward",
    "rope2d",
    "rope2d_",
    "rope2d_backward",
    "qk_norm_rope",
    "qk_norm_rope_backward",
    "pos2d_add_indexed",
    "pos2d_add_indexed_backward",
)


def has_cuda_kernels() -> bool:
    """True when the loaded extension was built with the CUDA kernels of every op."""
    return HAS_EXTENSION and all(torch._C._dispatch_has_kernel_for_dispatch_key(f"jitrope::{op}", "CUDA") for op in OPS)


if HAS_EXTENSION and not has_cuda_kernels():
    warnings.warn(
        "jitrope: this build of the extension has CPU kernels only (built with JITROPE_CPU_ONLY=1, "
        "without nvcc, or against a CPU build of torch); CUDA tensors will not run the fused ops.",
        RuntimeWarning,
        stacklevel=2,
    )

from . import ops, reference, rope  # noqa: E402

__all__ = ["ops", "reference", "rope", "HAS_EXTENSION", "has_cuda_kernels", "__version__"]


# Modules that moved into the data / eval subpackages keep their old import paths: ``import
# jitrope.imageset`` gives the module ``jitrope.data.imageset`` itself (one module object, so
# monkeypatching and isinstance see the same names). A finder rather than a file per old path:
# a file at the old path would make git see an edit there, not a rename that others' edits follow.
# ``python -m jitrope.evaluate`` needs a file to run: jitrope/evaluate.py.
MOVED_MODULES = {
    "jitrope.imageset": "jitrope.data.imageset",
    "jitrope.emoji": "jitrope.data.emoji",
    "jitrope.datasets": "jitrope.data.datasets",
    "jitrope.batching": "jitrope.data.batching",
    "jitrope.metrics": "jitrope.eval.metrics",
    "jitrope.featnet": "jitrope.eval.featnet",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path of :data:`MOVED_MODULES` as the module at its new path."""

    def __init__(self):
        self._specs = {}

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED_MODULES else None

    def create_module(self, spec):
        module = importlib.import_module(MOVED_MODULES[spec.name])
        self._specs[spec.name] = module.__spec__  # importlib sets __spec__ on what it gets: put it back below
        return module

    def exec_module(self, module):
        module.__spec__ = self._specs.pop(module.__spec__.name)


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())

"""jitrope: fused 2D positional-encoding ops (2D RoPE, factorized 2D position add) and a JiT
diffusion transformer built from them.

Importing the package loads the C++/CUDA extension ``jitrope._C``, which registers the
``torch.ops.jitrope.*`` operators. Without it, everything still runs with the pure-PyTorch
references (``pos_impl="torch"``), and a warning says so.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

__version__ = "0.1.0"

try:
    from . import _C  # noqa: F401  (registers torch.ops.jitrope.*)

    HAS_EXTENSION = True
    EXTENSION_ERROR: str | None = None
except ImportError as e:  # not built, or built against another torch
    HAS_EXTENSION = False
    # Python words a missing submodule as "partially initialized module ... circular import":
    # say plainly that no built library sits next to this file.
    _here = Path(__file__).parent
    EXTENSION_ERROR = str(e) if any(_here.glob("_C*.so")) else f"not built: no _C*.so in {_here}"
    warnings.warn(
        "jitrope: the C++/CUDA extension jitrope._C could not be loaded "
        f"({EXTENSION_ERROR}); the fused ops are unavailable and models fall back to pos_impl='torch'. "
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

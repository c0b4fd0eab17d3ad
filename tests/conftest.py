import pytest
import torch

import jitrope


def available_devices():
    devices = ["cpu"]
    if torch.cuda.is_available() and jitrope.has_cuda_kernels():
        devices.append("cuda")
    return devices


# Every op test is parametrized over both devices; CUDA cases are skipped (not absent) here.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not (torch.cuda.is_available() and jitrope.has_cuda_kernels()),
            reason="needs a CUDA device and the extension's CUDA kernels",
        ),
    ),
]


# The in-place twins (rope2d_, pos2d_add_) carry torch.Tag.inplace where PyTorch has it (2.12+),
# which torch.compile needs to functionalize an op that returns its mutated input. Older
# releases (the GPU check machine has 2.11) cannot AOT-trace them; every other check still runs.
INPLACE_OPCHECK_UTILS = tuple(
    u for u in torch.library._OPCHECK_DEFAULT_UTILS
    if hasattr(torch.Tag, "inplace") or u != "test_aot_dispatch_dynamic"
)

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

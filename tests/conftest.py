import pytest
import torch

import jitrope


def available_devices():
    devices = ["cpu"]
    if torch.cuda.is_available() and jitrope.has_cuda_kernels():
        devices.append("cuda")
    return devices


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the test machine is shared, and tiny models gain nothing from more
    (modules use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    u for u in torch.library._OPCHECK_DEFAULT_UTILS if hasattr(torch.Tag, "inplace") or u != "test_aot_dispatch_dynamic"
)


def assert_kernel_error_within_eager(what, kernel, eager, ref):
    """flash-attention's numerics test: against a float64 reference, the kernel's error is at most
    twice the error of a same-precision eager implementation (plus a tiny absolute floor)."""
    err_k = (kernel.double() - ref).abs().max().item()
    err_e = (eager.double() - ref).abs().max().item()
    eps = 1e-6 * max(1.0, ref.abs().max().item())
    assert err_k <= 2 * err_e + eps, f"{what}: kernel error {err_k:.3g} vs eager {err_e:.3g}"

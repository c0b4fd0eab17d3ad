"""Where the work runs: the device a config names, the CPU's threads, and the ranks of a torchrun job.

:func:`resolve_device` and :func:`cpu_setup` serve every command (train, sample, evaluate);
:class:`Dist`, :func:`rank_device` and :func:`setup_device` the trainer's ranks.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .config import ConfigError

__all__ = ["resolve_device", "cpu_setup", "rank_device", "setup_device", "Dist", "RankFailed"]


def resolve_device(name: str, key: str) -> torch.device:
    """``auto`` (CUDA when there is one, else the CPU) or a device this machine has; ``key`` is the
    config key that named it, for the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config key {key}: {name!r} is not a device (auto | cpu | cuda | cuda:N)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"config key {key}: {name}: this machine has no usable CUDA device; use cpu or auto")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ConfigError(f"config key {key}: {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return d


def cpu_setup(num_threads: Optional[int]) -> None:
    """Denormal floats flushed to zero (they stall CPUs), and ``num_threads`` intra-op threads (None:
    torch's default)."""
    torch.set_flush_denormal(True)
    if num_threads is not None:
        torch.set_num_threads(num_threads)


class RankFailed(RuntimeError):
    """Another rank failed a step that every rank takes together (rank 0 fetching the data or
    writing a checkpoint): this rank stops too, rather than wait for it forever; the failed rank's
    own ``error:`` line says why."""


class Dist:
    """The ranks of a torchrun job (one rank without it), from ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``;
    joins the process group (gloo on CPU, nccl on GPU) when there is more than one."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.device = device  # nccl reduces tensors on the GPU
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def together(self, what: str):
        """A barrier after the block that also tells every rank which ranks' blocks raised: a rank
        that failed re-raises its own error, the others raise :class:`RankFailed` naming ``what``.
        A bare barrier would leave the others waiting forever for a rank that stopped."""
        try:
            yield
        except Exception:
            self._failed_ranks(True)
            raise
        failed = self._failed_ranks(False)
        if failed:
            who = f"rank {failed[0]}" if len(failed) == 1 else "ranks " + ", ".join(map(str, failed))
            raise RankFailed(f"rank {self.rank} stopped: {who} failed {what} (its error line says why)")

    def _failed_ranks(self, failed: bool) -> List[int]:
        if not self.enabled:
            return [self.rank] if failed else []
        flags = torch.zeros(self.world, dtype=torch.int32, device=self.device)
        flags[self.rank] = int(failed)
        dist.all_reduce(flags)
        return flags.nonzero().flatten().tolist()

    def mean(self, x: Tensor) -> Tensor:
        if self.enabled:
            x = x.clone()
            dist.all_reduce(x)
            x /= self.world
        return x

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank, so that every rank takes rank 0's decision."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def rank_device(name: str, local_rank: int) -> torch.device:
    """:func:`resolve_device`, with ``cuda`` / ``auto`` meaning this rank's GPU (``local_rank``)."""
    d = resolve_device(name, "train.device")
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", local_rank)
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"config key train.device: {name}: rank LOCAL_RANK={local_rank} has no GPU of its own, "
                f"there are only {torch.cuda.device_count()} CUDA device(s)"
            )
    return d


def setup_device(device: torch.device, num_threads: Optional[int]) -> None:
    """This process's device made current (CUDA), or the CPU set up (:func:`cpu_setup`)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cpu":
        cpu_setup(num_threads)  # denormal floats (decaying Adam moments, tiny grads) stall CPUs

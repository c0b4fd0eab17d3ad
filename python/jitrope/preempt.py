"""SIGTERM is preemption: what cluster schedulers (SLURM, Kubernetes) send, with a grace period,
before they take a machine back.

While :func:`sigterm_as_preemption` is active, SIGTERM no longer ends the process at once. During
the training steps it only raises a flag (:meth:`Preemption.requested`): the trainer finishes the
step it is on, writes a checkpoint of it (atomic and verified, as always), prints the command that
continues the run and exits with 143 (128 + SIGTERM, what a shell reports for a process SIGTERM
ended). Before the steps begin (setup, data, resume) there is no step to keep: the handler raises
:class:`Terminated` at once, which the trainer reports as it reports Ctrl-C.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

import torch

__all__ = ["Preemption", "Terminated", "sigterm_as_preemption", "EXIT_SIGTERM"]

EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


class Terminated(BaseException):
    """SIGTERM before the training steps began. A BaseException, as KeyboardInterrupt is: no
    ``except Exception`` on the way swallows it."""


class Preemption:
    """The state of SIGTERM for one training run: a flag once the steps run (:meth:`steps_begin`)."""

    def __init__(self) -> None:
        self.signalled = False
        self.in_steps = False

    def handler(self, signum, frame) -> None:
        if self.in_steps:
            self.signalled = True  # the step finishes, and its checkpoint is written
        else:
            raise Terminated()

    def steps_begin(self) -> None:
        """From now on a SIGTERM waits for the end of the step it arrives in."""
        self.in_steps = True

    def requested(self, dist) -> bool:
        """Whether a SIGTERM came, on any rank (``dist``: :class:`jitrope.runtime.Dist`): every rank
        must stop at the same step, since the checkpoint is written together."""
        if not dist.enabled:
            return self.signalled
        return bool(dist.mean(torch.tensor(float(self.signalled), device=dist.device)) > 0)


@contextlib.contextmanager
def sigterm_as_preemption() -> Iterator[Preemption]:
    """SIGTERM handled as a :class:`Preemption` while the block runs (the handler before it is put
    back after). Outside the main thread, where Python cannot set a handler, SIGTERM stays as it was."""
    state = Preemption()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    before = signal.signal(signal.SIGTERM, state.handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, before)

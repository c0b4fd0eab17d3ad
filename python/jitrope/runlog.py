"""A run's machine-readable training log: ``<run>/metrics.jsonl``, one JSON object per logged step.

The trainer (:mod:`jitrope.training`, rank 0) writes a record at every ``train.log_every`` steps and at
the last one; studies (:mod:`jitrope.eval.study`) read it instead of console lines or folder times.
A record holds:

- ``step``: the optimizer updates done; ``loss``: the mean training loss of the interval (over ranks);
- ``lr`` (of the interval's last update), ``grad_norm`` (of its last update, before clipping);
- ``images_per_s``: training images per second over the interval, ``interval_steps``;
- ``wall_s``, ``cpu_s``: training wall time and this process's CPU time since the run began,
  summed over every (re)start, so a resumed run continues them; ``time``: Unix time of the record;
- ``startup``: true for the first record after a (re)start, whose interval includes start-up.

Appends are one ``write`` of one whole line, flushed and fsync'd, so a crash leaves at most a torn
last line, which readers skip. A run that resumes from the checkpoint of step S first drops every
record after S (they belong to the steps that are trained again) and any torn line, rewriting the
file atomically, so the file always describes one consistent history. The interface is that of
torchtitan's ``components/metrics.py`` loggers: ``log(metrics, step)`` and ``close()``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .fileio import atomic_write_text

__all__ = ["METRICS_FILE", "MetricsLogger", "read_metrics", "truncate_metrics"]

METRICS_FILE = "metrics.jsonl"


def _metrics_path(path) -> Path:
    p = Path(path)
    return p / METRICS_FILE if p.is_dir() else p


def _parse(text: str) -> Tuple[List[Dict[str, Any]], bool]:
    """Records of a metrics file and whether any line was torn or not a record (then skipped)."""
    *whole, tail = text.split("\n")  # tail: "" after a final newline, else a torn last line
    records, bad = [], bool(tail.strip())
    for line in whole:
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            bad = True
            continue
        if not isinstance(r, dict) or not isinstance(r.get("step"), int):
            bad = True
            continue
        records.append(r)
    return records, bad


def read_metrics(path, *, max_step: Optional[int] = None) -> List[Dict[str, Any]]:
    """The records of a run folder's ``metrics.jsonl`` (or of that file), in step order, torn lines
    skipped; with ``max_step`` only those up to it. A missing file raises ``FileNotFoundError``."""
    p = _metrics_path(path)
    records, _ = _parse(p.read_text())
    if max_step is not None:
        records = [r for r in records if r["step"] <= max_step]
    return sorted(records, key=lambda r: r["step"])


def truncate_metrics(path, step: int) -> List[Dict[str, Any]]:
    """Keep the records of steps ``<= step`` (and whole lines only), rewriting the file atomically
    when anything is dropped; returns the kept records. No file: nothing to keep."""
    p = _metrics_path(path)
    if not p.exists():
        return []
    text = p.read_text()
    records, bad = _parse(text)
    kept = [r for r in records if r["step"] <= step]
    if bad or len(kept) != len(records):
        atomic_write_text(p, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _finite(v: Any) -> Any:
    # strict JSON has no nan / inf: such a value (a diverging grad norm) is written as null
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricsLogger:
    """Appends records to ``<run_dir>/metrics.jsonl``, after dropping those beyond ``resume_step``.

    ``offsets`` gives the ``wall_s`` and ``cpu_s`` of the last kept record, from which a resumed
    run continues its clocks.
    """

    def __init__(self, run_dir, *, resume_step: int = 0):
        self.path = Path(run_dir) / METRICS_FILE
        kept = truncate_metrics(self.path, resume_step)
        last = kept[-1] if kept else {}
        self.offsets = {k: float(last.get(k) or 0.0) for k in ("wall_s", "cpu_s")}
        self._fd: Optional[int] = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path}: the metrics logger is closed")
        line = json.dumps({"step": int(step), **{k: _finite(v) for k, v in metrics.items()}}) + "\n"
        os.write(self._fd, line.encode())  # one write of the whole line on an O_APPEND descriptor
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

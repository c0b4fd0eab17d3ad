"""Small file helpers shared by the trainer, the data cache and the CLIs."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path
from typing import Iterator

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "check_writable_dir",
    "exclusive_lock",
    "LockedError",
    "sha256_file",
    "fsync_dir",
]


class LockedError(RuntimeError):
    """Another process holds the lock of a folder; the message names its pid."""


def fsync_dir(path) -> None:
    """Make the entries of folder ``path`` (a rename into it) durable; best effort, as some file
    systems cannot open or fsync a folder."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it onto ``path`` (atomic
    on POSIX), on failure remove it. A reader sees the old file or the whole new one, never half of
    one, after a crash too: the data is on disk before the rename that replaces the old file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (hashlib.file_digest needs Python 3.11,
    setup.py admits 3.9)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable_dir(path, what: str) -> Path:
    """Create folder ``path`` (and parents) and prove a file can be written there, before long work
    starts; an ``OSError`` names ``what`` and the folder."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"{what} {path} is not writable ({e.strerror or e})") from None
    return path


LOCK_FILE = ".lock"


@contextlib.contextmanager
def exclusive_lock(folder, what: str) -> Iterator[Path]:
    """Hold an exclusive ``fcntl.flock`` on ``<folder>/.lock`` while the block runs; the file records
    the holder's pid. If another process holds it, raise a :class:`LockedError` naming ``what``,
    the folder and that pid. The kernel drops the lock when its holder exits or is killed, so a
    crashed run never leaves a stale lock behind (the file stays, harmless)."""
    import fcntl

    path = Path(folder) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LockedError(
                f"{what} {folder} is in use by another process (pid {holder}, holding {path}); wait for it to "
                f"end or choose another {what}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock

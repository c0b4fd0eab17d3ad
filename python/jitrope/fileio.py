"""Small file helpers shared by the trainer, the data cache and the CLIs."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import stat
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

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
_LOCK_TEXT = re.compile(rb"^\s*(\d*)\s*$")  # what a lock file holds: its holder's pid (or nothing yet)


def _open_lock(path: Path, folder, what: str) -> Tuple[int, bool]:
    """Open (or create) the lock file ``path`` without following a link: ``(fd, created)``. A file
    that is there already must be a lock file (a regular file, no other hard link, a pid or nothing
    in it), else a :class:`LockedError` says what it is; it is left as it was."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), True
    except FileExistsError:
        pass
    why = None
    try:  # O_NONBLOCK: a FIFO named .lock must not hang the open
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EISDIR):
            raise
        fd, why = -1, "it is a symbolic link" if e.errno == errno.ELOOP else "it is a folder"
    if fd >= 0:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            why = "it is not a regular file"
        elif st.st_nlink != 1:
            why = f"it has {st.st_nlink - 1} other hard link(s)"
        elif st.st_size > 64 or not _LOCK_TEXT.match(os.pread(fd, 64, 0)):
            why = "it holds something other than a pid"
        if why is not None:
            os.close(fd)
    if why is not None:
        raise LockedError(
            f"{path} is not a lock file ({why}); nothing was written to it: move it away to use {what} {folder}"
        )
    return fd, False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a holder removes it when it lets go)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    fs = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fs.st_dev, fs.st_ino)


def _stale_message(path: Path, pid: str) -> str:
    """The line that says a lock left by ``pid`` (a process that was killed) is taken over."""
    if not pid:
        return f"took over the stale lock {path} (it names no process)"
    state = "no longer running" if not _pid_alive(int(pid)) else "running, but no longer holding it"
    return f"took over the stale lock {path} of pid {pid} ({state})"


def _take_lock(path: Path, folder, what: str) -> Tuple[int, bool]:
    """The locked fd of ``path`` and whether this process created the file; a
    :class:`LockedError` naming the holder's pid when another process holds it."""
    for _ in range(20):  # the holder may remove the file between our open and our lock: open it again
        fd, created = _open_lock(path, folder, what)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(
                f"{what} {folder} is in use by another process (pid {holder}, holding {path}); wait for it to "
                f"end or choose another {what}"
            ) from None
        if _same_file(fd, path):
            return fd, created
        os.close(fd)
    raise LockedError(f"{path} keeps changing under this process; another process is taking {what} {folder}")


@contextlib.contextmanager
def exclusive_lock(folder, what: str, log: Optional[Callable[[str], None]] = None) -> Iterator[Path]:
    """Hold an exclusive ``fcntl.flock`` on ``<folder>/.lock`` while the block runs; the file records
    the holder's pid and is removed when the block ends. If another process holds it, raise a
    :class:`LockedError` naming ``what``, the folder and that pid. The kernel drops the lock when its
    holder exits or is killed: the file a killed holder leaves is a stale lock, taken over with a
    one-line message to ``log`` (default: a warning on stderr) naming the pid that left it.

    The file is opened without following a link, and a file that is not a lock file (a link, a
    folder, data of some other program) is never written: a :class:`LockedError` says what it is."""
    path = Path(folder) / LOCK_FILE
    fd, created = _take_lock(path, folder, what)
    try:
        if not created:
            (log or _warn)(_stale_message(path, _LOCK_TEXT.match(os.pread(fd, 64, 0)).group(1).decode()))
        os.ftruncate(fd, 0)  # a lock file: created here, or checked by _open_lock
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        if _same_file(fd, path):
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still locked: a process that opened it sees it gone and opens again
        os.close(fd)  # releases the lock


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)

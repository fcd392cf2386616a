"""Run-time directories and lock files xdpnet creates, and removes again;
whether the process that owns one still runs.

Pins under /sys/fs/bpf/xdpnet, lock and owner files under /run/xdpnet:
whoever removes the last entry removes the directory too, so nothing is
left once the last VM or test bed is gone.  Another process may be
creating an entry at that moment; :func:`make_dirs` retries when a parent
vanishes between its mkdirs, and callers that open a file in it retry the
same way (:func:`open_in`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator

from xdpnet.errors import BusyError

RUN_DIR = "/run/xdpnet"     # locks, test-bed owners, the VM registry
_RETRIES = 100


def make_dirs(path: str, mode: int = 0o755) -> None:
    """``os.makedirs(path, exist_ok=True)``, again if a directory was
    removed meanwhile (makedirs then fails with ENOENT, or with EEXIST when
    the directory vanished between its mkdir and its isdir check)."""
    for _ in range(_RETRIES - 1):
        try:
            os.makedirs(path, mode=mode, exist_ok=True)
            return
        except (FileNotFoundError, FileExistsError):
            continue
    os.makedirs(path, mode=mode, exist_ok=True)


def open_in(directory: str, name: str, flags: int, mode: int = 0o600) -> int:
    """``os.open(directory/name, flags | O_CREAT)``, making *directory*
    (again) if it was removed meanwhile."""
    path = os.path.join(directory, name)
    for _ in range(_RETRIES - 1):
        make_dirs(directory)
        try:
            return os.open(path, flags | os.O_CREAT, mode)
        except FileNotFoundError:
            continue
    make_dirs(directory)
    return os.open(path, flags | os.O_CREAT, mode)


def remove_empty(path: str, up_to: str) -> None:
    """Remove *path* and its parents up to and including *up_to*, each
    only while empty; stops quietly at the first one that is not."""
    up_to = os.path.normpath(up_to)
    d = os.path.normpath(path)
    while True:
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError:
            return
        if d == up_to or len(d) <= len(up_to):
            return
        d = os.path.dirname(d)


@contextlib.contextmanager
def flocked(directory: str, name: str, *, timeout: float | None = None,
            unused: Callable[[], bool] = lambda: False,
            up_to: str | None = None) -> Iterator[None]:
    """Hold ``flock(directory/name)``, exclusive (BusyError after *timeout*
    seconds; None waits forever).

    On release, if ``unused()`` says nothing needs the lock any more, the
    holder removes the file and the empty directories up to *up_to*
    (default: *directory*).  A process that was waiting on the removed
    file would then hold a lock nobody else can see: after locking, it
    checks that the path still names the file it locked, and starts over
    if not.
    """
    path = os.path.join(directory, name)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        fd = open_in(directory, name, os.O_RDWR | os.O_CLOEXEC)
        try:
            _acquire(fd, path, deadline, timeout)
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            if unused():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                remove_empty(directory, up_to or directory)
        finally:
            os.close(fd)            # releases the lock


def _acquire(fd: int, path: str, deadline: float | None, timeout: float | None) -> None:
    if deadline is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise BusyError(f"another xdpnet process holds {path} "
                                f"for more than {timeout:.0f} s") from None
            time.sleep(0.02)


def proc_start(pid: int) -> int | None:
    """Start time of process *pid* in clock ticks since boot (field 22 of
    ``/proc/PID/stat``); None if there is no such process or it has exited
    (a zombie its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    try:
        fields = stat.rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, start: int | None) -> bool:
    """True while process *pid* started at *start* (:func:`proc_start`)
    runs: a recycled pid has another start time, a zombie counts as gone.
    Owners are identified this way in the VM registry, the steering maps
    and the test-bed owner files."""
    return pid > 0 and start is not None and proc_start(pid) == start


def _same_file(fd: int, path: str) -> bool:
    """Does *path* still name the file open as *fd*?"""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


__all__ = ["RUN_DIR", "flocked", "make_dirs", "open_in", "proc_start", "process_alive",
           "remove_empty"]

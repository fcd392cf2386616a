"""Detect pages discarded from guest memory while it is registered as a UMEM.

A UMEM pins the pages that back guest memory at registration.  When QEMU
discards guest pages (balloon inflation, free-page reporting, virtio-mem
unplug, postcopy) it punches a hole in the memory file: the guest's next
access faults in a *new* page, while the kernel keeps writing received
frames into the old, pinned one.  The guest never sees those frames
(``../shared/FACTS.md``: "The UMEM pins the pages that were there").

The backend cannot see the guest's balloon, but it can see the file:
registration faults in every page of the registered ranges (pinning is a
write fault on a shared mapping), so right after registration a region
has no holes.  Any hole found later is a discard.  Two signals, both
cheap:

* ``lseek(fd, off, SEEK_HOLE)`` over each region's file range: exact, for
  memfd/tmpfs;
* ``fstat().st_blocks`` of the file dropping below its value at
  registration, for hugetlbfs (whose SEEK_HOLE reports no holes).  It is
  file-wide: a discard in a part of the file outside every region also
  triggers a (harmless, unneeded) re-registration.

:class:`DiscardWatcher` checks at a modest interval (and on demand, e.g.
when a queue stalls) and calls back once per discard event; the backend
then re-registers the UMEM so that no further frame is lost.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("xdpnet.memory")

DEFAULT_INTERVAL = 0.5          # seconds between checks


@dataclass(frozen=True)
class WatchedRange:
    """One registered region: a range of a file."""

    index: int                  # region number in the memory table
    fd: int                     # our dup of the region's fd
    offset: int                 # mmap_offset of the region in the file
    size: int
    by_blocks: bool = False     # hugetlbfs: watch st_blocks (SEEK_HOLE sees no holes)


@dataclass(frozen=True)
class Discard:
    """A hole found inside a registered region."""

    region: int
    file_offset: int            # first discarded byte, in the file
    how: str                    # "hole" or "blocks"

    def describe(self) -> str:
        if self.how == "hole":
            return f"region {self.region} lost its page at file offset 0x{self.file_offset:x}"
        return f"region {self.region}'s file has fewer allocated blocks than at registration"


def find_hole(r: WatchedRange) -> int | None:
    """File offset of the first hole inside ``r``, or None (no hole / unsupported)."""
    try:
        hole = os.lseek(r.fd, r.offset, os.SEEK_HOLE)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    return hole if hole < r.offset + r.size else None


def allocated_blocks(fd: int) -> int:
    """``st_blocks`` of the file behind ``fd`` (512-byte units)."""
    return os.fstat(fd).st_blocks


class DiscardWatcher:
    """Watch registered guest-memory ranges for discarded pages.

    ``on_discard`` is called from the watcher's thread with the first
    :class:`Discard` found; after it returns the baseline is taken again
    (the callback re-registers, which faults the pages back in), so each
    discard event is reported once.  :meth:`check` runs one check in the
    caller's thread.
    """

    def __init__(self, ranges: list[WatchedRange], on_discard: Callable[[Discard], None], *,
                 interval: float = DEFAULT_INTERVAL):
        self.ranges = ranges
        self.on_discard = on_discard
        self.interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._baseline = self._blocks()
        self._thread: threading.Thread | None = None

    def _blocks(self) -> dict[int, int]:
        """st_blocks per distinct file (keyed by one of its fds)."""
        seen: dict[tuple[int, int], int] = {}
        out: dict[int, int] = {}
        for r in self.ranges:
            if not r.by_blocks:
                continue
            st = os.fstat(r.fd)
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen[key] = r.fd
                out[r.fd] = st.st_blocks
        return out

    def rebaseline(self) -> None:
        """Take the current state as the reference (after re-registration)."""
        with self._lock:
            self._baseline = self._blocks()

    def scan(self) -> Discard | None:
        """The first discard visible now, or None."""
        for r in self.ranges:
            if r.by_blocks:
                continue
            hole = find_hole(r)
            if hole is not None:
                return Discard(r.index, hole, "hole")
        with self._lock:
            for fd, blocks in self._baseline.items():
                if allocated_blocks(fd) < blocks:
                    r = next(x for x in self.ranges if x.fd == fd)
                    return Discard(r.index, r.offset, "blocks")
        return None

    def check(self) -> Discard | None:
        """Scan once; on a discard, call back and re-baseline.  Returns it."""
        try:
            d = self.scan()
        except OSError as e:            # the file went away: nothing to re-register
            log.warning("guest memory watch failed: %s", e)
            return None
        if d is not None:
            self.on_discard(d)
            if not self._stop.is_set():     # a re-registration replaces this watcher
                self.rebaseline()
        return d

    def start(self) -> "DiscardWatcher":
        self._thread = threading.Thread(target=self._run, name="xdpnet-discard", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:           # noqa: BLE001 - never kill the watcher silently
                log.exception("guest memory discard check failed")

    def stop(self) -> None:
        """Stop the thread; safe to call from the callback's own thread."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(5)
        self._thread = None


__all__ = ["DEFAULT_INTERVAL", "Discard", "DiscardWatcher", "WatchedRange", "find_hole"]

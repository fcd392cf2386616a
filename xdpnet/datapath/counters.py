"""Counter blocks: ``struct xn_counters`` in memory readers never lock.

The datapath thread is the only writer of a block; readers (stats, the
dashboard, the metrics endpoint) take snapshots at any time.  A block
lives in an ``mmap``: anonymous by default, or a file (e.g. under
``/run/xdpnet``) so that another process can map and read it.

The names are the fields of ``struct xn_counters`` (``c/xdpnet.h``, where
each is described), in order.  A pair with a port socket besides its
direct one counts both in the totals (``rx_frames``, ``tx_frames``, the
kernel's statistics and the ring gauges are sums over its sockets); the
port's share is in ``rx_port_frames``, ``tx_port_frames`` and
``port_fill_ring_used``.  ``tx_spoofed`` counts tx frames dropped because
their source MAC was not the VM's.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from xdpnet._native import ffi, lib

COUNTER_SIZE = ffi.sizeof("struct xn_counters")
FIELDS = [name for name, _ in ffi.typeof("struct xn_counters").fields if name != "reserved"]

BROKEN_REASONS = {
    lib.XN_BROKEN_NONE: "ok",
    lib.XN_BROKEN_DESC_ADDR: "descriptor outside guest memory",
    lib.XN_BROKEN_DESC_CHAIN: "descriptor chain loops or is longer than the queue",
    lib.XN_BROKEN_DESC_INDIRECT: "bad indirect descriptor (nested, with NEXT, or bad table)",
    lib.XN_BROKEN_DESC_DIRECTION: ("descriptor of the wrong direction (write-only on tx or "
                                   "read-only on rx)"),
    lib.XN_BROKEN_AVAIL_IDX: "avail index more than the queue size ahead",
    lib.XN_BROKEN_DESC_HEAD: "descriptor head index beyond the queue",
    lib.XN_BROKEN_DESC_LEN: "zero-length descriptor",
    lib.XN_BROKEN_MEMORY: "guest memory vanished (the frontend truncated its file: SIGBUS caught)",
}


@dataclass
class CounterBlock:
    """One queue pair's counters, mapped from anonymous memory or a file."""

    mem: mmap.mmap
    ptr: object                 # cffi struct xn_counters *
    path: str | None = None

    @classmethod
    def create(cls, path: str | None = None) -> "CounterBlock":
        """A zeroed block; with ``path`` it is a file others can map."""
        if path is None:
            m = mmap.mmap(-1, COUNTER_SIZE)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, COUNTER_SIZE)
                m = mmap.mmap(fd, COUNTER_SIZE)
            finally:
                os.close(fd)
        return cls(m, ffi.cast("struct xn_counters *", ffi.from_buffer(m)), path)

    @classmethod
    def open(cls, path: str) -> "CounterBlock":
        """Map another process's block read-only."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            m = mmap.mmap(fd, COUNTER_SIZE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        buf = ffi.from_buffer("char[]", m, require_writable=False)
        return cls(m, ffi.cast("struct xn_counters *", buf), path)

    def snapshot(self) -> dict[str, int]:
        """Every counter, read once each."""
        p = self.ptr
        return {name: int(getattr(p, name)) for name in FIELDS}

    def close(self) -> None:
        try:
            self.mem.close()
        except BufferError:
            pass            # a cffi view is still alive: the GC frees it

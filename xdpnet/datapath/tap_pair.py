"""One virtqueue pair served with a tap device (wraps ``c/tap.c``).

The tap baseline of the benchmarks: the same virtqueue code as
:class:`~xdpnet.datapath.queue_pair.QueuePair`, with one ``readv()`` /
``writev()`` system call per frame on a tap fd instead of AF_XDP rings.
The thread calls ``xn_tap_run()`` through cffi with the GIL released for
the whole run.  The lifecycle mirrors ``QueuePair``: create, start, stop,
quiesce (the rings' last_avail_idx for GET_VRING_BASE), destroy.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

from xdpnet._native import ffi, lib
from xdpnet.datapath.counters import CounterBlock
from xdpnet.datapath.queue_pair import RingConfig
from xdpnet.errors import XdpnetError
from xdpnet.memory.umem import GuestMemory

log = logging.getLogger("xdpnet.datapath")
_libc = ctypes.CDLL(None, use_errno=True)


def _ring(c, r: RingConfig) -> None:
    """Fill a ``struct xn_vring_config`` from a RingConfig."""
    c.num = r.num
    c.enabled = int(r.enabled)
    c.desc_off = r.desc_off
    c.avail_off = r.avail_off
    c.used_off = r.used_off
    c.last_avail_idx = r.last_avail
    c.kick_fd = r.kick_fd
    c.call_fd = r.call_fd


class TapQueuePair:
    """The running datapath of virtqueues (0, 1) on a tap fd.

    ``tap_fd`` (IFF_TAP | IFF_NO_PI, no IFF_VNET_HDR) stays the caller's;
    it is made non-blocking.  Counters go to ``counters`` (the same block
    layout as an AF_XDP pair: every frame counts as copied, ``tx_syscalls``
    counts writev() calls).
    """

    def __init__(self, index: int, memory: GuestMemory, tap_fd: int, rx: RingConfig,
                 tx: RingConfig, features: int, counters: CounterBlock, *, batch: int = 64,
                 poll_timeout_ms: int = 0):
        cfg = ffi.new("struct xn_tap_config *")
        cfg.mem = memory.memmap
        _ring(cfg.rx, rx)
        _ring(cfg.tx, tx)
        cfg.features = features
        cfg.counters = counters.ptr
        cfg.tap_fd = tap_fd
        cfg.batch = batch
        cfg.poll_timeout_ms = poll_timeout_ms
        out = ffi.new("struct xn_tap **")
        err = lib.xn_tap_create(out, cfg)
        if err:
            raise XdpnetError(f"tap queue pair {index}: set-up failed: {os.strerror(-err)}")
        self.index = index
        self.ptr = out[0]
        self.counters = counters
        self._cfg = cfg             # keeps the memmap pointer's owner alive
        self._memory = memory
        self._thread: threading.Thread | None = None
        self.error: int = 0

    @property
    def name(self) -> str:
        return f"xdpnet-tap{self.index}"

    def start(self) -> None:
        """Run the datapath on its own thread (``xdpnet-tap<index>``)."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    @property
    def native_id(self) -> int | None:
        """Kernel thread id of the datapath thread (for affinity, /proc stats)."""
        return self._thread.native_id if self._thread is not None else None

    def _run(self) -> None:
        _libc.prctl(15, self.name.encode()[:15], 0, 0, 0)     # PR_SET_NAME
        err = lib.xn_tap_run(self.ptr)      # GIL released for the whole run
        if err:
            self.error = -err
            log.error("tap queue pair %d: datapath stopped: %s", self.index, os.strerror(-err))

    def set_enabled(self, ring: int, enabled: bool) -> None:
        lib.xn_tap_set_enabled(self.ptr, ring, int(enabled))

    def set_call_fd(self, ring: int, fd: int) -> None:
        lib.xn_tap_set_call_fd(self.ptr, ring, fd)

    def set_local_macs(self, macs: list[int]) -> None:
        """Nothing to do: a tap has no port socket (the bridge switches)."""

    def stop(self, drain_ms: int = 0) -> int:
        """Stop the loop; returns 0 (nothing is ever left in flight)."""
        lib.xn_tap_stop(self.ptr)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return 0

    def quiesce(self) -> tuple[int, int]:
        """Returns (rx last_avail_idx, tx last_avail_idx) for GET_VRING_BASE."""
        rx = ffi.new("uint16_t *")
        tx = ffi.new("uint16_t *")
        lib.xn_tap_quiesce(self.ptr, rx, tx)
        return rx[0], tx[0]

    def rx_trace(self) -> list[tuple[int, int]]:
        """No placement trace: every frame is copied by read()."""
        return []

    def destroy(self) -> None:
        if self.ptr is not None:
            lib.xn_tap_destroy(self.ptr)
            self.ptr = None


__all__ = ["TapQueuePair"]

"""One virtqueue pair served with a tap device (wraps ``c/tap.c``).

The tap baseline of the benchmarks: the same virtqueue code as
:class:`~xdpnet.datapath.queue_pair.QueuePair`, with one ``readv()`` /
``writev()`` system call per frame on a tap fd instead of AF_XDP rings.
The thread calls ``xn_tap_run()`` through cffi with the GIL released for
the whole run.  The lifecycle mirrors ``QueuePair``: create, start, stop,
quiesce (the rings' last_avail_idx for GET_VRING_BASE), destroy.
"""

from __future__ import annotations

from xdpnet._native import ffi, lib
from xdpnet.datapath.counters import CounterBlock
from xdpnet.datapath.queue_pair import DatapathPair, PairApi, RingConfig, fill_ring
from xdpnet.memory.umem import GuestMemory


_TAP_API = PairApi(lib.xn_tap_run, lib.xn_tap_stop, lib.xn_tap_set_enabled,
                   lib.xn_tap_set_call_fd, lib.xn_tap_quiesce, lib.xn_tap_destroy)


class TapQueuePair(DatapathPair):
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
        fill_ring(cfg.rx, rx)
        fill_ring(cfg.tx, tx)
        cfg.features = features
        cfg.counters = counters.ptr
        cfg.tap_fd = tap_fd
        cfg.batch = batch
        cfg.poll_timeout_ms = poll_timeout_ms
        out = ffi.new("struct xn_tap **")
        self._adopt(_TAP_API, "tap queue pair", index, lib.xn_tap_create(out, cfg), out, cfg,
                    memory, counters)

    @property
    def name(self) -> str:
        return f"xdpnet-tap{self.index}"

    def set_local_macs(self, macs: list[int]) -> None:
        """Nothing to do: a tap has no port socket (the bridge switches)."""

    def stop(self, drain_ms: int = 0) -> int:
        """Stop the loop; returns 0 (nothing is ever left in flight)."""
        self._stop_thread()
        return 0

    def rx_trace(self) -> list[tuple[int, int]]:
        """No placement trace: every frame is copied by read()."""
        return []


__all__ = ["TapQueuePair"]

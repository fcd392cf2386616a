"""One virtqueue pair's datapath thread (wraps ``c/qp.c``).

The thread calls ``xn_qp_run()`` through cffi, which releases the GIL for
the whole run: all per-frame work happens in C.  Stopping follows the
order that keeps guest memory safe: stop the loop, drain what the kernel
already delivered, *then* (caller) unbind the sockets so nothing more can
be written into guest buffers, and only then hand the held descriptors
back (``quiesce``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable

from xdpnet._native import ffi, lib
from xdpnet.datapath.counters import CounterBlock
from xdpnet.datapath.xsk import XskSocket
from xdpnet.errors import XdpnetError
from xdpnet.memory.umem import GuestMemory

log = logging.getLogger("xdpnet.datapath")
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class RingConfig:
    """One virtqueue, translated into UMEM offsets."""

    num: int
    desc_off: int
    avail_off: int
    used_off: int
    last_avail: int
    kick_fd: int
    call_fd: int
    enabled: bool


def fill_ring(c, r: RingConfig) -> None:
    """Fill a ``struct xn_vring_config`` from a RingConfig."""
    c.num = r.num
    c.enabled = int(r.enabled)
    c.desc_off = r.desc_off
    c.avail_off = r.avail_off
    c.used_off = r.used_off
    c.last_avail_idx = r.last_avail
    c.kick_fd = r.kick_fd
    c.call_fd = r.call_fd


@dataclass(frozen=True)
class PairApi:
    """The C calls of one kind of queue pair (c/qp.c or c/tap.c)."""

    run: Callable
    stop: Callable
    set_enabled: Callable
    set_call_fd: Callable
    quiesce: Callable
    destroy: Callable


class DatapathPair:
    """What every queue pair kind shares: the C object ``ptr``, the thread
    its loop runs on (GIL released for the whole run), and the control
    calls the vhost-user side makes.  Subclasses create ``ptr`` and set
    ``api``, ``index`` and ``name``."""

    api: PairApi
    index: int
    name: str
    ptr = None
    _thread: threading.Thread | None = None
    error: int = 0

    def _adopt(self, api: PairApi, what: str, index: int, err: int, out, cfg,
               memory: GuestMemory, counters: CounterBlock) -> None:
        """Take the pair the C create call made (*err*: its return, *out*:
        its out pointer); *cfg* (it owns the memmap pointer) and *memory*
        stay referenced as long as the pair."""
        if err:
            raise XdpnetError(f"{what} {index}: datapath set-up failed: {os.strerror(-err)}")
        self.api, self.index, self.ptr = api, index, out[0]
        self.counters = counters
        self._cfg = cfg
        self._memory = memory

    def start(self) -> None:
        """Run the datapath on its own thread (named ``self.name``)."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    @property
    def native_id(self) -> int | None:
        """Kernel thread id of the datapath thread (for affinity, /proc stats)."""
        return self._thread.native_id if self._thread is not None else None

    def _run(self) -> None:
        # Name the OS thread too, so top/ps/perf show which pair it is.
        _libc.prctl(15, self.name.encode()[:15], 0, 0, 0)     # PR_SET_NAME
        err = self.api.run(self.ptr)
        if err:
            self.error = -err
            log.error("%s: datapath stopped: %s", self.name, os.strerror(-err))

    def _stop_thread(self) -> None:
        """Make the loop return and wait for its thread."""
        self.api.stop(self.ptr)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def set_enabled(self, ring: int, enabled: bool) -> None:
        self.api.set_enabled(self.ptr, ring, int(enabled))

    def set_call_fd(self, ring: int, fd: int) -> None:
        self.api.set_call_fd(self.ptr, ring, fd)

    def quiesce(self) -> tuple[int, int]:
        """After the loop stopped (and, for AF_XDP, the sockets are gone):
        settle held descriptors.  Returns (rx, tx) last_avail_idx for
        GET_VRING_BASE."""
        rx = ffi.new("uint16_t *")
        tx = ffi.new("uint16_t *")
        self.api.quiesce(self.ptr, rx, tx)
        return rx[0], tx[0]

    def destroy(self) -> None:
        if self.ptr is not None:
            self.api.destroy(self.ptr)
            self.ptr = None


_QP_API = PairApi(lib.xn_qp_run, lib.xn_qp_stop, lib.xn_qp_set_enabled, lib.xn_qp_set_call_fd,
                  lib.xn_qp_quiesce, lib.xn_qp_destroy)


class QueuePair(DatapathPair):
    """The running datapath of virtqueues (2i, 2i+1) on one or two XSK sockets.

    ``xsk`` is the direct socket (a NIC queue), ``port`` the socket on the
    VM's port device; either may be None, not both.  ``vm_mac`` (u64, see
    :func:`xdpnet.net.mac.mac_to_u64`; 0 = no check) is the only source MAC the guest may
    send from.  ``port_fill_target`` rx buffers (0: min(256, ring / 4)) are
    kept on the port socket's fill ring when there is a direct socket too.
    """

    def __init__(self, index: int, memory: GuestMemory, xsk: XskSocket | None, rx: RingConfig,
                 tx: RingConfig, features: int, counters: CounterBlock, *,
                 bounce_first: int, bounce_count: int, batch: int = 64,
                 busy_poll_us: int = 0, napi_budget: int = 0, port: XskSocket | None = None,
                 vm_mac: int = 0,
                 port_fill_target: int = 0):
        if xsk is None and port is None:
            raise XdpnetError(f"queue pair {index}: needs a direct or a port socket")
        cfg = ffi.new("struct xn_qp_config *")
        cfg.mem = memory.memmap
        cfg.xsk = xsk.ptr if xsk is not None else ffi.NULL
        cfg.port_xsk = port.ptr if port is not None else ffi.NULL
        cfg.vm_mac = vm_mac
        cfg.port_fill_target = port_fill_target
        fill_ring(cfg.rx, rx)
        fill_ring(cfg.tx, tx)
        cfg.features = features
        cfg.bounce_first = bounce_first
        cfg.bounce_count = bounce_count
        cfg.batch = batch
        cfg.busy_poll_us = busy_poll_us
        if napi_budget:
            cfg.napi_budget = napi_budget
        out = ffi.new("struct xn_qp **")
        self._adopt(_QP_API, "queue pair", index, lib.xn_qp_create(out, cfg, counters.ptr), out,
                    cfg, memory, counters)

    @property
    def name(self) -> str:
        return f"xdpnet-qp{self.index}"

    def set_local_macs(self, macs: list[int]) -> None:
        """Frames to these MACs (u64, :func:`xdpnet.net.mac.mac_to_u64`: the other VMs on
        the NIC) leave on the port socket; safe while running."""
        arr = ffi.new("uint64_t[]", list(macs) or [0])
        err = lib.xn_qp_set_local_macs(self.ptr, arr, len(macs))
        if err:
            raise XdpnetError(f"queue pair {self.index}: {len(macs)} local MACs "
                              f"(at most {lib.XN_MAX_LOCAL_MACS})")

    def stop(self, drain_ms: int = 200) -> int:
        """Stop the loop and drain; returns tx frames left uncompleted."""
        self._stop_thread()
        return lib.xn_qp_drain(self.ptr, drain_ms)

    def rx_trace(self) -> list[tuple[int, int]]:
        """(frame offset, posted buffer offset) of the last rx frames."""
        out = ffi.new("uint64_t[]", 128)
        n = lib.xn_qp_rx_trace(self.ptr, out, 64)
        return [(out[2 * i], out[2 * i + 1]) for i in range(n)]

"""The peer on the wire side: test-frame generator, receiver, reflector, and the AF_XDP ceilings.

:class:`WirePeer` is an AF_PACKET socket on one interface - normally the
wire end of a :class:`~xdpnet.net.netns.Testbed`, inside its namespace -
driving the C functions of ``c/wire.h``.  Every call releases the GIL
(cffi does so for each C call), so long ones can run on threads
(:func:`in_thread`) while another thread sends or receives; any running
call ends early after :meth:`WirePeer.stop`.

:class:`RxDrop` and :class:`TxPush` are the throughput ceilings: AF_XDP
sockets with their own UMEM on a NIC queue that receive-and-drop or
transmit pre-built test frames.  An :class:`RxDrop` only sees frames once
its :attr:`~RxDrop.fd` is in the XSKMAP of the XDP program on the device.

Example (a test bed, the peer in its namespace, a second peer on the NIC)::

    with Testbed() as tb, WirePeer(tb) as wire, WirePeer(None, tb.nic) as nic:
        wire.send(1000, length=1500)
        st = nic.recv(max_frames=1000, timeout=1.0)
        assert st.verified == 1000
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from xdpnet._native import ffi, lib
from xdpnet.errors import BusyError, PrivilegeError, UsageError, XdpnetError
from xdpnet.net.device import NetDevice
from xdpnet.net.mac import format_mac, parse_mac
from xdpnet.net.netns import Testbed, call_in_netns, socket_in_netns

ETH_P_ALL = 0x0003


def _raise_for(rc: int, what: str) -> None:
    """Turn a -errno from C into the matching :class:`XdpnetError`."""
    if rc >= 0:
        return
    err = -rc
    msg = f"{what}: {os.strerror(err)}"
    if err in (errno.EPERM, errno.EACCES):
        raise PrivilegeError(msg)
    if err == errno.EBUSY:
        raise BusyError(msg)
    if err in (errno.ENODEV, errno.ENXIO, errno.EINVAL, errno.EMSGSIZE):
        raise UsageError(msg)
    raise XdpnetError(msg)


def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
    """Run ``fn(*args, **kwargs)`` on a new daemon thread; return a Future of its result."""
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def body() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - delivered through the future
            fut.set_exception(e)

    threading.Thread(target=body, name=getattr(fn, "__name__", "wire"), daemon=True).start()
    return fut


class pinned:
    """Context manager: pin the calling thread to *cpu* (None: leave as is), restore after.

    On veth the peer's rx queue is the sending CPU's number (modulo the
    queue count), so pinning a sender picks the NIC queue its frames hit.
    """

    def __init__(self, cpu: int | None):
        self.cpu = cpu
        self.saved: set[int] | None = None

    def __enter__(self) -> None:
        if self.cpu is not None:
            self.saved = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {self.cpu})

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            os.sched_setaffinity(0, self.saved)


class _Calls:
    """The C calls running on one handle, so that stop() reaches them and close() waits.

    A handle (socket, UMEM) must not be freed while a thread is still
    inside a C call that uses it: :meth:`close` marks the handle closed,
    asks every stoppable call to stop and waits until all have returned.
    """

    def __init__(self, what: str):
        self.what = what
        self._cv = threading.Condition()
        self._stats: set[Any] = set()
        self._active = 0
        self.closed = False

    @contextlib.contextmanager
    def call(self, stats: Any = None, exclusive: bool = False):
        """Bracket one C call; *stats* (with a ``stop`` field) makes it stoppable."""
        with self._cv:
            if self.closed:
                raise XdpnetError(f"{self.what} is closed")
            if exclusive and self._active:
                raise BusyError(f"{self.what} is already running")
            self._active += 1
            if stats is not None:
                self._stats.add(stats)
        try:
            yield
        finally:
            with self._cv:
                self._active -= 1
                self._stats.discard(stats)
                self._cv.notify_all()

    def stop(self) -> None:
        """Set ``stop`` in the stats of every running call (they return within ~20 ms)."""
        with self._cv:
            for st in self._stats:
                st.stop = 1

    def close(self) -> bool:
        """Refuse new calls, stop running ones, wait for them.  Return: False if already closed."""
        with self._cv:
            if self.closed:
                return False
            self.closed = True
            for st in self._stats:
                st.stop = 1
            self._cv.wait_for(lambda: self._active == 0)
        return True


# ---- statistics ----------------------------------------------------------

@dataclass(frozen=True)
class FlowStats:
    """What a receiver saw of one flow."""

    flow: int
    unique: int             # distinct seqs verified
    lowest_seq: int
    highest_seq: int
    duplicates: int
    out_of_order: int

    @property
    def missing(self) -> int:
        """Seqs between the lowest and the highest that never arrived."""
        return max(0, self.highest_seq - self.lowest_seq + 1 - self.unique)


@dataclass(frozen=True)
class WireStats:
    """Counters of one :class:`WirePeer` call (``struct xn_wire_stats``)."""

    tx_frames: int
    tx_bytes: int
    tx_retries: int
    tx_errors: int
    rx_frames: int
    rx_bytes: int
    verified: int
    bad: int
    foreign: int
    duplicates: int
    out_of_order: int
    untracked: int
    syscalls: int
    elapsed: float          # seconds
    flows: tuple[FlowStats, ...] = field(default_factory=tuple)

    @classmethod
    def from_c(cls, st: Any) -> "WireStats":
        flows = tuple(
            FlowStats(flow=f.flow, unique=f.unique, lowest_seq=f.lowest_seq,
                      highest_seq=f.highest_seq, duplicates=f.duplicates,
                      out_of_order=f.out_of_order)
            for f in (st.flows[i] for i in range(min(st.nflows, lib.XN_WIRE_MAX_FLOWS))))
        return cls(tx_frames=st.tx_frames, tx_bytes=st.tx_bytes, tx_retries=st.tx_retries,
                   tx_errors=st.tx_errors, rx_frames=st.rx_frames, rx_bytes=st.rx_bytes,
                   verified=st.verified, bad=st.bad, foreign=st.foreign,
                   duplicates=st.duplicates, out_of_order=st.out_of_order,
                   untracked=st.untracked, syscalls=st.syscalls,
                   elapsed=st.elapsed_ns / 1e9, flows=flows)

    def flow(self, flow_id: int) -> FlowStats | None:
        """The tracking state of *flow_id*, None if it was not seen (or not tracked)."""
        return next((f for f in self.flows if f.flow == flow_id), None)

    @property
    def tx_mpps(self) -> float:
        return self.tx_frames / self.elapsed / 1e6 if self.elapsed else 0.0

    @property
    def tx_gbps(self) -> float:
        return self.tx_bytes * 8 / self.elapsed / 1e9 if self.elapsed else 0.0

    @property
    def rx_mpps(self) -> float:
        return self.rx_frames / self.elapsed / 1e6 if self.elapsed else 0.0


@dataclass(frozen=True)
class PingStats:
    """Round trips of :meth:`WirePeer.pingpong` (``rtts`` in seconds, None = lost)."""

    length: int
    rtts: tuple[float | None, ...]

    @property
    def sent(self) -> int:
        return len(self.rtts)

    @property
    def received(self) -> int:
        return sum(1 for r in self.rtts if r is not None)

    @property
    def lost(self) -> int:
        return self.sent - self.received

    def percentile(self, p: float) -> float | None:
        """The *p*-th percentile (0-100, nearest rank) of the answered round trips."""
        ok = sorted(r for r in self.rtts if r is not None)
        if not ok:
            return None
        rank = max(1, -(-len(ok) * p // 100))
        return ok[min(len(ok), int(rank)) - 1]

    @property
    def p50(self) -> float | None:
        return self.percentile(50)

    @property
    def p99(self) -> float | None:
        return self.percentile(99)


@dataclass(frozen=True)
class CeilingStats:
    """Counters of an :class:`RxDrop` or :class:`TxPush` run (``struct xn_rxdrop_stats``)."""

    frames: int
    bytes: int
    batches: int
    polls: int
    kicks: int
    elapsed: float
    kernel_rx_dropped: int
    kernel_rx_invalid: int
    kernel_rx_ring_full: int
    kernel_fill_empty: int
    kernel_tx_invalid: int
    kernel_tx_ring_empty: int
    zerocopy: bool

    @classmethod
    def from_c(cls, st: Any) -> "CeilingStats":
        return cls(frames=st.frames, bytes=st.bytes, batches=st.batches, polls=st.polls,
                   kicks=st.kicks, elapsed=st.elapsed_ns / 1e9,
                   kernel_rx_dropped=st.kernel_rx_dropped,
                   kernel_rx_invalid=st.kernel_rx_invalid,
                   kernel_rx_ring_full=st.kernel_rx_ring_full,
                   kernel_fill_empty=st.kernel_fill_empty,
                   kernel_tx_invalid=st.kernel_tx_invalid,
                   kernel_tx_ring_empty=st.kernel_tx_ring_empty,
                   zerocopy=bool(st.zerocopy))

    @property
    def mpps(self) -> float:
        return self.frames / self.elapsed / 1e6 if self.elapsed else 0.0

    @property
    def gbps(self) -> float:
        return self.bytes * 8 / self.elapsed / 1e9 if self.elapsed else 0.0


# ---- the AF_PACKET peer --------------------------------------------------

class WirePeer:
    """An AF_PACKET traffic peer on interface *ifname* of a namespace.

    *where* is a :class:`Testbed` (its namespace and, by default, its wire
    end; ``WirePeer(tb, tb.nic)`` is a peer on the NIC end in the root
    namespace), a netns name, or None for the caller's namespace.
    *peer_mac* is the default destination of sent frames (default: the
    other end of the test bed, else broadcast).
    """

    def __init__(self, where: Testbed | str | None, ifname: str | None = None,
                 peer_mac: str | None = None):
        if isinstance(where, Testbed) and ifname == where.nic:
            netns = None                        # the NIC end lives in the root namespace
            peer_mac = peer_mac or where.wire_mac
        elif isinstance(where, Testbed):
            netns = where.netns
            ifname = ifname or where.wire
            if peer_mac is None and ifname == where.wire:
                peer_mac = where.nic_mac
        else:
            netns = where
        if not ifname:
            raise UsageError("WirePeer needs an interface name")
        self.netns = netns
        self.ifname = ifname
        self._calls = _Calls(f"wire peer on {ifname}")
        try:
            self.ifindex = call_in_netns(netns, socket.if_nametoindex, ifname)
        except OSError:
            where_s = f" in network namespace '{netns}'" if netns else ""
            raise UsageError(f"interface '{ifname}' not found{where_s}") from None
        # protocol 0: nothing is queued until xn_wire_setup() binds for ETH_P_ALL
        self.sock = socket_in_netns(netns, socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            _raise_for(lib.xn_wire_setup(self.sock.fileno(), self.ifindex),
                       f"AF_PACKET socket on {ifname}")
            self.mac = format_mac(self.sock.getsockname()[4][:6])
        except BaseException:
            self.sock.close()
            raise
        self.peer_mac = peer_mac or "ff:ff:ff:ff:ff:ff"
        self._src = parse_mac(self.mac)

    # -- helpers

    def _dst(self, dst: str | None) -> bytes:
        return parse_mac(dst or self.peer_mac)

    def _call(self, fn: Callable[..., int], what: str, *args: Any) -> WireStats:
        st = ffi.new("struct xn_wire_stats *")
        with self._calls.call(st):
            rc = fn(self.sock.fileno(), *args, st)
        _raise_for(rc, f"{what} on {self.ifname}")
        return WireStats.from_c(st)

    def stop(self) -> None:
        """Make running recv, echo and flood calls on this peer return soon.

        (send and pingpong are bounded by their counts and timeouts.)
        """
        self._calls.stop()

    # -- traffic

    def send(self, count: int, length: int = 64, *, flow: int = 0, seq0: int = 0,
             dst: str | None = None) -> WireStats:
        """Send *count* test frames of *length* bytes, seqs ``seq0..``, of flow *flow*.

        Frames the device refuses for lack of room are retried, so all
        *count* frames were handed to the peer when this returns.
        """
        return self._call(lib.xn_wire_send, "send", self._dst(dst), self._src, flow,
                          seq0, count, length)

    def recv(self, max_frames: int = 0, timeout: float = 1.0) -> WireStats:
        """Receive and verify test frames.

        Returns after *max_frames* test frames (0: no limit; never reads
        past it), after *timeout* seconds without a test frame (None:
        never), or on :meth:`stop`.
        """
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        return self._call(lib.xn_wire_recv, "recv", ms, max_frames)

    def echo(self, duration: float = 0.0) -> WireStats:
        """Reflect every test frame (MACs swapped) for *duration* s (0: until :meth:`stop`)."""
        return self._call(lib.xn_wire_echo, "echo", int(duration * 1000))

    def flood(self, duration: float, length: int = 64, *, flow: int = 0,
              dst: str | None = None, cpu: int | None = None) -> WireStats:
        """Send test frames as fast as possible for *duration* s (0: until :meth:`stop`).

        Seqs cycle through ``0..XN_WIRE_FLOOD_RING-1``.  *cpu* pins the
        calling thread for the run.
        """
        with pinned(cpu):
            return self._call(lib.xn_wire_flood, "flood", self._dst(dst), self._src, flow,
                              length, int(duration * 1000))

    def pingpong(self, count: int, length: int = 64, *, timeout: float = 1.0,
                 dst: str | None = None) -> PingStats:
        """Send *count* frames one at a time to a reflecting peer; time each round trip."""
        rtt = ffi.new("uint64_t[]", max(1, count))
        with self._calls.call():
            rc = lib.xn_wire_pingpong(self.sock.fileno(), self._dst(dst), self._src, length,
                                      count, int(timeout * 1000), rtt)
        _raise_for(rc, f"pingpong on {self.ifname}")
        return PingStats(length=length,
                         rtts=tuple(rtt[i] / 1e9 if rtt[i] else None for i in range(count)))

    # -- life cycle

    def close(self) -> None:
        """Stop running calls, wait for them to return, close the socket (idempotent)."""
        if self._calls.close():
            self.sock.close()

    def __enter__(self) -> "WirePeer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WirePeer(netns={self.netns!r}, ifname={self.ifname!r}, mac={self.mac!r})"


# ---- AF_XDP ceilings -----------------------------------------------------

class _Ceiling:
    """Shared life cycle of the AF_XDP ceiling sockets."""

    _destroy: Callable[[Any], None]
    _run: Callable[..., int]

    def __init__(self, handle: Any, ifname: str, queue: int):
        self._h = handle
        self.ifname = ifname
        self.queue = queue
        self._calls = _Calls(f"{type(self).__name__} on {ifname} queue {queue}")

    def run(self, duration: float, cpu: int | None = None) -> CeilingStats:
        """Run for *duration* s (0: until :meth:`stop`); *cpu* pins the calling thread.

        One run at a time (:class:`BusyError` otherwise).
        """
        st = ffi.new("struct xn_rxdrop_stats *")
        with self._calls.call(st, exclusive=True), pinned(cpu):
            rc = type(self)._run(self._h, int(duration * 1000), st)
        _raise_for(rc, self._calls.what)
        return CeilingStats.from_c(st)

    def stop(self) -> None:
        """Make a running :meth:`run` return soon."""
        self._calls.stop()

    def close(self) -> None:
        """Stop and wait for a run, unbind the socket, free the UMEM (idempotent).

        The kernel frees the queue 10-30 ms later; a new socket on it
        retries meanwhile.
        """
        if self._calls.close():
            type(self)._destroy(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RxDrop(_Ceiling):
    """AF_XDP receive-and-drop on (*ifname*, *queue*): the rx throughput ceiling.

    The socket has its own UMEM (4096 aligned 2048-byte chunks) and binds
    zero-copy where the driver can, else copy mode.  Insert :attr:`fd`
    into the XSKMAP of the device's XDP program to give it frames.
    """

    _destroy = staticmethod(lambda h: lib.xn_rxdrop_destroy(h))
    _run = staticmethod(lambda h, ms, st: lib.xn_rxdrop_run(h, ms, st))

    def __init__(self, ifname: str, queue: int = 0):
        NetDevice.lookup(ifname).validate_queue(queue)
        out = ffi.new("struct xn_rxdrop **")
        _raise_for(lib.xn_rxdrop_create(out, ifname.encode(), queue),
                   f"AF_XDP rx-drop socket on {ifname} queue {queue}")
        super().__init__(out[0], ifname, queue)
        self.fd = lib.xn_rxdrop_fd(self._h)
        self.zerocopy = bool(lib.xn_rxdrop_is_zerocopy(self._h))


class TxPush(_Ceiling):
    """AF_XDP transmitter of pre-built test frames on (*ifname*, *queue*): the tx ceiling.

    Frames are *length* bytes (<= 2048) of flow *flow* with seqs cycling
    through 0..4095, sent from *src* (default: the device's MAC) to *dst*.
    """

    _destroy = staticmethod(lambda h: lib.xn_txpush_destroy(h))
    _run = staticmethod(lambda h, ms, st: lib.xn_txpush_run(h, ms, st))

    def __init__(self, ifname: str, queue: int = 0, *, dst: str, src: str | None = None,
                 flow: int = 0, length: int = 64):
        dev = NetDevice.lookup(ifname)
        dev.validate_queue(queue)
        if src is None:
            src = dev.mac
        out = ffi.new("struct xn_txpush **")
        _raise_for(lib.xn_txpush_create(out, ifname.encode(), queue, parse_mac(dst),
                                        parse_mac(src), flow, length),
                   f"AF_XDP tx-push socket on {ifname} queue {queue}")
        super().__init__(out[0], ifname, queue)
        self.fd = lib.xn_txpush_fd(self._h)
        self.zerocopy = bool(lib.xn_txpush_is_zerocopy(self._h))

"""The virtio-net device: a :class:`~xdpnet.vhost.device.VhostUserDevice`
served by AF_XDP sockets over guest memory.

Glue only: guest memory comes from :mod:`xdpnet.memory`, sockets and the
per-pair datapath threads from :mod:`xdpnet.datapath`, the XSKMAP entries
from the VM's steering object (:class:`xdpnet.steering.nic.VmSteering`).
The protocol side (:mod:`xdpnet.vhost.server`) knows nothing of this.

Queue pair ``i`` (virtqueues ``2i`` rx and ``2i+1`` tx) is served by one
datapath thread over one UMEM registration of the whole guest memory,
with up to two AF_XDP sockets on it: a direct one on NIC queue
``queues[i]`` (if the VM owns NIC queues) and one on queue ``i`` of the
VM's port (docs/steering.md).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from xdpnet.datapath.counters import BROKEN_REASONS, CounterBlock
from xdpnet.datapath.queue_pair import QueuePair, RingConfig
from xdpnet.datapath.xsk import SharedUmemError, Umem, XskSocket
from xdpnet.errors import UsageError, VhostError
from xdpnet.memory.discard import DEFAULT_INTERVAL as DISCARD_INTERVAL
from xdpnet.memory.discard import Discard, DiscardWatcher, WatchedRange
from xdpnet.memory.umem import FrameGeometry, GuestMemory
from xdpnet.vhost.device import VringState
from xdpnet.vhost.protocol import MemRegion, ProtocolFeature, VirtioFeature, bit, feature_names

log = logging.getLogger("xdpnet.backend")

OFFERED_FEATURES = (bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.NET_MRG_RXBUF)
                    | bit(VirtioFeature.RING_EVENT_IDX) | bit(VirtioFeature.RING_INDIRECT_DESC)
                    | bit(VirtioFeature.PROTOCOL_FEATURES))
OFFERED_PROTOCOL = bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK)


class XskSteering(Protocol):
    """What the backend needs from the XDP programs: XSKMAP entries.

    ``kind`` is ``"nic"`` (a socket on NIC queue ``queue``) or ``"port"``
    (a socket on queue ``queue`` of the VM's port device).
    """

    def set_xsk(self, kind: str, queue: int, fd: int) -> None: ...
    def clear_xsk(self, kind: str, queue: int) -> None: ...


@dataclass(frozen=True)
class BackendConfig:
    """Static configuration of one attachment (one VM on one NIC)."""

    ifname: str
    queues: tuple[int, ...] = (0,)          # NIC queue of each queue pair with a direct socket
    zerocopy: bool = False                  # decided by probing the NIC
    geometry: FrameGeometry = FrameGeometry()
    bounce_slots: int = 1024                # shared by all pairs
    ring_size: int = 2048                   # XSK ring entries
    batch: int = 64
    busy_poll_us: int = 0                   # poll this long after the last work before sleeping
    napi_budget: int = 0                    # > 0: SO_PREFER_BUSY_POLL, the thread runs the NAPI
    counters_dir: str | None = None         # files other processes can map
    port_ifname: str | None = None          # the VM's port (docs/steering.md): pair i gets a
                                            # second socket on its queue i
    port_pairs: int = 0                     # pairs: max(len(queues), port_pairs)
    vm_mac: int = 0                         # u64 MAC (c/xdpnet.h) tx frames must come from; 0 = any
    port_fill_target: int = 0               # rx buffers kept on a port fill ring, 0 = min(256, ring/4)

    @property
    def pairs(self) -> int:
        """Queue pairs: pair i has a direct socket iff i < len(queues), a
        port socket iff port_ifname is set."""
        return max(len(self.queues), self.port_pairs if self.port_ifname else 0)


@dataclass
class _Pair:
    """A running queue pair and everything it owns."""

    umem: Umem
    xsk: XskSocket | None                               # direct socket (NIC queue)
    port: XskSocket | None                              # socket on the VM's port
    qp: QueuePair
    port_umem: Umem | None = None                       # only if the port could not share `umem`
    retired: list[int] = field(default_factory=list)    # replaced call fds, closed at stop

    def close_sockets(self) -> None:
        """Unbind the sockets, then unregister the UMEMs: once this returns
        the kernel writes nothing more into guest memory."""
        _unbind(self.port, self.xsk, self.port_umem, self.umem)


def _unbind(*objs: XskSocket | Umem | None) -> None:
    """Close sockets and UMEMs in the order given (sockets first); None is skipped."""
    for o in objs:
        if o is not None:
            o.close()


class NetBackend:
    """vhost-user virtio-net device over AF_XDP (implements VhostUserDevice)."""

    def __init__(self, config: BackendConfig, steering: XskSteering | None = None):
        if config.pairs < 1:
            raise UsageError("a backend needs NIC queues or a port (port_ifname and port_pairs)")
        self.config = config
        self.steering = steering
        self.memory: GuestMemory | None = None
        self._spare_umem: Umem | None = None
        self.features = 0
        self.protocol = 0
        self._vrings: dict[int, VringState] = {}        # started rings (copies)
        self._pairs: dict[int, _Pair] = {}
        self.local_macs: list[int] = []                 # u64 MACs of the other VMs on the NIC
        self.counters = [CounterBlock.create(self._counter_path(i))
                         for i in range(config.pairs)]
        self._lock = threading.RLock()
        self.last_pause_ms: float | None = None       # queue pairs stopped, last re-registration
        self.last_register_ms: float | None = None    # mapping + pinning the last table
        self.discards = 0                               # discard events seen
        self._watcher: DiscardWatcher | None = None
        self.discard_interval = DISCARD_INTERVAL

    def _counter_path(self, i: int) -> str | None:
        d = self.config.counters_dir
        return os.path.join(d, f"qp{i}.counters") if d else None

    # -- VhostUserDevice: negotiation ---------------------------------------

    def device_features(self) -> int:
        f = OFFERED_FEATURES
        if self.config.pairs > 1:
            f |= bit(VirtioFeature.NET_MQ)
        return f

    def protocol_features(self) -> int:
        return OFFERED_PROTOCOL

    def max_queue_pairs(self) -> int:
        return self.config.pairs

    def set_features(self, features: int) -> None:
        if not features & bit(VirtioFeature.VERSION_1):
            raise VhostError("legacy virtio frontend (no VERSION_1) is not supported", fatal=True)
        self.features = features
        log.debug("device features 0x%x: %s", features, " ".join(feature_names(features)))

    def set_protocol_features(self, features: int) -> None:
        self.protocol = features

    # -- memory -------------------------------------------------------------

    def set_mem_table(self, regions: list[MemRegion], fds: list[int]) -> None:
        self._install_memory(regions, fds, "new memory table")

    def reregister(self, why: str) -> None:
        """Map and register the current memory table again (same files).

        After pages were discarded from guest memory the UMEM still pins
        the old pages: frames would land where the guest never looks.  A
        fresh registration pins the pages the guest sees now.
        """
        with self._lock:
            if self.memory is None:
                return
            placed = self.memory.layout.regions
            table = [MemRegion(p.region.gpa, p.region.size, p.region.uva, p.region.mmap_offset)
                     for p in placed]
            self._install_memory(table, list(self.memory.fds), why)

    def _install_memory(self, regions: list[MemRegion], fds: list[int], why: str) -> None:
        """Map and register ``regions``; running pairs pause and resume on it."""
        with self._lock:
            t0 = time.monotonic()
            new = GuestMemory.map(regions, fds, bounce_slots=self.config.bounce_slots,
                                  geometry=self.config.geometry)
            try:
                spare = Umem(new)       # validates that the memory can be pinned
            except BaseException:
                new.close()
                raise
            # Mapped and pinned while the old pairs still run: the pause
            # below is only stop, rebind and restart.
            t1 = time.monotonic()
            self._stop_watch()
            running = sorted(self._pairs)
            bases = {p: self._stop_pair(p) for p in running}
            old = (self.memory, self._spare_umem)
            self.memory, self._spare_umem = new, spare
            try:
                for p, (rx, tx) in bases.items():
                    self._vrings[2 * p].base, self._vrings[2 * p + 1].base = rx, tx
                    self._start_pair(p)
            finally:
                t2 = time.monotonic()
                # The old range goes even if a restart failed.  Unmapping it
                # (page tables of all of guest RAM) is not part of the pause.
                for thing in (old[1], old[0]):
                    if thing is not None:
                        thing.close()
                self._start_watch()
            reg_ms, pause_ms = (t1 - t0) * 1000, (t2 - t1) * 1000
            self.last_register_ms = reg_ms
            sizes = "+".join(f"{r.size >> 20}M" for r in regions)
            if running:
                self.last_pause_ms = pause_ms
                log.info("%s (%s) while running: registered in %.1f ms, queue pairs paused "
                         "%.1f ms", why, sizes, reg_ms, pause_ms)
            else:
                log.info("memory table: %d region(s) (%s), UMEM range %d MiB registered in %.1f ms",
                         len(regions), sizes, new.size >> 20, reg_ms)

    # -- discarded guest pages ------------------------------------------------

    def _start_watch(self) -> None:
        """Watch the just-registered regions for discarded pages."""
        assert self.memory is not None
        ranges = [WatchedRange(i, fd, p.region.mmap_offset, p.region.size,
                               by_blocks=p.region.hugetlb)
                  for i, (p, fd) in enumerate(zip(self.memory.layout.regions, self.memory.fds))]
        self._watcher = DiscardWatcher(ranges, self._on_discard,
                                       interval=self.discard_interval).start()

    def _stop_watch(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def _on_discard(self, d: Discard) -> None:
        """A hole appeared in registered guest memory: count, log once, re-register."""
        self.discards += 1
        log.warning("guest memory discard detected: %s (balloon, free-page reporting, virtio-mem "
                    "or postcopy?); re-registering the UMEM so that no further frame is lost. "
                    "Turn those off for VMs served by xdpnet (docs/memory.md)", d.describe())
        try:
            self.reregister("re-registration after a discard")
        except Exception as e:          # noqa: BLE001 - logged; the pairs stay stopped
            log.error("re-registration after a discard failed: %s", e)

    def check_discards(self) -> bool:
        """Check for discarded pages now (e.g. when a queue stalls); True if found."""
        w = self._watcher
        return w is not None and w.check() is not None

    def _drop_memory(self) -> None:
        if self._spare_umem is not None:
            self._spare_umem.close()
            self._spare_umem = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    def _take_umem(self) -> Umem:
        assert self.memory is not None
        if self._spare_umem is not None:
            u, self._spare_umem = self._spare_umem, None
            return u
        return Umem(self.memory)

    # -- rings --------------------------------------------------------------

    def start_vring(self, vring: VringState) -> None:
        with self._lock:
            if self.memory is None:
                raise VhostError(f"vring {vring.index} started before SET_MEM_TABLE", fatal=True)
            self._ring_config(vring)            # refuse early: ring outside memory
            self._close_ring_fds(vring.index)
            v = dataclasses.replace(vring)
            # Our own copies: the server closes its fds when they are replaced.
            v.kick_fd = os.dup(vring.kick_fd) if vring.kick_fd is not None else None
            v.call_fd = os.dup(vring.call_fd) if vring.call_fd is not None else None
            self._vrings[vring.index] = v
            p = vring.index // 2
            if 2 * p in self._vrings and 2 * p + 1 in self._vrings and p not in self._pairs:
                self._start_pair(p)

    def enable_vring(self, index: int, enabled: bool) -> None:
        with self._lock:
            if index in self._vrings:
                self._vrings[index].enabled = enabled
            pair = self._pairs.get(index // 2)
            if pair:
                pair.qp.set_enabled(index % 2, enabled)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        with self._lock:
            v = self._vrings.get(index)
            if v is None:
                return
            new = os.dup(fd) if fd is not None else None
            old, v.call_fd = v.call_fd, new
            pair = self._pairs.get(index // 2)
            if pair:
                pair.qp.set_call_fd(index % 2, -1 if new is None else new)
                if old is not None:
                    pair.retired.append(old)    # the loop may be writing to it right now
            elif old is not None:
                os.close(old)

    def stop_vring(self, index: int) -> int:
        with self._lock:
            p = index // 2
            if p in self._pairs:
                rx, tx = self._stop_pair(p)
                self._vrings[2 * p].base, self._vrings[2 * p + 1].base = rx, tx
            v = self._vrings.get(index)
            base = v.base if v else 0
            self._close_ring_fds(index)
            self._vrings.pop(index, None)
            return base

    def _close_ring_fds(self, index: int) -> None:
        v = self._vrings.get(index)
        if v is None:
            return
        for fd in (v.kick_fd, v.call_fd):
            if fd is not None:
                os.close(fd)
        v.kick_fd = v.call_fd = None

    def reset(self) -> None:
        with self._lock:
            for p in sorted(self._pairs):
                try:
                    self._stop_pair(p)
                except Exception as e:  # noqa: BLE001 - reset must not raise
                    log.error("queue pair %d: stop failed: %s", p, e)
            for i in list(self._vrings):
                self._close_ring_fds(i)
            self._vrings.clear()
            self._stop_watch()
            self._drop_memory()
            self.features = 0

    # -- queue pairs --------------------------------------------------------

    def _ring_config(self, v: VringState) -> RingConfig:
        """Translate a ring's frontend addresses into UMEM offsets."""
        assert self.memory is not None
        n = v.num
        parts = (("descriptor table", v.desc_addr, 16 * n), ("avail ring", v.avail_addr, 6 + 2 * n),
                 ("used ring", v.used_addr, 6 + 8 * n))
        offs = []
        for what, addr, size in parts:
            off = self.memory.uva_to_off(addr, size)
            if off is None:
                raise VhostError(f"vring {v.index}: {what} at 0x{addr:x} (+{size}) is not inside "
                                 f"the memory table", fatal=True)
            offs.append(off)
        if offs[0] % 16 or offs[1] % 2 or offs[2] % 4:
            raise VhostError(f"vring {v.index}: ring addresses are misaligned", fatal=True)
        return RingConfig(n, offs[0], offs[1], offs[2], v.base & 0xFFFF,
                          -1 if v.kick_fd is None else v.kick_fd,
                          -1 if v.call_fd is None else v.call_fd, v.enabled)

    def _start_pair(self, p: int) -> None:
        cfg = self.config
        assert self.memory is not None
        rxv, txv = self._vrings[2 * p], self._vrings[2 * p + 1]
        rx, tx = self._ring_config(rxv), self._ring_config(txv)
        umem = port_umem = xsk = port = qp = None
        direct = p < len(cfg.queues)
        try:
            umem = self._take_umem()
            if direct:
                xsk = XskSocket.bind(umem, cfg.ifname, cfg.queues[p], zerocopy=cfg.zerocopy,
                                     ring_size=cfg.ring_size)
            if cfg.port_ifname:
                port, port_umem = self._bind_port(p, umem, first=xsk is None)
            per_pair = self.memory.layout.bounce_slots // cfg.pairs
            ctr = self.counters[p]
            qp = QueuePair(p, self.memory, xsk, rx, tx, self.features, ctr,
                           bounce_first=p * per_pair, bounce_count=per_pair, batch=cfg.batch,
                           busy_poll_us=cfg.busy_poll_us, napi_budget=cfg.napi_budget,
                           port=port, vm_mac=cfg.vm_mac,
                           port_fill_target=cfg.port_fill_target)
            qp.set_local_macs(self.local_macs)
            if self.steering is not None:
                if xsk is not None:
                    self.steering.set_xsk("nic", cfg.queues[p], xsk.fd)
                if port is not None:
                    self.steering.set_xsk("port", p, port.fd)
            qp.start()
        except BaseException:
            if self.steering is not None and qp is not None:
                self._clear_steering(p, xsk is not None, port is not None)
            if qp is not None:
                qp.destroy()
            _unbind(port, xsk, port_umem, umem)
            raise
        self._pairs[p] = _Pair(umem, xsk, port, qp, port_umem)
        socks = []
        if xsk is not None:
            socks.append(f"{cfg.ifname} queue {cfg.queues[p]} "
                         f"({'zero-copy' if xsk.zerocopy else 'copy'})")
        if port is not None:
            socks.append(f"port {cfg.port_ifname} queue {p} "
                         f"({'shared UMEM' if port.shared else 'own UMEM'})")
        log.info("queue pair %d on %s: rx ring %d, tx ring %d", p, " + ".join(socks),
                 rx.num, tx.num)

    def _bind_port(self, p: int, umem: Umem, first: bool) -> tuple[XskSocket, Umem | None]:
        """Pair ``p``'s socket on the port: on the pair's UMEM (shared with
        the direct socket, registered once), or on a UMEM of its own if the
        kernel refuses to share (a zero-copy UMEM and a copy-only port)."""
        cfg = self.config
        assert cfg.port_ifname and self.memory is not None
        if first:
            return XskSocket.bind(umem, cfg.port_ifname, p, zerocopy=False,
                                  ring_size=cfg.ring_size), None
        try:
            return XskSocket.bind_shared(umem, cfg.port_ifname, p, ring_size=cfg.ring_size), None
        except SharedUmemError as e:
            log.warning("queue pair %d: %s; registering guest memory a second time", p, e)
        own = Umem(self.memory)
        try:
            return XskSocket.bind(own, cfg.port_ifname, p, zerocopy=False,
                                  ring_size=cfg.ring_size), own
        except BaseException:
            own.close()
            raise

    def _clear_steering(self, p: int, direct: bool, port: bool) -> None:
        """Remove pair ``p``'s XSKMAP entries: no frame is redirected to its sockets."""
        assert self.steering is not None
        if direct:
            self.steering.clear_xsk("nic", self.config.queues[p])
        if port:
            self.steering.clear_xsk("port", p)

    def _stop_pair(self, p: int) -> tuple[int, int]:
        """Stop pair ``p``; returns (rx, tx) last_avail_idx. Loses no descriptor."""
        pair = self._pairs.pop(p)
        if self.steering is not None:
            self._clear_steering(p, pair.xsk is not None, pair.port is not None)
        pair.qp.stop()
        pair.close_sockets()        # no more writes into guest RAM, on either socket
        rx, tx = pair.qp.quiesce()
        pair.qp.destroy()
        for fd in pair.retired:
            os.close(fd)
        c = self.counters[p].snapshot()
        log.info("queue pair %d stopped: rx last_avail %d, tx last_avail %d "
                 "(rx rewound %d, returned empty %d, tx lost %d)", p, rx, tx, c["rx_rewound"],
                 c["rx_returned_empty"], c["tx_lost_at_stop"])
        return rx, tx

    # -- introspection ------------------------------------------------------

    def running_pairs(self) -> list[int]:
        return sorted(self._pairs)

    def pair(self, p: int) -> QueuePair | None:
        pr = self._pairs.get(p)
        return pr.qp if pr else None

    def set_local_macs(self, macs: list[int]) -> None:
        """The other VMs' MACs on the NIC (u64, c/xdpnet.h): tx frames to
        them leave on the port; kept for pairs started later."""
        with self._lock:
            self.local_macs = list(macs)
            for pr in self._pairs.values():
                pr.qp.set_local_macs(self.local_macs)

    def broken(self) -> list[str]:
        """Human-readable reasons of stopped (NEEDS_RESET) queues."""
        out = []
        for i, c in enumerate(self.counters):
            for ring in ("rx", "tx"):
                r = int(getattr(c.ptr, f"{ring}_broken"))
                if r:
                    out.append(f"queue pair {i} {ring}: {BROKEN_REASONS.get(r, r)}")
        return out

    def close(self) -> None:
        self.reset()
        for c in self.counters:
            c.close()
            if c.path:
                try:
                    os.unlink(c.path)
                except FileNotFoundError:
                    pass


__all__ = ["BackendConfig", "NetBackend"]

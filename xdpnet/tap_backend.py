"""The tap baseline: a vhost-user virtio-net device served with a tap device.

What QEMU's virtio-net does without vhost-net: the virtqueues are served
by one thread that ``readv()``\\ s each frame from a tap fd into a guest rx
buffer and ``writev()``\\ s each guest tx frame to the tap, one system call
per frame (``c/tap.c``).  The benchmarks compare xdpnet's AF_XDP datapath
against it; the tap is usually joined to the "NIC" by a Linux bridge::

    wire (netns) <-veth-> NIC end --[bridge]-- tap <-read/write-> TapBackend <-vhost-user-> guest

:class:`TapBackend` is a :class:`~xdpnet.backend.NetBackend` (same
negotiation, features, memory-table and vring handling) whose one queue
pair is a :class:`~xdpnet.datapath.tap_pair.TapQueuePair` instead of
AF_XDP sockets.  :class:`TapDevice` and :class:`Bridge` create the tap and
the bridge and remove them on close::

    with TapDevice("xb0tap") as tap, Bridge("xb0br", [bed.nic, tap.ifname]):
        backend = TapBackend(tap)
        with VhostUserServer(path, backend) as server: ...
        backend.close()
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from xdpnet.backend import BackendConfig, NetBackend
from xdpnet.datapath.tap_pair import TapQueuePair
from xdpnet.errors import UsageError, XdpnetError
from xdpnet.net.link import delete_link, disable_ipv6, link_index
from xdpnet.vhost.protocol import MemRegion

log = logging.getLogger("xdpnet.tap")

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA          # _IOW('T', 202, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16


class TapDevice:
    """A tap device (IFF_TAP | IFF_NO_PI, no IFF_VNET_HDR: plain Ethernet
    frames) in the caller's network namespace, up, its fd non-blocking.

    Not persistent: the device goes away when :meth:`close` closes the fd
    (or the process dies).  IPv6 is disabled on it unless *ipv6*.
    """

    def __init__(self, ifname: str, *, mtu: int | None = None, ipv6: bool = False):
        if len(ifname.encode()) >= IFNAMSIZ:
            raise UsageError(f"tap name {ifname!r}: at most {IFNAMSIZ - 1} bytes")
        self.fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI)
            try:
                res = fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            except OSError as e:
                raise XdpnetError(f"cannot create tap {ifname}: {os.strerror(e.errno)}") from None
            self.ifname = res[:IFNAMSIZ].rstrip(b"\0").decode()
            if not ipv6:
                disable_ipv6(self.ifname)
            with IPRoute() as ipr:
                idx = link_index(ipr, self.ifname)
                if mtu is not None:
                    ipr.link("set", index=idx, mtu=mtu)
                ipr.link("set", index=idx, state="up")
                self.ifindex = idx
                self.mac = ipr.link("get", index=idx)[0].get("IFLA_ADDRESS")
        except BaseException:
            os.close(self.fd)
            raise

    def fileno(self) -> int:
        return self.fd

    def dropped(self) -> int:
        """Frames the tap's queue dropped (its tx_dropped): on the way to the
        guest while the backend did not read them, e.g. no guest rx buffer."""
        try:
            with open(f"/sys/class/net/{self.ifname}/statistics/tx_dropped") as f:
                return int(f.read())
        except (OSError, ValueError):
            return 0

    def close(self) -> None:
        """Close the fd, which removes the device (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TapDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TapDevice({self.ifname!r}, fd={self.fd})"


class Bridge:
    """A Linux bridge *ifname* (no STP: ports forward at once; no multicast
    snooping) joining *ports*, up; IPv6 disabled on it unless *ipv6*, so
    that the bridge itself sends nothing to its ports.  :meth:`close` deletes
    it (its ports are released, not deleted)."""

    def __init__(self, ifname: str, ports: Iterable[str] = (), *, ipv6: bool = False):
        if len(ifname.encode()) >= IFNAMSIZ:
            raise UsageError(f"bridge name {ifname!r}: at most {IFNAMSIZ - 1} bytes")
        self.ifname = ifname
        self.closed = False
        with IPRoute() as ipr:
            try:
                # No multicast snooping: with it the bridge joins the
                # all-snoopers group and sends IGMP reports to its ports.
                ipr.link("add", ifname=ifname, kind="bridge", br_mcast_snooping=0)
            except NetlinkError as e:
                raise XdpnetError(f"cannot create bridge {ifname}: {os.strerror(e.code)}") from None
            try:
                idx = link_index(ipr, ifname)
                if not ipv6:
                    disable_ipv6(ifname)
                for port in ports:
                    ipr.link("set", index=link_index(ipr, port), master=idx)
                ipr.link("set", index=idx, state="up")
            except BaseException:
                delete_link(ipr, ifname)
                raise

    def close(self) -> None:
        """Delete the bridge (idempotent, tolerant of it being gone)."""
        if not self.closed:
            self.closed = True
            with IPRoute() as ipr:
                delete_link(ipr, self.ifname)

    def __enter__(self) -> Bridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _TapPair:
    """A running tap queue pair (what NetBackend's ring methods reach: .qp, .retired)."""

    qp: TapQueuePair
    retired: list[int] = field(default_factory=list)    # replaced call fds, closed at stop


class TapBackend(NetBackend):
    """vhost-user virtio-net device over a tap fd (one queue pair).

    *tap* is a :class:`TapDevice` or a tap fd (IFF_TAP | IFF_NO_PI, no
    IFF_VNET_HDR; made non-blocking), which stays the caller's: close the
    backend first, then the tap.  *config* defaults to
    ``BackendConfig(<tap name>)``; only ``batch``, ``bounce_slots``,
    ``geometry`` and ``counters_dir`` matter.  Features, memory table and
    vring handling are NetBackend's; counters are ``counters[0]`` (rx/tx
    frames and bytes, every frame also in ``*_copied_*``: the kernel copies
    of read()/write(); ``tx_syscalls`` = writev() calls).
    """

    def __init__(self, tap: TapDevice | int, config: BackendConfig | None = None):
        if isinstance(tap, TapDevice):
            fd, name = tap.fd, tap.ifname
        else:
            fd, name = int(tap), f"tap-fd{int(tap)}"
        config = config or BackendConfig(name)
        if config.pairs != 1 or config.port_ifname:
            raise UsageError("a tap backend serves exactly one queue pair, without a port")
        super().__init__(config, steering=None)
        self.tap_fd = fd

    # The memory table is NetBackend's (mapping, checks, pausing running
    # pairs); it also registers a spare AF_XDP UMEM for the next pair,
    # which a tap pair never uses: unregister it at once.
    def _install_memory(self, regions: list[MemRegion], fds: list[int], why: str) -> None:
        with self._lock:
            super()._install_memory(regions, fds, why)
            if self._spare_umem is not None:
                self._spare_umem.close()
                self._spare_umem = None

    def _start_pair(self, p: int) -> None:
        assert self.memory is not None
        rx = self._ring_config(self._vrings[2 * p])
        tx = self._ring_config(self._vrings[2 * p + 1])
        qp = TapQueuePair(p, self.memory, self.tap_fd, rx, tx, self.features, self.counters[p],
                          batch=self.config.batch)
        try:
            qp.start()
        except BaseException:
            qp.destroy()
            raise
        self._pairs[p] = _TapPair(qp)       # type: ignore[assignment]
        log.info("queue pair %d on tap %s: rx ring %d, tx ring %d", p, self.config.ifname,
                 rx.num, tx.num)

    def _stop_pair(self, p: int) -> tuple[int, int]:
        """Stop pair ``p``; returns (rx, tx) last_avail_idx (nothing is held in flight)."""
        pair = self._pairs.pop(p)
        pair.qp.stop()
        rx, tx = pair.qp.quiesce()
        pair.qp.destroy()
        for fd in pair.retired:
            os.close(fd)
        log.info("queue pair %d (tap) stopped: rx last_avail %d, tx last_avail %d", p, rx, tx)
        return rx, tx


__all__ = ["Bridge", "TapBackend", "TapDevice"]

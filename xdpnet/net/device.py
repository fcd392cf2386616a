"""Network devices: look one up by name and validate a queue id against it.

An AF_XDP socket binds to one (device, queue).  The queues a socket may
bind are the device's channels: ``combined`` plus rx-only channels as
``ethtool -l`` reports them (the ``ETHTOOL_GCHANNELS`` ioctl); veth
reports its rx queues there, and devices without channel support fall
back to their real rx queue count.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from xdpnet.errors import UsageError
from xdpnet.net.netns import call_in_netns, netns_exists, with_ipr

SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO = 0x00000003
ETHTOOL_GCHANNELS = 0x0000003C
_DRVINFO_LEN = 196       # struct ethtool_drvinfo
_CHANNELS_FMT = "9I"     # struct ethtool_channels: cmd, 4 max, 4 counts
IFNAMSIZ = 16


def _ethtool(ifname: str, cmd: int, size: int) -> bytes | None:
    """Run one SIOCETHTOOL get-command on *ifname*; None if unsupported.

    Runs in the caller's (thread's) network namespace.
    """
    buf = array.array("B", struct.pack("I", cmd) + bytes(size - 4))
    addr, _ = buf.buffer_info()
    ifr = struct.pack(f"{IFNAMSIZ}sP", ifname.encode(), addr)
    ifr += bytes(40 - len(ifr))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV, errno.EPERM):
                return None
            raise
    return buf.tobytes()


def _ethtool_facts(ifname: str) -> tuple[str | None, tuple[int, ...] | None]:
    """(driver name, ethtool_channels fields) of *ifname*, None where unsupported."""
    drv = _ethtool(ifname, ETHTOOL_GDRVINFO, _DRVINFO_LEN)
    driver = drv[4:36].split(b"\0", 1)[0].decode(errors="replace") if drv else None
    ch = _ethtool(ifname, ETHTOOL_GCHANNELS, struct.calcsize(_CHANNELS_FMT))
    channels = struct.unpack(_CHANNELS_FMT, ch) if ch else None
    return driver, channels


def _sysfs_rx_queues(ifname: str) -> int | None:
    """Real rx queues from /sys/class/net/<if>/queues (root namespace only)."""
    try:
        return sum(1 for q in os.listdir(f"/sys/class/net/{ifname}/queues")
                   if q.startswith("rx-"))
    except OSError:
        return None


@dataclass(frozen=True)
class NetDevice:
    """One network interface as xdpnet sees it.

    ``channels`` is the number of queues an AF_XDP socket may bind on
    (``combined + rx`` channels, or the rx queue count where the driver
    has no channel support); ``rx_queues``/``tx_queues`` are the real
    queue counts of the device.
    """

    name: str
    ifindex: int
    mtu: int
    mac: str
    rx_queues: int
    tx_queues: int
    channels: int
    combined_channels: int      # 0 where the driver reports none (veth)
    driver: str | None
    netns: str | None = None

    @classmethod
    def lookup(cls, name: str, netns: str | None = None) -> "NetDevice":
        """Look interface *name* up (in *netns*, default the caller's namespace).

        Raises :class:`UsageError` ``interface 'X' not found`` for a name
        that is not an interface there.
        """
        if not name or len(name) >= IFNAMSIZ or "/" in name or name != name.strip():
            raise UsageError(f"interface '{name}' not found")
        if netns is not None and not netns_exists(netns):
            raise UsageError(f"network namespace '{netns}' not found")
        try:
            link = with_ipr(netns, lambda ipr: ipr.link("get", ifname=name)[0])
        except NetlinkError as e:
            if e.code in (errno.ENODEV, errno.ENOENT, errno.EINVAL, errno.ERANGE):
                raise UsageError(f"interface '{name}' not found") from None
            raise
        num_rx = link.get("IFLA_NUM_RX_QUEUES") or 1
        num_tx = link.get("IFLA_NUM_TX_QUEUES") or 1
        real_rx = _sysfs_rx_queues(name) if netns is None else None
        rx = real_rx or num_rx
        driver, ch = call_in_netns(netns, _ethtool_facts, name)
        if ch is not None:
            _, _max_rx, _max_tx, _max_other, _max_comb, rx_count, tx_count, _other, comb = ch
            channels = comb + rx_count
        else:
            comb = 0
            channels = 0
        if channels <= 0:
            channels = rx
        return cls(name=name, ifindex=link["index"], mtu=link.get("IFLA_MTU"),
                   mac=link.get("IFLA_ADDRESS") or "", rx_queues=rx, tx_queues=num_tx,
                   channels=channels, combined_channels=comb, driver=driver, netns=netns)

    def validate_queue(self, queue: int) -> None:
        """Raise :class:`UsageError` unless *queue* is one of the device's channels."""
        if not isinstance(queue, int) or isinstance(queue, bool) or not 0 <= queue < self.channels:
            plural = "channel" if self.channels == 1 else "channels"
            raise UsageError(
                f"queue {queue} is out of range for interface '{self.name}': it has "
                f"{self.channels} {plural} (queues 0-{self.channels - 1})")

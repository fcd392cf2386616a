"""A VM's port: the veth pair that carries what cannot reach the VM
directly on a NIC queue (docs/steering.md).

::

    NIC XDP / TC flood / other ports          the VM's port sockets
                   |                                   |
      xn<I>v<N>h  (host end)  <------ veth ------>  xn<I>v<N>p  (port end)
      XDP: xdpnet_port_tx                            XDP: xdpnet_port_rx

``I`` is the NIC's ifindex (decimal; base 36 if a name could exceed 15
characters), ``N`` the VM id.  Both ends get the same number of queues
(one per queue pair of the VM, at least one), the same MTU (the VM's
longest frame minus 18 bytes of Ethernet header and VLAN tag: a veth
takes frames up to MTU + 18, so that is the cap), IPv6 disabled (no
router solicitations or MLD reports), an XDP program in native mode each,
and are brought up.  Frames sent into the host end (``ndo_xdp_xmit`` from
XDP, or an skb from TC) arrive on the port end, and the reverse.

The names are xdpnet's: any link of this form is a port, and
:func:`delete_port` / :func:`stale_ports` only ever touch such names.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from xdpnet.errors import BusyError, PrivilegeError, UsageError, XdpnetError
from xdpnet.net.link import delete_link, disable_ipv6

log = logging.getLogger("xdpnet.port")

IFNAMSIZ = 16
XDP_FLAGS_UPDATE_IF_NOEXIST, XDP_FLAGS_DRV_MODE = 1 << 0, 1 << 2
MAX_VM_ID = 63                          # xdpnet/steering/maps.py MAX_VMS - 1
MIN_MTU, VETH_OVERHEAD = 68, 18         # Ethernet header + VLAN tag
PORT_NAME_RE = re.compile(r"xn([0-9a-z]+)v([0-9]+)([hp])")
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(n: int) -> str:
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _DIGITS[r] + out
        if not n:
            return out


def port_names(nic_ifindex: int, vm_id: int) -> tuple[str, str]:
    """(host end, port end) names of VM *vm_id*'s port on NIC *nic_ifindex*."""
    nic = str(nic_ifindex)
    if len(f"xn{nic}v{MAX_VM_ID}h") >= IFNAMSIZ:     # one form per NIC
        nic = _base36(nic_ifindex)
    host, port = f"xn{nic}v{vm_id}h", f"xn{nic}v{vm_id}p"
    if len(host) >= IFNAMSIZ:
        raise UsageError(f"VM id {vm_id} makes port name {host!r} too long")
    return host, port


def port_mtu(max_frame: int) -> int:
    """The MTU that makes a veth take frames up to *max_frame* bytes."""
    return max(MIN_MTU, max_frame - VETH_OVERHEAD)


@dataclass
class VmPort:
    """One port (both ends in the caller's network namespace)."""

    host: str
    port: str
    host_ifindex: int
    port_ifindex: int
    queues: int
    mtu: int

    @classmethod
    def create(cls, nic_ifindex: int, vm_id: int, *, queues: int, max_frame: int,
               rx_prog_fd: int, tx_prog_fd: int) -> "VmPort":
        """Create the pair, attach *tx_prog_fd* (host end) and *rx_prog_fd*
        (port end) in native XDP mode and bring it up.  A link left with
        the same name (by a process that died) is replaced.  On failure
        nothing is left behind."""
        host, port = port_names(nic_ifindex, vm_id)
        if not 1 <= queues <= 256:
            raise UsageError(f"port queues {queues}: 1..256")
        mtu = port_mtu(max_frame)
        with IPRoute() as ipr:
            if ipr.link_lookup(ifname=host) or ipr.link_lookup(ifname=port):
                log.warning("replacing leftover port %s/%s", host, port)
                delete_link(ipr, host)
                delete_link(ipr, port)
            try:
                ipr.link("add", ifname=host, kind="veth", num_rx_queues=queues,
                         num_tx_queues=queues, peer={"ifname": port, "num_rx_queues": queues,
                                                     "num_tx_queues": queues})
            except NetlinkError as e:
                if e.code in (errno.EPERM, errno.EACCES):
                    raise PrivilegeError("creating a VM port (veth) needs CAP_NET_ADMIN") \
                        from None
                if e.code == errno.EEXIST:
                    raise BusyError(f"port {host}/{port} exists already") from None
                raise XdpnetError(f"cannot create port {host}/{port}: "
                                  f"{os.strerror(e.code)}") from None
            try:
                h = ipr.link_lookup(ifname=host)[0]
                p = ipr.link_lookup(ifname=port)[0]
                for name in (host, port):
                    disable_ipv6(name)
                for idx in (h, p):
                    ipr.link("set", index=idx, mtu=mtu)
                for idx, fd, what in ((h, tx_prog_fd, "xdpnet_port_tx"),
                                      (p, rx_prog_fd, "xdpnet_port_rx")):
                    try:
                        ipr.link("set", index=idx, xdp={"attrs": [
                            ("IFLA_XDP_FD", fd),
                            ("IFLA_XDP_FLAGS", XDP_FLAGS_UPDATE_IF_NOEXIST | XDP_FLAGS_DRV_MODE)]})
                    except NetlinkError as e:
                        raise XdpnetError(f"cannot attach {what} to {host if idx == h else port}"
                                          f" (native XDP): {os.strerror(e.code)}") from None
                for idx in (p, h):
                    ipr.link("set", index=idx, state="up")
            except BaseException:
                delete_link(ipr, host)
                raise
        log.info("port %s/%s: %d queue(s), MTU %d", host, port, queues, mtu)
        return cls(host, port, h, p, queues, mtu)

    def delete(self) -> bool:
        """Delete both ends (their XDP programs go with them); idempotent."""
        return delete_port(self.host)


def delete_port(ifname: str) -> bool:
    """Delete the port *ifname* (either end's name); True if it existed.
    Refuses names that are not of the port form."""
    if not PORT_NAME_RE.fullmatch(ifname):
        raise UsageError(f"{ifname!r} is not an xdpnet port name")
    with IPRoute() as ipr:
        return delete_link(ipr, ifname)


def ports_of(nic_ifindex: int) -> list[str]:
    """Host-end names of every port link of NIC *nic_ifindex* that exists."""
    prefix = port_names(nic_ifindex, 0)[0][:-2]        # "xn<I>v"
    with IPRoute() as ipr:
        names = [link.get("IFLA_IFNAME") or "" for link in ipr.link("dump")]
    return sorted(n for n in names
                  if n.startswith(prefix) and n.endswith("h") and PORT_NAME_RE.fullmatch(n))

"""Interface helpers shared by everything that creates links (test beds,
VM ports, the tap baseline): delete a link whether or not it is still
there, look one up by name, keep IPv6 chatter off it."""

from __future__ import annotations

import errno

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from xdpnet.errors import XdpnetError


def link_index(ipr: IPRoute, ifname: str) -> int:
    """ifindex of *ifname* in *ipr*'s namespace (XdpnetError if there is none)."""
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise XdpnetError(f"interface {ifname} not found")
    return found[0]


def delete_link(ipr: IPRoute, ifname: str) -> bool:
    """Delete *ifname* in *ipr*'s namespace; True if it existed (a link
    that vanished meanwhile counts as not existing)."""
    try:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return False
        ipr.link("del", index=found[0])
        return True
    except NetlinkError as e:
        if e.code in (errno.ENODEV, errno.ENOENT):
            return False
        raise


def disable_ipv6(ifname: str) -> bool:
    """No router solicitations or MLD reports from *ifname* (they would mix
    with the frames it should carry); False if IPv6 is not built in."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as f:
            f.write("1")
        return True
    except FileNotFoundError:
        return False

"""XDP programs on a device: attach, detach, query (libbpf by netlink).

Attaching uses ``XDP_FLAGS_UPDATE_IF_NOEXIST``: xdpnet never replaces a
program someone else attached.  Detaching uses ``XDP_FLAGS_REPLACE``
naming xdpnet's own (pinned) program: it never removes someone else's
either, even one that replaced ours meanwhile.
"""

from __future__ import annotations

import errno
import logging
import os
import socket

from xdpnet.errors import BusyError, PrivilegeError, UsageError, XdpnetError
from xdpnet.steering.libbpf import MODE_FLAGS, XDP_FLAGS_UPDATE_IF_NOEXIST, libbpf

log = logging.getLogger("xdpnet.steering")

MODES = ("native", "generic", "auto")


def ifindex_of(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except (OSError, ValueError):
        raise UsageError(f"interface {ifname!r} not found") from None


def attached_prog_ids(ifname: str) -> dict[str, int]:
    """Ids of the XDP programs attached to *ifname*, by mode (``native``,
    ``generic``, ``offload``); empty if none."""
    return libbpf().xdp_query(ifindex_of(ifname))


def busy_error(ifname: str) -> BusyError:
    return BusyError(f"interface {ifname!r} already has an XDP program "
                     f"(remove it with: ip link set dev {ifname} xdp off)")


def xdp_attach(ifname: str, ifindex: int, prog_fd: int, mode: str) -> tuple[str, str | None]:
    """Attach in *mode* (``auto``: native, else generic); never replaces a
    program.  Returns (mode used, notice if auto fell back)."""
    lb = libbpf()
    tries = ["native", "generic"] if mode == "auto" else [mode]
    first_error = ""
    for m in tries:
        rc, msg = lb.xdp_attach(ifindex, prog_fd, XDP_FLAGS_UPDATE_IF_NOEXIST | MODE_FLAGS[m])
        if rc == 0:
            notice = None
            if m != tries[0]:
                notice = (f"native XDP not available on {ifname} ({first_error}): "
                          "using generic mode")
                log.warning("%s", notice)
            return m, notice
        err = -rc
        why = os.strerror(err) + (f": {msg}" if msg else "")
        if err in (errno.EBUSY, errno.EEXIST):
            raise busy_error(ifname)
        if err in (errno.EPERM, errno.EACCES):
            raise PrivilegeError(f"attaching XDP to {ifname!r} needs CAP_NET_ADMIN ({why})")
        if err == errno.ENODEV:
            raise UsageError(f"interface {ifname!r} not found")
        first_error = first_error or why
        if m == tries[-1]:
            raise XdpnetError(f"cannot attach XDP ({m} mode) to {ifname!r}: {why}")
    raise AssertionError("unreachable")


def xdp_detach(ifname: str, ifindex: int, mode_flag: int, prog_fd: int) -> None:
    """Detach our program (only if it is still the attached one)."""
    rc, msg = libbpf().xdp_detach(ifindex, mode_flag, prog_fd)
    if rc < 0 and -rc not in (errno.ENODEV, errno.ENOENT):
        # EEXIST: the attached program is not ours any more: leave it.
        log.warning("XDP program on %s not detached: %s%s", ifname, os.strerror(-rc),
                    f" ({msg})" if msg else "")

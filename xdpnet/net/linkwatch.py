"""Watch a NIC's link state and say so when it changes.

The datapath needs no intervention when a NIC goes down and comes back
up (the AF_XDP sockets, the XSKMAP entries and the XDP program stay in
place; frames flow again as soon as the link is up: tests/test_faults.py),
but a silent outage is hard to diagnose.  :class:`LinkWatch` listens to
rtnetlink link messages (RTMGRP_LINK, a plain netlink socket: no pyroute2
thread machinery) on a daemon thread and logs once per transition:

* the NIC went down (administratively or lost carrier);
* it is up again;
* it was deleted (nothing more will flow: the VM must be detached).

Usage::

    w = LinkWatch("eth1", what="VM 52:54:00:12:34:56").start()
    ...
    w.close()
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading

log = logging.getLogger("xdpnet.linkwatch")

RTMGRP_LINK = 1
RTM_NEWLINK, RTM_DELLINK = 16, 17
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
_NLMSG = struct.Struct("=IHHII")        # len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")      # family, type, index, flags, change


def link_is_up(flags: int) -> bool:
    """Administratively up and with carrier (what frames need)."""
    return bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP)


class LinkWatch:
    """Log the link transitions of interface ``ifname`` (root: the caller's
    network namespace).  ``on_change(state)`` (optional) is called with
    "down", "up" or "deleted" on the watcher thread."""

    def __init__(self, ifname: str, what: str = "", on_change=None):
        self.ifname = ifname
        self.what = what
        self.on_change = on_change
        self.ifindex = socket.if_nametoindex(ifname)
        self.state = "up" if self._flags_now() is None or self._up_now() else "down"
        self.transitions: list[str] = []
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            self._sock.bind((0, RTMGRP_LINK))
            self._wake_r, self._wake_w = os.pipe()
        except BaseException:
            self._sock.close()
            raise
        self._thread: threading.Thread | None = None

    def _flags_now(self) -> int | None:
        try:
            with open(f"/sys/class/net/{self.ifname}/flags") as f:
                return int(f.read(), 16)
        except (OSError, ValueError):
            return None

    def _up_now(self) -> bool:
        try:
            with open(f"/sys/class/net/{self.ifname}/carrier") as f:
                carrier = f.read().strip() == "1"
        except OSError:             # reading carrier of a down link fails with EINVAL
            carrier = False
        flags = self._flags_now() or 0
        return bool(flags & IFF_UP) and carrier

    def start(self) -> LinkWatch:
        self._thread = threading.Thread(target=self._run, name="xdpnet-linkwatch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        fd = self._sock.fileno()
        while True:
            try:
                # Wake now and then even when idle: serve's capability drop
                # reaches already-running threads on their next Python call
                # (xdpnet/privilege.py).
                r, _, _ = select.select([fd, self._wake_r], [], [], 0.5)
                if self._wake_r in r:
                    return
                if fd not in r:
                    continue
                data = self._sock.recv(65536)
            except OSError as e:
                log.debug("link watch on %s ended: %s", self.ifname, e)
                return
            try:
                self._parse(data)
            except Exception:
                log.exception("link watch on %s: bad message", self.ifname)

    def _parse(self, data: bytes) -> None:
        off = 0
        while off + _NLMSG.size <= len(data):
            length, mtype, _, _, _ = _NLMSG.unpack_from(data, off)
            if length < _NLMSG.size:
                return
            if mtype in (RTM_NEWLINK, RTM_DELLINK) and off + _NLMSG.size + _IFINFO.size <= len(data):
                _, _, index, flags, _ = _IFINFO.unpack_from(data, off + _NLMSG.size)
                if index == self.ifindex:
                    if mtype == RTM_DELLINK:
                        self._set("deleted")
                    else:
                        self._set("up" if link_is_up(flags) else "down")
            off += (length + 3) & ~3

    def _set(self, state: str) -> None:
        if state == self.state or self.state == "deleted":
            return
        self.state = state
        self.transitions.append(state)
        who = f" ({self.what})" if self.what else ""
        if state == "down":
            log.warning("NIC %s is down%s: no frames flow until it is up again; "
                        "nothing needs to be done here", self.ifname, who)
        elif state == "up":
            log.warning("NIC %s is up again%s: frames flow again", self.ifname, who)
        else:
            log.error("NIC %s was deleted%s: nothing flows any more; detach the VM "
                      "(its steering state is cleaned up then)", self.ifname, who)
        if self.on_change is not None:
            try:
                self.on_change(state)
            except Exception:
                log.exception("link watch callback failed")

    def close(self) -> None:
        """Stop the thread and close the socket (idempotent)."""
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._sock.close()

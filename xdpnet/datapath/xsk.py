"""AF_XDP sockets and UMEMs over guest memory (wrappers of ``c/xsk.c``).

One UMEM per queue pair, each registered over the whole guest-memory
range: the kernel allows one UMEM per (device, queue), and a UMEM whose
first socket was bound cannot be re-bound, so stopping and restarting a
queue pair (GET_VRING_BASE, a new memory table) recreates its UMEM.
Registration pins guest RAM; a second registration of pages already
faulted in takes milliseconds.

A pair's second socket (on the VM's port device) shares the pair's UMEM
(:meth:`XskSocket.bind_shared`, ``XDP_SHARED_UMEM``) with its own fill and
completion rings, so the memory is registered once per pair.  A shared
socket inherits the first socket's mode: a zero-copy UMEM cannot be shared
with a copy-only device (:class:`SharedUmemError`; the caller then
registers a second UMEM).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from xdpnet._native import ffi, lib
from xdpnet.errors import BusyError, MemoryTableError, PrivilegeError, XdpnetError
from xdpnet.memory.umem import GuestMemory

log = logging.getLogger("xdpnet.xsk")

MODE_AUTO, MODE_COPY, MODE_ZEROCOPY = lib.XN_XSK_MODE_AUTO, lib.XN_XSK_MODE_COPY, lib.XN_XSK_MODE_ZEROCOPY
MODE_NAMES = {MODE_COPY: "copy", MODE_ZEROCOPY: "zero-copy"}

MEMLOCK_HINT = ("run as root with CAP_IPC_LOCK, or raise the memlock limit "
                "(ulimit -l / LimitMEMLOCK=infinity) to cover guest RAM")


class Umem:
    """A UMEM registered over a :class:`GuestMemory` range."""

    def __init__(self, memory: GuestMemory, fill_size: int = 4096, comp_size: int = 4096):
        out = ffi.new("struct xn_umem **")
        err = lib.xn_umem_create(out, memory.memmap, fill_size, comp_size)
        if err:
            raise _umem_error(-err, memory)
        self.memory = memory
        self.ptr = out[0]

    def close(self) -> None:
        if self.ptr is not None:
            lib.xn_umem_destroy(self.ptr)
            self.ptr = None


def _umem_error(e: int, memory: GuestMemory) -> XdpnetError:
    mib = memory.size >> 20
    if e == errno.EFAULT:
        return MemoryTableError(f"guest memory ({mib} MiB) cannot be pinned as an AF_XDP UMEM "
                                f"(EFAULT): use -object memory-backend-memfd,share=on or "
                                f"hugetlbfs with share=on")
    if e in (errno.ENOBUFS, errno.ENOMEM, errno.EPERM):
        return MemoryTableError(f"registering {mib} MiB of guest memory as a UMEM failed "
                                f"({errno.errorcode.get(e, e)}): {MEMLOCK_HINT}")
    return MemoryTableError(f"registering guest memory as a UMEM failed: {os.strerror(e)}")


def probe_zerocopy(ifname: str, queue: int) -> bool:
    """True if ``ifname`` queue ``queue`` takes a zero-copy AF_XDP socket."""
    r = lib.xn_xsk_probe_zerocopy(ifname.encode(), queue)
    if r < 0:
        raise _bind_error(-r, ifname, queue)
    return bool(r)


class SharedUmemError(XdpnetError):
    """The UMEM cannot be shared with that device (e.g. zero-copy UMEM, copy-only device)."""


def _bind_error(e: int, ifname: str, queue: int) -> XdpnetError:
    if e == errno.EBUSY:
        return BusyError(f"{ifname} queue {queue} is already bound to another AF_XDP socket")
    if e in (errno.EPERM, errno.EACCES):
        return PrivilegeError(f"binding an AF_XDP socket on {ifname} needs CAP_NET_RAW, "
                              f"CAP_NET_ADMIN and CAP_BPF (run as root)")
    if e in (errno.ENODEV, errno.ENXIO):
        return XdpnetError(f"{ifname} has no queue {queue}")
    return XdpnetError(f"cannot bind an AF_XDP socket on {ifname} queue {queue}: {os.strerror(e)}")


@dataclass
class XskSocket:
    """One AF_XDP socket bound on a device queue, on a :class:`Umem`."""

    ptr: object
    umem: Umem
    ifname: str
    queue: int
    zerocopy: bool
    shared: bool = False        # bound with XDP_SHARED_UMEM beside the UMEM's first socket

    @classmethod
    def bind(cls, umem: Umem, ifname: str, queue: int, *, zerocopy: bool,
             ring_size: int = 2048) -> "XskSocket":
        out = ffi.new("struct xn_xsk **")
        mode = MODE_ZEROCOPY if zerocopy else MODE_COPY
        err = lib.xn_xsk_create(out, umem.ptr, ifname.encode(), queue, ring_size, mode)
        if err:
            raise _bind_error(-err, ifname, queue)
        return cls(out[0], umem, ifname, queue, zerocopy)

    @classmethod
    def bind_shared(cls, umem: Umem, ifname: str, queue: int, *,
                    ring_size: int = 2048) -> "XskSocket":
        """One more socket over ``umem``'s memory, on another device or queue.

        ``umem`` must have a socket already (:meth:`bind`); the new one
        gets its own fill and completion rings and the first one's mode.
        Raises :class:`SharedUmemError` if the kernel refuses to share
        (EOPNOTSUPP, EINVAL, EPROTONOSUPPORT), else the errors of :meth:`bind`.
        """
        out = ffi.new("struct xn_xsk **")
        err = lib.xn_xsk_create_shared(out, umem.ptr, ifname.encode(), queue, ring_size)
        if -err in (errno.EOPNOTSUPP, errno.EINVAL, errno.EPROTONOSUPPORT):
            raise SharedUmemError(f"cannot share the UMEM with {ifname} queue {queue}: "
                                  f"{os.strerror(-err)}")
        if err:
            raise _bind_error(-err, ifname, queue)
        return cls(out[0], umem, ifname, queue, bool(lib.xn_xsk_is_zerocopy(out[0])),
                   shared=True)

    @property
    def fd(self) -> int:
        return lib.xn_xsk_fd(self.ptr)

    def close(self) -> None:
        """Unbind; once this returns the kernel writes no more frames."""
        if self.ptr is not None:
            lib.xn_xsk_destroy(self.ptr)
            self.ptr = None

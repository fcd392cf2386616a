"""Validation of a vhost-user memory table before anything is mapped.

Guest RAM becomes an AF_XDP UMEM, and registering a UMEM pins the pages
that back it at that moment (``../shared/FACTS.md``).  Only memory that is
shared with the guest and can be pinned is accepted:

* the file is a memfd / tmpfs file or a hugetlbfs file (a file on a disk
  filesystem fails registration with EFAULT; the guest would never see
  frames written to pinned copies of a private mapping);
* the fd is open read-write and not sealed against writes;
* the file is at least ``mmap_offset + size`` long (mapping past the end
  of a file gives SIGBUS on access: DPDK's vhost library crashed there);
* regions do not overlap in guest-physical or frontend address space and
  there are at most 8.

Each refusal is a :class:`~xdpnet.errors.MemoryTableError` whose message
names the region and the fix.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass

from xdpnet.errors import MemoryTableError
from xdpnet.vhost.protocol import MAX_MEM_REGIONS, MemRegion

TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
HUGE_PAGE_SIZE = 2 << 20

F_ADD_SEALS = 1033
F_GET_SEALS = 1034
F_SEAL_SHRINK = 0x0002
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010

FIX_HINT = ("use -object memory-backend-memfd,id=mem,size=...,share=on -numa node,memdev=mem "
            "(or memory-backend-file on hugetlbfs with share=on)")


@dataclass(frozen=True)
class GuestRegion:
    """A memory-table entry that passed validation, with its backing kind."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int
    fd: int                 # owned by the GuestMemory that maps it
    hugetlb: bool

    @property
    def page_size(self) -> int:
        return HUGE_PAGE_SIZE if self.hugetlb else PAGE_SIZE


def _fs_type(fd: int) -> int:
    from xdpnet._native import lib

    t = lib.xn_mem_fs_type(fd)
    if t < 0:
        raise OSError(-t, os.strerror(-t))
    return t


def _overlaps(a_start: int, a_size: int, b_start: int, b_size: int) -> bool:
    return a_start < b_start + b_size and b_start < a_start + a_size


def check_region(i: int, r: MemRegion, fd: int) -> GuestRegion:
    """Validate one region and its fd; returns it as a :class:`GuestRegion`.

    Raises :class:`MemoryTableError` naming region ``i`` and the reason.
    """
    where = f"memory region {i} (gpa 0x{r.guest_addr:x}, size 0x{r.size:x})"
    if r.size == 0:
        raise MemoryTableError(f"{where}: size is 0")
    if r.guest_addr + r.size > 1 << 64 or r.user_addr + r.size > 1 << 64:
        raise MemoryTableError(f"{where}: address range wraps around")
    try:
        fs = _fs_type(fd)
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as e:
        raise MemoryTableError(f"{where}: cannot inspect its fd: {e.strerror}") from None
    if fs not in (TMPFS_MAGIC, HUGETLBFS_MAGIC):
        raise MemoryTableError(
            f"{where}: backed by a file on a filesystem (magic 0x{fs:x}) that cannot be "
            f"pinned as an AF_XDP UMEM; {FIX_HINT}")
    hugetlb = fs == HUGETLBFS_MAGIC
    if flags & os.O_ACCMODE != os.O_RDWR:
        raise MemoryTableError(f"{where}: fd is not open read-write; {FIX_HINT}")
    try:
        seals = fcntl.fcntl(fd, F_GET_SEALS)
    except OSError:
        seals = 0
    if seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
        raise MemoryTableError(f"{where}: memfd is sealed against writes; {FIX_HINT}")
    page = HUGE_PAGE_SIZE if hugetlb else PAGE_SIZE
    if r.mmap_offset % page:
        raise MemoryTableError(f"{where}: mmap_offset 0x{r.mmap_offset:x} is not "
                               f"{page // 1024} KiB aligned")
    if st.st_size < r.mmap_offset + r.size:
        raise MemoryTableError(
            f"{where}: extends past the end of its file (offset 0x{r.mmap_offset:x} + size "
            f"0x{r.size:x} > file size 0x{st.st_size:x})")
    return GuestRegion(r.guest_addr, r.size, r.user_addr, r.mmap_offset, fd, hugetlb)


def seal_against_shrinking(fd: int) -> bool:
    """Forbid shrinking the file behind ``fd``; True if it is (now) sealed.

    The backend reads the virtqueues through its own mapping of guest
    memory: a frontend that truncated the file afterwards would turn those
    reads into SIGBUS.  QEMU's memory-backend-memfd seals shrinking itself
    (``seal=on``, the default); for a memfd created without the seal but
    with sealing allowed we add it.  tmpfs and hugetlbfs files cannot be
    sealed: their frontend is trusted not to truncate guest RAM.
    """
    try:
        fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK)
    except OSError:
        try:
            return bool(fcntl.fcntl(fd, F_GET_SEALS) & F_SEAL_SHRINK)
        except OSError:
            return False
    return True


def check_table(regions: list[MemRegion], fds: list[int],
                max_regions: int = MAX_MEM_REGIONS) -> list[GuestRegion]:
    """Validate a whole memory table (sizes, files, overlaps).

    Returns the regions in table order; raises :class:`MemoryTableError`.
    """
    if not regions:
        raise MemoryTableError("memory table is empty")
    if len(regions) > max_regions:
        raise MemoryTableError(f"memory table has {len(regions)} regions, at most "
                               f"{max_regions} are supported")
    if len(fds) != len(regions):
        raise MemoryTableError(f"memory table has {len(regions)} regions but {len(fds)} fds")
    out = [check_region(i, r, fd) for i, (r, fd) in enumerate(zip(regions, fds))]
    for i, a in enumerate(out):
        for j in range(i):
            b = out[j]
            if _overlaps(a.gpa, a.size, b.gpa, b.size):
                raise MemoryTableError(f"memory regions {j} and {i} overlap in guest-physical "
                                       f"space (0x{b.gpa:x}+0x{b.size:x}, 0x{a.gpa:x}+0x{a.size:x})")
            if _overlaps(a.uva, a.size, b.uva, b.size):
                raise MemoryTableError(f"memory regions {j} and {i} overlap in the frontend's "
                                       f"address space (0x{b.uva:x}, 0x{a.uva:x})")
    return out

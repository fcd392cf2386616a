"""Guest memory as the UMEM: layout, mapping and address translation.

The layout of the one virtual range registered as the UMEM::

    [lead pad 2 MiB][region 0][pad][region 1][pad] ... [bounce area]

* every region starts 2 MiB aligned (hugetlb regions must) and the gaps
  are anonymous memory (a PROT_NONE hole makes registration fail);
* the lead pad keeps ``buffer + 12 - 256 - headroom`` non-negative for a
  guest buffer at the very start of RAM;
* the bounce area, owned by the backend, holds chunk-sized slots for
  frames that need one copy (short or multi-piece guest buffers).

The frame geometry: chunk 2048, largest frame ``max_frame`` (1518 by
default), UMEM headroom ``chunk - 256 - max_frame``: the kernel refuses
to write a longer frame, so a guest buffer of ``12 + max_frame`` bytes can
never be overrun.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from xdpnet.errors import MemoryTableError, UsageError
from xdpnet.memory.regions import GuestRegion, check_table, seal_against_shrinking
from xdpnet.vhost.protocol import MemRegion

log = logging.getLogger("xdpnet.memory")

LEAD_PAD = 2 << 20
ALIGN = 2 << 20


def _align_up(v: int, a: int) -> int:
    return (v + a - 1) // a * a


@dataclass(frozen=True)
class FrameGeometry:
    """Chunk size and frame cap of a UMEM (one cap per VM)."""

    chunk_size: int = 2048
    max_frame: int = 1518

    def __post_init__(self) -> None:
        from xdpnet._native import lib

        if self.max_frame < 60 or self.headroom < 0:
            raise UsageError(f"max frame {self.max_frame} does not fit a "
                              f"{self.chunk_size}-byte chunk with {lib.XN_XDP_HEADROOM} bytes "
                              f"of XDP headroom")

    @property
    def headroom(self) -> int:
        """UMEM headroom: what makes max_frame a kernel-enforced cap."""
        from xdpnet._native import lib

        return self.chunk_size - lib.XN_XDP_HEADROOM - self.max_frame

    @property
    def min_direct_buffer(self) -> int:
        """Smallest guest rx buffer that may go to the fill ring as is."""
        from xdpnet._native import lib

        return lib.XN_VNET_HDR_LEN + self.max_frame


@dataclass(frozen=True)
class PlacedRegion:
    """A region and where it sits in the UMEM range."""

    region: GuestRegion
    umem_off: int
    map_size: int


@dataclass(frozen=True)
class UmemLayout:
    """Where every piece of the UMEM range goes (pure computation)."""

    regions: tuple[PlacedRegion, ...]
    bounce_off: int
    bounce_slots: int
    size: int
    geometry: FrameGeometry

    @classmethod
    def plan(cls, regions: list[GuestRegion], bounce_slots: int,
             geometry: FrameGeometry) -> "UmemLayout":
        """Place ``regions`` after the lead pad, each 2 MiB aligned."""
        off = LEAD_PAD
        placed = []
        for r in regions:
            map_size = _align_up(r.size, r.page_size)
            placed.append(PlacedRegion(r, off, map_size))
            off = _align_up(off + map_size, ALIGN)
        bounce_off = off
        size = _align_up(bounce_off + bounce_slots * geometry.chunk_size + geometry.chunk_size,
                         ALIGN)
        return cls(tuple(placed), bounce_off, bounce_slots, size, geometry)


@dataclass
class GuestMemory:
    """Guest RAM mapped into one range, ready to be registered as UMEMs.

    Owns the mapping and dup()s of the region fds (kept to watch the
    files later); :meth:`close` releases everything.
    """

    layout: UmemLayout
    base: int                               # address of the range
    memmap: object                          # cffi struct xn_memmap *
    fds: list[int] = field(default_factory=list)
    closed: bool = False

    @classmethod
    def map(cls, regions: list[MemRegion], fds: list[int], *, bounce_slots: int = 1024,
            geometry: FrameGeometry = FrameGeometry()) -> "GuestMemory":
        """Validate and map a memory table; nothing stays mapped on error.

        ``fds`` remain owned by the caller (they are dup()ed).
        """
        from xdpnet._native import ffi, lib

        checked = check_table(regions, fds)
        layout = UmemLayout.plan(checked, bounce_slots, geometry)
        out = ffi.new("uint8_t **")
        err = lib.xn_mem_reserve(layout.size, ALIGN, out)
        if err:
            raise MemoryTableError(f"cannot reserve {layout.size >> 20} MiB of address space: "
                                   f"{os.strerror(-err)}")
        base = out[0]
        dups: list[int] = []
        try:
            cursor = 0
            for i, p in enumerate(layout.regions):
                if not seal_against_shrinking(p.region.fd):
                    log.debug("memory region %d: file cannot be sealed against shrinking", i)
                if p.umem_off > cursor:
                    cls._anon(base, cursor, p.umem_off - cursor)
                err = lib.xn_mem_map_fd(base + p.umem_off, p.map_size, p.region.fd,
                                        p.region.mmap_offset)
                if err:
                    raise MemoryTableError(f"memory region {i}: mmap failed: {os.strerror(-err)}")
                cursor = p.umem_off + p.map_size
                dups.append(os.dup(p.region.fd))
            cls._anon(base, cursor, layout.size - cursor)
        except BaseException:
            lib.xn_mem_unmap(base, layout.size)
            for fd in dups:
                os.close(fd)
            raise
        mm = ffi.new("struct xn_memmap *")
        mm.base = base
        mm.size = layout.size
        mm.nregions = len(layout.regions)
        mm.chunk_size = geometry.chunk_size
        mm.headroom = geometry.headroom
        mm.max_frame = geometry.max_frame
        mm.bounce_off = layout.bounce_off
        mm.bounce_slots = layout.bounce_slots
        for i, p in enumerate(layout.regions):
            mm.regions[i].gpa = p.region.gpa
            mm.regions[i].uva = p.region.uva
            mm.regions[i].size = p.region.size
            mm.regions[i].umem_off = p.umem_off
        return cls(layout, int(ffi.cast("uintptr_t", base)), mm, dups)

    @staticmethod
    def _anon(base, off: int, size: int) -> None:
        from xdpnet._native import lib

        if size <= 0:
            return
        err = lib.xn_mem_map_anon(base + off, size)
        if err:
            raise MemoryTableError(f"cannot map {size} bytes of padding: {os.strerror(-err)}")

    # -- translation -------------------------------------------------------

    def uva_to_off(self, uva: int, size: int) -> int | None:
        """UMEM offset of a frontend user-address range inside one region."""
        return self._to_off("uva", uva, size)

    def gpa_to_off(self, gpa: int, size: int) -> int | None:
        """UMEM offset of a guest-physical range inside one region (the
        datapath does this in C, xn_translate(); this one is for tests)."""
        return self._to_off("gpa", gpa, size)

    def _to_off(self, space: str, addr: int, size: int) -> int | None:
        for p in self.layout.regions:
            start = getattr(p.region, space)
            if start <= addr and addr + size <= start + p.region.size:
                return p.umem_off + (addr - start)
        return None

    def read(self, off: int, size: int) -> bytes:
        """Bytes at a UMEM offset (tests and debugging)."""
        from xdpnet._native import ffi

        return bytes(ffi.buffer(self.memmap.base + off, size))

    @property
    def size(self) -> int:
        return self.layout.size

    def close(self) -> None:
        """Unmap the range and close the dup()ed fds (idempotent)."""
        from xdpnet._native import lib

        if self.closed:
            return
        self.closed = True
        lib.xn_mem_unmap(self.memmap.base, self.layout.size)
        for fd in self.fds:
            os.close(fd)
        self.fds = []

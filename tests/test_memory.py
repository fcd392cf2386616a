"""Guest memory: validation of memory tables, the UMEM layout, mapping.

Real memfds, real mappings and real UMEM registrations; no mocks.
"""

import fcntl
import os

import pytest

from xdpnet.datapath.xsk import Umem
from xdpnet.errors import MemoryTableError
from xdpnet.memory.umem import LEAD_PAD, FrameGeometry, GuestMemory
from xdpnet.vhost.protocol import MemRegion

MiB = 1 << 20


def memfd(size: int, name: str = "guest", flags: int = os.MFD_CLOEXEC) -> int:
    fd = os.memfd_create(name, flags)
    os.ftruncate(fd, size)
    return fd


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_geometry_caps_frames_to_the_guest_buffer():
    g = FrameGeometry()
    assert g.chunk_size - 256 - g.headroom == g.max_frame == 1518
    assert g.min_direct_buffer == 1530


def test_two_regions_map_and_translate():
    fd = memfd(8 * MiB)
    regs = [MemRegion(0, 4 * MiB, 0x7F0000000000, 0),
            MemRegion(0x100000000, 4 * MiB, 0x7F0100000000, 4 * MiB)]
    mem = GuestMemory.map(regs, [fd, fd])
    try:
        assert mem.layout.regions[0].umem_off == LEAD_PAD
        assert mem.layout.regions[1].umem_off % (2 * MiB) == 0
        assert mem.gpa_to_off(0x100000000 + 16, 8) == mem.layout.regions[1].umem_off + 16
        assert mem.uva_to_off(0x7F0000000000 + 4 * MiB - 4, 8) is None   # crosses the end
        # What the backend maps is what the guest sees: write through the memfd.
        os.pwrite(fd, b"hello", 4 * MiB + 100)
        assert mem.read(mem.layout.regions[1].umem_off + 100, 5) == b"hello"
        u = Umem(mem)
        u.close()
    finally:
        mem.close()
        os.close(fd)


def test_region_longer_than_its_file_is_refused():
    fd = memfd(4 * MiB)
    before = open_fds()
    with pytest.raises(MemoryTableError, match="past the end of its file"):
        GuestMemory.map([MemRegion(0, 8 * MiB, 0x1000000, 0)], [fd])
    assert open_fds() == before
    os.close(fd)


def test_overlapping_regions_are_refused():
    fd = memfd(8 * MiB)
    with pytest.raises(MemoryTableError, match="overlap in guest-physical"):
        GuestMemory.map([MemRegion(0, 4 * MiB, 0x1000000, 0),
                         MemRegion(2 * MiB, 4 * MiB, 0x9000000, 4 * MiB)], [fd, fd])
    with pytest.raises(MemoryTableError, match="overlap in the frontend"):
        GuestMemory.map([MemRegion(0, 4 * MiB, 0x1000000, 0),
                         MemRegion(16 * MiB, 4 * MiB, 0x1200000, 4 * MiB)], [fd, fd])
    os.close(fd)


def test_disk_backed_file_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "ram"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(MemoryTableError, match="memory-backend-memfd"):
            GuestMemory.map([MemRegion(0, 4 * MiB, 0x1000000, 0)], [fd])
    finally:
        os.close(fd)


def test_write_sealed_memfd_is_refused():
    fd = memfd(4 * MiB, flags=os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    fcntl.fcntl(fd, 1033, 0x0008)       # F_ADD_SEALS, F_SEAL_WRITE
    try:
        with pytest.raises(MemoryTableError, match="sealed against writes"):
            GuestMemory.map([MemRegion(0, 4 * MiB, 0x1000000, 0)], [fd])
    finally:
        os.close(fd)


def test_read_only_fd_is_refused():
    fd = memfd(4 * MiB)
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    try:
        with pytest.raises(MemoryTableError, match="read-write"):
            GuestMemory.map([MemRegion(0, 4 * MiB, 0x1000000, 0)], [ro])
    finally:
        os.close(ro)
        os.close(fd)

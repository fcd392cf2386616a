"""Unit tests of the vhost-user wire format (xdpnet.vhost.protocol): packing and parsing only."""

from __future__ import annotations

import ctypes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xdpnet.vhost import protocol as p
from xdpnet.vhost.protocol import (
    FLAG_NEED_REPLY, FLAG_REPLY, HEADER_SIZE, MemRegion, ProtocolFeature, Request, VirtioFeature,
    VringAddr,
)

u64s = st.integers(0, 2**64 - 1)
u32s = st.integers(0, 2**32 - 1)


# --- C layouts the structs must match (QEMU's hw/virtio/vhost-user.c) -------

class _CMemRegion(ctypes.Structure):
    _fields_ = [("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64), ("mmap_offset", ctypes.c_uint64)]


class _CMemory(ctypes.Structure):
    _fields_ = [("nregions", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                ("regions", _CMemRegion * 8)]


class _CVringAddr(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint), ("flags", ctypes.c_uint),
                ("desc_user_addr", ctypes.c_uint64), ("used_user_addr", ctypes.c_uint64),
                ("avail_user_addr", ctypes.c_uint64), ("log_guest_addr", ctypes.c_uint64)]


class _CInflight(ctypes.Structure):
    _fields_ = [("mmap_size", ctypes.c_uint64), ("mmap_offset", ctypes.c_uint64),
                ("num_queues", ctypes.c_uint16), ("queue_size", ctypes.c_uint16)]


def test_struct_sizes_match_the_c_layouts():
    assert HEADER_SIZE == 12
    assert p.U64.size == 8
    assert p.VRING_STATE.size == 8
    assert p.VRING_ADDR.size == ctypes.sizeof(_CVringAddr) == 40
    assert p.MEM_REGION.size == ctypes.sizeof(_CMemRegion) == 32
    assert p.MEM_TABLE_MAX_SIZE == ctypes.sizeof(_CMemory) == 264
    # protocol.INFLIGHT is the packed 20 bytes; QEMU compares against the padded C size.
    assert p.INFLIGHT.size == 20
    assert p.INFLIGHT_C_SIZE == ctypes.sizeof(_CInflight) == 24


# --- header -----------------------------------------------------------------

def test_pack_message_sets_version_and_size():
    data = p.pack_message(Request.SET_FEATURES, b"\x01" * 8, FLAG_NEED_REPLY)
    hdr = p.unpack_header(data[:HEADER_SIZE])
    assert hdr == p.Header(Request.SET_FEATURES, p.VERSION | FLAG_NEED_REPLY, 8)
    assert hdr.version == 1 and hdr.need_reply and not hdr.is_reply
    assert data[HEADER_SIZE:] == b"\x01" * 8


def test_pack_reply_has_exactly_version_and_reply_flags():
    # QEMU rejects a reply whose flags are anything but REPLY|VERSION.
    data = p.pack_reply(Request.GET_FEATURES, p.pack_u64(5))
    hdr = p.unpack_header(data[:HEADER_SIZE])
    assert hdr.flags == FLAG_REPLY | p.VERSION
    assert hdr.is_reply and not hdr.need_reply
    assert hdr.size == 8 and p.unpack_u64(data[HEADER_SIZE:]) == 5


@pytest.mark.parametrize("n", [0, 1, 11, 13])
def test_unpack_header_rejects_wrong_length(n):
    with pytest.raises(ValueError, match="header"):
        p.unpack_header(b"\0" * n)


@given(u32s, u32s, u32s)
def test_header_round_trip(request_, flags, size):
    hdr = p.unpack_header(p.HEADER.pack(request_, flags, size))
    assert (hdr.request, hdr.flags, hdr.size) == (request_, flags, size)
    assert hdr.version == flags & 3
    assert hdr.need_reply == bool(flags & 8)


def test_flag_names():
    assert p.flag_names(p.VERSION) == "v1"
    assert p.flag_names(p.VERSION | FLAG_NEED_REPLY) == "v1|NEED_REPLY"
    assert p.flag_names(p.VERSION | FLAG_REPLY | 0x100) == "v1|REPLY|0x100"
    assert p.flag_names(2) == "v2"


# --- names ------------------------------------------------------------------

def test_request_name_known_and_unknown():
    assert p.request_name(11) == "GET_VRING_BASE"
    assert p.request_name(Request.RESET_DEVICE) == "RESET_DEVICE"
    assert p.request_name(0) == "UNKNOWN(0)"
    assert p.request_name(999) == "UNKNOWN(999)"


def test_feature_names():
    bits = p.bit(VirtioFeature.VERSION_1) | p.bit(VirtioFeature.NET_MRG_RXBUF) | p.bit(63)
    assert p.feature_names(bits) == ["NET_MRG_RXBUF", "VERSION_1", "bit63"]
    assert p.feature_names(p.bit(26)) == ["LOG_ALL"]
    assert p.feature_names(0b1001, ProtocolFeature) == ["MQ", "REPLY_ACK"]
    assert p.feature_names(0) == []
    assert p.VERSION_1_BIT == 1 << 32 and p.PROTOCOL_FEATURES_BIT == 1 << 30


# --- payloads ---------------------------------------------------------------

def test_u64():
    assert p.unpack_u64(p.pack_u64(2**64 - 1)) == 2**64 - 1
    for bad in (b"", b"\0" * 7, b"\0" * 9):
        with pytest.raises(ValueError, match="u64"):
            p.unpack_u64(bad)


@given(u32s, u32s)
def test_vring_state_round_trip(index, num):
    assert p.unpack_vring_state(p.VringStateMsg(index, num).pack()) == p.VringStateMsg(index, num)


@pytest.mark.parametrize("n", [0, 4, 7, 9, 16])
def test_vring_state_wrong_size(n):
    with pytest.raises(ValueError, match="vring state"):
        p.unpack_vring_state(b"\0" * n)


def test_vring_file_bits():
    f = p.unpack_vring_file(p.pack_u64(0x105))
    assert (f.index, f.nofd, f.reserved) == (5, True, 0)
    f = p.unpack_vring_file(p.pack_u64(0xFF))
    assert (f.index, f.nofd, f.reserved) == (255, False, 0)
    f = p.unpack_vring_file(p.pack_u64(0x200 | 1))
    assert (f.index, f.nofd, f.reserved) == (1, False, 0x200)
    assert p.unpack_vring_file(f.pack()) == f
    with pytest.raises(ValueError):
        p.unpack_vring_file(b"\0" * 4)


@given(u32s, u32s, u64s, u64s, u64s, u64s)
def test_vring_addr_round_trip(index, flags, desc, used, avail, log):
    a = VringAddr(index, flags, desc, used, avail, log)
    assert p.unpack_vring_addr(a.pack()) == a


def test_vring_addr_field_order():
    # index, flags, desc, used, avail, log - as in struct vhost_vring_addr
    c = _CVringAddr(1, 2, 3, 4, 5, 6)
    a = p.unpack_vring_addr(bytes(c))
    assert (a.index, a.flags, a.desc, a.used, a.avail, a.log) == (1, 2, 3, 4, 5, 6)
    with pytest.raises(ValueError, match="vring address"):
        p.unpack_vring_addr(bytes(c)[:32])


regions_st = st.lists(st.builds(MemRegion, u64s, u64s, u64s, u64s), min_size=1, max_size=8)


@given(regions_st)
def test_mem_table_round_trip(regions):
    payload = p.pack_mem_table(regions)
    assert len(payload) == 8 + 32 * len(regions)
    assert p.unpack_mem_table(payload) == regions
    # QEMU-sized payloads (room for 8 regions) parse the same.
    assert p.unpack_mem_table(payload.ljust(p.MEM_TABLE_MAX_SIZE, b"\0")) == regions


def test_mem_table_matches_c_layout():
    m = _CMemory(2, 0)
    m.regions[0] = _CMemRegion(0x0, 0x1000, 0x7F00_0000_0000, 0)
    m.regions[1] = _CMemRegion(0x1_0000_0000, 0x2000, 0x7F10_0000_0000, 0x3000)
    regions = p.unpack_mem_table(bytes(m))
    assert regions == [MemRegion(0x0, 0x1000, 0x7F00_0000_0000, 0),
                       MemRegion(0x1_0000_0000, 0x2000, 0x7F10_0000_0000, 0x3000)]


@pytest.mark.parametrize("payload, match", [
    (b"", "too short"),
    (p.MEM_TABLE_HEAD.pack(0, 0), "0 regions"),
    (p.MEM_TABLE_HEAD.pack(9, 0) + b"\0" * 288, "9 regions"),
    (p.MEM_TABLE_HEAD.pack(2, 0) + b"\0" * 32, "needs 72 bytes"),
])
def test_mem_table_malformed(payload, match):
    with pytest.raises(ValueError, match=match):
        p.unpack_mem_table(payload)

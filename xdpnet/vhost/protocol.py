"""vhost-user wire format (QEMU docs/interop/vhost-user.rst).

Pure data: request numbers, feature bits, the message header and the
payload layouts, with pack/unpack helpers.  Used by the backend's server
(:mod:`xdpnet.vhost.server`) and by the driver simulator's frontend
(:mod:`xdpnet.guest`).  Nothing here does I/O.
"""

from __future__ import annotations

import array
import enum
import socket
import struct
from dataclasses import dataclass

# --- message header ----------------------------------------------------

HEADER = struct.Struct("<III")          # request, flags, size
HEADER_SIZE = HEADER.size               # 12
VERSION = 0x1                           # flags bits 0..1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
VERSION_MASK = 0x3
MAX_PAYLOAD = 4096                      # larger than any request we accept
MAX_FDS = 8                             # SCM_RIGHTS fds in one message


class Request(enum.IntEnum):
    """Front-end → back-end request numbers."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


def request_name(num: int) -> str:
    """Name of request ``num`` for logs (``UNKNOWN(n)`` if not defined)."""
    try:
        return Request(num).name
    except ValueError:
        return f"UNKNOWN({num})"


class ProtocolFeature(enum.IntEnum):
    """VHOST_USER_PROTOCOL_F_* bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


class VirtioFeature(enum.IntEnum):
    """Virtio feature bit numbers that matter to a net backend."""

    NET_CSUM = 0
    NET_GUEST_CSUM = 1
    NET_MTU = 3
    NET_MAC = 5
    NET_GUEST_TSO4 = 7
    NET_HOST_TSO4 = 11
    NET_MRG_RXBUF = 15
    NET_STATUS = 16
    NET_CTRL_VQ = 17
    NET_MQ = 22
    LOG_ALL = 26                    # VHOST_F_LOG_ALL: dirty-page logging for migration
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    PROTOCOL_FEATURES = 30          # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34


def bit(n: int) -> int:
    """1 << n."""
    return 1 << int(n)


def feature_names(bits: int, names: type[enum.IntEnum] = VirtioFeature) -> list[str]:
    """Names of the bits set in ``bits`` (unknown bits as ``bit<n>``)."""
    out = []
    for n in range(64):
        if bits & (1 << n):
            try:
                out.append(names(n).name)
            except ValueError:
                out.append(f"bit{n}")
    return out


# --- payloads ----------------------------------------------------------

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")              # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")           # index, flags, desc, used, avail, log
MEM_REGION = struct.Struct("<QQQQ")             # guest_addr, size, user_addr, mmap_offset
MEM_TABLE_HEAD = struct.Struct("<II")           # num_regions, padding
SINGLE_MEM_REGION = struct.Struct("<QQQQQ")     # padding, region
INFLIGHT = struct.Struct("<QQHH")               # mmap_size, mmap_offset, num_queues, queue_size

VRING_IDX_MASK = 0xFF                           # kick/call/err payload: index in bits 0..7
VRING_NOFD_MASK = 1 << 8                        # ... and "no fd" in bit 8
VRING_F_LOG = 1 << 0                            # SET_VRING_ADDR flags
MAX_MEM_REGIONS = 8


@dataclass(frozen=True)
class Header:
    """The 12-byte message header."""

    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def version(self) -> int:
        return self.flags & VERSION_MASK


def unpack_header(data: bytes) -> Header:
    """Parse a header; raises ``ValueError`` on a short buffer."""
    if len(data) != HEADER_SIZE:
        raise ValueError(f"header is {len(data)} bytes, expected {HEADER_SIZE}")
    return Header(*HEADER.unpack(data))


def pack_message(request: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """Header + payload, with the protocol version set in ``flags``."""
    return HEADER.pack(int(request), VERSION | flags, len(payload)) + payload


@dataclass(frozen=True)
class MemRegion:
    """One memory-table entry."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int

    def pack(self) -> bytes:
        return MEM_REGION.pack(self.guest_addr, self.size, self.user_addr, self.mmap_offset)


@dataclass(frozen=True)
class VringAddr:
    """SET_VRING_ADDR payload (addresses in the frontend's user space)."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int

    def pack(self) -> bytes:
        return VRING_ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)


def pack_mem_table(regions: list[MemRegion]) -> bytes:
    """SET_MEM_TABLE payload."""
    return MEM_TABLE_HEAD.pack(len(regions), 0) + b"".join(r.pack() for r in regions)


def unpack_mem_table(payload: bytes) -> list[MemRegion]:
    """Parse a SET_MEM_TABLE payload; ``ValueError`` if malformed."""
    if len(payload) < MEM_TABLE_HEAD.size:
        raise ValueError(f"memory table payload is {len(payload)} bytes, too short")
    n, _ = MEM_TABLE_HEAD.unpack_from(payload)
    if n == 0 or n > MAX_MEM_REGIONS:
        raise ValueError(f"memory table has {n} regions (1..{MAX_MEM_REGIONS} allowed)")
    need = MEM_TABLE_HEAD.size + n * MEM_REGION.size
    # QEMU always sends room for 8 regions; accept any size that holds n.
    if len(payload) < need:
        raise ValueError(f"memory table of {n} regions needs {need} bytes, got {len(payload)}")
    return [MemRegion(*MEM_REGION.unpack_from(payload, MEM_TABLE_HEAD.size + i * MEM_REGION.size))
            for i in range(n)]


def unpack_vring_addr(payload: bytes) -> VringAddr:
    """Parse a SET_VRING_ADDR payload; ``ValueError`` if the size is wrong."""
    if len(payload) != VRING_ADDR.size:
        raise ValueError(f"vring address payload is {len(payload)} bytes, expected {VRING_ADDR.size}")
    return VringAddr(*VRING_ADDR.unpack(payload))


# --- helpers added for the server (xdpnet.vhost.server) ----------------

VERSION_1_BIT = 1 << VirtioFeature.VERSION_1
PROTOCOL_FEATURES_BIT = 1 << VirtioFeature.PROTOCOL_FEATURES
# Largest SET_MEM_TABLE payload: head + MAX_MEM_REGIONS regions (QEMU's
# sizeof(VhostUserMemory)).  Frontends send 8 + 32 * n; never more than this.
MEM_TABLE_MAX_SIZE = MEM_TABLE_HEAD.size + MAX_MEM_REGIONS * MEM_REGION.size
# A VhostUserInflight as a C compiler lays it out: INFLIGHT (20 bytes)
# padded to 8-byte alignment.  QEMU checks the reply size against 24.
INFLIGHT_C_SIZE = 24
# Kick/call/err payload: only bits 0..8 carry meaning.
VRING_FILE_RESERVED_MASK = ~(VRING_IDX_MASK | VRING_NOFD_MASK) & 0xFFFF_FFFF_FFFF_FFFF
# Largest virtqueue size (virtio 1.x: Queue Size is at most 32768).
MAX_QUEUE_SIZE = 32768


def flag_names(flags: int) -> str:
    """Header flags as text for logs, e.g. ``v1|NEED_REPLY`` (unknown bits in hex)."""
    parts = [f"v{flags & VERSION_MASK}"]
    if flags & FLAG_REPLY:
        parts.append("REPLY")
    if flags & FLAG_NEED_REPLY:
        parts.append("NEED_REPLY")
    rest = flags & ~(VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY)
    if rest:
        parts.append(f"0x{rest:x}")
    return "|".join(parts)


def pack_reply(request: int, payload: bytes = b"") -> bytes:
    """A back-end reply: header with version and REPLY set (NEED_REPLY clear), then ``payload``."""
    return HEADER.pack(int(request), VERSION | FLAG_REPLY, len(payload)) + payload


def pack_u64(value: int) -> bytes:
    """A ``u64`` payload."""
    return U64.pack(value)


def unpack_u64(payload: bytes) -> int:
    """Parse a ``u64`` payload; ``ValueError`` if it is not exactly 8 bytes."""
    if len(payload) != U64.size:
        raise ValueError(f"u64 payload is {len(payload)} bytes, expected {U64.size}")
    return U64.unpack(payload)[0]


@dataclass(frozen=True)
class VringStateMsg:
    """A vring state payload (SET_VRING_NUM/BASE/ENABLE, GET_VRING_BASE)."""

    index: int
    num: int

    def pack(self) -> bytes:
        return VRING_STATE.pack(self.index, self.num)


def unpack_vring_state(payload: bytes) -> VringStateMsg:
    """Parse a vring state payload; ``ValueError`` if it is not exactly 8 bytes."""
    if len(payload) != VRING_STATE.size:
        raise ValueError(f"vring state payload is {len(payload)} bytes, expected {VRING_STATE.size}")
    return VringStateMsg(*VRING_STATE.unpack(payload))


@dataclass(frozen=True)
class VringFile:
    """A kick/call/err payload: vring index (bits 0..7) and the "no fd" flag (bit 8)."""

    index: int
    nofd: bool
    reserved: int               # bits 9..63: must be zero

    def pack(self) -> bytes:
        return U64.pack((self.index & VRING_IDX_MASK) | (VRING_NOFD_MASK if self.nofd else 0)
                        | self.reserved)


def unpack_vring_file(payload: bytes) -> VringFile:
    """Parse a SET_VRING_KICK/CALL/ERR payload; ``ValueError`` if it is not exactly 8 bytes."""
    value = unpack_u64(payload)
    return VringFile(index=value & VRING_IDX_MASK, nofd=bool(value & VRING_NOFD_MASK),
                     reserved=value & VRING_FILE_RESERVED_MASK)


# --- file descriptors (SCM_RIGHTS) ----------------------------------------

FD_SIZE = array.array("i").itemsize
ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS * FD_SIZE)   # room for MAX_FDS fds


def fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The SCM_RIGHTS fds in a ``recvmsg()`` ancillary list (a truncated
    cmsg may end in a partial int: it is dropped)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % FD_SIZE])
            fds.extend(arr)
    return fds

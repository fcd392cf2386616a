"""The virtio-net driver simulator ("the guest"): QEMU plus a guest driver.

:class:`VirtioNetSimulator` owns guest memory (a memfd), negotiates with a
vhost-user backend like QEMU does, lays out split virtqueues and buffers
in guest memory, and hands every queue pair to the C driver in
``c/guest.c`` (``struct xn_guest``), which does all per-frame work with
the GIL released::

    with VirtioNetSimulator("/tmp/vhost.sock") as sim:
        sim.connect(timeout=5.0)
        sim.start()
        sim.send(32, length=64)
        sim.poll(timeout=1.0)
        res = sim.run(duration=2.0, tx_count=None)     # flood for 2 s
        print(res.stats.rx_verified, sim.check_guards())
        sim.stop()

Guest memory layout, per queue pair: the two virtqueues (descriptor table
page-aligned, avail ring right after it, used ring on the next cache
line) sit at the bottom of region 0; rx buffers are carved from the top of
the regions downwards, alternating between regions, each segment with
``XN_GUEST_GUARD_LEN`` guard bytes on both sides; tx slots and indirect
tables are carved from the bottom, also alternating.  Nothing straddles a
region boundary.  With ``regions=2`` the memfd is exposed as two regions
at distinct guest-physical addresses (0 and 4 GiB), the second one at
``mmap_offset = mem_size / 2`` of the same memfd.  ``user_addr`` of a
region is ``USER_ADDR_BASE + gpa``, like QEMU's virtual addresses: distinct
from the guest-physical address, used only in SET_VRING_ADDR.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass

from xdpnet._native import ffi, lib
from xdpnet.errors import UsageError, VhostError, XdpnetError
from xdpnet.guest.frontend import BackendClosed, VhostUserFrontend
from xdpnet.net.mac import parse_mac
from xdpnet.vhost import protocol as P

log = logging.getLogger(__name__)

USER_ADDR_BASE = 0x7F00_0000_0000       # fake frontend virtual address of gpa 0
REGION1_GPA = 0x1_0000_0000             # second region's guest-physical address (4 GiB)
HUGE_PAGE = 2 << 20
PAGE = 4096
CACHE_LINE = 64
DEFAULT_MAC = "52:54:00:12:34:56"
DEFAULT_DST = "02:00:00:00:00:01"

F = P.VirtioFeature
DEFAULT_FEATURES = (P.bit(F.VERSION_1) | P.bit(F.NET_MRG_RXBUF) | P.bit(F.RING_EVENT_IDX)
                    | P.bit(F.RING_INDIRECT_DESC) | P.bit(F.PROTOCOL_FEATURES))
WANTED_PROTOCOL_FEATURES = P.bit(P.ProtocolFeature.MQ) | P.bit(P.ProtocolFeature.REPLY_ACK)


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


# --- configuration and results ----------------------------------------------

@dataclass(frozen=True)
class GuestConfig:
    """What the simulated VM looks like.  See :class:`VirtioNetSimulator`."""

    mac: str = DEFAULT_MAC
    queue_pairs: int = 1
    queue_size: int = 256
    mem_size: int = 64 << 20
    rx_buf_size: int = 2048             # bytes per rx buffer (header + frame)
    tx_buf_size: int = 2048             # bytes per tx slot (header + frame)
    regions: int = 1                    # 1, or 2 (one memfd exposed as two regions)
    hugetlb: bool = False               # MFD_HUGETLB, 2 MiB pages
    sealable: bool = True               # MFD_ALLOW_SEALING (False: a hostile frontend's memfd)
    indirect: bool = False              # rx buffers and tx frames via indirect tables
    rx_chain: bool = False              # rx buffers as 2-descriptor chains
    tx_hdr_separate: bool = False       # tx header in its own descriptor
    features: int | None = None         # force SET_FEATURES (default: ours & offered);
                                        # the layout options still apply, negotiated or
                                        # not (indirect without INDIRECT_DESC: negative tests)
    ring_base: int = 0                  # first avail/used index (SET_VRING_BASE)

    def validate(self) -> None:
        """Raise :class:`UsageError` for an impossible configuration."""
        q = self.queue_size
        if q < 2 or q > 32768 or q & (q - 1):
            raise UsageError(f"queue_size {q}: must be a power of two in 2..32768")
        if not 1 <= self.queue_pairs <= 128:
            raise UsageError(f"queue_pairs {self.queue_pairs}: must be 1..128")
        if self.regions not in (1, 2):
            raise UsageError(f"regions {self.regions}: must be 1 or 2")
        unit = HUGE_PAGE if self.hugetlb else PAGE
        if self.mem_size <= 0 or self.mem_size % (unit * self.regions):
            raise UsageError(f"mem_size {self.mem_size}: must be a positive multiple of "
                             f"{unit * self.regions} bytes")
        if self.rx_buf_size < 16 * (2 if self.rx_chain else 1):
            raise UsageError(f"rx_buf_size {self.rx_buf_size} is too small")
        if self.tx_buf_size < 12 + 60:
            raise UsageError(f"tx_buf_size {self.tx_buf_size}: must hold a header and a 60-byte frame")
        if not 0 <= self.ring_base <= 0xFFFF:
            raise UsageError(f"ring_base {self.ring_base}: must be 0..65535")
        parse_mac(self.mac)


def _stats_fields() -> list[tuple[str, type]]:
    return [(name, int) for name, _ in ffi.typeof("struct xn_guest_stats").fields
            if name != "reserved"]


class _StatsBase:
    """Arithmetic shared by :class:`GuestStats` (fields come from the C struct)."""

    @classmethod
    def from_c(cls, c) -> GuestStats:
        return cls(**{f.name: getattr(c, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def zero(cls) -> GuestStats:
        return cls(**{f.name: 0 for f in dataclasses.fields(cls)})

    def _combine(self, other, op):
        out = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            # a guest address is not a count: keep the first one seen
            out[f.name] = (a or b) if f.name == "first_violation_gpa" else op(a, b)
        return type(self)(**out)

    def __add__(self, other):
        return self._combine(other, lambda a, b: a + b)

    def __sub__(self, other):
        return self._combine(other, lambda a, b: a - b)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# One declaration of the counters: the C struct in guest.h.
GuestStats = dataclasses.make_dataclass(
    "GuestStats", _stats_fields(), bases=(_StatsBase,), frozen=True,
    namespace={"__doc__": "Counters of one queue pair (struct xn_guest_stats), "
                          "or their sum/difference."})
GuestStats.__module__ = __name__


@dataclass(frozen=True)
class RunResult:
    """What one :meth:`VirtioNetSimulator.run` did."""

    seconds: float                      # wall time of the C loop
    finished: bool                      # the work was done before the deadline
    stats: GuestStats                   # counters accumulated during the run

    @property
    def tx_pps(self) -> float:
        return self.stats.tx_sent / self.seconds if self.seconds else 0.0

    @property
    def rx_pps(self) -> float:
        return self.stats.rx_frames / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Negotiation:
    """What the backend offered and what we acknowledged."""

    backend_features: int = 0
    protocol_features_offered: int = 0
    protocol_features: int = 0          # acknowledged with SET_PROTOCOL_FEATURES
    queue_num: int | None = None        # GET_QUEUE_NUM (with MQ)
    features: int | None = None         # acknowledged with SET_FEATURES (after start)

    def describe(self) -> str:
        return (f"backend offers {'|'.join(P.feature_names(self.backend_features))}; "
                f"protocol {'|'.join(P.feature_names(self.protocol_features_offered, P.ProtocolFeature))}; "
                f"acked {'|'.join(P.feature_names(self.features or 0))}")


@dataclass(frozen=True)
class VringInfo:
    """The driver's view of one virtqueue (struct xn_gvq_info)."""

    num: int
    avail_idx: int
    last_used: int
    used_idx: int
    used_flags: int
    avail_event: int
    used_event: int
    avail_flags: int
    inflight: int


# --- guest memory -------------------------------------------------------------

@dataclass
class _Region:
    gpa: int
    size: int
    offset: int                         # in the memfd and our mapping
    user_addr: int
    bottom: int = 0                     # allocation cursors (mapping offsets)
    top: int = 0

    def __post_init__(self):
        self.bottom = self.offset
        self.top = self.offset + self.size


class GuestMemory:
    """A memfd mapped ``MAP_SHARED``, exposed as 1 or 2 regions, with a bump
    allocator per region (bottom-up and top-down)."""

    def __init__(self, size: int, regions: int = 1, hugetlb: bool = False,
                 sealable: bool = True):
        # MFD_ALLOW_SEALING like QEMU's memory-backend-memfd (which also seals
        # growing and shrinking by default).
        flags = (os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0)
                 | (os.MFD_HUGETLB | os.MFD_HUGE_2MB if hugetlb else 0))
        self.size = size
        self.fd = os.memfd_create("xdpnet-guest", flags)
        try:
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(self.fd)
            kind = "hugetlb " if hugetlb else ""
            raise XdpnetError(f"cannot map {size >> 20} MiB of {kind}guest memory: {e}"
                              + (" (are 2 MiB huge pages reserved? /proc/sys/vm/nr_hugepages)"
                                 if hugetlb else "")) from e
        self._buf = ffi.from_buffer("uint8_t[]", self.map)
        self.ptr = ffi.cast("uint8_t *", self._buf)
        half = size // regions
        self.regions = [_Region(gpa=(0 if i == 0 else REGION1_GPA), size=half, offset=i * half,
                                user_addr=USER_ADDR_BASE + (0 if i == 0 else REGION1_GPA))
                        for i in range(regions)]

    def close(self) -> None:
        if self._buf is not None:
            ffi.release(self._buf)
            self._buf = self.ptr = None
            self.map.close()
            os.close(self.fd)

    # allocation
    def alloc(self, region: int, size: int, align: int, top: bool = False) -> int:
        """Mapping offset of ``size`` fresh bytes in ``region``."""
        r = self.regions[region]
        if top:
            off = (r.top - size) & ~(align - 1)
            if off < r.bottom:
                raise UsageError(f"guest memory too small ({self.size >> 20} MiB) for this "
                                 f"queue/buffer configuration")
            r.top = off
        else:
            off = _align(r.bottom, align)
            if off + size > r.top:
                raise UsageError(f"guest memory too small ({self.size >> 20} MiB) for this "
                                 f"queue/buffer configuration")
            r.bottom = off + size
        return off

    # translation
    def region_of(self, off: int) -> _Region:
        for r in self.regions:
            if r.offset <= off < r.offset + r.size:
                return r
        raise ValueError(f"offset {off:#x} outside guest memory")

    def gpa(self, off: int) -> int:
        r = self.region_of(off)
        return r.gpa + off - r.offset

    def uva(self, off: int) -> int:
        r = self.region_of(off)
        return r.user_addr + off - r.offset

    def offset_of_gpa(self, gpa: int, length: int = 1) -> int:
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r.offset + gpa - r.gpa
        raise ValueError(f"guest address {gpa:#x}+{length} is not in guest memory")

    def read(self, gpa: int, length: int) -> bytes:
        off = self.offset_of_gpa(gpa, length)
        return bytes(self.map[off:off + length])

    def table(self) -> list[P.MemRegion]:
        return [P.MemRegion(r.gpa, r.size, r.user_addr, r.offset) for r in self.regions]


# --- one queue pair -------------------------------------------------------------

class _Pair:
    """One queue pair: its eventfds, its layout and its C driver object."""

    def __init__(self, index: int):
        self.index = index
        self.rx_vq, self.tx_vq = 2 * index, 2 * index + 1
        self.fds: dict[str, int] = {}
        for name in ("rx_kick", "rx_call", "tx_kick", "tx_call"):
            self.fds[name] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.rings: dict[int, tuple[int, int, int]] = {}   # vq -> (desc, avail, used) offsets
        self.rx_bufs: list[tuple[tuple[int, int], ...]] = []  # per buffer: its (gpa, len) segments
        self.g = None
        self.lock = threading.Lock()                       # one C call at a time

    def close(self) -> None:
        if self.g is not None:
            lib.xn_guest_destroy(self.g)
            self.g = None
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise XdpnetError(f"{what}: {os.strerror(-rc)} ({rc})")
    return rc


# --- the simulator ------------------------------------------------------------

class VirtioNetSimulator:
    """A vhost-user frontend with a simulated virtio-net driver behind it.

    Options (see :class:`GuestConfig`): ``mac``, ``queue_pairs``,
    ``queue_size``, ``mem_size``, ``rx_buf_size`` (e.g. 512: too small for
    a full frame), ``tx_buf_size``, ``regions`` (2: one memfd as two
    regions at distinct guest addresses), ``hugetlb``, ``indirect``,
    ``rx_chain``, ``tx_hdr_separate``, ``features`` (force the SET_FEATURES
    value, e.g. a legacy set for negative tests) and ``ring_base`` (start
    the 16-bit ring indexes there, e.g. near 65535 to test wrap-around).
    """

    def __init__(self, socket_path: str, **options):
        self.socket_path = socket_path
        self.config = GuestConfig(**options)
        self.config.validate()
        self.mac = parse_mac(self.config.mac)
        self.frontend: VhostUserFrontend | None = None
        self.negotiation = Negotiation()
        self.memory: GuestMemory | None = None
        self.pairs: list[_Pair] = []
        self.hdr_len = 12
        self.started = False

    # --- context manager ---

    def __enter__(self) -> VirtioNetSimulator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- control plane ---

    def connect(self, timeout: float = 5.0) -> Negotiation:
        """Connect and negotiate like QEMU's vhost-user backend init:
        GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (MQ and
        REPLY_ACK, if offered), GET_QUEUE_NUM (with MQ), SET_OWNER."""
        cfg = self.config
        fe = self.frontend = VhostUserFrontend.connect(self.socket_path, timeout)
        feats = fe.get_u64(P.Request.GET_FEATURES)
        offered = acked = 0
        qnum = None
        if feats & P.bit(F.PROTOCOL_FEATURES):
            offered = fe.get_u64(P.Request.GET_PROTOCOL_FEATURES)
            acked = offered & WANTED_PROTOCOL_FEATURES
            fe.set_u64(P.Request.SET_PROTOCOL_FEATURES, acked)
            fe.reply_ack = bool(acked & P.bit(P.ProtocolFeature.REPLY_ACK))
        if acked & P.bit(P.ProtocolFeature.MQ):
            qnum = fe.get_u64(P.Request.GET_QUEUE_NUM)
            if cfg.queue_pairs > qnum:
                raise UsageError(f"backend supports {qnum} queue pairs, {cfg.queue_pairs} wanted")
        elif cfg.queue_pairs > 1:
            raise UsageError(f"backend does not offer multiqueue; {cfg.queue_pairs} queue pairs wanted")
        fe.send(P.Request.SET_OWNER)
        self.negotiation = Negotiation(feats, offered, acked, qnum)
        log.info("connected to %s: %s", self.socket_path, self.negotiation.describe())
        return self.negotiation

    def start(self) -> None:
        """SET_FEATURES, build guest memory and the rings (rx buffers posted),
        SET_MEM_TABLE, then per ring SET_VRING_NUM/BASE/ADDR/KICK/CALL and
        SET_VRING_ENABLE 1; finally kick every rx ring once."""
        if self.frontend is None:
            raise UsageError("connect() before start()")
        if self.started:
            raise UsageError("already started")
        cfg, fe = self.config, self.frontend
        offered = self.negotiation.backend_features
        features = cfg.features if cfg.features is not None else DEFAULT_FEATURES & offered
        fe.set_u64(P.Request.SET_FEATURES, features)
        self.negotiation = dataclasses.replace(self.negotiation, features=features)
        self.layout(features)
        self.set_mem_table_again()
        base = cfg.ring_base
        for pair in self.pairs:
            for vq, kick, call in ((pair.rx_vq, "rx_kick", "rx_call"),
                                   (pair.tx_vq, "tx_kick", "tx_call")):
                desc, avail, used = pair.rings[vq]
                m = self.memory
                fe.set_vring_state(P.Request.SET_VRING_NUM, vq, cfg.queue_size)
                fe.set_vring_state(P.Request.SET_VRING_BASE, vq, base)
                fe.send(P.Request.SET_VRING_ADDR,
                        P.VringAddr(vq, 0, m.uva(desc), m.uva(used), m.uva(avail), 0).pack())
                fe.set_u64(P.Request.SET_VRING_KICK, vq, [pair.fds[kick]])
                fe.set_u64(P.Request.SET_VRING_CALL, vq, [pair.fds[call]])
        if features & P.bit(F.PROTOCOL_FEATURES):
            for pair in self.pairs:
                for vq in (pair.rx_vq, pair.tx_vq):
                    fe.set_vring_state(P.Request.SET_VRING_ENABLE, vq, 1)
        self.started = True
        for pair in self.pairs:
            _check(lib.xn_guest_kick(pair.g, lib.XN_GUEST_RX), "rx kick")

    def set_mem_table_again(self) -> None:
        """(Re)send SET_MEM_TABLE with one memfd descriptor per region."""
        m = self.memory
        if m is None or self.frontend is None:
            raise UsageError("no guest memory yet: connect() and start() first")
        self.frontend.send(P.Request.SET_MEM_TABLE, P.pack_mem_table(m.table()),
                           [m.fd] * len(m.regions))

    def stop(self) -> list[int]:
        """GET_VRING_BASE for every ring (the backend stops them); returns
        the indexes in ring order (rx0, tx0, rx1, tx1, ...)."""
        if not self.started:
            raise UsageError("not started")
        out = []
        for pair in self.pairs:
            for vq in (pair.rx_vq, pair.tx_vq):
                out.append(self.frontend.get_vring_base(vq))
        self.started = False
        return out

    def close(self) -> None:
        """Stop the rings if still running, close the connection, free the
        C objects, the eventfds and guest memory.  Idempotent."""
        if self.started and self.frontend is not None:
            try:
                self.stop()
            except (VhostError, OSError) as e:
                log.debug("stop at close failed: %s", e)
            self.started = False
        if self.frontend is not None:
            self.frontend.close()
            self.frontend = None
        for pair in self.pairs:
            if pair.g is not None and pair.lock.locked():
                lib.xn_guest_stop(pair.g)           # a run or poll on another thread
            with pair.lock:
                pair.close()
        self.pairs = []
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    # --- layout ---

    def layout(self, features: int) -> None:
        """Create guest memory, lay out every queue pair for the negotiated
        ``features`` and create the C drivers (rx buffers made available, no
        kick).  :meth:`start` calls it after SET_FEATURES; tests without a
        backend may call it directly and play the device themselves."""
        if self.pairs:
            raise UsageError("guest memory is already laid out")
        self.hdr_len = 12 if features & (P.bit(F.VERSION_1) | P.bit(F.NET_MRG_RXBUF)) else 10
        if self.memory is None:
            self.memory = GuestMemory(self.config.mem_size, self.config.regions, self.config.hugetlb,
                                      self.config.sealable)
        for i in range(self.config.queue_pairs):
            pair = _Pair(i)
            self.pairs.append(pair)
            self._layout(pair, features)

    def _layout(self, pair: _Pair, features: int) -> None:
        """Place the pair's rings, buffers and tables; create its C driver."""
        cfg, m = self.config, self.memory
        q = cfg.queue_size
        nreg = len(m.regions)
        for vq in (pair.rx_vq, pair.tx_vq):
            desc = m.alloc(0, 16 * q, PAGE)
            avail = m.alloc(0, 6 + 2 * q, 2)
            used = m.alloc(0, 6 + 8 * q, CACHE_LINE)
            pair.rings[vq] = (desc, avail, used)

        nseg = 2 if cfg.rx_chain else 1
        nrx = q // nseg if (cfg.rx_chain and not cfg.indirect) else q
        seg_lens = ([cfg.rx_buf_size // 2, cfg.rx_buf_size - cfg.rx_buf_size // 2]
                    if cfg.rx_chain else [cfg.rx_buf_size])
        guard = lib.XN_GUEST_GUARD_LEN
        rx_segs = ffi.new("struct xn_guest_seg[]", nrx * nseg)
        rx_ind = ffi.new("struct xn_guest_seg[]", nrx) if cfg.indirect else ffi.NULL
        k = 0
        for b in range(nrx):
            segs = []
            for s in range(nseg):
                ln = seg_lens[s]
                slot = m.alloc(k % nreg, guard + _align(ln, CACHE_LINE) + guard, CACHE_LINE, top=True)
                k += 1
                rx_segs[b * nseg + s].off = slot + guard
                rx_segs[b * nseg + s].len = ln
                segs.append((m.gpa(slot + guard), ln))
            pair.rx_bufs.append(tuple(segs))
            if cfg.indirect:
                rx_ind[b].off = m.alloc(b % nreg, 16 * nseg, 16)
                rx_ind[b].len = 16 * nseg

        ntx = q // 2 if (cfg.tx_hdr_separate and not cfg.indirect) else q
        tx_hdr = ffi.new("struct xn_guest_seg[]", ntx)
        tx_frame = ffi.new("struct xn_guest_seg[]", ntx)
        tx_ind = ffi.new("struct xn_guest_seg[]", ntx) if cfg.indirect else ffi.NULL
        for s in range(ntx):
            r = s % nreg
            if cfg.tx_hdr_separate:
                tx_hdr[s].off = m.alloc(r, 16, 16)
                tx_hdr[s].len = self.hdr_len
                tx_frame[s].off = m.alloc(r, cfg.tx_buf_size, CACHE_LINE)
                tx_frame[s].len = cfg.tx_buf_size
            else:
                slot = m.alloc(r, cfg.tx_buf_size, CACHE_LINE)
                tx_hdr[s].off = slot
                tx_hdr[s].len = self.hdr_len
                tx_frame[s].off = slot + self.hdr_len
                tx_frame[s].len = cfg.tx_buf_size - self.hdr_len
            if cfg.indirect:
                n = 2 if cfg.tx_hdr_separate else 1
                tx_ind[s].off = m.alloc(r, 16 * n, 16)
                tx_ind[s].len = 16 * n

        c = ffi.new("struct xn_guest_config *")
        c.mem = m.ptr
        c.mem_size = m.size
        c.nregions = nreg
        for i, r in enumerate(m.regions):
            c.regions[i].gpa, c.regions[i].size, c.regions[i].offset = r.gpa, r.size, r.offset
        flags = 0
        if cfg.indirect:
            flags |= lib.XN_GUEST_F_INDIRECT
        if cfg.rx_chain:
            flags |= lib.XN_GUEST_F_RX_CHAIN
        if cfg.tx_hdr_separate:
            flags |= lib.XN_GUEST_F_TX_HDR_SEPARATE
        if features & P.bit(F.RING_EVENT_IDX):
            flags |= lib.XN_GUEST_F_EVENT_IDX
        if features & P.bit(F.NET_MRG_RXBUF):
            flags |= lib.XN_GUEST_F_MRG_RXBUF
        c.flags = flags
        for vqc, vq, kick, call in ((c.rx, pair.rx_vq, "rx_kick", "rx_call"),
                                    (c.tx, pair.tx_vq, "tx_kick", "tx_call")):
            vqc.desc_off, vqc.avail_off, vqc.used_off = pair.rings[vq]
            vqc.num = q
            vqc.base = cfg.ring_base
            vqc.kick_fd = pair.fds[kick]
            vqc.call_fd = pair.fds[call]
        c.hdr_len = self.hdr_len
        c.nrx, c.rx_nseg, c.ntx = nrx, nseg, ntx
        c.rx_segs, c.rx_ind = rx_segs, rx_ind
        c.tx_hdr, c.tx_frame, c.tx_ind = tx_hdr, tx_frame, tx_ind
        c.mac = list(self.mac)
        out = ffi.new("struct xn_guest **")
        _check(lib.xn_guest_create(out, c), f"queue pair {pair.index}: guest set-up")
        pair.g = out[0]

    # --- data plane (C) ---

    def _pair(self, pair: int) -> _Pair:
        if not 0 <= pair < len(self.pairs):
            raise UsageError(f"no queue pair {pair} (have {len(self.pairs)}): start() first?")
        return self.pairs[pair]

    def max_tx_length(self) -> int:
        """Largest frame a tx slot holds."""
        tx = self.config.tx_buf_size
        return tx if self.config.tx_hdr_separate else tx - self.hdr_len

    def _check_length(self, length: int) -> None:
        if not lib.XN_FRAME_MIN_LEN <= length <= self.max_tx_length():
            raise UsageError(f"frame length {length}: must be {lib.XN_FRAME_MIN_LEN}.."
                             f"{self.max_tx_length()} (tx_buf_size {self.config.tx_buf_size})")

    def send(self, count: int, length: int = 64, dst: str | bytes = DEFAULT_DST, flow: int = 0,
             pair: int = 0, timeout: float = 1.0) -> int:
        """Build and post ``count`` frames of ``length`` bytes on the tx ring
        (kicking when the backend wants it), waiting for free tx slots up to
        ``timeout`` seconds.  Returns ``count``; :class:`TimeoutError` if the
        backend did not free slots in time."""
        p = self._pair(pair)
        self._check_length(length)
        d = ffi.new("uint8_t[6]", parse_mac(dst))
        deadline = time.monotonic() + timeout
        done = 0
        while done < count:
            with p.lock:
                n = _check(lib.xn_guest_send(p.g, count - done, length, d, flow), "send")
            done += n
            if done < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"sent {done}/{count} frames: tx ring stayed full for {timeout}s")
                with p.lock:
                    _check(lib.xn_guest_poll(p.g, max(1, int(min(left, 0.1) * 1000)), 0), "poll")
        return done

    def poll(self, timeout: float = 1.0, pair: int = 0, reflect: bool = False) -> int:
        """One C pass over rx and tx; if there was nothing, sleep on the call
        eventfds up to ``timeout`` seconds and pass again.  Returns the rx
        frames reaped."""
        p = self._pair(pair)
        with p.lock:
            return _check(lib.xn_guest_poll(p.g, int(timeout * 1000),
                                            lib.XN_GUEST_RUN_REFLECT if reflect else 0), "poll")

    def run(self, duration: float = 2.0, tx_count: int | None = None, tx_length: int = 64,
            dst: str | bytes = DEFAULT_DST, reflect: bool = False, pair: int | None = 0,
            rx_count: int | None = None, flow: int = 0, busy_poll: bool = False) -> RunResult:
        """Run the C driver loop with the GIL released.

        Sends ``tx_count`` frames (``None`` = flood for the whole duration,
        0 = none) of ``tx_length`` bytes while reaping rx (and, with
        ``reflect``, sending every verified frame back MAC-swapped), sleeping
        on the call eventfds when idle.  Returns after ``duration`` seconds,
        or earlier once ``tx_count`` frames are sent and completed and
        ``rx_count`` frames received (when either is given, and ``tx_count``
        is not 0 or ``rx_count`` is given).  ``pair=None`` runs every pair on
        its own thread (flow ``flow + pair``) and sums the results.
        """
        if pair is None:
            return self._run_all(duration, tx_count, tx_length, dst, reflect, rx_count, flow, busy_poll)
        p = self._pair(pair)
        if tx_count != 0:
            self._check_length(tx_length)
        d = ffi.new("uint8_t[6]", parse_mac(dst))
        txc = lib.XN_GUEST_UNLIMITED if tx_count is None else int(tx_count)
        flags = lib.XN_GUEST_RUN_REFLECT if reflect else 0
        if rx_count is not None or (tx_count and not reflect):
            flags |= lib.XN_GUEST_RUN_UNTIL_DONE
        if busy_poll:
            flags |= lib.XN_GUEST_RUN_BUSY_POLL
        with p.lock:
            before = self._stats(p)
            t0 = time.monotonic()
            rc = _check(lib.xn_guest_run(p.g, max(1, int(duration * 1000)), txc, tx_length, d, flow,
                                         rx_count or 0, flags), "run")
            secs = time.monotonic() - t0
            after = self._stats(p)
        return RunResult(secs, rc == 1, after - before)

    def _run_all(self, duration, tx_count, tx_length, dst, reflect, rx_count, flow, busy_poll):
        results: list[RunResult | BaseException | None] = [None] * len(self.pairs)

        def one(i: int) -> None:
            try:
                results[i] = self.run(duration, tx_count, tx_length, dst, reflect, i,
                                      rx_count, flow + i, busy_poll)
            except BaseException as e:      # re-raised below, in the caller's thread
                results[i] = e

        threads = [threading.Thread(target=one, args=(i,), name=f"guest-qp{i}")
                   for i in range(len(self.pairs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return RunResult(max(r.seconds for r in results), all(r.finished for r in results),
                         sum((r.stats for r in results), GuestStats.zero()))

    def interrupt_run(self, pair: int | None = None) -> None:
        """Make a :meth:`run` in progress on another thread return now."""
        for p in (self.pairs if pair is None else [self._pair(pair)]):
            lib.xn_guest_stop(p.g)

    # --- observation ---

    @staticmethod
    def _stats(p: _Pair) -> GuestStats:
        c = ffi.new("struct xn_guest_stats *")
        lib.xn_guest_get_stats(p.g, c)
        return GuestStats.from_c(c)

    def stats(self, pair: int | None = 0) -> GuestStats:
        """Counters of one pair, or summed over all pairs (``pair=None``).
        Safe while a run is in progress."""
        if pair is None:
            return sum((self._stats(p) for p in self.pairs), GuestStats.zero())
        return self._stats(self._pair(pair))

    def rx_trace(self, pair: int = 0) -> list[tuple[int, int]]:
        """The last used rx entries, oldest first: ``(buffer guest address, used len)``."""
        p = self._pair(pair)
        out = ffi.new("struct xn_guest_trace[]", lib.XN_GUEST_TRACE_LEN)
        with p.lock:
            n = lib.xn_guest_rx_trace(p.g, out, lib.XN_GUEST_TRACE_LEN)
        return [(out[i].gpa, out[i].len) for i in range(n)]

    def check_guards(self) -> int:
        """Guard bytes around rx buffers (all pairs) that no longer hold the
        pattern; 0 means nobody wrote outside a posted buffer."""
        total = 0
        first = ffi.new("uint64_t *")
        for p in self.pairs:
            n = lib.xn_guest_check_guards(p.g, first)
            if n:
                log.warning("queue pair %d: %d guard bytes changed, first at gpa %#x",
                            p.index, n, first[0])
            total += n
        return total

    def rx_buffers(self, pair: int = 0) -> list[tuple[tuple[int, int], ...]]:
        """Every rx buffer of a pair, in buffer order: a tuple of its segments
        ``(guest address, length)`` (two with ``rx_chain``).  A trace entry's
        address is the first segment's."""
        return list(self._pair(pair).rx_bufs)

    def read_rx_buffer(self, gpa: int, length: int, pair: int = 0) -> bytes:
        """The first ``length`` bytes of the rx buffer whose first segment is
        at ``gpa`` (gathered across its segments)."""
        for segs in self._pair(pair).rx_bufs:
            if segs[0][0] == gpa:
                out = b""
                for a, ln in segs:
                    take = min(ln, length - len(out))
                    out += self.read_guest(a, take)
                if len(out) < length:
                    raise ValueError(f"rx buffer at {gpa:#x} holds {len(out)} bytes, {length} asked")
                return out
        raise ValueError(f"no rx buffer at guest address {gpa:#x}")

    def ring_info(self, pair: int = 0, ring: str = "rx") -> VringInfo:
        """The driver's view of the pair's rx or tx virtqueue."""
        p = self._pair(pair)
        out = ffi.new("struct xn_gvq_info *")
        _check(lib.xn_gvq_info(p.g, lib.XN_GUEST_RX if ring == "rx" else lib.XN_GUEST_TX, out),
               "ring info")
        return VringInfo(**{f.name: getattr(out, f.name) for f in dataclasses.fields(VringInfo)})

    def ring_gpas(self, pair: int = 0, ring: str = "rx") -> tuple[int, int, int]:
        """Guest addresses of a virtqueue's descriptor table, avail and used rings."""
        p = self._pair(pair)
        offs = p.rings[p.rx_vq if ring == "rx" else p.tx_vq]
        return tuple(self.memory.gpa(o) for o in offs)

    def read_guest(self, gpa: int, length: int) -> bytes:
        """Bytes of guest memory at a guest-physical address."""
        if self.memory is None:
            raise UsageError("no guest memory")
        return self.memory.read(gpa, length)

    def write_guest(self, gpa: int, data: bytes) -> None:
        """Write bytes into guest memory (tests that play the device or corrupt guards)."""
        if self.memory is None:
            raise UsageError("no guest memory")
        off = self.memory.offset_of_gpa(gpa, len(data))
        self.memory.map[off:off + len(data)] = data

    def tx_seq(self, pair: int = 0) -> int:
        """Sequence number of the next frame the pair will build."""
        return lib.xn_guest_tx_seq(self._pair(pair).g)

    def request(self, request: int, payload: bytes = b"", fds=(), need_reply: bool | None = None):
        """Raw vhost-user request (negative tests): see :meth:`VhostUserFrontend.send`."""
        if self.frontend is None:
            raise BackendClosed("not connected")
        return self.frontend.send(request, payload, fds, need_reply)

"""Tests of the vhost-user server (xdpnet.vhost.server) over real unix sockets.

The device is a recording test double: this layer is protocol only, it
has no kernel path of its own.  Sessions are driven step by step over a
socketpair (``VhostUserSession.handle_one``); the listening server is
driven over a real socket path, both from a background thread
(``serve_forever``) and by polling ``fileno()``.
"""

from __future__ import annotations

import array
import grp
import logging
import os
import select
import socket
import stat
import threading
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rigs import wait_for
from xdpnet.errors import BusyError, MemoryTableError, UsageError, VhostError
from xdpnet.vhost import protocol as p
from xdpnet.vhost.device import VhostUserDevice, VringState
from xdpnet.vhost.protocol import (
    FLAG_NEED_REPLY, FLAG_REPLY, HEADER, HEADER_SIZE, VERSION, VRING_ADDR, VRING_STATE, MemRegion,
    ProtocolFeature as PF, Request as R, VirtioFeature as VF, bit,
)
from xdpnet.vhost.server import SERVER_PROTOCOL_FEATURES, VhostUserServer, VhostUserSession

F_VERSION_1 = bit(VF.VERSION_1)
F_PROTOCOL = bit(VF.PROTOCOL_FEATURES)
F_MRG = bit(VF.NET_MRG_RXBUF)
F_EVENT_IDX = bit(VF.RING_EVENT_IDX)
F_LOG_ALL = bit(VF.LOG_ALL)
DEVICE_FEATURES = F_VERSION_1 | F_PROTOCOL | F_MRG | F_EVENT_IDX | F_LOG_ALL
# The device offers more than the server implements: the server must trim it.
DEVICE_PROTOCOL = (bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.RESET_DEVICE) | bit(PF.PAGEFAULT)
                   | bit(PF.LOG_SHMFD) | bit(PF.CONFIG))
OFFERED_PROTOCOL = bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.RESET_DEVICE)
ACKED = F_VERSION_1 | F_PROTOCOL | F_MRG | F_EVENT_IDX
MiB = 1 << 20


# --- test doubles -----------------------------------------------------------

class RecordingDevice:
    """A VhostUserDevice that records every call and can be told to fail."""

    def __init__(self, features: int = DEVICE_FEATURES, protocol: int = DEVICE_PROTOCOL,
                 queue_pairs: int = 2):
        self.features = features
        self.protocol = protocol
        self.queue_pairs = queue_pairs
        self.calls: list[tuple] = []
        self.bases: dict[int, int] = {}           # what stop_vring returns per index
        self.fail: dict[str, BaseException] = {}  # method name -> exception to raise
        self.mem_fd_sizes: list[int] = []
        self.mem_fd_inodes: set[tuple[int, int]] = set()

    def _record(self, name: str, *args: object) -> None:
        self.calls.append((name, *args))
        exc = self.fail.get(name)
        if exc is not None:
            raise exc

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def last(self, name: str) -> tuple:
        return [c for c in self.calls if c[0] == name][-1]

    def device_features(self) -> int:
        return self.features

    def protocol_features(self) -> int:
        return self.protocol

    def max_queue_pairs(self) -> int:
        return self.queue_pairs

    def set_features(self, features: int) -> None:
        self._record("set_features", features)

    def set_protocol_features(self, features: int) -> None:
        self._record("set_protocol_features", features)

    def set_mem_table(self, regions: list[MemRegion], fds: list[int]) -> None:
        # The fds must be open and be the memfds the frontend sent (checked by size).
        self.mem_fd_sizes = [os.fstat(fd).st_size for fd in fds]
        self.mem_fd_inodes = {(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in fds}
        self._record("set_mem_table", list(regions), list(fds))

    def start_vring(self, vring: VringState) -> None:
        self._record("start_vring", vring)

    def enable_vring(self, index: int, enabled: bool) -> None:
        self._record("enable_vring", index, enabled)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._record("set_vring_call", index, fd)

    def stop_vring(self, index: int) -> int:
        self._record("stop_vring", index)
        return self.bases.get(index, 0)

    def reset(self) -> None:
        self._record("reset")


def open_fds() -> set[str]:
    """The fds this process has open."""
    return set(os.listdir("/proc/self/fd"))


def open_inodes() -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every open fd."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            st_ = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        out.add((st_.st_dev, st_.st_ino))
    return out


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def memfd(size: int = MiB) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


class Frontend:
    """The frontend end of a connection: sends requests, reads replies."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.settimeout(2.0)

    def send(self, request: int, payload: bytes = b"", *, fds: list[int] = (),
             need_reply: bool = False, flags: int | None = None, size: int | None = None,
             close_fds: bool = True) -> None:
        """Send one message; the fds are closed on our side afterwards (the peer has dups)."""
        if flags is None:
            flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        data = HEADER.pack(request, flags, len(payload) if size is None else size) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self.sock.sendmsg([data], anc)
        finally:
            if close_fds:
                for fd in fds:
                    os.close(fd)

    def reply(self) -> tuple[p.Header, bytes]:
        """Read one reply (header and payload)."""
        hdr = p.unpack_header(self._read(HEADER_SIZE))
        return hdr, self._read(hdr.size)

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def pending(self) -> bool:
        """True if the backend sent something (or closed) that we have not read."""
        return bool(select.select([self.sock], [], [], 0)[0])

    def at_eof(self) -> bool:
        """True if the backend closed the connection (after any pending replies are read).

        A backend that closes with our bytes unread makes the kernel report
        ECONNRESET instead of EOF: that is a hang-up too.
        """
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False


@dataclass
class Harness:
    """A session over a socketpair plus helpers to run one request through it."""

    fe: Frontend
    session: VhostUserSession
    dev: RecordingDevice
    alive: list[bool] = field(default_factory=list)

    def run(self, request: int, payload: bytes = b"", **kw) -> bool:
        """Send a message and let the session handle it; returns whether the session lives."""
        self.fe.send(request, payload, **kw)
        ok = self.session.handle_one(timeout=2.0)
        self.alive.append(ok)
        return ok

    def ack(self, request: int, payload: bytes = b"", **kw) -> int:
        """Send with NEED_REPLY and return the u64 REPLY_ACK value."""
        self.run(request, payload, need_reply=True, **kw)
        hdr, body = self.fe.reply()
        assert hdr.request == request and hdr.flags == VERSION | FLAG_REPLY
        assert not self.fe.pending(), "more than one reply"
        return p.unpack_u64(body)

    def get(self, request: int, payload: bytes = b"", **kw) -> bytes:
        """Send a request with a natural reply; return the reply payload."""
        self.run(request, payload, **kw)
        hdr, body = self.fe.reply()
        assert hdr.request == request and hdr.flags == VERSION | FLAG_REPLY
        return body

    def no_reply(self, request: int, payload: bytes = b"", **kw) -> None:
        """Send a request and assert it gets no reply and the session lives."""
        assert self.run(request, payload, **kw)
        assert not self.fe.pending()

    def negotiate(self, *, reply_ack: bool = True, features: int = ACKED) -> None:
        """QEMU's opening: features, protocol features, owner, SET_FEATURES."""
        assert p.unpack_u64(self.get(R.GET_FEATURES)) == DEVICE_FEATURES & ~F_LOG_ALL
        assert p.unpack_u64(self.get(R.GET_PROTOCOL_FEATURES)) == OFFERED_PROTOCOL
        proto = bit(PF.MQ) | (bit(PF.REPLY_ACK) if reply_ack else 0)
        self.no_reply(R.SET_PROTOCOL_FEATURES, p.pack_u64(proto))
        self.no_reply(R.SET_OWNER)
        if reply_ack:
            assert self.ack(R.SET_FEATURES, p.pack_u64(features)) == 0
        else:
            self.no_reply(R.SET_FEATURES, p.pack_u64(features))

    def mem_table(self) -> None:
        regions = [MemRegion(0, 2 * MiB, 0x7F00_0000_0000, 0)]
        assert self.ack(R.SET_MEM_TABLE, p.pack_mem_table(regions), fds=[memfd(2 * MiB)]) == 0

    def setup_ring(self, index: int, num: int = 256, base: int = 0) -> None:
        """NUM, BASE, ADDR, CALL, KICK for one ring, all acked 0."""
        assert self.ack(R.SET_VRING_NUM, VRING_STATE.pack(index, num)) == 0
        assert self.ack(R.SET_VRING_BASE, VRING_STATE.pack(index, base)) == 0
        assert self.ack(R.SET_VRING_ADDR, addr(index)) == 0
        assert self.ack(R.SET_VRING_CALL, p.pack_u64(index), fds=[eventfd()]) == 0
        assert self.ack(R.SET_VRING_KICK, p.pack_u64(index), fds=[eventfd()]) == 0


def addr(index: int, desc: int = 0x7F00_0000_1000, used: int = 0x7F00_0000_3000,
         avail: int = 0x7F00_0000_2000, flags: int = 0) -> bytes:
    return VRING_ADDR.pack(index, flags, desc, used, avail, 0)


@pytest.fixture
def fd_baseline():
    """Assert at teardown that the test left no fd open."""
    before = open_fds()
    yield before
    leaked = open_fds() - before
    assert not leaked, f"leaked fds: {sorted(leaked)}"


@pytest.fixture
def make(fd_baseline, caplog):
    """Factory of harnesses around a given device; all closed at teardown."""
    caplog.set_level(logging.DEBUG, logger="xdpnet.vhost")
    made: list[Harness] = []

    def _make(dev: RecordingDevice) -> Harness:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        made.append(Harness(Frontend(a), VhostUserSession(b, dev, label="test"), dev))
        return made[-1]
    yield _make
    for harness in made:
        harness.session.close()
        harness.fe.sock.close()


@pytest.fixture
def h(fd_baseline, caplog):
    caplog.set_level(logging.DEBUG, logger="xdpnet.vhost")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dev = RecordingDevice()
    harness = Harness(Frontend(a), VhostUserSession(b, dev, label="test"), dev)
    yield harness
    harness.session.close()
    a.close()


def messages(caplog, level: int = logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "xdpnet.vhost" and r.levelno >= level]


# --- the happy path ------------------------------------------------------------

def test_device_protocol_is_satisfied_by_the_double():
    assert isinstance(RecordingDevice(), VhostUserDevice)
    assert SERVER_PROTOCOL_FEATURES & bit(PF.PAGEFAULT) == 0


def test_qemu_like_negotiation(h, caplog):
    """The message sequence QEMU's vhost-user-net sends for one queue pair, start to stop."""
    fe, dev = h.fe, h.dev
    # vhost_user_backend_init
    assert p.unpack_u64(h.get(R.GET_FEATURES)) == F_VERSION_1 | F_PROTOCOL | F_MRG | F_EVENT_IDX
    assert p.unpack_u64(h.get(R.GET_PROTOCOL_FEATURES)) == OFFERED_PROTOCOL
    h.no_reply(R.SET_PROTOCOL_FEATURES, p.pack_u64(bit(PF.MQ) | bit(PF.REPLY_ACK)))
    assert p.unpack_u64(h.get(R.GET_QUEUE_NUM)) == 2
    # vhost_dev_init: owner, features, the masked call notifier of every vq
    assert h.ack(R.SET_OWNER) == 0
    assert p.unpack_u64(h.get(R.GET_FEATURES, need_reply=True)) & F_VERSION_1
    for i in range(4):
        assert h.ack(R.SET_VRING_CALL, p.pack_u64(i), fds=[eventfd()]) == 0
    # virtio-net enables queue pair 0 before the device starts
    assert h.ack(R.SET_VRING_ENABLE, VRING_STATE.pack(0, 1)) == 0
    assert h.ack(R.SET_VRING_ENABLE, VRING_STATE.pack(1, 1)) == 0
    # vhost_dev_start
    assert h.ack(R.SET_FEATURES, p.pack_u64(ACKED)) == 0
    h.mem_table()
    h.setup_ring(0, num=256, base=7)
    h.setup_ring(1, num=1024)
    assert not fe.pending()

    assert dev.names()[:2] == ["set_protocol_features", "set_features"]
    assert dev.last("set_protocol_features")[1] == bit(PF.MQ) | bit(PF.REPLY_ACK)
    assert dev.last("set_features")[1] == ACKED
    _, regions, fds = dev.last("set_mem_table")
    assert regions == [MemRegion(0, 2 * MiB, 0x7F00_0000_0000, 0)] and len(fds) == 1
    assert dev.mem_fd_sizes == [2 * MiB]
    starts = [c[1] for c in dev.calls if c[0] == "start_vring"]
    assert [v.index for v in starts] == [0, 1]
    v0 = starts[0]
    assert (v0.num, v0.base, v0.desc_addr, v0.avail_addr, v0.used_addr) == \
        (256, 7, 0x7F00_0000_1000, 0x7F00_0000_2000, 0x7F00_0000_3000)
    assert v0.enabled and v0.started and v0.kick_fd is not None and v0.call_fd is not None
    assert starts[1].num == 1024 and starts[1].enabled
    # the memfd the device saw was closed after the call; ring fds are held by the server
    assert dev.mem_fd_inodes and not dev.mem_fd_inodes & open_inodes()
    assert h.session.vrings[0].started and h.session.vrings[0].kick_fd == v0.kick_fd

    # MSI-X unmask on a running ring: the device hears about the new call fd
    assert h.ack(R.SET_VRING_CALL, p.pack_u64(1), fds=[eventfd()]) == 0
    assert dev.last("set_vring_call")[1] == 1
    assert dev.last("set_vring_call")[2] == h.session.vrings[1].call_fd
    # the second queue pair, enabled later; started rings are told
    h.setup_ring(2)
    assert dev.last("start_vring")[1].enabled is False
    assert h.ack(R.SET_VRING_ENABLE, VRING_STATE.pack(2, 1)) == 0
    assert dev.last("enable_vring")[1:] == (2, True)

    # vhost_dev_stop: GET_VRING_BASE stops the ring and returns the device's index
    dev.bases = {0: 4242, 1: 17}
    assert h.get(R.GET_VRING_BASE, VRING_STATE.pack(0, 0)) == VRING_STATE.pack(0, 4242)
    assert h.get(R.GET_VRING_BASE, VRING_STATE.pack(1, 0)) == VRING_STATE.pack(1, 17)
    assert dev.names().count("stop_vring") == 2
    assert not h.session.vrings[0].started

    log = messages(caplog)
    assert f"negotiated virtio features 0x{ACKED:x}: NET_MRG_RXBUF RING_EVENT_IDX " \
           "PROTOCOL_FEATURES VERSION_1" in log
    assert "negotiated protocol features 0x9: MQ REPLY_ACK" in log
    assert sum(m.startswith("negotiated virtio features") for m in log) == 1
    # every message is debug-logged with its header fields
    assert any(m.startswith("rx SET_VRING_ADDR (9): flags=0x9 [v1|NEED_REPLY] size=40") for m in log)
    assert any("SET_VRING_ADDR: index=0 flags=0x0 desc=0x7f0000001000 used=0x7f0000003000 "
               "avail=0x7f0000002000 log=0x0" in m for m in log)
    assert not messages(caplog, logging.WARNING)


def test_rings_start_enabled_without_protocol_features(make):
    """Without bit 30 the rings are enabled at SET_FEATURES; SET_VRING_ENABLE is refused."""
    h = make(RecordingDevice(F_VERSION_1 | F_MRG, protocol=0))
    assert p.unpack_u64(h.get(R.GET_FEATURES)) == F_VERSION_1 | F_MRG
    # GET_PROTOCOL_FEATURES without bit 30 offered: error-shaped reply (u64 0)
    assert p.unpack_u64(h.get(R.GET_PROTOCOL_FEATURES)) == 0
    h.no_reply(R.SET_OWNER)
    assert not any(v.enabled for v in h.session.vrings)
    h.no_reply(R.SET_FEATURES, p.pack_u64(F_VERSION_1))
    assert all(v.enabled for v in h.session.vrings)
    h.no_reply(R.SET_MEM_TABLE, p.pack_mem_table([MemRegion(0, MiB, 0, 0)]), fds=[memfd()])
    h.no_reply(R.SET_VRING_NUM, VRING_STATE.pack(0, 64))
    h.no_reply(R.SET_VRING_ADDR, addr(0))
    h.no_reply(R.SET_VRING_KICK, p.pack_u64(0), fds=[eventfd()])
    assert h.dev.last("start_vring")[1].enabled is True
    n = len(h.dev.calls)
    h.no_reply(R.SET_VRING_ENABLE, VRING_STATE.pack(0, 0))
    assert len(h.dev.calls) == n and h.session.vrings[0].enabled


def test_kick_without_fd_starts_polling_ring(h):
    h.negotiate()
    h.mem_table()
    assert h.ack(R.SET_VRING_NUM, VRING_STATE.pack(1, 128)) == 0
    assert h.ack(R.SET_VRING_ADDR, addr(1)) == 0
    assert h.ack(R.SET_VRING_KICK, p.pack_u64(1 | 0x100)) == 0
    assert h.dev.last("start_vring")[1].kick_fd is None


def test_second_kick_restarts_ring_from_device_base(h):
    h.negotiate()
    h.mem_table()
    h.setup_ring(0)
    h.dev.bases[0] = 99
    assert h.ack(R.SET_VRING_KICK, p.pack_u64(0), fds=[eventfd()]) == 0
    assert h.dev.names()[-2:] == ["stop_vring", "start_vring"]
    assert h.dev.last("start_vring")[1].base == 99


def test_get_vring_base_of_stopped_ring_returns_frontend_base(h):
    h.negotiate()
    assert h.ack(R.SET_VRING_BASE, VRING_STATE.pack(3, 0x1234)) == 0
    assert h.get(R.GET_VRING_BASE, VRING_STATE.pack(3, 0)) == VRING_STATE.pack(3, 0x1234)
    assert "stop_vring" not in h.dev.names()


def test_get_vring_base_returns_device_value_once(h):
    h.negotiate()
    h.mem_table()
    h.setup_ring(1)
    h.dev.bases[1] = 0xBEEF
    assert h.get(R.GET_VRING_BASE, VRING_STATE.pack(1, 0)) == VRING_STATE.pack(1, 0xBEEF)
    # stopped now: asking again does not stop it twice, and returns the same value
    assert h.get(R.GET_VRING_BASE, VRING_STATE.pack(1, 0)) == VRING_STATE.pack(1, 0xBEEF)
    assert h.dev.names().count("stop_vring") == 1


def test_device_returning_garbage_base_is_fatal(h):
    h.negotiate()
    h.mem_table()
    h.setup_ring(0, base=5)
    h.dev.bases[0] = 0x10000            # > 16 bits on a split ring
    assert not h.run(R.GET_VRING_BASE, VRING_STATE.pack(0, 0))
    assert h.fe.reply()[1] == VRING_STATE.pack(0, 5)   # error-shaped: last known base
    assert h.fe.at_eof()


# --- REPLY_ACK ---------------------------------------------------------------------

def test_reply_ack(h):
    # before REPLY_ACK is negotiated NEED_REPLY is ignored
    h.no_reply(R.SET_OWNER, need_reply=True)
    h.no_reply(R.SET_VRING_NUM, VRING_STATE.pack(0, 3), need_reply=True)    # fails, silently
    h.no_reply(R.SET_PROTOCOL_FEATURES, p.pack_u64(bit(PF.REPLY_ACK)))
    assert h.session.reply_ack
    assert h.ack(R.SET_OWNER) == 0
    assert h.ack(R.SET_VRING_NUM, VRING_STATE.pack(0, 256)) == 0
    assert h.ack(R.SET_VRING_NUM, VRING_STATE.pack(0, 3)) == 1          # not a power of two
    # without NEED_REPLY, no reply even with REPLY_ACK on
    h.no_reply(R.SET_VRING_NUM, VRING_STATE.pack(0, 512))
    assert h.session.vrings[0].num == 512
    # a request with a natural reply gets exactly one reply, NEED_REPLY or not
    body = h.get(R.GET_QUEUE_NUM, need_reply=True)
    assert p.unpack_u64(body) == 2 and not h.fe.pending()


# --- refusals that close the connection -----------------------------------------

@pytest.mark.parametrize("need_reply", [True, False])
def test_legacy_frontend_refused(h, caplog, need_reply):
    h.no_reply(R.SET_PROTOCOL_FEATURES, p.pack_u64(bit(PF.REPLY_ACK)))
    alive = h.run(R.SET_FEATURES, p.pack_u64(F_MRG | F_PROTOCOL), need_reply=need_reply)
    assert not alive and h.session.closed
    if need_reply:
        hdr, body = h.fe.reply()
        assert hdr.request == R.SET_FEATURES and p.unpack_u64(body) == 1
    assert h.fe.at_eof()
    assert "set_features" not in h.dev.names()
    assert h.dev.names()[-1] == "reset"
    assert any("legacy virtio frontend (no VERSION_1) is not supported" in m
               for m in messages(caplog, logging.ERROR))


def test_truncated_payload_closes_connection(h, caplog):
    # header promises a 40-byte SET_VRING_ADDR, with an fd; only 10 bytes come
    h.fe.send(R.SET_VRING_ADDR, addr(0)[:10], size=40, fds=[eventfd()])
    assert h.session.handle_one(timeout=1.0)            # waits for the rest
    h.fe.sock.shutdown(socket.SHUT_WR)
    assert not h.session.handle_one(timeout=1.0)
    assert h.session.closed and h.dev.names() == ["reset"]
    assert any("truncated SET_VRING_ADDR message: payload is 10 of 40 bytes" in m
               for m in messages(caplog, logging.ERROR))


def test_truncated_header_closes_connection(h, caplog):
    h.fe.sock.sendall(HEADER.pack(R.GET_FEATURES, VERSION, 0)[:5])
    h.fe.sock.shutdown(socket.SHUT_WR)
    assert not h.session.handle_one(timeout=1.0)
    assert h.session.closed and h.dev.names() == ["reset"]
    assert any("header is 5 of 12 bytes" in m for m in messages(caplog, logging.ERROR))


def test_oversized_size_field_closes_connection(h, caplog):
    # no payload needs to follow: the size alone is unacceptable
    h.fe.send(R.SET_MEM_TABLE, b"", size=p.MAX_PAYLOAD + 1, fds=[memfd()], need_reply=True)
    assert not h.session.handle_one(timeout=1.0)
    assert h.fe.at_eof()
    assert any("payload size 4097 exceeds 4096 bytes" in m for m in messages(caplog, logging.ERROR))


def test_fatal_device_error_replies_then_closes(h):
    h.negotiate()
    h.dev.fail["set_mem_table"] = MemoryTableError("region 0 is not 2 MiB aligned")
    regions = [MemRegion(0, MiB, 0x1000, 0)]
    assert not h.run(R.SET_MEM_TABLE, p.pack_mem_table(regions), fds=[memfd()], need_reply=True)
    assert p.unpack_u64(h.fe.reply()[1]) == 1
    assert h.fe.at_eof()
    assert h.dev.names()[-1] == "reset"


def test_unexpected_device_exception_is_fatal_not_a_crash(h, caplog):
    h.negotiate()
    h.mem_table()
    h.dev.fail["start_vring"] = RuntimeError("bug")
    assert h.ack(R.SET_VRING_NUM, VRING_STATE.pack(0, 8)) == 0
    assert h.ack(R.SET_VRING_ADDR, addr(0)) == 0
    assert not h.run(R.SET_VRING_KICK, p.pack_u64(0), fds=[eventfd()], need_reply=True)
    assert p.unpack_u64(h.fe.reply()[1]) == 1
    assert h.session.closed
    assert any("device failure RuntimeError: bug" in m for m in messages(caplog, logging.ERROR))


# --- refusals that keep the connection ----------------------------------------------

def test_nonfatal_device_error(h, caplog):
    h.no_reply(R.SET_PROTOCOL_FEATURES, p.pack_u64(bit(PF.REPLY_ACK)))
    h.dev.fail["set_features"] = VhostError("EVENT_IDX needs a newer datapath")
    assert h.ack(R.SET_FEATURES, p.pack_u64(ACKED)) == 1
    assert not h.session.features_set
    del h.dev.fail["set_features"]
    assert h.ack(R.SET_FEATURES, p.pack_u64(ACKED)) == 0
    assert any("refused by the device: EVENT_IDX needs a newer datapath" in m
               for m in messages(caplog, logging.ERROR))


def test_unknown_request_gets_error_and_server_keeps_serving(h, caplog):
    h.negotiate()
    assert h.ack(99) == 1
    assert h.ack(99) == 1
    h.no_reply(0xFFFF_FFFF, b"\xAA" * 16)
    assert p.unpack_u64(h.get(R.GET_FEATURES)) & F_VERSION_1
    warnings = messages(caplog, logging.WARNING)
    assert sum("UNKNOWN(99)" in m for m in warnings) == 1       # once per request number
    assert sum("UNKNOWN(4294967295)" in m for m in warnings) == 1


def test_unimplemented_requests(h, caplog):
    h.negotiate()
    # known requests the frontend waits on get an error-shaped reply of their shape
    assert h.get(R.GET_CONFIG, p.HEADER.pack(0, 10, 0)) == b""
    assert p.unpack_u64(h.get(R.GET_STATUS)) == 0
    assert p.unpack_u64(h.get(R.IOTLB_MSG, b"\0" * 32)) == 1
    assert h.get(R.GET_INFLIGHT_FD, b"\0" * 24) == b"\0" * 24
    assert h.get(R.POSTCOPY_ADVISE) == b""
    # others only answer REPLY_ACK, with failure
    assert h.ack(R.SET_LOG_BASE, b"\0" * 16, fds=[memfd()]) == 1
    assert h.ack(R.POSTCOPY_LISTEN) == 1
    assert h.ack(R.SEND_RARP, b"\0" * 8) == 1
    h.no_reply(R.SET_LOG_FD, fds=[eventfd()])
    warnings = messages(caplog, logging.WARNING)
    assert any("POSTCOPY_ADVISE (28) refused: postcopy migration is not supported" in m
               and "silently lose frames" in m for m in warnings)
    assert any("SET_LOG_BASE (6) refused: dirty-page logging" in m for m in warnings)


def test_reset_device_only_if_offered(h, make, caplog):
    h.negotiate()
    h.mem_table()
    h.setup_ring(0)
    fds_before = open_fds()
    assert h.ack(R.RESET_DEVICE) == 0
    assert h.dev.names()[-1] == "reset"
    assert not any(v.started or v.kick_fd or v.call_fd for v in h.session.vrings)
    assert len(fds_before - open_fds()) == 2          # kick and call fds released
    assert not h.session.features_set
    assert h.session.reply_ack                         # protocol features survive
    # a device that does not offer it: not handled
    h2 = make(RecordingDevice(protocol=bit(PF.REPLY_ACK)))
    h2.no_reply(R.SET_PROTOCOL_FEATURES, p.pack_u64(bit(PF.REPLY_ACK)))
    assert h2.ack(R.RESET_DEVICE) == 1
    assert "reset" not in h2.dev.names()
    assert any("RESET_DEVICE was not offered" in m for m in messages(caplog, logging.WARNING))


def test_reset_owner_resets_device_and_rings(h):
    h.negotiate()
    h.mem_table()
    h.setup_ring(1)
    assert h.ack(R.RESET_OWNER) == 0
    assert h.dev.names()[-1] == "reset"
    assert not h.session.vrings[1].started and not h.session.owner


def test_features_not_offered(h, caplog):
    h.no_reply(R.SET_PROTOCOL_FEATURES, p.pack_u64(bit(PF.REPLY_ACK)))
    assert h.ack(R.SET_FEATURES, p.pack_u64(ACKED | F_LOG_ALL)) == 1       # masked out
    assert h.ack(R.SET_FEATURES, p.pack_u64(ACKED | bit(VF.RING_PACKED))) == 1
    assert "set_features" not in h.dev.names()
    assert h.ack(R.SET_PROTOCOL_FEATURES, p.pack_u64(bit(PF.PAGEFAULT) | bit(PF.REPLY_ACK))) == 1
    assert h.ack(R.SET_PROTOCOL_FEATURES, p.pack_u64(bit(PF.LOG_SHMFD))) == 1
    errors = messages(caplog, logging.ERROR)
    assert any("features not offered: 0x4000000 (LOG_ALL)" in m for m in errors)
    assert any("protocol features not offered: 0x100 (PAGEFAULT)" in m for m in errors)


def test_bad_header_version(h, caplog):
    h.no_reply(R.SET_PROTOCOL_FEATURES, p.pack_u64(bit(PF.REPLY_ACK)))
    assert h.ack(R.SET_OWNER, flags=2 | FLAG_NEED_REPLY) == 1
    # a request with a natural reply still gets one (error-shaped)
    assert p.unpack_u64(h.get(R.GET_FEATURES, flags=0)) == 0
    assert not h.session.owner
    assert any("header version 2, expected 1" in m for m in messages(caplog, logging.ERROR))


@pytest.mark.parametrize("request_, payload", [
    (R.SET_OWNER, b"\0" * 8),
    (R.SET_FEATURES, b"\0" * 4),
    (R.SET_FEATURES, b"\0" * 16),
    (R.SET_PROTOCOL_FEATURES, b""),
    (R.SET_VRING_NUM, VRING_STATE.pack(0, 256) + b"\0" * 4),
    (R.SET_VRING_BASE, b"\0" * 4),
    (R.SET_VRING_ENABLE, b"\0" * 9),
    (R.SET_VRING_ADDR, addr(0)[:32]),
    (R.SET_VRING_ADDR, addr(0) + b"\0" * 8),
    (R.SET_VRING_CALL, b"\0" * 4),
    (R.SET_VRING_ERR, b"\0" * 12),
    (R.RESET_OWNER, b"\0"),
    (R.SET_MEM_TABLE, b""),
    (R.SET_MEM_TABLE, p.MEM_TABLE_HEAD.pack(0, 0)),
    (R.SET_MEM_TABLE, p.MEM_TABLE_HEAD.pack(9, 0) + b"\0" * 288),
    (R.SET_MEM_TABLE, p.MEM_TABLE_HEAD.pack(2, 0) + b"\0" * 32),
    (R.SET_MEM_TABLE, p.MEM_TABLE_HEAD.pack(1, 0) + b"\0" * 300),
    (R.SET_MEM_TABLE, p.pack_mem_table([MemRegion(0, 0, 0, 0)])),           # empty region
    (R.SET_MEM_TABLE, p.pack_mem_table([MemRegion(2**64 - 4096, 8192, 0, 0)])),  # wraps
])
def test_wrong_payload(h, caplog, request_, payload):
    h.no_reply(R.SET_PROTOCOL_FEATURES, p.pack_u64(bit(PF.REPLY_ACK)))
    calls = list(h.dev.calls)
    fds = [memfd()] if request_ == R.SET_MEM_TABLE else []
    assert h.ack(request_, payload, fds=fds) == 1
    assert h.dev.calls == calls
    assert messages(caplog, logging.ERROR)[-1].startswith(request_.name + ": ")


@pytest.mark.parametrize("request_", [R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM])
def test_wrong_payload_on_get_gets_error_shaped_reply(h, request_):
    assert h.get(request_, b"\0" * 8) == p.pack_u64(0)


def test_wrong_fd_counts_never_leak(h, fd_baseline):
    h.negotiate()
    one = p.pack_mem_table([MemRegion(0, MiB, 0, 0)])
    two = p.pack_mem_table([MemRegion(0, MiB, 0, 0), MemRegion(MiB, MiB, MiB, 0)])
    cases = [   # (request, payload, fd factory); fds are made right before sending
        (R.SET_OWNER, b"", lambda: [eventfd(), eventfd()]),
        (R.GET_FEATURES, b"", lambda: [eventfd()]),
        (R.SET_VRING_KICK, p.pack_u64(0 | 0x100), lambda: [eventfd()]),    # no-fd flag + an fd
        (R.SET_VRING_KICK, p.pack_u64(0), lambda: []),                     # fd expected
        (R.SET_VRING_CALL, p.pack_u64(1), lambda: [eventfd(), eventfd()]),
        (R.SET_VRING_ERR, p.pack_u64(1), lambda: [memfd()]),               # not an eventfd/pipe
        (R.SET_MEM_TABLE, one, lambda: [memfd(), memfd()]),
        (R.SET_MEM_TABLE, two, lambda: [memfd()]),
        (R.SET_VRING_CALL, p.pack_u64(0), lambda: [eventfd() for _ in range(10)]),  # > MAX_FDS
        (R.SET_MEM_TABLE, one, lambda: [memfd() for _ in range(9)]),
    ]
    calls = list(h.dev.calls)
    for request_, payload, make in cases:
        if request_ == R.GET_FEATURES:
            assert h.get(request_, payload, fds=make()) == p.pack_u64(0)
        else:
            assert h.ack(request_, payload, fds=make()) == 1, request_.name
        # the only fds open beyond the baseline are the two ends of the socketpair
        assert len(open_fds() - fd_baseline) == 2, request_.name
    assert h.dev.calls == calls
    # pipes are notifiers too
    r, w = os.pipe()
    os.close(r)
    assert h.ack(R.SET_VRING_ERR, p.pack_u64(1), fds=[w]) == 0
    assert h.session.vrings[1].err_fd is not None
    assert len(open_fds() - fd_baseline) == 3


def test_vring_index_out_of_range(h, caplog):
    h.negotiate()          # 2 queue pairs -> vrings 0..3
    h.mem_table()
    assert h.ack(R.SET_VRING_NUM, VRING_STATE.pack(4, 256)) == 1
    assert h.ack(R.SET_VRING_BASE, VRING_STATE.pack(0xFFFF_FFFF, 0)) == 1
    assert h.ack(R.SET_VRING_ADDR, addr(200)) == 1
    assert h.ack(R.SET_VRING_ENABLE, VRING_STATE.pack(4, 1)) == 1
    assert h.ack(R.SET_VRING_KICK, p.pack_u64(255), fds=[eventfd()]) == 1
    assert h.ack(R.SET_VRING_CALL, p.pack_u64(4 | 0x100)) == 1
    assert h.ack(R.SET_VRING_KICK, p.pack_u64(0 | 1 << 9), fds=[eventfd()]) == 1    # reserved bit
    assert h.get(R.GET_VRING_BASE, VRING_STATE.pack(7, 0)) == VRING_STATE.pack(7, 0)
    assert not any(c[0] in ("start_vring", "stop_vring") for c in h.dev.calls)
    assert any("vring index 4 out of range (device has 4 vrings, 2 queue pairs)" in m
               for m in messages(caplog, logging.ERROR))


def test_vring_value_validation(h):
    h.negotiate()
    h.mem_table()
    for num in (0, 3, 1000, 65536):
        assert h.ack(R.SET_VRING_NUM, VRING_STATE.pack(0, num)) == 1, num
    assert h.ack(R.SET_VRING_NUM, VRING_STATE.pack(0, 32768)) == 0
    assert h.ack(R.SET_VRING_BASE, VRING_STATE.pack(0, 0x10000)) == 1          # split: 16 bits
    assert h.ack(R.SET_VRING_ADDR, addr(0, desc=0x1008)) == 1                   # misaligned
    assert h.ack(R.SET_VRING_ADDR, addr(0, used=0x3002)) == 1
    assert h.ack(R.SET_VRING_ADDR, addr(0, flags=p.VRING_F_LOG)) == 1           # no logging
    assert h.ack(R.SET_VRING_ADDR, addr(0, flags=2)) == 1
    assert h.ack(R.SET_VRING_ENABLE, VRING_STATE.pack(0, 2)) == 1
    # kick before the ring is configured
    assert h.ack(R.SET_VRING_KICK, p.pack_u64(0), fds=[eventfd()]) == 1         # no ADDR yet
    assert h.ack(R.SET_VRING_ADDR, addr(0)) == 0
    assert h.ack(R.SET_VRING_KICK, p.pack_u64(0), fds=[eventfd()]) == 0
    # a started ring's geometry is frozen; repeating the same addresses is harmless
    assert h.ack(R.SET_VRING_NUM, VRING_STATE.pack(0, 64)) == 1
    assert h.ack(R.SET_VRING_BASE, VRING_STATE.pack(0, 1)) == 1
    assert h.ack(R.SET_VRING_ADDR, addr(0, desc=0x9000)) == 1
    assert h.ack(R.SET_VRING_ADDR, addr(0)) == 0
    assert h.dev.names().count("start_vring") == 1


def test_kick_before_set_features_refused(h):
    h.no_reply(R.SET_PROTOCOL_FEATURES, p.pack_u64(bit(PF.REPLY_ACK)))
    assert h.ack(R.SET_VRING_NUM, VRING_STATE.pack(0, 64)) == 0
    assert h.ack(R.SET_VRING_ADDR, addr(0)) == 0
    assert h.ack(R.SET_VRING_KICK, p.pack_u64(0), fds=[eventfd()]) == 1
    assert "start_vring" not in h.dev.names()


def test_disconnect_resets_and_releases_ring_fds(fd_baseline):
    a, b = socket.socketpair()
    dev = RecordingDevice()
    h = Harness(Frontend(a), VhostUserSession(b, dev), dev)
    h.negotiate()
    h.mem_table()
    h.setup_ring(0)
    assert len(open_fds() - fd_baseline) == 4        # socketpair + kick + call
    a.close()
    assert not h.session.handle_one(timeout=1.0)
    assert dev.names()[-1] == "reset"
    assert open_fds() == fd_baseline


# --- fuzzing ------------------------------------------------------------------------

HANDLED = [R.GET_FEATURES, R.SET_FEATURES, R.SET_OWNER, R.RESET_OWNER, R.SET_MEM_TABLE,
           R.SET_VRING_NUM, R.SET_VRING_ADDR, R.SET_VRING_BASE, R.GET_VRING_BASE,
           R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR, R.GET_PROTOCOL_FEATURES,
           R.SET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.SET_VRING_ENABLE, R.RESET_DEVICE]

small_state = st.builds(VRING_STATE.pack, st.integers(0, 5),
                        st.sampled_from([0, 1, 2, 3, 64, 256, 0xFFFF, 0x10000, 2**32 - 1]))
payloads = st.one_of(
    st.binary(max_size=300),
    small_state,
    st.builds(p.pack_u64, st.sampled_from([0, 1, 0x100, 0x101, 0x205, ACKED, ACKED | F_LOG_ALL,
                                           bit(PF.REPLY_ACK) | bit(PF.MQ), bit(PF.PAGEFAULT),
                                           2**64 - 1])),
    st.builds(lambda i, f: addr(i, flags=f), st.integers(0, 5), st.sampled_from([0, 1, 2])),
    st.builds(p.pack_mem_table, st.lists(st.builds(MemRegion, st.sampled_from([0, MiB]),
                                                   st.sampled_from([0, MiB, 2**64 - 1]),
                                                   st.sampled_from([0, 0x7F00_0000_0000]),
                                                   st.just(0)), min_size=0, max_size=9)),
)


@st.composite
def chunks(draw):
    """One write of the fuzzing frontend: a message (maybe lying about itself) or raw bytes."""
    if draw(st.integers(0, 9)) == 0:
        data = draw(st.binary(min_size=1, max_size=40))
    else:
        request_ = draw(st.one_of(st.sampled_from(HANDLED), st.sampled_from(list(R)),
                                  st.integers(0, 2**32 - 1)))
        flags = draw(st.one_of(st.sampled_from([1, 1 | FLAG_NEED_REPLY]), st.integers(0, 2**32 - 1)))
        payload = draw(payloads)
        size = len(payload)
        lie = draw(st.integers(0, 5))
        if lie == 0:
            size = draw(st.integers(0, 2**32 - 1))
        elif lie == 1:
            size = max(0, size + draw(st.integers(-16, 16)))
        data = HEADER.pack(request_, flags, size) + payload
    nfds = draw(st.sampled_from([0, 0, 0, 1, 1, 2, 8, 9, 12]))
    kinds = draw(st.lists(st.sampled_from(["eventfd", "memfd", "pipe"]), min_size=nfds,
                          max_size=nfds))
    return data, kinds


def _make_fd(kind: str) -> int:
    if kind == "eventfd":
        return eventfd()
    if kind == "memfd":
        return memfd(4096)
    r, w = os.pipe()
    os.close(r)
    return w


class _InternalErrors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record):
        if "internal error" in record.getMessage():
            self.records.append(record.getMessage())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.booleans(), stream=st.lists(chunks(), max_size=12),
       failing=st.one_of(st.none(), st.tuples(
           st.sampled_from(["set_features", "set_mem_table", "start_vring", "stop_vring",
                            "set_vring_call", "enable_vring", "set_protocol_features"]),
           st.sampled_from([VhostError("no"), VhostError("fatal", fatal=True),
                            MemoryTableError("bad"), RuntimeError("bug")]))))
def test_fuzz_random_streams_never_crash_or_leak(prefix, stream, failing):
    logger = logging.getLogger("xdpnet.vhost")
    watcher = _InternalErrors()
    logger.addHandler(watcher)
    before = open_fds()
    a, b = socket.socketpair()
    a.setblocking(False)
    dev = RecordingDevice()
    session = VhostUserSession(b, dev, label="fuzz")
    if failing:
        dev.fail[failing[0]] = failing[1]

    def pump() -> None:
        # let the session consume what is there; drain its replies so the pipe never fills
        for _ in range(100):
            if session.closed or not select.select([b], [], [], 0)[0]:
                break
            assert session.handle_one(0) in (True, False)
        try:
            while a.recv(65536):
                pass
        except (BlockingIOError, ConnectionResetError):
            pass

    try:
        writes: list[tuple[bytes, list[str]]] = []
        if prefix:      # a real negotiation first, so rings can actually start
            writes += [(p.pack_message(R.SET_PROTOCOL_FEATURES, p.pack_u64(0b1001)), []),
                       (p.pack_message(R.SET_FEATURES, p.pack_u64(ACKED)), []),
                       (p.pack_message(R.SET_MEM_TABLE,
                                       p.pack_mem_table([MemRegion(0, MiB, 0, 0)])), ["memfd"]),
                       (p.pack_message(R.SET_VRING_NUM, VRING_STATE.pack(0, 256)), []),
                       (p.pack_message(R.SET_VRING_ADDR, addr(0)), [])]
        writes += stream
        for data, kinds in writes:
            fds = [_make_fd(k) for k in kinds]
            try:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                a.sendmsg([data], anc)
            except OSError:
                pass                    # the session already hung up on us
            finally:
                for fd in fds:
                    os.close(fd)
            pump()
        a.close()
        for _ in range(100):
            if not session.handle_one(0):
                break
        assert session.closed
        assert dev.names()[-1] == "reset"
    finally:
        session.close()
        a.close()
        logger.removeHandler(watcher)
    assert open_fds() == before
    assert watcher.records == []


# --- the listening server -------------------------------------------------------------

def connect(path: str) -> Frontend:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return Frontend(s)


@pytest.fixture
def served(tmp_path):
    """A server on a real path, run by serve_forever in a background thread."""
    dev = RecordingDevice()
    path = str(tmp_path / "vhost.sock")
    server = VhostUserServer(path, dev)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(stop,), daemon=True)
    thread.start()
    yield server, dev, path
    stop.set()
    server.stop()
    thread.join(2)
    assert not thread.is_alive()
    server.close()


def get_features(fe: Frontend) -> int:
    fe.send(R.GET_FEATURES)
    hdr, body = fe.reply()
    assert hdr.request == R.GET_FEATURES
    return p.unpack_u64(body)


def test_server_serves_one_frontend_at_a_time_and_reconnects(served, caplog):
    caplog.set_level(logging.INFO, logger="xdpnet.vhost")
    server, dev, path = served
    fe1 = connect(path)
    assert get_features(fe1) & F_VERSION_1
    assert server.connected
    # a second concurrent frontend is refused; the first keeps working
    fe2 = connect(path)
    assert fe2.at_eof()
    assert get_features(fe1) & F_VERSION_1
    assert any("second vhost-user frontend" in m for m in messages(caplog, logging.WARNING))
    # the first goes away: device reset, then the next one is served (QEMU reconnects)
    fe1.sock.close()
    assert wait_for(lambda: "reset" in dev.names())
    assert wait_for(lambda: not server.connected)
    fe3 = connect(path)
    assert get_features(fe3) & F_VERSION_1
    fe3.send(R.SET_OWNER)
    assert wait_for(lambda: server.session is not None and server.session.owner)
    fe2.sock.close()
    fe3.sock.close()


def test_server_stops_promptly(tmp_path):
    server = VhostUserServer(str(tmp_path / "s"), RecordingDevice())
    try:
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 30})
        thread.start()
        time.sleep(0.05)
        t0 = time.monotonic()
        server.stop()
        thread.join(2)
        assert not thread.is_alive() and time.monotonic() - t0 < 0.5
        # a bare stop_event is noticed within poll_interval
        stop = threading.Event()
        server2 = VhostUserServer(str(tmp_path / "s2"), RecordingDevice())
        thread = threading.Thread(target=server2.serve_forever, args=(stop, 0.05))
        thread.start()
        stop.set()
        thread.join(1)
        assert not thread.is_alive()
        server2.close()
    finally:
        server.close()


def test_server_without_threads_via_fileno(tmp_path, fd_baseline):
    dev = RecordingDevice()
    path = str(tmp_path / "s")
    with VhostUserServer(path, dev) as server:
        assert not server.handle_one(0)            # nothing to do
        fe = connect(path)
        assert select.select([server], [], [], 2)[0]
        assert server.handle_one(0) and server.connected
        fe.send(R.GET_QUEUE_NUM)
        assert select.select([server], [], [], 2)[0]
        assert server.handle_one(0)
        assert p.unpack_u64(fe.reply()[1]) == 2
        fe.send(R.SET_VRING_CALL, p.pack_u64(0), fds=[eventfd()])
        assert select.select([server], [], [], 2)[0]
        assert server.handle_one(0)
        assert server.session.vrings[0].call_fd is not None and not fe.pending()
        fe.sock.close()
        while server.connected:
            server.handle_one(1)
        assert dev.names() == ["reset"]
    assert not os.path.exists(path)


def test_busy_path_refused(served, tmp_path):
    server, dev, path = served
    with pytest.raises(BusyError) as err:
        VhostUserServer(path, RecordingDevice())
    assert str(err.value) == f"vhost-user socket {path} is in use by another process"
    assert err.value.exit_code == 4
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    # the original server still serves, and the probe does not make it refuse the next frontend
    fe = connect(path)
    assert get_features(fe) & F_VERSION_1
    fe.sock.close()


def test_stale_socket_is_replaced(tmp_path):
    path = str(tmp_path / "stale.sock")
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(path)
    old.close()                          # file stays, nobody listens
    with VhostUserServer(path, RecordingDevice()) as server:
        fe = connect(path)
        server.handle_one(1)
        assert server.connected
        fe.sock.close()
    assert not os.path.exists(path)


def test_non_socket_path_refused(tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_text("keep me")
    with pytest.raises(UsageError, match="exists and is not a socket"):
        VhostUserServer(str(path), RecordingDevice())
    assert path.read_text() == "keep me"
    with pytest.raises(UsageError):
        VhostUserServer(str(tmp_path / "no-such-dir" / "s"), RecordingDevice())


def test_socket_mode_and_group(tmp_path):
    path = str(tmp_path / "s")
    with VhostUserServer(path, RecordingDevice()):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    group = grp.getgrgid(os.getgid()).gr_name
    with VhostUserServer(path, RecordingDevice(), group=group):
        st_ = os.stat(path)
        assert stat.S_IMODE(st_.st_mode) == 0o660 and st_.st_gid == os.getgid()
    with pytest.raises(UsageError, match="unknown group"):
        VhostUserServer(path, RecordingDevice(), group="no-such-group-xdpnet")
    assert not os.path.exists(path)


def test_close_removes_only_our_socket_file(tmp_path):
    path = str(tmp_path / "s")
    server = VhostUserServer(path, RecordingDevice())
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    os.unlink(path)                      # someone replaced it
    with open(path, "w") as f:
        f.write("other")
    server.close()
    server.close()                       # idempotent
    assert open(path).read() == "other"


# --- less travelled paths ------------------------------------------------------------

def test_request_table_is_what_the_server_implements():
    from xdpnet.vhost.server import handler_names
    assert set(handler_names().values()) == {
        "GET_FEATURES", "SET_FEATURES", "SET_OWNER", "RESET_OWNER", "SET_MEM_TABLE",
        "SET_VRING_NUM", "SET_VRING_ADDR", "SET_VRING_BASE", "GET_VRING_BASE", "SET_VRING_KICK",
        "SET_VRING_CALL", "SET_VRING_ERR", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
        "GET_QUEUE_NUM", "SET_VRING_ENABLE", "RESET_DEVICE"}
    assert all(R(n).name == name for n, name in handler_names().items())


@pytest.mark.parametrize("reported, used", [(0, 1), (1, 1), (128, 128), (500, 128)])
def test_queue_pairs_are_clamped_to_what_the_index_can_carry(make, reported, used):
    h = make(RecordingDevice(queue_pairs=reported))
    assert p.unpack_u64(h.get(R.GET_QUEUE_NUM)) == used
    assert len(h.session.vrings) == 2 * used


def test_more_ring_preconditions(h, caplog):
    h.negotiate()
    h.mem_table()
    assert h.ack(R.SET_VRING_ADDR, addr(0)) == 0
    assert h.ack(R.SET_VRING_KICK, p.pack_u64(0), fds=[eventfd()]) == 1       # no NUM yet
    assert h.ack(R.SET_VRING_CALL, p.pack_u64(0 | 1 << 40), fds=[eventfd()]) == 1
    assert "start_vring" not in h.dev.names()
    errors = messages(caplog, logging.ERROR)
    assert "SET_VRING_KICK: vring 0: SET_VRING_NUM has not been received" in errors
    assert "SET_VRING_CALL: reserved payload bits set: 0x10000000000" in errors


def test_set_protocol_features_when_bit30_not_offered(make):
    h = make(RecordingDevice(F_VERSION_1, protocol=bit(PF.REPLY_ACK)))
    h.no_reply(R.SET_PROTOCOL_FEATURES, p.pack_u64(bit(PF.REPLY_ACK)))
    assert not h.session.reply_ack and "set_protocol_features" not in h.dev.names()


def test_set_features_without_bit30_enables_started_rings(h):
    h.negotiate()
    h.mem_table()
    h.setup_ring(0)
    assert not h.session.vrings[0].enabled
    assert h.ack(R.SET_FEATURES, p.pack_u64(F_VERSION_1 | F_MRG)) == 0
    assert h.dev.last("enable_vring")[1:] == (0, True)
    assert all(v.enabled for v in h.session.vrings)


def test_internal_error_closes_the_connection_not_the_caller(h, caplog, monkeypatch):
    def boom(self):
        raise KeyError("bug")
    monkeypatch.setattr(VhostUserSession, "_read_message", boom)
    h.fe.send(R.GET_FEATURES)
    assert not h.session.handle_one(timeout=1.0)
    assert h.fe.at_eof() and h.dev.names() == ["reset"]
    assert any("internal error KeyError" in m for m in messages(caplog, logging.ERROR))


def test_device_reset_failure_is_logged_not_raised(h, caplog):
    h.dev.fail["reset"] = RuntimeError("stuck")
    h.session.close()
    assert h.session.closed and h.session.fileno() == -1
    assert any("device reset after disconnect failed: RuntimeError: stuck" in m
               for m in messages(caplog, logging.ERROR))


def test_frontend_that_never_reads_replies_is_dropped(make, caplog, monkeypatch):
    import xdpnet.vhost.server as server_mod
    monkeypatch.setattr(server_mod, "SEND_TIMEOUT", 0.2)
    h = make(RecordingDevice())
    h.session._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    h.fe.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    h.fe.sock.setblocking(False)
    request = HEADER.pack(R.GET_FEATURES, VERSION, 0)
    t0 = time.monotonic()
    for _ in range(100000):
        try:
            h.fe.sock.send(request)
        except BlockingIOError:
            pass
        if not h.session.handle_one(0):
            break
    assert h.session.closed and time.monotonic() - t0 < 10
    assert any("frontend does not read its replies" in m for m in messages(caplog, logging.ERROR))


def test_connection_reset_by_peer(h, caplog):
    h.fe.send(R.GET_FEATURES)
    assert h.session.handle_one(1.0)
    # close with the reply unread: the backend sees ECONNRESET after the queued message
    h.fe.send(R.SET_OWNER)
    h.fe.sock.close()
    assert h.session.handle_one(1.0) and h.session.owner
    assert not h.session.handle_one(1.0)
    assert any("receive failed: Connection reset by peer" in m for m in messages(caplog, logging.INFO))


def test_hung_up_frontend_does_not_block_its_successor(tmp_path):
    """A frontend that connected and left (e.g. another instance's busy probe) is retired
    before its successor is judged a 'second frontend'."""
    dev = RecordingDevice()
    path = str(tmp_path / "s")
    with VhostUserServer(path, dev) as server:
        gone = connect(path)
        assert server.handle_one(1) and server.connected
        gone.sock.close()
        fe = connect(path)
        server._accept()            # the listener's event seen before the old session's EOF
        assert server.connected and dev.names() == ["reset"]
        fe.send(R.GET_QUEUE_NUM)
        server.handle_one(1)
        assert p.unpack_u64(fe.reply()[1]) == 2
        fe.sock.close()


def test_numeric_group_and_explicit_mode(tmp_path):
    path = str(tmp_path / "s")
    with VhostUserServer(path, RecordingDevice(), group=str(os.getgid()), socket_mode=0o640):
        st_ = os.stat(path)
        assert stat.S_IMODE(st_.st_mode) == 0o640 and st_.st_gid == os.getgid()

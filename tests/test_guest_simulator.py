"""Tests of the virtio-net driver simulator (xdpnet.guest, c/guest.c).

Two kinds:

* offline: the simulator lays out guest memory without a backend and the
  test plays the device in Python (reads the avail ring, writes used
  entries and frames), which pins down the driver's ring handling, kick
  and interrupt suppression, frame verification and guard checking;
* ``@pytest.mark.dpdk``: DPDK's ``dpdk-testpmd`` is the vhost-user backend
  (``net_vhost`` + ``macswap``), an independent implementation: frames we
  send come back MAC-swapped and are checked byte for byte, and testpmd's
  own counters are compared with ours.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import threading
import time
import uuid

import pytest

from xdpnet._native import ffi, lib
from xdpnet.errors import UsageError
from xdpnet.guest import DEFAULT_FEATURES, BackendRefused, VirtioNetSimulator
from xdpnet.net.mac import parse_mac
from xdpnet.vhost import protocol as P

F = P.VirtioFeature
PEER = "02:00:00:00:00:01"
GUARD = lib.XN_GUEST_GUARD_LEN
VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT = 1, 2, 4


def build_frame(length: int, dst: bytes, src: bytes, flow: int, seq: int) -> bytes:
    buf = ffi.new("uint8_t[]", length)
    assert lib.xn_frame_build(buf, length, dst, src, flow, seq) == length
    return bytes(ffi.buffer(buf, length))


def frame_info(frame: bytes):
    info = ffi.new("struct xn_frame_info *")
    rc = lib.xn_frame_check(frame, len(frame), info)
    return rc, (info.flow, info.seq, info.len)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# --- a device played in Python --------------------------------------------------

class FakeDevice:
    """The device side of one split virtqueue, reading and writing guest memory."""

    def __init__(self, sim: VirtioNetSimulator, pair: int = 0, ring: str = "rx"):
        self.sim = sim
        self.q = sim.config.queue_size
        self.desc, self.avail, self.used = sim.ring_gpas(pair, ring)
        self.last_avail = self.used_idx = sim.config.ring_base

    def u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.sim.read_guest(gpa, 2))[0]

    def put_u16(self, gpa: int, v: int) -> None:
        self.sim.write_guest(gpa, struct.pack("<H", v & 0xFFFF))

    def avail_idx(self) -> int:
        return self.u16(self.avail + 2)

    def avail_flags(self) -> int:
        return self.u16(self.avail)

    def used_event(self) -> int:
        return self.u16(self.avail + 4 + 2 * self.q)

    def set_avail_event(self, v: int) -> None:
        self.put_u16(self.used + 4 + 8 * self.q, v)

    def set_used_flags(self, v: int) -> None:
        self.put_u16(self.used, v)

    def read_desc(self, table: int, i: int):
        return struct.unpack("<QIHH", self.sim.read_guest(table + 16 * i, 16))

    def chain(self, head: int) -> list[tuple[int, int, int]]:
        """(addr, len, flags) of every descriptor of a chain, indirect resolved."""
        out = []
        addr, ln, flags, nxt = self.read_desc(self.desc, head)
        if flags & VRING_DESC_F_INDIRECT:
            assert not flags & VRING_DESC_F_NEXT and ln % 16 == 0
            table, i = addr, 0
            while True:
                a, l, f, n = self.read_desc(table, i)
                assert not f & VRING_DESC_F_INDIRECT
                out.append((a, l, f))
                if not f & VRING_DESC_F_NEXT:
                    return out
                i = n
        while True:
            out.append((addr, ln, flags))
            if not flags & VRING_DESC_F_NEXT:
                return out
            addr, ln, flags, nxt = self.read_desc(self.desc, nxt)

    def pop(self) -> tuple[int, list[tuple[int, int, int]]]:
        assert self.last_avail != self.avail_idx(), "avail ring empty"
        head = self.u16(self.avail + 4 + 2 * (self.last_avail % self.q))
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return head, self.chain(head)

    def push_used(self, head: int, length: int) -> None:
        e = self.used + 4 + 8 * (self.used_idx % self.q)
        self.sim.write_guest(e, struct.pack("<II", head, length))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.put_u16(self.used + 2, self.used_idx)

    def write_chain(self, chain, data: bytes) -> None:
        for addr, ln, flags in chain:
            assert flags & VRING_DESC_F_WRITE
            part, data = data[:ln], data[ln:]
            self.sim.write_guest(addr, part)
        assert not data, "data longer than the buffer"

    def read_chain(self, chain) -> bytes:
        return b"".join(self.sim.read_guest(a, l) for a, l, _ in chain)


def offline(**opts) -> VirtioNetSimulator:
    features = opts.pop("negotiated", DEFAULT_FEATURES)
    opts.setdefault("queue_size", 8)
    opts.setdefault("mem_size", 4 << 20)
    sim = VirtioNetSimulator("/nonexistent/xdpnet-test.sock", **opts)
    sim.layout(features)
    return sim


def hdr(num_buffers: int = 1) -> bytes:
    return struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, num_buffers)


# --- configuration ----------------------------------------------------------------

@pytest.mark.parametrize("opts", [
    {"queue_size": 100}, {"queue_size": 65536}, {"regions": 3}, {"mac": "52:54:00:12:34"},
    {"mem_size": (64 << 20) + 1}, {"hugetlb": True, "mem_size": 3 << 20}, {"ring_base": 70000},
    {"queue_pairs": 0},
])
def test_bad_configuration_is_refused(opts):
    with pytest.raises(UsageError):
        VirtioNetSimulator("/nonexistent", **opts)


def test_memory_too_small_is_a_usage_error():
    sim = VirtioNetSimulator("/nonexistent", queue_size=4096, mem_size=4 << 20)
    with pytest.raises(UsageError, match="too small"):
        sim.layout(DEFAULT_FEATURES)
    sim.close()


def test_parse_mac():
    assert parse_mac("52:54:00:12:34:56") == bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56])
    with pytest.raises(UsageError):
        parse_mac("zz:54:00:12:34:56")


# --- offline: the test plays the device -----------------------------------------

@pytest.mark.parametrize("regions", [1, 2])
@pytest.mark.parametrize("rx_chain,indirect", [(False, False), (True, False), (False, True), (True, True)])
def test_rx_layout(regions, rx_chain, indirect):
    with offline(regions=regions, rx_chain=rx_chain, indirect=indirect) as sim:
        dev = FakeDevice(sim)
        nrx = 4 if (rx_chain and not indirect) else 8
        assert dev.avail_idx() == nrx
        bufs = {a for segs in sim.rx_buffers() for a, _ in segs}
        seen = set()
        for _ in range(nrx):
            head, chain = dev.pop()
            assert len(chain) == (2 if rx_chain else 1)
            assert sum(l for _, l, _ in chain) == 2048
            for a, l, f in chain:
                assert f & VRING_DESC_F_WRITE and a in bufs
                seen.add(a)
                # guard pattern on both sides of every segment
                assert sim.read_guest(a - GUARD, GUARD) == sim.read_guest(a + l, GUARD)
        assert seen == bufs
        if regions == 2:
            # buffers in both regions, at distinct guest-physical ranges
            assert any(a >= 1 << 32 for a in bufs) and any(a < 1 << 32 for a in bufs)
        assert sim.check_guards() == 0


def test_rx_frames_verified_repost_and_trace():
    with offline() as sim:
        dev = FakeDevice(sim)
        heads = [dev.pop() for _ in range(8)]
        good = build_frame(200, sim.mac, parse_mac(PEER), 7, 42)
        (h0, c0), (h1, c1), (h2, c2), (h3, c3), (h4, c4) = heads[:5]
        dev.write_chain(c0, hdr() + good)
        dev.push_used(h0, 12 + len(good))
        bad = bytearray(good)
        bad[150] ^= 1
        dev.write_chain(c1, hdr() + bytes(bad))
        dev.push_used(h1, 12 + len(bad))
        dev.push_used(h2, 5)                       # shorter than the header
        dev.push_used(h3, 4096)                    # longer than the buffer
        dev.push_used(200, 64)                     # not a head we posted
        assert sim.poll(timeout=0) == 3            # good, bad, overlong
        st = sim.stats()
        assert (st.rx_verified, st.rx_bad, st.rx_short, st.rx_len_invalid) == (1, 3, 1, 1)
        assert st.rx_used == 5 and st.rx_frames == 3 and st.rx_bytes == 200 + 200 + (2048 - 12)
        # every real used entry is traced (the bogus id is not)
        assert sim.rx_trace() == [(c0[0][0], 212), (c1[0][0], 212), (c2[0][0], 5), (c3[0][0], 4096)]
        # the four real buffers went back on the avail ring, same heads
        assert dev.avail_idx() == 12
        assert [dev.pop()[0] for _ in range(4)] == [h0, h1, h2, h3]
        # a frame that is not for us is counted as foreign, still verified
        other = build_frame(60, parse_mac("02:00:00:00:00:09"), parse_mac(PEER), 0, 1)
        dev.write_chain(c4, hdr() + other)
        dev.push_used(h4, 12 + 60)
        assert sim.poll(timeout=0) == 1
        assert sim.stats().rx_foreign == 1 and sim.stats().rx_verified == 2


def test_rx_merged_and_chained_buffers():
    with offline(rx_buf_size=512, rx_chain=True) as sim:
        dev = FakeDevice(sim)
        frame = build_frame(1400, sim.mac, parse_mac(PEER), 3, 9)
        data = hdr(num_buffers=3) + frame
        used = []
        for _ in range(3):
            head, chain = dev.pop()
            cap = sum(l for _, l, _ in chain)
            part, data = data[:cap], data[cap:]
            dev.write_chain(chain, part + bytes(cap - len(part)))
            used.append((head, len(part)))
        assert not data
        for head, ln in used[:2]:
            dev.push_used(head, ln)
        assert sim.poll(timeout=0) == 0            # waits for the third buffer
        dev.push_used(*used[2])
        assert sim.poll(timeout=0) == 1
        st = sim.stats()
        assert (st.rx_verified, st.rx_merged, st.rx_bad, st.rx_used) == (1, 1, 0, 3)


def test_guards_detect_writes_outside_buffers():
    with offline(regions=2) as sim:
        ((a0, l0),), ((a1, l1),) = sim.rx_buffers()[:2]
        assert sim.check_guards() == 0
        sim.write_guest(a0 - 1, b"\x00")            # just before buffer 0
        sim.write_guest(a1 + l1, b"\x00\x00")       # just after buffer 1
        assert sim.check_guards() == 3
        # the driver also notices when the backend returns that buffer
        dev = FakeDevice(sim)
        head, chain = dev.pop()
        assert chain[0][0] == a0
        dev.write_chain(chain, hdr() + build_frame(60, sim.mac, sim.mac, 0, 0))
        dev.push_used(head, 72)
        sim.poll(timeout=0)
        st = sim.stats()
        assert st.guard_violations == 1 and st.first_violation_gpa == a0 - 1
        # writing inside a buffer is fine
        sim.write_guest(a1 + l1 - 1, b"\xff")
        assert sim.check_guards() == 3


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("separate", [False, True])
def test_tx_descriptors_and_event_idx_kicks(indirect, separate):
    with offline(indirect=indirect, tx_hdr_separate=separate, regions=2) as sim:
        dev = FakeDevice(sim, ring="tx")
        kick = sim.pairs[0].fds["tx_kick"]
        dev.set_avail_event(3)       # "kick me when avail idx passes 3"
        assert sim.send(2, length=100, dst=PEER, flow=5) == 2
        with pytest.raises(BlockingIOError):
            os.read(kick, 8)
        assert sim.send(2, length=100, dst=PEER, flow=5) == 2
        assert os.eventfd_read(kick) == 1
        assert sim.stats().tx_kicks == 1
        for seq in range(4):
            head, chain = dev.pop()
            assert len(chain) == (2 if separate else 1)
            assert all(not f & VRING_DESC_F_WRITE for _, _, f in chain)
            data = dev.read_chain(chain)
            assert data[:12] == bytes(12) and len(data) == 112
            if separate:
                assert chain[0][1] == 12
            rc, info = frame_info(data[12:])
            assert rc == 0 and info == (5, seq, 100)
            assert data[12:] == build_frame(100, parse_mac(PEER), sim.mac, 5, seq)
            if seq == 3:
                sim.write_guest(chain[0][0] + 2, b"\x01")  # a device writing a read-only header
            dev.push_used(head, 0)
        dev.push_used(head, 0)                              # the same slot twice
        sim.poll(timeout=0)
        st = sim.stats()
        assert (st.tx_sent, st.tx_completed, st.tx_bad_used, st.tx_hdr_modified) == (4, 4, 1, 1)
        ntx = 4 if (separate and not indirect) else 8
        assert sim.send(ntx, length=60, dst=PEER) == ntx     # every slot is free again


def test_no_event_idx_uses_flags():
    features = P.bit(F.VERSION_1) | P.bit(F.NET_MRG_RXBUF)
    with offline(negotiated=features) as sim:
        dev = FakeDevice(sim, ring="tx")
        kick = sim.pairs[0].fds["tx_kick"]
        dev.set_used_flags(1)                           # VRING_USED_F_NO_NOTIFY
        sim.send(1, dst=PEER)
        with pytest.raises(BlockingIOError):
            os.read(kick, 8)
        dev.set_used_flags(0)
        sim.send(1, dst=PEER)
        assert os.eventfd_read(kick) == 1
        rx = FakeDevice(sim)
        assert rx.avail_flags() == 1                    # no interrupts while busy
        # idle: the driver clears NO_INTERRUPT, sleeps, sets it again
        seen = []
        t = threading.Thread(target=lambda: seen.append(sim.poll(timeout=2.0)))
        t.start()
        deadline = time.monotonic() + 2
        while rx.avail_flags() != 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert rx.avail_flags() == 0
        os.eventfd_write(sim.pairs[0].fds["rx_call"], 1)
        t.join()
        assert rx.avail_flags() == 1 and sim.stats().rx_interrupts == 1


def test_sleeps_on_call_eventfd_and_arms_used_event():
    with offline() as sim:
        dev = FakeDevice(sim)
        t0, c0 = time.monotonic(), time.process_time()
        res = sim.run(duration=0.5, tx_count=0)
        wall, cpu = time.monotonic() - t0, time.process_time() - c0
        assert 0.45 < wall < 1.5 and not res.finished
        assert cpu < 0.1, f"idle guest burnt {cpu:.3f}s of CPU: it must sleep, not poll"
        assert res.stats.sleeps >= 1 and res.stats.passes < 20
        assert dev.used_event() == sim.ring_info().last_used == 0
        # an interrupt with a used entry wakes it at once
        head, chain = dev.pop()
        dev.write_chain(chain, hdr() + build_frame(60, sim.mac, sim.mac, 1, 1))

        def device():
            time.sleep(0.1)
            dev.push_used(head, 72)
            os.eventfd_write(sim.pairs[0].fds["rx_call"], 1)

        threading.Thread(target=device).start()
        t0 = time.monotonic()
        res = sim.run(duration=5.0, tx_count=0, rx_count=1)
        assert res.finished and time.monotonic() - t0 < 1.0
        assert res.stats.rx_verified == 1 and res.stats.rx_interrupts == 1
        assert dev.avail_idx() == 9                   # the buffer went back


def test_interrupt_run_from_another_thread():
    with offline() as sim:
        threading.Timer(0.2, sim.interrupt_run).start()
        t0 = time.monotonic()
        res = sim.run(duration=10.0, tx_count=0)
        assert time.monotonic() - t0 < 2.0 and not res.finished


def test_interrupt_wakes_poll_and_close_stops_a_running_thread():
    sim = offline()
    threading.Timer(0.2, sim.interrupt_run).start()
    t0 = time.monotonic()
    assert sim.poll(timeout=10.0) == 0
    assert time.monotonic() - t0 < 2.0
    # a later poll sleeps its whole timeout again (the stop request was consumed)
    t0 = time.monotonic()
    sim.poll(timeout=0.3)
    assert time.monotonic() - t0 >= 0.25
    # close() while another thread is inside the C loop: it is stopped first
    t = threading.Thread(target=sim.run, kwargs={"duration": 30.0, "tx_count": 0})
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    sim.close()
    t.join(timeout=5)
    assert not t.is_alive() and time.monotonic() - t0 < 2.0


def test_frame_length_is_checked():
    with offline() as sim:
        assert sim.max_tx_length() == 2048 - 12
        for bad in (59, 2048 - 11):
            with pytest.raises(UsageError):
                sim.send(1, length=bad, dst=PEER)
            with pytest.raises(UsageError):
                sim.run(duration=0.1, tx_count=1, tx_length=bad)
        assert sim.send(1, length=2048 - 12, dst=PEER) == 1
    with offline(tx_hdr_separate=True) as sim:
        assert sim.max_tx_length() == 2048


def test_send_times_out_when_the_device_never_completes():
    with offline() as sim:
        assert sim.send(8, dst=PEER) == 8                # all tx slots
        with pytest.raises(TimeoutError):
            sim.send(1, dst=PEER, timeout=0.2)
        assert sim.stats().tx_no_slot >= 1


# --- DPDK testpmd as the backend --------------------------------------------------

TESTPMD = shutil.which("dpdk-testpmd")


class DpdkBackend:
    """dpdk-testpmd with a net_vhost port in macswap mode (vhost-user server)."""

    def __init__(self, directory: str, queues: int = 1):
        self.prefix = f"xnguest{uuid.uuid4().hex[:8]}"
        self.sock = os.path.join(directory, "vhost.sock")
        self.log_path = os.path.join(directory, "testpmd.log")
        self.log = open(self.log_path, "w")
        cmd = ["stdbuf", "-oL", TESTPMD, "--no-huge", "-m", "1024", "--no-pci",
               f"--file-prefix={self.prefix}", "--vdev", f"net_vhost0,iface={self.sock},queues={queues}",
               "--", "--forward-mode=macswap", "--total-num-mbufs=32768", "--stats-period", "1",
               f"--rxq={queues}", f"--txq={queues}"]
        # stdin stays an open pipe: testpmd treats EOF on stdin as "quit"
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> dict[str, int]:
        """SIGINT (testpmd prints its forward statistics), then clean up.
        Returns port 0's final counters: rx (frames it took from the guest's
        tx ring), tx (frames it put in the guest's rx ring), tx_dropped
        (frames it could not: no rx buffer)."""
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdin.close()
        self.log.close()
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)
        text = open(self.log_path).read()
        m = re.search(r"Forward statistics for port 0.*?RX-packets:\s*(\d+)\s+RX-dropped:\s*(\d+)"
                      r".*?TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)", text, re.S)
        if not m:
            return {}
        return dict(zip(("rx", "rx_dropped", "tx", "tx_dropped"), map(int, m.groups())))


@pytest.fixture
def testpmd(request, tmp_path):
    if TESTPMD is None:
        pytest.skip("dpdk-testpmd not installed (package dpdk-dev)")
    tp = DpdkBackend(str(tmp_path), getattr(request, "param", 1))
    try:
        yield tp
    finally:
        tp.stop()


def connect(tp: DpdkBackend, **opts) -> VirtioNetSimulator:
    sim = VirtioNetSimulator(tp.sock, **opts)
    try:
        sim.connect(timeout=20.0)
        sim.start()
    except BaseException:
        sim.close()
        raise
    return sim


def receive(sim: VirtioNetSimulator, count: int, pair: int = 0, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    got = 0
    while got < count and time.monotonic() < deadline:
        got += sim.poll(timeout=0.2, pair=pair)
    return got


def wait_tx_done(sim: VirtioNetSimulator, pair: int = 0, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while sim.ring_info(pair, "tx").inflight and time.monotonic() < deadline:
        sim.poll(timeout=0.05, pair=pair)
    assert sim.ring_info(pair, "tx").inflight == 0


def drain(sim: VirtioNetSimulator, pair: int = 0) -> None:
    """Reap until the backend has nothing more for us."""
    while sim.poll(timeout=0.2, pair=pair):
        pass


def check_round_trip(sim: VirtioNetSimulator, length: int, flow: int, seqs: range,
                     pair: int = 0) -> int:
    """Frames we sent came back MAC-swapped: re-read every traced one from
    guest memory (the driver checked them in C already) and compare it byte
    for byte with the frame we built, check where it landed and its
    virtio-net header.  Returns how many frames were checked."""
    trace = sim.rx_trace(pair)
    st = sim.stats(pair)
    assert len(trace) == min(st.rx_used, lib.XN_GUEST_TRACE_LEN)
    starts = {segs[0][0]: sum(ln for _, ln in segs) for segs in sim.rx_buffers(pair)}
    hl = sim.hdr_len
    mrg = bool(sim.negotiation.features & P.bit(F.NET_MRG_RXBUF))
    per = -(-(hl + length) // min(starts.values())) if mrg else 1     # used entries per frame
    first_index = st.rx_used - len(trace)
    entries = trace[(-first_index) % per:]
    peer = parse_mac(PEER)
    seen = []
    for i in range(0, len(entries) - per + 1, per):
        data = b""
        for gpa, used_len in entries[i:i + per]:
            assert gpa in starts and used_len <= starts[gpa]
            data += sim.read_rx_buffer(gpa, used_len, pair)  # header only in the first
        h, frame = data[:hl], data[hl:]
        assert h[0] == 0 and h[1] == 0                                  # flags, gso_type
        if mrg:
            assert struct.unpack_from("<H", h, 10)[0] == per             # num_buffers
        rc, (fl, seq, ln) = frame_info(frame)
        assert rc == 0 and (fl, ln) == (flow, length)
        # macswap: exactly our frame with source and destination exchanged
        assert frame == build_frame(length, sim.mac, peer, flow, seq)
        assert seq in seqs
        seen.append(seq)
    assert len(set(seen)) == len(seen) > 0
    return len(seen)


@pytest.mark.dpdk
def test_dpdk_negotiation(testpmd):
    with connect(testpmd) as sim:
        n = sim.negotiation
        assert n.backend_features & P.bit(F.PROTOCOL_FEATURES)
        assert n.features == DEFAULT_FEATURES           # DPDK offers all of ours
        assert n.protocol_features == (P.bit(P.ProtocolFeature.MQ) | P.bit(P.ProtocolFeature.REPLY_ACK))
        assert n.protocol_features_offered & n.protocol_features == n.protocol_features
        assert n.queue_num >= 1
        assert sim.frontend.reply_ack
        assert sim.hdr_len == 12
        # every rx buffer was made available, and we kicked once
        info = sim.ring_info(0, "rx")
        assert info.avail_idx == 256 and sim.stats().rx_buffers_posted == 256
        assert sim.stats().rx_kicks >= 1
        assert sim.stop() == [0, 0]


@pytest.mark.dpdk
@pytest.mark.parametrize("length", [64, 1500])
@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("tx_hdr_separate", [False, True])
def test_dpdk_round_trip(testpmd, length, indirect, tx_hdr_separate):
    n = 100
    with connect(testpmd, indirect=indirect, tx_hdr_separate=tx_hdr_separate) as sim:
        assert sim.send(n, length=length, dst=PEER, flow=3) == n
        assert receive(sim, n) == n
        wait_tx_done(sim)
        st = sim.stats()
        assert (st.rx_frames, st.rx_verified, st.rx_bad, st.rx_short) == (n, n, 0, 0)
        assert (st.tx_sent, st.tx_completed, st.rx_foreign, st.tx_hdr_modified) == (n, n, 0, 0)
        assert st.rx_bytes == n * length
        assert check_round_trip(sim, length, 3, range(n)) == min(n, lib.XN_GUEST_TRACE_LEN)
        assert sim.check_guards() == 0 and st.guard_violations == 0
        # both rings stopped where we are: DPDK used every frame we sent and
        # exactly one rx buffer per frame
        assert sim.stop() == [n, n]
    counts = testpmd.stop()
    assert counts == {"rx": n, "rx_dropped": 0, "tx": n, "tx_dropped": 0}


@pytest.mark.dpdk
@pytest.mark.parametrize("opts,length", [
    ({"rx_chain": True}, 1500),
    ({"rx_chain": True, "indirect": True}, 1500),
    ({"regions": 2}, 1500),
    ({"regions": 2, "indirect": True, "tx_hdr_separate": True}, 1514),
    ({"rx_buf_size": 512}, 1500),                   # merged rx buffers
    ({"ring_base": 65500}, 128),                    # 16-bit index wrap-around
    ({"queue_size": 1024}, 64),
    ({"features": P.bit(F.VERSION_1) | P.bit(F.PROTOCOL_FEATURES)}, 1000),   # no EVENT_IDX/MRG
    ({"features": P.bit(F.PROTOCOL_FEATURES)}, 300),                            # legacy 10-byte header
], ids=["chain", "chain-indirect", "2regions", "2regions-indirect-sep", "mrg512", "wrap",
        "q1024", "no-event-idx", "legacy"])
def test_dpdk_round_trip_layouts(testpmd, opts, length):
    n = 150
    with connect(testpmd, **opts) as sim:
        # in bursts the rx ring can hold (256 buffers of 512 bytes: 85 frames)
        for _ in range(3):
            sim.send(n // 3, length=length, dst=PEER, flow=1)
            assert receive(sim, n // 3) == n // 3
        wait_tx_done(sim)
        st = sim.stats()
        assert (st.rx_frames, st.rx_verified, st.rx_bad, st.tx_completed) == (n, n, 0, n)
        check_round_trip(sim, length, 1, range(n))
        assert sim.check_guards() == 0 and st.guard_violations == 0
        base = opts.get("ring_base", 0)
        if opts.get("rx_buf_size") == 512:
            assert st.rx_merged == n and st.rx_used == 3 * n
            assert sim.rx_trace()[-1][1] == 1500 + 12 - 2 * 512
        if "features" in opts:
            assert sim.hdr_len == (12 if opts["features"] & P.bit(F.VERSION_1) else 10)
        assert sim.stop() == [(base + st.rx_used) & 0xFFFF, (base + n) & 0xFFFF]
    assert testpmd.stop() == {"rx": n, "rx_dropped": 0, "tx": n, "tx_dropped": 0}


@pytest.mark.dpdk
def test_dpdk_flood_run_sleeps_and_verifies(testpmd):
    with connect(testpmd) as sim:
        res = sim.run(duration=1.0, tx_count=None, tx_length=64, dst=PEER)
        st = res.stats
        assert not res.finished and 0.9 < res.seconds < 2.0
        assert st.tx_sent > 10000 and st.rx_verified > 10000
        assert st.rx_bad == 0 and st.rx_frames == st.rx_verified and st.rx_foreign == 0
        assert st.tx_hdr_modified == 0 and st.tx_bad_used == 0
        assert sim.check_guards() == 0 and st.guard_violations == 0
        # DPDK busy-polls and never asks for kicks (avail_event stays 0):
        # with EVENT_IDX we kick only when the avail index wraps past it
        assert st.tx_kicks <= st.tx_sent // 65536 + 2
        assert st.interrupts >= 1
        wait_tx_done(sim)
        drain(sim)
        total = sim.stats()
        assert total.rx_bad == 0 and sim.check_guards() == 0
        sim.stop()
    # testpmd took every frame we posted, and we reaped every frame it gave us
    counts = testpmd.stop()
    assert (counts["rx"], counts["tx"]) == (total.tx_sent, total.rx_frames)


@pytest.mark.dpdk
def test_dpdk_run_until_done(testpmd):
    with connect(testpmd) as sim:
        # fewer frames than rx buffers: none can be lost, wait for all of them
        res = sim.run(duration=20.0, tx_count=200, tx_length=256, dst=PEER, rx_count=200, flow=9)
        assert res.finished and res.seconds < 10
        st = res.stats
        assert (st.tx_sent, st.tx_completed, st.rx_verified, st.rx_bad) == (200, 200, 200, 0)
        # more: testpmd may outrun us and find the rx ring full (it drops, and
        # counts it); "done" then means every frame sent and completed
        res = sim.run(duration=20.0, tx_count=5000, tx_length=256, dst=PEER, flow=9)
        assert res.finished
        assert (res.stats.tx_sent, res.stats.tx_completed) == (5000, 5000)
        assert sim.tx_seq() == 5200
        drain(sim)
        st = sim.stats()
        assert st.rx_bad == 0 and st.rx_verified == st.rx_frames
        assert check_round_trip(sim, 256, 9, range(5200)) == lib.XN_GUEST_TRACE_LEN
        assert sim.stop() == [st.rx_used & 0xFFFF, 5200]
    counts = testpmd.stop()
    assert counts["rx"] == 5200 and counts["tx"] == st.rx_frames
    assert counts["tx"] + counts["tx_dropped"] == 5200


@pytest.mark.dpdk
def test_dpdk_reflect(testpmd):
    with connect(testpmd) as sim:
        sim.send(16, length=128, dst=PEER)
        # every frame testpmd swaps back we swap again: 16 frames circulate
        res = sim.run(duration=0.5, tx_count=0, reflect=True)
        st = res.stats
        assert st.tx_reflected > 16 and st.tx_reflected == st.tx_sent
        assert st.rx_bad == 0 and st.rx_foreign == 0 and st.rx_verified >= st.tx_reflected
        assert sim.check_guards() == 0


@pytest.mark.dpdk
@pytest.mark.parametrize("testpmd", [2], indirect=True)
def test_dpdk_two_queue_pairs(testpmd):
    with connect(testpmd, queue_pairs=2) as sim:
        assert sim.negotiation.queue_num >= 2
        res = sim.run(duration=20.0, tx_count=100, tx_length=100, dst=PEER, rx_count=100, pair=None)
        assert res.finished and res.stats.rx_verified == 200
        res = sim.run(duration=20.0, tx_count=2000, tx_length=100, dst=PEER, pair=None)
        assert res.finished
        rx = 0
        for pair in (0, 1):
            drain(sim, pair)
            st = sim.stats(pair)
            assert (st.tx_completed, st.rx_bad, st.rx_verified) == (2100, 0, st.rx_frames)
            # each pair got its own flow back on its own queue
            check_round_trip(sim, 100, pair, range(2100), pair=pair)
            rx += st.rx_frames
        assert sim.check_guards() == 0
        idx = sim.stop()
        assert idx[1] == idx[3] == 2100
    counts = testpmd.stop()
    assert counts["rx"] == 4200 and counts["tx"] == rx and counts["tx"] + counts["tx_dropped"] == 4200


@pytest.mark.dpdk
def test_dpdk_refused_request_raises(testpmd):
    sim = VirtioNetSimulator(testpmd.sock)
    try:
        sim.connect(timeout=20.0)
        offered = sim.negotiation.backend_features
        bogus = next(b for b in range(64) if not offered >> b & 1)
        with pytest.raises(BackendRefused) as e:
            sim.request(P.Request.SET_FEATURES, P.U64.pack(1 << bogus), need_reply=True)
        assert e.value.request == P.Request.SET_FEATURES and e.value.status != 0
        assert "SET_FEATURES" in str(e.value)
        # the connection survives a refused request
        sim.start()
        sim.send(10, dst=PEER)
        assert receive(sim, 10) == 10
    finally:
        sim.close()


@pytest.mark.dpdk
def test_dpdk_set_mem_table_again_mid_stream(testpmd):
    with connect(testpmd) as sim:
        sim.send(50, dst=PEER)
        assert receive(sim, 50) == 50
        sim.set_mem_table_again()
        sim.send(50, dst=PEER)
        assert receive(sim, 50) == 50
        assert sim.stats().rx_verified == 100 and sim.check_guards() == 0


@pytest.mark.dpdk
def test_dpdk_no_fd_leak(testpmd):
    before = open_fds()
    for _ in range(2):
        with connect(testpmd, regions=2) as sim:
            sim.send(10, dst=PEER)
            assert receive(sim, 10) == 10
    assert open_fds() == before


@pytest.mark.dpdk
def test_dpdk_hugetlb_memory(testpmd, hugepages):
    with connect(testpmd, hugetlb=True, regions=2, mem_size=64 << 20) as sim:
        sim.send(100, length=1500, dst=PEER)
        assert receive(sim, 100) == 100
        check_round_trip(sim, 1500, 0, range(100))
        assert sim.check_guards() == 0


def test_connect_without_backend_fails_cleanly(tmp_path):
    before = open_fds()
    sim = VirtioNetSimulator(str(tmp_path / "nobody.sock"))
    with pytest.raises(Exception) as e:
        sim.connect(timeout=0.2)
    assert "no vhost-user backend" in str(e.value)
    sim.close()
    assert open_fds() == before

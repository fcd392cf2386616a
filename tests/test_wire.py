"""Kernel tests of the wire peer (c/wire.c, xdpnet/wire.py) on a real veth test bed.

Each test gets a fresh :class:`Testbed` (NIC end in the root namespace,
wire end in a namespace; IPv6 off, so the only frames on the link are
the test's own), a :class:`WirePeer` on the wire end and one on the NIC
end.  Counts are exact: a sender retries what the device refuses, the
receivers' socket buffers hold every burst sent here.

The AF_XDP ceiling tests attach a tiny test-local XDP program (compiled
with ``clang -target bpf``, loaded through libbpf with ctypes) that
redirects every frame to the XSKMAP entry of its rx queue; it is detached
in a ``finally`` and vanishes with the test bed anyway.

Rates (flood, rx-drop, tx-push; 64 and 1500 bytes) are printed, not
asserted: run with ``-s`` to see them.  They are noisy on a shared
2-core machine; only ratios within one run mean anything.
"""

from __future__ import annotations

import ctypes as ct
import os
import secrets
import shutil
import socket
import subprocess
import time

import pytest

from xdpnet._native import ffi, lib
from xdpnet.errors import BusyError, UsageError, XdpnetError
from xdpnet.net.mac import parse_mac
from xdpnet.net.netns import Testbed, cleanup_stale
from xdpnet.wire import RxDrop, TxPush, WirePeer, in_thread, pinned

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

PREFIX = "w" + secrets.token_hex(2)
ETH_P_ALL = 0x0003
CPUS = sorted(os.sched_getaffinity(0))
GEN_CPU = CPUS[0]
RX_CPU = CPUS[1] if len(CPUS) > 1 else CPUS[0]


@pytest.fixture(scope="module", autouse=True)
def no_leftovers_of_this_module():
    yield
    assert cleanup_stale(PREFIX) == [], "a test left something behind"


@pytest.fixture
def tb():
    with Testbed(prefix=PREFIX) as t:
        yield t


@pytest.fixture
def peers(tb):
    """(wire peer, NIC-end peer), each addressing the other by default."""
    with WirePeer(tb) as wire, WirePeer(tb, tb.nic) as nic:
        assert (nic.netns, nic.peer_mac, wire.peer_mac) == (None, tb.wire_mac, tb.nic_mac)
        yield wire, nic


def raw_socket(ifname: str) -> socket.socket:
    """A plain Python AF_PACKET socket on *ifname* (root namespace)."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, ETH_P_ALL))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    return s


def build(length: int, dst: str, src: str, flow: int, seq: int) -> bytearray:
    buf = ffi.new("uint8_t[]", length)
    assert lib.xn_frame_build(buf, length, parse_mac(dst), parse_mac(src), flow, seq) == length
    return bytearray(ffi.buffer(buf, length))


# ---- AF_PACKET peer --------------------------------------------------------

@pytest.mark.parametrize("length", [64, 1500])
def test_frames_both_directions_counts_exact(peers, tb, length):
    wire, nic = peers
    n = 3000
    sent = wire.send(n, length, flow=7, seq0=100)
    assert (sent.tx_frames, sent.tx_bytes, sent.tx_errors) == (n, n * length, 0)
    got = nic.recv(max_frames=n, timeout=2.0)
    assert (got.verified, got.bad, got.foreign) == (n, 0, 0)
    assert (got.duplicates, got.out_of_order, got.untracked) == (0, 0, 0)
    assert got.rx_bytes == n * length
    f = got.flow(7)
    assert (f.unique, f.lowest_seq, f.highest_seq, f.missing) == (n, 100, 100 + n - 1, 0)

    sent = nic.send(n, length, flow=8)
    assert sent.tx_frames == n
    got = wire.recv(max_frames=n, timeout=2.0)
    assert (got.verified, got.bad, got.foreign, got.duplicates) == (n, 0, 0, 0)
    assert got.flow(8).unique == n
    # nothing else arrived: a further receive times out empty
    assert nic.recv(timeout=0.05).rx_frames == 0
    assert wire.recv(timeout=0.05).rx_frames == 0


@pytest.mark.parametrize("length", [64, 1500])
def test_wire_peer_and_plain_af_packet_socket_agree(tb, length):
    """Frames from the C peer verify in Python, frames built in Python verify in C."""
    with WirePeer(tb) as wire, raw_socket(tb.nic) as s:
        wire.send(50, length, flow=3)
        info = ffi.new("struct xn_frame_info *")
        for seq in range(50):
            data = s.recv(65536)
            assert len(data) == length
            assert data[:6] == parse_mac(tb.nic_mac) and data[6:12] == parse_mac(wire.mac)
            assert lib.xn_frame_check(data, len(data), info) == 0
            assert (info.flow, info.seq, info.len) == (3, seq, length)
        for seq in range(50):
            s.send(build(length, tb.wire_mac, tb.nic_mac, 9, seq))
        got = wire.recv(max_frames=50, timeout=2.0)
        assert (got.verified, got.bad, got.flow(9).unique) == (50, 0, 50)


def test_corrupt_short_and_foreign_frames_are_classified(tb):
    with WirePeer(tb) as wire, raw_socket(tb.nic) as s:
        good = build(200, tb.wire_mac, tb.nic_mac, 1, 0)
        corrupt = build(200, tb.wire_mac, tb.nic_mac, 1, 1)
        corrupt[150] ^= 0x40                      # one payload bit
        cut = build(200, tb.wire_mac, tb.nic_mac, 1, 2)[:120]   # claims 200 bytes
        foreign = bytearray(parse_mac(tb.wire_mac) + parse_mac(tb.nic_mac) + b"\x08\x00" + bytes(46))
        for frame in (foreign, corrupt, cut, good):
            s.send(frame)
        got = wire.recv(max_frames=3, timeout=2.0)
        assert (got.verified, got.bad, got.foreign, got.rx_frames) == (1, 2, 1, 4)
        assert got.flow(1).unique == 1             # bad frames never enter flow state


def test_duplicates_reordering_and_flow_table(peers):
    wire, nic = peers
    wire.send(10, 64, flow=5, seq0=10)            # 10..19
    wire.send(10, 64, flow=5, seq0=0)             # 0..9: late
    wire.send(1, 64, flow=5, seq0=15)             # a duplicate
    wire.send(1, 64, flow=5, seq0=3)              # another
    wire.send(1, 64, flow=5, seq0=5000)           # a jump: window slides
    wire.send(1, 64, flow=5, seq0=19)             # older than the window: out of order
    for flow in range(100, 100 + lib.XN_WIRE_MAX_FLOWS):   # 15 more fit, then untracked
        wire.send(1, 64, flow=flow)
    got = nic.recv(max_frames=24 + lib.XN_WIRE_MAX_FLOWS, timeout=2.0)
    assert got.verified == 24 + lib.XN_WIRE_MAX_FLOWS
    assert (got.duplicates, got.out_of_order, got.untracked) == (2, 11, 1)
    f = got.flow(5)
    assert (f.unique, f.duplicates, f.out_of_order) == (22, 2, 11)
    assert (f.lowest_seq, f.highest_seq) == (0, 5000)
    assert len(got.flows) == lib.XN_WIRE_MAX_FLOWS


def test_recv_stops_at_max_frames_and_leaves_the_rest(peers):
    wire, nic = peers
    wire.send(100, 64, flow=1)
    first = nic.recv(max_frames=60, timeout=2.0)
    rest = nic.recv(max_frames=0, timeout=0.2)
    assert (first.verified, rest.verified) == (60, 40)
    assert rest.flow(1).lowest_seq == 60


def test_echo_and_pingpong(peers):
    wire, nic = peers
    echo = in_thread(nic.echo, 0)                 # until stopped
    try:
        for length in (64, 1500):
            p = wire.pingpong(500, length, timeout=1.0)
            assert (p.sent, p.received, p.lost) == (500, 500, 0)
            print(f"\npingpong {length:4d} B over veth (AF_PACKET both ends): "
                  f"p50 {p.p50 * 1e6:.1f} us, p99 {p.p99 * 1e6:.1f} us")
        sent = wire.send(1000, 300, flow=2)
        assert sent.tx_frames == 1000
        back = wire.recv(max_frames=1000, timeout=2.0)
        assert (back.verified, back.bad, back.flow(2).unique) == (1000, 0, 1000)
    finally:
        t0 = time.monotonic()
        nic.stop()
        st = echo.result(timeout=5)
        assert time.monotonic() - t0 < 1.0
    assert st.verified == st.tx_frames == 1000 + 1000
    assert st.bad == 0


def test_pingpong_without_a_reflector_times_out(peers):
    wire, _ = peers
    t0 = time.monotonic()
    p = wire.pingpong(3, 64, timeout=0.05)
    assert (p.received, p.lost, p.p50) == (0, 3, None)
    assert time.monotonic() - t0 < 1.0


def test_flood_rate_and_receiver_verification(peers):
    wire, nic = peers
    for length in (64, 1500):
        rx = in_thread(nic.recv, 0, 0.5)
        st = wire.flood(1.0, length, cpu=GEN_CPU)
        got = rx.result(timeout=10)
        assert st.tx_frames > 0 and st.tx_errors == 0
        assert got.bad == 0 and got.verified > 0
        print(f"\nflood {length:4d} B -> AF_PACKET receiver: sent {st.tx_mpps:.3f} Mpps "
              f"({st.tx_gbps:.2f} Gbit/s), received+verified {got.verified} of "
              f"{st.tx_frames}")


def test_stop_ends_long_calls_quickly(peers):
    wire, nic = peers
    calls = [in_thread(nic.recv, 0, None), in_thread(wire.flood, 0, 64)]
    time.sleep(0.2)
    t0 = time.monotonic()
    nic.stop()
    wire.stop()
    for c in calls:
        c.result(timeout=5)
    assert time.monotonic() - t0 < 1.0


def test_close_stops_and_waits_for_running_calls(tb):
    nic = WirePeer(None, tb.nic)
    rx = in_thread(nic.recv, 0, None)             # would run forever
    time.sleep(0.1)
    nic.close()                                   # returns only once recv has
    assert rx.done() and rx.result().rx_frames == 0
    nic.close()
    with pytest.raises(XdpnetError, match="closed"):
        nic.send(1, 64)


def test_bad_arguments(tb, peers):
    wire, _ = peers
    for length in (59, lib.XN_WIRE_MAX_LEN + 1):
        with pytest.raises(UsageError, match="Invalid argument"):
            wire.send(1, length)
    with pytest.raises(UsageError, match="MAC"):
        wire.send(1, 64, dst="not-a-mac")
    with pytest.raises(UsageError, match="Message too long"):
        wire.send(1, tb.mtu + 14 + 1)             # the device refuses it
    with pytest.raises(UsageError, match="interface 'nosuch0' not found"):
        WirePeer(tb, "nosuch0")
    with pytest.raises(UsageError, match="not found"):
        WirePeer(None, tb.wire)                   # lives in the netns, not here


# ---- AF_XDP ceilings -----------------------------------------------------

XSK_PROG = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

SEC("xdp")
int xsk_redirect(struct xdp_md *ctx)
{
	return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
}

char _license[] SEC("license") = "GPL";
"""
XDP_FLAGS_DRV_MODE = 1 << 2


@pytest.fixture(scope="module")
def xsk_prog_obj(tmp_path_factory):
    if not shutil.which("clang"):
        pytest.skip("clang not installed")
    d = tmp_path_factory.mktemp("bpf")
    (d / "xsk.c").write_text(XSK_PROG)
    arch_inc = f"/usr/include/{os.uname().machine}-linux-gnu"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I{arch_inc}", "-c",
                    str(d / "xsk.c"), "-o", str(d / "xsk.o")], check=True)
    return str(d / "xsk.o")


class XskRedirect:
    """The test-local XDP program, attached in native mode, with its XSKMAP."""

    def __init__(self, obj_path: str, ifindex: int):
        lb = ct.CDLL("libbpf.so.1", use_errno=True)
        for name, res, args in [
                ("bpf_object__open_file", ct.c_void_p, [ct.c_char_p, ct.c_void_p]),
                ("bpf_object__load", ct.c_int, [ct.c_void_p]),
                ("bpf_object__close", None, [ct.c_void_p]),
                ("bpf_object__find_program_by_name", ct.c_void_p, [ct.c_void_p, ct.c_char_p]),
                ("bpf_object__find_map_by_name", ct.c_void_p, [ct.c_void_p, ct.c_char_p]),
                ("bpf_program__fd", ct.c_int, [ct.c_void_p]),
                ("bpf_map__fd", ct.c_int, [ct.c_void_p]),
                ("bpf_xdp_attach", ct.c_int, [ct.c_int, ct.c_int, ct.c_uint32, ct.c_void_p]),
                ("bpf_xdp_detach", ct.c_int, [ct.c_int, ct.c_uint32, ct.c_void_p]),
                ("bpf_map_update_elem", ct.c_int, [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64])]:
            getattr(lb, name).restype = res
            getattr(lb, name).argtypes = args
        self.lb, self.ifindex, self.attached = lb, ifindex, False
        self.obj = lb.bpf_object__open_file(obj_path.encode(), None)
        assert self.obj, f"bpf_object__open_file: errno {ct.get_errno()}"
        try:
            assert lb.bpf_object__load(self.obj) == 0, "bpf_object__load failed"
            prog = lb.bpf_object__find_program_by_name(self.obj, b"xsk_redirect")
            self.map_fd = lb.bpf_map__fd(lb.bpf_object__find_map_by_name(self.obj, b"xsks"))
            rc = lb.bpf_xdp_attach(ifindex, lb.bpf_program__fd(prog), XDP_FLAGS_DRV_MODE, None)
            assert rc == 0, f"bpf_xdp_attach: {rc}"
            self.attached = True
        except BaseException:
            self.close()
            raise

    def set(self, queue: int, xsk_fd: int) -> None:
        k, v = ct.c_uint32(queue), ct.c_uint32(xsk_fd)
        assert self.lb.bpf_map_update_elem(self.map_fd, ct.byref(k), ct.byref(v), 0) == 0

    def close(self) -> None:
        if self.attached:
            self.lb.bpf_xdp_detach(self.ifindex, XDP_FLAGS_DRV_MODE, None)
            self.attached = False
        if self.obj:
            self.lb.bpf_object__close(self.obj)
            self.obj = None


@pytest.fixture
def rxdrop_bed(tb, xsk_prog_obj):
    """(test bed, wire peer, RxDrop on NIC queue 0 fed by the XSKMAP program)."""
    prog = XskRedirect(xsk_prog_obj, tb.nic_ifindex)
    try:
        with RxDrop(tb.nic, 0) as rx, WirePeer(tb) as wire:
            prog.set(0, rx.fd)
            yield tb, wire, rx
    finally:
        prog.close()


def test_rxdrop_counts_exactly(rxdrop_bed):
    tb, wire, rx = rxdrop_bed
    assert not rx.zerocopy                        # veth: copy mode only
    run = in_thread(rx.run, 0)
    time.sleep(0.05)
    wire.send(1000, 64, flow=1)
    wire.send(1000, 1500, flow=2)
    time.sleep(0.2)
    rx.stop()
    st = run.result(timeout=5)
    assert st.frames == 2000
    assert st.bytes == 1000 * 64 + 1000 * 1500
    assert st.kernel_rx_dropped == st.kernel_rx_ring_full == st.kernel_fill_empty == 0


@pytest.mark.parametrize("length", [64, 1500])
def test_rxdrop_ceiling_rate(rxdrop_bed, length):
    """Generator on one CPU, receiver alone on the other (FACTS.md placement)."""
    tb, wire, rx = rxdrop_bed
    run = in_thread(rx.run, 0, RX_CPU)
    time.sleep(0.05)
    gen = wire.flood(2.0, length, cpu=GEN_CPU)
    time.sleep(0.1)
    rx.stop()
    st = run.result(timeout=5)
    assert st.frames > 0 and gen.tx_frames > 0
    rate = st.frames / gen.elapsed / 1e6
    print(f"\nceiling {length:4d} B: flood {gen.tx_mpps:.3f} Mpps (AF_PACKET sendmmsg, "
          f"qdisc bypass, cpu{GEN_CPU}) -> AF_XDP rx-drop {rate:.3f} Mpps "
          f"({st.frames * length * 8 / gen.elapsed / 1e9:.2f} Gbit/s, copy mode, cpu{RX_CPU}); "
          f"kernel drops: ring full {st.kernel_rx_ring_full}, fill empty "
          f"{st.kernel_fill_empty}; {st.polls} polls")


def test_rxdrop_one_run_at_a_time_and_close_while_running(rxdrop_bed):
    tb, wire, rx = rxdrop_bed
    run = in_thread(rx.run, 0)
    time.sleep(0.1)
    with pytest.raises(BusyError, match="already running"):
        rx.run(0.1)
    wire.send(10, 64)
    time.sleep(0.1)
    rx.close()                                    # stops the run, then frees the UMEM
    assert run.done() and run.result().frames == 10
    with pytest.raises(XdpnetError, match="closed"):
        rx.run(0.1)


def test_rxdrop_errors(tb, rxdrop_bed):
    _, _, rx = rxdrop_bed
    with pytest.raises(UsageError, match="interface 'xnosuchdev0' not found"):
        RxDrop("xnosuchdev0", 0)
    with pytest.raises(UsageError, match="queue 5 .* 1 channel "):
        RxDrop(tb.nic, 5)                          # one queue only
    with pytest.raises(UsageError, match="queue 1 .* 1 channel "):
        TxPush(tb.nic, 1, dst=tb.wire_mac)
    t0 = time.monotonic()
    with pytest.raises(BusyError, match="busy"):
        RxDrop(tb.nic, 0)                          # queue 0 is rx's
    assert time.monotonic() - t0 < 2.0
    rx.close()
    rx.close()
    again = RxDrop(tb.nic, 0)                       # freed 10-30 ms later: retried
    again.close()


@pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs")
def test_rxdrop_per_queue_frames_follow_the_sending_cpu(xsk_prog_obj):
    """veth: a frame sent on CPU c arrives on NIC rx queue c % queues."""
    with Testbed(queues=2, prefix=PREFIX) as bed:
        prog = XskRedirect(xsk_prog_obj, bed.nic_ifindex)
        try:
            with RxDrop(bed.nic, 0) as r0, RxDrop(bed.nic, 1) as r1, WirePeer(bed) as wire:
                prog.set(0, r0.fd)
                prog.set(1, r1.fd)
                for cpu in CPUS[:2]:
                    runs = [in_thread(r.run, 0) for r in (r0, r1)]
                    time.sleep(0.05)
                    with pinned(cpu):
                        for flow in range(4):
                            wire.send(100, 64, flow=flow)
                    time.sleep(0.1)
                    r0.stop()
                    r1.stop()
                    got = [f.result(timeout=5).frames for f in runs]
                    want = [0, 0]
                    want[cpu % 2] = 400
                    assert got == want
        finally:
            prog.close()


@pytest.mark.parametrize("length", [64, 1500])
def test_txpush_frames_verify_at_the_wire(tb, length):
    with WirePeer(tb) as wire, TxPush(tb.nic, 0, dst=tb.wire_mac, flow=4, length=length) as tx:
        assert tx.zerocopy is False
        rx = in_thread(wire.recv, 0, 0.5)
        st = tx.run(1.0, cpu=GEN_CPU)
        got = rx.result(timeout=10)
        assert st.frames > 0 and st.kernel_tx_invalid == 0
        assert got.bad == 0 and got.verified > 0 and got.flow(4) is not None
        print(f"\ntx-push {length:4d} B: AF_XDP copy-mode tx {st.mpps:.3f} Mpps "
              f"({st.gbps:.2f} Gbit/s), {st.kicks} kicks; wire peer verified "
              f"{got.verified} (AF_PACKET receiver drops the excess)")

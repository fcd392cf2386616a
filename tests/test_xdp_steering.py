"""Kernel tests of the steering programs (bpf/xdpnet_*.c) and NicSteering
on a one-queue NIC, with real frames and real AF_XDP sockets.

Topology per fixture: a veth pair whose "NIC" end (``xs<random>n``) stays
in the root namespace, where NicSteering attaches and AF_XDP sockets bind,
and whose peer (``xs<random>w``) sits in a private namespace, where an
AF_PACKET socket sends frames as the wire would.  IPv6 is disabled on
both ends and no address is set, so the only frames on the link are the
test's own.  Everything is removed in the fixtures' ``finally``.

What reaches the host stack is observed with an AF_PACKET listener on the
NIC end (it sees exactly the XDP_PASS frames); what reaches a VM with
AF_XDP sockets (:class:`Xsk`, raw syscalls) bound to NIC queue 0 (direct)
or to the VM's port (``vm.port_ifname``) and registered with
``set_xsk``.  Each check sends a "sentinel" frame that goes to the host
after the frames under test: when the listener sees it, the frames before
it have been through the NIC program (one queue, in order); frames that
go through a port are waited for.

The multi-VM, multi-queue and multi-process cases are in
tests/test_steering_multi.py, which reuses the helpers here.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import mmap
import os
import re
import select
import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest
from helpers_serve import NOBODY, REPO

from xdpnet.errors import BusyError, DependencyError, UsageError, XdpnetError
from xdpnet.net.mac import parse_mac
from xdpnet.net.netns import Testbed, cleanup_stale, run_in_netns, socket_in_netns
from xdpnet.net.port import ports_of
from xdpnet.steering import kheaders
from xdpnet.steering.nic import NicSteering, read_pinned
from xdpnet.steering.programs import pin_dir, program_text
from xdpnet.steering.xdp import attached_prog_ids

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

PREFIX = "xs"
VM_MAC = "52:54:00:aa:bb:01"
OTHER_MAC = "52:54:00:aa:bb:02"
KEEPER_MAC = "52:54:00:aa:bb:ff"      # keeps a shared NIC loaded between tests
PEER_MAC = "02:00:00:00:00:99"
SENTINEL_MAC = "02:00:00:00:00:5e"    # never registered: always to the host
BCAST = "ff:ff:ff:ff:ff:ff"
MCAST = "01:00:5e:00:00:fb"
ETHERTYPE = 0x88B5
ETH_P_ALL = 0x0003
SOL_PACKET, PACKET_QDISC_BYPASS = 263, 20


def sh(*cmd: str, check: bool = True) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


@contextlib.contextmanager
def on_cpu(cpu: int | None):
    """Run the body on *cpu* (this thread only): a veth sender's CPU picks
    the queue (AF_PACKET with QDISC_BYPASS: queue = cpu % queues)."""
    if cpu is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


# ---------------------------------------------------------------- topology

class Link:
    """A test bed (``nic`` in the root namespace, ``peer`` in ``ns``) with an
    AF_PACKET sender and listener on the peer and a listener on the NIC."""

    def __init__(self, queues: int = 1):
        self.queues = queues
        self.tag = uuid.uuid4().bytes[:4]   # marks this link's frames
        self.seq = 0

    def create(self):
        cleanup_stale(PREFIX)
        self.bed = Testbed(queues=self.queues, prefix=PREFIX)
        self.ns, self.nic, self.peer = self.bed.netns, self.bed.nic, self.bed.wire
        self.nic_ifindex = self.bed.nic_ifindex
        run_in_netns(self.ns, ["ip", "link", "set", self.peer, "address", PEER_MAC], check=True)
        # frames XDP redirects into the NIC (ndo_xdp_xmit) need NAPI on the peer
        run_in_netns(self.ns, ["ethtool", "-K", self.peer, "gro", "on"], check=True,
                     capture_output=True)
        self.tx = socket_in_netns(self.ns, socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.tx.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        self.tx.bind((self.peer, 0))
        self.wire_rx = socket_in_netns(self.ns, socket.AF_PACKET, socket.SOCK_RAW,
                                       socket.htons(ETH_P_ALL))
        self.wire_rx.bind((self.peer, 0))
        self.wire_rx.setblocking(False)
        self.rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.rx.bind((self.nic, 0))
        self.rx.setblocking(False)

    def destroy(self):
        for s in ("tx", "rx", "wire_rx"):
            if hasattr(self, s):
                getattr(self, s).close()
        if hasattr(self, "bed"):
            self.bed.close()

    # frames: dst, src, ethertype, link tag (4), seq (4), pattern
    def frame(self, dst: str, length: int = 100, src: str = PEER_MAC) -> bytes:
        self.seq += 1
        head = parse_mac(dst) + parse_mac(src) + struct.pack(
            "!H4sI", ETHERTYPE, self.tag, self.seq)
        return head + bytes((self.seq + i) & 0xFF for i in range(length - len(head)))

    def send(self, frames, cpu: int | None = None):
        with on_cpu(cpu):
            for f in frames:
                self.tx.send(f)

    def mine(self, data: bytes) -> bool:
        return len(data) >= 20 and data[12:14] == struct.pack("!H", ETHERTYPE) \
            and data[14:18] == self.tag

    def _drain(self, sock) -> list[bytes]:
        got = []
        while True:
            try:
                data, addr = sock.recvfrom(65536)
            except BlockingIOError:
                return got
            if addr[2] != socket.PACKET_OUTGOING and self.mine(data):
                got.append(data)

    def host_frames(self, until: bytes, timeout: float = 3.0) -> list[bytes]:
        """Frames of this link the host stack got, up to and including the
        sentinel *until*."""
        got, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            select.select([self.rx], [], [], 0.05)
            got += self._drain(self.rx)
            if until in got:
                return got[:got.index(until) + 1]
        raise AssertionError("sentinel frame never reached the host stack")

    def host_now(self) -> list[bytes]:
        return self._drain(self.rx)

    def wire_frames(self, settle: float = 0.3) -> list[bytes]:
        """Frames of this link the wire peer received within *settle* s."""
        time.sleep(settle)
        return self._drain(self.wire_rx)

    def exchange(self, frames, xsk=None, cpu: int | None = None
                 ) -> tuple[list[bytes], list[bytes]]:
        """Send *frames* and a sentinel; (frames the host got, frames the
        XSK got), sentinel excluded."""
        sentinel = self.frame(SENTINEL_MAC, 64)
        self.send(list(frames) + [sentinel], cpu)
        host = self.host_frames(sentinel)[:-1]
        vm = xsk.receive() if xsk else []
        return host, [f for f in vm if self.mine(f)]

    def xdp_shown(self) -> bool:
        out = sh("ip", "-d", "link", "show", "dev", self.nic)
        return bool(re.search(r"\bxdp(generic|drv|offload)?\b|prog/xdp", out))

    def tc_shown(self) -> str:
        return sh("tc", "filter", "show", "dev", self.nic, "ingress").strip() + \
            sh("tc", "qdisc", "show", "dev", self.nic).replace("noqueue", "").strip()

    def clean(self) -> bool:
        """Nothing of xdpnet on the NIC: no XDP, no TC, no pins, no ports."""
        return (attached_prog_ids(self.nic) == {} and not self.xdp_shown()
                and "clsact" not in sh("tc", "qdisc", "show", "dev", self.nic)
                and sh("tc", "filter", "show", "dev", self.nic, "ingress").strip() == ""
                and not os.path.exists(pin_dir(self.nic))
                and ports_of(self.nic_ifindex) == [])


@pytest.fixture
def link():
    lk = Link()
    try:
        lk.create()
        yield lk
    finally:
        lk.destroy()


# ---------------------------------------------------------------- AF_XDP

AF_XDP = 44
SOL_XDP = 283
XDP_MMAP_OFFSETS, XDP_RX_RING, XDP_TX_RING, XDP_UMEM_REG = 1, 2, 3, 4
XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_STATISTICS = 5, 6, 7
XDP_PGOFF_RX_RING, XDP_PGOFF_TX_RING = 0, 0x80000000
XDP_UMEM_PGOFF_FILL_RING, XDP_UMEM_PGOFF_COMPLETION_RING = 0x100000000, 0x180000000
XDP_COPY = 1 << 1


class Xsk:
    """A minimal AF_XDP socket (copy mode) built from raw syscalls: a UMEM
    of 128 chunks of 2048 bytes (the first 64 on the fill ring, the others
    for tx), rings of 64."""

    NFRAMES, CHUNK, RING = 128, 2048, 64

    def __init__(self, ifname: str, queue: int = 0):
        self.ifname, self.queue = ifname, queue
        self.sock = socket.socket(AF_XDP, socket.SOCK_RAW, 0)
        self.maps = []
        self.tx_next = 0
        try:
            self._setup(ifname, queue)
        except BaseException:
            self.close()
            raise

    def __repr__(self):
        return f"<Xsk {self.ifname}/{self.queue}>"

    def _setup(self, ifname, queue):
        s = self.sock
        self.umem = mmap.mmap(-1, self.NFRAMES * self.CHUNK)
        self._umem_ptr = ct.c_char.from_buffer(self.umem)
        addr = ct.addressof(self._umem_ptr)
        # struct xdp_umem_reg: addr, len, chunk_size, headroom, flags, tx_metadata_len
        s.setsockopt(SOL_XDP, XDP_UMEM_REG, struct.pack(
            "QQIIII", addr, len(self.umem), self.CHUNK, 0, 0, 0))
        for opt in (XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_RX_RING, XDP_TX_RING):
            s.setsockopt(SOL_XDP, opt, self.RING)
        off = struct.unpack("16Q", s.getsockopt(SOL_XDP, XDP_MMAP_OFFSETS, 128))
        # producer, consumer, desc, flags of: rx, tx, fill, completion
        self.rx = self._ring(XDP_PGOFF_RX_RING, off[0:4], 16)
        self.tx = self._ring(XDP_PGOFF_TX_RING, off[4:8], 16)
        self.fr = self._ring(XDP_UMEM_PGOFF_FILL_RING, off[8:12], 8)
        self.cr = self._ring(XDP_UMEM_PGOFF_COMPLETION_RING, off[12:16], 8)
        prod = self._get(self.fr, 0)
        for i in range(self.RING):
            struct.pack_into("Q", self.fr["map"], self.fr["desc"] + ((prod + i) % self.RING) * 8,
                             i * self.CHUNK)
        self._set(self.fr, 0, prod + self.RING)
        sa = struct.pack("HHIII", AF_XDP, XDP_COPY, socket.if_nametoindex(ifname), queue, 0)
        libc = ct.CDLL(None, use_errno=True)
        deadline = time.monotonic() + 2
        while libc.bind(s.fileno(), sa, len(sa)) != 0:
            e = ct.get_errno()
            # the previous socket on this queue is freed 10-30 ms after close
            if e != errno.EBUSY or time.monotonic() > deadline:
                raise OSError(e, f"AF_XDP bind {ifname}/{queue}: {os.strerror(e)}")
            time.sleep(0.01)

    def _ring(self, pgoff, offsets, desc_size):
        size = offsets[2] + self.RING * desc_size
        m = mmap.mmap(self.sock.fileno(), size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                      mmap.PROT_READ | mmap.PROT_WRITE, offset=pgoff)
        self.maps.append(m)
        return {"map": m, "prod": offsets[0], "cons": offsets[1], "desc": offsets[2]}

    @staticmethod
    def _get(r, which):      # 0: producer, 1: consumer (u32)
        return struct.unpack_from("I", r["map"], r["prod" if which == 0 else "cons"])[0]

    @staticmethod
    def _set(r, which, v):
        struct.pack_into("I", r["map"], r["prod" if which == 0 else "cons"], v & 0xFFFFFFFF)

    def fileno(self):
        return self.sock.fileno()

    def receive(self) -> list[bytes]:
        """Frames on the rx ring now; their chunks go back to the fill ring."""
        out = []
        prod, cons = self._get(self.rx, 0), self._get(self.rx, 1)
        fprod = self._get(self.fr, 0)
        while cons != prod:
            addr, ln, _ = struct.unpack_from("QII", self.rx["map"],
                                             self.rx["desc"] + (cons % self.RING) * 16)
            out.append(bytes(self.umem[addr:addr + ln]))
            struct.pack_into("Q", self.fr["map"], self.fr["desc"] + (fprod % self.RING) * 8,
                             addr - addr % self.CHUNK)
            cons, fprod = cons + 1, fprod + 1
        self._set(self.rx, 1, cons)
        self._set(self.fr, 0, fprod)
        return out

    def send(self, frames: list[bytes]) -> None:
        """Put *frames* on the tx ring (chunks 64..127, round robin) and
        kick the kernel; completions are reaped."""
        prod = self._get(self.tx, 0)
        for f in frames:
            chunk = (self.NFRAMES // 2 + self.tx_next % (self.NFRAMES // 2)) * self.CHUNK
            self.tx_next += 1
            self.umem[chunk:chunk + len(f)] = f
            struct.pack_into("QII", self.tx["map"], self.tx["desc"] + (prod % self.RING) * 16,
                             chunk, len(f), 0)
            prod += 1
        self._set(self.tx, 0, prod)
        for _ in range(100):
            try:
                self.sock.send(b"", socket.MSG_DONTWAIT)
            except (BlockingIOError, OSError) as e:
                if getattr(e, "errno", None) not in (errno.EAGAIN, errno.EBUSY, errno.ENOBUFS):
                    raise
            if self._get(self.tx, 1) == prod:
                break
            time.sleep(0.005)
        cprod = self._get(self.cr, 0)
        self._set(self.cr, 1, cprod)            # completions: nothing to reuse

    def rx_dropped(self) -> int:
        return struct.unpack("6Q", self.sock.getsockopt(SOL_XDP, XDP_STATISTICS, 48))[0]

    def close(self):
        for m in self.maps:
            m.close()
        self.maps = []
        self.sock.close()
        if hasattr(self, "_umem_ptr"):
            del self._umem_ptr
            self.umem.close()


def gather(link: Link, xsks, count: int, timeout: float = 2.0, settle: float = 0.2
           ) -> dict:
    """Frames of *link* each of *xsks* receives, waiting until *count* in
    total arrived (or *timeout*), then *settle* s more for strays."""
    got = {x: [] for x in xsks}
    deadline = time.monotonic() + timeout
    while True:
        for x in xsks:
            got[x] += [f for f in x.receive() if link.mine(f)]
        n = sum(map(len, got.values()))
        if n >= count or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    time.sleep(settle)
    for x in xsks:
        got[x] += [f for f in x.receive() if link.mine(f)]
    return got


# ---------------------------------------------------------------- shared NIC

@pytest.fixture(scope="module")
def shared():
    """One link with NicSteering (native) and a keeper VM that keeps the
    programs loaded between tests (the last VM out removes them); each test
    adds its own VMs."""
    lk = Link()
    nic = None
    try:
        lk.create()
        nic = NicSteering(lk.nic, mode="native")
        nic.add_vm(KEEPER_MAC, 1518, (), 1)
        yield lk, nic
    finally:
        if nic is not None:
            nic.close()
        lk.destroy()


class VmSockets:
    """A VM on the shared NIC with its direct socket (NIC queue 0) and its
    port socket (port queue 0), both registered."""

    def __init__(self, lk: Link, nic: NicSteering, mac: str, max_frame: int = 1518,
                 direct: bool = True, sockets: bool = True):
        self.vm = nic.add_vm(mac, max_frame, (0,) if direct else (), 1)
        self.direct = self.port = None
        try:
            if sockets:
                self.port = Xsk(self.vm.port_ifname, 0)
                self.vm.set_xsk("port", 0, self.port.fileno())
                if direct:
                    self.direct = Xsk(lk.nic, 0)
                    self.vm.set_xsk("nic", 0, self.direct.fileno())
        except BaseException:
            self.close()
            raise

    def close(self):
        for kind, x in (("nic", self.direct), ("port", self.port)):
            if x is not None:
                self.vm.clear_xsk(kind, 0)
                x.close()
        self.vm.remove()


@pytest.fixture
def vm(shared):
    lk, nic = shared
    v = VmSockets(lk, nic, VM_MAC)
    try:
        yield lk, nic, v
    finally:
        v.close()


# ---------------------------------------------------------------- tests: usage

def test_unknown_interface():
    with pytest.raises(UsageError, match="interface 'xsnosuch0' not found"):
        NicSteering("xsnosuch0")


def test_unknown_mode(link):
    with pytest.raises(UsageError, match="mode"):
        NicSteering(link.nic, mode="turbo")
    assert link.clean()


@pytest.mark.parametrize("bad", ["52:54:00:aa:bb", "52:54:00:aa:bb:zz", "525400aabb01",
                                 "52:54:00:aa:bb:01:02", "52-54:00:aa:bb:01", ""])
def test_malformed_mac(bad):
    with pytest.raises(UsageError, match="malformed MAC"):
        parse_mac(bad)


def test_parse_mac():
    assert parse_mac("52:54:00:AA:bb:01") == bytes.fromhex("525400aabb01")
    assert parse_mac("52-54-00-aa-bb-01") == bytes.fromhex("525400aabb01")


def test_program_text_inlines_the_header_once():
    text = program_text()
    assert text.count("#define XDPNET_MAPS_H") == 1
    for fn in ("xdpnet_nic(", "xdpnet_flood(", "xdpnet_port_rx(", "xdpnet_port_tx("):
        assert text.count(f"int {fn}") == 1


def test_add_vm_validation(shared):
    lk, nic = shared
    before = (nic.vms(), ports_of(lk.nic_ifindex), sorted(os.listdir(nic.pin_dir)))
    for args, err, msg in (
            (("52:54:00:aa:bb", 1518, (0,), 1), UsageError, "malformed MAC"),
            ((MCAST, 1518, (0,), 1), UsageError, "multicast"),
            (("00:00:00:00:00:00", 1518, (0,), 1), UsageError, "not a VM's MAC"),
            ((VM_MAC, 0, (0,), 1), UsageError, "max_frame"),
            ((VM_MAC, 1518, (1,), 1), UsageError, "out of range"),    # 1 queue
            ((VM_MAC, 1518, (0, 0), 2), UsageError, "repeat"),
            ((VM_MAC, 1518, (), 0), UsageError, "NIC queues or port pairs"),
            ((VM_MAC, 1518, (0,), 9), UsageError, "port pairs"),
            ((KEEPER_MAC, 1518, (0,), 1), BusyError, "already attached")):
        with pytest.raises(err, match=msg):
            nic.add_vm(*args)
    with pytest.raises(UsageError, match="VM id"):
        nic.add_vm(VM_MAC, 1518, (0,), 1, vm_id=64)
    keeper = next(v for v in nic.vms() if v.mac == KEEPER_MAC)
    with pytest.raises(BusyError, match="taken"):
        nic.add_vm(VM_MAC, 1518, (0,), 1, vm_id=keeper.vm_id)
    # nothing half-done: same VMs, ports and pins
    assert (nic.vms(), ports_of(lk.nic_ifindex), sorted(os.listdir(nic.pin_dir))) == before


def test_ntuple_rule_removed_when_add_vm_fails_after_it(shared, monkeypatch):
    """The hardware rule is added last; if recording it fails, the rule and
    the VM go (veth has no ntuple filters: the ethtool calls are faked)."""
    from xdpnet.steering import maps as maps_mod
    from xdpnet.steering import nic as nic_mod

    lk, nic = shared
    before = (nic.vms(), ports_of(lk.nic_ifindex))
    deleted = []
    monkeypatch.setattr(nic_mod, "_ntuple_add", lambda *a: 7)
    monkeypatch.setattr(nic_mod, "_ntuple_del", lambda ifname, loc: deleted.append(loc))
    real_set_vm = maps_mod.MapSet.set_vm

    def set_vm(self, rec):
        if rec.ntuple_loc:
            raise XdpnetError("cannot update map vms: injected")
        real_set_vm(self, rec)

    monkeypatch.setattr(maps_mod.MapSet, "set_vm", set_vm)
    with pytest.raises(XdpnetError, match="injected"):
        nic.add_vm(VM_MAC, 1518, (0,), 1)
    assert deleted == [7]
    assert (nic.vms(), ports_of(lk.nic_ifindex)) == before


def test_release_dead_closes_its_fds_when_opening_the_maps_fails(shared, monkeypatch):
    from xdpnet.steering import nic as nic_mod

    lk, nic = shared

    def broken(pin_dir):
        raise XdpnetError("injected")

    monkeypatch.setattr(nic_mod.MapSet, "open", staticmethod(broken))
    fds = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(XdpnetError, match="injected"):
        nic_mod.release_dead(lk.nic)            # the programs opened, then the maps failed
    assert sorted(os.listdir("/proc/self/fd")) == fds
    assert KEEPER_MAC in [v.mac for v in nic.vms()]


def test_set_xsk_validation(vm):
    lk, nic, v = vm
    with pytest.raises(UsageError, match="not one of"):
        v.vm.set_xsk("nic", 1, v.direct.fileno())
    with pytest.raises(UsageError, match="port queue"):
        v.vm.set_xsk("port", 1, v.port.fileno())
    with pytest.raises(UsageError, match="kind"):
        v.vm.set_xsk("wire", 0, v.port.fileno())
    with pytest.raises(UsageError, match="not a bound AF_XDP socket"):
        v.vm.set_xsk("nic", 0, lk.rx.fileno())


# ---------------------------------------------------------------- tests: frames

def test_vm_mac_without_socket_goes_to_host(shared):
    lk, nic = shared
    v = VmSockets(lk, nic, VM_MAC, sockets=False)
    try:
        frames = [lk.frame(VM_MAC, 100) for _ in range(5)]
        before = nic.verdict_counters()
        host, _ = lk.exchange(frames)
        assert host == frames                       # XDP_PASS: the host got them
        assert delta(before, nic.verdict_counters()) == {"no_socket": 5, "to_host": 1}
        assert nic.vm_counters(v.vm.vm_id)["direct_frames"] == 0
    finally:
        v.close()


def test_vm_mac_to_xsk_direct(vm):
    lk, nic, v = vm
    frames = [lk.frame(VM_MAC, n) for n in (60, 100, 1000, 1514)]
    before = nic.verdict_counters()
    host, got = lk.exchange(frames, v.direct)
    assert host == []                           # not a single one reached the host
    assert got == frames                        # every byte, in order
    assert v.port.receive() == []
    assert delta(before, nic.verdict_counters()) == {"to_vm": 4, "to_host": 1}
    c = nic.vm_counters(v.vm.vm_id)
    assert (c["direct_frames"], c["direct_bytes"]) == (4, sum(map(len, frames)))


def test_detached_lends_the_xdp_slot_and_steers_again_after(vm):
    """NicSteering.detached(): no program on the NIC inside (frames for the
    VM go to the host stack), the same program -- no recompile -- and the
    same VM steering after."""
    lk, nic, v = vm
    prog = attached_prog_ids(lk.nic)
    with nic.detached():
        assert attached_prog_ids(lk.nic) == {}
        frame = lk.frame(VM_MAC, 100)
        host, got = lk.exchange([frame], v.direct)
        assert got == [] and host == [frame]
    assert attached_prog_ids(lk.nic) == prog
    frames = [lk.frame(VM_MAC, n) for n in (60, 1514)]
    host, got = lk.exchange(frames, v.direct)
    assert host == [] and got == frames


def test_port_only_vm_gets_its_unicast_through_its_port(shared):
    lk, nic = shared
    v = VmSockets(lk, nic, OTHER_MAC, direct=False)
    try:
        frames = [lk.frame(OTHER_MAC, n) for n in (64, 700, 1514)]
        before = nic.verdict_counters()
        host, _ = lk.exchange(frames)
        got = gather(lk, [v.port], 3)[v.port]
        assert host == [] and got == frames
        assert delta(before, nic.verdict_counters()) == {"to_port": 3, "port_rx": 3,
                                                         "to_host": 1}
        c = nic.vm_counters(v.vm.vm_id)
        assert (c["port_frames"], c["port_bytes"]) == (3, sum(map(len, frames)))
    finally:
        v.close()


def test_unknown_unicast_goes_to_host(vm):
    lk, nic, v = vm
    frames = [lk.frame("52:54:00:00:00:42", 200) for _ in range(3)]
    before = nic.verdict_counters()
    host, got = lk.exchange(frames, v.direct)
    assert host == frames and got == []
    assert delta(before, nic.verdict_counters()) == {"to_host": 4}


def test_broadcast_and_multicast_reach_host_and_every_vm(vm):
    lk, nic, v = vm
    bc = [lk.frame(BCAST, 80) for _ in range(3)]
    mc = [lk.frame(MCAST, 90) for _ in range(2)]
    before = nic.verdict_counters()
    host, direct = lk.exchange(bc + mc, v.direct)
    assert host == bc + mc                      # the host keeps its broadcast
    assert direct == []
    got = gather(lk, [v.port], 5)[v.port]
    assert got == bc + mc                       # and the VM gets a copy on its port
    # the keeper VM runs no socket: no copy for it
    assert delta(before, nic.verdict_counters()) == {
        "broadcast": 3, "multicast": 2, "to_host": 1, "flooded": 5, "port_rx": 5}
    assert nic.vm_counters(v.vm.vm_id)["flood_frames"] == 5


def test_too_large_dropped(shared):
    lk, nic = shared
    v = VmSockets(lk, nic, VM_MAC, max_frame=500)
    try:
        big = [lk.frame(VM_MAC, 1400), lk.frame(VM_MAC, 501)]
        fits = lk.frame(VM_MAC, 500)
        bc_big = lk.frame(BCAST, 1400)
        before = nic.verdict_counters()
        host, got = lk.exchange(big + [fits, bc_big], v.direct)
        assert got == [fits]                    # dropped: neither host nor VM
        assert host == [bc_big]                 # the host takes any size
        assert gather(lk, [v.port], 0, timeout=0)[v.port] == []
        d = delta(before, nic.verdict_counters())
        assert d == {"too_large": 2, "to_vm": 1, "to_host": 1, "broadcast": 1,
                     "flood_too_large": 1}
        assert nic.vm_counters(v.vm.vm_id)["too_large"] == 3
        assert v.direct.rx_dropped() == 0       # the program dropped them, not the kernel
    finally:
        v.close()


def test_clear_xsk_and_remove_vm(vm):
    lk, nic, v = vm
    v.vm.clear_xsk("nic", 0)
    v.vm.clear_xsk("nic", 0)                    # idempotent
    f = lk.frame(VM_MAC, 100)
    before = nic.verdict_counters()
    host, got = lk.exchange([f], v.direct)
    # no direct socket: through the port instead
    assert host == [] and got == []
    assert gather(lk, [v.port], 1)[v.port] == [f]
    assert delta(before, nic.verdict_counters()) == {"to_port": 1, "port_rx": 1, "to_host": 1}
    v.vm.clear_xsk("port", 0)
    before = nic.verdict_counters()
    assert lk.exchange([f], v.direct) == ([f], [])
    assert delta(before, nic.verdict_counters()) == {"no_socket": 1, "to_host": 1}
    v.vm.set_xsk("nic", 0, v.direct.fileno())
    port = v.vm.port_ifname
    v.vm.remove()
    assert not os.path.exists(f"/sys/class/net/{port}")
    assert VM_MAC not in [x.mac for x in nic.vms()]
    before = nic.verdict_counters()
    assert lk.exchange([f], v.direct) == ([f], [])
    assert delta(before, nic.verdict_counters()) == {"to_host": 2}
    v.vm.clear_xsk("nic", 0)                    # a removed VM: no-op
    v.vm.remove()                               # idempotent


def test_read_pinned_without_loading(vm):
    lk, nic, v = vm
    f = lk.frame(VM_MAC, 100)
    lk.exchange([f], v.direct)
    code = ("import json, sys\nfrom xdpnet.steering.nic import read_pinned\n"
            f"r = read_pinned({lk.nic!r})\n"
            "print(json.dumps(r))\nprint('bcc' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    import json
    out, bcc_loaded = r.stdout.splitlines()
    state = json.loads(out)
    assert bcc_loaded == "False"                # nothing compiled or loaded
    assert state["xdp_mode"] == "native" and state["nic_ifindex"] == lk.nic_ifindex
    assert state["verdicts"] == nic.verdict_counters()
    mine = state["vms"][str(v.vm.vm_id)]
    assert mine["mac"] == VM_MAC and mine["nic_queues"] == [0] and mine["owner_alive"]
    assert mine["port_ifname"] == v.vm.port_ifname
    assert mine["counters"]["direct_frames"] == nic.vm_counters(v.vm.vm_id)["direct_frames"]
    with pytest.raises(UsageError, match="no xdpnet steering"):
        read_pinned("xsnosuch0")


# ---------------------------------------------------------------- tests: attach

def test_second_handle_joins_and_conflicting_mode_is_busy(shared):
    lk, nic = shared
    ids = attached_prog_ids(lk.nic)
    with NicSteering(lk.nic, mode="auto") as other:
        assert not other.loaded and other.compile_seconds == 0
        assert other.prog_ids() == nic.prog_ids()       # the same programs, not a copy
        assert other.xdp_mode == "native"
    assert attached_prog_ids(lk.nic) == ids             # closing a joiner left them
    with pytest.raises(BusyError, match="native XDP mode"):
        NicSteering(lk.nic, mode="generic")
    assert attached_prog_ids(lk.nic) == ids


def _foreign_program():
    """A trivial XDP_PASS program loaded by bcc, as someone else's."""
    bcc = kheaders.import_bcc()
    kh = kheaders.find_kernel_headers()
    old = os.environ.get("BCC_KERNEL_SOURCE")
    if kh.source:
        os.environ["BCC_KERNEL_SOURCE"] = kh.source
    try:
        b = bcc.BPF(text=b"int foreign(struct xdp_md *ctx) { return XDP_PASS; }",
                    cflags=list(kh.cflags))
    finally:
        if kh.source:
            os.environ.pop("BCC_KERNEL_SOURCE") if old is None else \
                os.environ.__setitem__("BCC_KERNEL_SOURCE", old)
    return b, b.load_func(b"foreign", bcc.BPF.XDP)


def test_never_replaces_or_detaches_foreign_program(link):
    bcc = kheaders.import_bcc()
    b, fn = _foreign_program()
    try:
        bcc.BPF.attach_xdp(link.nic.encode(), fn, 1 << 2)
        foreign = attached_prog_ids(link.nic)
        with pytest.raises(BusyError, match=f"ip link set dev {link.nic} xdp off"):
            NicSteering(link.nic, mode="native")
        with pytest.raises(BusyError):
            NicSteering(link.nic, mode="auto")
        assert attached_prog_ids(link.nic) == foreign
        assert not os.path.exists(pin_dir(link.nic))    # nothing pinned either
        bcc.BPF.remove_xdp(link.nic.encode(), 1 << 2)

        # ours attached, then someone force-replaces it: our teardown must
        # leave their program alone (and still remove everything of ours)
        st = NicSteering(link.nic, mode="native")
        st.add_vm(VM_MAC, 1518, (0,), 1)
        ours = attached_prog_ids(link.nic)
        bcc.BPF.attach_xdp(link.nic.encode(), fn, 1 << 2)            # no NOEXIST: replaces
        foreign = attached_prog_ids(link.nic)
        assert foreign != ours
        st.close()
        assert attached_prog_ids(link.nic) == foreign
        assert not os.path.exists(pin_dir(link.nic)) and ports_of(link.nic_ifindex) == []
    finally:
        bcc.BPF.remove_xdp(link.nic.encode(), 1 << 2)
        b.cleanup()


def test_last_vm_out_removes_everything(link):
    with NicSteering(link.nic, mode="native") as st:
        assert st.xdp_mode == "native" and st.loaded
        assert link.xdp_shown() and set(attached_prog_ids(link.nic)) == {"native"}
        assert "xdpnet_flood" in sh("tc", "filter", "show", "dev", link.nic, "ingress")
        assert sorted(os.listdir(st.pin_dir)) == sorted(
            ["vm_macs", "vms", "nic_xsks", "port_xsks", "egress", "port_vm", "config",
             "verdicts", "vm_stats", "prog_nic", "prog_flood", "prog_port_rx", "prog_port_tx"])
        a = st.add_vm(VM_MAC, 1518, (0,), 1)
        b = st.add_vm(OTHER_MAC, 1518, (), 2)
        assert sh("ip", "-d", "link", "show", "dev", b.port_ifname).count("xdp") >= 1
        assert "numrxqueues 2" in sh("ip", "-d", "link", "show", "dev", b.port_ifname)
        a.remove()
        assert os.path.isdir(st.pin_dir) and link.xdp_shown()      # b is still there
        b.remove()
        assert link.clean()                     # the last VM out removed it all
    assert st.closed
    assert link.clean()
    st.close()                                  # idempotent
    with pytest.raises(XdpnetError, match="closed"):
        st.verdict_counters()
    # and it can be attached again afterwards
    with NicSteering(link.nic, mode="native") as st2:
        assert st2.loaded
    assert link.clean()


def test_open_and_close_without_vm_leaves_nothing(link):
    NicSteering(link.nic, mode="native").close()
    assert link.clean()


def test_generic_mode(link):
    st = NicSteering(link.nic, mode="generic")
    v = w = None
    try:
        assert st.xdp_mode == "generic"
        assert set(attached_prog_ids(link.nic)) == {"generic"}
        assert "xdpgeneric" in sh("ip", "-d", "link", "show", "dev", link.nic)
        v = VmSockets(link, st, VM_MAC, max_frame=500)
        w = VmSockets(link, st, OTHER_MAC, direct=False)
        ok = [link.frame(VM_MAC, 100), link.frame(BCAST, 64)]
        other = link.frame("52:54:00:00:00:42", 100)
        big = link.frame(VM_MAC, 1400)
        to_w = link.frame(OTHER_MAC, 300)
        before = st.verdict_counters()
        host, got = link.exchange(ok + [other, big, to_w], v.direct)
        assert got == ok[:1] and host == [ok[1], other]
        ports = gather(link, [v.port, w.port], 3)
        assert ports[v.port] == [ok[1]] and ports[w.port] == [ok[1], to_w]
        assert delta(before, st.verdict_counters()) == {
            "to_vm": 1, "broadcast": 1, "to_host": 2, "too_large": 1, "to_port": 1,
            "flooded": 2, "port_rx": 3}
    finally:
        for x in (v, w):
            if x:
                x.close()
        st.close()
    assert link.clean()


def test_auto_mode(link):
    with NicSteering(link.nic, mode="auto") as st:
        assert st.xdp_mode == "native" and st.notice is None
    # a bridge has no native XDP: auto falls back to generic, with a notice
    br = f"{PREFIX}{uuid.uuid4().hex[:8]}b"
    sh("ip", "link", "add", br, "type", "bridge")
    try:
        with pytest.raises(XdpnetError, match="native"):
            NicSteering(br, mode="native")
        assert not os.path.exists(pin_dir(br))
        with NicSteering(br, mode="auto") as st:
            assert st.xdp_mode == "generic"
            assert st.notice and "generic" in st.notice
            assert set(attached_prog_ids(br)) == {"generic"}
        assert attached_prog_ids(br) == {} and not os.path.exists(pin_dir(br))
    finally:
        sh("ip", "link", "del", br, check=False)


def test_join_repairs_a_program_detached_by_hand(link):
    """Someone ran ``ip link set dev NIC xdp off`` and removed the clsact
    qdisc: the next process to open the NIC attaches the pinned programs
    again (no second copy is loaded)."""
    with NicSteering(link.nic, mode="native") as st:
        st.add_vm(VM_MAC, 1518, (), 1)
        ids = st.prog_ids()
        sh("ip", "link", "set", "dev", link.nic, "xdpdrv", "off")
        sh("tc", "qdisc", "del", "dev", link.nic, "clsact")
        assert attached_prog_ids(link.nic) == {}
        with NicSteering(link.nic) as other:
            assert not other.loaded and other.prog_ids() == ids
        assert attached_prog_ids(link.nic) == {"native": ids["nic"]}
        assert "xdpnet_flood" in sh("tc", "filter", "show", "dev", link.nic, "ingress")
    assert link.clean()


# ---------------------------------------------------------------- tests: kheaders

def _fake_debian_headers(root, ver, karch="x86", deb="amd64"):
    common = root / f"linux-headers-{ver}-common"
    (common / "include/linux").mkdir(parents=True)
    (common / "include/linux/kconfig.h").write_text("")
    (root / f"linux-headers-{ver}-{deb}/arch/{karch}/include/generated").mkdir(parents=True)


def test_kheaders_debian_split(tmp_path, monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    monkeypatch.setattr(kheaders.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(kheaders, "KHEADERS_ARCHIVES", ())
    _fake_debian_headers(tmp_path, "6.1.0-9")
    _fake_debian_headers(tmp_path, "6.1.0-56")
    kh = kheaders.find_kernel_headers("9.9.9-custom", src_root=str(tmp_path),
                                      modules_root=str(tmp_path / "nomods"))
    a = tmp_path / "linux-headers-6.1.0-56-amd64"
    assert kh.source == str(tmp_path / "linux-headers-6.1.0-56-common")
    assert kh.cflags == (f"-I{a}/include", f"-I{a}/arch/x86/include/generated",
                         f"-I{a}/arch/x86/include/generated/uapi",
                         f"-I{a}/include/generated/uapi")


def test_kheaders_build_dir_needs_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    (tmp_path / "mods/5.10.0/build").mkdir(parents=True)
    kh = kheaders.find_kernel_headers("5.10.0", src_root=str(tmp_path / "src"),
                                      modules_root=str(tmp_path / "mods"))
    assert kh.source is None and kh.cflags == ()


def test_kheaders_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    monkeypatch.setattr(kheaders.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(kheaders, "KHEADERS_ARCHIVES", ())
    (tmp_path / "linux-headers-6.1.0-56-common").mkdir()   # no arch folder
    with pytest.raises(DependencyError, match="apt-get install linux-headers-amd64"):
        kheaders.find_kernel_headers("9.9.9", src_root=str(tmp_path),
                                     modules_root=str(tmp_path / "nomods"))


def test_missing_bcc_is_dependency_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bcc", None)    # import fails
    with pytest.raises(DependencyError, match="python3-bpfcc.*tools/setup"):
        kheaders.import_bcc()


def test_unprivileged_is_privilege_error(link):
    code = ("from xdpnet.steering.nic import NicSteering\n"
            "from xdpnet.errors import PrivilegeError\n"
            f"try:\n    NicSteering({link.nic!r})\n"
            "except PrivilegeError as e:\n    print('PRIV', e.exit_code)\n")
    r = subprocess.run([*NOBODY, "--inh-caps=-all", sys.executable,
                        "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "PRIV 3" in r.stdout, r.stderr
    assert link.clean()

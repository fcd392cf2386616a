"""Kernel tests of the XDP steering program (bpf/xdpnet_steer.c) and
MacSteering, with real frames.

Topology per fixture: a veth pair whose "NIC" end (``xt<random>n``) stays
in the root namespace, where MacSteering attaches and a real AF_XDP
socket binds, and whose peer (``xt<random>p``) sits in a private
namespace (``xtns<random>``), where an AF_PACKET socket sends frames as
the wire would.  IPv6 is disabled on both ends and no address is set, so
the only frames on the link are the test's own.  Everything is removed in
the fixture's ``finally``.

What reaches the host stack is observed with an AF_PACKET listener on the
NIC end (it sees exactly the XDP_PASS frames); what reaches the VM with an
AF_XDP socket bound to queue 0 and registered with ``set_xsk``.  Each
check sends a "sentinel" frame that goes to the host after the frames
under test: when the listener sees it, the frames before it have been
through the program (one queue, in order).
"""

from __future__ import annotations

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

from xdpnet.errors import BusyError, DependencyError, UsageError, XdpnetError
from xdpnet.net.mac import parse_mac
from xdpnet.net.netns import Testbed, run_in_netns, socket_in_netns
from xdpnet.steering import kheaders
from xdpnet.steering.xdp import MacSteering, attached_prog_ids

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

VM_MAC = "52:54:00:aa:bb:01"
OTHER_MAC = "52:54:00:aa:bb:02"
PEER_MAC = "02:00:00:00:00:99"
SENTINEL_MAC = "02:00:00:00:00:5e"    # never registered: always to the host
BCAST = "ff:ff:ff:ff:ff:ff"
MCAST = "01:00:5e:00:00:fb"
ETHERTYPE = 0x88B5
ETH_P_ALL = 0x0003
VM_ID = 7


def sh(*cmd: str, check: bool = True) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout


# ---------------------------------------------------------------- topology

class Link:
    """A test bed (``nic`` in the root namespace, ``peer`` in ``ns``) with an
    AF_PACKET sender on the peer and a listener on the NIC."""

    def __init__(self):
        self.tag = uuid.uuid4().bytes[:4]   # marks this link's frames
        self.seq = 0

    def create(self):
        self.bed = Testbed(queues=1, prefix="xt")
        self.ns, self.nic, self.peer = self.bed.netns, self.bed.nic, self.bed.wire
        run_in_netns(self.ns, ["ip", "link", "set", self.peer, "address", PEER_MAC], check=True)
        self.tx = socket_in_netns(self.ns, socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.tx.bind((self.peer, 0))
        self.rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.rx.bind((self.nic, 0))
        self.rx.setblocking(False)

    def destroy(self):
        for s in ("tx", "rx"):
            if hasattr(self, s):
                getattr(self, s).close()
        if hasattr(self, "bed"):
            self.bed.close()

    # frames: dst, src, ethertype, link tag (4), seq (4), pattern
    def frame(self, dst: str, length: int = 100) -> bytes:
        self.seq += 1
        head = parse_mac(dst) + parse_mac(PEER_MAC) + struct.pack(
            "!H4sI", ETHERTYPE, self.tag, self.seq)
        return head + bytes((self.seq + i) & 0xFF for i in range(length - len(head)))

    def send(self, frames):
        for f in frames:
            self.tx.send(f)

    def host_frames(self, until: bytes, timeout: float = 3.0) -> list[bytes]:
        """Frames of this link the host stack got, up to and including the
        sentinel *until*."""
        got, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            select.select([self.rx], [], [], 0.05)
            while True:
                try:
                    data, addr = self.rx.recvfrom(65536)
                except BlockingIOError:
                    break
                if addr[2] == socket.PACKET_OUTGOING or not self.mine(data):
                    continue
                got.append(data)
                if data == until:
                    return got
        raise AssertionError("sentinel frame never reached the host stack")

    def mine(self, data: bytes) -> bool:
        return len(data) >= 20 and data[12:14] == struct.pack("!H", ETHERTYPE) \
            and data[14:18] == self.tag

    def exchange(self, frames, xsk=None) -> tuple[list[bytes], list[bytes]]:
        """Send *frames* and a sentinel; (frames the host got, frames the
        XSK got), sentinel excluded."""
        sentinel = self.frame(SENTINEL_MAC, 64)
        self.send(list(frames) + [sentinel])
        host = self.host_frames(sentinel)[:-1]
        vm = xsk.receive() if xsk else []
        return host, [f for f in vm if self.mine(f)]

    def xdp_shown(self) -> bool:
        out = sh("ip", "-d", "link", "show", "dev", self.nic)
        return bool(re.search(r"\bxdp(generic|drv|offload)?\b|prog/xdp", out))


@pytest.fixture
def link():
    lk = Link()
    try:
        lk.create()
        yield lk
    finally:
        lk.destroy()


@pytest.fixture(scope="module")
def shared():
    """One link with MacSteering attached (native), shared by the frame
    tests to compile the program once; each test registers its own VMs."""
    lk = Link()
    st = None
    try:
        lk.create()
        st = MacSteering(lk.nic, mode="native")
        yield lk, st
    finally:
        if st is not None:
            st.detach()
        lk.destroy()


@pytest.fixture
def steer(shared):
    lk, st = shared
    yield lk, st
    for mac in list(st.vms()):
        st.remove_vm(mac)
    st.clear_xsk(0)


# ---------------------------------------------------------------- AF_XDP

AF_XDP = 44
SOL_XDP = 283
XDP_MMAP_OFFSETS, XDP_RX_RING, XDP_UMEM_REG = 1, 2, 4
XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_STATISTICS = 5, 6, 7
XDP_PGOFF_RX_RING = 0
XDP_UMEM_PGOFF_FILL_RING = 0x100000000
XDP_COPY = 1 << 1


class Xsk:
    """A minimal AF_XDP receiver (copy mode) built from raw syscalls:
    UMEM of 64 chunks of 2048 bytes, fill and rx rings of 64."""

    NFRAMES, CHUNK, RING = 64, 2048, 64

    def __init__(self, ifname: str, queue: int = 0):
        self.sock = socket.socket(AF_XDP, socket.SOCK_RAW, 0)
        self.maps = []
        try:
            self._setup(ifname, queue)
        except BaseException:
            self.close()
            raise

    def _setup(self, ifname, queue):
        s = self.sock
        self.umem = mmap.mmap(-1, self.NFRAMES * self.CHUNK)
        self._umem_ptr = ct.c_char.from_buffer(self.umem)
        addr = ct.addressof(self._umem_ptr)
        # struct xdp_umem_reg: addr, len, chunk_size, headroom, flags, tx_metadata_len
        s.setsockopt(SOL_XDP, XDP_UMEM_REG, struct.pack(
            "QQIIII", addr, len(self.umem), self.CHUNK, 0, 0, 0))
        for opt in (XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_RX_RING):
            s.setsockopt(SOL_XDP, opt, self.RING)
        off = struct.unpack("16Q", s.getsockopt(SOL_XDP, XDP_MMAP_OFFSETS, 128))
        rx_off, fr_off = off[0:4], off[8:12]    # producer, consumer, desc, flags
        self.rx = self._ring(XDP_PGOFF_RX_RING, rx_off, 16)
        self.fr = self._ring(XDP_UMEM_PGOFF_FILL_RING, fr_off, 8)
        # post every chunk on the fill ring
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


@pytest.fixture
def xsk(steer):
    lk, st = steer
    x = Xsk(lk.nic, 0)
    try:
        st.set_xsk(0, x.fileno())
        yield x
    finally:
        st.clear_xsk(0)
        x.close()


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


# ---------------------------------------------------------------- tests: usage

def test_unknown_interface():
    with pytest.raises(UsageError, match="interface 'xtnosuch0' not found"):
        MacSteering("xtnosuch0")


def test_unknown_mode(link):
    with pytest.raises(UsageError, match="mode"):
        MacSteering(link.nic, mode="turbo")


@pytest.mark.parametrize("bad", ["52:54:00:aa:bb", "52:54:00:aa:bb:zz", "525400aabb01",
                                 "52:54:00:aa:bb:01:02", "52-54:00:aa:bb:01", ""])
def test_malformed_mac(bad):
    with pytest.raises(UsageError, match="malformed MAC"):
        parse_mac(bad)


def test_parse_mac():
    assert parse_mac("52:54:00:AA:bb:01") == bytes.fromhex("525400aabb01")
    assert parse_mac("52-54-00-aa-bb-01") == bytes.fromhex("525400aabb01")


def test_add_vm_validation(steer):
    lk, st = steer
    with pytest.raises(UsageError, match="malformed MAC"):
        st.add_vm(VM_ID, "52:54:00:aa:bb", 1518)
    with pytest.raises(UsageError, match="multicast"):
        st.add_vm(VM_ID, MCAST, 1518)
    with pytest.raises(UsageError, match="VM id"):
        st.add_vm(64, VM_MAC, 1518)
    with pytest.raises(UsageError, match="max_frame"):
        st.add_vm(VM_ID, VM_MAC, 0)
    with pytest.raises(UsageError, match="queue"):
        st.set_xsk(64, 3)
    with pytest.raises(UsageError, match="not a bound AF_XDP socket"):
        st.set_xsk(0, lk.rx.fileno())
    st.add_vm(VM_ID, VM_MAC, 1518)
    st.add_vm(VM_ID, OTHER_MAC, 1000)          # a second MAC of the same VM
    with pytest.raises(BusyError, match="one VM per interface"):
        st.add_vm(VM_ID + 1, "52:54:00:aa:bb:03", 1518)
    assert {m: (e.vm_id, e.max_frame) for m, e in st.vms().items()} == {
        VM_MAC: (VM_ID, 1518), OTHER_MAC: (VM_ID, 1000)}
    assert st.remove_vm(OTHER_MAC) is True
    assert st.remove_vm(OTHER_MAC) is False


# ---------------------------------------------------------------- tests: frames

def test_vm_mac_without_socket_goes_to_host(steer):
    lk, st = steer
    st.add_vm(VM_ID, VM_MAC, 1518)
    frames = [lk.frame(VM_MAC, 100) for _ in range(5)]
    before = st.verdict_counters()
    host, _ = lk.exchange(frames)
    assert host == frames                       # XDP_PASS: the host got them
    assert delta(before, st.verdict_counters()) == {"no_socket": 5, "to_host": 1}
    assert st.vm_counters(VM_ID)["frames"] == 0


def test_vm_mac_to_xsk(steer, xsk):
    lk, st = steer
    st.add_vm(VM_ID, VM_MAC, 1518)
    frames = [lk.frame(VM_MAC, n) for n in (60, 100, 1000, 1514)]
    before = st.verdict_counters()
    host, vm = lk.exchange(frames, xsk)
    assert host == []                           # not a single one reached the host
    assert vm == frames                         # every byte, in order
    assert delta(before, st.verdict_counters()) == {"to_vm": 4, "to_host": 1}
    assert st.vm_counters(VM_ID) == {"frames": 4, "bytes": sum(map(len, frames)),
                                     "too_large": 0}


def test_unknown_unicast_goes_to_host(steer, xsk):
    lk, st = steer
    st.add_vm(VM_ID, VM_MAC, 1518)
    frames = [lk.frame("52:54:00:00:00:42", 200) for _ in range(3)]
    before = st.verdict_counters()
    host, vm = lk.exchange(frames, xsk)
    assert host == frames and vm == []
    assert delta(before, st.verdict_counters()) == {"to_host": 4}


def test_broadcast_and_multicast_to_vm(steer, xsk):
    lk, st = steer
    st.add_vm(VM_ID, VM_MAC, 1518)
    bc = [lk.frame(BCAST, 80) for _ in range(3)]
    mc = [lk.frame(MCAST, 90) for _ in range(2)]
    before = st.verdict_counters()
    host, vm = lk.exchange(bc + mc, xsk)
    assert host == [] and vm == bc + mc
    assert delta(before, st.verdict_counters()) == {"broadcast": 3, "multicast": 2,
                                                    "to_host": 1}
    assert st.vm_counters(VM_ID)["frames"] == 5


def test_broadcast_without_vm_goes_to_host(steer, xsk):
    lk, st = steer
    frames = [lk.frame(BCAST, 80), lk.frame(MCAST, 80)]
    before = st.verdict_counters()
    host, vm = lk.exchange(frames, xsk)
    assert host == frames and vm == []
    assert delta(before, st.verdict_counters()) == {"to_host": 3}


def test_too_large_dropped(steer, xsk):
    lk, st = steer
    st.add_vm(VM_ID, VM_MAC, 500)
    big = [lk.frame(VM_MAC, 1400), lk.frame(VM_MAC, 501), lk.frame(BCAST, 1400)]
    fits = lk.frame(VM_MAC, 500)
    before = st.verdict_counters()
    host, vm = lk.exchange(big + [fits], xsk)
    assert host == [] and vm == [fits]          # dropped: neither host nor VM
    assert delta(before, st.verdict_counters()) == {"too_large": 3, "to_vm": 1,
                                                    "to_host": 1}
    assert st.vm_counters(VM_ID) == {"frames": 1, "bytes": 500, "too_large": 3}
    assert xsk.rx_dropped() == 0                # the program dropped them, not the kernel


def test_flood_limit_is_smallest_max_frame(steer, xsk):
    lk, st = steer
    st.add_vm(VM_ID, VM_MAC, 1518)
    st.add_vm(VM_ID, OTHER_MAC, 300)
    before = st.verdict_counters()
    host, vm = lk.exchange([lk.frame(BCAST, 400), lk.frame(VM_MAC, 400)], xsk)
    assert len(vm) == 1 and vm[0][:6] == parse_mac(VM_MAC)
    assert delta(before, st.verdict_counters()) == {"too_large": 1, "to_vm": 1,
                                                    "to_host": 1}
    st.remove_vm(OTHER_MAC)                     # back to 1518
    before = st.verdict_counters()
    lk.exchange([lk.frame(BCAST, 400)], xsk)
    assert delta(before, st.verdict_counters()) == {"broadcast": 1, "to_host": 1}


def test_remove_vm_and_clear_xsk(steer, xsk):
    lk, st = steer
    st.add_vm(VM_ID, VM_MAC, 1518)
    st.clear_xsk(0)
    st.clear_xsk(0)                             # idempotent
    f = lk.frame(VM_MAC, 100)
    before = st.verdict_counters()
    assert lk.exchange([f], xsk) == ([f], [])
    assert delta(before, st.verdict_counters()) == {"no_socket": 1, "to_host": 1}
    st.set_xsk(0, xsk.fileno())
    st.remove_vm(VM_MAC)
    before = st.verdict_counters()
    assert lk.exchange([f], xsk) == ([f], [])
    assert delta(before, st.verdict_counters()) == {"to_host": 2}


# ---------------------------------------------------------------- tests: attach

def test_second_steering_is_busy(shared):
    lk, st = shared
    ids = attached_prog_ids(lk.nic)
    with pytest.raises(BusyError) as ei:
        MacSteering(lk.nic, mode="native")
    assert lk.nic in str(ei.value)
    assert f"ip link set dev {lk.nic} xdp off" in str(ei.value)
    with pytest.raises(BusyError):
        MacSteering(lk.nic, mode="generic")
    assert attached_prog_ids(lk.nic) == ids     # ours untouched


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
            MacSteering(link.nic, mode="native")
        with pytest.raises(BusyError):
            MacSteering(link.nic, mode="auto")
        assert attached_prog_ids(link.nic) == foreign
        bcc.BPF.remove_xdp(link.nic.encode(), 1 << 2)

        # ours attached, then someone force-replaces it: our detach must
        # leave their program alone
        st = MacSteering(link.nic, mode="native")
        ours = attached_prog_ids(link.nic)
        bcc.BPF.attach_xdp(link.nic.encode(), fn, 1 << 2)            # no NOEXIST: replaces
        foreign = attached_prog_ids(link.nic)
        assert foreign != ours
        st.detach()
        assert attached_prog_ids(link.nic) == foreign
    finally:
        bcc.BPF.remove_xdp(link.nic.encode(), 1 << 2)
        b.cleanup()


def test_detach(link):
    with MacSteering(link.nic, mode="native") as st:
        assert st.xdp_mode == "native" and st.attached
        assert link.xdp_shown()
        assert set(attached_prog_ids(link.nic)) == {"native"}
        st.add_vm(VM_ID, VM_MAC, 1518)
    assert not st.attached
    assert not link.xdp_shown() and attached_prog_ids(link.nic) == {}
    st.detach()                                 # idempotent
    st.close()
    with pytest.raises(XdpnetError, match="detached"):
        st.verdict_counters()
    # and it can be attached again afterwards
    st2 = MacSteering(link.nic, mode="native")
    st2.close()
    assert not link.xdp_shown()


def test_generic_mode(link):
    st = MacSteering(link.nic, mode="generic")
    x = None
    try:
        assert st.xdp_mode == "generic"
        assert set(attached_prog_ids(link.nic)) == {"generic"}
        assert "xdpgeneric" in sh("ip", "-d", "link", "show", "dev", link.nic)
        st.add_vm(VM_ID, VM_MAC, 500)
        x = Xsk(link.nic, 0)
        st.set_xsk(0, x.fileno())
        ok = [link.frame(VM_MAC, 100), link.frame(BCAST, 64)]
        other = link.frame("52:54:00:00:00:42", 100)
        big = link.frame(VM_MAC, 1400)
        before = st.verdict_counters()
        host, vm = link.exchange(ok + [other, big], x)
        assert vm == ok and host == [other]
        assert delta(before, st.verdict_counters()) == {
            "to_vm": 1, "broadcast": 1, "to_host": 2, "too_large": 1}
    finally:
        if x:
            st.clear_xsk(0)
            x.close()
        st.detach()
    assert not link.xdp_shown()


def test_auto_mode(link):
    with MacSteering(link.nic, mode="auto") as st:
        assert st.xdp_mode == "native" and st.notice is None
    # a bridge has no native XDP: auto falls back to generic, with a notice
    br = f"xt{uuid.uuid4().hex[:8]}b"
    sh("ip", "link", "add", br, "type", "bridge")
    try:
        with pytest.raises(XdpnetError, match="native"):
            MacSteering(br, mode="native")
        with MacSteering(br, mode="auto") as st:
            assert st.xdp_mode == "generic"
            assert st.notice and "generic" in st.notice
            assert set(attached_prog_ids(br)) == {"generic"}
        assert attached_prog_ids(br) == {}
    finally:
        sh("ip", "link", "del", br, check=False)


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
    monkeypatch.setitem(__import__("sys").modules, "bcc", None)    # import fails
    with pytest.raises(DependencyError, match="python3-bpfcc.*tools/setup"):
        kheaders.import_bcc()


def test_unprivileged_is_privilege_error(link):
    code = ("from xdpnet.steering.xdp import MacSteering\n"
            "from xdpnet.errors import PrivilegeError\n"
            f"try:\n    MacSteering({link.nic!r})\n"
            "except PrivilegeError as e:\n    print('PRIV', e.exit_code)\n")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "--inh-caps=-all", sys.executable,
                        "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "PRIV 3" in r.stdout, r.stderr
    assert not link.xdp_shown()

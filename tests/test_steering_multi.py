"""Many VMs on one NIC (docs/steering.md), with real frames, real XDP/TC
programs and real AF_XDP sockets.

The NIC is a 2-queue veth (``xs<random>n``; its wire peer in a namespace
has GRO on, so frames XDP redirects into the NIC reach it).  Three VMs:

* A owns NIC queues 0 and 1 (direct sockets on both) and has a 2-queue
  port (a socket on each port queue);
* B and C are port-only (one port queue, one socket each).

The wire peer sends with AF_PACKET and ``PACKET_QDISC_BYPASS`` from a
chosen CPU: a veth then delivers on queue ``cpu % 2``.  The host's share
is seen by an AF_PACKET listener on the NIC, the wire's by one on the
peer.  Helpers (Link, Xsk, gather) come from tests/test_xdp_steering.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from test_xdp_steering import BCAST, MCAST, PEER_MAC, REPO, Link, Xsk, delta, gather
from xdpnet.errors import BusyError, UsageError
from xdpnet.net.port import ports_of
from xdpnet.steering.nic import NicSteering
from xdpnet.steering.programs import pin_dir
from xdpnet.steering.xdp import attached_prog_ids

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

A_MAC = "52:54:00:0a:00:01"
B_MAC = "52:54:00:0b:00:01"
C_MAC = "52:54:00:0c:00:01"
D_MAC = "52:54:00:0d:00:01"
E_MAC = "52:54:00:0e:00:01"
CPUS = sorted(os.sched_getaffinity(0))[:2]
TESTS = os.path.dirname(os.path.abspath(__file__))


class Vm:
    """A VM with its sockets: ``direct[q]`` per NIC queue, ``port[i]`` per
    port queue."""

    def __init__(self, lk: Link, nic: NicSteering, mac: str, queues=(), pairs: int = 1):
        self.mac = mac
        self.vm = nic.add_vm(mac, 1518, tuple(queues), pairs)
        self.direct: dict[int, Xsk] = {}
        self.port: dict[int, Xsk] = {}
        try:
            for q in queues:
                self.direct[q] = Xsk(lk.nic, q)
                self.vm.set_xsk("nic", q, self.direct[q].fileno())
            for i in range(pairs):
                self.port[i] = Xsk(self.vm.port_ifname, i)
                self.vm.set_xsk("port", i, self.port[i].fileno())
        except BaseException:
            self.close()
            raise

    @property
    def sockets(self) -> list[Xsk]:
        return [*self.direct.values(), *self.port.values()]

    def close(self):
        for q, x in self.direct.items():
            self.vm.clear_xsk("nic", q)
            x.close()
        for i, x in self.port.items():
            self.vm.clear_xsk("port", i)
            x.close()
        self.vm.remove()


@pytest.fixture(scope="module")
def multi():
    assert len(CPUS) == 2, "these tests steer frames to queue 0 and 1 by CPU: need 2 CPUs"
    lk = Link(queues=2)
    nic = None
    vms = []
    try:
        lk.create()
        nic = NicSteering(lk.nic, mode="native")
        for mac, queues, pairs in ((A_MAC, (0, 1), 2), (B_MAC, (), 1), (C_MAC, (), 1)):
            vms.append(Vm(lk, nic, mac, queues, pairs))
        yield lk, nic, *vms
    finally:
        for v in vms:
            v.close()
        if nic is not None:
            nic.close()
        lk.destroy()


def drain(*vms: Vm) -> None:
    for v in vms:
        for x in v.sockets:
            x.receive()


def everything(lk: Link, vms, count: int, timeout: float = 2.0) -> dict:
    """{socket: frames} over every socket of *vms*."""
    return gather(lk, [x for v in vms for x in v.sockets], count, timeout)


def received(got: dict, v: Vm) -> list[bytes]:
    return [f for x in v.sockets for f in got[x]]


# ---------------------------------------------------------------- wire -> VMs

@pytest.mark.parametrize("cpu", CPUS)
def test_unicast_reaches_exactly_its_sockets(multi, cpu):
    lk, nic, a, b, c = multi
    queue = cpu % 2
    drain(a, b, c)
    fa = [lk.frame(A_MAC, n) for n in (64, 600, 1514)]
    fb = [lk.frame(B_MAC, n) for n in (70, 1000)]
    fc = [lk.frame(C_MAC, n) for n in (80, 1500)]
    before = nic.verdict_counters()
    ca, cb = nic.vm_counters(a.vm.vm_id), nic.vm_counters(b.vm.vm_id)
    host, _ = lk.exchange(fa + fb + fc, cpu=cpu)
    got = everything(lk, (a, b, c), 7)
    assert host == []
    # A: direct, on the socket of the queue the frames arrived on; nothing elsewhere
    assert got[a.direct[queue]] == fa
    assert [got[x] for x in a.sockets if x is not a.direct[queue]] == [[], [], []]
    assert got[b.port[0]] == fb and got[c.port[0]] == fc
    assert delta(before, nic.verdict_counters()) == {"to_vm": 3, "to_port": 4, "port_rx": 4,
                                                     "to_host": 1}
    assert delta(ca, nic.vm_counters(a.vm.vm_id)) == {"direct_frames": 3,
                                                      "direct_bytes": sum(map(len, fa))}
    assert delta(cb, nic.vm_counters(b.vm.vm_id)) == {"port_frames": 2,
                                                      "port_bytes": sum(map(len, fb))}


def test_broadcast_reaches_every_vm_and_the_host(multi):
    lk, nic, a, b, c = multi
    drain(a, b, c)
    frames = [lk.frame(BCAST, 100), lk.frame(MCAST, 200), lk.frame(BCAST, 1514)]
    before = nic.verdict_counters()
    host, _ = lk.exchange(frames, cpu=CPUS[0])
    got = everything(lk, (a, b, c), 9)
    assert host == frames                               # the host keeps them
    assert sorted(received(got, a)) == sorted(frames)   # one copy each, on A's port
    assert all(got[x] == [] for x in a.direct.values())
    assert got[b.port[0]] == frames and got[c.port[0]] == frames
    assert delta(before, nic.verdict_counters()) == {
        "broadcast": 2, "multicast": 1, "to_host": 1, "flooded": 9, "port_rx": 9}
    assert nic.vm_counters(c.vm.vm_id)["flood_frames"] >= 3


# ---------------------------------------------------------------- VM -> ...

def test_interguest_b_to_a_never_touches_the_wire(multi):
    lk, nic, a, b, c = multi
    drain(a, b, c)
    lk.wire_frames(settle=0)
    f = lk.frame(A_MAC, 300, src=B_MAC)
    before = nic.verdict_counters()
    ca, cb = nic.vm_counters(a.vm.vm_id), nic.vm_counters(b.vm.vm_id)
    b.port[0].send([f])
    got = everything(lk, (a, b, c), 1)
    assert received(got, a) == [f]
    assert all(got[x] == [] for x in a.direct.values())     # through A's port
    assert received(got, b) == [] and received(got, c) == []
    assert lk.wire_frames() == []                           # never on the wire
    assert lk.host_now() == []
    assert delta(before, nic.verdict_counters()) == {"interguest": 1, "port_rx": 1}
    assert delta(ca, nic.vm_counters(a.vm.vm_id)) == {"interguest_frames": 1,
                                                      "interguest_bytes": 300}
    assert delta(cb, nic.vm_counters(b.vm.vm_id)) == {"tx_vm_frames": 1}


def test_b_to_the_wire(multi):
    lk, nic, a, b, c = multi
    drain(a, b, c)
    lk.wire_frames(settle=0)
    frames = [lk.frame(PEER_MAC, n, src=B_MAC) for n in (64, 1514)]
    before = nic.verdict_counters()
    b.port[0].send(frames)
    assert lk.wire_frames(settle=0.5) == frames
    assert received(everything(lk, (a, b, c), 0, timeout=0), a) == []
    assert delta(before, nic.verdict_counters()) == {"tx_wire": 2}
    c_b = nic.vm_counters(b.vm.vm_id)
    assert c_b["tx_wire_frames"] >= 2


def test_b_broadcast_reaches_the_wire_and_the_other_vms(multi):
    lk, nic, a, b, c = multi
    drain(a, b, c)
    lk.wire_frames(settle=0)
    f = lk.frame(BCAST, 120, src=B_MAC)
    before = nic.verdict_counters()
    b.port[0].send([f])
    got = everything(lk, (a, b, c), 2)
    assert received(got, a) == [f] and received(got, c) == [f]
    assert received(got, b) == []                           # not back to the sender
    assert lk.wire_frames() == [f]
    assert delta(before, nic.verdict_counters()) == {"tx_group": 1, "port_rx": 2}


def test_spoofed_source_is_dropped_and_counted(multi):
    lk, nic, a, b, c = multi
    drain(a, b, c)
    lk.wire_frames(settle=0)
    frames = [lk.frame(PEER_MAC, 100, src=A_MAC),         # another VM's MAC
              lk.frame(C_MAC, 100, src="02:11:22:33:44:55"),
              lk.frame(BCAST, 100, src=C_MAC)]
    before = nic.verdict_counters()
    spoofed = nic.vm_counters(b.vm.vm_id)["spoofed"]
    b.port[0].send(frames)
    got = everything(lk, (a, b, c), 1, timeout=0.5)
    assert all(v == [] for v in got.values())
    assert lk.wire_frames() == []
    assert delta(before, nic.verdict_counters()) == {"spoofed": 3}
    assert nic.vm_counters(b.vm.vm_id)["spoofed"] == spoofed + 3


# ---------------------------------------------------------------- control

def _state(lk: Link, nic: NicSteering):
    return (nic.vms(), nic.local_macs(), ports_of(lk.nic_ifindex),
            sorted(os.listdir(pin_dir(lk.nic))), attached_prog_ids(lk.nic))


def test_refusals_leave_nothing_half_attached(multi):
    lk, nic, a, b, c = multi
    before = _state(lk, nic)
    with pytest.raises(BusyError, match="already attached"):
        nic.add_vm(B_MAC, 1518, (), 1)
    with pytest.raises(BusyError, match="queue 1 .* owned by VM"):
        nic.add_vm(D_MAC, 1518, (1,), 1)
    with pytest.raises(UsageError, match="queue 2 is out of range.* 2 channels"):
        nic.add_vm(D_MAC, 1518, (2,), 1)
    with pytest.raises(UsageError, match="malformed MAC"):
        nic.add_vm("52:54:00:0d:00", 1518, (), 1)
    with pytest.raises(UsageError, match="multicast"):
        nic.add_vm("33:33:00:00:00:01", 1518, (), 1)
    with pytest.raises(BusyError, match="taken"):
        nic.add_vm(D_MAC, 1518, (), 1, vm_id=b.vm.vm_id)
    assert _state(lk, nic) == before


def test_local_macs_lists_every_vm(multi):
    lk, nic, a, b, c = multi
    as_u64 = lambda m: int.from_bytes(bytes.fromhex(m.replace(":", "")) + b"\0\0",  # noqa: E731
                                      "little")
    assert nic.local_macs() == sorted(as_u64(m) for m in (A_MAC, B_MAC, C_MAC))
    assert a.vm.mac_u64 == as_u64(A_MAC)


def test_remove_one_vm_while_the_others_stay(multi):
    lk, nic, a, b, c = multi
    d = Vm(lk, nic, D_MAC)
    removed = False
    try:
        drain(a, b, c, d)
        host, _ = lk.exchange([lk.frame(D_MAC, 100)])
        assert host == [] and len(gather(lk, [d.port[0]], 1)[d.port[0]]) == 1
        before = _state(lk, nic)
        port = d.vm.port_ifname
        d.close()
        removed = True
        vms, macs, ports, pins, progs = _state(lk, nic)
        assert [v.mac for v in vms] == [A_MAC, B_MAC, C_MAC]
        assert vms == [v for v in before[0] if v.mac != D_MAC]       # entries intact
        assert not os.path.exists(f"/sys/class/net/{port}")
        assert ports == [h for h in before[2] if h != port[:-1] + "h"]
        assert (pins, progs) == before[3:]
        # D's frames go to the host now; the others still get theirs
        fd, fb = lk.frame(D_MAC, 100), lk.frame(B_MAC, 100)
        host, _ = lk.exchange([fd, fb], cpu=CPUS[0])
        assert host == [fd]
        assert gather(lk, [b.port[0]], 1)[b.port[0]] == [fb]
    finally:
        if not removed:
            d.close()


# ---------------------------------------------------------------- other processes

CHILD = r"""
import sys, time
sys.path.insert(0, {tests!r})
from test_xdp_steering import Xsk
from xdpnet.steering.nic import NicSteering
nic = NicSteering({ifname!r})
print("JOINED", nic.loaded, nic.prog_ids()["nic"], flush=True)
vm = nic.add_vm({mac!r}, 1518, (), 1)
x = Xsk(vm.port_ifname, 0)
vm.set_xsk("port", 0, x.fileno())
print("READY", vm.vm_id, vm.port_ifname, flush=True)
sys.stdin.readline()
n, deadline = 0, time.monotonic() + 3
while n < 2 and time.monotonic() < deadline:
    n += sum(1 for f in x.receive() if f[:6] == bytes.fromhex({mac!r}.replace(":", "")))
    time.sleep(0.01)
print("GOT", n, flush=True)
sys.stdin.readline()
vm.clear_xsk("port", 0)
x.close()
vm.remove()
nic.close()
print("DONE", flush=True)
"""


def _child(ifname: str, mac: str) -> subprocess.Popen:
    code = CHILD.format(tests=TESTS, ifname=ifname, mac=mac)
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _line(p: subprocess.Popen, word: str) -> list[str]:
    line = p.stdout.readline().split()
    assert line and line[0] == word, f"child said {line!r}; stderr: {p.stderr.read()[-2000:]}"
    return line[1:]


def test_second_process_joins_and_adds_a_vm(multi):
    lk, nic, a, b, c = multi
    ids = attached_prog_ids(lk.nic)
    p = _child(lk.nic, E_MAC)
    try:
        loaded, prog = _line(p, "JOINED")
        assert loaded == "False" and int(prog) == nic.prog_ids()["nic"]   # no second copy
        vm_id, port = _line(p, "READY")
        e = next(v for v in nic.vms() if v.mac == E_MAC)
        assert (e.vm_id, e.port_ifname, e.owner_pid, e.owner_alive) == \
            (int(vm_id), port, p.pid, True)
        lk.send([lk.frame(E_MAC, 100), lk.frame(E_MAC, 1400)])
        p.stdin.write("go\n")
        p.stdin.flush()
        assert _line(p, "GOT") == ["2"]
        p.stdin.write("bye\n")
        p.stdin.flush()
        _line(p, "DONE")
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    # the child's VM is gone, ours are all there, the programs unchanged
    assert [v.mac for v in nic.vms()] == [A_MAC, B_MAC, C_MAC]
    assert not os.path.exists(f"/sys/class/net/{port}")
    assert attached_prog_ids(lk.nic) == ids


def test_a_dead_process_vm_is_reaped(multi):
    lk, nic, a, b, c = multi
    p = _child(lk.nic, E_MAC)
    try:
        _line(p, "JOINED")
        vm_id, port = _line(p, "READY")
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    e = next(v for v in nic.vms() if v.mac == E_MAC)
    assert not e.owner_alive and os.path.exists(f"/sys/class/net/{port}")
    assert nic.reap() == [int(vm_id)]
    assert [v.mac for v in nic.vms()] == [A_MAC, B_MAC, C_MAC]
    assert not os.path.exists(f"/sys/class/net/{port}")
    host, _ = lk.exchange([lk.frame(E_MAC, 100)])
    assert len(host) == 1                                   # E's MAC: the host's again


def test_the_last_vm_out_in_another_process_removes_everything():
    lk = Link(queues=2)
    try:
        lk.create()
        nic = NicSteering(lk.nic, mode="native")
        mine = nic.add_vm(A_MAC, 1518, (0, 1), 2)
        p = _child(lk.nic, E_MAC)
        try:
            assert _line(p, "JOINED")[0] == "False"
            _line(p, "READY")
            mine.remove()
            nic.close()                     # the child's VM keeps the NIC loaded
            assert attached_prog_ids(lk.nic) and os.path.isdir(pin_dir(lk.nic))
            assert len(ports_of(lk.nic_ifindex)) == 1
            p.stdin.write("go\nbye\n")
            p.stdin.flush()
            _line(p, "GOT")
            _line(p, "DONE")
            assert p.wait(10) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert lk.clean()                   # no XDP, no TC, no pins, no ports
    finally:
        lk.destroy()



def test_attachments_share_a_nic_and_see_each_others_macs(tmp_path):
    """Two Attachments (backend + steering, no frontend) on one NIC: each
    backend is configured with its VM's port and MAC, each learns the
    other's MAC for its tx path choice, and closing both leaves nothing."""
    from xdpnet.attachment import Attachment
    lk = Link(queues=2)
    try:
        lk.create()
        a = Attachment(lk.nic, A_MAC, str(tmp_path / "a.sock"), queues=(0, 1),
                       xdp_mode="native", zerocopy=False)
        try:
            b = Attachment(lk.nic, B_MAC, str(tmp_path / "b.sock"), port_pairs=1)
            try:
                cfg = a.backend.config
                assert (cfg.port_ifname, cfg.vm_mac, cfg.pairs) == \
                    (a.vm.port_ifname, a.vm.mac_u64, 2)
                assert b.backend.config.queues == () and b.backend.config.pairs == 1
                assert not b.steering.loaded            # joined a's programs
                deadline = time.monotonic() + 2
                while (a.backend.local_macs, b.backend.local_macs) != \
                        ([b.vm.mac_u64], [a.vm.mac_u64]):
                    assert time.monotonic() < deadline, "local MAC tables never refreshed"
                    time.sleep(0.02)
            finally:
                b.close()
            deadline = time.monotonic() + 2
            while a.backend.local_macs:
                assert time.monotonic() < deadline, "B's MAC stayed in A's table"
                time.sleep(0.02)
        finally:
            a.close()
        assert lk.clean()
    finally:
        lk.destroy()


def test_state_of_a_deleted_nic_whose_vms_died_is_swept():
    """A VM process killed, then its NIC deleted: pins and port stay until
    sweep_gone_nics() (which leaves NICs with a live VM alone)."""
    from xdpnet.steering.nic import sweep_gone_nics
    lk = Link()
    try:
        lk.create()
        p = _child(lk.nic, E_MAC)
        try:
            _line(p, "JOINED")
            _, port = _line(p, "READY")
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        nic_name, nic_ifindex = lk.nic, lk.nic_ifindex
    finally:
        lk.destroy()                        # the NIC is gone
    assert os.path.isdir(pin_dir(nic_name)) and os.path.exists(f"/sys/class/net/{port}")
    assert sweep_gone_nics(only=[nic_name]) == [nic_name]
    assert not os.path.exists(pin_dir(nic_name))
    assert ports_of(nic_ifindex) == []

"""Many VMs on one NIC (issue 3), end to end.

A veth NIC with 2 queues; three VMs served by the real backend, each
driven by the project's virtio simulator:

    A  2 queue pairs on NIC queues 0 and 1 (direct) + its port
    B  1 queue pair, port only
    C  1 queue pair, port only

An AF_PACKET peer on the wire end in a namespace sends and receives test
frames; a second AF_PACKET socket on the NIC in the host namespace stands
for the host stack.  Every frame is verified byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass

import pytest

from rigs import Vm, attach_vm
from xdpnet.attachment import Attachment
from xdpnet.guest.simulator import VirtioNetSimulator
from xdpnet.net.netns import Testbed
from xdpnet.wire import WirePeer

MAC_A = "52:54:00:0a:00:01"
MAC_B = "52:54:00:0b:00:01"
MAC_C = "52:54:00:0c:00:01"
BCAST = "ff:ff:ff:ff:ff:ff"


@dataclass
class Host:
    bed: Testbed
    wire: WirePeer          # the far end of the NIC, in the namespace
    host: WirePeer          # an AF_PACKET socket on the NIC: the host stack's view
    vms: dict[str, Vm]


@contextlib.contextmanager
def three_vms():
    with contextlib.ExitStack() as stack:
        bed = stack.enter_context(Testbed(queues=2, prefix="xv"))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        vms = {name: attach_vm(stack, bed, tmp, name, mac, queues, port_pairs)
               for name, mac, queues, port_pairs in (("A", MAC_A, (0, 1), 0),
                                                     ("B", MAC_B, (), 1), ("C", MAC_C, (), 1))}
        wire = stack.enter_context(WirePeer(bed, peer_mac=MAC_A))
        host = stack.enter_context(WirePeer(None, ifname=bed.nic))
        yield Host(bed, wire, host, vms)


def test_each_vm_receives_exactly_its_own_unicast():
    with three_vms() as h:
        for i, vm in enumerate(h.vms.values()):
            h.wire.send(200, 300, flow=i, seq0=0, dst=vm.mac)
            assert vm.take(200) == 200, vm.name
        for vm in h.vms.values():
            st = vm.sim.stats(pair=None)
            assert st.rx_verified == 200 and st.rx_foreign == 0 and st.rx_bad == 0, vm.name
            assert vm.sim.check_guards() == 0
        # A is served on both NIC queues directly, with no userspace copy.
        a = h.vms["A"].counters()
        assert a["rx_copied_bytes"] == 0
        assert a["rx_frames"] - a["rx_port_frames"] > 0


def test_broadcast_reaches_every_vm_and_the_host():
    with three_vms() as h:
        got = []
        t = threading.Thread(target=lambda: got.append(h.host.recv(max_frames=100, timeout=3)))
        t.start()
        h.wire.send(100, 200, flow=9, dst=BCAST)
        for vm in h.vms.values():
            assert vm.take(100) == 100, vm.name
        t.join()
        assert got[0].verified == 100


def test_vm_to_vm_both_ways_without_touching_the_wire():
    with three_vms() as h:
        a, b, c = h.vms["A"], h.vms["B"], h.vms["C"]
        seen = []
        t = threading.Thread(target=lambda: seen.append(h.wire.recv(timeout=2)))
        t.start()
        for src, dst in ((a, b), (b, a), (b, c), (c, a)):
            src.sim.send(100, length=400, dst=dst.mac)
            assert dst.take(100) == 100, f"{src.name} -> {dst.name}"
        t.join()
        assert seen[0].verified == 0, "interguest frames leaked onto the wire"
        for vm in (a, b, c):
            assert vm.sim.stats(pair=None).rx_foreign == 0
            assert vm.counters()["tx_copied_bytes"] == 0


def test_spoofed_source_mac_is_dropped_and_counted():
    with contextlib.ExitStack() as stack:
        bed = stack.enter_context(Testbed(queues=2, prefix="xv"))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        att = stack.enter_context(Attachment(bed.nic, MAC_B, os.path.join(tmp, "b.sock"),
                                             queues=(0,), xdp_mode="native", zerocopy=False))
        att.start()
        # The guest claims another MAC than the one it was attached with.
        sim = stack.enter_context(VirtioNetSimulator(att.socket_path, mac=MAC_C))
        sim.connect()
        sim.start()
        wire = stack.enter_context(WirePeer(bed, peer_mac=MAC_B))
        seen = []
        t = threading.Thread(target=lambda: seen.append(wire.recv(timeout=2)))
        t.start()
        r = sim.run(duration=3.0, tx_count=100, tx_length=200, dst=wire.mac)
        t.join()
        assert r.stats.tx_completed == 100          # descriptors came back ...
        assert seen[0].verified == 0                # ... the frames never left
        assert att.counters()["tx_spoofed"] == 100
        assert att.counters()["tx_frames"] == 0


def test_detaching_one_vm_loses_none_of_the_others_frames():
    with three_vms() as h:
        a, b, c = h.vms["A"], h.vms["B"], h.vms["C"]
        stop = threading.Event()
        results: dict[str, list[int]] = {"A": [], "C": []}

        def stream() -> None:
            seq = 0
            while not stop.is_set():
                for vm, flow in ((a, 1), (c, 3)):
                    h.wire.send(50, 200, flow=flow, seq0=seq, dst=vm.mac)
                    results[vm.name].append(vm.take(50))
                seq += 50
        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.5)
        b.sim.close()
        b.att.close()
        time.sleep(0.5)
        stop.set()
        t.join()
        for name in ("A", "C"):
            assert results[name] and all(n == 50 for n in results[name]), (name, results[name])
        # B's MAC is no longer steered anywhere: it goes to the host.
        got = []
        th = threading.Thread(target=lambda: got.append(h.host.recv(max_frames=20, timeout=2)))
        th.start()
        h.wire.send(20, 200, flow=5, dst=MAC_B)
        th.join()
        assert got[0].verified == 20


def test_last_vm_leaving_removes_programs_and_pins():
    with three_vms() as h:
        nic = h.bed.nic
        assert os.path.isdir(f"/sys/fs/bpf/xdpnet/{nic}")
        assert os.path.exists(f"/run/xdpnet/{nic}.lock")
    assert not os.path.exists(f"/sys/fs/bpf/xdpnet/{nic}")
    assert not os.path.exists(f"/run/xdpnet/{nic}.lock")
    # The pin root goes with the last NIC's directory.
    assert not os.path.isdir("/sys/fs/bpf/xdpnet") or os.listdir("/sys/fs/bpf/xdpnet")


@pytest.mark.parametrize("kwargs,exc", [
    (dict(mac=MAC_A, queues=(1,)), "already attached"),       # MAC taken
    (dict(mac="52:54:00:0d:00:01", queues=(0,)), "queue 0"),   # queue owned by A
    (dict(mac="52:54:00:0d:00:01", queues=(5,)), "queue 5"),   # beyond the NIC's channels
])
def test_bad_attach_leaves_nothing_half_attached(kwargs, exc):
    with contextlib.ExitStack() as stack:
        bed = stack.enter_context(Testbed(queues=2, prefix="xv"))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        stack.enter_context(Attachment(bed.nic, MAC_A, os.path.join(tmp, "a.sock"),
                                       queues=(0,), xdp_mode="native", zerocopy=False))
        def ports() -> set[str]:            # xdpnet's per-VM port veths
            return {n for n in os.listdir("/sys/class/net") if n.startswith("xn")}
        links_before = ports()
        with pytest.raises(Exception) as e:
            Attachment(bed.nic, kwargs["mac"], os.path.join(tmp, "d.sock"),
                       queues=kwargs["queues"], xdp_mode="native", zerocopy=False)
        assert exc in str(e.value)
        assert ports() == links_before                          # no port left
        assert not os.path.exists(os.path.join(tmp, "d.sock"))

"""A queue pair with two sockets: the direct one on a NIC queue and the
port one on the VM's port device (docs/steering.md), over one UMEM.

Real veth pairs in namespaces, real AF_XDP sockets, real frames.  Two test
beds play the NIC (its wire end is the network) and the VM's port (its
wire end stands for the host end ``xn…h``).  A tiny XDP program attached
to both root-namespace ends redirects every frame into an XSKMAP by rx
queue: a stand-in for the steering programs, implementing the backend's
``XskSteering`` protocol.  The guest is the project's driver simulator
over a real vhost-user connection.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
import tempfile
import threading
from dataclasses import dataclass

import pytest

from rigs import wait_for
from xdpnet.backend import BackendConfig, NetBackend
from xdpnet.net.mac import mac_to_u64, parse_mac
from xdpnet.datapath.xsk import SharedUmemError, XskSocket
from xdpnet.guest.simulator import VirtioNetSimulator
from xdpnet.net.netns import Testbed, cleanup_stale
from xdpnet.steering.kheaders import find_kernel_headers, import_bcc
from xdpnet.vhost.server import VhostUserServer
from xdpnet.wire import WirePeer

PREFIX = "xc"
VM_MAC = "52:54:00:aa:bb:01"
OTHER_VM = "52:54:00:aa:bb:02"         # another VM on the NIC: reached through the port
BROADCAST = "ff:ff:ff:ff:ff:ff"

STUB = r"""
BPF_XSKMAP(nic_xsks, 64);
BPF_XSKMAP(port_xsks, 64);

int xc_nic(struct xdp_md *ctx)
{
	return nic_xsks.redirect_map(ctx->rx_queue_index, XDP_PASS);
}

int xc_port(struct xdp_md *ctx)
{
	return port_xsks.redirect_map(ctx->rx_queue_index, XDP_PASS);
}
"""
XDP_FLAGS_DRV_MODE = 1 << 2


class StubSteering:
    """XskSteering for the tests: every frame on a device goes to the
    socket of its rx queue (``kind`` picks the device's XSKMAP)."""

    def __init__(self, bpf, nic: str, port: str):
        self.bpf = bpf
        self.devs = {"nic": nic, "port": port}
        self.calls: list[tuple] = []
        for kind, dev in self.devs.items():
            fn = bpf.load_func(f"xc_{kind}".encode(), bpf.XDP)
            bpf.attach_xdp(dev.encode(), fn, XDP_FLAGS_DRV_MODE)

    def _map(self, kind: str):
        return self.bpf[f"{kind}_xsks".encode()]

    def set_xsk(self, kind: str, queue: int, fd: int) -> None:
        self.calls.append(("set", kind, queue))
        self._map(kind)[ct.c_int(queue)] = ct.c_int(fd)

    def clear_xsk(self, kind: str, queue: int) -> None:
        from bcc.libbcc import lib
        self.calls.append(("clear", kind, queue))
        m = self._map(kind)
        lib.bpf_delete_elem(m.map_fd, ct.byref(ct.c_int(queue)))

    def close(self) -> None:
        for dev in self.devs.values():
            with contextlib.suppress(Exception):
                self.bpf.remove_xdp(dev.encode(), XDP_FLAGS_DRV_MODE)


@pytest.fixture(scope="module")
def stub_bpf():
    cleanup_stale(PREFIX)
    bcc = import_bcc()
    headers = find_kernel_headers()
    saved = os.environ.get("BCC_KERNEL_SOURCE")
    if headers.source:
        os.environ["BCC_KERNEL_SOURCE"] = headers.source
    try:
        bpf = bcc.BPF(text=STUB.encode(), cflags=list(headers.cflags))
    finally:
        if headers.source:
            if saved is None:
                os.environ.pop("BCC_KERNEL_SOURCE", None)
            else:
                os.environ["BCC_KERNEL_SOURCE"] = saved
    yield bpf
    bpf.cleanup()


@dataclass
class Rig:
    nic: Testbed
    port: Testbed
    backend: NetBackend
    steering: StubSteering
    vm: VirtioNetSimulator
    nic_wire: WirePeer          # the network behind the NIC
    port_wire: WirePeer         # stands for the port's host end

    def counters(self, pair: int = 0) -> dict[str, int]:
        return self.backend.counters[pair].snapshot()


@contextlib.contextmanager
def rig(stub_bpf, *, queues=(0,), port_pairs: int = 1, vm_mac: str = VM_MAC,
        guest_mac: str = VM_MAC, port_fill_target: int = 0, **sim_options):
    """A VM served on a NIC queue and its port; everything removed afterwards."""
    with contextlib.ExitStack() as stack:
        nic = stack.enter_context(Testbed(queues=1, prefix=PREFIX))
        port = stack.enter_context(Testbed(queues=max(1, port_pairs), prefix=PREFIX))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        steering = StubSteering(stub_bpf, nic.nic, port.nic)
        stack.callback(steering.close)
        cfg = BackendConfig(nic.nic, tuple(queues), port_ifname=port.nic, port_pairs=port_pairs,
                            vm_mac=mac_to_u64(parse_mac(vm_mac)),
                            port_fill_target=port_fill_target)
        backend = NetBackend(cfg, steering)
        stack.callback(backend.close)
        server = VhostUserServer(os.path.join(tmp, "vm.sock"), backend)
        stack.callback(server.close)
        stop = threading.Event()
        t = threading.Thread(target=server.serve_forever, args=(stop,), daemon=True)
        t.start()
        stack.callback(t.join, 10)
        stack.callback(stop.set)
        vm = stack.enter_context(VirtioNetSimulator(server.path, mac=guest_mac,
                                                    queue_pairs=cfg.pairs, **sim_options))
        vm.connect()
        vm.start()
        nic_wire = stack.enter_context(WirePeer(nic, peer_mac=VM_MAC))
        port_wire = stack.enter_context(WirePeer(port, peer_mac=VM_MAC))
        yield Rig(nic, port, backend, steering, vm, nic_wire, port_wire)


def deliver(r: Rig, peer: WirePeer, n: int, size: int = 64, flow: int = 0, chunk: int = 30) -> None:
    """Send ``n`` frames from ``peer`` in chunks the guest takes one at a
    time (a port fill ring holds only its target of buffers): after each,
    the guest's reposted buffers are back on the fill rings."""
    for seq in range(0, n, chunk):
        k = min(chunk, n - seq)
        # Every buffer on a fill ring first: right after start the datapath
        # thread may not have posted them yet (frames would meet an empty
        # fill ring and be dropped by the kernel).
        assert wait_for(lambda: r.counters()["fill_ring_used"] == r.vm.config.queue_size)
        peer.send(k, size, flow=flow, seq0=seq)
        assert r.vm.run(duration=2.0, tx_count=0, rx_count=k).stats.rx_verified == k
    assert wait_for(lambda: r.counters()["fill_ring_used"] == r.vm.config.queue_size)


def receive(peer: WirePeer, box: list, timeout: float = 1.5) -> threading.Thread:
    """Receive verified test frames on ``peer`` in the background into ``box``."""
    t = threading.Thread(target=lambda: box.append(peer.recv(timeout=timeout)))
    t.start()
    return t


def test_port_shares_the_pairs_umem(stub_bpf):
    """The port socket is bound with XDP_SHARED_UMEM on the direct
    socket's UMEM (own fill and completion rings): one registration."""
    with rig(stub_bpf) as r:
        pr = r.backend._pairs[0]
        assert pr.xsk is not None and pr.port is not None
        assert pr.port.shared and pr.port.umem is pr.umem and pr.port_umem is None
        assert pr.port.fd != pr.xsk.fd
        assert sorted(r.steering.calls) == [("set", "nic", 0), ("set", "port", 0)]
        # Guest buffers are split: the port ring holds its target, the direct one the rest.
        assert wait_for(lambda: r.counters()["fill_ring_used"] == 256)
        assert r.counters()["port_fill_ring_used"] == 256 // 4


def test_port_falls_back_to_a_umem_of_its_own(stub_bpf, monkeypatch):
    """If the kernel refuses to share the UMEM (a zero-copy NIC with a
    copy-only port), the port socket gets a second registration and the
    pair works the same."""
    def refuse(umem, ifname, queue, **kw):
        raise SharedUmemError(f"cannot share the UMEM with {ifname} queue {queue}: refused")
    monkeypatch.setattr(XskSocket, "bind_shared", staticmethod(refuse))
    with rig(stub_bpf) as r:
        pr = r.backend._pairs[0]
        assert pr.port_umem is not None and pr.port.umem is pr.port_umem
        assert not pr.port.shared
        deliver(r, r.port_wire, 50, 1000, flow=1, chunk=50)
        deliver(r, r.nic_wire, 50, 1000, flow=2, chunk=50)
        c = r.counters()
        assert c["rx_port_frames"] == 50 and c["rx_zero_copy_frames"] == 100
        rx_base, _ = r.vm.stop()
        assert r.vm.ring_info(ring="rx").used_idx == rx_base
        assert r.backend.running_pairs() == []


def test_frames_on_the_port_land_in_guest_buffers_with_no_copy(stub_bpf):
    with rig(stub_bpf) as r:
        mem = r.backend.memory
        posted = {mem.gpa_to_off(segs[0][0], 1) for segs in r.vm.rx_buffers()}
        for size in (60, 1514):
            # Alternate devices: both rx rings are polled, both fill rings
            # refilled.  Bursts stay under the port's fill target (64).
            deliver(r, r.port_wire, 100, size, flow=size, chunk=50)
            trace = r.backend.pair(0).rx_trace()
            assert len(trace) == 64
            for data, buf in trace:
                assert data == buf + 12 and buf in posted
            deliver(r, r.nic_wire, 30, size, flow=size + 1)
        st = r.vm.stats()
        assert st.rx_verified == 260 and st.rx_bad == 0
        c = r.counters()
        assert c["rx_port_frames"] == 200
        assert c["rx_frames"] == 260 and c["rx_zero_copy_frames"] == 260
        assert c["rx_copied_frames"] == 0 and c["rx_misplaced"] == 0
        for gpa, used_len in r.vm.rx_trace():
            assert mem.gpa_to_off(gpa, 1) in posted and used_len >= 12 + 60
        assert r.vm.check_guards() == 0


@pytest.mark.parametrize("hdr_separate", [False, True], ids=["hdr-joined", "hdr-separate"])
def test_tx_to_local_macs_and_broadcast_leaves_on_the_port(stub_bpf, hdr_separate):
    with rig(stub_bpf, tx_hdr_separate=hdr_separate, indirect=hdr_separate) as r:
        r.backend.set_local_macs([mac_to_u64(parse_mac(OTHER_VM))])
        at_nic, at_port = [], []
        threads = [receive(r.nic_wire, at_nic), receive(r.port_wire, at_port)]
        for dst, n, flow in ((OTHER_VM, 100, 1), (BROADCAST, 50, 2), (r.nic.wire_mac, 80, 3)):
            res = r.vm.run(duration=3.0, tx_count=n, tx_length=700, dst=dst, flow=flow)
            assert res.stats.tx_completed == n
        for t in threads:
            t.join()
        assert at_port[0].verified == 150 and at_port[0].bad == 0
        assert at_nic[0].verified == 80 and at_nic[0].bad == 0
        c = r.counters()
        assert c["tx_frames"] == 230 and c["tx_port_frames"] == 150
        assert c["tx_zero_copy_frames"] == 230 and c["tx_spoofed"] == 0

        # The table changes while the pair runs: that MAC is no longer local.
        r.backend.set_local_macs([])
        at_nic, at_port = [], []
        threads = [receive(r.nic_wire, at_nic), receive(r.port_wire, at_port)]
        r.vm.run(duration=3.0, tx_count=40, tx_length=100, dst=OTHER_VM, flow=4)
        for t in threads:
            t.join()
        assert at_nic[0].verified == 40 and at_port[0].verified == 0
        assert r.counters()["tx_port_frames"] == 150


def test_spoofed_source_mac_is_dropped_counted_and_returned(stub_bpf):
    """The guest sends from a MAC that is not the VM's: nothing leaves on
    either device, every descriptor comes back, the queue keeps going."""
    with rig(stub_bpf, guest_mac="52:54:00:66:66:66") as r:
        at_nic, at_port = [], []
        threads = [receive(r.nic_wire, at_nic), receive(r.port_wire, at_port)]
        for dst in (r.nic.wire_mac, BROADCAST):
            res = r.vm.run(duration=3.0, tx_count=300, tx_length=200, dst=dst)
            assert res.stats.tx_completed == 300       # more than the ring: it never stalls
        for t in threads:
            t.join()
        assert at_nic[0].verified == 0 and at_port[0].verified == 0
        c = r.counters()
        assert c["tx_spoofed"] == 600
        assert c["tx_frames"] == 0 and c["tx_port_frames"] == 0
        assert r.vm.stats().tx_bad_used == 0


def test_port_only_pairs(stub_bpf):
    """A VM attached without NIC queues: its only socket is on the port,
    unicast tx leaves there too."""
    with rig(stub_bpf, queues=(), port_pairs=1) as r:
        pr = r.backend._pairs[0]
        assert pr.xsk is None and pr.port is not None and not pr.port.shared
        assert r.steering.calls == [("set", "port", 0)]
        # With no direct socket the port takes every buffer.
        assert wait_for(lambda: r.counters()["port_fill_ring_used"] == 256)
        assert r.counters()["fill_ring_used"] == 256
        r.port_wire.send(120, 1000, flow=1)
        r.vm.run(duration=2.0, tx_count=0, rx_count=120)
        assert r.vm.stats().rx_verified == 120
        got = []
        t = receive(r.port_wire, got)
        r.vm.run(duration=3.0, tx_count=100, tx_length=300, dst=r.port.wire_mac, flow=2)
        t.join()
        assert got[0].verified == 100
        c = r.counters()
        assert c["rx_port_frames"] == 120 and c["rx_zero_copy_frames"] == 120
        assert c["tx_port_frames"] == 100 and c["tx_zero_copy_frames"] == 100


@pytest.mark.parametrize("traffic", ["none", "nic", "port", "both"])
def test_stop_with_buffers_in_both_fill_rings_loses_and_duplicates_nothing(stub_bpf, traffic):
    """GET_VRING_BASE while both fill rings hold guest buffers: every rx
    buffer the backend took comes back exactly once, either used (length
    0) or by rewinding last_avail_idx -- as far back as all the newest are
    held; the port ring's older buffers come back used."""
    with rig(stub_bpf, port_fill_target=32) as r:
        sent = 0
        if traffic in ("nic", "both"):
            deliver(r, r.nic_wire, 150, flow=1)
            sent += 150
        if traffic in ("port", "both"):
            deliver(r, r.port_wire, 90, flow=2)
            sent += 90
        # Every guest buffer is posted: the port ring at its target, the direct one the rest.
        assert wait_for(lambda: r.counters()["fill_ring_used"] == 256)
        assert r.counters()["port_fill_ring_used"] == 32
        info = r.vm.ring_info(ring="rx")
        rx_base, _ = r.vm.stop()
        c = r.counters()
        assert c["rx_frames"] == sent and c["tx_lost_at_stop"] == 0
        held = info.avail_idx - sent            # taken by the backend, not yet filled
        assert c["rx_rewound"] + c["rx_returned_empty"] == held
        # Used entries published = every buffer not rewound; none twice.
        assert r.vm.ring_info(ring="rx").used_idx == rx_base
        assert rx_base == info.avail_idx - c["rx_rewound"]
        r.vm.poll(timeout=0.2)                  # reap the length-0 entries
        st = r.vm.stats()
        assert st.rx_bad == 0 and st.rx_short == c["rx_returned_empty"]
        assert st.rx_verified == sent
        if traffic == "none":
            assert c["rx_rewound"] == held == 256        # nothing used: all rewound
        if traffic == "nic":
            # The port ring still holds the 32 oldest buffers (returned
            # used), the direct ring the newest (rewound).
            assert c["rx_returned_empty"] == 32 and c["rx_rewound"] == 224
        if traffic == "port":
            # Port refills took the newest buffers: those are rewound, the
            # direct ring's older ones returned.
            assert c["rx_rewound"] == 32 and c["rx_returned_empty"] == 224
        assert r.backend.running_pairs() == []

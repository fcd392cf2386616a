"""The tap baseline (xdpnet/tap_backend.py, c/tap.c) end to end, real kernel path.

A veth test bed whose NIC end is joined to a tap device by a Linux bridge
in the root namespace; the tap is served by TapBackend behind a real
vhost-user server, the project's driver simulator is the guest, and an
AF_PACKET peer sends and receives on the wire end inside the namespace::

    WirePeer (netns) <-veth-> NIC end --[bridge]-- tap <-readv/writev-> TapBackend <-> guest

Every frame is checked byte for byte at the far end.  The tap, the bridge
and the test bed are removed afterwards, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute
from rigs import wait_for

from xdpnet.guest.simulator import VirtioNetSimulator
from xdpnet.net.netns import Testbed, netns_exists
from xdpnet.tap_backend import Bridge, TapBackend, TapDevice
from xdpnet.vhost.server import VhostUserServer
from xdpnet.wire import WirePeer

PREFIX = "xt"
VM_MAC = "52:54:00:aa:bb:07"
SIZES = (60, 64, 128, 511, 1000, 1514)
PER_SIZE = 50


@dataclass
class TapRig:
    bed: Testbed
    tap: TapDevice
    bridge: Bridge
    backend: TapBackend
    vm: VirtioNetSimulator
    wire: WirePeer

    def counters(self) -> dict[str, int]:
        return self.backend.counters[0].snapshot()

    def names(self) -> list[str]:
        return [self.bed.nic, self.tap.ifname, self.bridge.ifname]


def _links_present(names: list[str]) -> list[str]:
    with IPRoute() as ipr:
        return [n for n in names if ipr.link_lookup(ifname=n)]


@contextlib.contextmanager
def tap_rig(**sim_options) -> Iterator[TapRig]:
    """The whole rig, the guest connected and started and its queue pair running."""
    with contextlib.ExitStack() as stack:
        bed = stack.enter_context(Testbed(queues=1, prefix=PREFIX))
        base = bed.nic[:-1]                     # "xt<8 hex>": unique per test bed
        tap = stack.enter_context(TapDevice(f"{base}t"))
        bridge = stack.enter_context(Bridge(f"{base}b", [bed.nic, tap.ifname]))
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="xdpnet-tap-"))
        backend = TapBackend(tap)
        stack.callback(backend.close)
        server = VhostUserServer(os.path.join(tmp, "vm.sock"), backend)
        stack.callback(server.close)
        stop = threading.Event()
        serving = threading.Thread(target=server.serve_forever, args=(stop,), daemon=True)
        serving.start()
        stack.callback(serving.join, 10)
        stack.callback(stop.set)
        vm = stack.enter_context(VirtioNetSimulator(server.path, mac=VM_MAC, **sim_options))
        vm.connect()
        vm.start()
        assert wait_for(lambda: backend.pair(0) is not None and backend.pair(0).native_id)
        wire = stack.enter_context(WirePeer(bed, peer_mac=VM_MAC))
        yield TapRig(bed, tap, bridge, backend, vm, wire)


@contextlib.contextmanager
def checked_rig(**sim_options) -> Iterator[TapRig]:
    """tap_rig(), then check that its links and namespace are gone."""
    names: list[str] = []
    netns = None
    try:
        with tap_rig(**sim_options) as r:
            names, netns = r.names(), r.bed.netns
            yield r
    finally:
        if names:
            assert _links_present(names) == [], "links left behind"
            assert not netns_exists(netns), "namespace left behind"


def test_wire_to_guest_frames_arrive_verified():
    with checked_rig() as r:
        sent = nbytes = 0
        for size in SIZES:
            r.wire.send(PER_SIZE, size, flow=5, seq0=sent)
            sent += PER_SIZE
            nbytes += PER_SIZE * size
            r.vm.run(duration=3.0, tx_count=0, rx_count=PER_SIZE)
        st = r.vm.stats()
        assert st.rx_verified == sent and st.rx_bad == 0
        c = r.counters()
        assert c["rx_frames"] == sent and c["rx_bytes"] == nbytes
        # read() is a kernel copy into the guest buffer: all of it counted as copied.
        assert c["rx_copied_frames"] == sent and c["rx_copied_bytes"] == nbytes
        assert c["rx_zero_copy_frames"] == 0
        assert c["drop_too_large"] == 0 and r.backend.broken() == []
        assert r.vm.check_guards() == 0
        assert r.backend.pair(0).native_id
        # GET_VRING_BASE: nothing is held in flight, so the rx ring's index is
        # exactly the number of buffers used.
        rx_base, tx_base = r.vm.stop()
        assert rx_base == sent and tx_base == 0


def test_guest_to_wire_frames_arrive_verified():
    with checked_rig() as r:
        got = []
        rx = threading.Thread(target=lambda: got.append(r.wire.recv(max_frames=400, timeout=3)))
        rx.start()
        nbytes = 0
        for i, size in enumerate((64, 1500)):
            res = r.vm.run(duration=3.0, tx_count=200, tx_length=size, dst=r.wire.mac, flow=i)
            assert res.stats.tx_completed == 200
            nbytes += 200 * size
        rx.join()
        assert got[0].verified == 400 and got[0].bad == 0
        c = r.counters()
        assert c["tx_frames"] == 400 and c["tx_bytes"] == nbytes
        assert c["tx_copied_frames"] == 400 and c["tx_zero_copy_frames"] == 0
        assert c["tx_syscalls"] == 400          # one write() per frame
        assert c["drop_tx_error"] == 0 and r.backend.broken() == []


def test_frames_wait_in_the_tap_while_the_guest_has_no_buffer():
    """With every rx buffer used and not yet reaped, the tap is not read:
    frames wait in its queue and arrive once the guest posts buffers."""
    with checked_rig(queue_size=64) as r:
        r.wire.send(64, 100, flow=1)            # fills all 64 rx buffers
        assert wait_for(lambda: r.counters()["rx_frames"] == 64)
        r.wire.send(40, 100, flow=1, seq0=64)   # no buffer: wait in the tap's queue
        assert not wait_for(lambda: r.counters()["rx_frames"] > 64, timeout=0.3)
        r.vm.run(duration=3.0, tx_count=0, rx_count=104)
        st = r.vm.stats()
        assert st.rx_verified == 104 and st.rx_bad == 0
        assert r.counters()["rx_frames"] == 104


def test_request_response_through_the_guest():
    with checked_rig() as r:
        refl = threading.Thread(target=r.vm.run, kwargs={"duration": 3.0, "tx_count": 0,
                                                          "reflect": True, "rx_count": 200})
        refl.start()
        total = 0
        for i, size in enumerate((64, 1514)):
            r.wire.send(100, size, flow=3, seq0=i * 100)
            back = r.wire.recv(max_frames=100, timeout=2)
            assert back.verified == 100 and back.bad == 0
            total += back.verified
        refl.join()
        assert total == 200


def test_frames_longer_than_the_guest_buffer_are_dropped_counted_and_never_overrun():
    """512-byte rx buffers (500 bytes of frame after the header): a
    1000-byte frame is read, found too long and dropped; the buffer is used
    for the next frame, and no byte lands outside it (guard bytes intact)."""
    with checked_rig(rx_buf_size=512) as r:
        r.wire.send(20, 1000, flow=1)
        r.wire.send(20, 400, flow=2)
        r.vm.run(duration=3.0, tx_count=0, rx_count=20)
        st = r.vm.stats()
        assert st.rx_verified == 20 and st.rx_bad == 0
        c = r.counters()
        assert c["drop_too_large"] == 20 and c["rx_frames"] == 20
        assert r.vm.check_guards() == 0

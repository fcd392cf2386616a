"""The zero-copy core, end to end over real veth devices in a namespace.

backend (vhost-user server + AF_XDP over guest memory + XDP program) on
the NIC end of a veth pair, the project's driver simulator as the guest,
an AF_PACKET peer on the wire end inside a namespace.  Every frame is
checked byte for byte at the far end; placement is checked by address.
"""

from __future__ import annotations

import functools
import threading
import time

from rigs import Attached, wait_filled
from rigs import attached as _attached
from xdpnet.vhost.protocol import VirtioFeature, bit

VM_MAC = "52:54:00:aa:bb:01"
SIZES = (60, 64, 128, 511, 1000, 1514)

# A VM on a fresh veth NIC; everything removed afterwards.
attached = functools.partial(_attached, VM_MAC, prefix="xp")


def send_to_vm(a: Attached, sizes=SIZES, per_size: int = 50) -> int:
    """Wire → VM: send frames of each size, let the VM take them; returns sent."""
    wait_filled(a.att)
    seq = 0
    for size in sizes:
        a.wire.send(per_size, size, flow=7, seq0=seq)
        seq += per_size
        a.vm.run(duration=2.0, tx_count=0, rx_count=per_size)
    return seq


def test_rx_frames_land_at_the_posted_buffer_plus_12_with_no_copy():
    with attached() as a:
        sent = send_to_vm(a)
        st = a.vm.stats()
        assert st.rx_verified == sent and st.rx_bad == 0
        c = a.counters()
        assert c["rx_frames"] == sent
        assert c["rx_zero_copy_frames"] == sent
        assert c["rx_copied_bytes"] == 0 and c["rx_copied_frames"] == 0
        # Placement, by address: each rx descriptor's data address is the
        # posted guest buffer + 12, and that buffer is one the guest posted.
        mem = a.backend.memory
        posted = {mem.gpa_to_off(segs[0][0], 1) for segs in a.vm.rx_buffers()}
        trace = a.backend.pair(0).rx_trace()
        assert len(trace) == 64
        for data, buf in trace:
            assert data == buf + 12
            assert buf in posted
        # ... and the guest saw each frame at the buffer it got back.
        for gpa, used_len in a.vm.rx_trace():
            assert mem.gpa_to_off(gpa, 1) in posted and used_len >= 12 + 60
        assert a.vm.check_guards() == 0


def test_tx_leaves_from_guest_memory_with_no_copy():
    with attached() as a:
        got = []
        rx = threading.Thread(target=lambda: got.append(a.wire.recv(max_frames=400, timeout=3)))
        rx.start()
        for i, size in enumerate((64, 1500)):
            r = a.vm.run(duration=3.0, tx_count=200, tx_length=size, dst=a.wire.mac, flow=i)
            assert r.stats.tx_completed == 200
        rx.join()
        assert got[0].verified == 400 and got[0].bad == 0
        c = a.counters()
        assert c["tx_frames"] == 400
        assert c["tx_zero_copy_frames"] == 400
        assert c["tx_copied_bytes"] == 0


def test_tx_header_in_its_own_descriptor_is_still_zero_copy():
    with attached(tx_hdr_separate=True, indirect=True) as a:
        got = []
        rx = threading.Thread(target=lambda: got.append(a.wire.recv(max_frames=100, timeout=3)))
        rx.start()
        a.vm.run(duration=3.0, tx_count=100, tx_length=700, dst=a.wire.mac)
        rx.join()
        assert got[0].verified == 100
        c = a.counters()
        assert c["tx_zero_copy_frames"] == 100 and c["tx_copied_bytes"] == 0


def test_request_response_through_the_guest():
    with attached() as a:
        refl = threading.Thread(target=a.vm.run, kwargs=dict(duration=3.0, tx_count=0,
                                                              reflect=True, rx_count=300))
        refl.start()
        total = 0
        for i, size in enumerate((64, 700, 1514)):
            a.wire.send(100, size, flow=3, seq0=i * 100)
            back = a.wire.recv(max_frames=100, timeout=2)
            assert back.verified == 100 and back.bad == 0
            total += back.verified
        refl.join()
        assert total == 300


def test_frames_over_the_cap_are_dropped_counted_and_never_written():
    """The UMEM headroom is the kernel-enforced cap: frames over max_frame
    are dropped by the kernel (counted), guard bytes stay intact."""
    with attached(max_frame=500, steer_max_frame=1518) as a:
        a.wire.send(100, 1400, flow=1)
        a.wire.send(20, 400, flow=2)
        a.vm.run(duration=3.0, tx_count=0, rx_count=20)
        st = a.vm.stats()
        assert st.rx_verified == 20
        from xdpnet.stats import drops
        # The idle datapath copies the kernel's counters at least every 250 ms.
        deadline = time.monotonic() + 3
        while drops(a.counters())["too_large"] < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert drops(a.counters())["too_large"] == 100
        assert a.vm.check_guards() == 0


def test_xdp_length_check_drops_before_the_socket():
    with attached(max_frame=1518, steer_max_frame=500) as a:
        a.wire.send(50, 1000, flow=1)
        a.vm.run(duration=0.5, tx_count=0)
        assert a.vm.stats().rx_frames == 0
        assert a.steering.verdict_counters()["too_large"] == 50
        assert a.vm.check_guards() == 0


def test_small_buffers_go_through_the_bounce_area_and_oversized_frames_are_dropped():
    """512-byte guest buffers cannot take a full frame: never posted to the
    fill ring; frames are copied (counted) and, without MRG_RXBUF, frames
    larger than a buffer are dropped and counted -- guards intact."""
    no_mrg = (bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.RING_EVENT_IDX)
              | bit(VirtioFeature.PROTOCOL_FEATURES))
    with attached(rx_buf_size=512, features=no_mrg) as a:
        a.wire.send(40, 400, flow=1)
        a.vm.run(duration=2.0, tx_count=0, rx_count=40)
        a.wire.send(40, 1400, flow=2)
        a.vm.run(duration=0.5, tx_count=0)
        st = a.vm.stats()
        assert st.rx_verified == 40 and st.rx_bad == 0
        c = a.counters()
        assert c["rx_copied_frames"] == 40 and c["rx_copied_bytes"] == 40 * 400
        assert c["rx_zero_copy_frames"] == 0
        assert c["drop_too_large"] == 40
        assert a.vm.check_guards() == 0


def test_small_buffers_with_mergeable_rx_spread_a_frame_over_several():
    with attached(rx_buf_size=512) as a:
        a.wire.send(30, 1400, flow=1)
        a.vm.run(duration=2.0, tx_count=0, rx_count=30)
        st = a.vm.stats()
        assert st.rx_verified == 30 and st.rx_merged > 0
        assert a.counters()["rx_copied_frames"] == 30
        assert a.vm.check_guards() == 0


def test_chained_rx_buffers_are_served_with_one_counted_copy():
    with attached(rx_chain=True, indirect=True) as a:
        sent = send_to_vm(a, sizes=(64, 1514), per_size=40)
        assert a.vm.stats().rx_verified == sent
        c = a.counters()
        assert c["rx_copied_frames"] == sent
        assert a.vm.check_guards() == 0


def test_two_region_guest_memory():
    with attached(regions=2) as a:
        sent = send_to_vm(a, sizes=(64, 1514), per_size=60)
        assert a.vm.stats().rx_verified == sent
        assert a.counters()["rx_zero_copy_frames"] == sent


def test_get_vring_base_gives_every_unfilled_rx_buffer_back():
    """Stopping the rings mid-stream: the rx buffers still posted to the
    fill ring are given back (last_avail rewound), so the guest loses none
    and none is returned twice."""
    with attached() as a:
        sent = send_to_vm(a, sizes=(64,), per_size=100)
        info = a.vm.ring_info(ring="rx")
        rx_base, tx_base = a.vm.stop()
        c = a.counters()
        # Every buffer taken and not used comes back once: the newest by
        # rewinding (the next start re-takes them), the older ones still on
        # the port's fill ring (if the pair has a port) used with length 0.
        assert rx_base == sent + c["rx_returned_empty"] == a.vm.ring_info(ring="rx").used_idx
        assert rx_base + c["rx_rewound"] <= info.avail_idx
        assert c["rx_rewound"] > 0 and c["tx_lost_at_stop"] == 0
        assert a.backend.running_pairs() == []

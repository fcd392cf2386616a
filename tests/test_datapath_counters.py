"""Drop accounting of the datapath's counter block: each dropped frame in
exactly one cause, and counters that never go backwards when a queue
pair restarts on new sockets (the counter block outlives them)."""

from __future__ import annotations

import functools
import time

from rigs import attached as _attached
from rigs import wait_filled, wait_for
from xdpnet.stats import drops

VM_MAC = "52:54:00:aa:cc:02"

attached = functools.partial(_attached, VM_MAC, prefix="xc")


def test_frames_in_bounce_slots_without_enough_guest_buffers_are_no_rx_buffer_drops():
    """512-byte buffers with MRG_RXBUF: a 1400-byte frame takes three.  The
    guest's 256 buffers each carry a bounce slot (most on the NIC socket's
    fill ring, some on the port's), so most of 200 frames land in slots,
    but only 85 find three buffers waiting: the rest were dropped for want
    of a buffer -- by the datapath or, once the NIC socket's slots ran out,
    by the kernel -- not for being too large."""
    with attached(rx_buf_size=512, queue_size=256) as a:
        wait_filled(a.att)
        assert wait_for(lambda: a.counters()["rx_inflight"] == 256), a.counters()
        a.wire.send(200, 1400, flow=1)
        assert wait_for(lambda: a.counters()["rx_frames"] + drops(a.counters())["no_rx_buffer"]
                        >= 200), a.counters()
        c = a.counters()
        assert c["rx_frames"] == 256 // 3 and drops(c)["no_rx_buffer"] == 200 - 256 // 3, c
        assert c["drop_no_rx_buffer"] > 0, c
        assert c["drop_too_large"] == 0 and drops(c)["too_large"] == 0, c
        a.vm.run(duration=2.0, tx_count=0, rx_count=256 // 3)
        assert a.vm.stats().rx_verified == 256 // 3 and a.vm.check_guards() == 0


def test_kernel_counters_keep_counting_across_a_restart_of_the_pair():
    """Frames that found the fill ring empty are counted by the kernel per
    socket; a new memory table restarts the pair on new sockets, and the
    block still shows the earlier drops."""
    with attached() as a:
        wait_filled(a.att)
        a.wire.send(400, 200, flow=1)       # 256 buffers: the rest find none
        assert wait_for(lambda: drops(a.counters())["no_rx_buffer"] >= 400 - 256), a.counters()
        before = a.counters()
        old = a.backend.pair(0)
        a.vm.set_mem_table_again()
        assert wait_for(lambda: a.backend.pair(0) not in (None, old))
        time.sleep(0.3)                     # the new pair has read its sockets' statistics
        after = a.counters()
        for k in ("kernel_fill_empty", "kernel_rx_dropped", "kernel_rx_ring_full"):
            assert after[k] >= before[k], (k, before[k], after[k])
        assert drops(after)["no_rx_buffer"] >= drops(before)["no_rx_buffer"]
        assert after["rx_broken"] == after["tx_broken"] == 0

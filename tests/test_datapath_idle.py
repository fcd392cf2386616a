"""An idle datapath sleeps: its thread spends no CPU while nothing moves.

The case that once spun: guest rx buffers too short for a frame each need
a bounce slot, and the guest posts more of them than the pair has rx
slots.  The buffers beyond the slots wait in the avail ring until a frame
frees a slot; the loop must sleep in poll() meanwhile, not retry them.
"""

from __future__ import annotations

import functools
import time

from rigs import attached as _attached
from rigs import wait_for

VM_MAC = "52:54:00:aa:cc:01"
QUEUE = 1024                    # rx buffers the guest posts: more than the rx slots
IDLE_CPU_NS = 50_000_000        # at most 50 ms of CPU over 1 s of idleness

attached = functools.partial(_attached, VM_MAC, prefix="xc")


def cpu_ns(tid: int) -> int:
    """CPU time of thread *tid* of this process so far, in ns."""
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def idle_cpu_ns(tid: int, seconds: float = 1.0) -> int:
    """CPU time thread *tid* takes while we sleep *seconds*."""
    before = cpu_ns(tid)
    time.sleep(seconds)
    return cpu_ns(tid) - before


def test_idle_datapath_sleeps_while_rx_buffers_wait_for_bounce_slots():
    with attached(rx_buf_size=512, queue_size=QUEUE) as a:
        cfg = a.backend.config
        rx_slots = cfg.bounce_slots // cfg.pairs // 2
        assert rx_slots < QUEUE, "the guest must post more short buffers than there are slots"
        tid = a.backend.pair(0).native_id

        def all_slots_posted() -> bool:
            return a.counters()["rx_inflight"] == rx_slots

        # Every rx bounce slot carries a guest buffer; the rest wait.
        assert wait_for(all_slots_posted), a.counters()
        used = idle_cpu_ns(tid)
        assert used < IDLE_CPU_NS, f"idle datapath thread used {used / 1e6:.0f} ms of CPU in 1 s"

        # Frames free slots, the waiting buffers take them, the loop goes
        # back to sleep -- and nothing was lost meanwhile.
        a.wire.send(100, 400, flow=1)
        a.vm.run(duration=3.0, tx_count=0, rx_count=100)
        st = a.vm.stats()
        assert st.rx_verified == 100 and st.rx_bad == 0
        assert wait_for(all_slots_posted), a.counters()
        used = idle_cpu_ns(tid)
        assert used < IDLE_CPU_NS, f"idle datapath thread used {used / 1e6:.0f} ms of CPU in 1 s"
        assert a.counters()["rx_copied_frames"] == 100
        assert a.vm.check_guards() == 0

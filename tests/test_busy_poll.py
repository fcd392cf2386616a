"""The datapath's optional busy-poll mode (``xdpnet serve --busy-poll USEC
--napi-budget N``): the same frames, byte for byte, both ways and still no
userspace copy; the thread spins only while traffic flows and sleeps once
it has been idle longer than the busy-poll window; bad option values are
refused before anything is set up.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from rigs import attached, wait_filled

from xdpnet.errors import UsageError
from xdpnet.serve import ServeOptions, validate

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

VM_MAC = "52:54:00:b0:5b:01"


def _thread_cpu_ns(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


@pytest.mark.parametrize("napi_budget", [0, 64])
def test_busy_poll_moves_frames_both_ways_without_copies_then_sleeps(napi_budget):
    # 1024-entry rings: a 300-frame burst fits in the posted buffers.
    with attached(VM_MAC, prefix="xy", busy_poll_us=500, napi_budget=napi_budget,
                  queue_size=1024) as a:
        wait_filled(a.att)
        sent = 0
        for size in (64, 1500):
            a.wire.send(300, size, flow=5, seq0=sent)
            sent += 300
            a.vm.run(duration=3.0, tx_count=0, rx_count=300)
        st = a.vm.stats()
        assert st.rx_verified == sent and st.rx_bad == 0
        got = []
        rx = threading.Thread(target=lambda: got.append(a.wire.recv(max_frames=400, timeout=3)))
        rx.start()
        r = a.vm.run(duration=3.0, tx_count=400, tx_length=800, dst=a.wire.mac, flow=6)
        rx.join()
        assert r.stats.tx_completed == 400
        assert got[0].verified == 400 and got[0].bad == 0
        c = a.counters()
        assert c["rx_frames"] == sent and c["rx_copied_bytes"] == 0
        assert c["tx_frames"] == 400 and c["tx_copied_bytes"] == 0
        # Idle for longer than the 0.5 ms window: the thread sleeps in poll().
        tid = a.backend.pair(0).native_id
        time.sleep(0.2)
        t0, c0 = _thread_cpu_ns(tid), time.monotonic()
        time.sleep(1.0)
        used = (_thread_cpu_ns(tid) - t0) / (time.monotonic() - c0) / 1e9
        assert used < 0.05, f"idle busy-poll thread used {used:.0%} of a CPU"


@pytest.mark.parametrize("busy, budget, msg", [
    (-1, 0, "--busy-poll -1"),
    (2_000_000, 0, "--busy-poll 2000000"),
    (100, 5000, "--napi-budget 5000"),
    (0, 64, "--napi-budget needs --busy-poll"),
])
def test_bad_busy_poll_options_are_refused(busy, budget, msg):
    opts = ServeOptions("lo", (0,), VM_MAC, "/tmp/xy-none.sock", busy_poll_us=busy,
                        napi_budget=budget)
    with pytest.raises(UsageError, match=msg):
        validate(opts)

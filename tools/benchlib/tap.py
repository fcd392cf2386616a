"""The tap baseline as a tools/bench contestant: what a VMM without
vhost-net does.

The same vhost-user handling and virtqueue code as xdpnet
(xdpnet/tap_backend.py over c/tap.c), but frames move with one readv() /
writev() per frame on a tap device bridged to the NIC: the kernel copies
every frame between an skb and guest memory.  The NIC runs without
xdpnet's XDP program in these rounds (a plain bridge port, as a tap setup
has it); the backend thread is pinned to DUT_CPU and sleeps in poll().
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading

from benchlib.common import DUT_CPU, VM_MAC, Env
from benchlib.contestants import Dut, VhostContestant, wait_for_value


class Tap(VhostContestant):
    """TapBackend + VhostUserServer, a bridge joining the tap and the NIC."""

    name = "tap"

    def __init__(self, queue_size: int = 1024):
        self.queue_size = queue_size

    def describe(self) -> str:
        return (f"TapBackend (c/tap.c: one readv/writev per frame, sleeps in poll) on a tap "
                f"bridged to the NIC (no XDP program) + VhostUserServer + VirtioNetSimulator "
                f"(queue_size {self.queue_size})")

    @contextlib.contextmanager
    def _open(self, env: Env):
        from xdpnet.guest.simulator import VirtioNetSimulator
        from xdpnet.tap_backend import Bridge, TapBackend, TapDevice
        from xdpnet.vhost.server import VhostUserServer
        with contextlib.ExitStack() as stack:
            nic = stack.enter_context(env.bare_nic())
            base = nic[:-1]                              # the test bed's "xb<hex>"
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="xdpnet-bench-tap-"))
            tap = stack.enter_context(TapDevice(f"{base}t"))
            stack.enter_context(Bridge(f"{base}b", [nic, tap.ifname]))
            backend = TapBackend(tap)
            stack.callback(backend.close)
            server = VhostUserServer(os.path.join(tmp, "vm.sock"), backend)
            stack.callback(server.close)
            stop = threading.Event()
            th = threading.Thread(target=server.serve_forever, args=(stop,),
                                  name="bench-vhost", daemon=True)
            th.start()
            stack.callback(th.join, 10)
            stack.callback(stop.set)
            vm = stack.enter_context(VirtioNetSimulator(server.path, mac=VM_MAC,
                                                        queue_size=self.queue_size))
            vm.connect()
            vm.start()
            qp = wait_for_value(lambda: backend.pair(0), "tap datapath thread")
            tid = wait_for_value(lambda: qp.native_id, "tap datapath thread id")
            os.sched_setaffinity(tid, {DUT_CPU})
            yield Dut(vm, tid, "self", backend.counters[0].snapshot, False)

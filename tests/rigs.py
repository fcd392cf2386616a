"""Test rigs shared by the end-to-end tests: a VM (the project's virtio
simulator) attached in-process to a veth NIC in a namespace, and waiting
on conditions instead of sleeping.

    with attached(MAC, prefix="xp") as a:       # one VM, one NIC queue, a wire peer
        a.wire.send(...); a.vm.run(...); a.counters()

    vm = attach_vm(stack, bed, tmp, "A", MAC_A, queues=(0, 1))   # one of several VMs
    vm.take(100)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from xdpnet.attachment import Attachment
from xdpnet.guest.simulator import VirtioNetSimulator
from xdpnet.memory.umem import FrameGeometry
from xdpnet.net.netns import Testbed
from xdpnet.wire import WirePeer


def wait_for(cond: Callable[[], bool], timeout: float = 3.0, interval: float = 0.01) -> bool:
    """Poll ``cond()`` until it is true or *timeout* seconds passed; its last value."""
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(interval)
    return cond()


def wait_filled(att: Attachment, pairs: int = 1, timeout: float = 3.0) -> None:
    """Until the datapath has posted guest rx buffers on every pair's fill
    ring: frames sent before that meet an empty fill ring and are dropped
    (and counted) by the kernel."""
    assert wait_for(lambda: all(att.counters(p)["fill_ring_used"] for p in range(pairs)),
                    timeout), "the datapath never filled the fill ring"


@dataclass
class Attached:
    """One VM attached to a fresh veth NIC, with a peer on the wire."""

    bed: Testbed
    att: Attachment
    vm: VirtioNetSimulator
    wire: WirePeer

    @property
    def backend(self):
        return self.att.backend

    @property
    def steering(self):
        return self.att.steering

    def counters(self, pair: int = 0) -> dict[str, int]:
        return self.att.counters(pair)


@contextlib.contextmanager
def attached(mac: str, *, prefix: str, max_frame: int = 1518, steer_max_frame: int | None = None,
             connect: bool = True, busy_poll_us: int = 0, napi_budget: int = 0,
             **sim_options) -> Iterator[Attached]:
    """A VM with MAC *mac* on NIC queue 0 of a fresh 1-queue veth NIC
    (native XDP, copy mode); the simulator connected and started (unless
    *connect* is false).  *steer_max_frame* sets the XDP length check apart
    from the UMEM's cap, to test each alone.  Everything is removed after."""
    with contextlib.ExitStack() as stack:
        bed = stack.enter_context(Testbed(queues=1, prefix=prefix))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        att = stack.enter_context(Attachment(bed.nic, mac, os.path.join(tmp, "vm.sock"),
                                             geometry=FrameGeometry(max_frame=max_frame),
                                             xdp_mode="native", zerocopy=False,
                                             busy_poll_us=busy_poll_us, napi_budget=napi_budget))
        if steer_max_frame is not None:
            att.vm.set_max_frame(steer_max_frame)
        att.start()
        vm = stack.enter_context(VirtioNetSimulator(att.socket_path, mac=mac, **sim_options))
        if connect:
            vm.connect()
            vm.start()
        wire = stack.enter_context(WirePeer(bed, peer_mac=mac))
        yield Attached(bed, att, vm, wire)


@dataclass
class Vm:
    """One of several VMs on a NIC."""

    name: str
    mac: str
    att: Attachment
    sim: VirtioNetSimulator
    pairs: int

    def take(self, count: int, duration: float = 3.0) -> int:
        """Let the guest reap until ``count`` more frames arrived; returns them."""
        before = self.sim.stats(pair=None).rx_verified
        self.sim.run(duration=duration, tx_count=0, rx_count=count, pair=None)
        return self.sim.stats(pair=None).rx_verified - before

    def counters(self) -> dict[str, int]:
        """The datapath counters summed over the VM's queue pairs."""
        total: dict[str, int] = {}
        for p in range(self.pairs):
            for k, v in self.att.counters(p).items():
                total[k] = total.get(k, 0) + v
        return total


def attach_vm(stack: contextlib.ExitStack, bed: Testbed, tmp: str, name: str, mac: str,
              queues: tuple[int, ...] = (), port_pairs: int = 0, *, queue_size: int = 1024,
              wait: bool = True) -> Vm:
    """Attach VM *name* (NIC *queues* or *port_pairs* port-only pairs) and
    start its simulated guest; with *wait*, until its fill rings are filled."""
    att = stack.enter_context(Attachment(bed.nic, mac, os.path.join(tmp, f"{name}.sock"),
                                         queues=queues, port_pairs=port_pairs,
                                         xdp_mode="native", zerocopy=False))
    att.start()
    pairs = max(len(queues), port_pairs)
    sim = stack.enter_context(VirtioNetSimulator(att.socket_path, mac=mac, queue_pairs=pairs,
                                                 queue_size=queue_size))
    sim.connect()
    sim.start()
    if wait:
        wait_filled(att, pairs)
    return Vm(name, mac, att, sim, pairs)

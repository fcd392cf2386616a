"""Hostile descriptor chains through the real backend (issue 7, item 1).

A guest (the project's simulator) writes a malicious descriptor straight
into its tx virtqueue and kicks.  For each class the backend stops that
queue (virtio NEEDS_RESET semantics), records the reason once in its
counters, stays up, and another VM on the same NIC keeps receiving every
frame.  The same classes are fuzzed in tests/fuzz/virtq_fuzz.c.
"""

from __future__ import annotations

import contextlib
import struct
import tempfile
import threading

import pytest

from rigs import attach_vm, wait_filled, wait_for
from xdpnet._native import lib
from xdpnet.datapath.counters import BROKEN_REASONS
from xdpnet.guest.simulator import VirtioNetSimulator
from xdpnet.net.netns import Testbed
from xdpnet.wire import WirePeer

MAC_HOSTILE = "52:54:00:66:00:01"
MAC_OTHER = "52:54:00:66:00:02"
NEXT, WRITE, INDIRECT = 1, 2, 4
SCRATCH = 48 << 20          # guest offset of free memory for indirect tables / buffers


def desc(addr: int, length: int, flags: int = 0, nxt: int = 0) -> bytes:
    return struct.pack("<QIHH", addr, length, flags, nxt)


def scratch(vm: VirtioNetSimulator, off: int = 0) -> int:
    return vm.memory.gpa(SCRATCH + off)


# case -> (descriptors at table slots 0.., avail idx jump, extra writes, reason)
def cases(vm: VirtioNetSimulator) -> dict:
    buf = scratch(vm)
    mem_end_gpa = vm.memory.gpa(vm.config.mem_size - 16)
    num = vm.config.queue_size
    return {
        "addr outside memory": ([desc(0xDEAD_0000_0000, 64)], 1, [], 1),
        "addr+len crosses the end of memory": ([desc(mem_end_gpa, 64)], 1, [], 1),
        "addr+len wraps": ([desc(2**64 - 8, 64)], 1, [], 1),
        "chain loops": ([desc(buf, 64, NEXT, 0)], 1, [], 2),
        "chain longer than the queue": ([desc(buf, 64, NEXT, (i + 1) % num)
                                         for i in range(num)], 1, [], 2),
        "indirect inside indirect": ([desc(scratch(vm, 4096), 32, INDIRECT)], 1,
                                     [(scratch(vm, 4096), desc(scratch(vm, 8192), 16, INDIRECT)
                                       + desc(buf, 64))], 3),
        "indirect with NEXT": ([desc(scratch(vm, 4096), 16, INDIRECT | NEXT, 1), desc(buf, 64)],
                               1, [(scratch(vm, 4096), desc(buf, 64))], 3),
        "write-only descriptor on tx": ([desc(buf, 64, WRITE)], 1, [], 4),
        "avail index far ahead": ([desc(buf, 64)], num + 5, [], 5),
        "zero-length buffer": ([desc(buf, 0)], 1, [], 7),
    }


CASES = ["addr outside memory", "addr+len crosses the end of memory", "addr+len wraps",
         "chain loops", "chain longer than the queue", "indirect inside indirect",
         "indirect with NEXT", "write-only descriptor on tx", "avail index far ahead",
         "zero-length buffer"]


def inject(vm: VirtioNetSimulator, descs: list[bytes], jump: int, extra: list) -> None:
    """Play a hostile driver on tx queue 0: write the chain at slot 0,
    publish it with avail idx += jump, kick."""
    desc_gpa, avail_gpa, _ = vm.ring_gpas(0, "tx")
    num = vm.config.queue_size
    for gpa, data in extra:
        vm.write_guest(gpa, data)
    for i, d in enumerate(descs):
        vm.write_guest(desc_gpa + 16 * i, d)
    idx = vm.ring_info(0, "tx").avail_idx
    vm.write_guest(avail_gpa + 4 + 2 * (idx % num), struct.pack("<H", 0))
    vm.write_guest(avail_gpa + 2, struct.pack("<H", (idx + jump) & 0xFFFF))
    lib.xn_guest_kick(vm._pair(0).g, lib.XN_GUEST_TX)


@pytest.mark.parametrize("case", CASES)
def test_hostile_descriptor_stops_only_that_queue(case):
    with contextlib.ExitStack() as stack:
        bed = stack.enter_context(Testbed(queues=1, prefix="xh"))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        # 256-entry rings: "chain longer than the queue" is built from the queue size.
        bad, ok = (attach_vm(stack, bed, tmp, name, mac, queues, port, queue_size=256)
                   for name, mac, queues, port in (("bad", MAC_HOSTILE, (0,), 0),
                                                   ("ok", MAC_OTHER, (), 1)))
        bad_att, bad_vm, ok_att, ok_vm = bad.att, bad.sim, ok.att, ok.sim
        wire = stack.enter_context(WirePeer(bed, peer_mac=MAC_OTHER))
        descs, jump, extra, reason = cases(bad_vm)[case]
        inject(bad_vm, descs, jump, extra)
        wait_for(lambda: bad_att.counters()["tx_broken"] != 0)
        c = bad_att.counters()
        assert c["tx_broken"] == reason, (case, c["tx_broken"], BROKEN_REASONS.get(c["tx_broken"]))
        assert c["tx_frames"] == 0                      # nothing was sent from the chain
        assert bad_att.backend.broken() == [f"queue pair 0 tx: {BROKEN_REASONS[reason]}"]
        # The other VM on the NIC is untouched.
        wait_filled(ok_att)
        wire.send(50, 200, flow=3)
        ok_vm.run(duration=3.0, tx_count=0, rx_count=50)
        assert ok_vm.stats().rx_verified == 50
        assert ok_att.counters()["tx_broken"] == 0 and ok_att.counters()["rx_broken"] == 0
        # The attacked backend still serves a new, well-behaved frontend.
        bad_vm.close()
        with VirtioNetSimulator(bad_att.socket_path, mac=MAC_HOSTILE) as vm2:
            vm2.connect()
            vm2.start()
            got = []
            t = threading.Thread(target=lambda: got.append(wire.recv(max_frames=20, timeout=3)))
            t.start()
            vm2.run(duration=3.0, tx_count=20, tx_length=200, dst=wire.mac)
            t.join()
            assert got[0].verified == 20
            assert bad_att.counters()["tx_broken"] == 0

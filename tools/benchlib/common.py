"""Shared pieces of tools/bench: placement, /proc readers, pinned worker
threads, the test bed every contestant uses, and one round's record."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable

GEN_CPU = 0              # generator, guest, wire receiver, control plane
DUT_CPU = 1              # the thread under test (backend datapath / ceiling socket)
VM_MAC = "52:54:00:12:34:56"
KEEPER_MAC = "52:54:00:12:34:99"     # attached, never measured: keeps the programs loaded
SIZES = (64, 1500)
DIRECTIONS = ("wire_to_guest", "guest_to_wire")
SETTLE = 0.05            # s after the generator stops before the receiver is stopped

PLACEMENT = (f"generator (WirePeer.flood), guest simulator, wire receiver (WirePeer.recv), "
             f"vhost-user server and main thread pinned to cpu{GEN_CPU}; the thread under test "
             f"(xdpnet datapath thread xdpnet-qp0, or the ceiling's RxDrop/TxPush thread) pinned "
             f"to cpu{DUT_CPU}. On veth the XDP program and the copy into the UMEM run in the "
             f"sender's softirq (cpu{GEN_CPU} for wire->guest). No SO_BUSY_POLL anywhere: the "
             f"xdpnet datapath and the guest sleep in poll(); RxDrop/TxPush spin 20 us before "
             f"sleeping.")



def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ---- /proc helpers ---------------------------------------------------------

def thread_cpu_ns(tid: int | None, pid: int | str = "self") -> int:
    """ns a thread (of ours, or of process *pid*) has run (schedstat), 0 if unknown/gone."""
    if not tid:
        return 0
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def thread_ticks(tid: int | None, pid: int | str = "self") -> int:
    """utime+stime of a thread in clock ticks (/proc/<pid>/task/<tid>/stat)."""
    if not tid:
        return 0
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])     # fields 14, 15
    except (OSError, ValueError, IndexError):
        return 0


def name_thread(tid: int, comm: str) -> None:
    """Set the kernel name of a thread of ours (for top -H / perf)."""
    with contextlib.suppress(OSError):
        with open(f"/proc/self/task/{tid}/comm", "w") as f:
            f.write(comm[:15])


def cpu_times() -> dict[str, list[int]]:
    """Per-CPU jiffies from /proc/stat: user nice system idle iowait irq softirq steal."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                p = line.split()
                out[p[0]] = [int(x) for x in p[1:9]]
    return out


def cpu_usage(a: dict[str, list[int]], b: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Per-CPU share (%) of busy, softirq, steal between two cpu_times()."""
    res = {}
    for cpu in (f"cpu{GEN_CPU}", f"cpu{DUT_CPU}"):
        if cpu not in a or cpu not in b:
            continue
        d = [y - x for x, y in zip(a[cpu], b[cpu])]
        tot = sum(d) or 1
        idle = d[3] + d[4]
        res[cpu] = {"busy_pct": round(100 * (tot - idle - d[7]) / tot, 1),
                    "user_pct": round(100 * (d[0] + d[1]) / tot, 1),
                    "sys_pct": round(100 * d[2] / tot, 1),
                    "softirq_pct": round(100 * d[6] / tot, 1),
                    "steal_pct": round(100 * d[7] / tot, 1)}
    return res


def pin_self(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


class Worker(threading.Thread):
    """Run fn on a thread pinned to *cpu*; .tid, .result, .error after join()."""

    def __init__(self, name: str, cpu: int, fn: Callable[[], Any]):
        super().__init__(name=name, daemon=True)
        self.cpu, self.fn = cpu, fn
        self.tid: int | None = None
        self.result: Any = None
        self.cpu_ns = 0            # the thread's own CPU time when fn returned
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.start()
        self.ready.wait(5)

    def run(self) -> None:
        self.tid = threading.get_native_id()
        name_thread(self.tid, self.name)
        pin_self(self.cpu)
        self.ready.set()
        try:
            self.result = self.fn()
            self.cpu_ns = time.thread_time_ns()
        except BaseException as e:     # noqa: BLE001 - re-raised by get()
            self.error = e

    def get(self, timeout: float = 30.0) -> Any:
        self.join(timeout)
        if self.is_alive():
            raise RuntimeError(f"thread {self.name} did not finish")
        if self.error is not None:
            raise self.error
        return self.result

# ---- the shared environment -------------------------------------------------

class Env:
    """Test bed, steering program and wire peer shared by all contestants."""

    def __init__(self, stack: contextlib.ExitStack):
        from xdpnet.memory.umem import FrameGeometry
        from xdpnet.net.netns import Testbed
        from xdpnet.steering.nic import NicSteering
        from xdpnet.wire import WirePeer
        self.bed = stack.enter_context(Testbed(queues=1, prefix="xb"))
        self.geometry = FrameGeometry()
        self.steering = stack.enter_context(NicSteering(self.bed.nic, mode="auto"))
        # A VM that is never measured keeps the programs loaded between
        # rounds (the last VM to leave a NIC unloads them).
        self._keeper = self.steering.add_vm(KEEPER_MAC, self.geometry.max_frame, (), 1)
        stack.callback(self._keeper.remove)
        self.wire = stack.enter_context(WirePeer(self.bed, peer_mac=VM_MAC))
        self.nic = self.bed.nic
        self.wire_rx = True

    @contextlib.contextmanager
    def bare_nic(self):
        """The NIC without xdpnet's XDP program for the duration: DPDK's
        net_af_xdp attaches its own redirect-everything program, and a tap
        bridge port has none (NicSteering.detached: no recompile)."""
        with self.steering.detached():
            yield self.nic

    def flood(self, seconds: float, size: int) -> Worker:
        """The generator: AF_PACKET flood to VM_MAC from the wire namespace, on GEN_CPU."""
        return Worker("bench-gen", GEN_CPU,
                      lambda: self.wire.flood(seconds, size, flow=7, dst=VM_MAC))

    def receiver(self) -> Worker:
        """The wire-side receiver (counts and verifies), on GEN_CPU, until wire.stop().

        With --no-wire-rx nothing is started (it shares cpu0 with the guest)."""
        if not self.wire_rx:
            return Worker("bench-wirerx", GEN_CPU, lambda: _NoRx)
        return Worker("bench-wirerx", GEN_CPU, lambda: self.wire.recv(0, timeout=None))


class _NoRx:
    verified = 0
    bad = 0


def round_record(frames: int, size: int, secs: float, dut_ns: int, extra: dict) -> dict:
    mpps = frames / secs / 1e6 if secs else 0.0
    r = {"mpps": round(mpps, 4), "gbps": round(mpps * size * 8 / 1e3, 3), "frames": frames,
         "seconds": round(secs, 4),
         "cpu_ns_per_frame": round(dut_ns / frames, 1) if frames else None}
    r.update(extra)
    return r



def med(xs: list) -> float | None:
    """Median of the numbers in *xs* (None ignored), rounded; None if none."""
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 4) if xs else None

"""The AF_XDP ceiling and xdpnet itself as tools/bench contestants.

A contestant has one method per direction, ``wire_to_guest(env, size,
seconds)`` and ``guest_to_wire(...)``, each opening and closing what it
needs inside the round (contestants share the NIC queue) and returning
:func:`benchlib.common.round_record`; ``latency(env, count)`` returns the
ping-pong round trips.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

from benchlib.common import (DUT_CPU, GEN_CPU, SETTLE, VM_MAC, Env, Worker, cpu_times,
                             cpu_usage, round_record, thread_cpu_ns, thread_ticks)

# ---- contestants --------------------------------------------------------------

class Contestant:
    """One thing measured.  Each round method opens and closes what it needs."""

    name = "?"
    has_latency = False         # True: latency(env, count) is implemented

    def wire_to_guest(self, env: Env, size: int, seconds: float) -> dict:
        raise NotImplementedError

    def guest_to_wire(self, env: Env, size: int, seconds: float) -> dict:
        raise NotImplementedError

    def latency(self, env: Env, count: int) -> dict:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class Ceiling(Contestant):
    """AF_XDP rx-drop / tx-push on the NIC queue: what any AF_XDP backend can reach here."""

    name = "ceiling"

    def describe(self) -> str:
        return ("RxDrop (own UMEM, 4096 chunks) in the XSKMAP of the NIC steering program; "
                "TxPush of pre-built frames to the wire peer")

    def wire_to_guest(self, env: Env, size: int, seconds: float) -> dict:
        from xdpnet.wire import RxDrop
        vm = env.steering.add_vm(VM_MAC, env.geometry.max_frame, (0,))
        with RxDrop(env.nic, 0) as rxd:
            vm.set_xsk("nic", 0, rxd.fd)
            try:
                dut = Worker("bench-rxdrop", DUT_CPU, lambda: rxd.run(0))
                c0, n0, t0 = cpu_times(), thread_cpu_ns(dut.tid), thread_ticks(dut.tid)
                gen = env.flood(seconds, size)
                g = gen.get()
                time.sleep(SETTLE)
                n1, t1, c1 = thread_cpu_ns(dut.tid), thread_ticks(dut.tid), cpu_times()
                rxd.stop()
                st = dut.get()
            finally:
                vm.remove()
        return round_record(st.frames, size, g.elapsed, n1 - n0, {
            "generator_mpps": round(g.tx_mpps, 4),
            "generator_cpu_ns_per_sent": round(gen.cpu_ns / g.tx_frames, 1) if g.tx_frames else None,
            "dropped_kernel": st.kernel_rx_dropped + st.kernel_rx_ring_full + st.kernel_fill_empty,
            "dut_ticks": t1 - t0, "cpus": cpu_usage(c0, c1), "copied_bytes": 0,
            "zerocopy": st.zerocopy})

    def guest_to_wire(self, env: Env, size: int, seconds: float) -> dict:
        from xdpnet.wire import TxPush
        with TxPush(env.nic, 0, dst=env.wire.mac, flow=8, length=size) as txp:
            rx = env.receiver()
            dut = Worker("bench-txpush", DUT_CPU, lambda: txp.run(0))
            c0, n0 = cpu_times(), thread_cpu_ns(dut.tid)
            time.sleep(seconds)
            n1, c1 = thread_cpu_ns(dut.tid), cpu_times()
            txp.stop()
            st = dut.get()
            time.sleep(SETTLE)
            env.wire.stop()
            w = rx.get()
        r = round_record(st.frames, size, st.elapsed, n1 - n0, {
            "wire_received_mpps": round(w.verified / st.elapsed / 1e6, 4) if st.elapsed else 0.0,
            "wire_verified": w.verified, "wire_bad": w.bad, "cpus": cpu_usage(c0, c1),
            "copied_bytes": 0, "zerocopy": st.zerocopy})
        return r


@dataclass
class Dut:
    """A running backend under test with the simulated guest as its frontend."""

    vm: Any                                 # VirtioNetSimulator, connected and started
    tid: int                                # the backend's datapath thread (pinned to DUT_CPU)
    pid: int | str                          # its process ("self" when in-process)
    counters: Callable[[], dict]            # backend counters (xn_counters names) now
    zerocopy: bool = False


def _delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a if isinstance(a[k], int) and isinstance(b.get(k), int)}


class VhostContestant(Contestant):
    """A vhost-user backend driven by the project's simulator as its guest.

    Subclasses provide ``_open(env)``, a context manager yielding a
    :class:`Dut`; the rounds are the same for every backend: the guest
    sleeps on its call eventfds (no busy poll) on GEN_CPU, the backend's
    datapath thread runs alone on DUT_CPU.  Wire -> guest counts frames the
    guest verified; guest -> wire counts frames the backend put on the NIC
    (``tx_frames``) and, separately, frames the wire peer verified.
    """

    queue_size = 1024
    has_latency = True

    def _open(self, env: Env) -> contextlib.AbstractContextManager[Dut]:
        raise NotImplementedError

    def wire_to_guest(self, env: Env, size: int, seconds: float) -> dict:
        with self._open(env) as dut:
            vm = dut.vm
            guest = Worker("bench-guest", GEN_CPU,
                           lambda: vm.run(duration=seconds + 30, tx_count=0))
            time.sleep(0.02)
            s0, c0 = dut.counters(), cpu_times()
            n0, t0 = thread_cpu_ns(dut.tid, dut.pid), thread_ticks(dut.tid, dut.pid)
            gn0 = thread_cpu_ns(guest.tid)
            gen = env.flood(seconds, size)
            g = gen.get()
            time.sleep(SETTLE)
            n1, t1 = thread_cpu_ns(dut.tid, dut.pid), thread_ticks(dut.tid, dut.pid)
            gn1 = thread_cpu_ns(guest.tid)
            s1, c1 = dut.counters(), cpu_times()
            vm.interrupt_run()
            res = guest.get()
        d = _delta(s0, s1)
        frames = res.stats.rx_verified
        wakeups = d.get("wakeups")
        return round_record(frames, size, g.elapsed, n1 - n0, {
            "generator_mpps": round(g.tx_mpps, 4),
            "generator_cpu_ns_per_sent": round(gen.cpu_ns / g.tx_frames, 1) if g.tx_frames else None,
            "backend_rx_frames": d.get("rx_frames"),
            "guest_verified": res.stats.rx_verified, "guest_bad": res.stats.rx_bad,
            "guest_cpu_ns_per_frame": round((gn1 - gn0) / frames, 1) if frames else None,
            "guest_sleeps": res.stats.sleeps, "guest_interrupts": res.stats.rx_interrupts,
            "backend_wakeups": wakeups, "backend_rx_notify": d.get("rx_notify"),
            "frames_per_wakeup": round(frames / wakeups, 1) if wakeups else None,
            "pulled_from_nic": d.get("pulled_from_nic"),
            "drop_no_rx_buffer": d.get("drop_no_rx_buffer"),
            "kernel_fill_empty": d.get("kernel_fill_empty"),
            "kernel_rx_ring_full": d.get("kernel_rx_ring_full"),
            "zero_copy_frames": d.get("rx_zero_copy_frames"),
            "copied_bytes": d.get("rx_copied_bytes"), "dut_ticks": t1 - t0,
            "cpus": cpu_usage(c0, c1), "zerocopy": dut.zerocopy})

    def guest_to_wire(self, env: Env, size: int, seconds: float) -> dict:
        with self._open(env) as dut:
            vm = dut.vm
            rx = env.receiver()
            s0, c0 = dut.counters(), cpu_times()
            n0, t0 = thread_cpu_ns(dut.tid, dut.pid), thread_ticks(dut.tid, dut.pid)
            guest = Worker("bench-guest", GEN_CPU,
                           lambda: vm.run(duration=seconds, tx_count=None, tx_length=size,
                                          dst=env.wire.mac, flow=9))
            res = guest.get(seconds + 30)
            gn1 = guest.cpu_ns
            n1, t1 = thread_cpu_ns(dut.tid, dut.pid), thread_ticks(dut.tid, dut.pid)
            s1, c1 = dut.counters(), cpu_times()
            time.sleep(SETTLE)
            env.wire.stop()
            w = rx.get()
        d = _delta(s0, s1)
        frames = d["tx_frames"]
        secs = res.seconds
        wakeups = d.get("wakeups")
        return round_record(frames, size, secs, n1 - n0, {
            "guest_sent_mpps": round(res.stats.tx_sent / secs / 1e6, 4) if secs else 0.0,
            "wire_received_mpps": round(w.verified / secs / 1e6, 4) if secs else 0.0,
            "wire_verified": w.verified, "wire_bad": w.bad,
            "guest_cpu_ns_per_frame": round(gn1 / frames, 1) if frames else None,
            "guest_tx_no_slot": res.stats.tx_no_slot, "guest_sleeps": res.stats.sleeps,
            "backend_wakeups": wakeups, "backend_tx_syscalls": d.get("tx_syscalls"),
            "frames_per_wakeup": round(frames / wakeups, 1) if wakeups else None,
            "taken_from_guest": d.get("taken_from_guest"),
            "drop_tx_error": d.get("drop_tx_error"), "zero_copy_frames": d.get("tx_zero_copy_frames"),
            "copied_bytes": d.get("tx_copied_bytes"), "dut_ticks": t1 - t0,
            "cpus": cpu_usage(c0, c1), "zerocopy": dut.zerocopy})

    def latency(self, env: Env, count: int) -> dict:
        """Ping-pong: the wire peer sends one 64-byte frame at a time to the VM,
        the guest reflects it (MACs swapped), the wire peer times the round trip."""
        with self._open(env) as dut:
            vm = dut.vm
            guest = Worker("bench-guest", GEN_CPU,
                           lambda: vm.run(duration=60, tx_count=0, reflect=True))
            time.sleep(0.02)
            env.wire.pingpong(20, 64, timeout=0.5, dst=VM_MAC)     # warm-up
            n0 = thread_cpu_ns(dut.tid, dut.pid)
            p = env.wire.pingpong(count, 64, timeout=0.5, dst=VM_MAC)
            n1 = thread_cpu_ns(dut.tid, dut.pid)
            vm.interrupt_run()
            guest.get()
        return latency_record(p.rtts, n1 - n0)


class Xdpnet(VhostContestant):
    """The in-process backend + vhost-user server + simulated guest, wired as in demo.py."""

    name = "xdpnet"

    def __init__(self, queue_size: int = 1024, busy_poll_us: int = 0, napi_budget: int = 0,
                 name: str = "xdpnet"):
        self.queue_size = queue_size
        self.busy_poll_us = busy_poll_us
        self.napi_budget = napi_budget
        self.name = name

    def describe(self) -> str:
        return (f"NetBackend (XSK ring 2048, batch 64, busy_poll_us {self.busy_poll_us}, "
                f"napi_budget {self.napi_budget}) + "
                f"VhostUserServer + VirtioNetSimulator (queue_size {self.queue_size}, sleeps "
                f"on its call eventfds)")

    @contextlib.contextmanager
    def _open(self, env: Env):
        from xdpnet.attachment import Attachment
        from xdpnet.guest.simulator import VirtioNetSimulator
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="xdpnet-bench-"))
            att = stack.enter_context(Attachment(env.nic, VM_MAC, os.path.join(tmp, "vm.sock"),
                                                 geometry=env.geometry, steering=env.steering,
                                                 busy_poll_us=self.busy_poll_us,
                                                 napi_budget=self.napi_budget))
            att.start()
            backend = att.backend
            vm = stack.enter_context(VirtioNetSimulator(att.socket_path, mac=VM_MAC,
                                                        queue_size=self.queue_size))
            vm.connect()
            vm.start()
            qp = wait_for_value(lambda: backend.pair(0), "xdpnet datapath thread")
            os.sched_setaffinity(qp.native_id, {DUT_CPU})
            yield Dut(vm, qp.native_id, "self", backend.counters[0].snapshot, att.zerocopy)


def wait_for_value(fn: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    """Poll *fn* until it returns something truthy; RuntimeError after *timeout*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.01)
    raise RuntimeError(f"{what} not found within {timeout} s")


def latency_record(rtts: tuple, dut_ns: int) -> dict:
    """p50/p99/max round trip in microseconds of the frames that came back."""
    got = sorted(r for r in rtts if r is not None)
    if not got:
        return {"count": len(rtts), "lost": len(rtts), "p50_us": None, "p99_us": None,
                "max_us": None, "dut_cpu_ns_per_rtt": None}

    def pct(q: float) -> float:
        return round(got[min(len(got) - 1, int(q * len(got)))] * 1e6, 1)

    return {"count": len(rtts), "lost": len(rtts) - len(got), "p50_us": pct(0.50),
            "p99_us": pct(0.99), "max_us": round(got[-1] * 1e6, 1),
            "dut_cpu_ns_per_rtt": round(dut_ns / len(got), 1)}

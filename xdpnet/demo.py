"""``xdpnet demo``: a simulated VM attached to a veth "NIC", with live stats.

What it builds (and removes on exit, Ctrl-C or error)::

    [wire peer] -- wire veth (netns) ==== NIC veth (root ns) -- XDP --> AF_XDP
                                                                 |   UMEM = guest RAM
                                     xdpnet backend  <-- vhost-user --> simulated VM

Phases: request/response (the wire peer sends frames of several sizes,
the VM reflects them, the wire peer verifies them), then a flood
wire→VM and a flood VM→wire.  Every frame is checked byte for byte at
the far end; ``verified_frames`` counts those that passed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.table import Table

from xdpnet import privilege
from xdpnet.attachment import Attachment
from xdpnet.guest.simulator import VirtioNetSimulator
from xdpnet.net.netns import Testbed
from xdpnet.stats import Rate, drops, summary
from xdpnet.wire import WirePeer

VM_MAC = "52:54:00:12:34:56"
RR_SIZES = (64, 128, 512, 1024, 1514)


@dataclass
class DemoOptions:
    seconds: float = 10.0
    json: bool = False


@dataclass
class DemoState:
    """What the live table shows; updated by the phases."""

    phase: str = "setting up"
    started: float = field(default_factory=time.monotonic)
    verified: int = 0               # frames verified at the far end
    bad: int = 0                    # frames that failed verification
    rr_sent: int = 0
    rr_back: int = 0
    wire_to_vm_sent: int = 0
    vm_to_wire_sent: int = 0


def build_table(state: DemoState, snap: dict[str, int], rate: dict[str, Rate],
                xdp_mode: str, xsk_mode: str) -> Table:
    """The live table: one snapshot of the counters in, a rich Table out."""
    t = Table(title=f"xdpnet demo — {state.phase} — XDP {xdp_mode}, AF_XDP {xsk_mode}, "
                    f"{time.monotonic() - state.started:.0f} s", expand=False)
    t.add_column("counter")
    t.add_column("rx (wire→VM)", justify="right")
    t.add_column("tx (VM→wire)", justify="right")
    t.add_row("frames", f"{snap['rx_frames']:,}", f"{snap['tx_frames']:,}")
    t.add_row("frames/s", f"{rate['rx'].fps:,.0f}", f"{rate['tx'].fps:,.0f}")
    t.add_row("Gbit/s", f"{rate['rx'].bps / 1e9:.2f}", f"{rate['tx'].bps / 1e9:.2f}")
    t.add_row("zero-copy frames", f"{snap['rx_zero_copy_frames']:,}",
              f"{snap['tx_zero_copy_frames']:,}")
    t.add_row("copied bytes (userspace)", f"{snap['rx_copied_bytes']:,}",
              f"{snap['tx_copied_bytes']:,}")
    d = drops(snap)
    t.add_row("drops", f"no buffer {d['no_rx_buffer']:,}  too large {d['too_large']:,}",
              f"tx error {d['tx_error']:,}  invalid {d['invalid_desc']:,}")
    t.add_row("ring fill / rx / tx", f"{snap['fill_ring_used']} / {snap['rx_ring_used']}",
              f"{snap['tx_ring_used']}")
    t.add_row("verified end to end", f"{state.verified:,}", f"bad {state.bad:,}")
    return t


def run(opts: DemoOptions) -> int:
    """Run the demo; returns the exit status (0 if every frame verified)."""
    privilege.require("xdpnet demo")
    console = Console(stderr=opts.json)
    state = DemoState()
    prev_handler = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with contextlib.ExitStack() as stack:
            bed = stack.enter_context(Testbed(queues=1, prefix="xd"))
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="xdpnet-demo-"))
            att = stack.enter_context(Attachment(bed.nic, VM_MAC, os.path.join(tmp, "vm.sock")))
            att.start()
            steering, snapshot = att.steering, att.counters
            # 1024-entry rings, as `xdpnet serve` recommends for QEMU.
            vm = stack.enter_context(VirtioNetSimulator(att.socket_path, mac=VM_MAC,
                                                        queue_size=1024))
            vm.connect()
            vm.start()
            wire = stack.enter_context(WirePeer(bed, peer_mac=VM_MAC))
            xsk_mode = "zero-copy" if att.zerocopy else "copy"

            phases = threading.Thread(target=_phases, args=(opts, state, vm, wire), daemon=True)
            phases.start()
            last, t_last = snapshot(), time.monotonic()
            rate = {"rx": Rate(), "tx": Rate()}
            live = Live(build_table(state, last, rate, steering.xdp_mode, xsk_mode),
                        console=console, refresh_per_second=4, transient=False) \
                if not opts.json else None
            with live if live else contextlib.nullcontext():
                while phases.is_alive():
                    phases.join(0.25)
                    now, snap = time.monotonic(), snapshot()
                    rate = {d: Rate.between(last, snap, d, now - t_last) for d in ("rx", "tx")}
                    last, t_last = snap, now
                    if live:
                        live.update(build_table(state, snap, rate, steering.xdp_mode, xsk_mode))
            if state.phase.startswith("failed"):
                raise RuntimeError(state.phase)
            result = summary([snapshot()])
            result.update(verified_frames=state.verified, bad_frames=state.bad,
                          request_response={"sent": state.rr_sent, "returned": state.rr_back},
                          xdp_mode=steering.xdp_mode, xsk_mode=xsk_mode,
                          steering=steering.verdict_counters())
    except KeyboardInterrupt:
        print("xdpnet demo: interrupted, everything removed", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, prev_handler)
    if opts.json:
        print(json.dumps(result, indent=2))
    else:
        console.print(f"verified end to end: {result['verified_frames']:,} frames, "
                      f"bad: {result['bad_frames']}, userspace copies: rx "
                      f"{result['rx_copied_bytes']} B, tx {result['tx_copied_bytes']} B")
    return 0 if state.bad == 0 and state.verified > 0 else 1


def _phases(opts: DemoOptions, state: DemoState, vm: VirtioNetSimulator, wire: WirePeer) -> None:
    """The traffic: request/response, flood wire→VM, flood VM→wire."""
    try:
        third = max(opts.seconds / 3, 0.5)
        # 1. request/response: the VM reflects what the wire sends.
        state.phase = "request/response"
        refl = _bg(vm.run, duration=third + 0.5, tx_count=0, reflect=True)
        deadline = time.monotonic() + third
        seq = 0
        while time.monotonic() < deadline:
            for size in RR_SIZES:
                wire.send(32, size, flow=1, seq0=seq)
                seq += 32
                state.rr_sent += 32
                back = wire.recv(max_frames=32, timeout=0.5)
                state.rr_back += back.verified
                state.verified += back.verified
                state.bad += back.bad
        refl.join()
        # 2. flood wire -> VM (the VM verifies each frame).
        state.phase = "flood wire→VM"
        before = vm.stats().rx_verified
        bad_before = vm.stats().rx_bad
        fl = _bg(wire.flood, third, 1514 // 2, flow=2)
        vm.run(duration=third + 0.3, tx_count=0)
        fl.join()
        state.verified += vm.stats().rx_verified - before
        state.bad += vm.stats().rx_bad - bad_before
        # 3. flood VM -> wire (the wire verifies each frame).
        state.phase = "flood VM→wire"
        rx = _bg(wire.recv, 0, 1.0)
        vm.run(duration=third, tx_count=None, tx_length=1000, dst=wire.mac, flow=3)
        wire.stop()
        rx.join()
        got = rx.result
        if got is not None:
            state.verified += got.verified
            state.bad += got.bad
        state.phase = "done"
    except Exception as e:      # noqa: BLE001 - reported by the main thread
        state.phase = f"failed: {e}"


class _bg(threading.Thread):
    """Run ``fn(*args, **kw)`` on a thread; ``.result`` after join()."""

    def __init__(self, fn, *args, **kw):
        super().__init__(daemon=True)
        self.fn, self.args_, self.kw, self.result = fn, args, kw, None
        self.start()

    def run(self) -> None:
        self.result = self.fn(*self.args_, **self.kw)

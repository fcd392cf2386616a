"""``xdpnet serve``: serve one VM's virtio-net over AF_XDP on a NIC queue.

Set-up order, each step failing with one line and nothing left behind:
privileges, MAC, interface and queues, zero-copy probe, XDP program,
vhost-user socket.  Then the QEMU options the VM needs are printed and
the backend serves frontends (one at a time, reconnects included) until
SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from dataclasses import dataclass

from xdpnet import privilege
from xdpnet.attachment import Attachment
from xdpnet.backend import NetBackend
from xdpnet.datapath.xsk import probe_zerocopy
from xdpnet.errors import UsageError
from xdpnet.memory.umem import FrameGeometry
from xdpnet.net.device import NetDevice
from xdpnet.net.mac import format_mac, parse_mac

log = logging.getLogger("xdpnet.serve")


@dataclass(frozen=True)
class ServeOptions:
    """What ``xdpnet serve`` was asked to do (parsed, not yet validated)."""

    iface: str
    queues: tuple[int, ...]
    mac: str
    socket: str
    xdp_mode: str = "auto"
    max_frame: int = 1518
    guest_mem: str = "1G"
    socket_group: str | None = None


def parse_queues(text: str) -> tuple[int, ...]:
    """``"0"``, ``"2,5"`` or ``"0-3"`` → queue indexes (UsageError if malformed)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if lo > hi:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise UsageError(f"malformed queue list {text!r} (examples: 0, 2,5, 0-3)") from None
    if any(q < 0 for q in out) or len(set(out)) != len(out) or not out:
        raise UsageError(f"malformed queue list {text!r}: queues must be distinct and >= 0")
    return tuple(out)


def qemu_args(opts: ServeOptions, name: str = "net0") -> list[str]:
    """The QEMU options a VM needs to use this backend."""
    n = len(opts.queues)
    # 1024-entry rings: every posted rx buffer is a frame the kernel can
    # deliver without waiting for the guest (docs/benchmarks.md).
    dev = f"virtio-net-pci,netdev={name},mac={opts.mac},rx_queue_size=1024,tx_queue_size=1024"
    netdev = f"vhost-user,id={name},chardev=chr-{name}"
    if n > 1:
        netdev += f",queues={n}"
        dev += f",mq=on,vectors={2 * n + 2}"
    return [
        "-object", f"memory-backend-memfd,id=mem0,size={opts.guest_mem},share=on",
        "-numa", "node,memdev=mem0",
        "-chardev", f"socket,id=chr-{name},path={opts.socket}",
        "-netdev", netdev,
        "-device", dev,
    ]


def prepare(opts: ServeOptions) -> tuple[FrameGeometry, bool]:
    """Validate everything that can be checked before touching the NIC."""
    privilege.require("xdpnet serve")
    mac = parse_mac(opts.mac)
    if mac[0] & 1:
        raise UsageError(f"{opts.mac} is a multicast address, not a VM's MAC")
    dev = NetDevice.lookup(opts.iface)
    for q in opts.queues:
        dev.validate_queue(q)
    geometry = FrameGeometry(max_frame=opts.max_frame)
    zc = all(probe_zerocopy(opts.iface, q) for q in opts.queues)
    if not zc:
        print(f"xdpnet: {opts.iface} does not support zero-copy AF_XDP: using copy mode "
              f"(the kernel copies each frame into guest memory; no userspace copy)",
              file=sys.stderr)
    return geometry, zc


def run(opts: ServeOptions, ready: threading.Event | None = None,
        stop: threading.Event | None = None) -> int:
    """Serve until SIGINT/SIGTERM (or ``stop``); returns the exit status."""
    geometry, zc = prepare(opts)
    with Attachment(opts.iface, opts.mac, opts.socket, queues=opts.queues, geometry=geometry,
                    xdp_mode=opts.xdp_mode, zerocopy=zc, socket_group=opts.socket_group,
                    stop_event=stop) as att:
        print("QEMU options for this VM:\n  " + " ".join(qemu_args(opts)), flush=True)
        log.info("serving %s queue(s) %s for %s on %s (XDP %s)", opts.iface,
                 ",".join(map(str, opts.queues)), format_mac(parse_mac(opts.mac)),
                 opts.socket, att.steering.xdp_mode)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: att.stop_event.set())
        watcher = threading.Thread(target=_watch_broken, args=(att.backend, att.stop_event),
                                   daemon=True)
        watcher.start()
        if ready is not None:
            ready.set()
        att.serve_forever()
    return 0


def _watch_broken(backend: NetBackend, stop: threading.Event) -> None:
    """Log each queue the datapath stopped (NEEDS_RESET) once."""
    seen: set[str] = set()
    while not stop.wait(0.2):
        for reason in backend.broken():
            if reason not in seen:
                seen.add(reason)
                log.error("guest broke the virtqueue protocol, queue stopped: %s", reason)

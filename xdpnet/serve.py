"""``xdpnet serve``: serve one VM's virtio-net over AF_XDP on a NIC queue.

Set-up order, each step failing with one line and nothing left behind:
NIC queues or port-only pairs, privileges, MAC, interface and queues, zero-copy probe, (with ``--name``)
the VM's registry record, XDP program, vhost-user socket.  Then the QEMU
options the VM needs are printed and the backend serves frontends (one
at a time, reconnects included) until SIGINT/SIGTERM.

With ``--name`` the process is one VM of the operator's registry
(:mod:`xdpnet.operator.registry`): ``xdpnet attach`` starts it that way
in the background; it publishes its counters as files other processes
map (``stats``, ``top``, ``metrics``), flips its record to ``running``
once its socket listens and removes record and files when it exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xdpnet import privilege
from xdpnet.errors import UsageError
from xdpnet.memory.umem import FrameGeometry
from xdpnet.net.device import NetDevice
from xdpnet.net.mac import format_mac, vm_mac
from xdpnet.operator import snippets
from xdpnet.operator.registry import Registry, VmRecord, check_name
from xdpnet.rundirs import proc_start

if TYPE_CHECKING:
    from xdpnet.backend import NetBackend

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
    name: str | None = None             # register as this VM (xdpnet list/stats/top)
    state_dir: str | None = None        # run directory of the registry (default /run/xdpnet)
    port_pairs: int = 0                 # no NIC queues: this many pairs through the VM's port
    busy_poll_us: int = 0               # datapath keeps polling this long after the last work
    napi_budget: int = 0                # > 0: the datapath runs the NIC queue's NAPI (busy poll)

    @property
    def pairs(self) -> int:
        return len(self.queues) or self.port_pairs


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
    return snippets.qemu_args(opts.socket, opts.mac, opts.pairs, opts.guest_mem, name=name)


def validate(opts: ServeOptions, what: str = "xdpnet serve") -> ServeOptions:
    """Everything that can be checked without touching the NIC: NIC queues
    or port-only pairs, privilege, name, MAC, interface, queues (raises;
    exit codes in xdpnet.errors).  Returns *opts* with the MAC normalised
    (``52:54:00:12:34:56``)."""
    if not 0 <= opts.busy_poll_us <= 1_000_000:
        raise UsageError(f"--busy-poll {opts.busy_poll_us}: give 0..1000000 microseconds")
    if not 0 <= opts.napi_budget <= 1024:
        raise UsageError(f"--napi-budget {opts.napi_budget}: give 0..1024 frames")
    if opts.napi_budget and not opts.busy_poll_us:
        raise UsageError("--napi-budget needs --busy-poll: the kernel's NAPI work moves to "
                         "the datapath thread only while it busy-polls")
    if opts.port_pairs < 0:
        raise UsageError(f"port-only pairs {opts.port_pairs}: must be >= 1")
    if opts.queues and opts.port_pairs:
        raise UsageError("NIC queues (--queue) and port-only pairs exclude each other: "
                         "give one of them")
    if not opts.queues and not opts.port_pairs:
        raise UsageError("which NIC queue(s)? give --queue Q (or a port-only VM's pairs)")
    privilege.require(what)
    if opts.name is not None:
        check_name(opts.name)
    mac = format_mac(vm_mac(opts.mac))
    dev = NetDevice.lookup(opts.iface)
    for q in opts.queues:
        dev.validate_queue(q)
    return dataclasses.replace(opts, mac=mac)


def prepare(opts: ServeOptions) -> tuple[ServeOptions, FrameGeometry, bool]:
    """Validate everything that can be checked before touching the NIC
    (returns the validated options), probe zero-copy."""
    from xdpnet.datapath.xsk import probe_zerocopy

    opts = validate(opts)
    geometry = FrameGeometry(max_frame=opts.max_frame)
    zc = bool(opts.queues) and all(probe_zerocopy(opts.iface, q) for q in opts.queues)
    if opts.queues and not zc:
        print(f"xdpnet: {opts.iface} does not support zero-copy AF_XDP: using copy mode "
              f"(the kernel copies each frame into guest memory; no userspace copy)",
              file=sys.stderr)
    return opts, geometry, zc


def run(opts: ServeOptions, ready: threading.Event | None = None,
        stop: threading.Event | None = None) -> int:
    """Serve until SIGINT/SIGTERM (or ``stop``); returns the exit status."""
    from xdpnet.attachment import Attachment

    opts, geometry, zc = prepare(opts)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        # From here on a signal stops serving cleanly, even during set-up.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: stop.set())
    with contextlib.ExitStack() as stack:
        reg = rec = None
        if opts.name is not None:
            reg, rec = _claim(opts)
            stack.callback(_unregister, reg, rec)
        att = stack.enter_context(
            Attachment(opts.iface, opts.mac, opts.socket, queues=opts.queues,
                       port_pairs=opts.port_pairs, geometry=geometry,
                       xdp_mode=opts.xdp_mode, zerocopy=zc, socket_group=opts.socket_group,
                       stop_event=stop, counters_dir=rec.counters_dir if rec else None,
                       busy_poll_us=opts.busy_poll_us, napi_budget=opts.napi_budget))
        privilege.drop_after_setup()    # issue 7.5: least privilege from here on
        xsk_mode = "zero-copy" if att.zerocopy else "copy"
        if reg is not None and rec is not None:
            reg.update(rec, state="running", vm_id=att.vm_id,
                       xdp_mode=att.steering.xdp_mode, xsk_mode=xsk_mode,
                       xdp_prog_id=att.steering.prog_ids()["nic"])
        print("QEMU options for this VM:\n  " + " ".join(qemu_args(opts)), flush=True)
        log.info("serving %s queue(s) %s for %s on %s (XDP %s, AF_XDP %s)%s", opts.iface,
                 ",".join(map(str, opts.queues)) or f"port x{opts.port_pairs}",
                 opts.mac, opts.socket, att.steering.xdp_mode, xsk_mode,
                 f" as VM {opts.name!r}" if opts.name else "")
        watcher = threading.Thread(target=_watch_broken, args=(att.backend, att.stop_event),
                                   daemon=True)
        watcher.start()
        if ready is not None:
            ready.set()
        att.serve_forever()
        log.info("stopping%s", f" VM {opts.name!r}" if opts.name else "")
    return 0


def _claim(opts: ServeOptions) -> tuple[Registry, VmRecord]:
    """Claim the VM's name in the registry (takes over attach's placeholder)."""
    reg = Registry(opts.state_dir)
    name = opts.name
    assert name is not None
    state = reg.state_dir(name)         # counter files: others map them read-only
    os.makedirs(state, mode=0o755, exist_ok=True)
    pid = os.getpid()
    rec = VmRecord(name=name, pid=pid, pid_start=proc_start(pid), iface=opts.iface,
                   queues=list(opts.queues), port_pairs=opts.port_pairs,
                   mac=opts.mac, socket=os.path.abspath(opts.socket),
                   counters_dir=state,
                   log=reg.log_path(name) if os.path.exists(reg.log_path(name)) else None)
    return reg, reg.claim(rec, takeover_from=os.getppid())


def _unregister(reg: Registry, rec: VmRecord) -> None:
    """Remove our record (socket and counter files went with the attachment),
    and the state directory if nothing (no log) is left in it."""
    reg.remove(rec.name, rec.pid)
    with contextlib.suppress(OSError):
        os.rmdir(reg.state_dir(rec.name))


def _watch_broken(backend: NetBackend, stop: threading.Event) -> None:
    """Log each queue the datapath stopped (NEEDS_RESET) once."""
    seen: set[str] = set()
    while not stop.wait(0.2):
        for reason in backend.broken():
            if reason not in seen:
                seen.add(reason)
                log.error("guest broke the virtqueue protocol, queue stopped: %s", reason)

"""One VM attached to a NIC: steering + the backend + its vhost-user server.

The one place that puts those three together, in the order that leaves
nothing behind on failure; ``xdpnet serve``, the demo, the benchmark and
the tests all build attachments here.  Many attachments (in one process
or in one process per VM) may share a NIC: the first one loads the
steering programs, the last one to close removes them
(:mod:`xdpnet.steering.nic`).
"""

from __future__ import annotations

import contextlib
import logging
import threading

from xdpnet.backend import BackendConfig, NetBackend
from xdpnet.datapath.xsk import probe_zerocopy
from xdpnet.errors import UsageError, XdpnetError
from xdpnet.memory.umem import FrameGeometry
from xdpnet.net.linkwatch import LinkWatch
from xdpnet.steering.nic import (NicSteering, VmSteering, notify_vm_change,
                                 vm_change_generation, wait_vm_change)
from xdpnet.vhost.server import VhostUserServer

log = logging.getLogger("xdpnet.attachment")

LOCAL_MACS_PERIOD = 0.5         # seconds between polls for other processes' VMs


class Attachment:
    """Serve VM ``mac`` on ``ifname`` at ``socket_path``.

    ``queues``: the NIC queues the VM owns, one per queue pair (default
    ``(0,)``; ``()`` with ``port_pairs`` N: a port-only VM with N pairs,
    every frame through its port).  ``steering`` may be an already open
    :class:`NicSteering` of ``ifname`` (not closed on close); otherwise one
    is opened (or joined) in ``xdp_mode`` and owned.  ``vm_id`` None takes
    the NIC's lowest free id.  ``zerocopy`` None probes the NIC queues.
    Use as a context manager; the server runs on a background thread after
    :meth:`start`, or in the caller's thread with :meth:`serve_forever`.
    """

    def __init__(self, ifname: str, mac: str, socket_path: str, *,
                 queues: tuple[int, ...] | None = None,
                 geometry: FrameGeometry = FrameGeometry(),
                 xdp_mode: str = "auto", zerocopy: bool | None = None,
                 steering: NicSteering | None = None, socket_group: str | None = None,
                 vm_id: int | None = None, stop_event: threading.Event | None = None,
                 port_pairs: int = 0, counters_dir: str | None = None,
                 busy_poll_us: int = 0, napi_budget: int = 0):
        if queues is None:
            queues = () if port_pairs else (0,)
        queues = tuple(queues)
        if queues and port_pairs:
            raise UsageError("give NIC queues or port-only pairs, not both")
        pairs = len(queues) or port_pairs
        if pairs < 1:
            raise UsageError("a VM needs at least one queue pair (NIC queues or port pairs)")
        self.stop_event = stop_event or threading.Event()
        self._thread: threading.Thread | None = None
        self._refresher: threading.Thread | None = None
        self._refresh_stop = threading.Event()
        with contextlib.ExitStack() as stack:
            if steering is None:
                steering = stack.enter_context(NicSteering(ifname, mode=xdp_mode))
            elif steering.ifname != ifname:
                raise UsageError(f"steering handle is for {steering.ifname!r}, not {ifname!r}")
            vm = steering.add_vm(mac, geometry.max_frame, queues, pairs, vm_id)
            stack.callback(vm.remove)
            if zerocopy is None:
                zerocopy = bool(queues) and all(probe_zerocopy(ifname, q) for q in queues)
            config = BackendConfig(ifname, queues, zerocopy, geometry,
                                   port_ifname=vm.port_ifname, vm_mac=vm.mac_u64,
                                   port_pairs=port_pairs, counters_dir=counters_dir,
                                   busy_poll_us=busy_poll_us, napi_budget=napi_budget)
            self.backend = NetBackend(config, vm)
            stack.callback(self.backend.close)
            self.server = VhostUserServer(socket_path, self.backend, group=socket_group)
            self._cleanup = stack.pop_all()
        self.steering = steering
        self.vm: VmSteering = vm
        self.zerocopy = zerocopy
        self._start_refresher()
        self.linkwatch: LinkWatch | None = None
        try:                                    # a log line when the NIC goes down/up/away
            self.linkwatch = LinkWatch(ifname, what=f"VM {mac}").start()
        except OSError as e:
            log.debug("not watching the link state of %s: %s", ifname, e)

    @property
    def socket_path(self) -> str:
        return self.server.path

    @property
    def vm_id(self) -> int:
        return self.vm.vm_id

    # -- the local-MAC tables of the queue pairs ---------------------------------

    def local_macs(self) -> list[int]:
        """MACs of the other VMs on the NIC (u64, see NicSteering.local_macs)."""
        own = self.vm.mac_u64
        return [m for m in self.steering.local_macs() if m != own]

    def _start_refresher(self) -> None:
        self._refresher = threading.Thread(target=self._refresh_loop,
                                           name="xdpnet-local-macs", daemon=True)
        self._refresher.start()

    def _refresh_loop(self) -> None:
        """Keep the backend's table of local MACs (tx frames to them leave
        on the port socket) equal to the NIC's VMs minus this one: at once
        after a VM change in this process, within LOCAL_MACS_PERIOD after
        one in another process."""
        applied: list[int] | None = None
        gen = vm_change_generation()
        while not self._refresh_stop.is_set():
            try:
                macs = self.local_macs()
                if macs != applied:
                    self.backend.set_local_macs(macs)
                    applied = macs
            except XdpnetError as e:            # the NIC went away under us
                log.debug("local MACs not refreshed: %s", e)
            except Exception:                   # noqa: BLE001 - keep the thread alive
                log.exception("local MACs not refreshed")
            gen = wait_vm_change(gen, LOCAL_MACS_PERIOD)

    # -- serving -------------------------------------------------------------------

    def start(self) -> "Attachment":
        """Serve frontends on a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="xdpnet-vhost",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve frontends until :meth:`close` (or ``stop_event``)."""
        self.server.serve_forever(self.stop_event)

    def counters(self, pair: int = 0) -> dict[str, int]:
        """A snapshot of queue pair ``pair``'s datapath counters."""
        return self.backend.counters[pair].snapshot()

    def close(self) -> None:
        """Stop serving, release the VM's sockets and memory, remove the VM
        from the NIC (the last VM removes the steering programs)."""
        self.stop_event.set()
        self._refresh_stop.set()
        notify_vm_change()                      # wakes the refresher
        if self._refresher is not None:
            self._refresher.join(5)
            self._refresher = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.server.close()
        if self.linkwatch is not None:
            self.linkwatch.close()
            self.linkwatch = None
        self._cleanup.close()

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

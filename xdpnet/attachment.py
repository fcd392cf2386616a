"""One VM attached to a NIC: XDP steering + the backend + its vhost-user server.

The one place that puts those three together, in the order that leaves
nothing behind on failure; ``xdpnet serve``, the demo, the benchmark and
the tests all build attachments here.
"""

from __future__ import annotations

import contextlib
import threading

from xdpnet.backend import BackendConfig, NetBackend
from xdpnet.datapath.xsk import probe_zerocopy
from xdpnet.memory.umem import FrameGeometry
from xdpnet.steering.xdp import MacSteering
from xdpnet.vhost.server import VhostUserServer


class Attachment:
    """Serve VM ``mac`` on ``ifname`` queue(s) ``queues`` at ``socket_path``.

    ``steering`` may be an already attached :class:`MacSteering` (not
    detached on close); otherwise one is attached in ``xdp_mode`` and owned.
    ``zerocopy`` None probes the NIC.  Use as a context manager; the
    server runs on a background thread after :meth:`start`, or in the
    caller's thread with :meth:`serve_forever`.
    """

    def __init__(self, ifname: str, mac: str, socket_path: str, *,
                 queues: tuple[int, ...] = (0,), geometry: FrameGeometry = FrameGeometry(),
                 xdp_mode: str = "auto", zerocopy: bool | None = None,
                 steering: MacSteering | None = None, socket_group: str | None = None,
                 vm_id: int = 0, stop_event: threading.Event | None = None):
        self.stop_event = stop_event or threading.Event()
        self._thread: threading.Thread | None = None
        with contextlib.ExitStack() as stack:
            if steering is None:
                steering = stack.enter_context(MacSteering(ifname, mode=xdp_mode))
            steering.add_vm(vm_id, mac, geometry.max_frame)
            if zerocopy is None:
                zerocopy = all(probe_zerocopy(ifname, q) for q in queues)
            self.backend = NetBackend(BackendConfig(ifname, queues, zerocopy, geometry), steering)
            stack.callback(self.backend.close)
            self.server = VhostUserServer(socket_path, self.backend, group=socket_group)
            self._cleanup = stack.pop_all()
        self.steering = steering
        self.zerocopy = zerocopy

    @property
    def socket_path(self) -> str:
        return self.server.path

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
        """Stop serving, release the VM's sockets and memory, detach what we attached."""
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.server.close()
        self._cleanup.close()

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

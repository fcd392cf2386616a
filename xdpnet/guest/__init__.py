"""The virtio-net driver simulator ("the guest"): a vhost-user frontend.

:class:`VirtioNetSimulator` plays QEMU and a guest's virtio-net driver to
test and benchmark a vhost-user backend; per-frame work is in ``c/guest.c``.
"""

from xdpnet.guest.frontend import (BackendClosed, BackendRefused, FrontendError,
                                   ProtocolViolation, VhostUserFrontend)
from xdpnet.guest.simulator import (DEFAULT_FEATURES, GuestConfig, GuestMemory, GuestStats,
                                    Negotiation, RunResult, VirtioNetSimulator, VringInfo)

__all__ = [
    "BackendClosed", "BackendRefused", "FrontendError", "ProtocolViolation", "VhostUserFrontend",
    "DEFAULT_FEATURES", "GuestConfig", "GuestMemory", "GuestStats", "Negotiation", "RunResult",
    "VirtioNetSimulator", "VringInfo",
]

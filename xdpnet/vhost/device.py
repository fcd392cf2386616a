"""The narrow interface between the vhost-user server and the device.

:mod:`xdpnet.vhost.server` speaks the protocol (socket, validation,
replies, ring state machine); a :class:`VhostUserDevice` does the work
(memory, datapath).  The server calls the device only with validated
values, only from the thread that runs the server, and one call at a
time.  This mirrors rust-vmm's ``vhost-user-backend`` split.

File descriptors handed to the device belong to the server: the server
closes them when they are replaced, on reset and on disconnect.  A
device that needs an fd after the call returns ``os.dup()``\\ s it (or
mmaps it, for memory regions).

A device signals a refusal by raising :class:`~xdpnet.errors.VhostError`
(one-line message; ``fatal=True`` makes the server close the
connection after the error reply).  Any other exception is treated as a
device bug: logged and fatal to the connection, never to the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from xdpnet.vhost.protocol import MemRegion


@dataclass
class VringState:
    """One virtqueue as configured by the frontend.

    The server owns the instance it keeps; devices receive a copy in
    :meth:`VhostUserDevice.start_vring` (a snapshot: later changes are
    told through the other methods).
    """

    index: int
    num: int = 0
    desc_addr: int = 0       # frontend user addresses from SET_VRING_ADDR
    used_addr: int = 0
    avail_addr: int = 0
    log_addr: int = 0
    addr_flags: int = 0
    base: int = 0            # last_avail_idx from SET_VRING_BASE
    kick_fd: int | None = None   # owned by the server; the device dup()s what it keeps
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False


@runtime_checkable
class VhostUserDevice(Protocol):
    """What the vhost-user server needs from a device (see module docstring)."""

    def device_features(self) -> int:
        """Virtio feature bits offered, including PROTOCOL_FEATURES (bit 30) and VERSION_1 (bit 32).

        Called once when a frontend connects; the answer is what
        GET_FEATURES returns for that connection (minus LOG_ALL, which
        the server masks out: it implements no dirty-page logging).
        """
        ...

    def protocol_features(self) -> int:
        """vhost-user protocol feature bits offered.

        Called once when a frontend connects.  The server offers only
        the intersection with what it implements itself (MQ, REPLY_ACK,
        RESET_DEVICE); PAGEFAULT is never offered.
        """
        ...

    def max_queue_pairs(self) -> int:
        """Number of queue pairs (rx+tx virtqueues) the device serves; GET_QUEUE_NUM's answer.

        Called once when a frontend connects; vring indexes are checked
        against ``2 * max_queue_pairs()`` (capped at 128 pairs: the
        kick/call payload has 8 bits of index).
        """
        ...

    def set_features(self, features: int) -> None:
        """SET_FEATURES: the negotiated virtio features (a subset of the offer, with VERSION_1).

        Called after the server checked the bits; may be called again
        later on the same connection (also while rings run).  May raise
        VhostError to refuse.
        """
        ...

    def set_protocol_features(self, features: int) -> None:
        """SET_PROTOCOL_FEATURES: the negotiated protocol features (a subset of the offer).

        Called once per connection in practice.  Protocol features are
        connection state: they stay in force across :meth:`reset` for
        RESET_OWNER/RESET_DEVICE (the frontend does not negotiate them
        again); a new connection negotiates again.
        """
        ...

    def set_mem_table(self, regions: list[MemRegion], fds: list[int]) -> None:
        """SET_MEM_TABLE: the guest memory map, one fd per region in the same order.

        ``regions`` has 1..8 entries with non-zero sizes that do not
        wrap 64-bit addresses; everything else (overlaps, alignment,
        mapping) is the device's to check.  May arrive while rings run
        (memory hotplug).  The fds are owned by the server and closed
        right after this call returns: the device ``dup()``\\ s or mmaps
        them.  May raise MemoryTableError (fatal) or VhostError.
        """
        ...

    def start_vring(self, vring: VringState) -> None:
        """SET_VRING_KICK: ring ``vring.index`` starts (a copy of its state is passed).

        Called when a kick arrives for a stopped ring after SET_FEATURES,
        SET_VRING_NUM and SET_VRING_ADDR.  ``vring.enabled`` tells
        whether the ring may be processed normally (rx supplied) or
        only drained without side effects.  ``kick_fd`` is None when the
        frontend asked for polling (bit 8).  If a second kick arrives on
        a started ring the server calls :meth:`stop_vring` first, so the
        device sees stop/start with the new fd.  May raise VhostError:
        the ring then stays stopped.
        """
        ...

    def enable_vring(self, index: int, enabled: bool) -> None:
        """SET_VRING_ENABLE on a started ring (or SET_FEATURES without PROTOCOL_FEATURES enabling it).

        For stopped rings the server only records the state; it is
        passed in ``VringState.enabled`` at :meth:`start_vring`.
        """
        ...

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """SET_VRING_CALL on a started ring: signal used buffers on ``fd`` from now on.

        QEMU does this on MSI-X mask/unmask.  ``fd`` None means the
        frontend polls (no interrupts).  The previous call fd is closed
        by the server after this returns.  For stopped rings the fd is
        only recorded and passed in :meth:`start_vring`.
        """
        ...

    def stop_vring(self, index: int) -> int:
        """GET_VRING_BASE on a started ring: stop it and return its last_avail_idx.

        For a split ring the value is 16 bits; for a packed ring the
        32-bit encoding of the spec (avail idx + wrap, used idx + wrap).
        Also called before a started ring is restarted by a second
        SET_VRING_KICK.  The server treats the ring as stopped even if
        this raises.  Not called for rings that are not started (the
        server answers with the base the frontend set).
        """
        ...

    def reset(self) -> None:
        """RESET_OWNER, RESET_DEVICE, or frontend disconnect: stop every ring, release memory.

        Afterwards the device must hold no fd or mapping from the
        connection.  Called on every disconnect, even one that never
        configured anything.  Must not raise (errors are logged).
        """
        ...

"""vhost-user frontend: the QEMU side of the control socket.

:class:`VhostUserFrontend` connects to a backend's UNIX socket and sends
requests the way QEMU does (``docs/interop/vhost-user.rst``): the 12-byte
header, the payload, and file descriptors as ``SCM_RIGHTS`` ancillary data
on the same ``sendmsg()``.  Replies are read for the requests that have
one; with ``VHOST_USER_PROTOCOL_F_REPLY_ACK`` negotiated, any other request
may carry ``NEED_REPLY`` and then gets a ``u64`` acknowledgement (0 =
success).  A non-zero acknowledgement raises :class:`BackendRefused`; an
EOF raises :class:`BackendClosed`.

The wire format comes from :mod:`xdpnet.vhost.protocol`; this module only
does the I/O.  Nothing here knows about virtqueues or guest memory: that is
:mod:`xdpnet.guest.simulator`.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import time
from collections.abc import Sequence

from xdpnet.errors import VhostError
from xdpnet.vhost import protocol as P

log = logging.getLogger(__name__)

# Requests the backend always answers with a payload of its own.
REQUESTS_WITH_REPLY = frozenset({
    P.Request.GET_FEATURES,
    P.Request.GET_PROTOCOL_FEATURES,
    P.Request.GET_VRING_BASE,
    P.Request.GET_QUEUE_NUM,
    P.Request.GET_CONFIG,
    P.Request.GET_INFLIGHT_FD,
    P.Request.GET_MAX_MEM_SLOTS,
    P.Request.GET_STATUS,
    P.Request.GET_SHARED_OBJECT,
    P.Request.POSTCOPY_ADVISE,
    P.Request.SET_DEVICE_STATE_FD,
    P.Request.CHECK_DEVICE_STATE,
})


class FrontendError(VhostError):
    """The frontend's conversation with the backend failed."""


class BackendClosed(FrontendError):
    """The backend closed the connection (or it was never open)."""


class BackendRefused(FrontendError):
    """The backend answered a ``NEED_REPLY`` request with a non-zero status."""

    def __init__(self, request: int, status: int):
        super().__init__(f"vhost-user backend refused {P.request_name(request)}: "
                         f"reply status {status:#x}")
        self.request = int(request)
        self.status = status


class ProtocolViolation(FrontendError):
    """The backend sent a reply that does not match the request."""


class VhostUserFrontend:
    """One vhost-user connection, frontend side.

    ``reply_ack`` says whether REPLY_ACK has been negotiated; when it is
    true :meth:`send` adds ``NEED_REPLY`` to every request without a
    reply of its own (callers may also force it per request).
    """

    def __init__(self, sock: socket.socket, path: str, timeout: float = 5.0):
        self.sock = sock
        self.path = path
        self.timeout = timeout
        self.reply_ack = False
        self.reply_fds: list[int] = []      # fds received with replies, not yet claimed
        sock.settimeout(timeout)

    @classmethod
    def connect(cls, path: str, timeout: float = 5.0) -> VhostUserFrontend:
        """Connect to the backend listening on ``path``, retrying until
        ``timeout`` seconds have passed (the backend may still be starting).

        Raises :class:`BackendClosed` if it never accepts.
        """
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                log.debug("connected to %s", path)
                return cls(sock, path, timeout)
            except OSError as e:
                sock.close()
                last = e
                if e.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                    raise BackendClosed(f"cannot connect to vhost-user socket {path}: {e}") from e
            if time.monotonic() >= deadline:
                raise BackendClosed(f"no vhost-user backend on {path} after {timeout:.1f}s: {last}")
            time.sleep(0.02)

    def close(self) -> None:
        """Close the socket and any unclaimed received fds (idempotent)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        while self.reply_fds:
            os.close(self.reply_fds.pop())

    # --- raw I/O -----------------------------------------------------

    def _send(self, request: int, payload: bytes, fds: Sequence[int], flags: int) -> None:
        if self.sock is None:
            raise BackendClosed("vhost-user connection is closed")
        msg = P.pack_message(request, payload, flags)
        anc = []
        if fds:
            if len(fds) > P.MAX_FDS:
                raise ValueError(f"{len(fds)} fds in one message (at most {P.MAX_FDS})")
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        log.debug("-> %s flags=%#x size=%d fds=%s payload=%s", P.request_name(request),
                  P.VERSION | flags, len(payload), list(fds), payload[:80].hex())
        try:
            sent = self.sock.sendmsg([msg], anc)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise BackendClosed(f"backend closed the connection before {P.request_name(request)}: {e}") from e
        if sent != len(msg):
            raise FrontendError(f"short send of {P.request_name(request)}: {sent}/{len(msg)} bytes")

    def _recv_exact(self, n: int, what: str) -> bytes:
        """Read exactly ``n`` bytes; file descriptors that come with them
        (SCM_RIGHTS) are appended to :attr:`reply_fds`, owned by the caller."""
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk, anc, _, _ = self.sock.recvmsg(n - len(buf), P.ANCILLARY_SIZE)
                self.reply_fds.extend(P.fds_from_ancdata(anc))
            except socket.timeout as e:
                raise FrontendError(f"no reply to {what} within {self.timeout:.1f}s") from e
            except ConnectionResetError as e:
                raise BackendClosed(f"backend reset the connection while we waited for {what}") from e
            if not chunk:
                raise BackendClosed(f"backend closed the connection while we waited for {what}")
            buf += chunk
        return bytes(buf)

    def _recv_reply(self, request: int) -> bytes:
        """Read one reply to ``request`` and return its payload."""
        name = P.request_name(request)
        hdr = P.unpack_header(self._recv_exact(P.HEADER_SIZE, f"the reply to {name}"))
        if hdr.request != int(request) or not hdr.is_reply or hdr.version != P.VERSION:
            raise ProtocolViolation(f"reply to {name} has request {P.request_name(hdr.request)} "
                                    f"flags {hdr.flags:#x}")
        if hdr.size > P.MAX_PAYLOAD:
            raise ProtocolViolation(f"reply to {name} claims {hdr.size} payload bytes")
        payload = self._recv_exact(hdr.size, f"the payload of the reply to {name}") if hdr.size else b""
        log.debug("<- %s flags=%#x size=%d payload=%s", name, hdr.flags, hdr.size, payload[:80].hex())
        return payload

    # --- requests ----------------------------------------------------

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
             need_reply: bool | None = None) -> bytes | None:
        """Send one request and read what the protocol says comes back.

        ``need_reply`` None means "if REPLY_ACK is negotiated"; it is ignored
        for requests that always have a reply.  Returns the reply payload
        for requests with one, ``None`` otherwise.  Raises
        :class:`BackendRefused` for a non-zero acknowledgement,
        :class:`BackendClosed` if the backend hung up.
        """
        has_reply = request in REQUESTS_WITH_REPLY
        if need_reply is None:
            need_reply = self.reply_ack and not has_reply
        flags = P.FLAG_NEED_REPLY if need_reply else 0
        self._send(request, payload, fds, flags)
        if has_reply:
            return self._recv_reply(request)
        if need_reply:
            ack = self._recv_reply(request)
            if len(ack) != P.U64.size:
                raise ProtocolViolation(f"acknowledgement of {P.request_name(request)} is "
                                        f"{len(ack)} bytes, expected 8")
            status = P.U64.unpack(ack)[0]
            if status:
                raise BackendRefused(request, status)
        return None

    def get_u64(self, request: int) -> int:
        """A request whose reply is a ``u64`` (GET_FEATURES, ...)."""
        payload = self.send(request)
        if payload is None or len(payload) != P.U64.size:
            raise ProtocolViolation(f"reply to {P.request_name(request)} is not a u64")
        return P.U64.unpack(payload)[0]

    def set_u64(self, request: int, value: int, fds: Sequence[int] = ()) -> None:
        """A request with a ``u64`` payload (SET_FEATURES, SET_VRING_KICK, ...)."""
        self.send(request, P.U64.pack(value), fds)

    def set_vring_state(self, request: int, index: int, num: int) -> None:
        """SET_VRING_NUM / SET_VRING_BASE / SET_VRING_ENABLE."""
        self.send(request, P.VRING_STATE.pack(index, num))

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stop ring ``index`` and return its next avail index."""
        payload = self.send(P.Request.GET_VRING_BASE, P.VRING_STATE.pack(index, 0))
        if payload is None or len(payload) != P.VRING_STATE.size:
            raise ProtocolViolation("reply to GET_VRING_BASE is not a vring state")
        got, num = P.VRING_STATE.unpack(payload)
        if got != index:
            raise ProtocolViolation(f"GET_VRING_BASE for ring {index} answered for ring {got}")
        return num

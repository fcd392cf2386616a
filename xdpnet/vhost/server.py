"""vhost-user server: the backend side of QEMU's vhost-user protocol.

Listens on a unix stream socket (server mode), serves one frontend at a
time, and turns validated requests into calls on a
:class:`~xdpnet.vhost.device.VhostUserDevice`.  It knows nothing of
AF_XDP or guest memory layout.

Two layers:

* :class:`VhostUserSession` - one connected frontend: reads messages
  (header, payload, SCM_RIGHTS fds), validates them, runs the handler
  from the request table, replies.  Usable on its own over a
  ``socket.socketpair()`` (``handle_one()`` is one non-blocking step).
* :class:`VhostUserServer` - the listening socket (busy/stale handling,
  file mode, group), accepting frontends one at a time, and an epoll
  fd (``fileno()``) that becomes readable whenever ``handle_one()`` has
  work, so the server can run in a background thread
  (``serve_forever``) or inside someone else's poll loop.

Replies (QEMU docs/interop/vhost-user.rst, "Communication" and REPLY_ACK):

* requests with a natural reply (GET_FEATURES, GET_PROTOCOL_FEATURES,
  GET_QUEUE_NUM, GET_VRING_BASE, and the known ones we do not implement
  but whose frontend would block waiting: GET_CONFIG, POSTCOPY_ADVISE,
  ...) always get exactly one reply of the right shape - an
  error-shaped one when the request failed;
* any other request gets a u64 (0 success, 1 failure) only when
  REPLY_ACK was negotiated and the message has NEED_REPLY.

A frontend is hostile until proven otherwise: every size, index, fd
count and flag is checked; a failure is one log line and an error reply
(if one is expected), never an exception out of the loop.  Only a
message that cannot be framed (size > MAX_PAYLOAD, truncated stream), a
legacy (non-VERSION_1) frontend, or a fatal device error closes the
connection.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from xdpnet.errors import BusyError, PrivilegeError, UsageError, VhostError
from xdpnet.vhost.device import VhostUserDevice, VringState
from xdpnet.vhost.protocol import (
    ANCILLARY_SIZE,
    fds_from_ancdata,
    HEADER_SIZE, INFLIGHT_C_SIZE, MAX_FDS, MAX_MEM_REGIONS, MAX_PAYLOAD, MAX_QUEUE_SIZE,
    MEM_REGION, MEM_TABLE_HEAD, MEM_TABLE_MAX_SIZE, PROTOCOL_FEATURES_BIT, U64, VERSION,
    VERSION_1_BIT, VRING_ADDR, VRING_F_LOG, VRING_STATE, Header, ProtocolFeature, Request,
    VirtioFeature, bit, feature_names, flag_names, pack_reply, pack_u64, request_name,
    unpack_header, unpack_mem_table, unpack_u64, unpack_vring_addr, unpack_vring_file,
    unpack_vring_state,
)

log = logging.getLogger("xdpnet.vhost")

# Protocol features this server implements.  The device's offer is
# intersected with this: offering e.g. LOG_SHMFD or CONFIG without the
# handlers would make QEMU send requests we then refuse.  PAGEFAULT
# (postcopy) is deliberately absent: see _UNSUPPORTED_REASON.
SERVER_PROTOCOL_FEATURES = (bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK)
                            | bit(ProtocolFeature.RESET_DEVICE))
# Never offered: the server has no dirty-page log (SET_LOG_BASE is refused),
# and offering LOG_ALL would make QEMU believe live migration works.
# Without it QEMU installs a migration blocker instead.
MASKED_VIRTIO_FEATURES = bit(VirtioFeature.LOG_ALL)
# The kick/call/err payload carries the vring index in 8 bits.
MAX_QUEUE_PAIRS = 128
SEND_TIMEOUT = 5.0              # seconds a reply may wait for room in the socket
LISTEN_BACKLOG = 4
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

_UNSUPPORTED_REASON: dict[int, str] = {
    Request.POSTCOPY_ADVISE: "postcopy migration is not supported: guest RAM is pinned for "
                             "zero-copy I/O, pages filled in later by postcopy would silently "
                             "lose frames",
    Request.POSTCOPY_LISTEN: "postcopy migration is not supported: guest RAM is pinned for "
                             "zero-copy I/O, pages filled in later by postcopy would silently "
                             "lose frames",
    Request.POSTCOPY_END: "postcopy migration is not supported",
    Request.SET_LOG_BASE: "dirty-page logging (live migration) is not supported",
    Request.SET_LOG_FD: "dirty-page logging (live migration) is not supported",
    Request.RESET_DEVICE: "RESET_DEVICE was not offered (protocol feature RESET_DEVICE)",
}


# --- errors inside the session --------------------------------------------

class _Reject(Exception):
    """A request fails validation; ``str()`` is the one-line reason."""

    def __init__(self, reason: str, fatal: bool = False):
        super().__init__(reason)
        self.fatal = fatal


class _Closed(Exception):
    """The connection cannot continue (EOF, reset, unframeable input)."""

    def __init__(self, reason: str, level: int = logging.ERROR):
        super().__init__(reason)
        self.level = level


@dataclass
class Message:
    """One received request: header, payload and the fds that came with it."""

    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)
    fds_truncated: bool = False     # MSG_CTRUNC: more fds were sent than we accept


@dataclass(frozen=True)
class _Handler:
    """One row of the request table."""

    request: Request
    fn: Callable[["VhostUserSession", Message], bytes | None]
    payload_size: int | None        # exact payload size, or None when the handler checks it
    fds: int | None = 0             # exact fd count, or None when the handler checks it
    # The error-shaped natural reply, for requests the frontend waits a reply
    # for; None for requests that only get a REPLY_ACK u64.
    error_reply: Callable[["VhostUserSession", Message], bytes] | None = None
    # Handled only if the session offers this protocol feature.
    needs_offer: ProtocolFeature | None = None

    @property
    def name(self) -> str:
        return self.request.name


def _close_fds(fds: list[int]) -> None:
    """Close every fd in ``fds`` (ignoring errors) and empty the list."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _close_fd(fd: int | None) -> None:
    """Close ``fd`` if it is not None."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _is_notifier_fd(fd: int) -> bool:
    """True if ``fd`` is an eventfd or a pipe (what kick/call/err may be, per the spec)."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            return True
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def _peer_label(sock: socket.socket) -> str:
    """``pid N uid U`` of the process at the other end, for logs."""
    try:
        pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                       _PEERCRED.size))
        return f"pid {pid} uid {uid}"
    except OSError:
        return "unknown peer"


# --- one frontend ---------------------------------------------------------

class VhostUserSession:
    """One connected frontend: message framing, validation, handlers, replies.

    ``sock`` is a connected unix stream socket; the session owns it (and
    makes it non-blocking).  ``handle_one()`` performs one step; the
    session closes itself (calling ``device.reset()``) when the
    frontend goes away or must be dropped.
    """

    def __init__(self, sock: socket.socket, device: VhostUserDevice, *, label: str = "",
                 on_close: Callable[["VhostUserSession"], None] | None = None):
        self._sock = sock
        self._sock.setblocking(False)
        self._device = device
        self._on_close = on_close
        self.label = label or _peer_label(sock)
        self._closed = False
        # receive state: a message is assembled over possibly several reads
        self._rx_header: Header | None = None
        self._rx_buf = bytearray()
        self._rx_fds: list[int] = []
        self._rx_fds_truncated = False
        # what this connection offers (asked once: the offer must not change
        # under a frontend that already read it)
        self.offered_features = int(device.device_features()) & ~MASKED_VIRTIO_FEATURES
        proto = int(device.protocol_features())
        if proto & ~SERVER_PROTOCOL_FEATURES:
            log.debug("device protocol features not implemented by the server, not offered: %s",
                      " ".join(feature_names(proto & ~SERVER_PROTOCOL_FEATURES, ProtocolFeature)))
        self.offered_protocol_features = proto & SERVER_PROTOCOL_FEATURES
        qp = int(device.max_queue_pairs())
        if not 1 <= qp <= MAX_QUEUE_PAIRS:
            log.warning("device reports %d queue pairs; using %d", qp,
                        min(max(qp, 1), MAX_QUEUE_PAIRS))
            qp = min(max(qp, 1), MAX_QUEUE_PAIRS)
        self.max_queue_pairs = qp
        # negotiated state
        self.acked_features = 0
        self.features_set = False
        self.acked_protocol_features = 0
        self.protocol_features_set = False
        self.owner = False
        self.mem_table_set = False
        self._vrings = [VringState(i) for i in range(2 * qp)]
        self._addr_set: set[int] = set()
        self._warned: set[int] = set()
        log.info("vhost-user frontend connected (%s)", self.label)

    # -- public ----------------------------------------------------------

    def fileno(self) -> int:
        """The connection socket's fd (-1 once closed)."""
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        """True once the session has ended."""
        return self._closed

    @property
    def vrings(self) -> tuple[VringState, ...]:
        """The server's view of every vring (read-only: do not mutate)."""
        return tuple(self._vrings)

    @property
    def reply_ack(self) -> bool:
        """True if REPLY_ACK was negotiated."""
        return bool(self.acked_protocol_features & bit(ProtocolFeature.REPLY_ACK))

    @property
    def protocol_features_on(self) -> bool:
        """True if VHOST_USER_F_PROTOCOL_FEATURES is in force.

        Once SET_FEATURES has been received its bit 30 decides; before
        that, a successful SET_PROTOCOL_FEATURES counts (QEMU sends
        SET_VRING_ENABLE before its first SET_FEATURES).
        """
        if self.features_set:
            return bool(self.acked_features & PROTOCOL_FEATURES_BIT)
        return self.protocol_features_set

    def peer_gone(self) -> bool:
        """True if the frontend has shut down its end (EOF is pending behind any data)."""
        if self._closed:
            return True
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLRDHUP)
        return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
                   for _, ev in poller.poll(0))

    def handle_one(self, timeout: float | None = 0.0) -> bool:
        """Read what the frontend sent and handle at most one complete message.

        Waits up to ``timeout`` seconds (None: forever) for data first.
        Returns False once the session is closed (now or before), True
        otherwise.  Never raises.
        """
        if self._closed:
            return False
        try:
            if timeout != 0:
                poller = select.poll()
                poller.register(self._sock.fileno(), select.POLLIN)
                if not poller.poll(None if timeout is None else int(timeout * 1000)):
                    return True
            msg = self._read_message()
            if msg is None:
                return True
            if self._dispatch(msg):
                return True
            self.close()
            return False
        except _Closed as e:
            log.log(e.level, "vhost-user frontend (%s): %s; closing the connection", self.label, e)
        except Exception as e:          # a bug must not take the server down
            log.error("vhost-user session (%s): internal error %s: %s; closing the connection",
                      self.label, type(e).__name__, e)
            log.debug("traceback", exc_info=True)
        self.close()
        return False

    def close(self) -> None:
        """End the session: reset the device, release every fd, close the socket.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._on_close is not None:
            try:
                self._on_close(self)
            except Exception:
                log.debug("on_close callback failed", exc_info=True)
        try:
            self._device.reset()
        except Exception as e:
            log.error("device reset after disconnect failed: %s: %s", type(e).__name__, e)
        self._release_vrings()
        _close_fds(self._rx_fds)
        self._rx_buf.clear()
        self._rx_header = None
        try:
            self._sock.close()
        except OSError:
            pass
        log.info("vhost-user frontend disconnected (%s)", self.label)

    # -- receiving -------------------------------------------------------

    def _read_message(self) -> Message | None:
        """Read available bytes; return a complete message, or None if more are needed.

        Reads exactly the header, then exactly ``size`` payload bytes,
        never past the message, so whatever follows stays in the
        socket (and keeps it readable for the poll loop).  Fds are
        collected from every read of the message.  Raises _Closed on
        EOF, reset, or a size that cannot be trusted.
        """
        while True:
            if self._rx_header is None:
                need = HEADER_SIZE - len(self._rx_buf)
                if need == 0:
                    self._rx_header = unpack_header(bytes(self._rx_buf))
                    self._rx_buf.clear()
                    if self._rx_header.size > MAX_PAYLOAD:
                        # We cannot skip an arbitrary amount safely, nor trust
                        # the rest of the stream: drop the connection.
                        size = self._rx_header.size
                        name = request_name(self._rx_header.request)
                        _close_fds(self._rx_fds)
                        raise _Closed(f"{name}: payload size {size} exceeds {MAX_PAYLOAD} bytes, "
                                      "cannot resynchronise")
                    continue
            else:
                need = self._rx_header.size - len(self._rx_buf)
                if need == 0:
                    msg = Message(self._rx_header, bytes(self._rx_buf), self._rx_fds,
                                  self._rx_fds_truncated)
                    self._rx_header = None
                    self._rx_buf = bytearray()
                    self._rx_fds = []
                    self._rx_fds_truncated = False
                    return msg
            try:
                data, anc, flags, _ = self._sock.recvmsg(need, ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError) as e:
                if isinstance(e, InterruptedError):
                    continue
                return None
            except OSError as e:
                raise _Closed(f"receive failed: {e.strerror or e}",
                              logging.INFO if e.errno == errno.ECONNRESET else logging.ERROR)
            self._rx_fds.extend(fds_from_ancdata(anc))
            if flags & socket.MSG_CTRUNC:
                self._rx_fds_truncated = True
            if not data:
                if self._rx_header is None and not self._rx_buf:
                    raise _Closed("frontend closed the connection", logging.INFO)
                if self._rx_header is None:
                    raise _Closed(f"truncated message: header is {len(self._rx_buf)} of "
                                  f"{HEADER_SIZE} bytes")
                raise _Closed(f"truncated {request_name(self._rx_header.request)} message: "
                              f"payload is {len(self._rx_buf)} of {self._rx_header.size} bytes")
            self._rx_buf += data

    # -- dispatch --------------------------------------------------------

    def _dispatch(self, msg: Message) -> bool:
        """Validate and handle ``msg``, send the reply it calls for.

        Returns False if the connection must be closed.  Closes every fd
        of the message a handler did not take over.
        """
        hdr = msg.header
        req = hdr.request
        name = request_name(req)
        handler = _HANDLERS[req] if 0 <= req < len(_HANDLERS) else None
        if handler is not None and handler.needs_offer is not None \
                and not self.offered_protocol_features & bit(handler.needs_offer):
            handler = None
        log.debug("rx %s (%d): flags=0x%x [%s] size=%d fds=%s%s", name, req, hdr.flags,
                  flag_names(hdr.flags), hdr.size, msg.fds,
                  " (more fds were dropped by the kernel)" if msg.fds_truncated else "")
        ok = False
        fatal = False
        reply: bytes | None = None
        try:
            if hdr.version != VERSION:
                raise _Reject(f"header version {hdr.version}, expected {VERSION}")
            if handler is None:
                self._warn_unhandled(req, name, msg)
            else:
                if msg.fds_truncated:
                    raise _Reject(f"more than {MAX_FDS} fds attached")
                if handler.payload_size is not None and len(msg.payload) != handler.payload_size:
                    raise _Reject(f"payload is {len(msg.payload)} bytes, "
                                  f"expected {handler.payload_size}")
                if handler.fds is not None and len(msg.fds) != handler.fds:
                    raise _Reject(f"{len(msg.fds)} fds attached, expected {handler.fds}")
                reply = handler.fn(self, msg)
                ok = True
        except _Reject as e:
            fatal = e.fatal
            log.error("%s: %s%s", name, e, "; closing the connection" if fatal else "")
        except VhostError as e:
            fatal = e.fatal
            log.error("%s: refused by the device: %s%s", name, e,
                      "; closing the connection" if fatal else "")
        except Exception as e:          # device bug: unknown device state, drop the frontend
            fatal = True
            log.error("%s: device failure %s: %s; closing the connection", name,
                      type(e).__name__, e)
            log.debug("traceback", exc_info=True)
        finally:
            _close_fds(msg.fds)

        error_reply = handler.error_reply if handler is not None else _UNHANDLED_REPLIES.get(req)
        if error_reply is not None:
            # The frontend blocks for this reply: always send one.
            payload = reply if ok and reply is not None else error_reply(self, msg)
            self._send_reply(req, payload)
        elif hdr.need_reply and self.reply_ack:
            self._send_reply(req, pack_u64(0 if ok else 1))
        return not fatal

    def _warn_unhandled(self, req: int, name: str, msg: Message) -> None:
        """Log an unimplemented request: a warning once per request number per connection."""
        log.debug("%s payload: %s", name, msg.payload[:64].hex())
        if req in self._warned:
            return
        self._warned.add(req)
        reason = _UNSUPPORTED_REASON.get(req)
        if reason is None:
            reason = "unknown request" if name.startswith("UNKNOWN") else "not supported"
        log.warning("%s (%d) refused: %s (logged once per connection)", name, req, reason)

    # -- sending ---------------------------------------------------------

    def _send_reply(self, req: int, payload: bytes) -> None:
        """Send a reply to request ``req``; raises _Closed if the frontend is gone."""
        log.debug("tx %s reply: size=%d payload=%s", request_name(req), len(payload),
                  payload.hex())
        self._send_all(pack_reply(req, payload))

    def _send_all(self, data: bytes) -> None:
        """Write all of ``data`` to the non-blocking socket, waiting up to SEND_TIMEOUT."""
        view = memoryview(data)
        deadline = time.monotonic() + SEND_TIMEOUT
        while view:
            try:
                n = self._sock.send(view, socket.MSG_NOSIGNAL)
                view = view[n:]
                continue
            except InterruptedError:
                continue
            except BlockingIOError:
                pass
            except OSError as e:
                raise _Closed(f"sending a reply failed: {e.strerror or e}", logging.INFO)
            left = deadline - time.monotonic()
            poller = select.poll()
            poller.register(self._sock.fileno(), select.POLLOUT)
            if left <= 0 or not poller.poll(int(left * 1000) + 1):
                raise _Closed("frontend does not read its replies")

    # -- helpers ---------------------------------------------------------

    def _vring(self, index: int) -> VringState:
        """The vring ``index``; _Reject if out of range."""
        if not 0 <= index < len(self._vrings):
            raise _Reject(f"vring index {index} out of range (device has {len(self._vrings)} "
                          f"vrings, {self.max_queue_pairs} queue pairs)")
        return self._vrings[index]

    def _packed(self) -> bool:
        """True if the packed ring layout was negotiated."""
        return bool(self.acked_features & bit(VirtioFeature.RING_PACKED))

    def _stop_vring(self, vr: VringState) -> None:
        """Stop a started ring in the device and record the base it reports."""
        vr.started = False              # stopped even if the device fails to say where
        value = self._device.stop_vring(vr.index)
        limit = 0xFFFF_FFFF if self._packed() else 0xFFFF
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise _Reject(f"vring {vr.index}: device returned base {value!r}", fatal=True)
        vr.base = value

    def _release_vrings(self) -> None:
        """Close every fd the vrings hold and return them to the initial state."""
        for vr in self._vrings:
            for fd in (vr.kick_fd, vr.call_fd, vr.err_fd):
                _close_fd(fd)
        self._vrings = [VringState(i) for i in range(len(self._vrings))]
        self._addr_set.clear()

    def _reset_device_state(self, keep_owner: bool) -> None:
        """RESET_OWNER/RESET_DEVICE: device reset, rings and virtio features back to initial.

        Protocol features are connection state and stay (the frontend
        does not negotiate them again).
        """
        self._device.reset()
        self._release_vrings()
        self.acked_features = 0
        self.features_set = False
        self.mem_table_set = False
        self.owner = self.owner and keep_owner

    def _file_fd(self, msg: Message, nofd: bool) -> int | None:
        """The fd a kick/call/err message carries (None with bit 8); _Reject if the count is wrong."""
        if nofd:
            if msg.fds:
                raise _Reject(f"{len(msg.fds)} fds attached but the no-fd flag (bit 8) is set")
            return None
        if len(msg.fds) != 1:
            raise _Reject(f"{len(msg.fds)} fds attached, expected 1 (no-fd flag is clear)")
        if not _is_notifier_fd(msg.fds[0]):
            raise _Reject("the fd attached is neither an eventfd nor a pipe")
        return msg.fds[0]

    @staticmethod
    def _take_fd(msg: Message, fd: int | None) -> int | None:
        """Take ownership of ``fd`` from the message (so dispatch does not close it)."""
        if fd is not None:
            msg.fds.remove(fd)
        return fd

    # -- handlers (one per request; each returns its reply payload or None) --

    def _h_get_features(self, msg: Message) -> bytes:
        log.debug("GET_FEATURES: offering 0x%x: %s", self.offered_features,
                  " ".join(feature_names(self.offered_features)))
        return pack_u64(self.offered_features)

    def _h_set_features(self, msg: Message) -> None:
        features = unpack_u64(msg.payload)
        log.debug("SET_FEATURES: u64=0x%x: %s", features, " ".join(feature_names(features)))
        if not features & VERSION_1_BIT:
            raise _Reject("legacy virtio frontend (no VERSION_1) is not supported", fatal=True)
        extra = features & ~self.offered_features
        if extra:
            raise _Reject(f"features not offered: 0x{extra:x} ({' '.join(feature_names(extra))})")
        self._device.set_features(features)
        self.acked_features = features
        self.features_set = True
        log.debug("negotiated virtio features 0x%x: %s", features,
                  " ".join(feature_names(features)))
        if not features & PROTOCOL_FEATURES_BIT:
            # Spec: without PROTOCOL_FEATURES the back-end must enable all rings at once.
            for vr in self._vrings:
                if vr.started and not vr.enabled:
                    self._device.enable_vring(vr.index, True)
                vr.enabled = True
        return None

    def _h_set_owner(self, msg: Message) -> None:
        log.debug("SET_OWNER%s", " (again)" if self.owner else "")
        self.owner = True
        return None

    def _h_reset_owner(self, msg: Message) -> None:
        # Deprecated; the spec allows "disable all rings".  We reset the
        # device (rings and memory) but keep the connection's protocol features.
        log.debug("RESET_OWNER: resetting the device")
        self._reset_device_state(keep_owner=False)
        return None

    def _h_reset_device(self, msg: Message) -> None:
        log.debug("RESET_DEVICE: resetting the device")
        self._reset_device_state(keep_owner=True)
        return None

    def _h_set_mem_table(self, msg: Message) -> None:
        payload = msg.payload
        if len(payload) < MEM_TABLE_HEAD.size:
            raise _Reject(f"payload is {len(payload)} bytes, too short for a memory table")
        nregions, padding = MEM_TABLE_HEAD.unpack_from(payload)
        log.debug("SET_MEM_TABLE: nregions=%d padding=%d size=%d fds=%s", nregions, padding,
                  len(payload), msg.fds)
        if not 1 <= nregions <= MAX_MEM_REGIONS:
            raise _Reject(f"{nregions} regions (1..{MAX_MEM_REGIONS} allowed)")
        need = MEM_TABLE_HEAD.size + nregions * MEM_REGION.size
        if not need <= len(payload) <= MEM_TABLE_MAX_SIZE:
            raise _Reject(f"payload is {len(payload)} bytes, expected {need}..{MEM_TABLE_MAX_SIZE} "
                          f"for {nregions} regions")
        if len(msg.fds) != nregions:
            raise _Reject(f"{len(msg.fds)} fds attached, expected {nregions} (one per region)")
        regions = unpack_mem_table(payload)
        for i, r in enumerate(regions):
            log.debug("  region %d: guest_addr=0x%x size=0x%x user_addr=0x%x mmap_offset=0x%x fd=%d",
                      i, r.guest_addr, r.size, r.user_addr, r.mmap_offset, msg.fds[i])
            if r.size == 0:
                raise _Reject(f"region {i} has size 0")
            for what, base in (("guest_addr", r.guest_addr), ("user_addr", r.user_addr),
                               ("mmap_offset", r.mmap_offset)):
                if base + r.size > 1 << 64:
                    raise _Reject(f"region {i}: {what} 0x{base:x} + size 0x{r.size:x} wraps 64 bits")
        # fds stay in msg.fds: dispatch closes them after the call (the device dup()s/mmaps).
        self._device.set_mem_table(regions, list(msg.fds))
        self.mem_table_set = True
        return None

    def _h_set_vring_num(self, msg: Message) -> None:
        st = unpack_vring_state(msg.payload)
        log.debug("SET_VRING_NUM: index=%d num=%d", st.index, st.num)
        vr = self._vring(st.index)
        if vr.started:
            raise _Reject(f"vring {st.index} is started; its size cannot change")
        if not 1 <= st.num <= MAX_QUEUE_SIZE:
            raise _Reject(f"vring {st.index}: size {st.num} out of range (1..{MAX_QUEUE_SIZE})")
        # Split rings need a power of two (the index wraps with & (num-1));
        # packed rings may have any size.
        if not self._packed() and st.num & (st.num - 1):
            raise _Reject(f"vring {st.index}: size {st.num} is not a power of two")
        vr.num = st.num
        return None

    def _h_set_vring_addr(self, msg: Message) -> None:
        a = unpack_vring_addr(msg.payload)
        log.debug("SET_VRING_ADDR: index=%d flags=0x%x desc=0x%x used=0x%x avail=0x%x log=0x%x",
                  a.index, a.flags, a.desc, a.used, a.avail, a.log)
        vr = self._vring(a.index)
        if a.flags & ~VRING_F_LOG:
            raise _Reject(f"vring {a.index}: unknown flags 0x{a.flags & ~VRING_F_LOG:x}")
        if a.flags & VRING_F_LOG:
            raise _Reject(f"vring {a.index}: dirty logging (VHOST_VRING_F_LOG) is not supported")
        # virtio alignment: descriptor table 16, avail (driver area) 2, used (device area) 4.
        for what, addr, align in (("desc", a.desc, 16), ("avail", a.avail, 2), ("used", a.used, 4)):
            if addr % align:
                raise _Reject(f"vring {a.index}: {what} address 0x{addr:x} is not "
                              f"{align}-byte aligned")
        new = (a.desc, a.used, a.avail, a.log, a.flags)
        if vr.started:
            if new == (vr.desc_addr, vr.used_addr, vr.avail_addr, vr.log_addr, vr.addr_flags):
                return None             # a harmless repeat
            raise _Reject(f"vring {a.index} is started; its addresses cannot change "
                          "(GET_VRING_BASE first)")
        vr.desc_addr, vr.used_addr, vr.avail_addr, vr.log_addr, vr.addr_flags = new
        self._addr_set.add(a.index)
        return None

    def _h_set_vring_base(self, msg: Message) -> None:
        st = unpack_vring_state(msg.payload)
        log.debug("SET_VRING_BASE: index=%d num=%d", st.index, st.num)
        vr = self._vring(st.index)
        if vr.started:
            raise _Reject(f"vring {st.index} is started; its base cannot change")
        # Split rings: 16-bit index, bits 16..31 reserved.  Packed: the
        # full 32-bit encoding (avail idx+wrap, used idx+wrap).
        if not self._packed() and st.num > 0xFFFF:
            raise _Reject(f"vring {st.index}: base 0x{st.num:x} does not fit 16 bits (split ring)")
        vr.base = st.num
        return None

    def _h_get_vring_base(self, msg: Message) -> bytes:
        st = unpack_vring_state(msg.payload)
        log.debug("GET_VRING_BASE: index=%d num=%d", st.index, st.num)
        vr = self._vring(st.index)
        if vr.started:
            self._stop_vring(vr)
        log.debug("GET_VRING_BASE: vring %d stopped at %d", vr.index, vr.base)
        return VRING_STATE.pack(vr.index, vr.base)

    def _vring_file(self, msg: Message, name: str) -> tuple[VringState, int | None]:
        """SET_VRING_KICK/CALL/ERR payload: the ring and the fd (None: nofd)."""
        f = unpack_vring_file(msg.payload)
        log.debug("%s: index=%d nofd=%s reserved=0x%x fds=%s", name, f.index, f.nofd,
                  f.reserved, msg.fds)
        if f.reserved:
            raise _Reject(f"reserved payload bits set: 0x{f.reserved:x}")
        return self._vring(f.index), self._file_fd(msg, f.nofd)

    def _replace_fd(self, vr: VringState, attr: str, msg: Message, fd: int | None) -> None:
        """Keep *fd* as the ring's *attr* fd; close the one it replaces."""
        old = getattr(vr, attr)
        setattr(vr, attr, self._take_fd(msg, fd))
        _close_fd(old)

    def _h_set_vring_kick(self, msg: Message) -> None:
        vr, fd = self._vring_file(msg, "SET_VRING_KICK")
        if not self.features_set:
            raise _Reject(f"vring {vr.index}: SET_FEATURES has not been received")
        if vr.num == 0:
            raise _Reject(f"vring {vr.index}: SET_VRING_NUM has not been received")
        if vr.index not in self._addr_set:
            raise _Reject(f"vring {vr.index}: SET_VRING_ADDR has not been received")
        if vr.started:
            # A new kick on a running ring: restart it with the new fd, from
            # where the device stopped.
            log.debug("vring %d: new kick fd on a started ring, restarting it", vr.index)
            self._stop_vring(vr)
        self._replace_fd(vr, "kick_fd", msg, fd)
        if not self.protocol_features_on:
            vr.enabled = True           # without PROTOCOL_FEATURES rings run enabled
        self._device.start_vring(replace(vr, started=True))
        vr.started = True
        log.debug("vring %d started: num=%d base=%d enabled=%s kick=%s call=%s err=%s", vr.index,
                  vr.num, vr.base, vr.enabled, vr.kick_fd, vr.call_fd, vr.err_fd)
        return None

    def _h_set_vring_call(self, msg: Message) -> None:
        vr, fd = self._vring_file(msg, "SET_VRING_CALL")
        if vr.started:
            self._device.set_vring_call(vr.index, fd)
        self._replace_fd(vr, "call_fd", msg, fd)    # after the device switched to the new one
        return None

    def _h_set_vring_err(self, msg: Message) -> None:
        vr, fd = self._vring_file(msg, "SET_VRING_ERR")
        self._replace_fd(vr, "err_fd", msg, fd)
        return None

    def _h_get_protocol_features(self, msg: Message) -> bytes:
        if not self.offered_features & PROTOCOL_FEATURES_BIT:
            raise _Reject("PROTOCOL_FEATURES (bit 30) was not offered")
        log.debug("GET_PROTOCOL_FEATURES: offering 0x%x: %s", self.offered_protocol_features,
                  " ".join(feature_names(self.offered_protocol_features, ProtocolFeature)))
        return pack_u64(self.offered_protocol_features)

    def _h_set_protocol_features(self, msg: Message) -> None:
        features = unpack_u64(msg.payload)
        log.debug("SET_PROTOCOL_FEATURES: u64=0x%x: %s", features,
                  " ".join(feature_names(features, ProtocolFeature)))
        if not self.offered_features & PROTOCOL_FEATURES_BIT:
            raise _Reject("PROTOCOL_FEATURES (bit 30) was not offered")
        extra = features & ~self.offered_protocol_features
        if extra:
            raise _Reject(f"protocol features not offered: 0x{extra:x} "
                          f"({' '.join(feature_names(extra, ProtocolFeature))})")
        self._device.set_protocol_features(features)
        self.acked_protocol_features = features
        self.protocol_features_set = True
        log.debug("negotiated protocol features 0x%x: %s", features,
                  " ".join(feature_names(features, ProtocolFeature)))
        return None

    def _h_get_queue_num(self, msg: Message) -> bytes:
        log.debug("GET_QUEUE_NUM: %d queue pairs", self.max_queue_pairs)
        return pack_u64(self.max_queue_pairs)

    def _h_set_vring_enable(self, msg: Message) -> None:
        st = unpack_vring_state(msg.payload)
        log.debug("SET_VRING_ENABLE: index=%d num=%d", st.index, st.num)
        vr = self._vring(st.index)
        if not self.protocol_features_on:
            raise _Reject("VHOST_USER_F_PROTOCOL_FEATURES was not negotiated")
        if st.num not in (0, 1):
            raise _Reject(f"vring {st.index}: enable value {st.num} (0 or 1 allowed)")
        enabled = bool(st.num)
        if vr.started and enabled != vr.enabled:
            self._device.enable_vring(vr.index, enabled)
        vr.enabled = enabled
        return None


# --- error-shaped natural replies -------------------------------------------

def _u64_reply(value: int) -> Callable[[VhostUserSession, Message], bytes]:
    """An error-shaped reply that is the u64 ``value``."""
    payload = pack_u64(value)
    return lambda session, msg: payload


def _vring_base_error_reply(session: VhostUserSession, msg: Message) -> bytes:
    """GET_VRING_BASE failed: echo the index and the last base we know (0 if none)."""
    index = struct.unpack_from("<I", msg.payload)[0] if len(msg.payload) >= 4 else 0
    base = session.vrings[index].base if index < len(session.vrings) else 0
    return VRING_STATE.pack(index, base)


def _empty_reply(session: VhostUserSession, msg: Message) -> bytes:
    return b""


# Known requests we do not implement whose frontend waits for a reply: the
# error-shaped payload each one gets (shapes from QEMU's hw/virtio/vhost-user.c).
_UNHANDLED_REPLIES: dict[int, Callable[[VhostUserSession, Message], bytes]] = {
    Request.IOTLB_MSG: _u64_reply(1),               # u64, non-zero = failure
    Request.GET_CONFIG: _empty_reply,               # spec: zero-length payload = error
    Request.POSTCOPY_ADVISE: _empty_reply,          # no userfaultfd attached = error
    Request.POSTCOPY_END: _u64_reply(1),            # u64, non-zero = failure
    Request.GET_INFLIGHT_FD: lambda s, m: bytes(INFLIGHT_C_SIZE),  # mmap_size 0, no fd
    Request.GET_MAX_MEM_SLOTS: _u64_reply(0),
    Request.GET_STATUS: _u64_reply(0),
    Request.GET_SHARED_OBJECT: _u64_reply(1),       # no dma-buf fd attached = error
    Request.SET_DEVICE_STATE_FD: _u64_reply(0x101),  # error 1, bit 8: no fd returned
    Request.CHECK_DEVICE_STATE: _u64_reply(1),      # non-zero = failure
}

_GET_U64_ERROR = _u64_reply(0)

# The request table, indexed by request number (None: not implemented).
_HANDLER_LIST = [
    _Handler(Request.GET_FEATURES, VhostUserSession._h_get_features, 0,
             error_reply=_GET_U64_ERROR),
    _Handler(Request.SET_FEATURES, VhostUserSession._h_set_features, U64.size),
    _Handler(Request.SET_OWNER, VhostUserSession._h_set_owner, 0),
    _Handler(Request.RESET_OWNER, VhostUserSession._h_reset_owner, 0),
    _Handler(Request.SET_MEM_TABLE, VhostUserSession._h_set_mem_table, None, fds=None),
    _Handler(Request.SET_VRING_NUM, VhostUserSession._h_set_vring_num, VRING_STATE.size),
    _Handler(Request.SET_VRING_ADDR, VhostUserSession._h_set_vring_addr, VRING_ADDR.size),
    _Handler(Request.SET_VRING_BASE, VhostUserSession._h_set_vring_base, VRING_STATE.size),
    _Handler(Request.GET_VRING_BASE, VhostUserSession._h_get_vring_base, VRING_STATE.size,
             error_reply=_vring_base_error_reply),
    _Handler(Request.SET_VRING_KICK, VhostUserSession._h_set_vring_kick, U64.size, fds=None),
    _Handler(Request.SET_VRING_CALL, VhostUserSession._h_set_vring_call, U64.size, fds=None),
    _Handler(Request.SET_VRING_ERR, VhostUserSession._h_set_vring_err, U64.size, fds=None),
    _Handler(Request.GET_PROTOCOL_FEATURES, VhostUserSession._h_get_protocol_features, 0,
             error_reply=_GET_U64_ERROR),
    _Handler(Request.SET_PROTOCOL_FEATURES, VhostUserSession._h_set_protocol_features, U64.size),
    _Handler(Request.GET_QUEUE_NUM, VhostUserSession._h_get_queue_num, 0,
             error_reply=_GET_U64_ERROR),
    _Handler(Request.SET_VRING_ENABLE, VhostUserSession._h_set_vring_enable, VRING_STATE.size),
    _Handler(Request.RESET_DEVICE, VhostUserSession._h_reset_device, 0,
             needs_offer=ProtocolFeature.RESET_DEVICE),
]
_HANDLERS: tuple[_Handler | None, ...] = tuple(
    next((h for h in _HANDLER_LIST if h.request == n), None) for n in range(max(Request) + 1))


def handler_names() -> dict[int, str]:
    """Request number -> name of every request the server implements."""
    return {h.request.value: h.name for h in _HANDLER_LIST}


# --- the listening server ---------------------------------------------------

class VhostUserServer:
    """vhost-user backend socket in server mode, serving one frontend at a time.

    Binds and listens in the constructor: raises BusyError if another
    process accepts connections on ``path``, UsageError if ``path``
    exists and is not a socket (or cannot be created), PrivilegeError
    if the group cannot be set.  A stale socket file is replaced.  The
    file gets ``socket_mode`` (default 0600, or 0660 when ``group`` is
    given) and, with ``group``, that group.

    Run it with ``serve_forever(stop_event)`` in a thread, or poll
    ``fileno()`` for readability and call ``handle_one(0)``.  ``close()``
    ends the current frontend and removes the socket file.
    """

    def __init__(self, path: str | os.PathLike[str], device: VhostUserDevice, *,
                 socket_mode: int | None = None, group: str | None = None):
        self._path = os.fspath(path)
        self._device = device
        self._mode = socket_mode if socket_mode is not None else (0o660 if group else 0o600)
        self._gid = self._lookup_group(group) if group else None
        self._session: VhostUserSession | None = None
        self._lock = threading.Lock()          # one step at a time; close() waits for it
        self._wake_lock = threading.Lock()     # guards the wake fd against close()
        self._stop = threading.Event()
        self._closed = False
        self._listener, self._inode = self._bind()
        try:
            self._listener.setblocking(False)
            self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._epoll = select.epoll()
            self._epoll.register(self._listener.fileno(), select.EPOLLIN)
            self._epoll.register(self._wake, select.EPOLLIN)
        except BaseException:
            self._listener.close()
            self._unlink_ours()
            raise
        log.info("vhost-user server listening on %s (mode %04o%s)", self._path, self._mode,
                 f", group {group}" if group else "")

    # -- public ----------------------------------------------------------

    @property
    def path(self) -> str:
        """The socket path."""
        return self._path

    @property
    def session(self) -> VhostUserSession | None:
        """The connected frontend's session, if any."""
        return self._session

    @property
    def connected(self) -> bool:
        """True while a frontend is connected."""
        return self._session is not None

    def fileno(self) -> int:
        """An fd (epoll) that is readable whenever ``handle_one(0)`` has something to do."""
        return self._epoll.fileno()

    def handle_one(self, timeout: float | None = 0.0) -> bool:
        """Wait up to ``timeout`` s (None: forever) and handle what is ready.

        Accepts a frontend (or refuses a second one), or handles one
        message of the connected frontend, ending its session when it
        goes away.  Returns True if anything was handled.  Never
        raises; returns False at once after ``close()``.
        """
        with self._lock:
            if self._closed:
                return False
            try:
                events = self._epoll.poll(-1 if timeout is None else timeout, 8)
            except InterruptedError:
                return False
            handled = False
            for fd, _ in events:
                if fd == self._wake:
                    try:
                        os.eventfd_read(self._wake)
                    except OSError:
                        pass
                elif fd == self._listener.fileno():
                    self._accept()
                    handled = True
                elif self._session is not None and fd == self._session.fileno():
                    self._session.handle_one(0)
                    handled = True
            return handled

    def serve_forever(self, stop_event: threading.Event | None = None,
                      poll_interval: float = 0.1) -> None:
        """Serve frontends until ``stop_event`` is set, ``stop()`` or ``close()`` is called.

        ``stop()`` wakes the loop at once; a bare ``stop_event.set()`` is
        noticed within ``poll_interval`` seconds.  The connected frontend
        stays connected when this returns; ``close()`` ends it.
        """
        while not self._stop.is_set() and not (stop_event is not None and stop_event.is_set()):
            if self._closed:
                return
            self.handle_one(poll_interval)

    def stop(self) -> None:
        """Make ``serve_forever`` return promptly (safe from any thread or a signal handler)."""
        self._stop.set()
        # Non-blocking: a signal handler may interrupt close() holding the
        # lock; close() is then stopping everything anyway.
        if self._wake_lock.acquire(blocking=False):
            try:
                if not self._closed:
                    os.eventfd_write(self._wake, 1)
            except OSError:
                pass
            finally:
                self._wake_lock.release()

    def close(self) -> None:
        """Stop, disconnect the frontend (device reset), close the socket, remove its file.

        Idempotent.  Do not call it from a signal handler (use stop()).
        """
        self.stop()
        with self._lock:
            if self._closed:
                return
            if self._session is not None:
                self._session.close()
            with self._wake_lock:
                self._closed = True
                os.close(self._wake)
            self._epoll.close()
            self._listener.close()
            self._unlink_ours()
            log.info("vhost-user server on %s closed", self._path)

    def __enter__(self) -> "VhostUserServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------

    def _accept(self) -> None:
        """Accept a pending connection: the new frontend, or a refused second one."""
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:
            # EMFILE and friends: the connection stays queued; don't spin on it.
            log.error("accept on %s failed: %s", self._path, e.strerror or e)
            time.sleep(0.1)
            return
        if self._session is not None and self._session.peer_gone():
            # The current frontend already hung up (e.g. a busy-check probe
            # from another instance, or QEMU reconnecting): finish it first
            # instead of refusing its successor.
            for _ in range(10000):
                if not self._session.handle_one(0):
                    break
        if self._session is not None:
            log.warning("second vhost-user frontend on %s (%s) refused: one frontend at a time",
                        self._path, _peer_label(conn))
            conn.close()
            return
        try:
            session = VhostUserSession(conn, self._device, on_close=self._session_closed)
        except Exception as e:
            log.error("cannot serve frontend on %s: device failed: %s: %s", self._path,
                      type(e).__name__, e)
            conn.close()
            return
        self._session = session
        self._epoll.register(session.fileno(), select.EPOLLIN)

    def _session_closed(self, session: VhostUserSession) -> None:
        """on_close hook: forget the session (called before its socket closes)."""
        if session is self._session:
            try:
                self._epoll.unregister(session.fileno())
            except (OSError, ValueError):
                pass
            self._session = None

    @staticmethod
    def _lookup_group(group: str) -> int:
        """The gid of ``group`` (a name or a number); UsageError if unknown."""
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            if group.isdigit():
                return int(group)
            raise UsageError(f"unknown group {group!r} for the vhost-user socket") from None

    def _probe(self) -> bool:
        """True if something accepts connections on the existing socket file."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(self._path)
            return True
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except (BlockingIOError, TimeoutError):
            return True                 # backlog full / listener stuck: someone owns it
        except PermissionError:
            raise PrivilegeError(f"cannot check vhost-user socket {self._path}: "
                                 "permission denied") from None
        except OSError as e:
            raise UsageError(f"cannot check vhost-user socket {self._path}: "
                             f"{e.strerror or e}") from None
        finally:
            probe.close()

    def _bind(self) -> tuple[socket.socket, tuple[int, int]]:
        """Create, bind, chmod/chown and listen; returns the socket and the file's (dev, ino)."""
        try:
            st = os.lstat(self._path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise UsageError(f"vhost-user socket path {self._path}: {e.strerror or e}") from None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise UsageError(f"{self._path} exists and is not a socket; refusing to replace it")
            if self._probe():
                raise BusyError(f"vhost-user socket {self._path} is in use by another process")
            log.info("removing stale vhost-user socket %s", self._path)
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise UsageError(f"cannot remove stale socket {self._path}: "
                                 f"{e.strerror or e}") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        bound = False
        try:
            try:
                sock.bind(self._path)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise BusyError(f"vhost-user socket {self._path} is in use "
                                    "by another process") from None
                if e.errno in (errno.EACCES, errno.EPERM):
                    raise PrivilegeError(f"cannot create vhost-user socket {self._path}: "
                                         f"{e.strerror}") from None
                raise UsageError(f"cannot create vhost-user socket {self._path}: "
                                 f"{e.strerror or e}") from None
            bound = True
            st = os.stat(self._path)
            inode = (st.st_dev, st.st_ino)
            # Mode and group before listen(): until then a connect() is
            # refused, so no one gets in through the umask-default mode.
            os.chmod(self._path, self._mode)
            if self._gid is not None:
                try:
                    os.chown(self._path, -1, self._gid)
                except PermissionError:
                    raise PrivilegeError(f"cannot give vhost-user socket {self._path} to group "
                                         f"{self._gid}: permission denied") from None
            sock.listen(LISTEN_BACKLOG)
            return sock, inode
        except BaseException:
            sock.close()
            if bound:
                try:
                    os.unlink(self._path)
                except OSError:
                    pass
            raise

    def _unlink_ours(self) -> None:
        """Remove the socket file if it is still the one we created."""
        try:
            st = os.lstat(self._path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self._path)
        except OSError:
            pass

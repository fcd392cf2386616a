"""MacSteering: the XDP program that steers a NIC's frames to VMs' XSKs.

``bpf/xdpnet_steer.c`` is compiled and loaded with bcc and attached to one
network interface through libbpf's netlink calls (the libbpf that libbcc
itself links), with ``XDP_FLAGS_UPDATE_IF_NOEXIST``: it never replaces a
program someone else attached, and :meth:`MacSteering.detach` removes it
with ``XDP_FLAGS_REPLACE`` naming our own program, so it never removes a
program it did not load either.

The maps (names, layouts) are described in the C file.  All map access
goes through :class:`_Maps`, the one place that knows the layouts; pinning
them per NIC later changes only that class and where it gets its maps.

This version serves one VM per NIC (see the C file): :meth:`add_vm`
refuses a second VM on the same interface.

Usage::

    with MacSteering("ens1f0") as st:
        st.add_vm(3, "52:54:00:12:34:56", max_frame=1518)
        st.set_xsk(0, xsk_fd)
        ...
        print(st.verdict_counters())
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import ctypes.util
import errno
import logging
import os
import socket
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from xdpnet.errors import (BusyError, DependencyError, PrivilegeError,
                           UsageError, XdpnetError)
from xdpnet.net.mac import format_mac, parse_mac
from xdpnet.steering.kheaders import find_kernel_headers, import_bcc

log = logging.getLogger(__name__)

PROGRAM_FILE = "xdpnet_steer.c"
PROGRAM_FUNC = "xdpnet_steer"

# Must match the C file.
MAX_QUEUES = 64
MAX_VMS = 64
MAX_MACS = 256
VERDICTS = ("to_vm", "to_host", "broadcast", "multicast", "too_large",
            "no_socket", "short", "spoofed")
MIN_FRAME = 14          # an Ethernet header
MAX_FRAME = 65535

# linux/if_link.h
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4
_MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
MODES = ("native", "generic", "auto")


@dataclass(frozen=True)
class VmEntry:
    """A ``vm_macs`` value."""

    vm_id: int
    max_frame: int


# --------------------------------------------------------------------------
# libbpf: XDP attach / detach / query by netlink

class _XdpAttachOpts(ct.Structure):
    _fields_ = [("sz", ct.c_size_t), ("old_prog_fd", ct.c_int)]


class _XdpQueryOpts(ct.Structure):
    _fields_ = [("sz", ct.c_size_t), ("prog_id", ct.c_uint32),
                ("drv_prog_id", ct.c_uint32), ("hw_prog_id", ct.c_uint32),
                ("skb_prog_id", ct.c_uint32), ("attach_mode", ct.c_uint8)]


_PRINT_FN = ct.CFUNCTYPE(ct.c_int, ct.c_int, ct.c_char_p, ct.c_void_p)


class _Libbpf:
    """The few libbpf calls bcc does not expose well (its attach_xdp has no
    REPLACE/expected-fd and prints errors instead of returning them)."""

    _lock = threading.Lock()        # libbpf's print hook is process-global

    def __init__(self):
        name = "libbpf.so.1"
        try:
            self.lib = ct.CDLL(name, use_errno=True)
        except OSError:
            found = ctypes.util.find_library("bpf")
            if not found:
                raise DependencyError(
                    "libbpf (libbpf.so.1) not found: apt-get install libbpf1") from None
            self.lib = ct.CDLL(found, use_errno=True)
        self.lib.bpf_xdp_attach.argtypes = [ct.c_int, ct.c_int, ct.c_uint32,
                                            ct.POINTER(_XdpAttachOpts)]
        self.lib.bpf_xdp_detach.argtypes = [ct.c_int, ct.c_uint32,
                                            ct.POINTER(_XdpAttachOpts)]
        self.lib.bpf_xdp_query.argtypes = [ct.c_int, ct.c_int,
                                           ct.POINTER(_XdpQueryOpts)]
        self.lib.libbpf_set_print.argtypes = [ct.c_void_p]
        self.lib.libbpf_set_print.restype = ct.c_void_p
        libc = ct.CDLL(None)
        self._vsnprintf = libc.vsnprintf
        self._vsnprintf.argtypes = [ct.c_char_p, ct.c_size_t, ct.c_char_p, ct.c_void_p]

    @contextlib.contextmanager
    def _captured(self, messages: list[str]):
        """Collect libbpf's messages (the kernel's extack text among them)
        instead of letting it print them on stderr."""
        def hook(level, fmt, args):
            buf = ct.create_string_buffer(512)
            try:
                self._vsnprintf(buf, len(buf), fmt, args)
                text = buf.value.decode(errors="replace").strip()
            except Exception:                       # pragma: no cover
                text = fmt.decode(errors="replace").strip()
            if text:
                messages.append(text.removeprefix("libbpf: "))
            return 0
        cb = _PRINT_FN(hook)
        with self._lock:
            old = self.lib.libbpf_set_print(ct.cast(cb, ct.c_void_p))
            try:
                yield
            finally:
                self.lib.libbpf_set_print(old)

    def attach(self, ifindex: int, prog_fd: int, flags: int) -> tuple[int, str]:
        """0 or -errno, and the kernel's message."""
        msgs: list[str] = []
        with self._captured(msgs):
            rc = self.lib.bpf_xdp_attach(ifindex, prog_fd, flags, None)
        return rc, "; ".join(msgs)

    def detach(self, ifindex: int, flags: int, expected_fd: int) -> tuple[int, str]:
        opts = _XdpAttachOpts(ct.sizeof(_XdpAttachOpts), expected_fd)
        msgs: list[str] = []
        with self._captured(msgs):
            rc = self.lib.bpf_xdp_detach(ifindex, flags, ct.byref(opts))
        return rc, "; ".join(msgs)

    def query(self, ifindex: int) -> _XdpQueryOpts:
        opts = _XdpQueryOpts(sz=ct.sizeof(_XdpQueryOpts))
        rc = self.lib.bpf_xdp_query(ifindex, 0, ct.byref(opts))
        if rc < 0:
            raise XdpnetError(f"cannot query XDP programs: {os.strerror(-rc)}")
        return opts


_libbpf: _Libbpf | None = None


def _get_libbpf() -> _Libbpf:
    global _libbpf
    if _libbpf is None:
        _libbpf = _Libbpf()
    return _libbpf


def attached_prog_ids(ifname: str) -> dict[str, int]:
    """Ids of the XDP programs attached to *ifname*, by mode (``native``,
    ``generic``, ``offload``); empty if none."""
    q = _get_libbpf().query(_ifindex(ifname))
    ids = {"native": q.drv_prog_id, "generic": q.skb_prog_id,
           "offload": q.hw_prog_id}
    return {k: v for k, v in ids.items() if v}


def _ifindex(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except (OSError, ValueError):
        raise UsageError(f"interface {ifname!r} not found") from None


CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39


def _check_privileges() -> None:
    """Loading needs CAP_BPF (or CAP_SYS_ADMIN), attaching CAP_NET_ADMIN.
    Checked up front: bcc reports a missing privilege as a compile error."""
    try:
        with open("/proc/self/status") as f:
            eff = next(int(line.split()[1], 16) for line in f
                       if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return                                  # unknown: let the kernel decide
    has = lambda cap: bool(eff >> cap & 1)      # noqa: E731
    if not (has(CAP_BPF) or has(CAP_SYS_ADMIN)) or not has(CAP_NET_ADMIN):
        raise PrivilegeError("XDP steering needs root (CAP_BPF and CAP_NET_ADMIN)")


def _program_path() -> Path:
    """``bpf/xdpnet_steer.c``: in the package when installed
    (``xdpnet/bpf``), else in the source tree."""
    pkg = Path(__file__).resolve().parent.parent
    for p in (pkg / "bpf" / PROGRAM_FILE, pkg.parent / "bpf" / PROGRAM_FILE):
        if p.is_file():
            return p
    raise DependencyError(f"XDP program {PROGRAM_FILE} not found next to {pkg}: "
                          "reinstall xdpnet (tools/setup)")


# --------------------------------------------------------------------------
# compile + load

@dataclass
class _Loaded:
    bpf: object             # bcc.BPF
    prog_fd: int            # our own dup: bcc's atexit cleanup closes its fd
    compile_seconds: float

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.bpf.cleanup()              # closes bcc's program and map fds
        if self.prog_fd >= 0:
            os.close(self.prog_fd)
            self.prog_fd = -1


def _load_program() -> _Loaded:
    bcc = import_bcc()
    headers = find_kernel_headers()
    path = _program_path()
    saved = os.environ.get("BCC_KERNEL_SOURCE")
    t0 = time.monotonic()
    try:
        if headers.source:
            os.environ["BCC_KERNEL_SOURCE"] = headers.source
        bpf = bcc.BPF(src_file=str(path).encode(), cflags=list(headers.cflags))
        fn = bpf.load_func(PROGRAM_FUNC.encode(), bcc.BPF.XDP)
    except Exception as e:
        text = str(e)
        if "Operation not permitted" in text or "Permission denied" in text:
            raise PrivilegeError("loading an XDP program needs root "
                                 "(CAP_BPF, CAP_NET_ADMIN)") from None
        if "kernel headers" in text.lower():
            raise DependencyError(f"bcc found no kernel headers ({headers.origin or 'none'}): "
                                  "apt-get install linux-headers-amd64") from None
        raise XdpnetError(f"cannot compile/load {path.name} with bcc: {text}") from None
    finally:
        if headers.source:
            if saved is None:
                os.environ.pop("BCC_KERNEL_SOURCE", None)
            else:
                os.environ["BCC_KERNEL_SOURCE"] = saved
    return _Loaded(bpf, os.dup(fn.fd), time.monotonic() - t0)


# --------------------------------------------------------------------------
# the maps: the one place that knows their layouts

class _Maps:
    """Typed access to the program's maps (layouts in xdpnet_steer.c)."""

    def __init__(self, bpf):
        from bcc.libbcc import lib      # bcc is importable: the program loaded
        self._lib = lib
        self.xsks = bpf[b"xsks"]
        self.vm_macs = bpf[b"vm_macs"]
        self.verdicts = bpf[b"verdicts"]
        self.vm_stats = bpf[b"vm_stats"]
        self.config = bpf[b"config"]

    @staticmethod
    def mac_key(mac: bytes) -> int:
        """vm_macs key: the 6 bytes in wire order at the start of a u64."""
        return int.from_bytes(mac + b"\0\0", sys.byteorder)

    @staticmethod
    def key_mac(key: int) -> bytes:
        return key.to_bytes(8, sys.byteorder)[:6]

    def _update(self, table, key, value) -> int:
        rc = self._lib.bpf_update_elem(table.map_fd, ct.byref(key), ct.byref(value), 0)
        return 0 if rc >= 0 else ct.get_errno()

    def _delete(self, table, key) -> bool:
        return self._lib.bpf_delete_elem(table.map_fd, ct.byref(key)) >= 0

    # vm_macs
    def macs(self) -> dict[bytes, VmEntry]:
        return {self.key_mac(k.value): VmEntry(v.vm_id, v.max_frame)
                for k, v in self.vm_macs.items()}

    def set_mac(self, mac: bytes, entry: VmEntry) -> None:
        t = self.vm_macs
        err = self._update(t, t.Key(self.mac_key(mac)),
                           t.Leaf(entry.vm_id, entry.max_frame))
        if err == errno.E2BIG:
            raise BusyError(f"vm_macs is full ({MAX_MACS} MAC addresses)")
        if err:
            raise XdpnetError(f"cannot update vm_macs: {os.strerror(err)}")

    def del_mac(self, mac: bytes) -> bool:
        t = self.vm_macs
        return self._delete(t, t.Key(self.mac_key(mac)))

    # config
    def set_flood(self, vm_id: int, max_frame: int) -> None:
        t = self.config
        err = self._update(t, t.Key(0), t.Leaf(vm_id, max_frame))
        if err:
            raise XdpnetError(f"cannot update config: {os.strerror(err)}")

    # xsks
    def set_xsk(self, queue: int, fd: int) -> int:
        t = self.xsks
        return self._update(t, t.Key(queue), ct.c_int(fd))

    def clear_xsk(self, queue: int) -> None:
        t = self.xsks
        self._delete(t, t.Key(queue))      # ENOENT: already clear

    # counters (per CPU, summed here)
    def verdicts_sum(self) -> dict[str, int]:
        t = self.verdicts
        return {name: sum(t.getvalue(t.Key(i))) for i, name in enumerate(VERDICTS)}

    def vm_stat_sum(self, vm_id: int) -> dict[str, int]:
        t = self.vm_stats
        per_cpu = t.getvalue(t.Key(vm_id))
        return {f: sum(getattr(c, f) for c in per_cpu)
                for f in ("frames", "bytes", "too_large")}

    def clear_vm_stat(self, vm_id: int) -> None:
        t = self.vm_stats
        t.clearitem(t.Key(vm_id))


# --------------------------------------------------------------------------

class _Attachment:
    """What detach needs; shared by MacSteering and its finalizer (which
    must not refer to the MacSteering object itself)."""

    def __init__(self, ifname, ifindex, mode_flag, loaded: _Loaded):
        self.ifname = ifname
        self.ifindex = ifindex
        self.mode_flag = mode_flag
        self.loaded = loaded

    def detach(self) -> None:
        rc, msg = _get_libbpf().detach(self.ifindex, self.mode_flag,
                                       self.loaded.prog_fd)
        if rc < 0 and -rc not in (errno.ENODEV, errno.ENOENT):
            # EEXIST: the active program is not ours any more: leave it.
            log.warning("XDP program on %s not detached: %s%s", self.ifname,
                        os.strerror(-rc), f" ({msg})" if msg else "")
        self.loaded.close()


class MacSteering:
    """The steering program attached to one interface.

    ``mode``: ``"native"`` (driver XDP), ``"generic"`` (skb XDP) or
    ``"auto"`` (native, else generic with a logged notice).  Raises
    :class:`UsageError` for an unknown interface or mode,
    :class:`BusyError` if the interface has an XDP program already,
    :class:`PrivilegeError` without CAP_BPF/CAP_NET_ADMIN,
    :class:`DependencyError` without bcc or kernel headers.

    The program stays attached until :meth:`detach` / :meth:`close` /
    the end of a ``with`` block, or garbage collection / interpreter exit.
    """

    def __init__(self, ifname: str, mode: str = "native"):
        if mode not in MODES:
            raise UsageError(f"XDP mode {mode!r} unknown (one of {', '.join(MODES)})")
        self.ifname = ifname
        self.notice: str | None = None       # set when auto fell back
        ifindex = _ifindex(ifname)
        _check_privileges()
        self._check_free(ifname)
        loaded = _load_program()
        self.compile_seconds = loaded.compile_seconds
        try:
            self._mode = self._attach(ifindex, loaded.prog_fd, mode)
        except BaseException:
            loaded.close()
            raise
        self._att = _Attachment(ifname, ifindex, _MODE_FLAGS[self._mode], loaded)
        self._finalizer = weakref.finalize(self, self._att.detach)
        self._maps: _Maps | None = _Maps(loaded.bpf)
        self._lock = threading.Lock()

    # -- attach ----------------------------------------------------------

    @staticmethod
    def _busy(ifname: str) -> BusyError:
        return BusyError(f"interface {ifname!r} already has an XDP program "
                         f"(remove it with: ip link set dev {ifname} xdp off)")

    def _check_free(self, ifname: str) -> None:
        if attached_prog_ids(ifname):
            raise self._busy(ifname)

    def _attach(self, ifindex: int, prog_fd: int, mode: str) -> str:
        lb = _get_libbpf()
        tries = ["native", "generic"] if mode == "auto" else [mode]
        first_error = ""
        for m in tries:
            rc, msg = lb.attach(ifindex, prog_fd,
                                XDP_FLAGS_UPDATE_IF_NOEXIST | _MODE_FLAGS[m])
            if rc == 0:
                if m != tries[0]:
                    self.notice = (f"native XDP not available on {self.ifname} "
                                   f"({first_error}): using generic mode")
                    log.warning("%s", self.notice)
                return m
            err = -rc
            why = os.strerror(err) + (f": {msg}" if msg else "")
            if err in (errno.EBUSY, errno.EEXIST):
                raise self._busy(self.ifname)
            if err in (errno.EPERM, errno.EACCES):
                raise PrivilegeError(f"attaching XDP to {self.ifname!r} needs "
                                     f"CAP_NET_ADMIN ({why})")
            if err == errno.ENODEV:
                raise UsageError(f"interface {self.ifname!r} not found")
            first_error = first_error or why
            if m == tries[-1]:
                raise XdpnetError(f"cannot attach XDP ({m} mode) to "
                                  f"{self.ifname!r}: {why}")
        raise AssertionError("unreachable")

    # -- lifecycle ---------------------------------------------------------

    @property
    def xdp_mode(self) -> str:
        """``"native"`` or ``"generic"``: the mode it was attached in."""
        return self._mode

    @property
    def attached(self) -> bool:
        fin = getattr(self, "_finalizer", None)     # None: __init__ failed
        return fin is not None and fin.alive

    def detach(self) -> None:
        """Detach the program (only if it is still ours) and free its maps.
        Idempotent."""
        self._finalizer()
        self._maps = None

    close = detach

    def __enter__(self) -> "MacSteering":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = self.xdp_mode if self.attached else "detached"
        return f"<MacSteering {self.ifname} {state}>"

    def _m(self) -> _Maps:
        if self._maps is None:
            raise XdpnetError(f"XDP steering on {self.ifname!r} is detached")
        return self._maps

    # -- VMs -----------------------------------------------------------------

    def add_vm(self, vm_id: int, mac: str | bytes, max_frame: int) -> None:
        """Steer frames for *mac* to VM *vm_id* (and, since this version
        serves one VM per interface, broadcast and multicast too); frames
        longer than *max_frame* are dropped and counted.  Adding a MAC
        again updates its max_frame."""
        mac = _mac_bytes(mac)
        if mac[0] & 1:
            raise UsageError(f"{format_mac(mac)} is a multicast/broadcast address, "
                             "not a VM's MAC")
        if not isinstance(vm_id, int) or not 0 <= vm_id < MAX_VMS:
            raise UsageError(f"VM id {vm_id!r} out of range (0..{MAX_VMS - 1})")
        if not isinstance(max_frame, int) or not MIN_FRAME <= max_frame <= MAX_FRAME:
            raise UsageError(f"max_frame {max_frame!r} out of range "
                             f"({MIN_FRAME}..{MAX_FRAME})")
        with self._lock:
            maps = self._m()
            macs = maps.macs()
            others = {e.vm_id for m, e in macs.items() if m != mac}
            if others - {vm_id}:
                raise BusyError(f"interface {self.ifname!r} already serves VM "
                                f"{min(others)} (one VM per interface)")
            if vm_id not in {e.vm_id for e in macs.values()}:
                maps.clear_vm_stat(vm_id)           # a new VM starts at zero
            maps.set_mac(mac, VmEntry(vm_id, max_frame))
            macs[mac] = VmEntry(vm_id, max_frame)
            self._update_flood(maps, macs)

    def remove_vm(self, mac: str | bytes) -> bool:
        """Stop steering *mac*; False if it was not registered."""
        mac = _mac_bytes(mac)
        with self._lock:
            maps = self._m()
            removed = maps.del_mac(mac)
            self._update_flood(maps, maps.macs())
            return removed

    @staticmethod
    def _update_flood(maps: _Maps, macs: dict[bytes, VmEntry]) -> None:
        """Broadcast/multicast go to the (one) VM, limited by the smallest
        max_frame registered; with no VM, to the host."""
        if macs:
            e = min(macs.values(), key=lambda e: (e.max_frame, e.vm_id))
            maps.set_flood(e.vm_id, e.max_frame)
        else:
            maps.set_flood(0, 0)

    def vms(self) -> dict[str, VmEntry]:
        """Registered MACs (``"aa:bb:…"``) and their VM entries."""
        return {format_mac(m): e for m, e in self._m().macs().items()}

    # -- sockets ---------------------------------------------------------------

    def set_xsk(self, queue: int, fd: int) -> None:
        """Deliver the frames arriving on rx *queue* to the AF_XDP socket
        *fd* (bound to this interface and queue)."""
        _check_queue(queue)
        err = self._m().set_xsk(queue, fd)
        if err in (errno.EBADF, errno.ENOTSOCK, errno.EOPNOTSUPP):
            raise UsageError(f"fd {fd} is not a bound AF_XDP socket "
                             f"({os.strerror(err)})")
        if err == errno.EBUSY:
            raise BusyError(f"queue {queue} of {self.ifname!r} already has a socket")
        if err:
            raise XdpnetError(f"cannot set the XSK of queue {queue}: {os.strerror(err)}")

    def clear_xsk(self, queue: int) -> None:
        """Frames on *queue* for a VM go to the host again (NO_SOCKET).
        Idempotent."""
        _check_queue(queue)
        self._m().clear_xsk(queue)

    # -- counters ----------------------------------------------------------------

    def verdict_counters(self) -> dict[str, int]:
        """Frames per verdict since load, summed over CPUs: to_vm, to_host,
        broadcast, multicast, too_large, no_socket, short, spoofed."""
        return self._m().verdicts_sum()

    def vm_counters(self, vm_id: int) -> dict[str, int]:
        """frames, bytes (redirected to the VM's XSK) and too_large."""
        if not isinstance(vm_id, int) or not 0 <= vm_id < MAX_VMS:
            raise UsageError(f"VM id {vm_id!r} out of range (0..{MAX_VMS - 1})")
        return self._m().vm_stat_sum(vm_id)


def _mac_bytes(mac: str | bytes) -> bytes:
    if isinstance(mac, (bytes, bytearray)):
        if len(mac) != 6:
            raise UsageError(f"a MAC address has 6 bytes, not {len(mac)}")
        return bytes(mac)
    return parse_mac(mac)


def _check_queue(queue: int) -> None:
    if not isinstance(queue, int) or not 0 <= queue < MAX_QUEUES:
        raise UsageError(f"queue {queue!r} out of range (0..{MAX_QUEUES - 1})")

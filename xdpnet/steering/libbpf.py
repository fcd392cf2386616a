"""The libbpf calls xdpnet makes itself, through ctypes.

bcc compiles and loads the programs (only the first process on a NIC
does); everything after that works on pinned objects and needs no bcc:
pinning and opening pins, map lookups and updates, object ids, XDP
attach/detach/query by netlink (bcc's ``attach_xdp`` has no REPLACE /
expected-program option and prints errors instead of returning them).
The library is the ``libbpf.so.1`` that libbcc itself links.

Every call returns what libbpf returns: 0 (or a fd / count) on success,
``-errno`` on failure.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import ctypes.util
import os
import sys
import threading

from xdpnet.errors import DependencyError, XdpnetError

# linux/if_link.h
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4
MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
FLAG_MODES = {v: k for k, v in MODE_FLAGS.items()}

BPF_ANY = 0
_INFO_LEN = 256         # bigger than the bpf_map_info / bpf_prog_info fields read


class _XdpAttachOpts(ct.Structure):
    _fields_ = [("sz", ct.c_size_t), ("old_prog_fd", ct.c_int)]


class _XdpQueryOpts(ct.Structure):
    _fields_ = [("sz", ct.c_size_t), ("prog_id", ct.c_uint32),
                ("drv_prog_id", ct.c_uint32), ("hw_prog_id", ct.c_uint32),
                ("skb_prog_id", ct.c_uint32), ("attach_mode", ct.c_uint8)]


_PRINT_FN = ct.CFUNCTYPE(ct.c_int, ct.c_int, ct.c_char_p, ct.c_void_p)


class Libbpf:
    """The loaded library with typed entry points."""

    _print_lock = threading.Lock()      # libbpf's print hook is process-global

    def __init__(self):
        try:
            self.lib = ct.CDLL("libbpf.so.1", use_errno=True)
        except OSError:
            found = ctypes.util.find_library("bpf")
            if not found:
                raise DependencyError(
                    "libbpf (libbpf.so.1) not found: apt-get install libbpf1") from None
            self.lib = ct.CDLL(found, use_errno=True)
        lib = self.lib
        vp, c_int, u32 = ct.c_void_p, ct.c_int, ct.c_uint32
        for name, args in (
                ("bpf_xdp_attach", [c_int, c_int, u32, ct.POINTER(_XdpAttachOpts)]),
                ("bpf_xdp_detach", [c_int, u32, ct.POINTER(_XdpAttachOpts)]),
                ("bpf_xdp_query", [c_int, c_int, ct.POINTER(_XdpQueryOpts)]),
                ("bpf_obj_pin", [c_int, ct.c_char_p]),
                ("bpf_obj_get", [ct.c_char_p]),
                ("bpf_map_lookup_elem", [c_int, vp, vp]),
                ("bpf_map_update_elem", [c_int, vp, vp, ct.c_uint64]),
                ("bpf_map_delete_elem", [c_int, vp]),
                ("bpf_map_get_next_key", [c_int, vp, vp]),
                ("bpf_obj_get_info_by_fd", [c_int, vp, ct.POINTER(u32)]),
                ("libbpf_num_possible_cpus", [])):
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = c_int
        lib.libbpf_set_print.argtypes = [vp]
        lib.libbpf_set_print.restype = vp
        self._vsnprintf = ct.CDLL(None).vsnprintf
        self._vsnprintf.argtypes = [ct.c_char_p, ct.c_size_t, ct.c_char_p, vp]
        ncpu = lib.libbpf_num_possible_cpus()
        if ncpu <= 0:
            raise XdpnetError(f"cannot count possible CPUs: {os.strerror(-ncpu)}")
        self.possible_cpus = ncpu

    # -- messages ---------------------------------------------------------

    @contextlib.contextmanager
    def captured(self, messages: list[str]):
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
        with self._print_lock:
            old = self.lib.libbpf_set_print(ct.cast(cb, ct.c_void_p))
            try:
                yield
            finally:
                self.lib.libbpf_set_print(old)

    # -- XDP by netlink -----------------------------------------------------

    def xdp_attach(self, ifindex: int, prog_fd: int, flags: int) -> tuple[int, str]:
        """0 or -errno, and the kernel's message."""
        msgs: list[str] = []
        with self.captured(msgs):
            rc = self.lib.bpf_xdp_attach(ifindex, prog_fd, flags, None)
        return rc, "; ".join(msgs)

    def xdp_detach(self, ifindex: int, flags: int, expected_fd: int) -> tuple[int, str]:
        """Detach the program in mode *flags* only if it is *expected_fd*'s
        (libbpf adds XDP_FLAGS_REPLACE for a non-zero old_prog_fd)."""
        opts = _XdpAttachOpts(ct.sizeof(_XdpAttachOpts), expected_fd)
        msgs: list[str] = []
        with self.captured(msgs):
            rc = self.lib.bpf_xdp_detach(ifindex, flags, ct.byref(opts))
        return rc, "; ".join(msgs)

    def xdp_query(self, ifindex: int) -> dict[str, int]:
        """Ids of the XDP programs attached, by mode; empty if none."""
        opts = _XdpQueryOpts(sz=ct.sizeof(_XdpQueryOpts))
        rc = self.lib.bpf_xdp_query(ifindex, 0, ct.byref(opts))
        if rc < 0:
            raise XdpnetError(f"cannot query XDP programs: {os.strerror(-rc)}")
        ids = {"native": opts.drv_prog_id, "generic": opts.skb_prog_id,
               "offload": opts.hw_prog_id}
        return {k: v for k, v in ids.items() if v}

    # -- objects ------------------------------------------------------------

    def obj_pin(self, fd: int, path: str) -> int:
        return self.lib.bpf_obj_pin(fd, path.encode())

    def obj_get(self, path: str) -> int:
        """A new fd for the object pinned at *path*, or -errno."""
        return self.lib.bpf_obj_get(path.encode())

    def obj_info(self, fd: int) -> bytes:
        """The raw bpf_map_info / bpf_prog_info of *fd*."""
        buf = ct.create_string_buffer(_INFO_LEN)
        n = ct.c_uint32(_INFO_LEN)
        rc = self.lib.bpf_obj_get_info_by_fd(fd, buf, ct.byref(n))
        if rc < 0:
            raise XdpnetError(f"cannot read BPF object info: {os.strerror(-rc)}")
        return buf.raw[:n.value]

    def obj_id(self, fd: int) -> int:
        """The kernel id of a map or program (both infos start with
        ``u32 type; u32 id``)."""
        return int.from_bytes(self.obj_info(fd)[4:8], sys.byteorder)

    # -- maps -----------------------------------------------------------------

    def lookup(self, fd: int, key, value) -> int:
        return self.lib.bpf_map_lookup_elem(fd, ct.byref(key), ct.byref(value))

    def update(self, fd: int, key, value, flags: int = BPF_ANY) -> int:
        return self.lib.bpf_map_update_elem(fd, ct.byref(key), ct.byref(value), flags)

    def delete(self, fd: int, key) -> int:
        return self.lib.bpf_map_delete_elem(fd, ct.byref(key))

    def next_key(self, fd: int, key, next_key) -> int:
        """*key* None: the first key."""
        return self.lib.bpf_map_get_next_key(fd, None if key is None else ct.byref(key),
                                             ct.byref(next_key))


_libbpf: Libbpf | None = None
_libbpf_lock = threading.Lock()


def libbpf() -> Libbpf:
    """The process-wide :class:`Libbpf` (loaded on first use)."""
    global _libbpf
    with _libbpf_lock:
        if _libbpf is None:
            _libbpf = Libbpf()
        return _libbpf

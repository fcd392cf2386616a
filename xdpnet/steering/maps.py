"""The steering maps of one NIC, opened from their pins: the one place in
Python that knows their names and layouts (``bpf/xdpnet_maps.h``).

:class:`MapSet` checks the key and value sizes of every pinned map
against the ctypes layouts below when it opens them, so a layout change
on one side only fails loudly instead of reading garbage.  Per-CPU values
are summed here.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from xdpnet.errors import BusyError, PrivilegeError, XdpnetError
from xdpnet.net.mac import mac_to_u64, u64_to_mac
from xdpnet.steering.libbpf import libbpf

# Must match bpf/xdpnet_maps.h.
LAYOUT_VERSION = 1
MAX_QUEUES = 64
MAX_VMS = 64
PORT_QUEUES = 8
EGRESS_NIC = 0
VERDICTS = ("to_vm", "to_port", "to_host", "broadcast", "multicast", "too_large",
            "no_socket", "short",
            "flooded", "flood_too_large",
            "port_rx", "port_no_socket",
            "spoofed", "interguest", "tx_wire", "tx_group", "tx_too_large", "tx_short")
VM_STATS = ("direct_frames", "direct_bytes", "port_frames", "port_bytes",
            "flood_frames", "flood_bytes", "interguest_frames", "interguest_bytes",
            "too_large", "port_no_socket", "spoofed", "tx_wire_frames", "tx_wire_bytes",
            "tx_vm_frames", "tx_group_frames")
TC_CREATED_CLSACT = 1

u32, u64 = ct.c_uint32, ct.c_uint64


class VmEntryC(ct.Structure):
    """``struct xn_vm_entry`` (vm_macs value)."""
    _fields_ = [("vm_id", u32), ("max_frame", u32), ("queue_mask", u64)]


class VmInfoC(ct.Structure):
    """``struct xn_vm_info`` (vms value)."""
    _fields_ = [("mac", u64), ("queue_mask", u64), ("max_frame", u32), ("port_h", u32),
                ("port_p", u32), ("port_queues", u32), ("owner_pid", u32),
                ("ntuple_loc", u32), ("owner_start", u64)]


class VmStatC(ct.Structure):
    """``struct xn_vm_stat`` (vm_stats value, per CPU)."""
    _fields_ = [(name, u64) for name in VM_STATS]


class ConfigC(ct.Structure):
    """``struct xn_config`` (config[0])."""
    _fields_ = [("version", u32), ("nic_ifindex", u32), ("xdp_flags", u32),
                ("tc_flags", u32), ("tc_handle", u32), ("tc_prio", u32)]


class MacKey(ct.Structure):
    """A MAC as a key: the 6 bytes in wire order, then two zero bytes."""
    _fields_ = [("b", ct.c_uint8 * 8)]


# name -> (key size, value size, max entries)
LAYOUTS = {
    "vm_macs": (8, ct.sizeof(VmEntryC), MAX_VMS),
    "vms": (4, ct.sizeof(VmInfoC), MAX_VMS),
    "nic_xsks": (4, 4, MAX_QUEUES),
    "port_xsks": (4, 4, MAX_VMS * PORT_QUEUES),
    "egress": (4, 4, 1 + MAX_VMS),
    "port_vm": (4, 4, 2 * MAX_VMS),
    "config": (4, ct.sizeof(ConfigC), 1),
    "verdicts": (4, 8, len(VERDICTS)),
    "vm_stats": (4, ct.sizeof(VmStatC), MAX_VMS),
}
MAP_NAMES = tuple(LAYOUTS)


def mac_key(mac: bytes) -> MacKey:
    k = MacKey()
    ct.memmove(k.b, mac + b"\0\0", 8)
    return k


def mask_queues(mask: int) -> tuple[int, ...]:
    return tuple(q for q in range(MAX_QUEUES) if mask >> q & 1)


def queues_mask(queues) -> int:
    m = 0
    for q in queues:
        m |= 1 << q
    return m


@dataclass(frozen=True)
class VmRecord:
    """One ``vms`` entry, as Python sees it."""

    vm_id: int
    mac: bytes
    max_frame: int
    nic_queues: tuple[int, ...]
    port_h: int                 # ifindex of the port's host end
    port_p: int                 # ifindex of the port end
    port_queues: int
    owner_pid: int
    owner_start: int
    ntuple_loc: int             # ethtool rule + 1, 0: none

    @classmethod
    def from_c(cls, vm_id: int, v: VmInfoC) -> "VmRecord":
        return cls(vm_id, u64_to_mac(v.mac), v.max_frame, mask_queues(v.queue_mask), v.port_h,
                   v.port_p, v.port_queues, v.owner_pid, v.owner_start, v.ntuple_loc)

    def to_c(self) -> VmInfoC:
        return VmInfoC(mac_to_u64(self.mac), queues_mask(self.nic_queues), self.max_frame,
                       self.port_h, self.port_p, self.port_queues, self.owner_pid,
                       self.ntuple_loc, self.owner_start)


def open_pin(path: str) -> int:
    """A fd for the BPF object pinned at *path*; FileNotFoundError if none."""
    fd = libbpf().obj_get(path)
    if fd == -errno.ENOENT:
        raise FileNotFoundError(errno.ENOENT, "not pinned", path)
    if fd in (-errno.EPERM, -errno.EACCES):
        raise PrivilegeError(f"opening {path} needs root (CAP_BPF)")
    if fd < 0:
        raise XdpnetError(f"cannot open pinned BPF object {path}: {os.strerror(-fd)}")
    return fd


def open_pins(directory: str, names: Mapping[str, str] | Iterable[str]) -> dict[str, int]:
    """Fds for the BPF objects pinned in *directory*: *names* are pin names
    (the keys of the result), or a mapping key -> pin name.  All or none:
    on any error (FileNotFoundError: one is not pinned) the fds opened so
    far are closed."""
    pins = names if isinstance(names, Mapping) else {n: n for n in names}
    fds: dict[str, int] = {}
    try:
        for key, pin in pins.items():
            fds[key] = open_pin(os.path.join(directory, pin))
    except BaseException:
        close_fds(fds)
        raise
    return fds


def close_fds(fds: dict[str, int]) -> None:
    """Close every fd of *fds* (from :func:`open_pins`)."""
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)


class MapSet:
    """Typed access to one NIC's maps (fds owned by this object)."""

    def __init__(self, fds: dict[str, int]):
        self.fds = dict(fds)
        lb = libbpf()
        self._lb = lb
        self._ncpu = lb.possible_cpus
        for name, (ksz, vsz, n) in LAYOUTS.items():
            info = lb.obj_info(self.fds[name])
            got = tuple(int.from_bytes(info[o:o + 4], sys.byteorder) for o in (8, 12, 16))
            if got != (ksz, vsz, n):
                raise BusyError(f"pinned map {name} has layout (key, value, entries) {got}, "
                                f"this xdpnet expects {(ksz, vsz, n)}: another xdpnet version "
                                "owns this NIC; stop its VMs first")

    @classmethod
    def open(cls, pin_dir: str) -> "MapSet":
        fds = open_pins(pin_dir, MAP_NAMES)
        try:
            return cls(fds)
        except BaseException:
            close_fds(fds)
            raise

    def close(self) -> None:
        close_fds(self.fds)
        self.fds = {}

    def ids(self) -> dict[str, int]:
        return {n: self._lb.obj_id(fd) for n, fd in self.fds.items()}

    # -- plumbing -----------------------------------------------------------

    def _update(self, name: str, key, value) -> int:
        rc = self._lb.update(self.fds[name], key, value)
        return -rc if rc < 0 else 0

    def _must_update(self, name: str, key, value) -> None:
        err = self._update(name, key, value)
        if err:
            raise XdpnetError(f"cannot update map {name}: {os.strerror(err)}")

    def _delete(self, name: str, key) -> bool:
        return self._lb.delete(self.fds[name], key) >= 0

    def _lookup(self, name: str, key, value) -> bool:
        return self._lb.lookup(self.fds[name], key, value) >= 0

    def _percpu(self, name: str, index: int, ctype):
        """The per-CPU values of array slot *index* (a list of *ctype*)."""
        size = (ct.sizeof(ctype) + 7) // 8 * 8
        buf = (ct.c_uint8 * (size * self._ncpu))()
        rc = self._lb.lookup(self.fds[name], u32(index), buf)
        if rc < 0:
            raise XdpnetError(f"cannot read map {name}[{index}]: {os.strerror(-rc)}")
        return [ctype.from_buffer_copy(buf, i * size) for i in range(self._ncpu)]

    # -- vm_macs --------------------------------------------------------------

    def macs(self) -> dict[bytes, VmEntryC]:
        out: dict[bytes, VmEntryC] = {}
        key, nxt = None, MacKey()
        fd = self.fds["vm_macs"]
        while self._lb.next_key(fd, key, nxt) >= 0:
            v = VmEntryC()
            if self._lb.lookup(fd, nxt, v) >= 0:
                out[bytes(nxt.b)[:6]] = v
            key, nxt = nxt, MacKey()
        return out

    def set_mac(self, mac: bytes, vm_id: int, max_frame: int, queue_mask: int) -> None:
        err = self._update("vm_macs", mac_key(mac), VmEntryC(vm_id, max_frame, queue_mask))
        if err == errno.E2BIG:
            raise BusyError(f"vm_macs is full ({MAX_VMS} VMs)")
        if err:
            raise XdpnetError(f"cannot update vm_macs: {os.strerror(err)}")

    def del_mac(self, mac: bytes) -> bool:
        return self._delete("vm_macs", mac_key(mac))

    # -- vms ------------------------------------------------------------------

    def vm(self, vm_id: int) -> VmRecord | None:
        v = VmInfoC()
        if not self._lookup("vms", u32(vm_id), v) or not v.mac:
            return None
        return VmRecord.from_c(vm_id, v)

    def all_vms(self) -> dict[int, VmRecord]:
        return {i: r for i in range(MAX_VMS) if (r := self.vm(i)) is not None}

    def set_vm(self, rec: VmRecord) -> None:
        self._must_update("vms", u32(rec.vm_id), rec.to_c())

    def clear_vm(self, vm_id: int) -> None:
        self._must_update("vms", u32(vm_id), VmInfoC())

    # -- XSKMAPs ----------------------------------------------------------------

    def set_xsk(self, name: str, key: int, fd: int) -> int:
        """0 or the errno of the update (EBADF, ENOTSOCK, EOPNOTSUPP: not an
        AF_XDP socket; EBUSY: …)."""
        return self._update(name, u32(key), ct.c_int(fd))

    def clear_xsk(self, name: str, key: int) -> None:
        self._delete(name, u32(key))            # ENOENT: already clear

    # -- egress, port_vm ----------------------------------------------------------

    def set_egress(self, slot: int, ifindex: int) -> None:
        self._must_update("egress", u32(slot), ct.c_int(ifindex))

    def del_egress(self, slot: int) -> None:
        self._delete("egress", u32(slot))

    def egress(self, slot: int) -> int:
        v = ct.c_int()
        return v.value if self._lookup("egress", u32(slot), v) else 0

    def set_port_vm(self, ifindex: int, vm_id: int) -> None:
        self._must_update("port_vm", u32(ifindex), u32(vm_id))

    def del_port_vm(self, ifindex: int) -> None:
        self._delete("port_vm", u32(ifindex))

    def port_vm(self) -> dict[int, int]:
        fd = self.fds["port_vm"]
        out, k, nxt = {}, None, u32()
        while self._lb.next_key(fd, k, nxt) >= 0:
            v = u32()
            if self._lb.lookup(fd, nxt, v) >= 0:
                out[nxt.value] = v.value
            k, nxt = nxt, u32()
        return out

    # -- config -------------------------------------------------------------------

    def config(self) -> ConfigC:
        c = ConfigC()
        self._lookup("config", u32(0), c)
        return c

    def set_config(self, c: ConfigC) -> None:
        self._must_update("config", u32(0), c)

    # -- counters -----------------------------------------------------------------

    def verdicts(self) -> dict[str, int]:
        return {name: sum(v.value for v in self._percpu("verdicts", i, u64))
                for i, name in enumerate(VERDICTS)}

    def vm_stat(self, vm_id: int) -> dict[str, int]:
        per_cpu = self._percpu("vm_stats", vm_id, VmStatC)
        return {f: sum(getattr(c, f) for c in per_cpu) for f in VM_STATS}

    def clear_vm_stat(self, vm_id: int) -> None:
        size = (ct.sizeof(VmStatC) + 7) // 8 * 8
        zero = (ct.c_uint8 * (size * self._ncpu))()
        self._must_update("vm_stats", u32(vm_id), zero)

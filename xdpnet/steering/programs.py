"""The four steering programs: compile with bcc, pin, attach to the NIC.

``bpf/`` holds one program per file and ``xdpnet_maps.h`` with the maps
they share.  :func:`compile_and_pin` compiles the four files as *one*
bcc module, so there is one copy of each map, then pins every map and
program under ``/sys/fs/bpf/xdpnet/<ifname>/`` (libbpf ``bpf_obj_pin``)
and lets bcc close its own descriptors: from then on every xdpnet process
- the one that compiled included - works on the pins.  bcc rewrites map
calls (``table.lookup()``) in the main file only, so the header is
inlined, once, where the first program includes it (``#line`` directives
keep compiler messages pointing at the right file and line).

XDP attach/detach is in :mod:`xdpnet.steering.xdp`.  The flood
program is a direct-action ``bpf`` filter on the NIC's clsact ingress,
recognised by its name and priority.
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from xdpnet.errors import (BusyError, DependencyError, PrivilegeError, XdpnetError)
from xdpnet.rundirs import make_dirs, remove_empty
from xdpnet.steering.kheaders import find_kernel_headers, import_bcc
from xdpnet.steering.libbpf import libbpf
from xdpnet.steering.maps import MAP_NAMES, close_fds, open_pins

log = logging.getLogger("xdpnet.steering")

BPFFS = "/sys/fs/bpf"
PIN_ROOT = os.path.join(BPFFS, "xdpnet")
HEADER = "xdpnet_maps.h"
# role -> (file, function, bcc program type name)
PROGRAMS = {
    "nic": ("xdpnet_nic.c", "xdpnet_nic", "XDP"),
    "flood": ("xdpnet_flood.c", "xdpnet_flood", "SCHED_CLS"),
    "port_rx": ("xdpnet_port_rx.c", "xdpnet_port_rx", "XDP"),
    "port_tx": ("xdpnet_port_tx.c", "xdpnet_port_tx", "XDP"),
}
PROG_PINS = {role: f"prog_{role}" for role in PROGRAMS}
TC_NAME = "xdpnet_flood"            # the filter's name, as tc shows it
TC_PRIO = 1                         # first on ingress: flooding sees every group frame
TC_HANDLE = 0xD1
CLSACT_INGRESS = 0xFFFFFFF2
BPF_FS_MAGIC = 0xCAFE4A11


def pin_dir(ifname: str) -> str:
    return os.path.join(PIN_ROOT, ifname)


# --------------------------------------------------------------------------
# sources

def bpf_dir() -> Path:
    """``bpf/``: in the package when installed (``xdpnet/bpf``), else in the
    source tree."""
    pkg = Path(__file__).resolve().parent.parent
    for d in (pkg / "bpf", pkg.parent / "bpf"):
        if (d / HEADER).is_file():
            return d
    raise DependencyError(f"BPF sources ({HEADER}) not found next to {pkg}: "
                          "reinstall xdpnet (tools/setup)")


def program_text(directory: Path | None = None) -> str:
    """The four programs as one compilation unit, the header inlined once."""
    d = directory or bpf_dir()
    header = (d / HEADER).read_text()
    include = f'#include "{HEADER}"'
    parts, inlined = [], False
    for fname, _, _ in PROGRAMS.values():
        lines = (d / fname).read_text().split("\n")
        out = [f'#line 1 "{fname}"']
        for n, line in enumerate(lines, 1):
            if line.strip() == include:
                if not inlined:
                    out += [f'#line 1 "{HEADER}"', header]
                    inlined = True
                out.append(f'#line {n + 1} "{fname}"')
            else:
                out.append(line)
        parts.append("\n".join(out))
    if not inlined:
        raise XdpnetError(f"no program in {d} includes {HEADER}")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------
# bpffs

def bpffs_mounted(path: str = BPFFS) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(fields[1] == path and fields[2] == "bpf"
                       for fields in (line.split() for line in f) if len(fields) > 2)
    except OSError:
        return False


def ensure_bpffs(path: str = BPFFS) -> None:
    """Mount a bpf filesystem at *path* unless one is there."""
    if bpffs_mounted(path):
        return
    libc = ct.CDLL(ctypes.util.find_library("c"), use_errno=True)
    os.makedirs(path, exist_ok=True)
    if libc.mount(b"bpf", path.encode(), b"bpf", 0, b"mode=0700") != 0:
        e = ct.get_errno()
        if e in (errno.EPERM, errno.EACCES):
            raise PrivilegeError(f"mounting bpffs at {path} needs root")
        raise XdpnetError(f"cannot mount bpffs at {path}: {os.strerror(e)}")
    log.info("mounted bpffs at %s", path)


# --------------------------------------------------------------------------
# compile, load, pin

def compile_and_pin(directory: str) -> float:
    """Compile and load the programs, pin every map and program into
    *directory* (created; must not hold pins).  Returns the compile+load
    seconds.  On failure nothing is left pinned."""
    bcc = import_bcc()
    headers = find_kernel_headers()
    text = program_text()
    saved = os.environ.get("BCC_KERNEL_SOURCE")
    t0 = time.monotonic()
    bpf = None
    try:
        if headers.source:
            os.environ["BCC_KERNEL_SOURCE"] = headers.source
        try:
            bpf = bcc.BPF(text=text.encode(), cflags=list(headers.cflags))
            fns = {role: bpf.load_func(fn.encode(), getattr(bcc.BPF, kind))
                   for role, (_, fn, kind) in PROGRAMS.items()}
        except Exception as e:
            msg = str(e)
            if "Operation not permitted" in msg or "Permission denied" in msg:
                raise PrivilegeError("loading BPF programs needs root "
                                     "(CAP_BPF, CAP_NET_ADMIN)") from None
            if "kernel headers" in msg.lower():
                raise DependencyError(f"bcc found no kernel headers ({headers.origin or 'none'}): "
                                      "apt-get install linux-headers-amd64") from None
            raise XdpnetError(f"cannot compile/load the steering programs with bcc: {msg}") \
                from None
        seconds = time.monotonic() - t0
        make_dirs(directory, mode=0o700)
        lb = libbpf()
        try:
            for name in MAP_NAMES:
                _pin(lb, bpf[name.encode()].map_fd, os.path.join(directory, name))
            for role, fn in fns.items():
                _pin(lb, fn.fd, os.path.join(directory, PROG_PINS[role]))
        except BaseException:
            unpin_all(directory)
            raise
        return seconds
    finally:
        if bpf is not None:
            try:
                bpf.cleanup()           # closes bcc's fds; the pins keep the objects
            except Exception:           # noqa: BLE001
                pass
        if headers.source:
            if saved is None:
                os.environ.pop("BCC_KERNEL_SOURCE", None)
            else:
                os.environ["BCC_KERNEL_SOURCE"] = saved


def _pin(lb, fd: int, path: str) -> None:
    rc = lb.obj_pin(fd, path)
    if rc < 0:
        raise XdpnetError(f"cannot pin {path}: {os.strerror(-rc)}")


def unpin_all(directory: str) -> None:
    """Remove every pin of ours in *directory*, the directory, and
    PIN_ROOT when no other NIC's directory is left in it."""
    for name in (*MAP_NAMES, *PROG_PINS.values()):
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    if os.path.isdir(directory) and os.listdir(directory):
        log.warning("%s not removed: it holds pins that are not ours", directory)
        return
    remove_empty(directory, PIN_ROOT)


@dataclass
class ProgSet:
    """Fds (ours) and kernel ids of the four pinned programs."""

    fds: dict[str, int]
    ids: dict[str, int]

    @classmethod
    def open(cls, directory: str) -> "ProgSet":
        fds = open_pins(directory, PROG_PINS)
        try:
            lb = libbpf()
            return cls(fds, {role: lb.obj_id(fd) for role, fd in fds.items()})
        except BaseException:
            close_fds(fds)
            raise

    def close(self) -> None:
        close_fds(self.fds)
        self.fds = {}


def pinned_prog_id(directory: str, role: str = "nic") -> int | None:
    """Kernel id of a pinned program, None if not pinned."""
    try:
        fds = open_pins(directory, {role: PROG_PINS[role]})
    except FileNotFoundError:
        return None
    try:
        return libbpf().obj_id(fds[role])
    finally:
        close_fds(fds)


# --------------------------------------------------------------------------
# TC on the NIC

def _tc_filters(ipr: IPRoute, ifindex: int) -> list:
    try:
        return list(ipr.get_filters(index=ifindex, parent=CLSACT_INGRESS))
    except NetlinkError as e:
        if e.code in (errno.EINVAL, errno.ENOENT):     # no clsact qdisc
            return []
        raise


def _is_ours(f) -> bool:
    opts = f.get_attr("TCA_OPTIONS")
    name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
    return (f.get_attr("TCA_KIND") == "bpf" and f["info"] >> 16 == TC_PRIO
            and f["handle"] == TC_HANDLE and bool(name) and name.startswith(TC_NAME))


def tc_attach(ifindex: int, prog_fd: int) -> bool:
    """Add the flood filter on clsact ingress (creating the qdisc if
    needed).  Returns whether we created the clsact qdisc."""
    with IPRoute() as ipr:
        created = False
        try:
            ipr.tc("add", "clsact", ifindex)
            created = True
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise XdpnetError(f"cannot add a clsact qdisc: {os.strerror(e.code)}") from None
        try:
            ipr.tc("add-filter", "bpf", ifindex, TC_HANDLE, fd=prog_fd, name=TC_NAME,
                   parent=CLSACT_INGRESS, classid=1, direct_action=True, prio=TC_PRIO)
        except NetlinkError as e:
            if created:
                _del_clsact(ipr, ifindex)
            if e.code == errno.EEXIST:
                raise BusyError(f"ifindex {ifindex} already has a TC ingress filter at "
                                f"priority {TC_PRIO} handle {TC_HANDLE:#x}") from None
            raise XdpnetError(f"cannot add the TC flood filter: {os.strerror(e.code)}") \
                from None
        return created


def tc_present(ifindex: int) -> bool:
    """True if our flood filter is on the device's clsact ingress."""
    with IPRoute() as ipr:
        return any(_is_ours(f) for f in _tc_filters(ipr, ifindex))


def tc_detach(ifindex: int, remove_clsact: bool) -> None:
    """Remove our flood filter; the clsact qdisc too if we created it and
    no other filter is left on it."""
    with IPRoute() as ipr:
        try:
            if any(_is_ours(f) for f in _tc_filters(ipr, ifindex)):
                ipr.tc("del-filter", "bpf", ifindex, TC_HANDLE, parent=CLSACT_INGRESS,
                       prio=TC_PRIO)
            if remove_clsact:
                left = [f for f in _tc_filters(ipr, ifindex) if f["handle"]]
                try:
                    left += [f for f in ipr.get_filters(index=ifindex, parent=0xFFFFFFF3)
                             if f["handle"]]
                except NetlinkError:
                    pass
                if not left:
                    _del_clsact(ipr, ifindex)
        except NetlinkError as e:
            if e.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                log.warning("TC flood filter on ifindex %d not removed: %s", ifindex,
                            os.strerror(e.code))


def _del_clsact(ipr: IPRoute, ifindex: int) -> None:
    try:
        ipr.tc("del", "clsact", ifindex)
    except NetlinkError:
        pass

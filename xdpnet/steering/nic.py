"""Steering of one NIC shared by many VMs (docs/steering.md).

:class:`NicSteering` is one process's handle on a NIC.  Opening it takes
``flock(/run/xdpnet/<ifname>.lock)`` and either *joins* the programs and
maps pinned under ``/sys/fs/bpf/xdpnet/<ifname>/`` (loaded by this or
another, possibly dead, xdpnet process: nothing is compiled, no second
program is attached) or, when nothing is pinned, compiles the four
programs (bcc), pins them and their maps, attaches XDP and the TC flood
filter to the NIC.  :meth:`NicSteering.add_vm` validates a VM, creates
its port (:mod:`xdpnet.net.port`) and writes its map entries, all under
the lock; the returned :class:`VmSteering` is what the backend calls to
put its AF_XDP sockets into the XSKMAPs.  When the last VM of a NIC
leaves, the programs are detached (XDP with ``XDP_FLAGS_REPLACE`` naming
ours, so a foreign program is never removed), the TC filter removed and
every pin deleted.

Every VM entry records its owner (pid and start time).  VMs whose owner
died are *reaped* - entries, port and all - the next time any process
opens the NIC, adds or removes a VM.  ``xdpnet stats`` and friends read a
NIC's state without loading anything and without the lock through
:func:`read_pinned`.

Usage::

    nic = NicSteering("ens1f0")                     # open or join
    vm = nic.add_vm("52:54:00:12:34:56", 1518, nic_queues=(0, 1), port_pairs=2)
    vm.set_xsk("nic", 0, fd)                        # backend: direct socket of pair 0
    vm.set_xsk("port", 0, port_fd)                  # ... and its port socket
    ...
    vm.remove(); nic.close()                        # last VM: nothing left pinned
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import subprocess
import threading
import weakref
from dataclasses import asdict, dataclass, replace

from xdpnet import privilege
from xdpnet.errors import BusyError, PrivilegeError, UsageError, XdpnetError
from xdpnet.net.device import NetDevice
from xdpnet.net.mac import format_mac, mac_to_u64, vm_mac
from xdpnet.net.port import VmPort, delete_port, port_names, ports_of
from xdpnet.rundirs import RUN_DIR, flocked, proc_start, process_alive
from xdpnet.steering import programs
from xdpnet.steering.libbpf import FLAG_MODES, MODE_FLAGS
from xdpnet.steering.maps import (EGRESS_NIC, LAYOUT_VERSION, MAX_QUEUES, MAX_VMS, PORT_QUEUES,
                                  TC_CREATED_CLSACT, VERDICTS, VM_STATS, ConfigC, MapSet,
                                  VmRecord, queues_mask)
from xdpnet.steering import xdp
from xdpnet.steering.programs import ProgSet, pin_dir
from xdpnet.steering.xdp import MODES

log = logging.getLogger("xdpnet.steering")

LOCK_DIR = RUN_DIR
LOCK_TIMEOUT = 60.0         # seconds to wait for another process's change
MIN_FRAME, MAX_FRAME = 14, 65535
XSK_KINDS = ("nic", "port")


# --------------------------------------------------------------------------
# helpers

def nic_lock(ifname: str, timeout: float = LOCK_TIMEOUT):
    """``flock(/run/xdpnet/<ifname>.lock)``, exclusive; BusyError after
    *timeout* seconds.  Released by the process that leaves the NIC without
    steering state (no pin directory), the file and an empty /run/xdpnet go
    too."""
    return flocked(LOCK_DIR, f"{ifname}.lock", timeout=timeout,
                   unused=lambda: not os.path.isdir(pin_dir(ifname)))


def _check_privileges() -> None:
    """Loading needs CAP_BPF (or CAP_SYS_ADMIN), attaching CAP_NET_ADMIN.
    Checked up front: bcc reports a missing privilege as a compile error."""
    try:
        missing = privilege.missing_caps(("CAP_NET_ADMIN", "CAP_BPF"))
    except OSError:
        return                                  # unknown: let the kernel decide
    if missing:
        raise PrivilegeError(f"XDP steering needs root ({' and '.join(missing)} missing)")


def _ifname(ifindex: int) -> str | None:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return None


# --------------------------------------------------------------------------
# changes made by this process (other processes' are seen by polling)

_generation = 0
_changed = threading.Condition()


def vm_change_generation() -> int:
    """A number that grows whenever this process adds or removes a VM on any NIC."""
    return _generation


def wait_vm_change(last: int, timeout: float) -> int:
    """Wait up to *timeout* s for this process to add or remove a VM after
    generation *last*; returns the current generation.  Changes made by
    other processes wake nobody: poll :meth:`NicSteering.local_macs`."""
    with _changed:
        _changed.wait_for(lambda: _generation != last, timeout)
        return _generation


def notify_vm_change() -> None:
    global _generation
    with _changed:
        _generation += 1
        _changed.notify_all()


# --------------------------------------------------------------------------
# hardware MAC -> queue rules (best effort)

def _ntuple_add(ifname: str, driver: str | None, mac: bytes, queue: int) -> int | None:
    """``ethtool -N IF flow-type ether dst MAC action Q`` if the NIC has
    ntuple filters; the rule's location, or None (logged)."""
    m = format_mac(mac)
    if driver == "veth":
        log.info("ntuple: %s (veth) has no ntuple filters: %s is steered in software only "
                 "(its frames on other queues reach it through its port)", ifname, m)
        return None
    try:
        k = subprocess.run(["ethtool", "-k", ifname], capture_output=True, text=True, timeout=5)
        if not re.search(r"^ntuple-filters: on", k.stdout, re.M):
            log.info("ntuple: %s has ntuple filters off or unsupported: %s is steered in "
                     "software only (ethtool -K %s ntuple on to enable)", ifname, m, ifname)
            return None
        r = subprocess.run(["ethtool", "-N", ifname, "flow-type", "ether", "dst", m,
                            "action", str(queue)], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.info("ntuple: ethtool not usable (%s): %s steered in software only", e, m)
        return None
    found = re.search(r"rule with ID (\d+)", r.stdout + r.stderr)
    if r.returncode != 0 or not found:
        log.warning("ntuple: ethtool -N %s flow-type ether dst %s action %d failed: %s",
                    ifname, m, queue, (r.stderr or r.stdout).strip())
        return None
    log.info("ntuple: %s steers %s to queue %d in hardware (rule %s)", ifname, m, queue,
             found.group(1))
    return int(found.group(1))


def _ntuple_del(ifname: str, loc: int) -> None:
    try:
        subprocess.run(["ethtool", "-N", ifname, "delete", str(loc)], capture_output=True,
                       timeout=5)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("ntuple rule %d on %s not removed: %s", loc, ifname, e)


# --------------------------------------------------------------------------
# records for callers

@dataclass(frozen=True)
class VmInfo:
    """A VM on a NIC, as the pinned maps describe it."""

    vm_id: int
    mac: str
    max_frame: int
    nic_queues: tuple[int, ...]
    port_queues: int
    host_ifname: str            # the port's host end (xn<I>v<N>h)
    port_ifname: str            # the port end (xn<I>v<N>p)
    owner_pid: int
    owner_alive: bool


def _vm_info(nic_ifindex: int, r: VmRecord) -> VmInfo:
    host, port = port_names(nic_ifindex, r.vm_id)
    return VmInfo(r.vm_id, format_mac(r.mac), r.max_frame, r.nic_queues, r.port_queues,
                  _ifname(r.port_h) or host, _ifname(r.port_p) or port, r.owner_pid,
                  process_alive(r.owner_pid, r.owner_start))


def read_pinned(ifname: str) -> dict:
    """A NIC's steering state from its pins, loading nothing and taking no
    lock (for ``xdpnet stats/top/metrics`` in another process)::

        {"ifname", "pin_dir", "nic_ifindex", "xdp_mode",
         "verdicts": {name: frames},                      # maps.VERDICTS
         "vms": {vm_id: {vm_id, mac, max_frame, nic_queues, port_queues,
                         host_ifname, port_ifname, owner_pid, owner_alive,
                         "counters": {name: n}}}}         # maps.VM_STATS

    Raises :class:`UsageError` if nothing is pinned for *ifname*.
    """
    d = pin_dir(ifname)
    try:
        maps = MapSet.open(d)
    except FileNotFoundError:
        raise UsageError(f"no xdpnet steering on {ifname!r} ({d} has no pins)") from None
    try:
        cfg = maps.config()
        vms = {}
        for r in maps.all_vms().values():
            v = asdict(_vm_info(cfg.nic_ifindex, r))
            v["nic_queues"] = list(r.nic_queues)
            v["counters"] = maps.vm_stat(r.vm_id)
            vms[r.vm_id] = v
        return {"ifname": ifname, "pin_dir": d, "nic_ifindex": cfg.nic_ifindex,
                "xdp_mode": FLAG_MODES.get(cfg.xdp_flags, "unknown"),
                "verdicts": maps.verdicts(), "vms": vms}
    finally:
        maps.close()


# --------------------------------------------------------------------------
# the per-process state of one NIC (what the finalizer needs)

class _NicState:
    def __init__(self, ifname: str, ifindex: int):
        self.ifname = ifname
        self.ifindex = ifindex
        self.dir = pin_dir(ifname)
        self.maps: MapSet | None = None
        self.progs: ProgSet | None = None
        self.mode = ""
        self.own: dict[int, bytes] = {}     # vm_id -> MAC of the VMs added here
        self.lock = threading.RLock()
        self.closed = False

    # -- fds ---------------------------------------------------------------

    def drop_fds(self) -> None:
        if self.maps is not None:
            self.maps.close()
            self.maps = None
        if self.progs is not None:
            self.progs.close()
            self.progs = None

    def open_pins_locked(self) -> bool:
        """Open the pinned programs and maps as they are (no join, no
        repair).  Incomplete pins are torn down: False.  The caller drops
        the fds (:meth:`drop_fds`), also when this raises."""
        self.drop_fds()
        try:
            self.progs = ProgSet.open(self.dir)
            self.maps = MapSet.open(self.dir)
        except FileNotFoundError:
            log.warning("incomplete pins in %s: removing them", self.dir)
            self.teardown_locked()
            return False
        return True

    def current(self) -> bool:
        """True if our fds are the pinned objects (not torn down and
        reloaded by another process since we opened them)."""
        if self.progs is None:
            return False
        return programs.pinned_prog_id(self.dir) == self.progs.ids["nic"]

    # -- open / join / load (call with the NIC lock held) ---------------------

    def open_locked(self, mode: str) -> tuple[bool, float, str | None]:
        """Join or load.  Returns (loaded here, compile seconds, notice)."""
        self.drop_fds()
        programs.ensure_bpffs()
        if os.path.isdir(self.dir) and self._join(mode):
            return False, 0.0, None
        if xdp.attached_prog_ids(self.ifname):
            raise xdp.busy_error(self.ifname)
        seconds = programs.compile_and_pin(self.dir)
        try:
            self.progs = ProgSet.open(self.dir)
            self.maps = MapSet.open(self.dir)
            cfg = ConfigC(0, self.ifindex, 0, 0, programs.TC_HANDLE, programs.TC_PRIO)
            self.mode, notice = xdp.xdp_attach(self.ifname, self.ifindex,
                                                    self.progs.fds["nic"], mode)
            cfg.xdp_flags = MODE_FLAGS[self.mode]
            self.maps.set_config(cfg)
            if programs.tc_attach(self.ifindex, self.progs.fds["flood"]):
                cfg.tc_flags |= TC_CREATED_CLSACT
            self.maps.set_config(cfg)
            self.maps.set_egress(EGRESS_NIC, self.ifindex)
            cfg.version = LAYOUT_VERSION            # complete: others may join
            self.maps.set_config(cfg)
        except BaseException:
            self.teardown_locked()
            raise
        log.info("steering loaded on %s (%s XDP, compiled in %.2f s, pinned at %s)",
                 self.ifname, self.mode, seconds, self.dir)
        return True, seconds, notice

    def _join(self, mode: str) -> bool:
        """Use the pins if they are complete and ours is the attached
        program; repair a detached program; clean up stale pins (False)."""
        if not self.open_pins_locked():
            return False
        assert self.maps is not None and self.progs is not None
        cfg = self.maps.config()
        if cfg.version not in (0, LAYOUT_VERSION):
            v = cfg.version
            self.drop_fds()
            raise BusyError(f"{self.ifname!r} is steered by an xdpnet with map layout {v} "
                            f"(this one: {LAYOUT_VERSION}): stop its VMs first")
        attached = xdp.attached_prog_ids(self.ifname)
        ours = self.progs.ids["nic"] in attached.values()
        same_nic = cfg.version == LAYOUT_VERSION and cfg.nic_ifindex == self.ifindex
        if same_nic and not attached:
            loaded_mode = FLAG_MODES.get(cfg.xdp_flags, "native")
            log.warning("xdpnet's XDP program was detached from %s: attaching it again",
                        self.ifname)
            xdp.xdp_attach(self.ifname, self.ifindex, self.progs.fds["nic"], loaded_mode)
            ours = True
        if not (same_nic and ours):
            log.warning("stale pins in %s (NIC re-created, or its program replaced): "
                        "removing them", self.dir)
            self.teardown_locked()
            return False
        self.mode = FLAG_MODES.get(cfg.xdp_flags, "native")
        if mode != "auto" and mode != self.mode:
            m = self.mode
            self.drop_fds()
            raise BusyError(f"{self.ifname!r} is already steered by xdpnet in {m} XDP mode "
                            f"(asked for {mode})")
        if not programs.tc_present(self.ifindex):
            log.warning("xdpnet's TC flood filter was removed from %s: adding it again",
                        self.ifname)
            if programs.tc_attach(self.ifindex, self.progs.fds["flood"]):
                cfg.tc_flags |= TC_CREATED_CLSACT
                self.maps.set_config(cfg)
        return True

    def ensure_current_locked(self, mode: str = "auto") -> None:
        """Reopen if another process tore the NIC down (and maybe loaded it
        again) since we opened it."""
        if not self.current():
            log.info("steering on %s was reloaded by another process: joining again",
                     self.ifname)
            self.open_locked(mode if not self.mode else self.mode)

    # -- teardown (lock held) ---------------------------------------------------

    def teardown_locked(self) -> None:
        """Detach everything ours from the NIC, delete every port, remove
        the pins.  Tolerates half-made state (``self.maps``/``progs`` may be
        None or partial)."""
        cfg = self.maps.config() if self.maps is not None else ConfigC()
        nic_index = cfg.nic_ifindex or self.ifindex
        if self.maps is not None:
            for r in self.maps.all_vms().values():
                self._drop_vm_resources(r, nic_index)
        for host in ports_of(nic_index):
            delete_port(host)
        if nic_index == self.ifindex:
            programs.tc_detach(self.ifindex, bool(cfg.tc_flags & TC_CREATED_CLSACT))
            if self.progs is not None:
                flags = [cfg.xdp_flags] if cfg.xdp_flags else list(MODE_FLAGS.values())
                for f in flags:
                    xdp.xdp_detach(self.ifname, self.ifindex, f, self.progs.fds["nic"])
        programs.unpin_all(self.dir)
        self.drop_fds()
        log.info("steering removed from %s (nothing left pinned)", self.ifname)

    def _drop_vm_resources(self, r: VmRecord, nic_index: int) -> None:
        if r.ntuple_loc:
            _ntuple_del(self.ifname, r.ntuple_loc - 1)
        host, _ = port_names(nic_index, r.vm_id)
        delete_port(host)

    # -- VMs (lock held) ------------------------------------------------------------

    def remove_vm_locked(self, r: VmRecord) -> None:
        """Entries first (steering stops), then the port."""
        m = self.maps
        assert m is not None
        m.del_mac(r.mac)
        m.del_egress(1 + r.vm_id)
        for q in r.nic_queues:
            m.clear_xsk("nic_xsks", q)
        for q in range(PORT_QUEUES):
            m.clear_xsk("port_xsks", r.vm_id * PORT_QUEUES + q)
        for ifindex, vm in m.port_vm().items():
            if vm == r.vm_id:
                m.del_port_vm(ifindex)
        m.clear_vm(r.vm_id)
        self._drop_vm_resources(r, self.ifindex)
        self.own.pop(r.vm_id, None)

    def reap_locked(self) -> list[int]:
        """Remove the VMs whose owner process is gone."""
        assert self.maps is not None
        gone = []
        for r in self.maps.all_vms().values():
            if not process_alive(r.owner_pid, r.owner_start):
                log.warning("VM %d (%s) on %s: owner process %d is gone: removing it",
                            r.vm_id, format_mac(r.mac), self.ifname, r.owner_pid)
                self.remove_vm_locked(r)
                gone.append(r.vm_id)
        return gone

    def teardown_if_empty_locked(self) -> bool:
        if self.maps is not None and not self.maps.all_vms():
            self.teardown_locked()
            return True
        return False

    # -- the end of this handle -----------------------------------------------------

    def close(self) -> None:
        """Remove the VMs added through this handle; if the NIC then has no
        VM, tear it down.  Idempotent; used by the finalizer too."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            try:
                with nic_lock(self.ifname):
                    if self.current():
                        assert self.maps is not None
                        for vm_id, mac in list(self.own.items()):
                            r = self.maps.vm(vm_id)
                            if r is not None and r.mac == mac:
                                self.remove_vm_locked(r)
                        self.reap_locked()
                        self.teardown_if_empty_locked()
            finally:
                self.own.clear()
                self.drop_fds()


# --------------------------------------------------------------------------

class NicSteering:
    """One process's handle on the steering of NIC *ifname*.

    ``mode``: ``"native"`` (driver XDP), ``"generic"`` (skb XDP) or
    ``"auto"`` (native, else generic with a logged :attr:`notice`; when
    joining, whatever the NIC already runs).  Raises :class:`UsageError`
    for an unknown interface or mode, :class:`BusyError` if the interface
    has a foreign XDP program or xdpnet runs it in another mode than the
    one asked for, :class:`PrivilegeError` without CAP_BPF/CAP_NET_ADMIN,
    :class:`DependencyError` without bcc or kernel headers (only the
    process that loads needs them).

    :meth:`close` (or the end of a ``with`` block, garbage collection,
    interpreter exit) removes the VMs added through this handle and, if
    none is left on the NIC, everything xdpnet put there.
    """

    def __init__(self, ifname: str, mode: str = "auto"):
        if mode not in MODES:
            raise UsageError(f"XDP mode {mode!r} unknown (one of {', '.join(MODES)})")
        ifindex = xdp.ifindex_of(ifname)
        _check_privileges()
        self.ifname = ifname
        self.ifindex = ifindex
        st = _NicState(ifname, ifindex)
        with nic_lock(ifname):
            try:
                self.loaded, self.compile_seconds, self.notice = st.open_locked(mode)
                st.reap_locked()
            except BaseException:
                st.drop_fds()
                raise
        self._st = st
        self._finalizer = weakref.finalize(self, st.close)

    # -- lifecycle --------------------------------------------------------------

    @property
    def xdp_mode(self) -> str:
        """``"native"`` or ``"generic"``: the mode the NIC program runs in."""
        return self._st.mode

    @property
    def closed(self) -> bool:
        return self._st.closed

    @property
    def pin_dir(self) -> str:
        return self._st.dir

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "NicSteering":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.xdp_mode
        return f"<NicSteering {self.ifname} {state}>"

    @contextlib.contextmanager
    def _locked(self):
        """The NIC lock, with our fds current and dead owners' VMs reaped."""
        st = self._st
        with st.lock:
            if st.closed:
                raise XdpnetError(f"steering handle of {self.ifname!r} is closed")
            with nic_lock(self.ifname):
                st.ensure_current_locked()
                yield st

    @contextlib.contextmanager
    def detached(self):
        """The NIC without the steering program for a while -- another XDP
        user needs the slot (tools/bench: DPDK's net_af_xdp, a plain bridge
        port).  Pins, maps and VMs stay; the program is attached again
        afterwards in the same mode, with no recompile."""
        with self._locked() as st:
            assert st.progs is not None
            xdp.xdp_detach(self.ifname, self.ifindex, MODE_FLAGS[st.mode], st.progs.fds["nic"])
        try:
            yield self
        finally:
            with self._locked() as st:
                assert st.progs is not None
                if st.progs.ids["nic"] not in xdp.attached_prog_ids(self.ifname).values():
                    xdp.xdp_attach(self.ifname, self.ifindex, st.progs.fds["nic"], st.mode)

    def _maps(self) -> MapSet:
        st = self._st
        if st.closed or st.maps is None:
            raise XdpnetError(f"steering handle of {self.ifname!r} is closed")
        return st.maps

    # -- VMs --------------------------------------------------------------------

    def add_vm(self, mac: str | bytes, max_frame: int, nic_queues: tuple[int, ...] = (),
               port_pairs: int = 0, vm_id: int | None = None) -> "VmSteering":
        """Attach VM *mac*: frames for it on *nic_queues* (queues it owns)
        go straight to its sockets there, everything else for it (other
        queues, broadcast/multicast, other VMs) through its port, which
        gets ``max(1, port_pairs)`` queues.  Frames longer than
        *max_frame* are dropped and counted.  *vm_id* None: the lowest free.

        Raises :class:`UsageError` (malformed or group MAC, a queue beyond
        the NIC's channels, bad sizes) or :class:`BusyError` (MAC already
        attached on this NIC, a queue owned by another VM, the VM id taken,
        64 VMs).  On failure nothing is left behind.
        """
        macb = vm_mac(mac)
        if not isinstance(max_frame, int) or not MIN_FRAME <= max_frame <= MAX_FRAME:
            raise UsageError(f"max_frame {max_frame!r} out of range ({MIN_FRAME}..{MAX_FRAME})")
        queues = tuple(nic_queues)
        dev = NetDevice.lookup(self.ifname)
        for q in queues:
            if not isinstance(q, int) or isinstance(q, bool) or q < 0:
                raise UsageError(f"queue {q!r} is not a queue number")
            if q >= min(dev.channels, MAX_QUEUES):
                dev.validate_queue(q)       # the device's own message
                raise UsageError(f"queue {q}: xdpnet serves NIC queues 0-{MAX_QUEUES - 1}")
        if len(set(queues)) != len(queues):
            raise UsageError(f"NIC queues {queues} repeat a queue")
        if not isinstance(port_pairs, int) or not 0 <= port_pairs <= PORT_QUEUES:
            raise UsageError(f"port pairs {port_pairs!r} out of range (0..{PORT_QUEUES})")
        if not queues and not port_pairs:
            raise UsageError("a VM needs NIC queues or port pairs")
        if vm_id is not None and (not isinstance(vm_id, int) or not 0 <= vm_id < MAX_VMS):
            raise UsageError(f"VM id {vm_id!r} out of range (0..{MAX_VMS - 1})")
        with self._locked() as st:
            maps = st.maps
            assert maps is not None and st.progs is not None
            st.reap_locked()
            vms = maps.all_vms()
            by_mac = {r.mac: r.vm_id for r in vms.values()}
            if macb in by_mac:
                raise BusyError(f"MAC {format_mac(macb)} is already attached on {self.ifname} "
                                f"(VM {by_mac[macb]})")
            owners = {q: r.vm_id for r in vms.values() for q in r.nic_queues}
            for q in queues:
                if q in owners:
                    raise BusyError(f"queue {q} of {self.ifname} is owned by VM {owners[q]}")
            if vm_id is None:
                free = [i for i in range(MAX_VMS) if i not in vms]
                if not free:
                    raise BusyError(f"{self.ifname} serves {MAX_VMS} VMs already")
                vm_id = free[0]
            elif vm_id in vms:
                raise BusyError(f"VM id {vm_id} is taken on {self.ifname}")
            port = VmPort.create(self.ifindex, vm_id, queues=max(1, port_pairs),
                                 max_frame=max_frame, rx_prog_fd=st.progs.fds["port_rx"],
                                 tx_prog_fd=st.progs.fds["port_tx"])
            pid = os.getpid()
            rec = VmRecord(vm_id, macb, max_frame, tuple(sorted(queues)), port.host_ifindex,
                           port.port_ifindex, port.queues, pid, proc_start(pid) or 0, 0)
            try:
                maps.clear_vm_stat(vm_id)
                maps.set_vm(rec)
                maps.set_port_vm(port.host_ifindex, vm_id)
                maps.set_port_vm(port.port_ifindex, vm_id)
                maps.set_egress(1 + vm_id, port.host_ifindex)
                maps.set_mac(macb, vm_id, max_frame, queues_mask(queues))   # live from here
                st.own[vm_id] = macb
                if queues:
                    loc = _ntuple_add(self.ifname, dev.driver, macb, min(queues))
                    if loc is not None:
                        # rec names the rule from here: undoing it deletes the rule
                        rec = replace(rec, ntuple_loc=loc + 1)
                        maps.set_vm(rec)
            except BaseException:
                st.remove_vm_locked(rec)
                raise
        log.info("VM %d (%s) on %s: NIC queues %s, port %s (%d queue(s))", vm_id,
                 format_mac(macb), self.ifname, list(queues) or "none", port.port, port.queues)
        notify_vm_change()
        return VmSteering(self, rec, port.host, port.port)

    def reap(self) -> list[int]:
        """Remove the VMs whose owner process is gone; returns their ids.
        (Opening a handle, adding and removing a VM reap too.  The NIC is
        torn down only when a VM is removed or a handle closed.)"""
        with self._locked() as st:
            gone = st.reap_locked()
        if gone:
            notify_vm_change()
        return gone

    def _remove(self, vm: "VmSteering") -> None:
        st = self._st
        with st.lock:
            if st.closed:
                return
            with nic_lock(self.ifname):
                if not st.current():        # torn down meanwhile: our VM went with it
                    st.own.pop(vm.vm_id, None)
                    return
                assert st.maps is not None
                r = st.maps.vm(vm.vm_id)
                if r is not None and r.mac == vm.mac_bytes and r.owner_pid == os.getpid():
                    st.remove_vm_locked(r)
                st.own.pop(vm.vm_id, None)
                st.reap_locked()
                st.teardown_if_empty_locked()

    # -- reading ----------------------------------------------------------------

    def vms(self) -> list[VmInfo]:
        """Every VM on the NIC (all processes), from the pinned maps."""
        maps = self._maps()
        return [_vm_info(self.ifindex, r) for r in maps.all_vms().values()]

    def local_macs(self) -> list[int]:
        """The MAC of every VM on the NIC as u64 (6 bytes in wire order at
        the start of a little-endian u64)."""
        return sorted(mac_to_u64(m) for m in self._maps().macs())

    def verdict_counters(self) -> dict[str, int]:
        """Frames per verdict since load, summed over CPUs (names in
        :data:`xdpnet.steering.maps.VERDICTS`)."""
        return self._maps().verdicts()

    def vm_counters(self, vm_id: int) -> dict[str, int]:
        """Per-VM counters summed over CPUs (:data:`~xdpnet.steering.maps.VM_STATS`)."""
        if not isinstance(vm_id, int) or not 0 <= vm_id < MAX_VMS:
            raise UsageError(f"VM id {vm_id!r} out of range (0..{MAX_VMS - 1})")
        return self._maps().vm_stat(vm_id)

    def prog_ids(self) -> dict[str, int]:
        """Kernel ids of the four programs this handle uses."""
        st = self._st
        if st.progs is None:
            raise XdpnetError(f"steering handle of {self.ifname!r} is closed")
        return dict(st.progs.ids)


class VmSteering:
    """One VM on a NIC: its map entries and port.  What the backend calls
    (``XskSteering``): :meth:`set_xsk` / :meth:`clear_xsk`."""

    def __init__(self, nic: NicSteering, rec: VmRecord, host_ifname: str, port_ifname: str):
        self.nic = nic                  # keeps the NIC handle alive while the VM is
        self.rec = rec                  # as last written to the vms map by this handle
        self.host_ifname = host_ifname
        self.port_ifname = port_ifname  # where the backend binds its port sockets
        self.removed = False

    @property
    def vm_id(self) -> int:
        return self.rec.vm_id

    @property
    def mac_bytes(self) -> bytes:
        return self.rec.mac

    @property
    def mac(self) -> str:
        return format_mac(self.rec.mac)

    @property
    def mac_u64(self) -> int:
        """The MAC as u64 (:func:`xdpnet.net.mac.mac_to_u64`)."""
        return mac_to_u64(self.rec.mac)

    @property
    def max_frame(self) -> int:
        return self.rec.max_frame

    @property
    def nic_queues(self) -> tuple[int, ...]:
        return self.rec.nic_queues

    @property
    def port_queues(self) -> int:
        return self.rec.port_queues

    def __repr__(self) -> str:
        return (f"<VmSteering {self.vm_id} {self.mac} on {self.nic.ifname}: "
                f"queues {list(self.nic_queues)}, port {self.port_ifname}>")

    def _key(self, kind: str, queue: int) -> tuple[str, int]:
        if kind == "nic":
            if queue not in self.nic_queues:
                raise UsageError(f"NIC queue {queue!r} is not one of VM {self.vm_id}'s "
                                 f"({list(self.nic_queues)})")
            return "nic_xsks", queue
        if kind == "port":
            if not isinstance(queue, int) or not 0 <= queue < self.port_queues:
                raise UsageError(f"port queue {queue!r} out of range "
                                 f"(0..{self.port_queues - 1})")
            return "port_xsks", self.vm_id * PORT_QUEUES + queue
        raise UsageError(f"socket kind {kind!r} unknown (one of {', '.join(XSK_KINDS)})")

    def set_xsk(self, kind: str, queue: int, fd: int) -> None:
        """Deliver this VM's frames on (*kind* ``"nic"``: NIC queue,
        ``"port"``: port queue) *queue* to the AF_XDP socket *fd*, bound
        there."""
        name, key = self._key(kind, queue)
        if self.removed:
            raise XdpnetError(f"VM {self.vm_id} was removed from {self.nic.ifname}")
        with self.nic._locked() as st:
            assert st.maps is not None
            err = st.maps.set_xsk(name, key, fd)
        if err in (errno.EBADF, errno.ENOTSOCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise UsageError(f"fd {fd} is not a bound AF_XDP socket ({os.strerror(err)})")
        if err == errno.EBUSY:
            raise BusyError(f"{kind} queue {queue} of VM {self.vm_id} already has a socket")
        if err:
            raise XdpnetError(f"cannot set the {kind} XSK of queue {queue}: {os.strerror(err)}")

    def clear_xsk(self, kind: str, queue: int) -> None:
        """Forget the socket of (*kind*, *queue*).  Idempotent; a no-op
        once the VM is removed."""
        name, key = self._key(kind, queue)
        st = self.nic._st
        if self.removed or st.closed:
            return
        with self.nic._locked() as st:
            assert st.maps is not None
            st.maps.clear_xsk(name, key)

    def set_max_frame(self, max_frame: int) -> None:
        """Change the XDP length limit of this VM (the port's MTU stays)."""
        if not isinstance(max_frame, int) or not MIN_FRAME <= max_frame <= MAX_FRAME:
            raise UsageError(f"max_frame {max_frame!r} out of range ({MIN_FRAME}..{MAX_FRAME})")
        with self.nic._locked() as st:
            assert st.maps is not None
            r = st.maps.vm(self.vm_id)
            if r is None or r.mac != self.mac_bytes:
                raise XdpnetError(f"VM {self.vm_id} is not on {self.nic.ifname} any more")
            st.maps.set_vm(replace(r, max_frame=max_frame))
            st.maps.set_mac(r.mac, r.vm_id, max_frame, queues_mask(r.nic_queues))
        self.rec = replace(self.rec, max_frame=max_frame)

    def counters(self) -> dict[str, int]:
        return self.nic.vm_counters(self.vm_id)

    def remove(self) -> None:
        """Delete this VM's entries and port; the last VM on the NIC tears
        the NIC down.  Idempotent."""
        if self.removed:
            return
        self.removed = True
        try:
            self.nic._remove(self)
        finally:
            notify_vm_change()



def sweep_gone_nics(only: list[str] | None = None) -> list[str]:
    """Remove the steering state (pins, ports) of NICs that no longer
    exist and have no VM whose owner is alive: a NIC deleted after its
    VMs' processes were killed leaves nobody else to do it.  *only*
    limits the sweep to those NIC names.  Best effort: a NIC whose lock is
    busy is left for next time.  Returns the names swept."""
    try:
        names = sorted(os.listdir(programs.PIN_ROOT))
    except FileNotFoundError:
        return []
    swept = []
    for name in names:
        if (only is not None and name not in only) or not os.path.isdir(pin_dir(name)):
            continue
        try:
            socket.if_nametoindex(name)
            continue                        # it exists: opening it deals with it
        except OSError:
            pass
        try:
            with nic_lock(name, timeout=1.0):
                st = _NicState(name, 0)
                try:
                    if not st.open_pins_locked():
                        swept.append(name)
                        continue
                    assert st.maps is not None
                    if any(process_alive(r.owner_pid, r.owner_start)
                           for r in st.maps.all_vms().values()):
                        continue
                    log.warning("NIC %s is gone and none of its VMs' processes runs: "
                                "removing its pins and ports", name)
                    st.teardown_locked()
                    swept.append(name)
                finally:
                    st.drop_fds()
        except XdpnetError as e:            # busy lock, foreign layout, ...
            log.debug("steering state of gone NIC %s not swept: %s", name, e)
    return swept


def release_dead(ifname: str) -> list[int]:
    """For an operator whose VM process died: under the NIC lock, remove
    the VMs of *ifname* whose owner process is gone and, if none is left,
    everything xdpnet put on the NIC.  Loads nothing; a NIC with nothing
    pinned is left alone.  Returns the ids of the VMs removed."""
    d = pin_dir(ifname)
    if not os.path.isdir(d):
        return []
    try:
        ifindex = xdp.ifindex_of(ifname)
    except UsageError:
        ifindex = 0                 # the NIC is gone: its ports and pins are not
    st = _NicState(ifname, ifindex)
    with nic_lock(ifname):
        try:
            if not st.open_pins_locked():
                return []
            gone = st.reap_locked()
            st.teardown_if_empty_locked()
            return gone
        finally:
            st.drop_fds()


__all__ = ["NicSteering", "VmSteering", "VmInfo", "read_pinned", "release_dead",
           "sweep_gone_nics", "VERDICTS", "VM_STATS"]

"""The VM registry: one JSON record per attached VM, one directory of state.

Layout (``XDPNET_RUN_DIR`` overrides ``/run/xdpnet``, e.g. for tests)::

    /run/xdpnet/vms/.lock          flock: claims and updates are serialised
    /run/xdpnet/vms/NAME.json      the record (below), replaced atomically
    /run/xdpnet/vms/NAME/          the VM's state: serve.log, qpN.counters

The ``xdpnet serve --name NAME`` process owns its record: it claims the
name (state ``starting``), flips it to ``running`` once its vhost-user
socket listens, and removes it when it exits cleanly.  ``xdpnet attach``
holds a ``starting`` placeholder (its own pid) while it starts the serve
process, which takes the record over.  A record whose process is gone
reads as ``dead``; ``xdpnet detach`` cleans it up.

A process is identified by pid *and* start time
(:func:`xdpnet.rundirs.process_alive`), so a recycled pid never makes a
dead VM look alive, nor does a zombie.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field

from xdpnet.errors import BusyError, UsageError
from xdpnet.rundirs import RUN_DIR, flocked, process_alive

RUN_DIR_ENV = "XDPNET_RUN_DIR"
DEFAULT_RUN_DIR = RUN_DIR
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
LOG_FILE = "serve.log"


def run_dir(override: str | None = None) -> str:
    """The run directory: *override*, else ``$XDPNET_RUN_DIR``, else /run/xdpnet."""
    return os.path.abspath(override or os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)


def check_name(name: str) -> str:
    """*name* if it is a usable VM name (UsageError otherwise)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(f"VM name {name!r}: 1-32 characters [A-Za-z0-9_.-], starting with a "
                         "letter or digit")
    return name


@dataclass
class VmRecord:
    """One attached VM, as written to ``vms/NAME.json`` (keys in docs/cli.md)."""

    name: str
    pid: int
    pid_start: int | None
    iface: str
    queues: list[int]                   # NIC queue of each direct queue pair ([] port-only)
    port_pairs: int                     # pairs served through the VM's port only
    mac: str
    socket: str
    state: str = "starting"             # starting | running (as written; "dead" is derived)
    vm_id: int | None = None            # the VM's id on its NIC (chosen by the steering)
    counters_dir: str | None = None     # qpN.counters files, one per queue pair
    log: str | None = None
    started: float = field(default_factory=time.time)
    xdp_mode: str | None = None         # native | generic
    xsk_mode: str | None = None         # copy | zero-copy
    xdp_prog_id: int | None = None      # the NIC's XDP program when the VM started

    @property
    def pairs(self) -> int:
        """Queue pairs the VM has."""
        return len(self.queues) or self.port_pairs

    def alive(self) -> bool:
        """True while the recorded process runs (same pid, same start time)."""
        return process_alive(self.pid, self.pid_start)

    def status(self) -> str:
        """``starting``, ``running`` or ``dead``."""
        return self.state if self.alive() else "dead"

    def counter_paths(self) -> list[str]:
        """The counter file of each queue pair (they exist while the VM runs)."""
        if not self.counters_dir:
            return []
        return [os.path.join(self.counters_dir, f"qp{i}.counters") for i in range(self.pairs)]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["pairs"] = self.pairs
        return d

    @classmethod
    def from_json(cls, d: dict) -> VmRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Registry:
    """The records under ``<run dir>/vms``."""

    def __init__(self, root: str | None = None):
        self.root = run_dir(root)
        self.dir = os.path.join(self.root, "vms")

    # -- paths

    def record_path(self, name: str) -> str:
        return os.path.join(self.dir, f"{check_name(name)}.json")

    def state_dir(self, name: str) -> str:
        return os.path.join(self.dir, check_name(name))

    def log_path(self, name: str) -> str:
        return os.path.join(self.state_dir(name), LOG_FILE)

    # -- reading

    def get(self, name: str) -> VmRecord:
        """The record of *name*; :class:`UsageError` if there is none."""
        rec = self.read(name)
        if rec is None:
            raise UsageError(f"no VM named {name!r} is attached (xdpnet list shows them)")
        return rec

    def read(self, name: str) -> VmRecord | None:
        """The record of *name*, None if there is none (or it is unreadable)."""
        try:
            with open(self.record_path(name)) as f:
                return VmRecord.from_json(json.load(f))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (ValueError, TypeError):
            return None         # half-written by a process that died: treated as absent

    def records(self) -> list[VmRecord]:
        """Every record, by name."""
        try:
            names = sorted(n[:-5] for n in os.listdir(self.dir)
                           if n.endswith(".json") and NAME_RE.fullmatch(n[:-5]))
        except FileNotFoundError:
            return []
        return [r for r in map(self.read, names) if r is not None]

    # -- writing (serialised by the lock)

    def lock(self):
        """Hold the registry lock (flock on ``vms/.lock``).  Whoever leaves
        the registry without records removes the lock file and the empty
        directories (up to /run/xdpnet; a private run directory stays)."""
        shared = self.root == DEFAULT_RUN_DIR
        return flocked(self.dir, ".lock", unused=lambda: not self.records(),
                       up_to=self.root if shared else self.dir)

    def _write(self, rec: VmRecord) -> None:
        path = self.record_path(rec.name)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(rec.to_json(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)

    def claim(self, rec: VmRecord, takeover_from: int | None = None) -> VmRecord:
        """Write *rec* as a new VM: its name and socket must be free.

        A live record of the same name is refused (BusyError) unless it is
        a ``starting`` placeholder of process *takeover_from* (the attach
        that started us); a dead one is replaced.  A live VM with the same
        socket path is refused too.  Returns the written record.
        """
        with self.lock():
            cur = self.read(rec.name)
            if cur is not None and cur.alive() and not (
                    cur.state == "starting" and takeover_from is not None
                    and cur.pid == takeover_from):
                raise BusyError(f"a VM named {rec.name!r} is already attached (pid {cur.pid}); "
                                f"detach it first: xdpnet detach {rec.name}")
            live = [r for r in self.records() if r.name != rec.name and r.alive()]
            for other in live:
                if os.path.abspath(other.socket) == os.path.abspath(rec.socket):
                    raise BusyError(f"vhost-user socket {rec.socket} is used by VM "
                                    f"{other.name!r} (pid {other.pid})")
            self._write(rec)
            return rec

    def update(self, rec: VmRecord, **changes) -> VmRecord:
        """Apply *changes* to *rec* and write it (only if the record is still ours)."""
        with self.lock():
            cur = self.read(rec.name)
            if cur is not None and cur.pid != rec.pid:
                raise BusyError(f"the record of VM {rec.name!r} was taken over by pid {cur.pid}")
            for k, v in changes.items():
                setattr(rec, k, v)
            self._write(rec)
            return rec

    def remove(self, name: str, pid: int | None = None) -> bool:
        """Remove the record of *name* (only if it belongs to *pid*, when given)."""
        with self.lock():
            cur = self.read(name)
            if pid is not None and cur is not None and cur.pid != pid:
                return False
            try:
                os.unlink(self.record_path(name))
                return True
            except FileNotFoundError:
                return False

    def remove_state(self, name: str) -> bool:
        """Remove the VM's state directory (log, counter files) if present."""
        d = self.state_dir(name)
        if not os.path.isdir(d):
            return False
        shutil.rmtree(d, ignore_errors=True)
        return True

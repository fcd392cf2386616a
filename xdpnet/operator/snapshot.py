"""One reading of every attached VM's counters, and the ``--json`` shapes.

Each queue pair's ``struct xn_counters`` is a file its serve process
maps read-write (``vms/NAME/qpN.counters``); here it is mapped
read-only, every field read once, and unmapped.  The datapath is never
locked, signalled or slowed.  The NIC's BPF counters (per-CPU maps,
summed) come through :func:`steering_counters`.

``xdpnet list --json``, ``xdpnet stats --json``, ``xdpnet top`` and the
metrics endpoint all start from :func:`read_all`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from xdpnet import stats
from xdpnet.datapath.counters import CounterBlock
from xdpnet.operator.registry import Registry, VmRecord


@dataclass
class PairReading:
    """Queue pair ``pair`` of a VM: its NIC queue and a counter snapshot."""

    pair: int
    queue: int | None                   # NIC queue; None for a port-only pair
    counters: dict[str, int] | None     # None: no counter file (VM starting or dead)


@dataclass
class VmReading:
    """One VM at one moment."""

    record: VmRecord
    state: str                          # starting | running | dead
    pairs: list[PairReading]
    at: float = field(default_factory=time.monotonic)
    steering: dict | None = None        # steering_counters(), this VM's part


def read_counters(path: str) -> dict[str, int] | None:
    """A snapshot of the counter file *path*, None if it cannot be mapped."""
    try:
        block = CounterBlock.open(path)
    except (OSError, ValueError):
        return None
    try:
        return block.snapshot()
    finally:
        block.close()


def read_vm(rec: VmRecord, nics: dict[str, dict | None] | None = None) -> VmReading:
    """One reading of *rec*.  *nics* caches :func:`steering_counters` by
    NIC (read_all shares one cache between the VMs of one reading)."""
    state = rec.status()
    pairs = []
    for i, path in enumerate(rec.counter_paths() or [None] * rec.pairs):
        queue = rec.queues[i] if i < len(rec.queues) else None
        snap = read_counters(path) if path and state != "dead" else None
        pairs.append(PairReading(i, queue, snap))
    mine = None
    if state != "dead":
        nics = {} if nics is None else nics
        if rec.iface not in nics:
            nics[rec.iface] = steering_counters(rec.iface)
        nic = nics[rec.iface]
        if nic is not None:
            mine = {"verdicts": nic["verdicts"], "vm": nic["vms"].get(rec.vm_id)}
    return VmReading(rec, state, pairs, steering=mine)


def read_all(reg: Registry, name: str | None = None) -> list[VmReading]:
    """Readings of every VM (or only *name*: UsageError if there is no such
    VM); each NIC's steering counters are read once."""
    records = [reg.get(name)] if name is not None else reg.records()
    nics: dict[str, dict | None] = {}
    return [read_vm(r, nics) for r in records]


def steering_counters(ifname: str) -> dict | None:
    """The NIC's BPF counters from its pinned maps, per-CPU values summed,
    by :func:`xdpnet.steering.read_pinned` (no lock, nothing loaded)::

        {"verdicts": {"to_vm": N, "to_host": N, ...},
         "vms": {vm_id: {counter: N, ...}}}

    None when the NIC has no pinned steering, the reader is missing, or
    this process may not open the pins (then ``stats``, ``top`` and
    ``metrics`` show the datapath counters only).
    """
    try:
        from xdpnet.steering import read_pinned

        nic = read_pinned(ifname)
    except Exception:       # noqa: BLE001 - no pins, no privilege, no reader: no BPF counters
        return None
    return {"verdicts": dict(nic["verdicts"]),
            "vms": {vm_id: dict(v["counters"]) for vm_id, v in nic["vms"].items()}}


# ---- --json shapes (docs/cli.md) ---------------------------------------------

def uptime(rec: VmRecord, now: float | None = None) -> float:
    return max(0.0, (now or time.time()) - rec.started)


def list_json(records: list[VmRecord]) -> dict:
    """``xdpnet list --json``."""
    now = time.time()
    out = []
    for rec in records:
        d = rec.to_json()
        d["state"] = rec.status()
        d["uptime_seconds"] = round(uptime(rec, now), 3)
        out.append(d)
    return {"vms": out}


def pair_json(p: PairReading) -> dict:
    d: dict[str, object] = {"pair": p.pair, "queue": p.queue,
                            "available": p.counters is not None}
    if p.counters is not None:
        d.update(stats.pair_totals(p.counters))
        d["counters"] = dict(p.counters)
    return d


def vm_json(r: VmReading) -> dict:
    rec = r.record
    snaps = [p.counters for p in r.pairs if p.counters is not None]
    return {
        "name": rec.name, "state": r.state, "iface": rec.iface, "vm_id": rec.vm_id,
        "mac": rec.mac, "xdp_mode": rec.xdp_mode, "xsk_mode": rec.xsk_mode,
        "uptime_seconds": round(uptime(rec), 3),
        "pairs": [pair_json(p) for p in r.pairs],
        "total": stats.summary(snaps),
        "steering": r.steering,
    }


def stats_json(readings: list[VmReading]) -> dict:
    """``xdpnet stats --json``."""
    return {"time": round(time.time(), 3), "vms": [vm_json(r) for r in readings]}

"""Counters as operators read them: per queue pair, summed, drops by cause.

Readers take snapshots of the datapath's counter blocks
(:mod:`xdpnet.datapath.counters`) and of the XDP program's per-CPU maps;
nothing here touches the datapath.  Every function takes snapshots
(``dict[str, int]`` of ``struct xn_counters``) and returns plain values.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdpnet.datapath.counters import BROKEN_REASONS

# Keys of the ``--json`` outputs: stable, documented in docs/cli.md.
DROP_CAUSES = ("no_rx_buffer", "too_large", "invalid_desc", "tx_error", "spoofed")
RINGS = ("fill", "rx", "tx", "rx_held", "tx_held")
TOTALS = ("rx_frames", "rx_bytes", "rx_zero_copy_frames", "rx_copied_frames", "rx_copied_bytes",
          "tx_frames", "tx_bytes", "tx_zero_copy_frames", "tx_copied_frames", "tx_copied_bytes")


def drops(snap: dict[str, int]) -> dict[str, int]:
    """Drops by cause of one counter snapshot.

    Each cause folds in the kernel's own counts (XDP_STATISTICS) so none
    is hidden: ``no_rx_buffer`` the frames that found the fill ring empty
    or the rx ring full, ``too_large`` the frames over the UMEM frame cap.
    """
    return {
        "no_rx_buffer": (snap["drop_no_rx_buffer"] + snap["kernel_fill_empty"]
                         + snap["kernel_rx_ring_full"]),
        # The kernel's rx_dropped counts frames over the frame cap *and*
        # frames that found the fill ring empty; the latter are no_rx_buffer.
        "too_large": snap["drop_too_large"] + max(0, snap["kernel_rx_dropped"]
                                                  - snap["kernel_fill_empty"]),
        "invalid_desc": snap["drop_invalid_desc"] + snap["kernel_tx_invalid"],
        "tx_error": snap["drop_tx_error"],
        "spoofed": snap["tx_spoofed"],          # tx with a source MAC not the VM's
    }


def rings(snap: dict[str, int]) -> dict[str, int]:
    """Ring occupancy gauges: AF_XDP fill, rx and tx rings (entries the other
    side has not consumed), and the guest descriptors the backend holds
    (taken from the avail ring, not yet returned on the used ring)."""
    return {"fill": snap["fill_ring_used"], "rx": snap["rx_ring_used"],
            "tx": snap["tx_ring_used"], "rx_held": snap["rx_inflight"],
            "tx_held": snap["tx_inflight"]}


def broken(snap: dict[str, int]) -> dict[str, str | None]:
    """Why each ring of the pair was stopped (NEEDS_RESET), None if it runs."""
    return {d: (BROKEN_REASONS.get(snap[f"{d}_broken"], str(snap[f"{d}_broken"]))
                if snap[f"{d}_broken"] else None) for d in ("rx", "tx")}


def copies(snap: dict[str, int]) -> int:
    """Frames that took one userspace copy (bounce area), both directions."""
    return snap["rx_copied_frames"] + snap["tx_copied_frames"]


def zero_copy_share(b: dict[str, int], a: dict[str, int] | None = None) -> float | None:
    """Share of frames (both directions) that moved without a userspace copy:
    between snapshots *a* and *b*, or since start without *a*; None if no
    frame moved."""
    def zc(s):
        return s["rx_zero_copy_frames"] + s["tx_zero_copy_frames"]

    def frames(s):
        return s["rx_frames"] + s["tx_frames"]

    n = frames(b) - (frames(a) if a else 0)
    if n <= 0:
        return None
    return (zc(b) - (zc(a) if a else 0)) / n


def pair_totals(snap: dict[str, int]) -> dict[str, object]:
    """One queue pair in the shape of ``xdpnet stats --json``'s ``pairs[]``."""
    out: dict[str, object] = {k: snap[k] for k in TOTALS}
    out["drops"] = drops(snap)
    out["rings"] = rings(snap)
    out["broken"] = broken(snap)
    return out


def summary(snaps: list[dict[str, int]]) -> dict[str, object]:
    """Totals over queue pairs, in the shape of ``xdpnet demo --json``."""
    out: dict[str, object] = {k: sum(s[k] for s in snaps) for k in TOTALS}
    d = {c: 0 for c in DROP_CAUSES}
    for s in snaps:
        for c, v in drops(s).items():
            d[c] += v
    out["drops"] = d
    return out


@dataclass
class Rate:
    """Frames and bytes per second between two snapshots of one counter pair."""

    fps: float = 0.0
    bps: float = 0.0

    @classmethod
    def between(cls, a: dict[str, int], b: dict[str, int], prefix: str, dt: float) -> Rate:
        if dt <= 0:
            return cls()
        return cls((b[f"{prefix}_frames"] - a[f"{prefix}_frames"]) / dt,
                   (b[f"{prefix}_bytes"] - a[f"{prefix}_bytes"]) * 8 / dt)

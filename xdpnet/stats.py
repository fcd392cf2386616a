"""Counters as operators read them: per queue pair, summed, drops by cause.

Readers take snapshots of the datapath's counter blocks
(:mod:`xdpnet.datapath.counters`) and of the XDP program's per-CPU maps;
nothing here touches the datapath.
"""

from __future__ import annotations

from dataclasses import dataclass

# Keys of the ``--json`` outputs: stable, documented in docs/cli.md.
DROP_CAUSES = ("no_rx_buffer", "too_large", "invalid_desc", "tx_error")


def drops(snap: dict[str, int]) -> dict[str, int]:
    """Drops by cause of one counter snapshot.

    ``too_large`` folds in the kernel's own count (frames over the UMEM
    frame cap, ``kernel_rx_dropped``) so no cause is hidden.
    """
    return {
        "no_rx_buffer": snap["drop_no_rx_buffer"],
        # The kernel's rx_dropped counts frames over the frame cap *and*
        # frames that found the fill ring empty; the latter are no_rx_buffer.
        "too_large": snap["drop_too_large"] + max(0, snap["kernel_rx_dropped"]
                                                  - snap["kernel_fill_empty"]),
        "invalid_desc": snap["drop_invalid_desc"] + snap["kernel_tx_invalid"],
        "tx_error": snap["drop_tx_error"],
    }


def summary(snaps: list[dict[str, int]]) -> dict[str, object]:
    """Totals over queue pairs, in the shape of ``xdpnet demo --json``."""
    keys = ("rx_frames", "rx_bytes", "rx_zero_copy_frames", "rx_copied_frames", "rx_copied_bytes",
            "tx_frames", "tx_bytes", "tx_zero_copy_frames", "tx_copied_frames", "tx_copied_bytes")
    out: dict[str, object] = {k: sum(s[k] for s in snaps) for k in keys}
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
    def between(cls, a: dict[str, int], b: dict[str, int], prefix: str, dt: float) -> "Rate":
        if dt <= 0:
            return cls()
        return cls((b[f"{prefix}_frames"] - a[f"{prefix}_frames"]) / dt,
                   (b[f"{prefix}_bytes"] - a[f"{prefix}_bytes"]) * 8 / dt)

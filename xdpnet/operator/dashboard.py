"""``xdpnet top``: what every VM and queue pair is doing, live.

How to read it: one header line per NIC (XDP mode native/generic, AF_XDP
mode copy/zero-copy, time since its first VM attached), then one row per
VM × queue pair:

  rx/s, tx/s       frames per second wire→VM and VM→wire
  Gbit/s           the same in bits of frame data
  zero-copy        share of the frames (both ways) that took no userspace copy
  copies           frames copied once through the bounce area (since start)
  drops            since start, by cause: no rx buffer · too large · invalid
                   descriptor · tx error
  fill rx tx held  ring occupancy now: AF_XDP fill/rx/tx entries pending,
                   guest descriptors the backend holds
  last minute      rx+tx frames per second, scaled to the row's peak

Keys: ``q`` quits, ``s`` cycles the sort column.  Counters are read from
the files the serve processes publish (:mod:`xdpnet.operator.snapshot`):
the dashboard never touches a datapath.

Also here: the static tables of ``xdpnet list`` and ``xdpnet stats``.
A pure function builds each table from a reading; the ``Live`` loop of
:func:`run` only reads, builds and waits for keys.
"""

from __future__ import annotations

import collections
import math
import os
import select
import sys
import termios
import time
import tty
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from xdpnet import stats
from xdpnet.operator.registry import Registry, VmRecord
from xdpnet.operator.snapshot import VmReading, read_all, uptime

SPARK = "▁▂▃▄▅▆▇█"
WINDOW = 60.0           # seconds of history in the sparkline
SPARK_WIDTH = 20


@dataclass
class Row:
    """One VM × queue pair, as the dashboard shows it."""

    vm: str
    pair: int
    queue: int | None
    state: str
    rx_fps: float = 0.0
    tx_fps: float = 0.0
    rx_bps: float = 0.0
    tx_bps: float = 0.0
    zero_copy: float | None = None
    copies: int | None = None
    drops: dict[str, int] | None = None
    rings: dict[str, int] | None = None
    history: list[float] = field(default_factory=list)     # rx+tx frames/s, oldest first


SORTS = {
    "vm": lambda r: (r.vm, r.pair),
    "rx/s": lambda r: -r.rx_fps,
    "tx/s": lambda r: -r.tx_fps,
    "Gbit/s": lambda r: -(r.rx_bps + r.tx_bps),
    "drops": lambda r: -sum((r.drops or {}).values()),
}
SORT_NAMES = list(SORTS)


@dataclass
class View:
    """What one screen shows."""

    nics: list[tuple[str, str, str, float, int]]    # (nic, xdp mode, af_xdp mode, uptime, VMs)
    rows: list[Row]
    sort: str = "vm"


class History:
    """The previous snapshot of each queue pair (for rates) and a minute of rates."""

    def __init__(self, window: float = WINDOW):
        self.window = window
        self._last: dict[tuple[str, int, int], tuple[float, dict[str, int]]] = {}
        self._rates: dict[tuple[str, int, int], collections.deque] = {}

    def view(self, readings: list[VmReading], sort: str = "vm") -> View:
        """Rows from a reading (rates against the previous one)."""
        rows = []
        nics: dict[str, list[VmRecord]] = {}
        for r in readings:
            rec = r.record
            nics.setdefault(rec.iface, []).append(rec)
            for p in r.pairs:
                key = (rec.name, rec.pid, p.pair)
                row = Row(rec.name, p.pair, p.queue, r.state)
                snap = p.counters
                if snap is not None:
                    prev = self._last.get(key)
                    if prev is not None:
                        dt = r.at - prev[0]
                        rx = stats.Rate.between(prev[1], snap, "rx", dt)
                        tx = stats.Rate.between(prev[1], snap, "tx", dt)
                        row.rx_fps, row.tx_fps = max(rx.fps, 0), max(tx.fps, 0)
                        row.rx_bps, row.tx_bps = max(rx.bps, 0), max(tx.bps, 0)
                        hist = self._rates.setdefault(key, collections.deque())
                        hist.append((r.at, row.rx_fps + row.tx_fps))
                        while hist and hist[0][0] < r.at - self.window:
                            hist.popleft()
                        row.history = _buckets(hist, r.at, self.window, SPARK_WIDTH)
                    row.zero_copy = stats.zero_copy_share(snap, prev[1] if prev else None)
                    if row.zero_copy is None and prev is not None:
                        row.zero_copy = stats.zero_copy_share(snap)
                    row.copies = stats.copies(snap)
                    row.drops = stats.drops(snap)
                    row.rings = stats.rings(snap)
                    self._last[key] = (r.at, snap)
                rows.append(row)
        rows.sort(key=SORTS[sort])
        now = time.time()
        nic_lines = []
        for nic, recs in sorted(nics.items()):
            live = [x for x in recs if x.status() != "dead"] or recs
            nic_lines.append((nic, _modes(x.xdp_mode for x in live),
                              _modes(x.xsk_mode for x in live),
                              max(uptime(x, now) for x in live), len(recs)))
        return View(nic_lines, rows, sort)


def _modes(modes) -> str:
    return "/".join(sorted({m for m in modes if m})) or "?"


def _buckets(hist, now: float, window: float, width: int) -> list[float]:
    """Average rate per time slot of the window, oldest first (NaN: no sample)."""
    slot = window / width
    sums, counts = [0.0] * width, [0] * width
    for t, v in hist:
        i = int((t - (now - window)) / slot)
        if 0 <= i < width:
            sums[i] += v
            counts[i] += 1
        elif i == width:
            sums[-1] += v
            counts[-1] += 1
    return [s / c if c else float("nan") for s, c in zip(sums, counts)]


def sparkline(values: list[float]) -> str:
    """``▁▂▃…█`` scaled to the largest value; a blank where there was no sample."""
    top = max((v for v in values if not math.isnan(v)), default=0.0)
    out = []
    for v in values:
        if math.isnan(v):
            out.append(" ")
        elif top <= 0:
            out.append(SPARK[0])
        else:
            out.append(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))])
    return "".join(out)


def _si(v: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def build_table(view: View) -> Group:
    """The dashboard screen for one :class:`View`."""
    header = Text()
    for nic, xdp, xsk, up, n in view.nics:
        header.append(f"NIC {nic}", style="bold")
        header.append(f"   XDP {xdp}   AF_XDP {xsk}   up {_hms(up)}   "
                      f"{n} VM{'s' if n != 1 else ''}\n")
    if not view.nics:
        header.append("no VMs attached (xdpnet attach IFACE --queue Q --mac MAC --socket PATH)\n")
    header.append(f"sort: {view.sort}   keys: s next sort column, q quit", style="dim")
    t = Table(expand=False, pad_edge=False)
    for name, justify in (("VM", "left"), ("pair", "right"), ("NIC q", "right"),
                          ("state", "left"), ("rx/s", "right"), ("tx/s", "right"),
                          ("rx Gbit/s", "right"), ("tx Gbit/s", "right"),
                          ("zero-copy", "right"), ("copies", "right"),
                          ("drops nobuf·big·inval·txerr", "right"), ("fill", "right"),
                          ("rx", "right"), ("tx", "right"), ("held", "right"),
                          ("last minute", "left")):
        style = "bold" if name == view.sort or (view.sort == "Gbit/s" and "Gbit" in name) \
            else None
        t.add_column(name, justify=justify, header_style=style)
    for r in view.rows:
        state = {"running": "[green]running[/]", "dead": "[red]dead[/]"}.get(r.state, r.state)
        q = "port" if r.queue is None else str(r.queue)
        if r.rings is None:
            t.add_row(r.vm, str(r.pair), q, state, *["-"] * 12)
            continue
        d = r.drops or {}
        drops = "·".join(str(d.get(c, 0)) for c in stats.DROP_CAUSES)
        zc = "-" if r.zero_copy is None else f"{100 * r.zero_copy:.0f}%"
        t.add_row(r.vm, str(r.pair), q, state, _si(r.rx_fps), _si(r.tx_fps),
                  f"{r.rx_bps / 1e9:.3f}", f"{r.tx_bps / 1e9:.3f}", zc, f"{r.copies:,}",
                  drops, str(r.rings["fill"]), str(r.rings["rx"]), str(r.rings["tx"]),
                  str(r.rings["rx_held"] + r.rings["tx_held"]), sparkline(r.history))
    return Group(header, t)


# ---- the live loop -------------------------------------------------------------

class Keys:
    """Single key presses from a cbreak terminal, read without blocking the refresh."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdin
        self.fd: int | None = None
        self._saved = None

    def __enter__(self) -> Keys:
        try:
            fd = self.stream.fileno()
        except (AttributeError, ValueError, OSError):
            return self
        if os.isatty(fd):
            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
            self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None and self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def wait(self, timeout: float) -> str:
        """Keys pressed within *timeout* seconds ("" if none; sleeps without a tty)."""
        if self.fd is None:
            time.sleep(max(0.0, timeout))
            return ""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        return os.read(self.fd, 64).decode(errors="ignore") if ready else ""


def run(reg: Registry, interval: float = 1.0, iterations: int = 0, once: bool = False,
        sort: str = "vm", console: Console | None = None) -> int:
    """``xdpnet top``: refresh every *interval* s until ``q`` (or *iterations*)."""
    console = console or Console()
    history = History()
    view = history.view(read_all(reg), sort)        # the first reading: no rates yet
    if once:
        time.sleep(interval)
        console.print(build_table(history.view(read_all(reg), sort)))
        return 0
    n = 0
    with Keys() as keys, Live(build_table(view), console=console, auto_refresh=False,
                              screen=console.is_terminal) as live:
        while not iterations or n < iterations:
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                pressed = keys.wait(left)
                if "q" in pressed:
                    return 0
                if "s" in pressed:
                    sort = SORT_NAMES[(SORT_NAMES.index(sort) + 1) % len(SORT_NAMES)]
                    view.sort = sort
                    view.rows.sort(key=SORTS[sort])
                    live.update(build_table(view), refresh=True)
            view = history.view(read_all(reg), sort)
            live.update(build_table(view), refresh=True)
            n += 1
    return 0


# ---- list and stats ------------------------------------------------------------

def list_table(records: list[VmRecord]) -> Table:
    t = Table(box=None, pad_edge=False)
    for c in ("NAME", "STATE", "PID", "IFACE", "QUEUES", "MAC", "SOCKET", "XDP", "AF_XDP",
              "UPTIME"):
        t.add_column(c)
    for r in records:
        q = ",".join(map(str, r.queues)) if r.queues else f"port x{r.port_pairs}"
        t.add_row(r.name, r.status(), str(r.pid), r.iface, q, r.mac, r.socket,
                  r.xdp_mode or "-", r.xsk_mode or "-", _hms(uptime(r)))
    return t


def stats_table(readings: list[VmReading]) -> Table:
    t = Table(box=None, pad_edge=False)
    for c in ("VM", "PAIR", "NIC Q", "STATE", "RX FRAMES", "RX BYTES", "TX FRAMES", "TX BYTES",
              "ZERO-COPY", "COPIES", "NO BUF", "TOO LARGE", "INVALID", "TX ERR", "BROKEN"):
        t.add_column(c, justify="left" if c in ("VM", "STATE", "BROKEN") else "right")
    for r in readings:
        for p in r.pairs:
            q = "port" if p.queue is None else str(p.queue)
            s = p.counters
            if s is None:
                t.add_row(r.record.name, str(p.pair), q, r.state, *["-"] * 11)
                continue
            d = stats.drops(s)
            zc = stats.zero_copy_share(s)
            br = ", ".join(f"{k}: {v}" for k, v in stats.broken(s).items() if v) or "-"
            t.add_row(r.record.name, str(p.pair), q, r.state, f"{s['rx_frames']:,}",
                      f"{s['rx_bytes']:,}", f"{s['tx_frames']:,}", f"{s['tx_bytes']:,}",
                      "-" if zc is None else f"{100 * zc:.1f}%", f"{stats.copies(s):,}",
                      *(f"{d[c]:,}" for c in stats.DROP_CAUSES), br)
    return t


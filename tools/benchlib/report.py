"""tools/bench output: per-round ratios and medians, a text table, a markdown
table (docs/benchmarks.md) and a PNG chart (matplotlib)."""

from __future__ import annotations

from typing import Any

from benchlib.common import DIRECTIONS, med

SUBJECT = "xdpnet"
PEERS = ("ceiling", "dpdk", "tap")       # ratio_vs_<peer> = xdpnet / peer, per round
# Other xdpnet variants (busy-poll mode) get "<name>_ratio_vs_<peer>" keys.
VARIANTS = ("xdpnet-busy",)


def _ratio_keys(name: str) -> str:
    return "" if name == SUBJECT else f"{name}_"


def summarize(per: dict[str, list[dict]]) -> dict:
    """Medians per contestant and xdpnet/peer ratios per round for one (direction, size)."""
    res: dict[str, Any] = {}
    for name, rs in per.items():
        res[f"{name}_mpps"] = med([r["mpps"] for r in rs])
        res[f"{name}_gbps"] = med([r["gbps"] for r in rs])
        res[f"{name}_cpu_ns_per_frame"] = med([r["cpu_ns_per_frame"] for r in rs])
        for k in rs[0]:          # per-hop rates: generator, guest-verified, wire-received
            if k.endswith("_mpps") and k != "mpps":
                res[f"{name}_{k}"] = med([r.get(k) for r in rs])
    for subject in (SUBJECT, *VARIANTS):
        me, pre = per.get(subject), _ratio_keys(subject)
        for peer in PEERS if me else ():
            if peer not in per:
                continue
            ratios = [round(r["mpps"] / b["mpps"], 3) if b["mpps"] else None
                      for r, b in zip(me, per[peer])]
            res[f"{pre}ratios_vs_{peer}"] = ratios
            res[f"{pre}ratio_vs_{peer}"] = med(ratios)
    me = per.get(SUBJECT)
    if me:
        res["copied_bytes"] = sum(r["copied_bytes"] or 0 for r in me)
        res["cpu_ns_per_frame"] = res[f"{SUBJECT}_cpu_ns_per_frame"]
    n = min(len(rs) for rs in per.values())
    res["rounds"] = [{name: per[name][i] for name in per} for i in range(n)]
    return res


def summarize_latency(per: dict[str, list[dict]]) -> dict:
    """Median p50/p99 over rounds per contestant; p99 ratio xdpnet/peer per round."""
    res: dict[str, Any] = {}
    for name, rs in per.items():
        res[f"{name}_p50_us"] = med([r["p50_us"] for r in rs])
        res[f"{name}_p99_us"] = med([r["p99_us"] for r in rs])
        res[f"{name}_lost"] = sum(r["lost"] for r in rs)
    for subject in (SUBJECT, *VARIANTS):
        me, pre = per.get(subject), _ratio_keys(subject)
        for peer in PEERS if me else ():
            if peer in per:
                ratios = [round(a["p99_us"] / b["p99_us"], 3) if a["p99_us"] and b["p99_us"]
                          else None for a, b in zip(me, per[peer])]
                res[f"{pre}p99_ratios_vs_{peer}"] = ratios
                res[f"{pre}p99_ratio_vs_{peer}"] = med(ratios)
    res["rounds"] = [{name: per[name][i] for name in per}
                     for i in range(min(len(rs) for rs in per.values()))]
    return res


def _ratio_columns(names: list[str]) -> list[tuple[str, str]]:
    """(label, key) of every subject/peer ratio the run has, e.g. ("xdpnet/dpdk", "ratio_vs_dpdk")."""
    return [(f"{subject}/{peer}", f"{_ratio_keys(subject)}ratio_vs_{peer}")
            for subject in (SUBJECT, *VARIANTS) if subject in names
            for peer in PEERS if peer in names]


def _f(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def table(out: dict) -> str:
    """A plain text report for the terminal."""
    names = list(out["settings"]["contestants"])
    cols = _ratio_columns(names)
    lines = []
    hdr = (f"{'direction':<14} {'size':>5} " + " ".join(f"{n + ' Mpps':>13}" for n in names)
           + " " + " ".join(f"{label:>12}" for label, _ in cols)
           + " " + " ".join(f"{n[:8] + ' ns/f':>13}" for n in names) + f" {'copied':>7}")
    lines += [hdr, "-" * len(hdr)]
    for d in DIRECTIONS:
        for s, r in out.get(d, {}).items():
            lines.append(f"{d:<14} {s:>5} "
                         + " ".join(f"{_f(r.get(n + '_mpps')):>13}" for n in names) + " "
                         + " ".join(f"{_f(r.get(key), '.2f'):>12}" for _, key in cols) + " "
                         + " ".join(f"{_f(r.get(n + '_cpu_ns_per_frame'), '.0f'):>13}"
                                    for n in names)
                         + f" {r.get('copied_bytes', 0):>7}")
    lat = out.get("latency")
    if lat:
        lines.append("")
        lines.append("ping-pong 64 B, round trip (us): " + "; ".join(
            f"{n} p50 {_f(lat.get(n + '_p50_us'), '.0f')} p99 {_f(lat.get(n + '_p99_us'), '.0f')}"
            for n in names if n + "_p50_us" in lat))
        lines.append("p99 ratios: " + ", ".join(
            f"{label} {_f(lat.get(key.replace('ratio_vs_', 'p99_ratio_vs_')), '.2f')}"
            for label, key in cols if key.replace('ratio_vs_', 'p99_ratio_vs_') in lat))
    m = out["machine"]
    lines += ["", f"machine: {m['nproc']} CPUs, {m['cpu_model']}, Linux {m['kernel']}, "
                  f"load at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}",
              f"placement: {out['placement']}"]
    st = out["settings"]
    lines.append(f"settings: {st['rounds']} rounds x {st['seconds_per_round']} s, XDP "
                 f"{st['xdp_mode']}, AF_XDP {st['xsk_mode']}, guest queue "
                 f"{st['guest_queue_size']}, {st['elapsed_s']} s")
    return "\n".join(lines)


def markdown(out: dict) -> str:
    """The markdown tables docs/benchmarks.md carries for one run."""
    names = list(out["settings"]["contestants"])
    cols = _ratio_columns(names)
    m, st = out["machine"], out["settings"]
    lines = [f"Machine: {m['nproc']} vCPUs, {m['cpu_model']}, Linux {m['kernel']}, "
             f"load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}; "
             f"{st['rounds']} rounds x {st['seconds_per_round']} s; XDP {st['xdp_mode']}, "
             f"AF_XDP {st['xsk_mode']}; guest queue {st['guest_queue_size']}; "
             f"run took {st['elapsed_s']} s.", "",
             "| direction | size | " + " | ".join(f"{n} Mpps" for n in names) + " | "
             + " | ".join(f"{label} (per round)" for label, _ in cols)
             + " | " + " | ".join(f"{n} ns/frame" for n in names) + " | copied B |",
             "|---|---|" + "---|" * (2 * len(names) + len(cols) + 1)]
    for d in DIRECTIONS:
        for s, r in out.get(d, {}).items():
            cells = [d.replace("_to_", " → "), s]
            cells += [_f(r.get(f"{n}_mpps")) for n in names]
            cells += [f"**{_f(r.get(key), '.2f')}** ("
                      + ", ".join(_f(x, ".2f") for x in r.get(key.replace("ratio_", "ratios_"),
                                                               [])) + ")"
                      for _, key in cols]
            cells += [_f(r.get(f"{n}_cpu_ns_per_frame"), ".0f") for n in names]
            cells.append(str(r.get("copied_bytes", 0)))
            lines.append("| " + " | ".join(cells) + " |")
    lat = out.get("latency")
    if lat:
        lnames = [n for n in names if f"{n}_p50_us" in lat]
        lines += ["", "Ping-pong, 64 B, wire → guest (reflects) → wire, round trip in µs "
                      f"(medians of {st['latency_rounds']} rounds x {st['pingpongs']} round trips):", "",
                  "| | " + " | ".join(lnames) + " |", "|---|" + "---|" * len(lnames),
                  "| p50 | " + " | ".join(_f(lat[f"{n}_p50_us"], ".0f") for n in lnames) + " |",
                  "| p99 | " + " | ".join(_f(lat[f"{n}_p99_us"], ".0f") for n in lnames) + " |",
                  "| lost | " + " | ".join(str(lat[f"{n}_lost"]) for n in lnames) + " |"]
        rs = [f"{label} **{_f(lat.get(k), '.2f')}**" for label, key in cols
              if (k := key.replace("ratio_vs_", "p99_ratio_vs_")) in lat]
        if rs:
            lines += ["", "p99 ratios: " + ", ".join(rs) + "."]
    return "\n".join(lines) + "\n"


def chart(out: dict, path: str) -> None:
    """Grouped bars: Mpps per contestant for each direction and size, and the
    ping-pong p50/p99 when measured; written as a PNG to *path*."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["settings"]["contestants"])
    groups = [(d, s) for d in DIRECTIONS for s in out.get(d, {})]
    lat = out.get("latency")
    fig, axes = plt.subplots(1, 2 if lat else 1, figsize=(12 if lat else 8, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        vals = [out[d][s].get(f"{n}_mpps") or 0 for d, s in groups]
        ax.bar([g + i * width for g in range(len(groups))], vals, width, label=n)
    ax.set_xticks([g + width * (len(names) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{d.replace('_to_', '→')}\n{s} B" for d, s in groups])
    ax.set_ylabel("Mpps (median of rounds)")
    ax.set_title("throughput, same run, same NIC queue")
    ax.legend()
    if lat:
        ax2 = axes[0][1]
        lnames = [n for n in names if f"{n}_p50_us" in lat]
        xs = range(len(lnames))
        ax2.bar([x - 0.2 for x in xs], [lat[f"{n}_p50_us"] or 0 for n in lnames], 0.4,
                label="p50")
        ax2.bar([x + 0.2 for x in xs], [lat[f"{n}_p99_us"] or 0 for n in lnames], 0.4,
                label="p99")
        ax2.set_xticks(list(xs))
        ax2.set_xticklabels(lnames)
        ax2.set_ylabel("round trip, µs")
        ax2.set_title("ping-pong 64 B (wire → guest → wire)")
        ax2.legend()
    m = out["machine"]
    fig.suptitle(f"tools/bench: {m['nproc']} vCPUs, Linux {m['kernel']}, copy-mode AF_XDP on veth")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""tools/bench keeps working: one short round of every contestant (xdpnet,
DPDK, tap, the AF_XDP ceiling) on a real veth test bed prints one JSON
object with the ratios the benchmark report is built from, xdpnet copies
no payload byte in userspace, and the run leaves nothing behind.

This checks the tool, not the numbers: rates live in the benchmark's own
output (docs/benchmarks.md), never in test assertions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.dpdk,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("dpdk-testpmd") is None,
                       reason="dpdk-testpmd not installed (Debian: dpdk-dev)"),
]


def _links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def test_bench_quick_round_reports_every_ratio(tmp_path):
    before = _links()
    chart = tmp_path / "bench.png"
    md = tmp_path / "bench.md"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench"), "--json",
                        "--rounds", "1", "--seconds", "0.2", "--sizes", "64",
                        "--pingpongs", "30", "--chart", str(chart), "--markdown", str(md)],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    for direction in ("wire_to_guest", "guest_to_wire"):
        r = out[direction]["64"]
        for peer in ("ceiling", "dpdk", "tap"):
            assert r[f"ratio_vs_{peer}"] is not None and r[f"ratio_vs_{peer}"] > 0, (direction, peer)
            assert r[f"{peer}_mpps"] > 0, (direction, peer)
        assert r["xdpnet_mpps"] > 0
        assert r["copied_bytes"] == 0          # xdpnet: no userspace payload copy
        assert r["rounds"][0]["dpdk"]["frames"] > 0
    lat = out["latency"]
    for name in ("xdpnet", "dpdk", "tap"):
        assert lat[f"{name}_p50_us"] > 0 and lat[f"{name}_p99_us"] >= lat[f"{name}_p50_us"]
    assert lat["p99_ratio_vs_dpdk"] > 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "xdpnet/dpdk" in md.read_text()
    assert _links() <= before, f"left behind: {_links() - before}"
    assert not [d for d in os.listdir("/var/run/dpdk") if d.startswith("xnbench")] \
        if os.path.isdir("/var/run/dpdk") else True

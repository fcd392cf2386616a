"""Soak (issue 7): both directions flooded, no leak, every descriptor accounted for.

CI runs 40 s of tools/soak (10 s warm-up); docs/hostile.md records the
10-minute run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_soak_both_ways_leaks_nothing_and_loses_no_descriptor():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "soak"), "--seconds", "40",
                        "--warmup", "10", "--json"], cwd=REPO,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.stdout.strip(), r.stderr
    s = json.loads(r.stdout)
    failed = [k for k, v in s["checks"].items() if not v]
    assert r.returncode == 0 and s["pass"], f"failed: {failed}\n{r.stderr}"
    # Memory and fds.
    assert s["rss_growth_kib"] < 1024
    assert s["fds_end"] == s["fds_after_warmup"]
    assert s["fds_after_teardown"] == s["fds_before_setup"]
    # Traffic flowed both ways, every frame verified, nothing bad.
    assert s["wire_to_vm_verified"] > 10_000 and s["vm_to_wire_verified"] > 10_000
    assert s["guest_rx_bad"] == 0 and s["guest_rx_len_invalid"] == 0 and s["wire_bad"] == 0
    assert s["guest_tx_bad_used"] == 0 and s["guard_bytes_changed"] == 0
    assert s["rx_broken"] == 0 and s["tx_broken"] == 0 and not s["errors"]
    assert s["backend_rx_frames"] == s["guest_rx_frames"]
    # Every posted descriptor: avail = used + held by the backend.
    for ring in ("rx_ring", "tx_ring"):
        q = s[ring]
        assert q["unaccounted"] == 0, (ring, q)
        assert (q["avail_idx"] - q["backend_used_idx"]) % 65536 == q["backend_inflight"], (ring, q)
        assert q["used_idx"] == q["backend_used_idx"], (ring, q)
    assert s["guest_rx_buffers_posted"] - s["guest_rx_used"] == s["rx_ring"]["backend_inflight"]
    assert s["tx_ring"]["backend_inflight"] == 0
    assert s["vm_to_wire_sent"] == s["vm_to_wire_completed"] == s["vm_to_wire_backend_tx_frames"]

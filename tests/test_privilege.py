"""Least privilege (issue 7.5): after set-up ``xdpnet serve`` keeps exactly
``privilege.KEEP_AFTER_SETUP`` in every thread (effective, permitted,
bounding; nothing inheritable or ambient; no_new_privs set), and that set is
enough for its whole life: a frontend reconnect (new memory table, new
sockets) and a clean teardown on SIGTERM (no XDP program, no pins left).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import pytest
from helpers_serve import NOBODY, ServeProcess, has_xdp
from rigs import wait_for

from xdpnet import privilege

MAC = "52:54:00:c1:1c:75"
PREFIX = "xr" + secrets.token_hex(2)     # this session's test beds only
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
KEEP = privilege.cap_mask(privilege.KEEP_AFTER_SETUP)


def test_cap_names_round_trip():
    assert privilege.cap_names(KEEP) == sorted(privilege.KEEP_AFTER_SETUP,
                                               key=privilege.CAPS.__getitem__)
    assert privilege.cap_names(1 << 63) == ["cap_63"]
    assert set(privilege.KEEP_AFTER_SETUP) <= set(privilege.CAPS)
    assert all(reason for reason in privilege.KEEP_AFTER_SETUP.values())


_DROP_WITH_A_THREAD = """
import logging, sys, threading, time
from xdpnet import privilege
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
stop = threading.Event()
def idle():                     # a thread started before the drop, like the refresher
    while not stop.is_set():
        stop.wait(0.2)
t = threading.Thread(target=idle, daemon=True); t.start()
eff = privilege.drop_after_setup()
tasks = privilege.task_caps()
print(eff, len(tasks), sorted({st["CapEff"] for st in tasks.values()}),
      sorted({st["NoNewPrivs"] for st in tasks.values()}))
stop.set(); t.join()
"""


@root_only
def test_drop_reaches_threads_started_before_it():
    r = subprocess.run([sys.executable, "-c", _DROP_WITH_A_THREAD], capture_output=True,
                       text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    eff, ntasks = r.stdout.split()[:2]
    assert int(eff) == KEEP and int(ntasks) >= 2, (r.stdout, r.stderr)
    assert f"[{KEEP}] [1]" in r.stdout, (r.stdout, r.stderr)
    assert "incomplete" not in r.stderr, r.stderr


def test_drop_without_privilege_carries_on():
    """Not root (or nothing to drop): no exception, the process keeps going."""
    prefix = (NOBODY
              if os.geteuid() == 0 else [])
    r = subprocess.run([*prefix, sys.executable, "-c", _DROP_WITH_A_THREAD],
                       capture_output=True, text=True, timeout=30, cwd="/", check=False,
                       env={**os.environ, "PYTHONPATH": str(os.path.dirname(
                           os.path.dirname(os.path.abspath(privilege.__file__))))})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "0", r.stdout
    assert "capabilities after set-up: none" in r.stderr, r.stderr


def _dropped(pid: int) -> bool:
    tasks = privilege.task_caps(pid)
    return bool(tasks) and all(st["CapEff"] == KEEP for st in tasks.values())


def _exchange(bed, sock: str) -> None:
    """A fresh simulator (new memory table, new sockets) connects; 32 frames
    each way; then it disconnects."""
    from xdpnet.guest.simulator import VirtioNetSimulator
    from xdpnet.wire import WirePeer

    with VirtioNetSimulator(sock, mac=MAC, queue_size=256) as vm, \
            WirePeer(bed, peer_mac=MAC) as wire:
        vm.connect(timeout=10)
        vm.start()
        vm.send(32, 64, dst=wire.mac, flow=7)
        got = wire.recv(max_frames=32, timeout=3)
        assert got.verified == 32 and got.bad == 0, got
        deadline = time.monotonic() + 5
        received = 0
        while received < 32 and time.monotonic() < deadline:
            wire.send(32 - received, 64, flow=8)
            res = vm.run(duration=1.0, tx_count=0, rx_count=32 - received)
            received += res.stats.rx_verified
        assert received >= 32, received


@root_only
def test_serve_keeps_only_needed_caps_and_survives_reconnect_and_teardown(tmp_path):
    from xdpnet.net.netns import Testbed
    from xdpnet.steering.programs import pin_dir

    sock = str(tmp_path / "vm.sock")
    with Testbed(queues=1, prefix=PREFIX) as bed:
        pins = pin_dir(bed.nic)
        with ServeProcess(bed.nic, sock, mac=MAC) as srv:
            srv.wait_ready()
            deadline = time.monotonic() + 10
            while not _dropped(srv.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            tasks = privilege.task_caps(srv.proc.pid)
            for tid, st in tasks.items():
                assert st["CapEff"] == KEEP, (tid, privilege.cap_names(st["CapEff"]),
                                              srv.stderr_text())
                assert st["CapPrm"] == KEEP, (tid, privilege.cap_names(st["CapPrm"]))
                assert st["CapBnd"] == KEEP, (tid, privilege.cap_names(st["CapBnd"]))
                assert st["CapInh"] == 0 and st["CapAmb"] == 0, (tid, st)
                assert st["NoNewPrivs"] == 1, (tid, st)
            # The line is logged once every thread has dropped: /proc can
            # show the drop a moment before the line reaches stderr.
            line = "capabilities after set-up: " + ", ".join(privilege.cap_names(KEEP))
            wait_for(lambda: line in srv.stderr_text(), timeout=5)
            assert line in srv.stderr_text(), srv.stderr_text()

            _exchange(bed, sock)                # first frontend
            _exchange(bed, sock)                # reconnect: new memory table, new sockets
            assert srv.returncode is None, srv.stderr_text()
            # threads started after the drop (datapath) inherit the kept set only
            assert _dropped(srv.proc.pid), privilege.task_caps(srv.proc.pid)
        assert srv.returncode == 0, srv.stderr_text()
        assert "Traceback" not in srv.stderr_text(), srv.stderr_text()
        assert "Operation not permitted" not in srv.stderr_text(), srv.stderr_text()
        assert not has_xdp(bed.nic), srv.stderr_text()
        assert not os.path.exists(pins), (os.listdir(pins), srv.stderr_text())

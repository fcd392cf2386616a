"""DPDK's virtio-user driver (dpdk-testpmd) as an independent vhost-user frontend.

The wire peer sends test frames to the VM's MAC; testpmd (``macswap``
forwarding) sends each one back with the MACs swapped; the wire peer
verifies every returned frame byte for byte.

Memory: ``--no-huge -m 1024`` is enough.  DPDK 22.11's EAL backs its
no-huge memory with a memfd when it runs virtio-user, and virtio-user
passes that memfd in SET_MEM_TABLE (one 1 GiB region), which xdpnet
accepts (memfd = tmpfs, see xdpnet/memory/regions.py).  No hugepages, no
``--in-memory`` / ``--legacy-mem`` needed (checked on Debian 12's
dpdk 22.11.11, Linux 6.18).

testpmd exits when its stdin reaches EOF, so it gets a pipe that stays
open until we close it; its stdout goes to a file (with ``stdbuf -oL``)
that failure messages quote.  It leaves /var/run/dpdk/<file-prefix>/
behind: removed here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import time

import pytest

from helpers_serve import ServeProcess, has_xdp

pytestmark = [
    pytest.mark.dpdk,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("dpdk-testpmd") is None,
                       reason="dpdk-testpmd not installed (Debian: dpdk-dev)"),
]

MAC = "52:54:00:d0:d0:01"
SIZES = (64, 1500)
COUNT = 1000
BATCH = 32              # a burst larger than the rings would be dropped (no rx buffer)
PREFIX = "xp" + secrets.token_hex(2)


@pytest.fixture
def bed():
    from xdpnet.net.netns import Testbed

    with Testbed(queues=1, prefix=PREFIX) as tb:
        yield tb
    assert not os.path.exists(f"/run/netns/{tb.netns}")


@contextlib.contextmanager
def run_testpmd(sock: str, mac: str, logdir: str):
    """dpdk-testpmd in macswap mode on a virtio-user port connected to *sock*."""
    prefix = "xn" + secrets.token_hex(4)
    log_path = os.path.join(logdir, f"testpmd-{prefix}.log")
    cmd = ["stdbuf", "-oL", "dpdk-testpmd", "--no-huge", "-m", "1024", "--no-pci",
           f"--file-prefix={prefix}",
           "--vdev", f"net_virtio_user0,path={sock},queues=1,mac={mac}",
           "--", "--forward-mode=macswap", "--total-num-mbufs=32768", "--stats-period", "1"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)

    def output() -> str:
        with open(log_path, errors="replace") as f:
            return f.read()[-4000:]

    proc.output = output            # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        try:
            proc.stdin.close()      # EOF: testpmd stops forwarding and exits
        except OSError:
            pass
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True)


def _warm_up(wire, proc, timeout: float = 30.0) -> None:
    """Send single frames until one comes back (testpmd and the rings are up)."""
    deadline = time.monotonic() + timeout
    seq = 1 << 40
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"dpdk-testpmd exited:\n{proc.output()}"
        wire.send(1, 64, flow=99, seq0=seq)
        seq += 1
        if wire.recv(max_frames=1, timeout=0.5).verified:
            # drain stragglers of the warm-up flow
            wire.recv(timeout=0.3)
            return
    raise AssertionError(f"no frame came back from dpdk-testpmd within {timeout}s:\n"
                         f"{proc.output()}")


def _exchange(wire, size: int, flow: int) -> tuple[int, int, int]:
    """Send COUNT frames of *size* bytes in batches; returns (verified, bad, foreign)."""
    verified = bad = foreign = 0
    seq = 0
    while seq < COUNT:
        n = min(BATCH, COUNT - seq)
        wire.send(n, size, flow=flow, seq0=seq)
        seq += n
        got = wire.recv(max_frames=n, timeout=1.0)
        verified, bad, foreign = verified + got.verified, bad + got.bad, foreign + got.foreign
    got = wire.recv(timeout=0.3)        # late ones
    return verified + got.verified, bad + got.bad, foreign + got.foreign


ETH_P_ALL, ETH_P_TEST = 0x0003, 0x88B5      # 0x88B5: the test frames' ethertype (c/frame.h)
PACKET_OUTGOING = 4


def _assert_mac_swapped(bed, wire) -> None:
    """Capture on the wire end: a returned test frame is addressed to the wire peer,
    from the VM's MAC (the frame check itself does not look at MACs)."""
    from xdpnet.net.mac import parse_mac
    from xdpnet.net.netns import socket_in_netns

    cap = socket_in_netns(bed.netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        cap.bind((bed.wire, 0))
        cap.settimeout(0.2)
        wire.send(4, 64, flow=98, seq0=0)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                data, addr = cap.recvfrom(2048)
            except socket.timeout:
                continue
            if addr[2] == PACKET_OUTGOING or data[12:14] != ETH_P_TEST.to_bytes(2, "big"):
                continue
            assert data[0:6] == parse_mac(wire.mac), data[:14].hex()
            assert data[6:12] == parse_mac(MAC), data[:14].hex()
            break
        else:
            raise AssertionError("no returned test frame captured on the wire end")
    finally:
        cap.close()
    wire.recv(timeout=0.3)      # drain the 4 frames from the peer's own socket


def _traffic(bed, proc) -> None:
    from xdpnet.wire import WirePeer

    with WirePeer(bed, peer_mac=MAC) as wire:
        _warm_up(wire, proc)
        _assert_mac_swapped(bed, wire)
        for flow, size in enumerate(SIZES, start=1):
            verified, bad, foreign = _exchange(wire, size, flow)
            assert bad == 0, f"{bad} frames of {size} B came back corrupted"
            assert verified == COUNT, (f"{size} B: {verified}/{COUNT} frames came back verified"
                                       f"\n{proc.output()}")


def test_testpmd_against_serve_subprocess(bed, tmp_path):
    """``xdpnet serve`` (the real CLI) serves DPDK's virtio-user; frames round-trip intact."""
    sock = str(tmp_path / "vm.sock")
    with ServeProcess(bed.nic, sock, mac=MAC) as srv:
        srv.wait_ready()
        with run_testpmd(sock, MAC, str(tmp_path)) as proc:
            try:
                _traffic(bed, proc)
            except AssertionError as e:
                raise AssertionError(f"{e}\nxdpnet serve stderr:\n{srv.stderr_text()}") from None
            assert srv.returncode is None, srv.stderr_text()
        code = srv.stop()
        err = srv.stderr_text()
    assert code == 0, err
    assert "error" not in err.lower(), err
    assert not has_xdp(bed.nic)
    assert not os.path.exists(sock)


def test_testpmd_in_process_backend_is_copy_free(bed, tmp_path):
    """Same flow through an in-process backend (the code ``serve`` runs), with counters:
    every frame DPDK received was written by the kernel straight into its mbufs."""
    from xdpnet.attachment import Attachment

    sock = str(tmp_path / "vm.sock")
    with Attachment(bed.nic, MAC, sock) as att:
        att.start()
        srv = att._thread
        with run_testpmd(sock, MAC, str(tmp_path)) as proc:
            _traffic(bed, proc)
            snap = att.counters()
        print("in-process backend counters:", snap)
        assert snap["rx_frames"] >= COUNT * len(SIZES)
        assert snap["tx_frames"] >= COUNT * len(SIZES)
        assert snap["rx_zero_copy_frames"] > 0, snap
        assert snap["rx_copied_bytes"] == 0, snap
        # DPDK's virtio-user puts the header and the frame in one descriptor: direct tx too
        assert snap["tx_zero_copy_frames"] > 0, snap
        assert snap["tx_copied_bytes"] == 0, snap
        for cause in ("drop_too_large", "drop_invalid_desc", "drop_tx_error", "rx_broken",
                      "tx_broken"):
            assert snap[cause] == 0, (cause, snap)
    assert not srv.is_alive()
    assert not has_xdp(bed.nic)

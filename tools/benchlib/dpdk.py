"""DPDK as a tools/bench contestant: what a user would run instead of xdpnet.

``dpdk-testpmd`` (Debian 12: package ``dpdk-dev``, DPDK 22.11) forwards
between an AF_XDP port on the NIC queue (``net_af_xdp``) and a vhost-user
port (``net_vhost``, server mode) in ``io`` mode: every frame is copied
between DPDK's mbufs and guest memory by the vhost library.  Its guest is
the same simulator xdpnet gets, connected to testpmd's socket.

Placement: EAL lcores 0,1 (``-l 0,1``): the main lcore (control, stats)
on cpu0, the one forwarding lcore on cpu1 -- the same CPU xdpnet's
datapath thread gets.  The forwarding lcore busy-polls (DPDK's design),
so its CPU time per frame is 100 % of cpu1 divided by the frames.
``net_af_xdp`` is run with ``busy_budget=0`` (no SO_PREFER_BUSY_POLL),
the setting FACTS.md measured as DPDK's best here (the default 64 put the
NAPI work on the forwarding core and halved what it pulled).

testpmd runs interactively on a pipe: the counters come from ``show port
stats`` before and after the measured window (port 0 = AF_XDP, port 1 =
vhost), so frames dropped inside DPDK are not counted as forwarded.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time

from benchlib.common import DUT_CPU, GEN_CPU, VM_MAC, Env
from benchlib.contestants import Dut, VhostContestant, wait_for_value

TESTPMD = "dpdk-testpmd"
_STATS = re.compile(r"NIC statistics for port (\d+).*?RX-packets:\s*(\d+).*?RX-missed:\s*(\d+)"
                    r".*?TX-packets:\s*(\d+)\s+TX-errors:\s*(\d+)", re.S)


class Testpmd:
    """An interactive dpdk-testpmd on pipes; :meth:`command` sends a line and
    waits for a pattern in what it prints."""

    def __init__(self, args: list[str], prefix: str):
        self.prefix = prefix
        self.proc = subprocess.Popen(["stdbuf", "-oL", TESTPMD, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        # Chunks, not lines: the "testpmd> " prompt ends without a newline.
        self._out: list[str] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="bench-testpmd-out", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            with self._cv:
                self._out.append(chunk.decode(errors="replace"))
                self._cv.notify_all()
        with self._cv:
            self._out.append("")            # EOF marker
            self._cv.notify_all()

    def output(self, tail: int = 4000) -> str:
        with self._cv:
            return "".join(self._out)[-tail:]

    def wait_for(self, pattern: str, start: int, timeout: float = 20.0) -> str:
        """Output printed since line *start* once it matches *pattern*."""
        rx = re.compile(pattern, re.S)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                text = "".join(self._out[start:])
                if rx.search(text):
                    return text
                if self._out and self._out[-1] == "" and self.proc.poll() is not None:
                    raise RuntimeError(f"dpdk-testpmd exited ({self.proc.returncode}):\n"
                                       f"{self.output()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"dpdk-testpmd: no {pattern!r} within {timeout} s:\n"
                                       f"{self.output()}")
                self._cv.wait(left)

    def command(self, line: str, pattern: str, timeout: float = 20.0) -> str:
        with self._cv:
            start = len(self._out)
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.wait_for(pattern, start, timeout)

    def port_stats(self) -> dict[int, dict[str, int]]:
        """RX/TX packet counters of every port."""
        text = self.command("show port stats all", r"NIC statistics for port 1.*?TX-packets[^\n]*\n")
        out = {}
        for m in _STATS.finditer(text):
            out[int(m.group(1))] = {"rx": int(m.group(2)), "rx_missed": int(m.group(3)),
                                    "tx": int(m.group(4)), "tx_errors": int(m.group(5))}
        return out

    def forwarding_tid(self) -> int | None:
        """The forwarding lcore's thread (comm ``rte-worker-<cpu>`` in DPDK 22.11)."""
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                with open(f"/proc/{self.proc.pid}/task/{tid}/comm") as f:
                    if f.read().strip() == f"rte-worker-{DUT_CPU}":
                        return int(tid)
        return None

    def close(self) -> None:
        """quit, or kill; remove the run directory DPDK leaves behind."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)


class Dpdk(VhostContestant):
    """dpdk-testpmd io forwarding net_af_xdp <-> net_vhost, the simulator as its guest."""

    name = "dpdk"

    def __init__(self, queue_size: int = 1024, busy_budget: int = 0):
        self.queue_size = queue_size
        self.busy_budget = busy_budget

    def describe(self) -> str:
        return (f"dpdk-testpmd (DPDK 22.11) --forward-mode=io, net_af_xdp (queue 0, "
                f"busy_budget={self.busy_budget}) <-> net_vhost, forwarding lcore on cpu{DUT_CPU} "
                f"(busy-polls), VirtioNetSimulator (queue_size {self.queue_size}) as its guest")

    @staticmethod
    def available() -> str | None:
        """None if testpmd can run here, else why not."""
        if shutil.which(TESTPMD) is None:
            return "dpdk-testpmd not installed (Debian: dpdk-dev; tools/setup installs it)"
        return None

    @contextlib.contextmanager
    def _open(self, env: Env):
        from xdpnet.guest.simulator import VirtioNetSimulator
        with contextlib.ExitStack() as stack:
            nic = stack.enter_context(env.bare_nic())
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="xdpnet-bench-dpdk-"))
            sock = os.path.join(tmp, "vhost.sock")
            prefix = "xnbench" + secrets.token_hex(4)
            pmd = Testpmd(["-l", f"{GEN_CPU},{DUT_CPU}",
                           "--main-lcore", str(GEN_CPU), "--no-huge", "-m", "512", "--no-pci",
                           f"--file-prefix={prefix}", "--log-level=lib.eal:error",
                           "--vdev", f"net_af_xdp0,iface={nic},start_queue=0,queue_count=1,"
                                     f"busy_budget={self.busy_budget}",
                           "--vdev", f"net_vhost0,iface={sock},queues=1",
                           "--", "-i", "--forward-mode=io", "--nb-cores=1",
                           "--total-num-mbufs=16384", "--rxd=1024", "--txd=1024"], prefix)
            stack.callback(pmd.close)
            pmd.wait_for(r"testpmd> ", 0, timeout=30)
            wait_for_value(lambda: os.path.exists(sock), "the net_vhost socket", 10)
            vm = stack.enter_context(VirtioNetSimulator(sock, mac=VM_MAC,
                                                        queue_size=self.queue_size))
            vm.connect()
            vm.start()
            pmd.command("start", r"testpmd> ")
            tid = wait_for_value(pmd.forwarding_tid, "testpmd's forwarding lcore")

            def counters() -> dict:
                st = pmd.port_stats()
                nic_p, vhost_p = st.get(0, {}), st.get(1, {})
                return {"rx_frames": vhost_p.get("tx", 0), "tx_frames": nic_p.get("tx", 0),
                        "pulled_from_nic": nic_p.get("rx", 0),
                        "taken_from_guest": vhost_p.get("rx", 0),
                        "drop_tx_error": nic_p.get("tx_errors", 0) + vhost_p.get("tx_errors", 0)}

            yield Dut(vm, tid, pmd.proc.pid, counters, False)
            pmd.command("stop", r"testpmd> ")

"""Start ``xdpnet serve`` as a subprocess and stop it cleanly (SIGTERM, then wait).

Shared by tests/test_cli.py and tests/test_dpdk_frontend.py::

    with ServeProcess(bed.nic, sock, mac=MAC) as srv:
        srv.wait_ready()            # the socket file exists
        ...
    srv.returncode, srv.stderr      # after the with block (process stopped)

stderr is drained by a thread (so a chatty server never blocks on a full
pipe) and is available as ``srv.stderr_text()`` at any time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
XDPNET = str(REPO / ".venv" / "bin" / "xdpnet")
# argv prefix: run as nobody, no groups (tests of the missing-privilege errors)
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def xdpnet_cmd(*args: str) -> list[str]:
    """argv running the repo's xdpnet entry point (the venv script if present)."""
    if os.path.exists(XDPNET):
        return [XDPNET, *args]
    return [sys.executable, "-m", "xdpnet", *args]


def run_xdpnet(*args: str, timeout: float = 60, prefix: list[str] | None = None,
               **kw) -> subprocess.CompletedProcess:
    """Run ``xdpnet ARGS`` to completion; returns the CompletedProcess (text)."""
    return subprocess.run([*(prefix or []), *xdpnet_cmd(*args)], capture_output=True,
                          text=True, timeout=timeout, cwd=str(REPO),
                          stdin=subprocess.DEVNULL, **kw)


def has_xdp(ifname: str) -> bool:
    """True if *ifname* (root namespace) has an XDP program attached."""
    out = subprocess.run(["ip", "-d", "link", "show", "dev", ifname], capture_output=True,
                         text=True, check=True).stdout
    return any(w.startswith("xdp") for w in out.split()) or "prog/xdp" in out


class ServeProcess:
    """``xdpnet serve --iface IF --queue Q --mac MAC --socket PATH`` as a subprocess."""

    def __init__(self, iface: str, socket_path: str, mac: str = "52:54:00:12:34:56",
                 queues: str = "0", extra: tuple[str, ...] = ()):
        self.socket_path = socket_path
        self.argv = xdpnet_cmd("serve", "--iface", iface, "--queue", queues, "--mac", mac,
                               "--socket", socket_path, *extra)
        self._err: list[str] = []
        self._out: list[str] = []
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=str(REPO))
        self._threads = [threading.Thread(target=self._drain, args=(s, buf), daemon=True)
                         for s, buf in ((self.proc.stdout, self._out),
                                        (self.proc.stderr, self._err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _drain(stream, buf: list[str]) -> None:
        for line in stream:
            buf.append(line)

    def stderr_text(self) -> str:
        return "".join(self._err)

    def stdout_text(self) -> str:
        return "".join(self._out)

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the socket file exists (raises if serve exited or timed out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.socket_path):
                return
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"xdpnet serve exited with {self.proc.returncode} before "
                                   f"creating {self.socket_path}:\n{self.stderr_text()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"xdpnet serve did not create {self.socket_path} within "
                           f"{timeout}s:\n{self.stderr_text()}")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait; SIGKILL if it does not exit in time.  Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for t in self._threads:
            t.join(5)
        return self.proc.returncode

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- attached VMs (xdpnet attach) -------------------------------------------

def xdpnet_env(run_dir: str) -> dict[str, str]:
    """The environment that points every xdpnet command at registry *run_dir*."""
    return {**os.environ, "XDPNET_RUN_DIR": str(run_dir)}


def serve_pids(run_dir: str, name: str) -> list[int]:
    """Pids of ``xdpnet serve --name NAME --state-dir RUN_DIR`` processes."""
    want = ["serve", "--name", name, "--state-dir", str(run_dir)]
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if any(argv[i:i + len(want)] == want for i in range(len(argv))):
            out.append(int(pid))
    return out

"""A real Linux guest under QEMU (TCG) for the end-to-end tests (tests/test_qemu_guest.py).

The guest is built by ``tools/guest/build`` (QEMU 10 from bookworm-backports,
Debian's 6.1 kernel booted as an ELF through PVH, a busybox initramfs with
iperf3 and ethtool; docs/guest.md).  Its ``/init`` runs a command server on
the second serial port, which :class:`Guest` drives over a unix socket, so
the network under test never carries the test's own control traffic::

    opts = serve_qemu_options(srv)          # what `xdpnet serve` printed
    with Guest(opts, workdir, ip="10.77.0.2/24") as vm:
        vm.wait_agent()
        out = vm.check("ping -c 3 10.77.0.1")

Every file of a boot (console log, the QEMU command line, QEMU's stderr)
stays in *workdir*; :meth:`Guest.diag` returns their tails and paths, and
:class:`GuestError` (an AssertionError) carries them, so a failing test
shows the guest's console in its message and leaves the logs on disk.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "tools" / "guest" / "build"
CACHE = os.environ.get("XDPNET_GUEST_CACHE", "/var/cache/xdpnet/guest")
QEMU_OPTIONS_HEADER = "QEMU options for this VM:"


LOG_ROOT = os.environ.get("XDPNET_GUEST_LOGS", "/var/tmp/xdpnet-guest-logs")
KEEP_RUNS = 10
_run_dir: Path | None = None


def log_dir(name: str) -> Path:
    """A directory for one test's logs: ``$XDPNET_GUEST_LOGS`` (default
    /var/tmp/xdpnet-guest-logs) / ``<date-time>-<pid>`` / *name*.

    Outside pytest's tmp directories on purpose: those are shared by every
    pytest run of the machine and only the last three survive.  A passing
    test's directory is removed (drop_logs); of failed runs the newest
    KEEP_RUNS are kept, older ones removed.
    """
    global _run_dir
    if _run_dir is None:
        root = Path(LOG_ROOT)
        root.mkdir(parents=True, exist_ok=True)
        _run_dir = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        _run_dir.mkdir()
        runs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for old in runs[:-KEEP_RUNS]:
            shutil.rmtree(old, ignore_errors=True)
    d = _run_dir / re.sub(r"[^\w.-]+", "_", name)
    d.mkdir(parents=True, exist_ok=True)
    return d


def drop_logs(d: str | Path) -> None:
    """Remove a passing test's logs, and its run's (and the root's)
    directory once empty: only failures leave logs behind."""
    from xdpnet.rundirs import remove_empty

    shutil.rmtree(d, ignore_errors=True)
    remove_empty(str(Path(d).parent), LOG_ROOT)


class GuestError(AssertionError):
    """A guest step failed; the message carries the console tail and log paths."""


def guest_assets(timeout: float = 900) -> dict:
    """Build (or find cached) the guest; returns tools/guest/build's manifest."""
    r = subprocess.run([str(BUILD), "--quiet", "--cache", CACHE], capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"tools/guest/build failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    with open(os.path.join(CACHE, "manifest.json")) as f:
        return json.load(f)


def serve_qemu_options(srv, timeout: float = 30.0) -> list[str]:
    """The QEMU options ``xdpnet serve`` printed (the line after its header), as argv words."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = srv.stdout_text().splitlines()
        for i, line in enumerate(lines[:-1]):
            if line.strip() == QEMU_OPTIONS_HEADER:
                return shlex.split(lines[i + 1])
        if srv.returncode is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"xdpnet serve printed no QEMU options within {timeout}s:\n"
                       f"stdout:\n{srv.stdout_text()}\nstderr:\n{srv.stderr_text()[-3000:]}")


def with_reconnect(opts: list[str], ms: int = 1000) -> list[str]:
    """*opts* with ``reconnect-ms=MS`` on the vhost-user ``-chardev socket`` (QEMU >= 9.2):
    QEMU then reconnects to a restarted backend."""
    out = list(opts)
    for i, w in enumerate(out[:-1]):
        if w == "-chardev" and out[i + 1].startswith("socket,"):
            out[i + 1] += f",reconnect-ms={ms}"
    return out


def tail(path: str | os.PathLike, n: int = 60) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError as e:
        return f"({path}: {e})"


def _die_with_parent() -> None:
    """In the QEMU child: SIGKILL when the test process dies, however it dies
    (no guest outlives a killed pytest)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Guest:
    """One QEMU process running the test guest.

    *qemu_options*: the options xdpnet printed (memory backend, -m, chardev,
    netdev, device).  Added here, and nothing else: the machine-specific
    bits (``-accel tcg -machine q35 -smp N``), ``-kernel/-initrd/-append``,
    ``-nodefaults -display none -no-reboot``, the console (ttyS0) to a log
    file and the command port (ttyS1) on a unix socket.
    """

    def __init__(self, assets: dict, qemu_options: list[str], workdir: str | os.PathLike,
                 name: str = "vm", ip: str | None = "10.77.0.2/24", smp: int = 1,
                 append: str = "", boot: int = 0):
        self.assets = assets
        self.name = name
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        tag = f"{name}-boot{boot}"
        self.console = self.dir / f"{tag}-console.log"
        self.stderr_path = self.dir / f"{tag}-qemu.stderr"
        self.cmdline_path = self.dir / f"{tag}-qemu.cmdline"
        self.transcript = self.dir / f"{tag}-commands.log"     # every command, status, output
        # unix socket paths are limited to 108 bytes: keep the port in /tmp
        self.ctl_path = f"/tmp/xq-{secrets.token_hex(4)}.ctl"
        kargs = ["console=ttyS0", "panic=-1", "loglevel=4", "ipv6.disable=1",
                 f"xq.name={name}", "xq.agent=ttyS1"]
        if ip:
            kargs.append(f"xq.ip={ip}")
        if append:
            kargs.append(append)
        self.argv = [
            assets["qemu"]["binary"], "-name", name, "-accel", "tcg", "-machine", "q35",
            "-smp", str(smp), "-nodefaults", "-display", "none", "-no-reboot",
            "-serial", f"file:{self.console}",
            "-chardev", f"socket,id=xqctl,path={self.ctl_path},server=on,wait=off",
            "-serial", "chardev:xqctl",
            "-kernel", assets["kernel"]["vmlinux"], "-initrd", assets["initramfs"],
            "-append", " ".join(kargs),
            *qemu_options,
        ]
        self.cmdline_path.write_text(shlex.join(self.argv) + "\n")
        self._err = open(self.stderr_path, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=self._err, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        self._sock: socket.socket | None = None
        self._buf = b""
        self._seq = 0
        self.boot_seconds: float | None = None

    # -- diagnostics

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def diag(self, what: str = "") -> str:
        """*what* followed by the console tail, QEMU's stderr and where the logs are."""
        rc = self.proc.poll()
        return (f"{what}\n--- guest {self.name}: QEMU "
                f"{'running' if rc is None else f'exited {rc}'}; logs kept in {self.dir} "
                f"(console {self.console.name}, commands {self.transcript.name}, "
                f"command line {self.cmdline_path.name})\n"
                f"--- console tail:\n{tail(self.console, 50)}"
                f"--- QEMU stderr:\n{tail(self.stderr_path, 15)}")

    def save_dmesg(self) -> None:
        """Best effort: the guest's kernel log into ``<tag>-dmesg.log`` (the console
        runs at loglevel 4)."""
        if self._sock is None or self.proc.poll() is not None:
            return
        try:
            status, out = self.run("dmesg", timeout=10)
        except (GuestError, OSError):
            return
        (self.dir / self.console.name.replace("-console.log", "-dmesg.log")).write_text(out)

    def fail(self, what: str) -> GuestError:
        return GuestError(self.diag(what))

    # -- the command port

    def _connect(self, deadline: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise self.fail("QEMU exited before the command port opened")
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.ctl_path)
                self._sock = s
                return
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
            if time.monotonic() > deadline:
                raise self.fail(f"no command port {self.ctl_path}")
            time.sleep(0.05)

    def _readline(self, deadline: float) -> bytes:
        assert self._sock is not None
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(min(left, 0.5))
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                if self.proc.poll() is not None:
                    raise self.fail("QEMU exited") from None
                continue
            if not data:
                raise self.fail("the command port closed (QEMU exited?)")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line.rstrip(b"\r")

    def wait_agent(self, timeout: float = 120.0) -> float:
        """Wait until /init's command server is up; returns seconds since QEMU started."""
        deadline = time.monotonic() + timeout
        if self._sock is None:
            self._connect(deadline)
        try:
            while self._readline(deadline) != b"XQ-AGENT-READY":
                pass
        except TimeoutError:
            raise self.fail(f"the guest's command server did not start within {timeout}s") \
                from None
        self.boot_seconds = time.monotonic() - self.started
        return self.boot_seconds

    def run(self, cmd: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run shell *cmd* in the guest; returns (exit status, stdout+stderr)."""
        if self._sock is None:
            raise self.fail("run() before wait_agent()")
        self._seq += 1
        rid = str(self._seq)
        self._sock.sendall(f"{rid} {base64.b64encode(cmd.encode()).decode()}\n".encode())
        deadline = time.monotonic() + timeout
        chunks: list[bytes] = []
        try:
            while True:
                line = self._readline(deadline)
                if line.startswith(b"XQ-END "):
                    _, got, status = line.decode().split()
                    if got == rid:
                        break
                    chunks = []             # a late answer to an earlier, timed-out request
                    continue
                chunks.append(line)
        except TimeoutError:
            raise self.fail(f"guest command timed out after {timeout}s: {cmd}") from None
        out = base64.b64decode(b"".join(chunks)).decode(errors="replace")
        with open(self.transcript, "a") as f:
            f.write(f"### [{time.monotonic() - self.started:7.2f} s] {cmd}\n{out}"
                    f"### status {status}\n")
        return int(status), out

    def check(self, cmd: str, timeout: float = 60.0) -> str:
        """run() that raises GuestError (with the console) unless the status is 0."""
        status, out = self.run(cmd, timeout)
        if status != 0:
            raise self.fail(f"guest command failed with status {status}: {cmd}\n{out}")
        return out

    # -- the end

    def shutdown(self, status: int = 0, timeout: float = 60.0) -> str:
        """End the command server with *status*: /init prints its RESULT line and
        powers off.  Returns the RESULT line (GuestError if none, or QEMU hangs)."""
        if self._sock is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self._sock.sendall(f"exit {status}\n".encode())
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self.fail(f"QEMU did not exit within {timeout}s of the power-off") from None
        results = [ln for ln in self.console_text().splitlines() if ln.startswith("RESULT: ")]
        if not results:
            raise self.fail("no RESULT line on the console")
        return results[-1]

    def kill(self) -> None:
        """SIGKILL QEMU (what a crashed or killed VM looks like to the backend)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._err.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ctl_path)

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

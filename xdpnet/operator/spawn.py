"""``xdpnet attach`` and ``xdpnet detach``: one serve process per VM.

attach
    validates what it can without touching the NIC (privilege, name, MAC,
    interface, queues, name and socket not used by a live VM), claims the
    name with a ``starting`` placeholder record, then starts
    ``python -m xdpnet serve ... --name NAME --state-dir DIR`` in a new
    session with stdio on ``vms/NAME/serve.log``, and waits until the
    record flips to ``running`` (ready) or the process exits (its one-line
    error and exit status are relayed).  On any failure nothing stays:
    no record, no socket, no process, no log.

detach
    SIGTERM, wait, SIGKILL after a timeout; then whatever a dead serve
    left (record, socket, counter files, log, its entries in the NIC's
    steering - the programs and pins too if no VM is left) is removed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field

from xdpnet.errors import PrivilegeError, XdpnetError
from xdpnet.operator.registry import Registry, VmRecord
from xdpnet.rundirs import proc_start
from xdpnet.serve import ServeOptions, validate

log = logging.getLogger("xdpnet.operator")

ATTACH_TIMEOUT = 60.0       # bcc compiles the XDP program: a few seconds, more when busy
DETACH_TIMEOUT = 10.0
ERROR_PREFIX = "xdpnet: error: "


def attach(opts: ServeOptions, timeout: float = ATTACH_TIMEOUT, verbose: int = 0) -> VmRecord:
    """Start serving VM ``opts.name`` in the background; returns its record once ready."""
    opts = validate(opts, "xdpnet attach")         # MAC normalised from here
    assert opts.name is not None
    reg = Registry(opts.state_dir)
    old = reg.read(opts.name)
    if old is not None and not old.alive():
        clean_leftovers(reg, old)
    me = os.getpid()
    placeholder = VmRecord(name=opts.name, pid=me, pid_start=proc_start(me), iface=opts.iface,
                           queues=list(opts.queues), port_pairs=opts.port_pairs,
                           mac=opts.mac,
                           socket=os.path.abspath(opts.socket), log=reg.log_path(opts.name))
    reg.claim(placeholder)                  # BusyError: name or socket used by a live VM
    child: subprocess.Popen | None = None
    try:
        reg.remove_state(opts.name)         # a previous run's log
        os.makedirs(reg.state_dir(opts.name), mode=0o755)
        child = _spawn(opts, reg, verbose)
        return _wait_ready(reg, opts.name, child, timeout)
    except BaseException:
        _undo(reg, placeholder, child)
        raise


def _spawn(opts: ServeOptions, reg: Registry, verbose: int) -> subprocess.Popen:
    """``python -m xdpnet serve`` for *opts*, detached, stdio on the VM's log."""
    assert opts.name is not None
    argv = [sys.executable, "-m", "xdpnet", "serve", "--name", opts.name,
            "--state-dir", reg.root, "--iface", opts.iface, "--mac", opts.mac,
            "--socket", os.path.abspath(opts.socket), "--xdp-mode", opts.xdp_mode,
            "--max-frame", str(opts.max_frame), "--guest-mem", opts.guest_mem]
    if opts.queues:
        argv += ["--queue", ",".join(map(str, opts.queues))]
    else:
        argv += ["--port-pairs", str(opts.port_pairs)]
    if opts.socket_group:
        argv += ["--group", opts.socket_group]
    if opts.busy_poll_us:
        argv += ["--busy-poll", str(opts.busy_poll_us)]
    if opts.napi_budget:
        argv += ["--napi-budget", str(opts.napi_budget)]
    argv += ["-v"] * verbose
    log = reg.log_path(opts.name)
    with open(log, "ab") as out:
        out.write(f"xdpnet attach: starting {' '.join(argv)}\n".encode())
        out.flush()
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd="/",
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_ready(reg: Registry, name: str, child: subprocess.Popen, timeout: float) -> VmRecord:
    """The child's record once it is ``running``; raises the child's error if it exits."""
    deadline = time.monotonic() + timeout
    while True:
        rc = child.poll()
        if rc is not None:
            raise child_error(rc, reg.log_path(name))
        rec = reg.read(name)
        if rec is not None and rec.pid == child.pid and rec.state == "running":
            return rec
        if time.monotonic() > deadline:
            raise XdpnetError(f"VM {name!r}: xdpnet serve was not ready within {timeout:.0f} s; "
                              "stopped it")
        time.sleep(0.05)


def child_error(rc: int, log: str) -> XdpnetError:
    """The error of a serve process that exited with *rc*: its own one-line
    error (and exit status) if it printed one, else what its log ends with."""
    try:
        with open(log, errors="replace") as f:
            lines = [ln.rstrip("\n") for ln in f if ln.strip()]
    except OSError:
        lines = []
    errors = [ln for ln in lines if ln.startswith(ERROR_PREFIX)]
    code = rc if 1 <= rc <= 5 else 1
    if errors:
        return XdpnetError(errors[-1][len(ERROR_PREFIX):], exit_code=code)
    how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
    last = f": {lines[-1]}" if lines else ""
    return XdpnetError(f"xdpnet serve {how} before it was ready{last}", exit_code=code)


def _undo(reg: Registry, placeholder: VmRecord, child: subprocess.Popen | None) -> None:
    """After a failed attach: stop the child, remove everything either of us made."""
    name = placeholder.name
    killed, crec = False, None
    if child is not None:
        if child.poll() is None:
            _terminate(child.pid, lambda: child.poll() is not None, DETACH_TIMEOUT)
        killed = child.wait() < 0           # by a signal: it could not clean up after itself
        cur = reg.read(name)
        crec = cur if cur is not None and cur.pid == child.pid else None
        reg.remove(name, child.pid)
    reg.remove(name, placeholder.pid)
    if killed:
        _remove_stale_socket(placeholder.socket)
        release_nic(reg, crec or placeholder)
    reg.remove_state(name)


# ---- detach -----------------------------------------------------------------

@dataclass
class DetachResult:
    name: str
    was: str                                # running | starting | dead
    killed: bool = False                    # needed SIGKILL
    cleaned: list[str] = field(default_factory=list)    # leftovers removed


def detach(name: str, state_dir: str | None = None,
           timeout: float = DETACH_TIMEOUT) -> DetachResult:
    """Stop VM *name* and remove everything it leaves (UsageError if unknown)."""
    reg = Registry(state_dir)
    rec = reg.get(name)
    res = DetachResult(name, rec.status())
    if rec.alive():
        res.killed = _terminate(rec.pid, lambda: not rec.alive(), timeout)
    res.cleaned = clean_leftovers(reg, rec)
    return res


def _terminate(pid: int, gone, timeout: float) -> bool:
    """SIGTERM *pid*, wait up to *timeout* for ``gone()``, then SIGKILL.
    Returns True if SIGKILL was needed."""
    def wait(t: float) -> bool:
        deadline = time.monotonic() + t
        while time.monotonic() < deadline:
            if gone():
                return True
            time.sleep(0.05)
        return gone()

    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    except PermissionError:
        raise PrivilegeError(f"cannot stop process {pid}: permission denied (run as root)") \
            from None
    if wait(timeout):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    if not wait(5.0):
        raise XdpnetError(f"process {pid} survived SIGKILL")
    return True


def clean_leftovers(reg: Registry, rec: VmRecord) -> list[str]:
    """Remove what a (now dead) VM's serve left; returns what was removed."""
    out = []
    if _remove_stale_socket(rec.socket):
        out.append(rec.socket)
    prog = release_nic(reg, rec)
    if prog:
        out.append(prog)
    if reg.remove_state(rec.name):
        out.append(reg.state_dir(rec.name))
    if reg.remove(rec.name, rec.pid):
        out.append(reg.record_path(rec.name))
    return out


def _remove_stale_socket(path: str) -> bool:
    """Unlink *path* if it is a socket nobody listens on."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return False                # someone serves it: not ours to remove
    except ConnectionRefusedError:
        pass
    except OSError:
        return False
    finally:
        probe.close()
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def release_nic(reg: Registry, rec: VmRecord) -> str | None:
    """Undo a dead VM's share of its NIC's steering; returns what was done.

    The NIC's pinned maps still name the VM (its MAC, sockets, port):
    :func:`~xdpnet.steering.nic.release_dead` removes the VMs whose owner
    process is gone and, if none is left, everything xdpnet put on the
    NIC; for a NIC that no longer exists :func:`sweep_gone_nics` removes
    what is left of it.  Nothing is loaded; a NIC without pins is left
    alone.  Best effort: failures are logged.
    """
    try:
        from xdpnet.steering.nic import release_dead, sweep_gone_nics
        from xdpnet.steering.programs import pin_dir

        if not os.path.isdir(pin_dir(rec.iface)):
            return None
        release_dead(rec.iface)
        sweep_gone_nics([rec.iface])        # only if the NIC is gone (it checks)
    except Exception as e:      # noqa: BLE001 - best effort: the rest is cleaned anyway
        log.warning("steering of %s not released: %s", rec.iface, e)
        return None
    return f"steering of VM {rec.name!r} on {rec.iface}"

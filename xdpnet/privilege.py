"""Privilege checks: fail early with one line instead of EPERM deep inside.

xdpnet needs CAP_NET_ADMIN (XDP attach, links), CAP_NET_RAW (AF_XDP
sockets), CAP_BPF + CAP_PERFMON or CAP_SYS_ADMIN (loading the program and
its maps) and CAP_IPC_LOCK (pinning guest RAM as a UMEM beyond the
memlock limit).

After set-up ``xdpnet serve`` calls :func:`drop_after_setup`: every
capability but :data:`KEEP_AFTER_SETUP` goes, from every thread, from the
effective, permitted, inheritable, ambient and bounding sets, and
``no_new_privs`` is set (helpers it runs, such as ethtool, can get at most
the kept set).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time

from xdpnet.errors import PrivilegeError

log = logging.getLogger("xdpnet.privilege")

CAPS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
        "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
        "CAP_LINUX_IMMUTABLE": 9, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11,
        "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15,
        "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18, "CAP_SYS_PTRACE": 19,
        "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23,
        "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27,
        "CAP_LEASE": 28, "CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31,
        "CAP_MAC_OVERRIDE": 32, "CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35,
        "CAP_BLOCK_SUSPEND": 36, "CAP_AUDIT_READ": 37, "CAP_PERFMON": 38, "CAP_BPF": 39,
        "CAP_CHECKPOINT_RESTORE": 40}


def effective_caps() -> int:
    """The process's effective capability mask (from /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def missing_caps(needed=("CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_BPF", "CAP_IPC_LOCK")) -> list[str]:
    eff = effective_caps()
    missing = [c for c in needed if not eff & (1 << CAPS[c])]
    # CAP_SYS_ADMIN covers CAP_BPF on every kernel that has both.
    if "CAP_BPF" in missing and eff & (1 << CAPS["CAP_SYS_ADMIN"]):
        missing.remove("CAP_BPF")
    return missing


def require(what: str) -> None:
    """Raise PrivilegeError naming ``what`` and the missing capabilities."""
    missing = missing_caps()
    if missing:
        raise PrivilegeError(f"{what} needs {', '.join(missing)} (run as root, or grant them "
                             f"with setcap / AmbientCapabilities)")


# ---- dropping what the running backend no longer needs --------------------------

#: The capabilities ``xdpnet serve`` keeps after set-up, for its whole life, with
#: the reason for each.  Everything else is removed from the effective,
#: permitted, inheritable and ambient sets and from the bounding set, and
#: ``no_new_privs`` is set, in every thread of the process.
#: Found by experiment (tests/test_privilege.py): with exactly these the backend
#: serves, survives a frontend reconnect and tears the NIC down cleanly.
KEEP_AFTER_SETUP: dict[str, str] = {
    "CAP_NET_ADMIN": "detach: delete the VM's port veth; the last VM on the NIC detaches "
                     "the XDP program (netlink) and the TC flood filter; repair of a "
                     "detached program; ethtool ntuple rules on real NICs",
    "CAP_NET_RAW": "reconnect: create and bind new AF_XDP sockets on the NIC queues and "
                   "the port",
    "CAP_IPC_LOCK": "reconnect: register the new guest memory table as a UMEM (pinned "
                    "pages) beyond RLIMIT_MEMLOCK",
    "CAP_BPF": "every bpf() call: open the pins under /sys/fs/bpf/xdpnet, update the "
               "XSKMAP / VM maps on reconnect and detach, read program ids "
               "(kernel.unprivileged_bpf_disabled)",
}

CAP_LAST = 40                           # CAP_CHECKPOINT_RESTORE; higher ones read below
PR_CAPBSET_READ, PR_CAPBSET_DROP = 23, 24
PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS = 38, 39
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_NAMES = {v: k for k, v in CAPS.items()}


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def cap_names(mask: int) -> list[str]:
    """``0x3000`` → ``["CAP_NET_ADMIN", "CAP_NET_RAW"]`` (unknown bits as ``cap_N``)."""
    return [_NAMES.get(b, f"cap_{b}") for b in range(64) if mask >> b & 1]


def cap_mask(names) -> int:
    return sum(1 << CAPS[n] for n in names)


def _capget() -> tuple[int, ...]:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(hdr), data) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capget: {os.strerror(e)}")
    return tuple(getattr(data[0], f) | getattr(data[1], f) << 32
                 for f in ("effective", "permitted", "inheritable"))


def _capset(eff: int, prm: int, inh: int) -> None:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = eff >> 32 * i & 0xFFFFFFFF
        data[i].permitted = prm >> 32 * i & 0xFFFFFFFF
        data[i].inheritable = inh >> 32 * i & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capset: {os.strerror(e)}")


def _prctl(*args: int) -> int:
    r = _libc.prctl(*(ctypes.c_ulong(a) for a in args), *[ctypes.c_ulong(0)] * (5 - len(args)))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl{args}: {os.strerror(e)}")
    return r


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return CAP_LAST


def _drop_this_thread(keep: int) -> list[str]:
    """Drop everything but *keep* in the calling thread (capabilities are
    per thread).  Best effort: returns the problems instead of raising."""
    problems = []
    for what, call in (("no_new_privs", lambda: _prctl(PR_SET_NO_NEW_PRIVS, 1)),
                       ("ambient", lambda: _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL))):
        try:
            call()
        except OSError as e:
            problems.append(f"{what}: {e.strerror}")
    for cap in range(_last_cap() + 1):          # needs CAP_SETPCAP: before capset
        if keep >> cap & 1:
            continue
        try:
            if _prctl(PR_CAPBSET_READ, cap):
                _prctl(PR_CAPBSET_DROP, cap)
        except OSError as e:
            problems.append(f"bounding {cap_names(1 << cap)[0]}: {e.strerror}")
            break                               # no CAP_SETPCAP: the rest fail alike
    try:
        eff, prm, _ = _capget()
        _capset(eff & keep, prm & keep, 0)
    except OSError as e:
        problems.append(str(e))
    return problems


# Threads started before the drop (Attachment's refresher) drop their own
# capabilities on their next Python call: a per-thread profile hook set on
# every other thread state (what threading.setprofile_all_threads does in 3.12).
_TRACEFUNC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                              ctypes.c_void_p)
_pending: dict[int, threading.Event] = {}
_keep_mask = 0
_api = ctypes.pythonapi
_api.PyThreadState_Get.restype = ctypes.c_void_p
_api.PyThreadState_Next.restype = ctypes.c_void_p
_api.PyThreadState_Next.argtypes = [ctypes.c_void_p]
_api.PyInterpreterState_Get.restype = ctypes.c_void_p
_api.PyInterpreterState_ThreadHead.restype = ctypes.c_void_p
_api.PyInterpreterState_ThreadHead.argtypes = [ctypes.c_void_p]


@_TRACEFUNC
def _hook(_obj, _frame, _what, _arg) -> int:
    try:
        _api._PyEval_SetProfile(ctypes.c_void_p(_api.PyThreadState_Get()), None, None)
        problems = _drop_this_thread(_keep_mask)
        if problems:
            log.debug("thread %s: %s", threading.current_thread().name, "; ".join(problems))
        ev = _pending.pop(threading.get_ident(), None)
        if ev is not None:
            ev.set()
    except Exception:                           # never break the thread
        log.debug("capability drop in thread %s failed", threading.current_thread().name,
                  exc_info=True)
    return 0


def _other_threads_drop(keep: int, timeout: float) -> bool:
    global _keep_mask
    _keep_mask = keep
    me = threading.get_ident()
    others = [t for t in threading.enumerate() if t.ident not in (None, me) and t.is_alive()]
    for t in others:
        _pending[t.ident] = threading.Event()
    _api._PyEval_SetProfile.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    ts = _api.PyInterpreterState_ThreadHead(_api.PyInterpreterState_Get())
    cur = _api.PyThreadState_Get()
    while ts:
        if ts != cur:
            _api._PyEval_SetProfile(ts, ctypes.cast(_hook, ctypes.c_void_p), None)
        ts = _api.PyThreadState_Next(ts)
    deadline = time.monotonic() + timeout
    for t in others:
        ev = _pending.get(t.ident)
        if (ev is not None and not ev.wait(max(0.0, deadline - time.monotonic()))
                and t.is_alive()):
            return False
    return True


def task_caps(pid: int | str = "self") -> dict[int, dict[str, int]]:
    """``{tid: {"CapEff": mask, ..., "NoNewPrivs": 0/1}}`` of every thread of *pid*."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                out[int(tid)] = {k: int(v.split()[0], 16 if k.startswith("Cap") else 10)
                                 for k, _, v in (ln.partition(":") for ln in f)
                                 if k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                                          "NoNewPrivs")}
        except (OSError, ValueError):
            continue                            # the thread ended meanwhile
    return out


def drop_after_setup(keep=tuple(KEEP_AFTER_SETUP), timeout: float = 3.0) -> int:
    """Drop every capability but *keep* (see :data:`KEEP_AFTER_SETUP`) in
    every thread, and set ``no_new_privs``.  Best effort: without the
    privilege to drop (not root) or with capabilities already absent it
    carries on; logs at INFO what remains.  Returns the effective mask left."""
    keep_mask = cap_mask(keep)
    problems = _drop_this_thread(keep_mask)
    if not _other_threads_drop(keep_mask, timeout):
        problems.append(f"a thread did not drop its capabilities within {timeout} s")
    tasks = task_caps()
    try:
        eff = _capget()[0]
    except OSError:
        eff = effective_caps()
    stray = [tid for tid, st in tasks.items() if st.get("CapEff", 0) & ~keep_mask]
    if stray:
        problems.append(f"thread(s) {stray} still hold more than the kept set")
    if problems:
        log.info("capability drop incomplete: %s", "; ".join(problems))
    log.info("capabilities after set-up: %s (no_new_privs set)",
             ", ".join(cap_names(eff)) or "none")
    return eff

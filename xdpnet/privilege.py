"""Privilege checks: fail early with one line instead of EPERM deep inside.

xdpnet needs CAP_NET_ADMIN (XDP attach, links), CAP_NET_RAW (AF_XDP
sockets), CAP_BPF + CAP_PERFMON or CAP_SYS_ADMIN (loading the program and
its maps) and CAP_IPC_LOCK (pinning guest RAM as a UMEM beyond the
memlock limit).
"""

from __future__ import annotations

from xdpnet.errors import PrivilegeError

CAPS = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_IPC_LOCK": 14, "CAP_SYS_ADMIN": 21,
        "CAP_BPF": 39}


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

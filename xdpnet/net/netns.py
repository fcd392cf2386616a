"""Network namespaces and veth test beds for the demo, the tests and the benchmarks.

A :class:`Testbed` is a veth pair whose "NIC" end stays in the root
namespace (xdpnet binds its AF_XDP sockets there) and whose "wire" end
sits in a fresh network namespace, where the traffic peer
(:mod:`xdpnet.wire`) runs::

    root namespace                 |  netns xn-1a2b3c4d
    xn1a2b3c4dn  (the "NIC") <-veth-> xn1a2b3c4dw  (the "wire")

Everything a test bed creates carries a random name derived from its
prefix and is removed by :meth:`Testbed.close` - on a normal exit, when
the body of a ``with`` raises, at interpreter exit (``atexit``) and, after
:func:`install_signal_cleanup`, on SIGTERM/SIGHUP.  A run that was killed
outright leaves an owner file behind; :func:`cleanup_stale` removes the
leftovers of such runs (and only of dead owners, so parallel runs with the
same prefix are safe).

Sockets keep the namespace they were created in:
:func:`socket_in_netns` creates one inside a namespace from a short-lived
thread (``setns`` affects only the calling thread), so the rest of the
process never changes namespace.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
from typing import Any, Callable, Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from xdpnet.errors import DependencyError, PrivilegeError, UsageError, XdpnetError
from xdpnet.net.link import delete_link, disable_ipv6
from xdpnet.rundirs import RUN_DIR, open_in, proc_start, process_alive, remove_empty

NETNS_DIR = "/run/netns"
OWNER_DIR = os.path.join(RUN_DIR, "testbeds")   # one file per live test bed: "<pid> <starttime>"
CLONE_NEWNET = 0x40000000
MS_BIND, MS_REC, MS_SHARED, MNT_DETACH = 0x1000, 0x4000, 1 << 20, 2
_RAND_LEN = 8                        # hex digits of the random part
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,5}")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_live: dict[str, "Testbed"] = {}     # netns name -> open test bed
_live_lock = threading.RLock()   # re-entrant: a signal handler may take it


# ---- namespaces ---------------------------------------------------------

def netns_path(name: str) -> str:
    """The bind-mount that keeps netns *name* alive (``/run/netns/<name>``)."""
    return os.path.join(NETNS_DIR, name)


def list_netns() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def netns_exists(name: str) -> bool:
    """True if a named network namespace *name* exists."""
    return os.path.exists(netns_path(name))


def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at *fd*."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _libc_check(rc: int, what: str) -> None:
    """Raise OSError with errno if a libc call returned non-zero."""
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _share_netns_dir() -> None:
    """Make NETNS_DIR a shared mount, as ``ip netns add`` does.

    Namespace bind mounts made under it then propagate to other mount
    namespaces (and ``ip netns`` sees them from anywhere).
    """
    os.makedirs(NETNS_DIR, exist_ok=True)
    d = NETNS_DIR.encode()
    if _libc.mount(b"none", d, b"none", MS_SHARED | MS_REC, None) == 0:
        return
    _libc_check(_libc.mount(d, d, b"none", MS_BIND | MS_REC, None), f"bind-mount {NETNS_DIR}")
    _libc_check(_libc.mount(b"none", d, b"none", MS_SHARED | MS_REC, None),
                f"share {NETNS_DIR}")


def _on_netns_thread(enter: Callable[[], None], fn: Callable[..., Any], *args: Any,
                     name: str = "netns", **kwargs: Any) -> Any:
    """Run ``enter()`` then ``fn(*args, **kwargs)`` on a short-lived thread that
    returns to its original network namespace before it ends; the calling
    thread never changes namespace.  Returns fn's result, raises its error."""
    outcome: dict[str, Any] = {}

    def body() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            enter()
            try:
                outcome["value"] = fn(*args, **kwargs)
            finally:
                _setns(own)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            outcome["error"] = e
        finally:
            os.close(own)

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    t.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def create_netns(name: str) -> None:
    """Create the named network namespace *name* (``ip netns add``), without forking.

    A short-lived thread unshares its network namespace, bind-mounts it on
    ``/run/netns/<name>`` and returns to its original namespace.  Raises
    :class:`UsageError` if the name is taken.
    """
    path = netns_path(name)
    _share_netns_dir()
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    except FileExistsError:
        raise UsageError(f"network namespace '{name}' already exists") from None
    try:
        _on_netns_thread(lambda: _libc_check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)"),
                         lambda: _libc_check(_libc.mount(b"/proc/thread-self/ns/net", path.encode(),
                                                         b"none", MS_BIND, None),
                                             f"bind-mount {path}"),
                         name=f"netns-add-{name}")
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise


def remove_netns(name: str) -> bool:
    """Remove the named network namespace *name* (``ip netns del``).

    The namespace itself dies once no process, socket or mount holds it.
    Return: True if it existed.
    """
    path = netns_path(name)
    if not os.path.exists(path):
        return False
    _libc.umount2(path.encode(), MNT_DETACH)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def call_in_netns(netns: str | None, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` inside network namespace *netns*; return its result.

    The call runs on a short-lived thread that enters the namespace and
    goes back to its original one before it ends; the calling thread
    never changes namespace.  ``netns=None`` calls *fn* right here (the
    caller's namespace).  Exceptions from *fn* propagate.  Raises
    :class:`UsageError` if the namespace does not exist.
    """
    if netns is None:
        return fn(*args, **kwargs)
    try:
        target = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"network namespace '{netns}' not found") from None
    try:
        return _on_netns_thread(lambda: _setns(target), fn, *args, name=f"netns-{netns}",
                                **kwargs)
    finally:
        os.close(target)


def socket_in_netns(netns: str | None, family: int, type: int, proto: int = 0) -> socket.socket:
    """Create ``socket.socket(family, type, proto)`` inside network namespace *netns*.

    A socket belongs to the namespace it was created in for its whole
    life, whichever thread uses it later.  ``netns=None`` means the
    caller's namespace.
    """
    return call_in_netns(netns, socket.socket, family, type, proto)


def run_in_netns(netns: str, argv: Iterable[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(["ip", "netns", "exec", netns, *argv], **kwargs)``.

    Note that ``ip netns exec`` remounts ``/sys`` for the command (which
    then sees the namespace's devices, and no ``/sys/fs/bpf``).
    """
    return subprocess.run(["ip", "netns", "exec", netns, *argv], **kwargs)


# ---- owners of test beds ------------------------------------------------

def _owner_path(name: str) -> str:
    return os.path.join(OWNER_DIR, name)


def _write_owner(name: str) -> None:
    """Record this process as the owner of test bed *name*."""
    pid = os.getpid()
    fd = open_in(OWNER_DIR, name, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        f.write(f"{pid} {proc_start(pid)}\n")


def _owner_alive(name: str) -> bool:
    """True if the process recorded as owner of *name* still runs.

    A missing or unreadable owner file means "no live owner": test beds
    write it before creating anything.
    """
    try:
        with open(_owner_path(name)) as f:
            pid, start = map(int, f.read().split())
    except (OSError, ValueError):
        return False
    return process_alive(pid, start)


def _remove_owner(name: str) -> None:
    try:
        os.unlink(_owner_path(name))
    except FileNotFoundError:
        pass
    remove_empty(OWNER_DIR, RUN_DIR)            # /run/xdpnet too, if empty


# ---- removal helpers (each tolerant of things already gone) -------------

def with_ipr(netns: str | None, fn: Callable[[IPRoute], Any]) -> Any:
    """Call ``fn(ipr)`` with an rtnetlink socket of namespace *netns* (None: the caller's).

    The socket is opened on the thread that enters the namespace, so it
    belongs to that namespace; it is closed before this returns.
    """
    def body() -> Any:
        with IPRoute() as ipr:
            return fn(ipr)
    return call_in_netns(netns, body)


def _del_link(ifname: str, netns: str | None = None) -> bool:
    """Delete interface *ifname* (in *netns*, or the root namespace).

    Return: True if it existed.
    """
    if netns is not None and not netns_exists(netns):
        return False

    try:
        return with_ipr(netns, lambda ipr: delete_link(ipr, ifname))
    except UsageError:          # the netns vanished meanwhile
        return False


# ---- the test bed -------------------------------------------------------

class Testbed:
    """A veth pair: the "NIC" end in the root namespace, the "wire" end in a new netns.

    ``Testbed(queues=2, mtu=1500)`` creates, in order: an owner file, the
    netns ``<prefix>-<rand>``, the veth pair ``<prefix><rand>n`` /
    ``<prefix><rand>w`` with *queues* rx and tx queues on each end (the
    wire end created directly inside the netns), then sets both MTUs,
    brings both ends and the netns's ``lo`` up and turns tx checksum
    offload off on the wire end (``ethtool -K <wire> tx off``, so the
    frames it sends carry complete checksums, as on a real wire) and GRO
    on (NAPI, so frames XDP-redirected into the NIC end reach it).  IPv6
    is disabled on both ends unless *ipv6* is true, so that no router
    solicitations or MLD reports mix with test traffic.  *wire_addr*
    (e.g. ``"10.77.0.1/24"``) is assigned to the wire end if given.

    Attributes: ``netns``, ``nic``, ``wire``, ``nic_mac``, ``wire_mac``,
    ``queues``, ``mtu``, ``nic_ifindex``, ``wire_ifindex``.

    Use it as a context manager or call :meth:`close`; both are
    idempotent and tolerate partly created or partly removed state.  A
    failed creation removes whatever it had created before raising.
    """

    __test__ = False        # not a pytest test class

    def __init__(self, queues: int = 1, mtu: int = 1500, prefix: str = "xn", *,
                 ipv6: bool = False, wire_addr: str | None = None):
        if not _PREFIX_RE.fullmatch(prefix):
            raise UsageError(f"test bed prefix {prefix!r}: 1-6 characters [a-z0-9], "
                             "starting with a letter")
        if not 1 <= queues <= 256:
            raise UsageError(f"test bed queues {queues}: 1..256")
        if not 68 <= mtu <= 65535:
            raise UsageError(f"test bed MTU {mtu}: 68..65535")
        if os.geteuid() != 0:
            raise PrivilegeError("a test bed needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
        rand = secrets.token_hex(_RAND_LEN // 2)
        self.prefix = prefix
        self.queues = queues
        self.mtu = mtu
        self.netns = f"{prefix}-{rand}"
        self.nic = f"{prefix}{rand}n"
        self.wire = f"{prefix}{rand}w"
        self.nic_mac = ""
        self.wire_mac = ""
        self.nic_ifindex = 0
        self.wire_ifindex = 0
        self.closed = False
        self._pid = os.getpid()
        with _live_lock:
            _live[self.netns] = self
        try:
            self._create(ipv6, wire_addr)
        except BaseException:
            self.close()
            raise

    # -- creation

    def _create(self, ipv6: bool, wire_addr: str | None) -> None:
        _write_owner(self.netns)
        create_netns(self.netns)
        nsfd = os.open(netns_path(self.netns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            with_ipr(None, lambda ipr: self._add_veth(ipr, nsfd))
        finally:
            os.close(nsfd)
        with_ipr(None, lambda ipr: self._setup_nic(ipr, ipv6))
        with_ipr(self.netns, lambda ipr: self._setup_wire(ipr, ipv6, wire_addr))
        self._ethtool_tx_off()

    def _add_veth(self, ipr: IPRoute, nsfd: int) -> None:
        """Create the pair, the wire end directly inside the netns (open at *nsfd*)."""
        q = self.queues
        try:
            ipr.link("add", ifname=self.nic, kind="veth",
                     num_rx_queues=q, num_tx_queues=q,
                     peer={"ifname": self.wire, "net_ns_fd": nsfd,
                           "num_rx_queues": q, "num_tx_queues": q})
        except NetlinkError as e:
            raise XdpnetError(f"cannot create veth pair {self.nic}/{self.wire}: "
                              f"{os.strerror(e.code)}") from None

    def _setup_nic(self, ipr: IPRoute, ipv6: bool) -> None:
        """NIC end (root namespace): IPv6 off unless wanted, MTU, up; learn index and MAC."""
        self.nic_ifindex = ipr.link_lookup(ifname=self.nic)[0]
        if not ipv6:
            disable_ipv6(self.nic)
        ipr.link("set", index=self.nic_ifindex, mtu=self.mtu)
        ipr.link("set", index=self.nic_ifindex, state="up")
        self.nic_mac = ipr.link("get", index=self.nic_ifindex)[0].get("IFLA_ADDRESS")

    def _setup_wire(self, ipr: IPRoute, ipv6: bool, wire_addr: str | None) -> None:
        """Wire end (runs inside the netns): IPv6, MTU, up, address; lo up."""
        found = ipr.link_lookup(ifname=self.wire)
        if not found:
            raise XdpnetError(f"veth end {self.wire} did not appear in netns {self.netns}")
        self.wire_ifindex = found[0]
        if not ipv6:
            disable_ipv6(self.wire)
        ipr.link("set", index=self.wire_ifindex, mtu=self.mtu)
        ipr.link("set", index=self.wire_ifindex, state="up")
        lo = ipr.link_lookup(ifname="lo")
        if lo:
            ipr.link("set", index=lo[0], state="up")
        if wire_addr:
            addr, _, plen = wire_addr.partition("/")
            ipr.addr("add", index=self.wire_ifindex, address=addr, prefixlen=int(plen or 24))
        self.wire_mac = ipr.link("get", index=self.wire_ifindex)[0].get("IFLA_ADDRESS")

    def _ethtool_tx_off(self) -> None:
        """``ethtool -K <wire> tx off gro on`` inside the netns.

        ``gro on`` gives the wire end NAPI, without which a veth drops the
        frames XDP redirects into its peer (``ndo_xdp_xmit``): what xdpnet
        sends from a VM's port to the NIC.  A real NIC needs nothing."""
        try:
            r = run_in_netns(self.netns, ["ethtool", "-K", self.wire, "tx", "off", "gro", "on"],
                             capture_output=True, text=True)
        except FileNotFoundError:
            raise DependencyError("ethtool (or ip) not found: install iproute2 and ethtool") from None
        if r.returncode != 0:
            raise XdpnetError(f"ethtool -K {self.wire} tx off gro on failed: {r.stderr.strip()}")

    # -- removal

    def close(self) -> None:
        """Delete the veth pair and the netns; idempotent, tolerant of partial state.

        Deleting either veth end deletes both; if the NIC end is already
        gone the wire end is deleted inside the netns.  Every step runs
        even if an earlier one failed; the first error is raised at the end.
        """
        first: BaseException | None = None
        steps = (
            lambda: _del_link(self.nic) or _del_link(self.wire, self.netns),
            lambda: remove_netns(self.netns),
            lambda: _remove_owner(self.netns),
        )
        for step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                first = first or e
        with _live_lock:
            _live.pop(self.netns, None)
        self.closed = True
        if first is not None:
            raise first

    def __enter__(self) -> "Testbed":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Testbed(netns={self.netns!r}, nic={self.nic!r}, wire={self.wire!r}, "
                f"queues={self.queues}, mtu={self.mtu})")


# ---- process-wide cleanup -----------------------------------------------

def close_all() -> None:
    """Close every test bed this process still has open (errors ignored).

    Test beds inherited from a parent through fork() belong to the parent
    and are left alone.
    """
    with _live_lock:
        beds = [tb for tb in _live.values() if tb._pid == os.getpid()]
    for tb in beds:
        try:
            tb.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _forget_after_fork() -> None:
    """In a forked child: the parent's test beds are not ours to close."""
    global _live_lock
    _live_lock = threading.RLock()
    _live.clear()


atexit.register(close_all)
os.register_at_fork(after_in_child=_forget_after_fork)

_prev_handlers: dict[int, Any] = {}


def _on_signal(signum: int, frame: Any) -> None:
    """Close all test beds, then behave as the previous handler would have."""
    close_all()
    prev = _prev_handlers.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
        return
    if prev == signal.SIG_IGN:
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def install_signal_cleanup(signums: Iterable[int] = (signal.SIGTERM, signal.SIGHUP)) -> None:
    """Close all test beds when one of *signums* arrives (main thread only).

    The previous handler is chained: called after the clean-up, or the
    default action (usually termination) is taken again.  SIGINT needs
    nothing: it raises KeyboardInterrupt, which unwinds ``with`` blocks.
    """
    for s in signums:
        prev = signal.getsignal(s)
        if prev is _on_signal:
            continue
        _prev_handlers[s] = prev
        signal.signal(s, _on_signal)


def cleanup_stale(prefix: str) -> list[str]:
    """Remove the leftovers of crashed runs that used *prefix*; return what was removed.

    Only names of the exact test-bed forms ``<prefix>-<8 hex>`` (netns)
    and ``<prefix><8 hex>n`` / ``<prefix><8 hex>w`` (links in the root
    namespace) are considered, and only those whose owner process is gone
    - live test beds of other processes with the same prefix are kept.
    """
    if not _PREFIX_RE.fullmatch(prefix):
        raise UsageError(f"test bed prefix {prefix!r}: 1-6 characters [a-z0-9], "
                         "starting with a letter")
    ns_re = re.compile(rf"{re.escape(prefix)}-([0-9a-f]{{{_RAND_LEN}}})")
    link_re = re.compile(rf"{re.escape(prefix)}([0-9a-f]{{{_RAND_LEN}}})[nw]")
    removed: list[str] = []

    def stale(rand: str) -> bool:
        name = f"{prefix}-{rand}"
        with _live_lock:
            if name in _live:
                return False
        return not _owner_alive(name)

    links = with_ipr(None, lambda ipr: [link.get("IFLA_IFNAME") for link in ipr.link("dump")])
    for ifname in links:
        m = link_re.fullmatch(ifname or "")
        if m and stale(m.group(1)) and _del_link(ifname):
            removed.append(ifname)
    for name in list_netns():
        m = ns_re.fullmatch(name)
        if m and stale(m.group(1)):
            _del_link(f"{prefix}{m.group(1)}w", name)
            if remove_netns(name):
                removed.append(name)
    try:
        owners = os.listdir(OWNER_DIR)
    except FileNotFoundError:
        owners = []
    for name in owners:
        m = ns_re.fullmatch(name)
        if m and stale(m.group(1)):
            _remove_owner(name)
    return removed

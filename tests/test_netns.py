"""Kernel tests of xdpnet.net.netns (test beds, sockets in namespaces) and
xdpnet.net.device (look-ups, queue validation).

Every test bed here uses a prefix unique to this test session, so that
parallel runs (other developers' tests use "xn") are never touched, and
every test checks that nothing it created is left behind.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from xdpnet.errors import UsageError
from xdpnet.net import netns as nsmod
from xdpnet.net.device import NetDevice
from xdpnet.net.netns import (Testbed, call_in_netns, cleanup_stale, netns_exists,
                              run_in_netns, socket_in_netns)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

PREFIX = "x" + secrets.token_hex(2)     # e.g. "x3f9a": this session only
SIOCGSKNS = 0x894C                      # socket -> fd of its network namespace


def link_exists(ifname: str, netns: str | None = None) -> bool:
    cmd = ["ip", "link", "show", "dev", ifname]
    if netns:
        if not netns_exists(netns):
            return False
        r = run_in_netns(netns, cmd, capture_output=True)
    else:
        r = subprocess.run(cmd, capture_output=True)
    return r.returncode == 0


def assert_gone(netns: str, nic: str, wire: str) -> None:
    assert not netns_exists(netns), f"netns {netns} left behind"
    assert not link_exists(nic), f"link {nic} left behind"
    assert not link_exists(wire), f"link {wire} left behind in the root namespace"
    assert not os.path.exists(os.path.join(nsmod.OWNER_DIR, netns)), "owner file left behind"


def names(tb: Testbed) -> tuple[str, str, str]:
    return tb.netns, tb.nic, tb.wire


@pytest.fixture(scope="module", autouse=True)
def no_leftovers_of_this_session():
    yield
    assert cleanup_stale(PREFIX) == [], "a test left something behind"
    assert not [n for n in os.listdir(nsmod.NETNS_DIR) if n.startswith(PREFIX + "-")]


# ---- test beds -----------------------------------------------------------

def test_testbed_creates_everything_and_close_removes_it():
    with Testbed(queues=2, mtu=1400, prefix=PREFIX) as tb:
        assert tb.netns.startswith(PREFIX + "-") and netns_exists(tb.netns)
        assert tb.nic.startswith(PREFIX) and tb.nic.endswith("n") and len(tb.nic) <= 15
        assert link_exists(tb.nic) and not link_exists(tb.wire)
        assert link_exists(tb.wire, tb.netns) and not link_exists(tb.nic, tb.netns)
        nic = NetDevice.lookup(tb.nic)
        wire = NetDevice.lookup(tb.wire, netns=tb.netns)
        assert (nic.mtu, wire.mtu) == (1400, 1400)
        assert (nic.rx_queues, nic.tx_queues, nic.channels) == (2, 2, 2)
        assert (wire.rx_queues, wire.channels) == (2, 2)
        assert (nic.mac, wire.mac) == (tb.nic_mac, tb.wire_mac)
        assert nic.ifindex == tb.nic_ifindex and wire.ifindex == tb.wire_ifindex
        assert nic.driver == "veth"
        show = subprocess.run(["ip", "-br", "link", "show", "dev", tb.nic],
                              capture_output=True, text=True).stdout
        assert "UP" in show
        inner = run_in_netns(tb.netns, ["ip", "-br", "link"], capture_output=True,
                             text=True, check=True).stdout
        assert any(line.startswith("lo ") and "UP" in line for line in inner.splitlines())
        assert any(line.startswith(tb.wire) and "UP" in line for line in inner.splitlines())
        features = run_in_netns(tb.netns, ["ethtool", "-k", tb.wire], capture_output=True,
                                text=True, check=True).stdout
        assert "tx-checksumming: off" in features
        v6 = call_in_netns(tb.netns, lambda: open(
            f"/proc/sys/net/ipv6/conf/{tb.wire}/disable_ipv6").read().strip())
        assert v6 == "1"
        n = names(tb)
    assert tb.closed
    assert_gone(*n)


def test_testbed_cleans_up_when_the_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with Testbed(prefix=PREFIX) as tb:
            n = names(tb)
            raise RuntimeError("boom")
    assert_gone(*n)


def test_close_is_idempotent_and_tolerates_partial_state():
    tb = Testbed(prefix=PREFIX)
    n = names(tb)
    subprocess.run(["ip", "link", "del", tb.nic], check=True)      # veth already gone
    tb.close()
    tb.close()
    assert_gone(*n)

    tb = Testbed(prefix=PREFIX)
    n = names(tb)
    subprocess.run(["ip", "netns", "del", tb.netns], check=True)   # netns gone first
    tb.close()
    assert_gone(*n)


def test_failed_creation_removes_what_it_created(monkeypatch):
    seen = {}

    def fail(self):
        seen["names"] = names(self)
        assert netns_exists(self.netns) and link_exists(self.nic)
        raise RuntimeError("ethtool exploded")

    monkeypatch.setattr(Testbed, "_ethtool_tx_off", fail)
    with pytest.raises(RuntimeError, match="ethtool exploded"):
        Testbed(prefix=PREFIX)
    assert_gone(*seen["names"])


@pytest.mark.parametrize("kw", [dict(prefix="Bad-"), dict(prefix="toolong1"),
                                dict(queues=0), dict(mtu=20)])
def test_testbed_rejects_bad_arguments(kw):
    kw.setdefault("prefix", PREFIX)
    with pytest.raises(UsageError):
        Testbed(**kw)


CHILD = textwrap.dedent("""
    import os, sys, time
    from xdpnet.net.netns import Testbed, install_signal_cleanup
    mode = sys.argv[1]
    install_signal_cleanup()
    tb = Testbed(prefix=sys.argv[2])
    print(tb.netns, tb.nic, tb.wire, flush=True)
    if mode == "crash":
        os._exit(0)          # no atexit: what a SIGKILL leaves behind
    if mode == "sleep":
        time.sleep(60)
    # mode "exit": normal interpreter exit without close(): atexit cleans up
""")


def run_child(mode: str) -> tuple[subprocess.Popen, tuple[str, str, str]]:
    p = subprocess.Popen([sys.executable, "-c", CHILD, mode, PREFIX],
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().split()
    assert len(line) == 3, "child did not create a test bed"
    return p, tuple(line)


def test_atexit_cleans_up_an_unclosed_testbed():
    p, n = run_child("exit")
    assert p.wait(timeout=30) == 0
    assert_gone(*n)


def test_sigterm_cleans_up():
    p, n = run_child("sleep")
    assert netns_exists(n[0]) and link_exists(n[1])
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == -signal.SIGTERM
    assert_gone(*n)


def test_cleanup_stale_removes_dead_owners_only():
    p, dead = run_child("crash")
    assert p.wait(timeout=30) == 0
    assert netns_exists(dead[0]) and link_exists(dead[1]), "the crash left nothing?"
    other, alive = run_child("sleep")             # a live run in another process
    try:
        with Testbed(prefix=PREFIX) as live:
            removed = cleanup_stale(PREFIX)
            assert dead[0] in removed and dead[1] in removed
            assert_gone(*dead)
            assert netns_exists(live.netns) and link_exists(live.nic)
            assert netns_exists(alive[0]) and link_exists(alive[1])
            assert cleanup_stale(PREFIX) == []
    finally:
        other.send_signal(signal.SIGTERM)
        other.wait(timeout=30)
    assert_gone(*alive)
    with pytest.raises(UsageError):
        cleanup_stale("no-such-prefix!")


# ---- sockets and commands in a namespace ---------------------------------

def netns_inode_of_socket(s: socket.socket) -> int:
    fd = fcntl.ioctl(s.fileno(), SIOCGSKNS)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def test_socket_in_netns_lives_in_that_netns():
    own = os.stat("/proc/thread-self/ns/net").st_ino
    with Testbed(prefix=PREFIX, wire_addr="10.201.0.1/24") as tb:
        target = os.stat(nsmod.netns_path(tb.netns)).st_ino
        assert target != own
        with socket_in_netns(tb.netns, socket.AF_INET, socket.SOCK_DGRAM) as s, \
             socket_in_netns(None, socket.AF_INET, socket.SOCK_DGRAM) as here:
            assert netns_inode_of_socket(s) == target
            assert netns_inode_of_socket(here) == own
            s.bind(("10.201.0.1", 0))          # the address exists only in the netns
            with pytest.raises(OSError):
                here.bind(("10.201.0.1", 0))
            # used from another thread, the socket stays in its namespace
            out = {}
            t = threading.Thread(target=lambda: out.setdefault("ino", netns_inode_of_socket(s)))
            t.start()
            t.join()
            assert out["ino"] == target
        assert os.stat("/proc/thread-self/ns/net").st_ino == own
        assert call_in_netns(tb.netns, lambda: os.stat("/proc/thread-self/ns/net").st_ino) == target
        with pytest.raises(ZeroDivisionError):
            call_in_netns(tb.netns, lambda: 1 // 0)
    assert os.stat("/proc/thread-self/ns/net").st_ino == own
    with pytest.raises(UsageError, match="network namespace 'xq-nosuch' not found"):
        socket_in_netns("xq-nosuch", socket.AF_INET, socket.SOCK_DGRAM)


def test_run_in_netns():
    with Testbed(prefix=PREFIX) as tb:
        out = run_in_netns(tb.netns, ["ip", "-br", "link"], capture_output=True,
                           text=True, check=True).stdout
        assert tb.wire in out and tb.nic not in out


# ---- devices -------------------------------------------------------------

def test_netdevice_lookup_and_queue_validation():
    with Testbed(queues=3, prefix=PREFIX) as tb:
        dev = NetDevice.lookup(tb.nic)
        assert dev.channels == 3 and dev.combined_channels == 0
        for q in range(3):
            dev.validate_queue(q)
        with pytest.raises(UsageError, match=rf"queue 3 .*'{tb.nic}'.* 3 channels"):
            dev.validate_queue(3)
        with pytest.raises(UsageError, match="3 channels"):
            dev.validate_queue(-1)
        # the wire end is not in the root namespace
        with pytest.raises(UsageError, match=f"interface '{tb.wire}' not found"):
            NetDevice.lookup(tb.wire)
        assert NetDevice.lookup(tb.wire, netns=tb.netns).netns == tb.netns
    for bad in ("xnosuchif0", "", "a" * 20, "eth0/../x"):
        with pytest.raises(UsageError, match="not found"):
            NetDevice.lookup(bad)
    with pytest.raises(UsageError, match="network namespace"):
        NetDevice.lookup("lo", netns="xq-nosuch")
    lo = NetDevice.lookup("lo")
    assert lo.ifindex == 1 and lo.channels >= 1
    with pytest.raises(UsageError, match="1 channel "):
        NetDevice(name="one", ifindex=9, mtu=1500, mac="", rx_queues=1, tx_queues=1,
                  channels=1, combined_channels=1, driver=None).validate_queue(1)

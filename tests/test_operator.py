"""The operator's commands, run as subprocesses against real attachments:
attach/detach/list/stats on veth NICs in namespaces, a real HTTP scrape
of the metrics endpoint, ``xdpnet top`` in tmux, QEMU 7.2 started on the
generated options.  The VM is the project's virtio-net simulator, the
wire a WirePeer in the test bed's namespace; nothing on the kernel path
is mocked.

``--json`` outputs are checked against the tables of docs/cli.md (keys
and types are read from the doc).  ``XDPNET_UPDATE_DOCS=1`` makes the
tmux test save its capture as docs/top.txt.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers_serve import (NOBODY, REPO, has_xdp, run_xdpnet, serve_pids, xdpnet_cmd,
                           xdpnet_env)

from xdpnet.errors import EXIT_BUSY, EXIT_PRIVILEGE, EXIT_USAGE
from xdpnet.operator import snippets
from xdpnet.stats import DROP_CAUSES

PREFIX = "xo"
MAC = "52:54:00:0e:00:01"
MAC2 = "52:54:00:0e:00:02"
DOCS = REPO / "docs" / "cli.md"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
COMMANDS = ("attach", "detach", "list", "stats", "top", "metrics", "qemu-args", "libvirt-xml")


# ---- docs/cli.md as the schema ------------------------------------------------

def doc_table(heading: str, first: str | None = None) -> dict[str, str]:
    """{key: type} of the first ``| key | type | ...`` table after *heading*
    (after the line starting with *first*, if given)."""
    lines = DOCS.read_text().splitlines()
    i = lines.index(heading)
    if first is not None:
        i = next(j for j in range(i, len(lines)) if lines[j].startswith(first))
    while not lines[i].startswith("| key | type |"):
        i += 1
    out = {}
    for ln in lines[i + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        for key in re.findall(r"`([a-z_]+)`", cells[0]):
            out[key] = cells[1]
    return out


TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
         "object": dict, "null": type(None), "array of integers": list,
         "array of objects": list}


def check_shape(obj: dict, table: dict[str, str], where: str) -> None:
    """*obj* has exactly the documented keys, each of a documented type."""
    assert set(obj) == set(table), (where, set(obj) ^ set(table))
    for key, typ in table.items():
        allowed = tuple(TYPES[t.strip()] for t in typ.split(" or "))
        v = obj[key]
        ok = isinstance(v, allowed) and not (isinstance(v, bool) and bool not in allowed)
        assert ok, f"{where}.{key} = {v!r} is not {typ}"
        if typ == "array of integers":
            assert all(isinstance(x, int) for x in v), (where, key, v)


def check_list_json(out: dict) -> None:
    assert set(out) == {"vms"}
    table = doc_table("## `xdpnet list --json`")
    for vm in out["vms"]:
        check_shape(vm, table, f"list[{vm.get('name')}]")
        assert vm["state"] in ("running", "starting", "dead")


def check_stats_json(out: dict) -> None:
    assert set(out) == {"time", "vms"} and isinstance(out["time"], float)
    h = "## `xdpnet stats --json`"
    vm_t, pair_t = doc_table(h), doc_table(h, "PAIR")
    base = {k: pair_t[k] for k in ("pair", "queue", "available")}
    total_keys = {k for k in pair_t if k.startswith(("rx_", "tx_"))} | {"drops"}
    causes = set(DROP_CAUSES)
    for vm in out["vms"]:
        check_shape(vm, vm_t, f"stats[{vm['name']}]")
        assert set(vm["total"]) == total_keys and set(vm["total"]["drops"]) == causes
        for p in vm["pairs"]:
            check_shape(p, pair_t if p["available"] else base, f"{vm['name']}.pairs")
            if p["available"]:
                assert set(p["drops"]) == causes
                assert set(p["rings"]) == {"fill", "rx", "tx", "rx_held", "tx_held"}
                assert set(p["broken"]) == {"rx", "tx"}
                assert all(isinstance(v, int) for v in p["counters"].values())


# ---- no privilege needed ------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_shows_examples_and_exit_codes(command):
    r = run_xdpnet(command, "--help")
    assert r.returncode == 0, r.stderr
    examples = r.stdout.split("examples:", 1)[1]
    assert f"xdpnet {command} " in examples
    assert "exit status:" in r.stdout


def test_every_command_is_documented():
    text = DOCS.read_text()
    for c in COMMANDS:
        assert f"`xdpnet {c}" in text, c


@pytest.mark.parametrize("pairs", [1, 2, 4])
def test_qemu_args_shape(pairs):
    args = snippets.qemu_args("/run/vm.sock", MAC, pairs, "2G")
    opts = dict(zip(args[::2], args[1::2]))
    assert opts["-object"] == "memory-backend-memfd,id=mem-net0,size=2G,share=on"
    assert opts["-m"] == "2G"
    dev = opts["-device"].split(",")
    assert dev[0] == "virtio-net-pci" and f"vectors={2 * pairs + 2}" in dev
    assert "rx_queue_size=1024" in dev and "tx_queue_size=1024" in dev
    assert ("mq=on" in dev) == (pairs > 1)
    assert (f"queues={pairs}" in opts["-netdev"]) == (pairs > 1)
    assert "vectors=0" in snippets.qemu_args("/s", MAC, pairs, msix=False)[-1]
    assert not any("balloon" in a or "virtio-mem" in a for a in args)


@pytest.mark.parametrize("pairs", [1, 3])
def test_libvirt_xml_shape(pairs):
    xml = snippets.libvirt_xml("/run/vm 'a'.sock", MAC, pairs, vm="vm1")
    dom = ET.fromstring(xml)
    assert dom.find("memoryBacking/source").get("type") == "memfd"
    assert dom.find("memoryBacking/access").get("mode") == "shared"
    itf = dom.find("devices/interface")
    assert itf.get("type") == "vhostuser"
    assert itf.find("source").attrib == {"type": "unix", "path": "/run/vm 'a'.sock",
                                         "mode": "client"}
    assert itf.find("mac").get("address") == MAC
    assert itf.find("model").get("type") == "virtio"
    drv = itf.find("driver")
    assert drv.get("rx_queue_size") == drv.get("tx_queue_size") == "1024"
    assert drv.get("queues") == (str(pairs) if pairs > 1 else None)
    balloons = dom.findall(".//memballoon")
    assert [b.get("model") for b in balloons] == ["none"]
    assert not dom.findall(".//memory") and "free-page" not in ET.tostring(dom).decode()


def test_detach_unknown_name_exits_2(tmp_path):
    r = run_xdpnet("detach", "nosuchvm", env=xdpnet_env(tmp_path))
    assert r.returncode == EXIT_USAGE, r
    assert r.stderr.strip() == ("xdpnet: error: no VM named 'nosuchvm' is attached "
                                "(xdpnet list shows them)")


def test_list_and_stats_with_no_vms(tmp_path):
    env = xdpnet_env(tmp_path)
    for cmd in (("list", "--json"), ("stats", "--json")):
        r = run_xdpnet(*cmd, env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["vms"] == []
    r = run_xdpnet("qemu-args", "nosuchvm", env=env)
    assert r.returncode == EXIT_USAGE and "nosuchvm" in r.stderr


def test_a_zombie_is_not_alive():
    """An exited process its parent has not reaped yet counts as gone: a
    VM whose serve died is dead (and its steering reapable) at once."""
    from xdpnet.operator.registry import VmRecord
    from xdpnet.rundirs import proc_start, process_alive

    child = subprocess.Popen(["sleep", "60"])
    try:
        start = proc_start(child.pid)
        assert start is not None and process_alive(child.pid, start)
        rec = VmRecord(name="z", pid=child.pid, pid_start=start, iface="lo", queues=[0],
                       port_pairs=0, mac=MAC, socket="/nonexistent")
        assert rec.alive()
        child.kill()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(f"/proc/{child.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        assert os.path.exists(f"/proc/{child.pid}")            # not reaped yet
        assert proc_start(child.pid) is None
        assert not process_alive(child.pid, start) and not rec.alive()
        assert rec.status() == "dead"
    finally:
        child.kill()
        child.wait()


# ---- attached VMs ---------------------------------------------------------------

class Env:
    """A registry directory and xdpnet commands pointed at it."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.env = xdpnet_env(str(run_dir))

    def x(self, *args: str, timeout: float = 90, **kw) -> subprocess.CompletedProcess:
        return run_xdpnet(*args, timeout=timeout, env=self.env, **kw)

    def json(self, *args: str):
        r = self.x(*args, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def attach(self, iface: str, queues: str, name: str, sock: str, mac: str = MAC,
               *extra: str) -> dict:
        r = self.x("attach", iface, "--queue", queues, "--mac", mac, "--socket", sock,
                   "--name", name, "--json", *extra)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def record_path(self, name: str) -> Path:
        return self.run_dir / "vms" / f"{name}.json"

    def log(self, name: str) -> str:
        try:
            return (self.run_dir / "vms" / name / "serve.log").read_text()
        except FileNotFoundError:
            return ""

    def assert_nothing_of(self, name: str, sock: str | None) -> None:
        """No record, no state directory, no socket, no serve process of *name*."""
        assert not self.record_path(name).exists()
        assert not (self.run_dir / "vms" / name).exists()
        if sock is not None:
            assert not os.path.exists(sock), sock
        assert serve_pids(str(self.run_dir), name) == []


@pytest.fixture(scope="module")
def beds():
    from xdpnet.net.netns import Testbed, cleanup_stale

    if os.geteuid() != 0:
        pytest.skip("needs root")
    cleanup_stale(PREFIX)
    with Testbed(queues=2, prefix=PREFIX) as bed, Testbed(queues=1, prefix=PREFIX) as bed2:
        yield bed, bed2


@pytest.fixture(scope="module")
def op(beds, tmp_path_factory):
    """A registry with VM "vm1" attached to the first bed, NIC queues 0 and 1."""
    d = tmp_path_factory.mktemp("operator")
    e = Env(d / "run")
    e.sock = str(d / "vm1.sock")
    e.bed, e.bed2 = beds
    e.vm1 = e.attach(e.bed.nic, "0,1", "vm1", e.sock)
    yield e
    e.x("detach", "vm1")
    e.assert_nothing_of("vm1", e.sock)
    assert not has_xdp(e.bed.nic)


class Traffic:
    """The simulated guest on both queue pairs reflecting every frame, and the
    wire peer sending to it from each CPU (veth: CPU c → NIC rx queue c % 2)."""

    def __init__(self, bed, sock: str):
        from xdpnet.guest.simulator import VirtioNetSimulator
        from xdpnet.wire import WirePeer

        self.vm = VirtioNetSimulator(sock, mac=MAC, queue_pairs=2, queue_size=256)
        self.vm.connect(timeout=10)
        self.vm.start()
        self.wire = WirePeer(bed, peer_mac=MAC)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._guest, daemon=True)]
        self.threads += [threading.Thread(target=self._send, args=(cpu,), daemon=True)
                         for cpu in (0, 1)]
        for t in self.threads:
            t.start()

    def _guest(self) -> None:
        while not self.stop.is_set():
            self.vm.run(duration=1.0, tx_count=0, reflect=True, pair=None)

    def _send(self, cpu: int) -> None:
        from xdpnet.wire import pinned

        seq = 0
        with pinned(cpu % os.cpu_count()):
            while not self.stop.is_set():
                self.wire.send(16, 512, flow=cpu, seq0=seq, dst=MAC)
                seq += 16
                time.sleep(0.004)

    def close(self) -> None:
        self.stop.set()
        self.vm.interrupt_run()
        for t in self.threads:
            t.join(10)
        self.wire.close()
        self.vm.close()


@pytest.fixture
def traffic(op):
    t = Traffic(op.bed, op.sock)
    time.sleep(1.0)
    yield t
    t.close()


def test_list_json_matches_docs(op):
    out = op.json("list")
    check_list_json(out)
    (vm,) = out["vms"]
    assert vm["name"] == "vm1" and vm["state"] == "running"
    assert vm["queues"] == [0, 1] and vm["pairs"] == 2 and vm["mac"] == MAC
    assert vm["socket"] == op.sock and os.path.exists(op.sock)
    assert vm["xdp_mode"] in ("native", "generic") and vm["xsk_mode"] in ("copy", "zero-copy")
    assert serve_pids(str(op.run_dir), "vm1") == [vm["pid"]]
    r = op.x("list")
    assert r.returncode == 0 and "vm1" in r.stdout and "running" in r.stdout


def test_stats_json_matches_docs_and_counts_traffic(op, traffic):
    time.sleep(1.0)
    out = op.json("stats", "vm1")
    check_stats_json(out)
    (vm,) = out["vms"]
    assert [p["queue"] for p in vm["pairs"]] == [0, 1]
    for p in vm["pairs"]:
        assert p["available"] and p["rx_frames"] > 0 and p["tx_frames"] > 0, p
        assert p["rx_copied_bytes"] == 0 and p["tx_copied_bytes"] == 0, p
        assert p["broken"] == {"rx": None, "tx": None}
    assert vm["total"]["rx_frames"] == sum(p["rx_frames"] for p in vm["pairs"])
    check_stats_json(op.json("stats"))
    r = op.x("stats")
    assert r.returncode == 0 and r.stdout.count("vm1") == 2, r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_endpoint_scraped_over_http(op, traffic):
    from prometheus_client.parser import text_string_to_metric_families

    port = _free_port()
    p = subprocess.Popen(xdpnet_cmd("metrics", "--listen", f"127.0.0.1:{port}"), env=op.env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
                    assert rsp.status == 200
                    text = rsp.read().decode()
                break
            except OSError:
                assert p.poll() is None, p.communicate()
                assert time.monotonic() < deadline, "metrics endpoint did not come up"
                time.sleep(0.1)
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        after = op.json("stats", "vm1")["vms"][0]
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=10)
    assert p.returncode == 0, err

    def samples(fam: str, name: str) -> dict[tuple, float]:
        return {tuple(sorted(s.labels.items())): s.value for s in fams[fam].samples
                if s.name == name}

    assert fams["xdpnet_rx_frames"].type == "counter"
    rx = samples("xdpnet_rx_frames", "xdpnet_rx_frames_total")
    tx = samples("xdpnet_tx_frames", "xdpnet_tx_frames_total")
    for q in ("0", "1"):
        key = (("queue", q), ("vm", "vm1"))
        assert 0 < rx[key] <= after["pairs"][int(q)]["rx_frames"], rx
        assert 0 < tx[key] <= after["pairs"][int(q)]["tx_frames"], tx
    drops = samples("xdpnet_drops", "xdpnet_drops_total")
    assert {dict(k)["cause"] for k in drops} == set(DROP_CAUSES)
    assert len(drops) == 2 * len(DROP_CAUSES)
    assert fams["xdpnet_ring_entries"].type == "gauge"
    rings = samples("xdpnet_ring_entries", "xdpnet_ring_entries")
    assert {(dict(k)["queue"], dict(k)["ring"]) for k in rings} == \
        {(q, r) for q in ("0", "1") for r in ("fill", "rx", "tx")}
    assert samples("xdpnet_vm_up", "xdpnet_vm_up") == {(("vm", "vm1"),): 1.0}
    info = samples("xdpnet_queue_info", "xdpnet_queue_info")
    assert {(dict(k)["queue"], dict(k)["nic_queue"]) for k in info} == {("0", "0"), ("1", "1")}


def test_metrics_bad_listen_address_exits_2(op):
    r = op.x("metrics", "--listen", "localhost")
    assert r.returncode == EXIT_USAGE and "ADDR:PORT" in r.stderr, r


def _tmux(sock: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", "-L", sock, "-f", "/dev/null", *args], capture_output=True,
                          text=True, check=check, timeout=20)


def _top_rows(screen: str) -> dict[int, list[str]]:
    """Table rows of the top screen by queue pair: the cells of each ``│ vm1 │`` line."""
    rows = {}
    for ln in screen.splitlines():
        cells = [c.strip() for c in ln.split("│")[1:-1]]
        if cells and cells[0] == "vm1":
            rows[int(cells[1])] = cells
    return rows


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_top_in_tmux_shows_a_row_per_queue_with_rates(op, traffic):
    sock = f"xo{secrets.token_hex(3)}"
    # (COLUMNS/LINES of the test process would override the pane's size)
    cmd = shlex.join(["env", "-u", "COLUMNS", "-u", "LINES", f"XDPNET_RUN_DIR={op.run_dir}",
                      *xdpnet_cmd("top", "--interval", "0.5")])
    _tmux(sock, "new-session", "-d", "-s", "top", "-x", "190", "-y", "30", cmd)
    try:
        deadline = time.monotonic() + 20
        while True:
            time.sleep(0.5)
            screen = _tmux(sock, "capture-pane", "-p", "-t", "top").stdout
            rows = _top_rows(screen)
            if (len(rows) == 2 and all(r[4] != "0" and r[5] != "0" for r in rows.values())
                    and all(set(r[-1]) - {" "} for r in rows.values())):
                break
            assert time.monotonic() < deadline, screen
        header = screen.splitlines()[0]
        assert f"NIC {op.bed.nic}" in header and "XDP " in header and "AF_XDP " in header
        assert re.search(r"up \d+:\d\d:\d\d", header), header
        for pair, cells in rows.items():
            assert cells[2] == str(pair) and cells[3] == "running", cells
        if os.environ.get("XDPNET_UPDATE_DOCS"):
            time.sleep(20)          # a longer sparkline for the docs
            screen = _tmux(sock, "capture-pane", "-p", "-t", "top").stdout
            (REPO / "docs" / "top.txt").write_text(
                "\n".join(ln.rstrip() for ln in screen.rstrip().splitlines()) + "\n")
        # s cycles the sort column, q quits
        _tmux(sock, "send-keys", "-t", "top", "s")
        deadline = time.monotonic() + 5
        while "sort: rx/s" not in _tmux(sock, "capture-pane", "-p", "-t", "top").stdout:
            assert time.monotonic() < deadline, "s did not change the sort column"
            time.sleep(0.1)
        _tmux(sock, "send-keys", "-t", "top", "q")
        deadline = time.monotonic() + 5
        while _tmux(sock, "has-session", "-t", "top", check=False).returncode == 0:
            assert time.monotonic() < deadline, "q did not quit"
            time.sleep(0.1)
    finally:
        _tmux(sock, "kill-server", check=False)


def _kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return True
    except OSError:
        return False


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="needs qemu-system-x86_64 (Debian package qemu-system-x86)")
@pytest.mark.parametrize("accel", ["kvm", "tcg"])
def test_qemu_starts_on_generated_args_and_connects(op, accel):
    """QEMU, paused (-S), takes the generated options and completes the
    vhost-user handshake with the running attachment (the VM's serve log
    names QEMU's pid); under TCG with vectors=0 (--no-msix)."""
    if accel == "kvm" and not _kvm_usable():
        pytest.skip("no usable /dev/kvm")
    extra = ("--no-msix",) if accel == "tcg" else ()
    r = op.x("qemu-args", "vm1", "--mem", "256M", *extra)
    assert r.returncode == 0, r.stderr
    args = shlex.split(r.stdout)
    assert ("vectors=0" in args[-1]) == (accel == "tcg") and "vectors=6" in op.x(
        "qemu-args", "vm1").stdout
    assert op.json("qemu-args", "vm1", "--mem", "256M", *extra)["args"] == args
    q = subprocess.Popen(["qemu-system-x86_64", "-accel", accel, "-machine", "q35", "-S",
                          "-display", "none", "-nodefaults", "-no-user-config",
                          "-monitor", "none", "-serial", "none", *args],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        want = f"vhost-user frontend connected (pid {q.pid} "
        deadline = time.monotonic() + 30
        while want not in op.log("vm1"):
            assert q.poll() is None, f"QEMU exited {q.returncode}: {q.communicate()[1]}"
            assert time.monotonic() < deadline, op.log("vm1")
            time.sleep(0.1)
        time.sleep(0.5)
        assert q.poll() is None, q.communicate()[1]        # handshake done, still running
    finally:
        q.terminate()
        _, err = q.communicate(timeout=20)
    assert "error" not in err.lower(), err
    deadline = time.monotonic() + 10
    while f"vhost-user frontend disconnected (pid {q.pid} " not in op.log("vm1"):
        assert time.monotonic() < deadline, op.log("vm1")
        time.sleep(0.1)
    assert op.json("list")["vms"][0]["state"] == "running"


# ---- refusals: nothing half-attached ------------------------------------------------

@pytest.mark.parametrize("case", ["missing-iface", "queue-beyond", "bad-mac", "zero-mac",
                                  "existing-name", "existing-socket", "refused-by-serve"])
def test_attach_refusal_leaves_nothing(op, case, tmp_path):
    nic, queue, mac, name = op.bed2.nic, "0", MAC2, "vm2"
    sock, extra = str(tmp_path / "vm2.sock"), ()
    code, words = EXIT_USAGE, ()
    if case == "missing-iface":
        nic = "xonosuch0"
        words = (nic,)
    elif case == "queue-beyond":
        queue, words = "1", ("queue 1", "1 channel")
    elif case == "bad-mac":
        mac, words = "52:54:00:0e:00", ("52:54:00:0e:00",)
    elif case == "zero-mac":                # refused before a serve process starts
        mac, words = "00:00:00:00:00:00", ("00:00:00:00:00:00", "not a VM's MAC")
    elif case == "existing-name":
        name, code, words = "vm1", EXIT_BUSY, ("vm1", "already attached")
    elif case == "existing-socket":
        sock, code, words = op.sock, EXIT_BUSY, (op.sock, "vm1")
    elif case == "refused-by-serve":       # found by the serve process: its error relayed
        extra, words = ("--group", "xonosuchgrp"), ("xonosuchgrp",)
    def attached() -> list[tuple[str, int, str]]:
        return [(v["name"], v["pid"], v["state"]) for v in op.json("list")["vms"]]

    before = attached()
    r = op.x("attach", nic, "--queue", queue, "--mac", mac, "--socket", sock, "--name", name,
             *extra)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xdpnet: error: "), r.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    assert attached() == before
    if name != "vm1":
        op.assert_nothing_of(name, sock if sock != op.sock else None)
    assert not has_xdp(op.bed2.nic)
    # vm1 is untouched
    assert os.path.exists(op.sock)
    assert serve_pids(str(op.run_dir), "vm1") == [op.vm1["pid"]]


@root_only
def test_attach_without_privilege_exits_3(beds, tmp_path):
    os.chmod(tmp_path, 0o777)
    sock = str(tmp_path / "vm.sock")
    r = subprocess.run([*NOBODY,
                        *xdpnet_cmd("attach", beds[1].nic, "--queue", "0", "--mac", MAC2,
                                    "--socket", sock)],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                       cwd="/", env=xdpnet_env(str(tmp_path / "run")), check=False)
    assert r.returncode == EXIT_PRIVILEGE, r
    assert r.stderr.startswith("xdpnet: error: xdpnet attach needs CAP_NET_ADMIN"), r.stderr
    assert not os.path.exists(sock) and not (tmp_path / "run").exists()


# ---- detach -----------------------------------------------------------------------

def test_detach_running_vm_leaves_nothing(op, tmp_path):
    sock = str(tmp_path / "vm3.sock")
    vm = op.attach(op.bed2.nic, "0", "vm3", sock, MAC2)
    assert vm["state"] == "running" and os.path.exists(sock) and has_xdp(op.bed2.nic)
    assert (op.run_dir / "vms" / "vm3" / "qp0.counters").exists()
    r = op.x("detach", "vm3")
    assert r.returncode == 0 and r.stdout.strip() == "detached vm3", r
    op.assert_nothing_of("vm3", sock)
    assert not has_xdp(op.bed2.nic)
    assert [v["name"] for v in op.json("list")["vms"]] == ["vm1"]


def test_killed_vm_shows_dead_others_run_and_detach_cleans_up(op, tmp_path):
    """One VM's serve process dies: the other VM keeps serving; list and stats
    show it dead; detach removes its socket, files and XDP program."""
    sock = str(tmp_path / "vm4.sock")
    vm = op.attach(op.bed2.nic, "0", "vm4", sock, MAC2)
    os.kill(vm["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while serve_pids(str(op.run_dir), "vm4"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    states = {v["name"]: v["state"] for v in op.json("list")["vms"]}
    assert states == {"vm1": "running", "vm4": "dead"}
    st = {v["name"]: v for v in op.json("stats")["vms"]}
    check_stats_json({"time": 0.0, "vms": list(st.values())})
    assert st["vm4"]["state"] == "dead" and not st["vm4"]["pairs"][0]["available"]
    assert os.path.exists(sock) and has_xdp(op.bed2.nic)       # what it left
    r = op.x("detach", "vm4")
    assert r.returncode == 0 and "died" in r.stdout, r
    op.assert_nothing_of("vm4", sock)
    assert not has_xdp(op.bed2.nic)
    assert not os.path.exists(f"/sys/fs/bpf/xdpnet/{op.bed2.nic}")     # no pins left
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                           check=True).stdout
    assert f" xn{op.bed2.nic_ifindex}v" not in links                    # no port left
    # the other VM never noticed
    assert serve_pids(str(op.run_dir), "vm1") == [op.vm1["pid"]]
    from xdpnet.guest.simulator import VirtioNetSimulator

    with VirtioNetSimulator(op.sock, mac=MAC, queue_pairs=2, queue_size=256) as g:
        g.connect(timeout=10)
        g.start()


def test_attach_after_a_dead_vm_of_the_same_name_reuses_it(op, tmp_path):
    sock = str(tmp_path / "vm5.sock")
    vm = op.attach(op.bed2.nic, "0", "vm5", sock, MAC2)
    os.kill(vm["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while serve_pids(str(op.run_dir), "vm5"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    again = op.attach(op.bed2.nic, "0", "vm5", sock, MAC2)
    assert again["pid"] != vm["pid"] and again["state"] == "running"
    r = op.x("detach", "vm5")
    assert r.returncode == 0, r
    op.assert_nothing_of("vm5", sock)
    assert not has_xdp(op.bed2.nic)

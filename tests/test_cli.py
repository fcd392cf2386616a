"""The xdpnet command line, run as a subprocess: help, exit codes, one-line
errors, nothing left attached, the demo's JSON, and ``serve`` surviving
misbehaving frontends (legacy virtio, rings outside the memory table).

Exit codes are those of ``EXIT_CODES`` in xdpnet/cli.py.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess

import pytest

from helpers_serve import NOBODY, ServeProcess, has_xdp, run_xdpnet, xdpnet_cmd
from rigs import wait_for
from xdpnet.errors import EXIT_BUSY, EXIT_PRIVILEGE, EXIT_USAGE

MAC = "52:54:00:c1:1c:01"
PREFIX = "xc" + secrets.token_hex(2)     # this session's test beds only
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("xdpnet: error: ")]


def assert_one_error(r: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Exit *code*, exactly one ``xdpnet: error:`` line (containing *words*), no traceback."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture
def bed():
    from xdpnet.net.netns import Testbed

    with Testbed(queues=1, prefix=PREFIX) as tb:
        yield tb


# ---- help and usage ------------------------------------------------------

@pytest.mark.parametrize("command", ["serve", "demo"])
def test_command_help_shows_examples_and_exit_codes(command):
    r = run_xdpnet(command, "--help")
    assert r.returncode == 0, r.stderr
    assert "examples:" in r.stdout, r.stdout
    assert f"xdpnet {command} " in r.stdout.split("examples:", 1)[1]
    assert "exit status:" in r.stdout


def test_top_level_help_lists_commands_and_exit_codes():
    r = run_xdpnet("--help")
    assert r.returncode == 0, r.stderr
    assert "serve" in r.stdout and "demo" in r.stdout
    assert "exit status:" in r.stdout


def test_top_level_help_shows_examples():
    r = run_xdpnet("--help")
    assert "examples:" in r.stdout
    assert "xdpnet serve " in r.stdout.split("examples:", 1)[1]


def test_no_command_exits_2():
    r = run_xdpnet()
    assert r.returncode == EXIT_USAGE, r
    assert "usage: xdpnet" in r.stdout + r.stderr


# ---- serve: bad input ------------------------------------------------------

@root_only
@pytest.mark.parametrize("case", ["unknown-iface", "queue-beyond", "bad-mac", "multicast-mac",
                                  "bad-queue-list", "queue-range-reversed", "dup-queues"])
def test_serve_bad_input_exits_2_with_one_line(bed, tmp_path, case):
    sock = str(tmp_path / "vm.sock")
    iface, queue, mac, words = bed.nic, "0", MAC, ()
    if case == "unknown-iface":
        iface, words = "nosuchif" + secrets.token_hex(2), ("nosuchif",)
    elif case == "queue-beyond":
        queue, words = "5", ("5",)
    elif case == "bad-mac":
        mac, words = "52:54:00:zz:34:56", ("52:54:00:zz:34:56",)
    elif case == "multicast-mac":
        mac, words = "01:00:5e:00:00:01", ("multicast",)
    elif case == "bad-queue-list":
        queue, words = "0,,x", ("0,,x",)
    elif case == "queue-range-reversed":
        queue = "3-1"
    elif case == "dup-queues":
        queue = "0,0"
    r = run_xdpnet("serve", "--iface", iface, "--queue", queue, "--mac", mac, "--socket", sock)
    assert_one_error(r, EXIT_USAGE, *words)
    assert r.stderr.strip().count("\n") == 0, r.stderr      # that line and nothing else
    assert not os.path.exists(sock)
    assert not has_xdp(bed.nic)


@root_only
@pytest.mark.parametrize("max_frame", ["0", "100000"])
def test_serve_bad_max_frame_exits_2(bed, tmp_path, max_frame):
    sock = str(tmp_path / "vm.sock")
    r = run_xdpnet("serve", "--iface", bed.nic, "--queue", "0", "--mac", MAC, "--socket", sock,
                   "--max-frame", max_frame)
    assert not os.path.exists(sock) and not has_xdp(bed.nic)
    assert_one_error(r, EXIT_USAGE, "max frame")


@root_only
@pytest.mark.parametrize("where", ["missing-dir", "regular-file", "unknown-group"])
def test_serve_unusable_socket_path_exits_2_and_detaches(bed, tmp_path, where):
    regular = tmp_path / "regular"
    regular.write_text("keep me")
    sock = str(tmp_path / "nodir" / "vm.sock") if where == "missing-dir" else str(regular)
    extra, word = (), sock
    if where == "unknown-group":
        sock, extra, word = str(tmp_path / "vm.sock"), ("--group", "nosuchgrp"), "nosuchgrp"
    r = run_xdpnet("serve", "--iface", bed.nic, "--queue", "0", "--mac", MAC, "--socket", sock,
                   *extra)
    assert_one_error(r, EXIT_USAGE, word)
    if where == "unknown-group":
        assert not os.path.exists(sock)
    assert not has_xdp(bed.nic), "XDP program left attached after the socket failed"
    assert regular.read_text() == "keep me"


@root_only
def test_serve_without_privilege_exits_3(bed, tmp_path):
    os.chmod(tmp_path, 0o777)
    sock = str(tmp_path / "vm.sock")
    r = subprocess.run([*NOBODY,
                        *xdpnet_cmd("serve", "--iface", bed.nic, "--queue", "0", "--mac", MAC,
                                    "--socket", sock)],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                       cwd="/")
    assert_one_error(r, EXIT_PRIVILEGE, "CAP_NET_ADMIN")
    assert not os.path.exists(sock)
    assert not has_xdp(bed.nic)


@root_only
def test_serve_socket_already_served_exits_4(tmp_path):
    from xdpnet.net.netns import Testbed

    sock = str(tmp_path / "vm.sock")
    with Testbed(queues=1, prefix=PREFIX) as bed1, Testbed(queues=1, prefix=PREFIX) as bed2:
        with ServeProcess(bed1.nic, sock, mac=MAC) as first:
            first.wait_ready()
            r = run_xdpnet("serve", "--iface", bed2.nic, "--queue", "0", "--mac", MAC,
                           "--socket", sock)
            assert_one_error(r, EXIT_BUSY, sock)
            assert not has_xdp(bed2.nic), "the refused serve left its XDP program attached"
            # the first server is untouched
            assert first.returncode is None, first.stderr_text()
            assert os.path.exists(sock)
            assert has_xdp(bed1.nic)
        assert first.returncode == 0, first.stderr_text()
        assert not has_xdp(bed1.nic)
        assert not os.path.exists(sock)


@root_only
def test_serve_interface_with_xdp_program_exits_4(bed, tmp_path):
    sock1, sock2 = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    with ServeProcess(bed.nic, sock1, mac=MAC) as first:
        first.wait_ready()
        assert has_xdp(bed.nic)
        r = run_xdpnet("serve", "--iface", bed.nic, "--queue", "0",
                       "--mac", "52:54:00:c1:1c:02", "--socket", sock2)
        assert_one_error(r, EXIT_BUSY, bed.nic)
        assert not os.path.exists(sock2)
        # the refused serve must not have detached the first one's program
        assert has_xdp(bed.nic)
        assert first.returncode is None, first.stderr_text()
    assert first.returncode == 0, first.stderr_text()
    assert not has_xdp(bed.nic)
    assert not os.path.exists(sock1)


# ---- demo ----------------------------------------------------------------

def _xd_netns() -> set[str]:
    try:
        return {n for n in os.listdir("/run/netns") if n.startswith("xd")}
    except FileNotFoundError:
        return set()


@root_only
@pytest.mark.slow
def test_demo_json(tmp_path):
    before = _xd_netns()
    p = subprocess.Popen(xdpnet_cmd("demo", "--seconds", "2", "--json"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    res = json.loads(out)
    for k in ("rx_frames", "tx_frames", "rx_zero_copy_frames", "rx_copied_bytes",
              "tx_zero_copy_frames", "tx_copied_bytes", "drops", "verified_frames",
              "bad_frames"):
        assert k in res, (k, res)
    assert set(res["drops"]) >= {"no_rx_buffer", "too_large", "invalid_desc", "tx_error"}
    assert res["rx_copied_bytes"] == 0 and res["tx_copied_bytes"] == 0, res
    assert res["verified_frames"] > 0 and res["bad_frames"] == 0, res
    assert res["rx_frames"] > 0 and res["tx_frames"] > 0, res
    # nothing left behind: a leftover would carry the demo's pid in its owner file
    for ns in _xd_netns() - before:
        try:
            with open(f"/run/xdpnet/testbeds/{ns}") as f:
                owner = f.read().split()[0]
        except (FileNotFoundError, IndexError):
            continue        # being removed by its (other) owner
        assert owner != str(p.pid), f"demo left netns {ns} behind"


# ---- serve against misbehaving frontends ----------------------------------

def _normal_vm_works(bed, sock: str) -> None:
    """A well-behaved simulator connects, starts and its frames reach the wire."""
    from xdpnet.guest.simulator import VirtioNetSimulator
    from xdpnet.wire import WirePeer

    with VirtioNetSimulator(sock, mac=MAC, queue_size=256) as vm, \
            WirePeer(bed, peer_mac=MAC) as wire:
        vm.connect(timeout=10)
        vm.start()
        vm.send(32, 64, dst=wire.mac, flow=7)
        got = wire.recv(max_frames=32, timeout=3)
        assert got.verified == 32 and got.bad == 0, got


@root_only
def test_serve_refuses_legacy_frontend_and_keeps_serving(bed, tmp_path):
    from xdpnet.errors import VhostError
    from xdpnet.guest.simulator import DEFAULT_FEATURES, VirtioNetSimulator
    from xdpnet.vhost import protocol as P

    sock = str(tmp_path / "vm.sock")
    legacy = DEFAULT_FEATURES & ~P.bit(P.VirtioFeature.VERSION_1)
    with ServeProcess(bed.nic, sock, mac=MAC) as srv:
        srv.wait_ready()
        with VirtioNetSimulator(sock, mac=MAC, features=legacy) as vm:
            with pytest.raises((VhostError, OSError)):
                vm.connect(timeout=10)
                vm.start()
        def legacy_lines() -> list[str]:      # (the socket path names this test: not counted)
            return [ln for ln in srv.stderr_text().replace(str(tmp_path), "").splitlines()
                    if "legacy" in ln.lower()]

        assert wait_for(legacy_lines, 5.0), srv.stderr_text()
        lines = legacy_lines()
        assert len(lines) == 1, srv.stderr_text()
        assert srv.returncode is None, srv.stderr_text()
        _normal_vm_works(bed, sock)
        assert srv.returncode is None, srv.stderr_text()
    assert srv.returncode == 0, srv.stderr_text()
    assert not has_xdp(bed.nic)


@root_only
def test_serve_refuses_ring_outside_memory_table_and_keeps_serving(bed, tmp_path):
    """SET_VRING_ADDR naming a descriptor table beyond the memory table: the backend
    refuses the ring (at the latest when it is started by SET_VRING_KICK), logs one
    line naming the vring, and serves the next frontend."""
    from xdpnet.errors import VhostError
    from xdpnet.guest.simulator import DEFAULT_FEATURES, VirtioNetSimulator
    from xdpnet.vhost import protocol as P

    sock = str(tmp_path / "vm.sock")
    R = P.Request
    with ServeProcess(bed.nic, sock, mac=MAC) as srv:
        srv.wait_ready()
        with VirtioNetSimulator(sock, mac=MAC, queue_size=256) as vm:
            neg = vm.connect(timeout=10)
            fe = vm.frontend
            features = DEFAULT_FEATURES & neg.backend_features
            fe.set_u64(R.SET_FEATURES, features)
            vm.layout(features)
            vm.set_mem_table_again()
            pair, m = vm.pairs[0], vm.memory
            desc, avail, used = pair.rings[pair.rx_vq]
            outside = m.uva(0) + vm.config.mem_size + (1 << 20)     # 1 MiB past the table
            with pytest.raises((VhostError, OSError)):
                fe.set_vring_state(R.SET_VRING_NUM, pair.rx_vq, 256)
                fe.set_vring_state(R.SET_VRING_BASE, pair.rx_vq, 0)
                fe.send(R.SET_VRING_ADDR,
                        P.VringAddr(pair.rx_vq, 0, outside, m.uva(used), m.uva(avail), 0).pack())
                fe.set_u64(R.SET_VRING_KICK, pair.rx_vq, [pair.fds["rx_kick"]])
                fe.set_u64(R.SET_VRING_CALL, pair.rx_vq, [pair.fds["rx_call"]])
                fe.get_u64(R.GET_FEATURES)      # a refusal without REPLY_ACK: connection closed

        def refusal_lines() -> list[str]:
            return [ln for ln in srv.stderr_text().replace(str(tmp_path), "").splitlines()
                    if f"vring {pair.rx_vq}" in ln and "memory table" in ln]

        assert wait_for(refusal_lines, 5.0), srv.stderr_text()
        assert len(refusal_lines()) == 1, srv.stderr_text()
        assert f"0x{outside:x}" in refusal_lines()[0]
        assert srv.returncode is None, srv.stderr_text()
        _normal_vm_works(bed, sock)
        assert srv.returncode is None, srv.stderr_text()
    assert srv.returncode == 0, srv.stderr_text()
    assert not has_xdp(bed.nic)


@root_only
def test_serve_refuses_new_memory_table_not_covering_running_rings(bed, tmp_path):
    """A running frontend sends a new SET_MEM_TABLE whose frontend addresses no longer
    cover its rings: refused with one line naming the vring; the next frontend works."""
    import dataclasses

    from xdpnet.errors import VhostError
    from xdpnet.guest.simulator import VirtioNetSimulator
    from xdpnet.vhost import protocol as P

    sock = str(tmp_path / "vm.sock")
    with ServeProcess(bed.nic, sock, mac=MAC) as srv:
        srv.wait_ready()
        with VirtioNetSimulator(sock, mac=MAC, queue_size=256) as vm:
            vm.connect(timeout=10)
            vm.start()
            moved = [dataclasses.replace(r, user_addr=r.user_addr + (1 << 30))
                     for r in vm.memory.table()]
            with pytest.raises((VhostError, OSError)):
                vm.request(P.Request.SET_MEM_TABLE, P.pack_mem_table(moved),
                           [vm.memory.fd] * len(moved))
                vm.frontend.get_u64(P.Request.GET_FEATURES)

        def refusal_lines() -> list[str]:
            return [ln for ln in srv.stderr_text().replace(str(tmp_path), "").splitlines()
                    if "SET_MEM_TABLE" in ln and "vring" in ln and "memory table" in ln]

        assert wait_for(refusal_lines, 5.0), srv.stderr_text()
        assert len(refusal_lines()) == 1, srv.stderr_text()
        assert srv.returncode is None, srv.stderr_text()
        _normal_vm_works(bed, sock)
    assert srv.returncode == 0, srv.stderr_text()
    assert not has_xdp(bed.nic)

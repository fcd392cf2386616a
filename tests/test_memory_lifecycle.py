"""Guest memory lifecycle (issue 9), end to end.

The backend on a veth NIC in a namespace, the project's virtio driver
simulator as the guest, an AF_PACKET peer on the wire: a new memory table
mid-stream, postcopy refused, bad tables refused over the socket with
nothing left mapped or open, a hole punched in guest memory detected and
followed by re-registration, hugetlb-backed guest memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time

import pytest

from xdpnet.guest.frontend import BackendClosed, BackendRefused
from xdpnet.guest.simulator import VirtioNetSimulator
from xdpnet.net.netns import Testbed
from xdpnet.vhost import protocol as P
from xdpnet.wire import WirePeer

from helpers_serve import ServeProcess
from rigs import Attached, wait_filled, wait_for
from rigs import attached as _attached

VM_MAC = "52:54:00:aa:cc:01"
_libc = ctypes.CDLL(None, use_errno=True)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def attached(prefix: str = "xm", connect: bool = True, **sim_options):
    """A VM attached to a fresh veth NIC (rigs.attached) with 1024-entry
    rings, as xdpnet's QEMU options ask for: the 200-frame bursts below then
    fit in the buffers the direct socket holds (the VM's port socket holds
    the rest)."""
    sim_options.setdefault("queue_size", 1024)
    return _attached(VM_MAC, prefix=prefix, connect=connect, **sim_options)


def to_vm(a: Attached, count: int, seq0: int = 0, length: int = 200) -> int:
    """Wire → VM: ``count`` frames; returns how many the guest verified."""
    wait_filled(a.att)
    before = a.vm.stats().rx_verified
    a.wire.send(count, length, flow=5, seq0=seq0)
    a.vm.run(duration=3.0, tx_count=0, rx_count=count)
    return a.vm.stats().rx_verified - before


def punch_hole(fd: int, offset: int, length: int) -> None:
    """What QEMU does to guest RAM for balloon / free-page reporting / virtio-mem."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                       ctypes.c_long(offset), ctypes.c_long(length)):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def punch_rx_buffers(vm: VirtioNetSimulator) -> None:
    """Punch the pages under the guest's posted rx buffers."""
    bufs = sorted(segs[0][0] for segs in vm.rx_buffers())
    lo = vm.memory.offset_of_gpa(bufs[0]) & ~4095
    hi = (vm.memory.offset_of_gpa(bufs[-1]) + 4096 + 4095) & ~4095
    punch_hole(vm.memory.fd, lo, hi - lo)


def fds_to(name: str) -> list[str]:
    """Our open fds whose target mentions ``name`` (memfd names show up)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if name in os.readlink(f"/proc/self/fd/{fd}"):
                out.append(fd)
        except OSError:
            pass
    return out


def mappings_of(name: str) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if name in line]


# -- a new memory table while running -------------------------------------

def test_new_memory_table_mid_stream_loses_and_duplicates_nothing(caplog):
    caplog.set_level(logging.INFO, logger="xdpnet.backend")
    total = 20000
    with attached() as a:
        assert to_vm(a, 100) == 100
        # Guest → wire stream; the table is re-sent three times while it
        # runs, each time once the backend has sent a given share of it.
        got = []
        rx = threading.Thread(target=lambda: got.append(a.wire.recv(max_frames=total,
                                                                    timeout=8)))
        rx.start()
        tx = threading.Thread(target=a.vm.run, kwargs=dict(duration=15.0, tx_count=total,
                                                           tx_length=300, dst=a.wire.mac))
        tx.start()
        sent_at_resend = []
        for share in (0.1, 0.4, 0.7):
            wait_for(lambda: a.att.counters()["tx_frames"] >= share * total, 8, 0.0005)
            sent_at_resend.append(a.att.counters()["tx_frames"])
            a.vm.set_mem_table_again()
        tx.join()
        rx.join()
        assert sent_at_resend[1] < total, sent_at_resend      # re-sent while it ran
        w = got[0]
        st = a.vm.stats()
        assert st.tx_completed == total and st.tx_bad_used == 0
        assert w.verified == total and w.bad == 0 and w.duplicates == 0
        assert w.flows[0].unique == total and w.flows[0].missing == 0
        # ... and the other direction still lands in the guest, verified.
        assert to_vm(a, 100, seq0=100) == 100
        st = a.vm.stats()
        assert st.rx_bad == 0 and st.rx_len_invalid == 0 and a.vm.check_guards() == 0
        assert a.backend.last_pause_ms is not None and a.backend.last_pause_ms < 5000
        assert caplog.text.count("paused") >= 2
        c = a.att.counters()
        assert c["rx_copied_bytes"] == 0 and c["tx_copied_bytes"] == 0


# -- postcopy and bad tables ------------------------------------------------

def test_postcopy_is_never_offered_and_refused_when_asked():
    with attached(connect=False) as a:
        n = a.vm.connect()
        assert not n.protocol_features >> P.ProtocolFeature.PAGEFAULT & 1
        with pytest.raises(BackendRefused):
            a.vm.request(P.Request.SET_PROTOCOL_FEATURES,
                         P.U64.pack(n.protocol_features | 1 << P.ProtocolFeature.PAGEFAULT),
                         need_reply=True)


def test_postcopy_advise_gets_an_error_reply(caplog):
    with attached(connect=False) as a:
        a.vm.connect()
        # The spec's reply carries a userfaultfd; an empty one is the error.
        assert a.vm.request(P.Request.POSTCOPY_ADVISE) == b""
        assert "postcopy migration is not supported" in caplog.text
        a.vm.start()                        # the connection survives
        assert to_vm(a, 20) == 20


def _memfd(name: str, size: int, seal: bool = False) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seal else 0))
    os.ftruncate(fd, size)
    return fd


MB = 1 << 20


# Each bad table and the part of its one-line refusal that names the problem.
BAD_TABLE_MESSAGES = {
    "longer than its file": "extends past the end of its file",
    "overlapping": "overlap",
    "disk-backed": "memory-backend-memfd",          # the fix is named
    "write-sealed": "sealed against writes",
}


def _bad_tables(tmp_path):
    """(name, regions, fds, expected message part) for each bad table."""
    cases = []
    fd = _memfd("xdpnet-bad-short", 8 * MB)
    cases.append(("longer than its file", [P.MemRegion(0, 16 * MB, 0x7f0000000000, 0)], [fd],
                  BAD_TABLE_MESSAGES["longer than its file"]))
    fd1, fd2 = _memfd("xdpnet-bad-ovl1", 16 * MB), _memfd("xdpnet-bad-ovl2", 16 * MB)
    cases.append(("overlapping", [P.MemRegion(0, 16 * MB, 0x7f0000000000, 0),
                                  P.MemRegion(8 * MB, 16 * MB, 0x7f1000000000, 0)], [fd1, fd2],
                  BAD_TABLE_MESSAGES["overlapping"]))
    path = tmp_path / "xdpnet-bad-disk"
    with open(path, "wb") as f:
        f.truncate(16 * MB)
    fd = os.open(path, os.O_RDWR)
    cases.append(("disk-backed", [P.MemRegion(0, 16 * MB, 0x7f0000000000, 0)], [fd],
                  BAD_TABLE_MESSAGES["disk-backed"]))
    fd = _memfd("xdpnet-bad-sealed", 16 * MB, seal=True)
    import fcntl
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    cases.append(("write-sealed", [P.MemRegion(0, 16 * MB, 0x7f0000000000, 0)], [fd],
                  BAD_TABLE_MESSAGES["write-sealed"]))
    return cases


@pytest.mark.parametrize("case", list(BAD_TABLE_MESSAGES))
def test_bad_table_refused_with_its_message_and_nothing_left(tmp_path, caplog, case):
    caplog.set_level(logging.INFO)
    tables = {c[0]: c for c in _bad_tables(tmp_path)}
    try:
        _, regions, fds, message = tables[case]
        with attached(connect=False) as a:
            a.vm.connect()
            with pytest.raises((BackendRefused, BackendClosed)):
                a.vm.request(P.Request.SET_MEM_TABLE, P.pack_mem_table(regions), fds,
                             need_reply=True)
            assert message in caplog.text
            assert a.backend.memory is None
            # The backend kept no fd and no mapping of the refused files.
            names = [os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].split(" ")[0]
                     for fd in fds]
            wait_for(lambda: all(len(fds_to(n)) == 1 and not mappings_of(n) for n in names))
            for name in names:
                assert len(fds_to(name)) == 1, (case, name)
                assert mappings_of(name) == []
            # The backend still serves the next frontend.
            with VirtioNetSimulator(a.att.socket_path, mac=VM_MAC) as vm2:
                a.vm.close()
                vm2.connect()
                vm2.start()
                wait_filled(a.att)
                a.wire.send(50, 200, flow=5)
                vm2.run(duration=3.0, tx_count=0, rx_count=50)
                assert vm2.stats().rx_verified == 50
    finally:
        for c in tables.values():
            for fd in c[2]:
                os.close(fd)


def test_guest_memory_cannot_be_shrunk_under_the_backend():
    """Truncating guest RAM would turn the backend's ring reads into SIGBUS:
    the file is sealed against shrinking when it is mapped."""
    with attached() as a:
        with pytest.raises(PermissionError):
            os.ftruncate(a.vm.memory.fd, 4096)
        assert to_vm(a, 50) == 50


def test_hostile_tables_never_crash_the_backend_and_other_vms_continue(tmp_path):
    """A hostile frontend throws every bad table at one ``xdpnet serve``
    process while another VM streams: the attacked process stays up and
    serves the next frontend; the other VM loses nothing."""
    with contextlib.ExitStack() as stack:
        bed_b = stack.enter_context(Testbed(queues=1, prefix="xm"))
        sock_b = str(tmp_path / "b.sock")
        srv = stack.enter_context(ServeProcess(bed_b.nic, sock_b, mac=VM_MAC))
        srv.wait_ready()
        a = stack.enter_context(attached(prefix="xm"))
        stop = threading.Event()
        verified = []

        def stream() -> None:
            i = 0
            while not stop.is_set():
                verified.append(to_vm(a, 50, seq0=i))
                i += 50
        t = threading.Thread(target=stream)
        t.start()
        try:
            for name, regions, fds, _ in _bad_tables(tmp_path):
                try:
                    with VirtioNetSimulator(sock_b, mac=VM_MAC) as hostile:
                        hostile.connect()
                        with pytest.raises((BackendRefused, BackendClosed)):
                            hostile.request(P.Request.SET_MEM_TABLE, P.pack_mem_table(regions),
                                            fds, need_reply=True)
                finally:
                    for fd in fds:
                        os.close(fd)
                assert srv.returncode is None, (name, srv.stderr_text())
        finally:
            stop.set()
            t.join()
        assert verified and all(n == 50 for n in verified)
        # The attacked backend still serves a well-behaved VM.
        wire_b = stack.enter_context(WirePeer(bed_b, peer_mac=VM_MAC))
        with VirtioNetSimulator(sock_b, mac=VM_MAC) as vm:
            vm.connect()
            vm.start()
            time.sleep(0.2)
            wire_b.send(50, 200, flow=5)
            vm.run(duration=3.0, tx_count=0, rx_count=50)
            assert vm.stats().rx_verified == 50
        assert srv.returncode is None
        err = srv.stderr_text()
        for message in BAD_TABLE_MESSAGES.values():
            assert message in err


# -- discarded pages ----------------------------------------------------------

def test_hole_punched_mid_stream_is_detected_and_the_umem_reregistered(caplog):
    caplog.set_level(logging.INFO, logger="xdpnet.backend")
    with attached() as a:
        assert to_vm(a, 200) == 200
        assert a.backend.discards == 0 and a.backend.last_pause_ms is None
        # As a balloon would for pages the guest later reuses as buffers.
        punch_rx_buffers(a.vm)
        deadline = time.monotonic() + 5
        while a.backend.last_pause_ms is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.backend.discards == 1
        assert "discard detected" in caplog.text and "re-registration" in caplog.text
        # After re-registration frames land where the guest sees them again.
        assert to_vm(a, 200, seq0=1000) == 200
        assert a.backend.discards == 1          # counted once, not per check
        # (no guard check here: the punch itself zeroed the guest's guard bytes)
        assert a.vm.stats().rx_len_invalid == 0 and a.vm.stats().rx_bad == 0


def test_without_reregistration_frames_after_a_discard_are_lost():
    """The hazard the watcher exists for (FACTS): the UMEM keeps the old
    pages, so frames land where the guest no longer looks."""
    with attached() as a:
        assert to_vm(a, 100) == 100
        a.backend._stop_watch()
        punch_rx_buffers(a.vm)
        a.wire.send(100, 200, flow=5, seq0=100)
        a.vm.run(duration=2.0, tx_count=0, rx_count=100)
        st = a.vm.stats()
        assert st.rx_frames == 200              # the used ring says delivered ...
        assert st.rx_verified == 100            # ... but the guest saw no new frame
        assert st.rx_bad == 100


def test_freshly_registered_memory_has_no_holes():
    """The detector's premise: registration faults in every page."""
    with attached() as a:
        w = a.backend._watcher
        assert w is not None and w.scan() is None


# -- hugetlb ------------------------------------------------------------------

def test_hugetlb_guest_memory_exchanges_verified_frames(hugepages):
    with attached(hugetlb=True, regions=2, mem_size=64 * MB) as a:
        assert all(p.region.hugetlb for p in a.backend.memory.layout.regions)
        assert all(p.umem_off % (2 * MB) == 0 for p in a.backend.memory.layout.regions)
        assert to_vm(a, 200, length=1400) == 200
        got = []
        rx = threading.Thread(target=lambda: got.append(a.wire.recv(max_frames=200, timeout=4)))
        rx.start()
        a.vm.run(duration=4.0, tx_count=200, tx_length=1400, dst=a.wire.mac)
        rx.join()
        assert got[0].verified == 200 and got[0].bad == 0
        c = a.att.counters()
        assert c["rx_copied_bytes"] == 0 and c["tx_copied_bytes"] == 0
        assert a.vm.check_guards() == 0


@pytest.mark.parametrize("hugetlb", [False, True], ids=["memfd", "hugetlb"])
def test_discard_watcher_sees_a_punched_page(request, hugetlb):
    """Detection alone, on both kinds of guest memory: SEEK_HOLE on
    memfd/tmpfs, st_blocks where SEEK_HOLE reports no holes."""
    import mmap

    from xdpnet.memory.discard import DiscardWatcher, WatchedRange

    if hugetlb:
        request.getfixturevalue("hugepages")
    page = 2 * MB if hugetlb else 4096
    flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB | os.MFD_HUGE_2MB if hugetlb else 0)
    fd = os.memfd_create("xdpnet-watch", flags)
    try:
        size = 8 * MB
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size)
        for off in range(0, size, page):        # what registration does: fault all in
            m[off] = 1
        seen = []
        w = DiscardWatcher([WatchedRange(0, fd, 2 * MB, 4 * MB, by_blocks=hugetlb)],
                           seen.append)
        assert w.check() is None and seen == []
        punch_hole(fd, 0, page)                 # outside the watched range
        if hugetlb:                             # st_blocks is file-wide: seen, spuriously
            assert w.check().how == "blocks"
        else:
            assert w.check() is None
        seen.clear()
        punch_hole(fd, 4 * MB, page)            # inside
        d = w.check()
        assert d is not None and seen == [d] and d.region == 0
        assert d.how == ("blocks" if hugetlb else "hole")
        if hugetlb:
            assert w.check() is None            # re-baselined after the callback
        m.close()
    finally:
        os.close(fd)


HOSTILE_TRUNCATE = r"""
import os, sys, time
from xdpnet.guest.simulator import VirtioNetSimulator
vm = VirtioNetSimulator(sys.argv[1], mac=sys.argv[2], sealable=False, queue_size=256)
vm.connect()
vm.start()
time.sleep(0.3)                      # the backend has posted our rx buffers
os.ftruncate(vm.memory.fd, 0)        # ... and now guest RAM is gone
print("truncated", flush=True)
time.sleep(30)                       # keep the connection; never touch memory again
"""


def test_frontend_truncating_unsealable_memory_stops_the_queue_not_the_backend(tmp_path):
    """A memfd created without MFD_ALLOW_SEALING cannot be sealed: its
    frontend can truncate it under the running datapath.  The SIGBUS is
    caught, the pair is stopped (reason logged), the serve process stays up
    and serves the next frontend."""
    import subprocess
    import sys

    with contextlib.ExitStack() as stack:
        bed = stack.enter_context(Testbed(queues=1, prefix="xm"))
        sock = str(tmp_path / "t.sock")
        srv = stack.enter_context(ServeProcess(bed.nic, sock, mac=VM_MAC))
        srv.wait_ready()
        wire = stack.enter_context(WirePeer(bed, peer_mac=VM_MAC))
        hostile = subprocess.Popen([sys.executable, "-c", HOSTILE_TRUNCATE, sock, VM_MAC],
                                   stdout=subprocess.PIPE, text=True)
        try:
            assert hostile.stdout.readline().strip() == "truncated"
            wire.send(50, 200, flow=5)          # the datapath writes into the vanished RAM
            deadline = time.monotonic() + 5
            while "guest memory vanished" not in srv.stderr_text():
                assert time.monotonic() < deadline, srv.stderr_text()
                assert srv.returncode is None, srv.stderr_text()
                time.sleep(0.1)
        finally:
            hostile.kill()
            hostile.wait()
        assert srv.returncode is None, srv.stderr_text()
        # The backend is still there for a well-behaved VM.
        with VirtioNetSimulator(sock, mac=VM_MAC) as vm:
            vm.connect()
            vm.start()
            time.sleep(0.3)
            wire.send(50, 200, flow=6)
            vm.run(duration=3.0, tx_count=0, rx_count=50)
            assert vm.stats().rx_verified == 50
        assert srv.returncode is None

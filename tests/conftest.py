"""Fixtures shared by several test files."""

from __future__ import annotations

import os
import re

import pytest


def _free_hugepages() -> int:
    with open("/proc/meminfo") as f:
        m = re.search(r"HugePages_Free:\s+(\d+)", f.read())
    return int(m.group(1)) if m else 0


@pytest.fixture
def hugepages():
    """Reserve 40 huge pages for the test and give them back afterwards."""
    path = "/proc/sys/vm/nr_hugepages"
    with open(path) as f:
        before = int(f.read())
    if _free_hugepages() < 32:
        with open(path, "w") as f:
            f.write(str(before + 40))
    try:
        if _free_hugepages() < 32:
            pytest.skip("the kernel refused to reserve 32 free 2 MiB huge pages")
        yield
    finally:
        with open(path, "w") as f:
            f.write(str(before))


def _leftovers() -> set[str]:
    """xdpnet's run-time state on this machine: pins, lock and owner files."""
    out = set()
    for d in ("/sys/fs/bpf/xdpnet", "/run/xdpnet", "/run/xdpnet/testbeds"):
        if os.path.isdir(d):
            out.add(d + "/")
            out.update(os.path.join(d, n) for n in os.listdir(d))
    return out


@pytest.fixture(autouse=True, scope="session")
def nothing_left_behind():
    """After the whole run, nothing of xdpnet's that the run created is
    left: no pins under /sys/fs/bpf/xdpnet, no lock or owner files under
    /run/xdpnet, not even the (empty) directories."""
    before = _leftovers()
    yield
    left = sorted(_leftovers() - before)
    assert not left, f"the test run left these behind: {left}"

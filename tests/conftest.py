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


@pytest.fixture(autouse=True, scope="session")
def nothing_left_behind():
    """After the whole run, nothing of xdpnet's is left for the NICs of the
    test beds this run made: no pins, no lock file, no test-bed owner file;
    and none of xdpnet's run-time directories is left empty.  (Tracking our
    own NICs keeps the check right while other runs use the machine.)"""
    from xdpnet.net import netns
    from xdpnet.steering.programs import PIN_ROOT, pin_dir

    made: list[netns.Testbed] = []
    original = netns.Testbed.__init__

    def recording_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    netns.Testbed.__init__ = recording_init
    try:
        yield
    finally:
        netns.Testbed.__init__ = original
    left = [path for bed in made
            for path in (pin_dir(bed.nic), os.path.join(netns.RUN_DIR, f"{bed.nic}.lock"),
                         os.path.join(netns.OWNER_DIR, bed.netns))
            if os.path.exists(path)]
    left += [d for d in (PIN_ROOT, netns.RUN_DIR, netns.OWNER_DIR)
             if os.path.isdir(d) and not os.listdir(d)]
    assert not left, f"the test run left these behind: {left}"

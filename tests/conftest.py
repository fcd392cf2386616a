"""Fixtures shared by several test files."""

from __future__ import annotations

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

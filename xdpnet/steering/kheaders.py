"""Kernel headers for bcc, and bcc itself.

bcc compiles BPF C against the running kernel's headers.  Where
``/lib/modules/$(uname -r)/build`` exists (a distro kernel with its
headers package) bcc finds them itself and nothing here is needed.  Where
it does not (a custom kernel, as on the machines xdpnet is developed on),
the headers of a Debian kernel package serve: Debian splits them in a
``linux-headers-<ver>-common`` folder (the source tree's headers) and a
``linux-headers-<ver>-<flavour>`` folder (the generated ones).  bcc takes
the first through ``BCC_KERNEL_SOURCE`` and the second through ``-I``
flags.  An XDP program only needs the UAPI and basic types, so headers of
another kernel version are fine.

Nothing here hard-codes a version: the folders are found by glob.
"""

from __future__ import annotations

import glob
import importlib
import os
import platform
import re
from dataclasses import dataclass, field
from types import ModuleType

from xdpnet.errors import DependencyError

SRC_ROOT = "/usr/src"
MODULES_ROOT = "/lib/modules"
KHEADERS_ARCHIVES = ("/sys/kernel/kheaders.tar.xz", "/proc/kheaders.tar.xz")

# platform.machine() -> (Debian architecture, kernel arch/ folder)
_ARCHES = {
    "x86_64": ("amd64", "x86"),
    "aarch64": ("arm64", "arm64"),
    "arm64": ("arm64", "arm64"),
    "ppc64le": ("ppc64el", "powerpc"),
    "s390x": ("s390x", "s390"),
    "riscv64": ("riscv64", "riscv"),
    "i686": ("686", "x86"),
}

FIX_BCC = "install python3-bpfcc and run tools/setup"


@dataclass(frozen=True)
class KernelHeaders:
    """What bcc needs: ``source`` for ``BCC_KERNEL_SOURCE`` (None: leave
    the environment alone) and extra compiler flags."""

    source: str | None = None
    cflags: tuple[str, ...] = field(default_factory=tuple)
    origin: str = ""            # one line: where the headers come from


def import_bcc() -> ModuleType:
    """``import bcc``, or a :class:`DependencyError` saying how to get it."""
    try:
        return importlib.import_module("bcc")
    except Exception as e:  # ImportError, or OSError from libbcc.so.0
        raise DependencyError(
            f"bcc is not importable ({e.__class__.__name__}: {e}): {FIX_BCC}"
        ) from None


def _arch() -> tuple[str, str]:
    m = platform.machine()
    return _ARCHES.get(m, (m, m))


def _version_key(path: str) -> list:
    """Sort key: natural order of the numbers in a folder name."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def _debian_split_headers(src_root: str, deb_arch: str, karch: str
                          ) -> KernelHeaders | None:
    """The newest ``-common`` folder that has a matching arch folder."""
    commons = sorted(glob.glob(os.path.join(src_root, "linux-headers-*-common")),
                     key=_version_key, reverse=True)
    for common in commons:
        if not os.path.isfile(os.path.join(common, "include/linux/kconfig.h")):
            continue
        ver = os.path.basename(common)[: -len("-common")]
        # exact flavour first (…-amd64), then others of the arch (…-cloud-amd64)
        candidates = [f"{ver}-{deb_arch}"] + sorted(
            os.path.basename(p) for p in glob.glob(f"{src_root}/{ver}-*-{deb_arch}"))
        for name in candidates:
            a = os.path.join(src_root, name)
            if not os.path.isdir(os.path.join(a, "arch", karch, "include", "generated")):
                continue
            cflags = (
                f"-I{a}/include",
                f"-I{a}/arch/{karch}/include/generated",
                f"-I{a}/arch/{karch}/include/generated/uapi",
                f"-I{a}/include/generated/uapi",
            )
            return KernelHeaders(source=common, cflags=cflags,
                                 origin=f"{common} + {a}")
    return None


def find_kernel_headers(release: str | None = None,
                        src_root: str = SRC_ROOT,
                        modules_root: str = MODULES_ROOT) -> KernelHeaders:
    """Where bcc finds kernel headers on this machine.

    Order: ``BCC_KERNEL_SOURCE`` already set by the operator (respected);
    ``/lib/modules/<release>/build`` or a kheaders archive (bcc finds them
    itself); Debian's split headers under ``/usr/src``.  Raises
    :class:`DependencyError` when none exists.
    """
    release = release or os.uname().release
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return KernelHeaders(origin="BCC_KERNEL_SOURCE="
                             + os.environ["BCC_KERNEL_SOURCE"])
    build = os.path.join(modules_root, release, "build")
    if os.path.isdir(build):
        return KernelHeaders(origin=build)
    for archive in KHEADERS_ARCHIVES:
        if os.path.exists(archive):
            return KernelHeaders(origin=archive)
    deb_arch, karch = _arch()
    found = _debian_split_headers(src_root, deb_arch, karch)
    if found:
        return found
    raise DependencyError(
        f"no kernel headers for bcc (no {build}, no {src_root}/linux-headers-*): "
        f"apt-get install linux-headers-{deb_arch}"
    )

"""cffi builder for the C datapath in ``c/``.

Installing the package (``pip install .`` or ``-e .``) runs this builder,
which compiles every ``c/*.c`` file into the extension ``xdpnet._native``
linked against libxdp and libbpf.  The declarations handed to
``ffi.cdef()`` are read from the public headers themselves (the text
between the ``cdef begin`` / ``cdef end`` markers), so a structure shared
by C and Python is declared exactly once.
"""

import glob
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CDIR = os.path.normpath(os.path.join(HERE, "..", "c"))

# Public headers whose cdef sections make up the Python-visible API.
PUBLIC_HEADERS = ["xdpnet.h", "frame.h", "guest.h", "wire.h", "tap.h"]

_MARKED = re.compile(r"/\* ---- cdef begin ---- \*/(.*?)/\* ---- cdef end ---- \*/", re.S)


def _cdef_text() -> str:
    """Collect the cdef sections of every public header that exists."""
    parts = []
    for name in PUBLIC_HEADERS:
        path = os.path.join(CDIR, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            m = _MARKED.search(f.read())
        if not m:
            raise RuntimeError(f"{path}: no cdef section")
        parts.append(m.group(1))
    return "\n".join(parts)


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "xdpnet._native",
    "\n".join(f'#include "{h}"' for h in PUBLIC_HEADERS if os.path.exists(os.path.join(CDIR, h))),
    sources=sorted(os.path.relpath(p) for p in glob.glob(os.path.join(CDIR, "*.c"))),
    include_dirs=[CDIR],
    libraries=["xdp", "bpf"],
    extra_compile_args=["-O2", "-g", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-std=gnu11", "-fno-strict-aliasing"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

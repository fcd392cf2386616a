"""Ethernet MAC addresses: parsing, formatting, the u64 form.

The u64 form (:func:`mac_to_u64`) is the one contract for a MAC held in
a number: the six bytes in wire order at the start of a little-endian
u64, the top two bytes zero (``52:54:00:12:34:56`` is ``0x563412005452``).
The C datapath (``c/xdpnet.h``: ``vm_mac``, the local-MAC table) and the
BPF maps (``bpf/xdpnet_maps.h``: the ``vm_macs`` key, ``vms.mac``) use it.
"""

from __future__ import annotations

import re

from xdpnet.errors import UsageError

_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}([:-])(?:[0-9A-Fa-f]{2}\1){4}[0-9A-Fa-f]{2}")


def parse_mac(mac: str | bytes) -> bytes:
    """``"52:54:00:12:34:56"`` (or with ``-``), or 6 bytes -> 6 bytes.

    Raises :class:`UsageError` for anything else.
    """
    if isinstance(mac, (bytes, bytearray)):
        if len(mac) != 6:
            raise UsageError(f"malformed MAC address {bytes(mac)!r}: a MAC has 6 bytes")
        return bytes(mac)
    if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac.strip()):
        raise UsageError(f"malformed MAC address {mac!r} (expected aa:bb:cc:dd:ee:ff)")
    text = mac.strip()
    return bytes.fromhex(text.replace(text[2], ""))


def format_mac(mac: bytes) -> str:
    """6 bytes -> ``"52:54:00:12:34:56"``."""
    if len(mac) != 6:
        raise UsageError(f"a MAC address has 6 bytes, not {len(mac)}")
    return ":".join(f"{b:02x}" for b in mac)


def is_multicast(mac: bytes) -> bool:
    """Group bit set (broadcast included)."""
    return bool(mac[0] & 1)


def vm_mac(mac: str | bytes) -> bytes:
    """A VM's MAC as 6 bytes: well formed, unicast, not all zero
    (:class:`UsageError` otherwise)."""
    b = parse_mac(mac)
    if is_multicast(b):
        raise UsageError(f"{format_mac(b)} is a multicast/broadcast address, not a VM's MAC")
    if b == bytes(6):
        raise UsageError("00:00:00:00:00:00 is not a VM's MAC")
    return b


def mac_to_u64(mac: str | bytes) -> int:
    """The u64 form of *mac*: its 6 bytes in wire order at the start of a
    little-endian u64 (see the module docstring)."""
    return int.from_bytes(parse_mac(mac) + b"\0\0", "little")


def u64_to_mac(value: int) -> bytes:
    """The inverse of :func:`mac_to_u64`."""
    return value.to_bytes(8, "little")[:6]


__all__ = ["format_mac", "is_multicast", "mac_to_u64", "parse_mac", "u64_to_mac", "vm_mac"]

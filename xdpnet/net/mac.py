"""Ethernet MAC addresses: parsing and formatting."""

from __future__ import annotations

import re

from xdpnet.errors import UsageError

_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}([:-])(?:[0-9A-Fa-f]{2}\1){4}[0-9A-Fa-f]{2}")


def parse_mac(text: str) -> bytes:
    """``"52:54:00:12:34:56"`` (or with ``-``) -> 6 bytes.

    Raises :class:`UsageError` for anything else.
    """
    if not isinstance(text, str) or not _MAC_RE.fullmatch(text.strip()):
        raise UsageError(f"malformed MAC address {text!r} (expected aa:bb:cc:dd:ee:ff)")
    return bytes.fromhex(text.strip().replace(text.strip()[2], ""))


def format_mac(mac: bytes) -> str:
    """6 bytes -> ``"52:54:00:12:34:56"``."""
    if len(mac) != 6:
        raise UsageError(f"a MAC address has 6 bytes, not {len(mac)}")
    return ":".join(f"{b:02x}" for b in mac)


def is_multicast(mac: bytes) -> bool:
    """Group bit set (broadcast included)."""
    return bool(mac[0] & 1)

"""
The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2)
that the client writes first on a local connection, so that the local
service sees the user's real address instead of the client's.

The server tells our client the user's address and the public address the
user reached (see L{gotunnel.wire.messages.RegisterResp.user_host}); a Go server
tells nothing, and then the header says so: C{PROXY UNKNOWN} (v1) or a
LOCAL command (v2), which a service takes as "use the connection's own
addresses".
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Optional, Union

VERSIONS = ("v1", "v2")

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
"""The 12 bytes every version 2 header starts with."""

Address = tuple[str, int]
IP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def parseVersion(text: str, what: str) -> str:
    """C{v1} or C{v2} (also written 1 or 2); ValueError naming C{what} otherwise."""
    version = str(text).strip().lower()
    if version in ("1", "2"):
        version = "v" + version
    if version not in VERSIONS:
        raise ValueError(f"{what} must be v1 or v2, got {text!r}")
    return version


def _ip(host: str) -> Optional[IP]:
    """C{host} as an IP address (an IPv4-mapped IPv6 one as IPv4), or None."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _addresses(source: Optional[Address],
               destination: Optional[Address]) -> Optional[tuple[IP, int, IP, int]]:
    """Both addresses as IPs of one family, or None if either is missing or not an IP."""
    if source is None or destination is None:
        return None
    src, dst = _ip(source[0]), _ip(destination[0])
    if src is None or dst is None:
        return None
    if src.version != dst.version:
        # A user over IPv4 on a dual-stack listener reached an IPv6 address
        # (or the other way round): both as IPv6, IPv4 ones mapped.
        src = src if src.version == 6 else ipaddress.IPv6Address(f"::ffff:{src}")
        dst = dst if dst.version == 6 else ipaddress.IPv6Address(f"::ffff:{dst}")
    return src, source[1], dst, destination[1]


def header(version: str, source: Optional[Address], destination: Optional[Address]) -> bytes:
    """
    The PROXY header of C{version} ("v1" or "v2") for a connection from
    C{source} to C{destination} (host, port); one that says the addresses
    are unknown when either is None or not an IP address.
    """
    addresses = _addresses(source, destination)
    if version == "v1":
        if addresses is None:
            return b"PROXY UNKNOWN\r\n"
        src, sport, dst, dport = addresses
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode("ascii")
    if addresses is None:
        # Version 2, command LOCAL, family UNSPEC, no addresses.
        return V2_SIGNATURE + b"\x20\x00\x00\x00"
    src, sport, dst, dport = addresses
    family = b"\x11" if src.version == 4 else b"\x21"  # TCP over IPv4 / IPv6
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + b"\x21" + family + struct.pack("!H", len(body)) + body

"""
What we read of Twisted's private attributes, in one place, so that a new
Twisted that changes them breaks here, where it is easy to see.
"""

from __future__ import annotations

from typing import Optional


def endpointHost(endpoint: object) -> Optional[str]:
    """The host a TCP client endpoint connects to (Twisted keeps it to itself)."""
    host = getattr(endpoint, "_host", None)
    if isinstance(host, bytes):
        host = host.decode("ascii")
    return host or None

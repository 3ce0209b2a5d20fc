"""
The server's refusals of a registration that asking again will not change,
what must change first, and the exit status of a client that gives up on
one (C{exit_on_refusal}).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

EXIT_AUTHENTICATION_FAILED = 3
EXIT_PORT_NOT_ALLOWED = 4
EXIT_PORT_TAKEN = 5
EXIT_PORT_BUSY = 6


@dataclass(frozen=True)
class LastingRefusal:
    """A refusal that repeats until C{until} (a clause that ends a sentence) changes."""

    exit_status: int
    until: str


# The reasons our server sends (gotunnel/server/), and the Go server's
# "authentication failed".
_LASTING = [
    (re.compile(r"authentication failed$"),
     LastingRefusal(EXIT_AUTHENTICATION_FAILED,
                    "the client's token is the server's (client.token, --token)")),
    (re.compile(r"client name .* is not the name in the client's certificate"),
     LastingRefusal(EXIT_AUTHENTICATION_FAILED,
                    "the client's name is its certificate's (drop --name, or change it)")),
    (re.compile(r"remote port (\d+) is not allowed"),
     LastingRefusal(EXIT_PORT_NOT_ALLOWED,
                    "the server allows port {port} (server.allow_ports) or the client asks "
                    "for another remote port")),
    (re.compile(r"too many mappings for client"),
     LastingRefusal(EXIT_PORT_NOT_ALLOWED,
                    "the client's other mappings end or the server's limit is raised "
                    "(max_mappings_per_client)")),
    (re.compile(r"remote port (\d+) is already taken by another client"),
     LastingRefusal(EXIT_PORT_TAKEN,
                    "the other client releases port {port} or this one asks for another "
                    "remote port")),
    (re.compile(r"cannot listen on port (\d+):"),
     LastingRefusal(EXIT_PORT_BUSY,
                    "port {port} is free on the server's machine, and one the server may "
                    "bind (another program holds it, or it is below 1024)")),
]


def lastingRefusal(reason: str) -> Optional[LastingRefusal]:
    """
    What the server's refusal C{reason} needs before asking again can
    succeed, or None for a refusal that may pass by itself.
    """
    for pattern, refusal in _LASTING:
        match = pattern.match(reason)
        if match is not None:
            port = match.group(1) if pattern.groups else ""
            return LastingRefusal(refusal.exit_status, refusal.until.format(port=port))
    return None

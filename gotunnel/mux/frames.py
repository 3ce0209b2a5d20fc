"""
The frames of the C{mux} extension (see docs/protocol.md): yamux's
12-byte header, its frame types and flags, and the window each stream
starts with.  L{gotunnel.mux.session} reads and writes them.
"""

from __future__ import annotations

import struct

VERSION = 0
DATA, WINDOW_UPDATE, PING, GO_AWAY = 0, 1, 2, 3
SYN, ACK, FIN, RST = 1, 2, 4, 8
HEADER = struct.Struct(">BBHII")

WINDOW = 256 * 1024
"""Each stream's initial window, both ways: what a peer may send it unread."""


class MuxError(Exception):
    """The peer broke the framing; the session closes."""

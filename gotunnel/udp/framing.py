"""
The frames of a UDP mapping's carrying channel (the udp extension,
docs/protocol.md): C{[2-byte payload length][4-byte peer id][payload]}, one
datagram each, both ways.  Peer id 0 is never given.
"""

from __future__ import annotations

import struct
from typing import Callable, Optional

HEADER = struct.Struct(">HI")
"""A frame's header: the payload's length, then the peer id."""

MAX_DATAGRAM = 65527
"""The largest UDP payload (65,535 less the 8-byte UDP header; IPv4's own
limit is 65,507).  A frame announcing more closes the carrying channel."""

MAX_PEER_ID = 0xFFFFFFFF


def encodeFrame(peer_id: int, payload: bytes) -> bytes:
    """One frame of the carrying channel."""
    return HEADER.pack(len(payload), peer_id) + payload


class FrameDecoder:
    """
    Cuts a carrying channel's byte stream into datagrams.  It holds at most
    one partial frame.
    """

    def __init__(self, deliver: Callable[[int, bytes], None]) -> None:
        self.deliver = deliver
        self._buffer = b""

    def feed(self, data: bytes,
             deliver: Optional[Callable[[int, bytes], None]] = None) -> Optional[str]:
        """
        Deliver every whole frame in what has come so far (to C{deliver},
        if given, instead of the decoder's own); a sentence saying what is
        wrong if a frame breaks the protocol (the channel must close).
        """
        buffer = self._buffer + data if self._buffer else data
        size = len(buffer)
        offset = 0
        if deliver is None:
            deliver = self.deliver
        while size - offset >= HEADER.size:
            length, peer_id = HEADER.unpack_from(buffer, offset)
            if length > MAX_DATAGRAM:
                self._buffer = b""
                return f"a datagram frame of {length} bytes is over the limit of {MAX_DATAGRAM}"
            if peer_id == 0:
                self._buffer = b""
                return "a datagram frame with peer id 0"
            end = offset + HEADER.size + length
            if end > size:
                break
            deliver(peer_id, buffer[offset + HEADER.size:end])
            offset = end
        self._buffer = buffer[offset:]
        return None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

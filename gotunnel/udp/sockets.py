"""
The UDP sockets of a UDP mapping (the server's public port, the client's
sessions): whole datagrams read, kernel buffers enlarged, reads in batches.
"""

from __future__ import annotations

import socket

from gotunnel.relay.tcpinternals import aroundEachRead

READ_SIZE = 65536
"""What every UDP socket of ours reads at once: a whole datagram, never cut
(Twisted reads 8,192 bytes unless told)."""

PUBLIC_SOCKET_BUFFER = 4 * 1024 * 1024
"""What we ask the kernel to buffer for a public UDP port, each way (it gives
at most net.core.rmem_max / wmem_max): a burst from many peers waits there
while the reactor is busy, rather than being dropped."""

SESSION_SOCKET_BUFFER = 256 * 1024
"""The same for a client session's socket, one per peer: smaller, as there
may be a thousand, and each carries one peer's replies."""


def enlargeBuffers(port, size: int) -> None:
    """Ask for C{size} bytes of kernel buffer on a UDP port's socket, each way."""
    handle = getattr(port, "socket", None)
    if handle is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            handle.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError:
            pass


def readInBatches(port, batch) -> None:
    """
    Call C{batch.batchStarted()} before and C{batch.batchEnded()} after each
    of C{port}'s reads: Twisted reads a UDP socket until it is empty (up to
    256 KiB), so that is one burst of datagrams, written on in one send
    (L{gotunnel.udp.carrier.Carrier.cork}).  A port without C{doRead} (a
    test's) is read as it is.
    """
    aroundEachRead(port, batch.batchStarted, batch.batchEnded)

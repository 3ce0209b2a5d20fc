"""
Writing to a TCP socket in the same turn of the reactor.

Twisted's C{transport.write} buffers and sends at the reactor's next turn:
an epoll round and two epoll_ctl calls for every write.  A tunnel adds two
hops to every round trip, so that turn counts (about a fifth of the round
trip through the tunnel, gotunnelbench rtt with zero copy off, and of the
relay's CPU per byte).  L{writeThrough} hands the bytes to the kernel at
once when nothing waits ahead of them, and leaves the rest to Twisted.
"""

from __future__ import annotations

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor


def twistedBuffered(transport: FileDescriptor) -> int:
    """How many bytes C{transport}'s own write buffer still holds."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def writeThrough(transport: object, data: bytes) -> None:
    """
    Write C{data} to C{transport}, sending at once what a plain TCP socket
    takes when nothing is queued before it; the rest, and everything on
    other transports (TLS included), goes through C{transport.write}, which
    also reports errors.
    """
    # transport.TLS: a TCP connection after startTLS (ssl: endpoints), whose
    # bytes must go through the TLS layer.
    if (isinstance(transport, tcp.Connection) and not transport.TLS and transport.connected
            and not transport.disconnecting and not transport._writeDisconnecting
            and not transport._writeDisconnected and not twistedBuffered(transport)):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)

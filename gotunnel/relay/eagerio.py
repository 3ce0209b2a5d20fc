"""
Reading and writing a TCP socket in the same turn of the reactor.

Twisted's C{transport.write} buffers and sends at the reactor's next turn:
an epoll round and two epoll_ctl calls for every write.  A tunnel adds two
hops to every round trip, so that turn counts (about a fifth of the round
trip through the tunnel, gotunnelbench rtt with zero copy off, and of the
relay's CPU per byte).  L{writeThrough} hands the bytes to the kernel at
once when nothing waits ahead of them, and leaves the rest to Twisted.

L{readWaiting} is the same for a read: what a socket already holds, taken
now rather than at the next turn, behind whatever else is ready then.
"""

from __future__ import annotations

from twisted.internet import tcp

from gotunnel.relay.tcpinternals import twistedBuffered, writeDisconnected, writeDisconnecting

READ_SIZE = 65536
"""The most L{readWaiting} takes, as much as Twisted's own reads take."""


def plainSocket(transport: object) -> bool:
    """
    Whether C{transport} is a connected TCP socket whose bytes are the
    stream itself, with no TLS layer above it, and still open both ways.
    """
    # transport.TLS: a TCP connection after startTLS (ssl: endpoints), whose
    # bytes must go through the TLS layer.
    return (isinstance(transport, tcp.Connection) and not transport.TLS and transport.connected
            and not transport.disconnecting and not writeDisconnecting(transport)
            and not writeDisconnected(transport))


def writeThrough(transport: object, data: bytes) -> None:
    """
    Write C{data} to C{transport}, sending at once what a plain TCP socket
    takes when nothing is queued before it; the rest, and everything on
    other transports (TLS included), goes through C{transport.write}, which
    also reports errors.
    """
    if plainSocket(transport) and not twistedBuffered(transport):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


def readWaiting(transport: object) -> bytes:
    """
    What a plain TCP socket has already received, read now whether or not
    its transport is reading; b"" if it has nothing, if it is at
    end-of-stream, or if it is any other kind of transport.

    An end-of-stream stays in the socket for the reactor to read.  An error
    (a reset) is raised: the read consumed it, and the reactor would then
    see only an end-of-stream, so the caller must pass it on.
    """
    if not plainSocket(transport):
        return b""
    try:
        return transport.socket.recv(READ_SIZE)
    except BlockingIOError:
        return b""

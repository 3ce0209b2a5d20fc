"""
What we read of Twisted's private attributes and names, in one place, so
that a new Twisted that changes them breaks here, where it is easy to see,
and L{missingForZeroCopy} can tell at start-up.

The self-check has been run on the Twisted versions listed in setup.cfg.
"""

from __future__ import annotations

import socket
from typing import Optional

ZERO_COPY_NEEDS = ("dataBuffer", "offset", "_tempDataLen", "_writeDisconnecting",
                   "_writeDisconnected", "doRead", "doWrite", "fileno", "reactor")
"""What zero copy (and writing through in the same turn) reads or replaces
on a C{tcp.Connection}: its write buffer, its half-close state, and the
read and write handlers a L{gotunnel.relay.zerocopy.SplicePump} takes over."""


def missingForZeroCopy(connection: Optional[object] = None) -> list[str]:
    """
    The names of L{ZERO_COPY_NEEDS} that C{connection} lacks; by default, a
    C{tcp.Connection} made on one end of a socket pair (some of the
    attributes are set by its constructor, not held by its class).
    """
    if connection is not None:
        return [name for name in ZERO_COPY_NEEDS if not hasattr(connection, name)]
    # Here, not at the top: gotunnel.logs imports this module while the
    # options are parsed, before a plain run leaves pyOpenSSL out, and
    # twisted.internet.tcp loads it if it can.
    from twisted.internet import tcp

    ours, theirs = socket.socketpair()
    try:
        return missingForZeroCopy(tcp.Connection(ours, None, reactor=object()))
    finally:
        ours.close()
        theirs.close()


def twistedBuffered(transport: object) -> int:
    """How many bytes C{transport}'s own write buffer still holds."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def writeDisconnecting(transport: object) -> bool:
    """Whether C{transport} is half-closing (loseWriteConnection was called)."""
    return transport._writeDisconnecting


def writeDisconnected(transport: object) -> bool:
    """Whether C{transport} has half-closed."""
    return transport._writeDisconnected


def endpointHost(endpoint: object) -> Optional[str]:
    """The host a TCP client endpoint connects to (Twisted keeps it to itself)."""
    host = getattr(endpoint, "_host", None)
    if isinstance(host, bytes):
        host = host.decode("ascii")
    return host or None


def endpointPort(endpoint: object) -> int:
    """The port a TCP client endpoint connects to."""
    return endpoint._port


def endpointBindAddress(endpoint: object) -> object:
    """The address a TCP client endpoint binds to before it connects, or None."""
    return endpoint._bindAddress


def endpointTimeout(endpoint: object, default: float) -> float:
    """The connect timeout of a client endpoint, or C{default} if it has none."""
    return getattr(endpoint, "_timeout", default)


CLIENT_SERVICE_NAMESPACE = "twisted.application._client_service"
"""The log namespace of ClientService's own events (a private module's name)."""


def twistdLogObserver(options: object) -> object:
    """
    The observer twistd would make from its C{options} (--logfile, --syslog,
    --nodaemon, the platform's defaults).  Both names are private to twistd;
    tests/test_cli.py runs twistd to catch a change.
    """
    from twisted.scripts.twistd import _SomeApplicationRunner

    return _SomeApplicationRunner.loggerFactory(options)._getLogObserver()

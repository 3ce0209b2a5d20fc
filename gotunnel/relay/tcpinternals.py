"""
What we read of Twisted's private attributes and names, and every place we
put a method of our own on one of Twisted's transports, in one module, so
that a new Twisted that changes them breaks here, where it is easy to see,
and L{missingForZeroCopy} can tell at start-up.

The self-check has been run on the Twisted versions listed in setup.cfg.
"""

from __future__ import annotations

import socket
from typing import Callable, Iterator, Optional

ZERO_COPY_READS = {
    "twistedBuffered": ("dataBuffer", "offset", "_tempDataLen"),
    "writeDisconnecting": ("_writeDisconnecting",),
    "writeDisconnected": ("_writeDisconnected",),
    "takeOverIO": ("doRead", "doWrite"),
    "twistedDoWrite": ("doWrite",),
}
"""Each function here that zero copy (and writing through in the same turn)
uses on a C{tcp.Connection}, and what it reads or replaces there: its write
buffer, its half-close state, the read and write handlers a
L{gotunnel.relay.zerocopy.SplicePump} takes over."""

ZERO_COPY_NEEDS = tuple(dict.fromkeys(
    name for names in ZERO_COPY_READS.values() for name in names))
"""The attributes of L{ZERO_COPY_READS}, each once, in order."""


def missingForZeroCopy(connection: Optional[object] = None) -> list[str]:
    """
    The names of L{ZERO_COPY_NEEDS} that C{connection} lacks, and then the
    functions of L{ZERO_COPY_READS} that fail on it, or give what they
    should not (see L{_tryEach}); by default, a C{tcp.Connection} made on
    one end of a socket pair (some of the attributes are set by its
    constructor, not held by its class).
    """
    if connection is not None:
        missing = [name for name in ZERO_COPY_NEEDS if not hasattr(connection, name)]
        return missing or _tryEach(connection)
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


def _tryEach(connection: object) -> list[str]:
    """
    Run each function of L{ZERO_COPY_READS} on a fresh C{connection}: the
    names of those that raise, or whose answer is not a fresh connection's
    (nothing buffered, open both ways, our handlers in place and then gone).
    """
    failed = []

    def check(name: str, works: Callable[[], bool]) -> None:
        try:
            if not works():
                failed.append(name)
        except Exception:
            failed.append(name)

    def takenAndGivenBack() -> bool:
        def doRead() -> None:
            return None

        def doWrite() -> None:
            return None

        takeOverIO(connection, doRead, doWrite)
        taken = connection.doRead is doRead and connection.doWrite is doWrite
        giveBackIO(connection, doRead, doWrite)
        return taken and connection.doRead is not doRead and connection.doWrite is not doWrite

    check("twistedBuffered", lambda: twistedBuffered(connection) == 0)
    check("writeDisconnecting", lambda: writeDisconnecting(connection) is False)
    check("writeDisconnected", lambda: writeDisconnected(connection) is False)
    check("takeOverIO", takenAndGivenBack)
    check("twistedDoWrite", lambda: callable(type(connection).doWrite))
    return failed


def twistedBuffered(transport: object) -> int:
    """How many bytes C{transport}'s own write buffer still holds."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def heldByTwisted(transport: object) -> int:
    """L{twistedBuffered}, or 0 for a transport without Twisted's write buffer."""
    return twistedBuffered(transport) if hasattr(transport, "dataBuffer") else 0


def writeDisconnecting(transport: object) -> bool:
    """Whether C{transport} is half-closing (loseWriteConnection was called)."""
    return transport._writeDisconnecting


def writeDisconnected(transport: object) -> bool:
    """Whether C{transport} has half-closed."""
    return transport._writeDisconnected


def takeOverIO(transport: object, doRead: Callable, doWrite: Callable) -> None:
    """
    Have the reactor call C{doRead} and C{doWrite} for C{transport}'s
    socket instead of the transport's own (the reactor looks them up on
    the transport at each event).
    """
    transport.doRead = doRead
    transport.doWrite = doWrite


def giveBackIO(transport: object, doRead: Callable, doWrite: Callable) -> None:
    """
    Undo L{takeOverIO}: C{transport}'s own C{doRead} and C{doWrite} again,
    each unless something else has since put its own in place of ours.
    """
    attributes = vars(transport)
    for name, ours in (("doRead", doRead), ("doWrite", doWrite)):
        if attributes.get(name) == ours:
            del attributes[name]


def twistedDoWrite(transport: object) -> object:
    """
    Run C{transport}'s own C{doWrite} (Twisted's, not the one
    L{takeOverIO} put in its place): write what Twisted buffered, finish a
    half-close or a close.
    """
    return type(transport).doWrite(transport)


GUARDED = ("write", "writeSequence", "loseConnection", "loseWriteConnection",
           "abortConnection", "startReading", "startWriting", "stopReading", "stopWriting",
           "pauseProducing", "resumeProducing", "stopProducing")
"""The TCP transport methods that L{gotunnel.relay.tlspump.TLSPump} replaces,
while its splice thread holds the pump, with ones that take the pump back
first.  (A zero-copy pump replaces none: the relay asks it, see
L{gotunnel.relay.splice.RelayEnd.closeConnection}.)"""


def aroundEachRead(port: object, before: Callable[[], None], after: Callable[[], None]) -> bool:
    """
    Call C{before} and C{after} around each of C{port}'s C{doRead}s; False
    (nothing done) for a port without one (a test's).
    """
    doRead = getattr(port, "doRead", None)
    if doRead is None:
        return False

    def doReadBetween():
        before()
        try:
            return doRead()
        finally:
            after()

    port.doRead = doReadBetween
    return True


def wrappedEndpoints(endpoint: object) -> Iterator[object]:
    """C{endpoint}, then the endpoint it wraps (a tls: endpoint's TCP one), and so on."""
    while endpoint is not None:
        yield endpoint
        endpoint = getattr(endpoint, "_wrappedEndpoint", None)


def endpointAddress(endpoint: object) -> Optional[tuple[str, int]]:
    """
    The host and port a client endpoint connects to, looked for through
    its wrappers; None where Twisted's endpoint does not tell.
    """
    for each in wrappedEndpoints(endpoint):
        host = getattr(each, "_hostText", None) or getattr(each, "_host", None)
        port = getattr(each, "_port", None)
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        if host and isinstance(port, int):
            return host, port
    return None


def listeningPort(endpoint: object) -> Optional[int]:
    """The port a server endpoint (or one it wraps) listens on, or None if it does not tell."""
    for each in wrappedEndpoints(endpoint):
        port = getattr(each, "_port", None)
        if isinstance(port, int):
            return port
    return None


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


HALF_CLOSE_TLS_OVERRIDES = ("_flushReceiveBIO", "_checkHandshakeStatus",
                            "_unbufferPendingWrites", "_write", "_shutdownTLS",
                            "_flushSendBIO", "_tlsShutdownFinished")
"""The private methods of Twisted's C{TLSMemoryBIOProtocol} that
L{gotunnel.tls.halfclose.HalfCloseableTLS}, a subclass, overrides or
calls (it reads some of its attributes too, set per connection)."""


def missingForHalfCloseTLS() -> list[str]:
    """The names of L{HALF_CLOSE_TLS_OVERRIDES} the installed Twisted lacks."""
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    return [name for name in HALF_CLOSE_TLS_OVERRIDES
            if not callable(getattr(TLSMemoryBIOProtocol, name, None))]


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

"""
The client's multiplexed data connection (the C{mux} extension, see
docs/protocol.md): one connection to the server per mapping, whose streams
the server opens one per user; each is spliced to a new connection to the
local service.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from gotunnel.wire import messages
from gotunnel.wire.framing import MessageReceiver
from gotunnel.mux.session import MuxSession
from gotunnel.mux.stream import MuxStream, StreamEnd
from gotunnel.wire.printable import printable
from gotunnel.relay.splice import RelayEnd, setKeepAlive, setNoDelay, splice
from gotunnel.relay.tcpinternals import heldByTwisted

log = Logger(namespace="gotunnel.muxclient")

MAX_OPEN_STREAMS = 16384
"""
The streams a multiplexed connection holds at once; the server's further
ones are reset.  Each is a connection to the local service: a server that
opens streams without end (hostile or broken) must not take every
descriptor of ours, nor flood the service.
"""

REFUSED_STREAMS_LOG_INTERVAL = 10.0
"""Seconds between two lines about streams refused."""


class MuxDataChannel(MessageReceiver):
    """
    A mapping's multiplexed data connection: a C{data_channel} with C{mux},
    then, once the server accepts it, yamux frames both ways.
    """

    session: Optional[MuxSession] = None
    maxStreams = MAX_OPEN_STREAMS
    refusedStreams = 0
    """Streams the server opened that we reset: too many open, or being connected."""
    _refusedUnlogged = 0
    _refusedLogCall = None
    _connectingWaiting = False

    def __init__(self, tunnel) -> None:
        self.tunnel = tunnel
        self.connecting: set[MuxStream] = set()
        """Streams whose connection to the local service is being made."""
        self.waiting: deque[StreamEnd] = deque()
        """Streams accepted whose connection waits for one of L{connecting} to be made."""

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        setKeepAlive(self.transport)
        self.tunnel.connections.add(self)
        mapping, settings = self.tunnel.mapping, self.tunnel.settings
        self.sendMessage(messages.DataChannel(
            local_port=mapping.local_port, remote_port=mapping.remote_port, protocol="",
            token=settings.token, name=settings.name, mux=1))

    def msg_register_resp(self, msg: messages.RegisterResp) -> None:
        if not msg.ok:
            log.warn("the server refused the multiplexed data connection of {mapping}: "
                     "{reason}; using a data channel per user",
                     mapping=str(self.tunnel.mapping), reason=printable(msg.reason))
            self.tunnel.muxRefused(self)
            self.transport.loseConnection()
            return
        self.switchToRaw()
        self.session = MuxSession(self.tunnel.reactor, opens=False, accept=self._accept,
                                  admit=self._admit)
        self.session.start(self.transport)
        if self.tunnel.muxChannel is not self:
            # The control channel went while the server answered.
            self.session.goAway()

    def rawDataReceived(self, data: bytes) -> None:
        self.session.dataReceived(data)

    def _admit(self) -> bool:
        """Whether the server may open one more stream: at most L{maxStreams} at once."""
        if len(self.session.streams) >= self.maxStreams:
            self._refused()
            return False
        return True

    def _refused(self) -> None:
        self.refusedStreams += 1
        self._refusedUnlogged += 1
        if self._refusedLogCall is None:
            self._logRefused()

    def _logRefused(self) -> None:
        # One line at the first refusal, then at most one per interval: a
        # flood of streams must not become a flood of lines.
        count, self._refusedUnlogged = self._refusedUnlogged, 0
        if not count or self.session is None or self.session.closed:
            self._refusedLogCall = None
            return
        log.warn("reset {count} streams the server opened for {mapping} ({total} in all): "
                 "{open} streams are open, the most a multiplexed connection takes",
                 count=count, total=self.refusedStreams, mapping=str(self.tunnel.mapping),
                 open=len(self.session.streams))
        self._refusedLogCall = self.tunnel.reactor.callLater(
            REFUSED_STREAMS_LOG_INTERVAL, self._logRefused)

    def _accept(self, stream: MuxStream) -> None:
        end = StreamEnd(stream)
        end.holdReading()
        if len(self.waiting) >= len(self.session.streams):
            # Some wait no more (reset by the server meanwhile): a server
            # that opens and resets streams without end must not grow this.
            self.waiting = deque(e for e in self.waiting if not e.transport.closed)
        self.waiting.append(end)
        self._connectWaiting()

    def _connectWaiting(self) -> None:
        """
        Connect waiting streams to the local service, at most
        C{max_pending_data_channels} at once as for data channels: a burst
        of users reaches the service in turn, and a server that opens
        streams without end holds a bounded number of our connects.
        """
        if self._connectingWaiting:
            # A connect that failed at once, inside the loop below.
            return
        self._connectingWaiting = True
        try:
            limit = self.tunnel.settings.max_pending_data_channels
            while self.waiting and len(self.connecting) < limit:
                end = self.waiting.popleft()
                stream = end.transport
                if stream.closed:
                    continue
                self.connecting.add(stream)
                connecting = self.tunnel.localEndpoint.connect(_LocalFactory(self.tunnel, end))
                connecting.addBoth(self._connected, stream)
                connecting.addErrback(self._localUnreachable, stream)
        finally:
            self._connectingWaiting = False

    def _connected(self, result, stream: MuxStream):
        self.connecting.discard(stream)
        self._connectWaiting()
        return result

    def _localUnreachable(self, failure, stream: MuxStream) -> None:
        log.warn("local service {host}:{port} is unreachable ({why}); closing the user's "
                 "connection", host=self.tunnel.mapping.local_host,
                 port=self.tunnel.mapping.local_port, why=failure.getErrorMessage())
        stream.abortConnection()

    def goAway(self) -> None:
        """No new users: close once the streams have ended."""
        if self.session is not None:
            self.session.goAway()
        elif self.transport is not None:
            self.transport.loseConnection()

    def bufferedBytes(self) -> int:
        """What this connection and its streams hold, not yet written."""
        held = heldByTwisted(self.transport)
        return held + (self.session.bufferedBytes() if self.session is not None else 0)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def closeConnection(self, abort: bool = False) -> None:
        """Close the connection (its streams are reset), as L{closeConnectionOf} asks."""
        if self.session is not None:
            self.session.close(abort)
        elif abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.tunnel.connections.discard(self)
        if self._refusedLogCall is not None and self._refusedLogCall.active():
            self._refusedLogCall.cancel()
        self._refusedLogCall = None
        self.waiting.clear()
        if self.session is not None:
            self.session.connectionLost()
        self.tunnel.muxLost(self)


class _LocalConnection(Protocol, RelayEnd):
    """A connection to the local service for one stream."""

    def __init__(self, tunnel, end: StreamEnd) -> None:
        self.tunnel = tunnel
        self.end = end

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        if self.end.transport.closed:
            # The user went while we connected.
            self.transport.loseConnection()
            return
        self.tunnel.connections.add(self)
        splice(self.end, self, zeroCopy=False)

    def dataReceived(self, data: bytes) -> None:
        self.relayReceived(data)

    def connectionLost(self, reason=None) -> None:
        self.tunnel.connections.discard(self)
        self.relayConnectionLost(reason)


class _LocalFactory(Factory):
    noisy = False

    def __init__(self, tunnel, end: StreamEnd) -> None:
        self.tunnel = tunnel
        self.end = end

    def buildProtocol(self, addr) -> _LocalConnection:
        return _LocalConnection(self.tunnel, self.end)

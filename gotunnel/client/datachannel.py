"""
One user's data channel on the client and its connection to the local
service, spliced once the server has answered; how far a data channel has
come is its state (L{gotunnel.client.datachannelstates}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from gotunnel.client import datachannelstates
from gotunnel.wire import messages
from gotunnel.server.accounting import REFUSED, SERVICE_CLOSED, endingOf, noteEnding
from gotunnel.wire.framing import MessageReceiver
from gotunnel.relay.splice import RelayEnd, isReset, setKeepAlive, setNoDelay

if TYPE_CHECKING:
    from gotunnel.client.mapping import ClientMappingService

log = Logger(namespace="gotunnel.client")


class DataChannelClient(MessageReceiver, RelayEnd):
    """
    One data channel and its connection to the local service, opened
    together when the server asks for a data channel: the data channel says
    which user it is for, and once the server accepts it and the local
    connection is up, the two are spliced.  Connecting to the local service
    while the server answers takes a round trip off every user's setup.

    A pooled data channel (C{request} None) is opened ahead of any user and
    waits at the server; the server's answer comes with the next user, and
    only then is the local service connected to (a service sees no idle
    connections of ours).

    Whichever side fails takes the other down with it: a local service that
    refuses closes the data channel (and so the server closes the user), and
    a data channel that fails or is refused closes the local connection.

    Beyond L{gotunnel.client.datachannelrequests.EARLY_LOCAL_CONNECTS} such
    early connections at once, the local connection waits for the server's
    answer instead.

    How far it has come (connecting, asking, answered, spliced, refused,
    closed) is its L{state} object (see L{gotunnel.client.datachannelstates}).
    """

    localConnecting: Optional[defer.Deferred] = None
    local: Optional["LocalServiceConnection"] = None
    answerTimeout = None
    early = False
    """This channel holds one of its mapping's early local connections."""
    proxyHeader = b""
    """The PROXY protocol header to write first on the local connection."""
    servedLocal: Optional["LocalServiceConnection"] = None
    """The local connection this channel was spliced to."""
    endedBy: Optional[str] = None
    """How the user's connection ended (L{gotunnel.server.accounting.ENDINGS})."""

    def __init__(self, tunnel: "ClientMappingService",
                 request: Optional[messages.OpenDataChannel]) -> None:
        self.tunnel = tunnel
        self.request = request
        self.startedAt = tunnel.reactor.seconds()
        self.state: datachannelstates.DataChannelState = datachannelstates.Connecting(self)

    @property
    def pooled(self) -> bool:
        return self.request is None

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        # Pooled or not: a server that vanishes silently must not hold this
        # channel, and the local connection spliced to it, forever.
        setKeepAlive(self.transport)
        self.tunnel.connections.add(self)
        self.state.connected()

    def unanswered(self) -> None:
        self.answerTimeout = None
        log.warn("the server did not answer a data channel for {mapping} within {seconds:g} s; "
                 "closing it", mapping=str(self.tunnel.mapping),
                 seconds=self.tunnel.settings.register_timeout)
        self.transport.abortConnection()

    def answered(self) -> None:
        if self.answerTimeout is not None and self.answerTimeout.active():
            self.answerTimeout.cancel()
        self.answerTimeout = None
        self.tunnel.dataChannelAnswered(self)

    def messageReceived(self, message: messages.Message) -> None:
        self.state.messageReceived(message)

    def connectEarly(self) -> None:
        """Connect to the local service now, ahead of the server's answer."""
        self.state.connectEarly()

    def connectLocal(self) -> None:
        """Start the connection to the local service."""
        self.localConnecting = self.tunnel.connectLocal(self)
        self.localConnecting.addErrback(self._localUnreachable)

    def replaceInPool(self) -> None:
        # The replacement is asked for once the user's connection is set up,
        # not when the server hands this channel a user: its connect would
        # go ahead of the local connection's.
        if self.pooled:
            self.tunnel.replacePooled()

    def earlyDone(self) -> None:
        if self.early:
            self.early = False
            self.tunnel.earlyLocalConnections -= 1

    def cannotConnect(self, failure):
        """The data channel could not be made: the local connection goes too."""
        self.state.cannotConnect()
        return failure

    def localConnected(self, local: "LocalServiceConnection") -> None:
        self.localConnecting = None
        self.state.localConnected(local)

    def _localUnreachable(self, failure) -> None:
        self.localConnecting = None
        if failure.check(defer.CancelledError):
            return
        log.warn("local service {host}:{port} is unreachable ({why}); closing the user's "
                 "connection", host=self.tunnel.mapping.local_host,
                 port=self.tunnel.mapping.local_port, why=failure.getErrorMessage())
        noteEnding(self, REFUSED)
        self.localLost()

    def localLost(self) -> None:
        """
        The local service refused, or closed before the splice: close the
        data channel (at once if it is up, else right after its first frame).
        """
        self.earlyDone()
        self.local = None
        self.state.localLost()

    def dropLocal(self, reset: bool = False) -> None:
        self.earlyDone()
        connecting, self.localConnecting = self.localConnecting, None
        if connecting is not None:
            connecting.cancel()
        local, self.local = self.local, None
        if local is not None and self.peer is None:
            if reset:
                # The user's reset, passed on by the server.
                local.transport.abortConnection()
            else:
                local.transport.loseConnection()

    def rawDataReceived(self, data: bytes) -> None:
        self.state.rawDataReceived(data)

    def readConnectionLost(self) -> None:
        self.state.readConnectionLost()

    def connectionLost(self, reason=None) -> None:
        ending, self.state = self.state, datachannelstates.Closed(self)
        self.answered()
        self.tunnel.connections.discard(self)
        ending.connectionLost(reason)
        self.dropLocal(isReset(reason))
        self.relayConnectionLost(reason)


class DataChannelFactory(Factory):
    noisy = False

    def __init__(self, channel: DataChannelClient) -> None:
        self.channel = channel

    def buildProtocol(self, addr) -> DataChannelClient:
        return self.channel


class LocalServiceConnection(Protocol, RelayEnd):
    """
    The tunnel's connection to the local service; it reads nothing until it
    is spliced to its data channel.
    """

    def __init__(self, dataChannel: DataChannelClient) -> None:
        self.dataChannel = dataChannel

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        self.dataChannel.tunnel.connections.add(self)
        self.dataChannel.localConnected(self)
        if self.peer is None:
            # Not spliced yet (the server has not answered): what the
            # service says first waits in the kernel.  Not before, or a
            # connection spliced at once would stop reading only to start
            # again.
            self.holdReading()

    def dataReceived(self, data: bytes) -> None:
        self.relayReceived(data)

    def readConnectionLost(self) -> None:
        noteEnding(self.dataChannel, SERVICE_CLOSED)
        RelayEnd.readConnectionLost(self)

    def connectionLost(self, reason=None) -> None:
        noteEnding(self.dataChannel, endingOf(reason, SERVICE_CLOSED))
        self.dataChannel.tunnel.connections.discard(self)
        if self.peer is None and self.dataChannel.local is self:
            mapping = self.dataChannel.tunnel.mapping
            log.warn("local service {host}:{port} closed a connection before the user's data "
                     "channel was ready; closing the user's connection",
                     host=mapping.local_host, port=mapping.local_port)
            self.dataChannel.localLost()
        self.relayConnectionLost(reason)


class LocalServiceFactory(Factory):
    noisy = False

    def __init__(self, dataChannel: DataChannelClient) -> None:
        self.dataChannel = dataChannel

    def buildProtocol(self, addr) -> LocalServiceConnection:
        return LocalServiceConnection(self.dataChannel)

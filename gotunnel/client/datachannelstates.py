"""
The states of the client's data channel (L{gotunnel.client.datachannel.DataChannelClient}),
one class each.

The channel stays the Twisted protocol; its state object decides what a
message, a raw read, the local connection's arrival or failure, and the
end of the connection do.  The server's side of the conversation:

    Connecting --connected--> Asking --ok--> Answered --local up--> Spliced
        |                       `--fail--> Refused
        `--local failed--> ConnectingWithoutLocal --connected--> Asking (and close)

and every state goes to Closed when the connection ends or cannot be made.
Only Asking takes a message (C{register_resp}); after it the channel reads
raw bytes.  A move a state has no method for cannot happen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from twisted.logger import Logger

from gotunnel.wire import messages
from gotunnel.wire import proxyprotocol
from gotunnel.server.accounting import REFUSED, USER_CLOSED, endingOf, logClientConnection, noteEnding
from gotunnel.wire.printable import printable
from gotunnel.relay.splice import RelayEnd

if TYPE_CHECKING:
    from gotunnel.client.datachannel import DataChannelClient, LocalServiceConnection

# The lines keep gotunnel.client's namespace, as before the states had a module.
log = Logger(namespace="gotunnel.client")


def _address(host: Optional[str], port: Optional[int]) -> Optional[tuple[str, int]]:
    """(host, port) where the server told both, else None."""
    if host is None or port is None:
        return None
    return host, port


class DataChannelState:
    """A state of a data channel: by default it takes no message and reads no raw bytes."""

    def __init__(self, channel: "DataChannelClient") -> None:
        self.channel = channel

    def messageReceived(self, message: messages.Message) -> None:
        handler = getattr(self, "msg_" + message.type, None)
        if handler is None:
            self.channel.protocolError(f"unexpected {message.type} message")
            return
        handler(message)

    def readConnectionLost(self) -> None:
        self.channel.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        """Ended before the server's answer: a user's connection ends; a pooled channel is gone."""
        channel = self.channel
        if channel.pooled:
            channel.tunnel.pooledChannelLost(channel)
            return
        noteEnding(channel, endingOf(reason, USER_CLOSED))
        logClientConnection(channel.tunnel.settings.connection_log, channel,
                            channel.tunnel.reactor)


class Unspliced(DataChannelState):
    """Not spliced yet: a local connection is held until the splice, and its failure closes us."""

    def localConnected(self, local: "LocalServiceConnection") -> None:
        self.channel.local = local

    def localLost(self) -> None:
        self.channel.transport.loseConnection()


class BeforeAnswer(Unspliced):
    """The server has not answered: the local connection may be started ahead of it."""

    def connectEarly(self) -> None:
        channel = self.channel
        channel.tunnel.earlyLocalConnections += 1
        channel.early = True
        channel.connectLocal()


class Connecting(BeforeAnswer):
    """The connection to the server is being made."""

    def connected(self) -> None:
        channel = self.channel
        tunnel = channel.tunnel
        if channel.pooled:
            if channel not in tunnel.pool:
                # The pool was emptied (control channel lost) while we connected.
                channel.transport.loseConnection()
                return
            ask = {"pooled": True}
            mapping = tunnel.mapping
            if mapping.vhost:
                ask.update(vhost=mapping.vhost, domains=mapping.domains or None,
                           subdomain=mapping.subdomain or None)
        else:
            ask = {"conn_id": channel.request.conn_id}
        mapping, settings = tunnel.mapping, tunnel.settings
        if mapping.proxy_protocol is not None:
            ask["addresses"] = True
        channel.state = Asking(channel)
        channel.sendMessage(messages.DataChannel(
            local_port=mapping.local_port, remote_port=mapping.remote_port, protocol="",
            token=settings.token, name=settings.name, **ask))
        if not channel.pooled:
            # A pooled channel waits for a user as long as the server likes;
            # a user's is answered at once by a server that works.
            channel.answerTimeout = tunnel.reactor.callLater(
                settings.register_timeout, channel.unanswered)

    def localLost(self) -> None:
        self.channel.state = ConnectingWithoutLocal(self.channel)

    def cannotConnect(self) -> None:
        channel = self.channel
        channel.state = Closed(channel)
        channel.tunnel.dataChannelAnswered(channel)
        channel.dropLocal()


class ConnectingWithoutLocal(Connecting):
    """The local service failed while we connected: the server still learns which user it was."""

    def connected(self) -> None:
        super().connected()
        # The server closes that user when we close.
        self.channel.transport.loseConnection()

    def localLost(self) -> None:
        """Already without one."""


class Asking(BeforeAnswer):
    """The data_channel frame is sent; its register_resp is awaited."""

    def msg_register_resp(self, msg: messages.RegisterResp) -> None:
        channel = self.channel
        tunnel = channel.tunnel
        channel.answered()
        if not msg.ok:
            log.warn("server refused a data channel: {reason}", reason=printable(msg.reason))
            channel.state = Refused(channel)
            noteEnding(channel, REFUSED)
            if channel.pooled:
                tunnel.poolRefused(channel)
            # The user this was for is gone (it closed or reset while it
            # waited, having sent nothing): the service's connection made
            # for it is abandoned, not ended by anyone.
            channel.dropLocal(reset=True)
            channel.transport.loseConnection()
            return
        if channel.pooled:
            tunnel.pooledChannelTaken(channel)
            channel.startedAt = tunnel.reactor.seconds()
        version = tunnel.mapping.proxy_protocol
        if version is not None:
            channel.proxyHeader = proxyprotocol.header(
                version, _address(msg.user_host, msg.user_port),
                _address(msg.public_host, msg.public_port))
        channel.switchToRaw()
        if channel.local is not None:
            Spliced.enter(channel, channel.local)
            return
        channel.state = Answered(channel)
        channel.holdReading()
        if channel.localConnecting is None:
            channel.connectLocal()


class Refused(Unspliced):
    """The server refused the data channel; it is closing."""


class Relaying(DataChannelState):
    """Accepted by the server: raw bytes from now on, the user's connection."""

    def rawDataReceived(self, data: bytes) -> None:
        self.channel.relayReceived(data)

    def readConnectionLost(self) -> None:
        noteEnding(self.channel, USER_CLOSED)
        RelayEnd.readConnectionLost(self.channel)

    def connectionLost(self, reason) -> None:
        channel = self.channel
        noteEnding(channel, endingOf(reason, USER_CLOSED))
        logClientConnection(channel.tunnel.settings.connection_log, channel,
                            channel.tunnel.reactor)
        if channel.peer is None:
            # Never spliced, or its local connection went first.
            channel.replaceInPool()


class Answered(Relaying, Unspliced):
    """Accepted, the local service not connected yet: what the user sends waits in the kernel."""

    def localConnected(self, local: "LocalServiceConnection") -> None:
        self.channel.local = local
        Spliced.enter(self.channel, local)


class Spliced(Relaying):
    """The user's bytes and the local service's flow through the splice."""

    @classmethod
    def enter(cls, channel: "DataChannelClient", local: "LocalServiceConnection") -> None:
        channel.state = cls(channel)
        channel.earlyDone()
        if channel.proxyHeader:
            # First on the local connection, in the same write as the user's
            # first bytes (what this side holds goes to the local side first).
            channel._held = [channel.proxyHeader] + (channel._held or [])
        channel.servedLocal = local
        channel.tunnel.splicer.splice(channel, local)
        channel.replaceInPool()


class Closed(DataChannelState):
    """The connection ended or could not be made: a local connection is no longer wanted."""

    def connectEarly(self) -> None:
        """No connection to the server, so none to the local service."""

    def localConnected(self, local: "LocalServiceConnection") -> None:
        local.transport.loseConnection()

    def localLost(self) -> None:
        """Nothing left to close."""

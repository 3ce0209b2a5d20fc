"""
The roles of a connection to the server's control port, one class each.

A L{gotunnel.server.channel.ServerChannel} stays the Twisted protocol (framing, flow
control, the splice); what it does with a message, with raw bytes and at
its end is decided by its current state object.  A state class defines a
C{msg_<type>} method only for the messages legal in its role, and the
methods that move the channel on only where that move is possible:

    Handshake --register--> Registering --registered--> Control
        |                        `--refused--> Refused
        `--data_channel--> Data | Pooled --user--> Data | Mux | Udp | Refused

and every state goes to Closed when the connection ends.  Any other
message is refused in one place, L{ChannelState.messageReceived}.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar, Optional

from twisted.logger import Logger

from gotunnel.wire import messages
from gotunnel.server.accounting import SERVICE_CLOSED, endingOf, noteEnding
from gotunnel.wire.framing import tlsFailure
from gotunnel.mux.session import MuxSession
from gotunnel.wire.printable import printable
from gotunnel.relay.splice import RelayEnd, setKeepAlive

if TYPE_CHECKING:
    from gotunnel.server.channel import ServerChannel
    from gotunnel.server.mapping import PublishedMapping
    from gotunnel.server.publicusers import PublicUser

# The channel's lines keep the namespace they always had: log filters and
# tests select gotunnel.server's events.
log = Logger(namespace="gotunnel.server")

FIRST_FRAMES = ("register", "data_channel")
"""The messages that choose a connection's role: legal only as its first frame."""

CONTROL_FRAMES = ("ping", "offline_port", "online_port")
"""The messages of a registered control channel."""


class ChannelState:
    """
    One role of a L{ServerChannel}.  The base class accepts nothing: every
    message is a protocol error, the connection reads frames, and its end
    needs nothing beyond what the channel itself does.
    """

    name: ClassVar[str]
    """The role's name, as the admin API, the registry and tests read it."""

    def __init__(self, channel: "ServerChannel") -> None:
        self.channel = channel

    def messageReceived(self, message: messages.Message) -> None:
        handler = getattr(self, "msg_" + message.type, None)
        if handler is None:
            self.channel.protocolError(self.illegal(message.type))
            return
        handler(message)

    def illegal(self, kind: str) -> str:
        """Why a C{kind} message is refused in this role."""
        if kind in FIRST_FRAMES:
            return f"{kind} on a connection that is already a {self.name} channel"
        if kind in CONTROL_FRAMES:
            return f"{kind} before a successful register"
        return f"unexpected {kind} message"

    def frameReceived(self, body: bytes) -> None:
        """A frame: parsed and handed to L{messageReceived} by the channel's receiver."""
        self.channel.parseFrame(body)

    def readConnectionLost(self) -> None:
        self.channel.transport.loseConnection()

    def closeConnection(self, abort: bool) -> None:
        """Close the connection, as L{RelayEnd.closeConnection} does."""
        RelayEnd.closeConnection(self.channel, abort)

    def connectionLost(self, reason) -> None:
        """The connection ended in this role; the channel has let go of its own part."""


class Handshake(ChannelState):
    """A new connection: its first frame says what it is."""

    name = "new"

    def msg_register(self, msg: messages.Register) -> None:
        channel = self.channel
        # Still counted as pending until accepted: a connection held for a
        # delayed refusal must stay under the caps.
        channel.cancelFirstFrameTimeout()
        channel.askedAnyPort = msg.remote_port == 0 and msg.vhost is None
        channel.state = Registering(channel)
        channel.registry.register(channel, msg).addCallbacks(
            channel.registered, channel.registrationRefused, errbackArgs=(msg,))

    def msg_data_channel(self, msg: messages.DataChannel) -> None:
        from gotunnel.server.access import RegistrationRefused
        from gotunnel.server.registration import peerCommonName
        from gotunnel.udp.tunnels import attachCarrier

        channel = self.channel
        channel.cancelFirstFrameTimeout()
        certificateName = peerCommonName(channel.transport)
        channel.wantsAddresses = bool(msg.addresses)
        registry = channel.registry
        try:
            if msg.mux == 1:
                channel.mux = MuxSession(registry.clock, opens=True, onClose=channel.muxClosed)
                channel.tunnel = registry.muxDataChannel(channel.mux, msg, certificateName)
            elif msg.protocol == "udp":
                channel.tunnel = attachCarrier(registry, msg, certificateName)
            elif msg.pooled:
                channel.tunnel = registry.poolDataChannel(channel, msg, certificateName)
            else:
                user = registry.attachDataChannel(msg, certificateName)
        except RegistrationRefused as e:
            log.warn("refused a data channel from {peer} for port {remote_port}: {reason}",
                     peer=channel.peerDescription, remote_port=msg.remote_port, reason=str(e))
            channel.refuse(str(e))
            return
        channel.releasePending()
        # Every data channel: a pooled one waits idle, and a spliced one
        # whose client vanished without a FIN or RST (power cut, network
        # gone) is found dead by the probes, not held with its user forever.
        setKeepAlive(channel.transport)
        if msg.mux == 1:
            Mux.enter(channel)
        elif msg.protocol == "udp":
            Udp.enter(channel)
        elif msg.pooled:
            # Read on while idle: a pooled channel that closes must leave
            # the pool at once, not when a user is handed to it.
            channel.state = Pooled(channel)
        else:
            Data.enter(channel, user, ours=msg.conn_id is not None)

    def connectionLost(self, reason) -> None:
        why = tlsFailure(reason)
        if why is not None:
            log.warn("TLS handshake with {peer} failed: {why}",
                     peer=self.channel.peerDescription, why=why)


class Registering(ChannelState):
    """A register being checked and its port opened: nothing more may come until the answer."""

    name = "registering"

    def registered(self, tunnel: "PublishedMapping") -> None:
        channel = self.channel
        channel.state = Control(channel)
        channel.tunnel = tunnel
        channel.releasePending()
        channel.registry.clientArrived(channel.source)
        vhost = getattr(tunnel, "vhost", None)
        if vhost is not None:
            channel.sendMessage(messages.RegisterResp(
                status="ok", pool=channel.registry.settings.max_pool_count or None, vhost=vhost))
            log.info("client {name} registered from {peer}: local port {local_port} -> "
                     "{vhost} virtual host {domains}", name=printable(tunnel.name),
                     peer=channel.peerDescription, local_port=tunnel.local_port, vhost=vhost,
                     domains=",".join(tunnel.domains))
            return
        answer = tunnel.registerResp()
        if channel.askedAnyPort:
            answer = dataclasses.replace(answer, remote_port=tunnel.remote_port)
        channel.sendMessage(answer)
        log.info("client {name} registered from {peer}: local port {local_port} -> "
                 "public port {remote_port}", name=printable(tunnel.name),
                 peer=channel.peerDescription, local_port=tunnel.local_port,
                 remote_port=tunnel.remote_port)

    def refused(self, msg: messages.Register, reason: str) -> None:
        channel = self.channel
        if msg.vhost is not None:
            names = ",".join(msg.domains or ()) or f"{msg.subdomain}.*"
            log.warn("refused {vhost} virtual host {domains} of {name!r} from {peer}: {reason}",
                     vhost=msg.vhost[:16], domains=names[:256], name=msg.name,
                     peer=channel.peerDescription, reason=reason)
        else:
            log.warn("refused registration of port {remote_port} by {name!r} from {peer}: "
                     "{reason}", remote_port=msg.remote_port, name=msg.name,
                     peer=channel.peerDescription, reason=reason)
        channel.refuse(reason)


class Control(ChannelState):
    """A registered client's control channel: heartbeats and its port's state."""

    name = "control"

    @property
    def tunnel(self) -> "PublishedMapping":
        return self.channel.tunnel

    def msg_ping(self, msg: messages.Ping) -> None:
        self.tunnel.heartbeat()
        self.channel.sendMessage(messages.Pong(time=int(self.channel.registry.clock.seconds())))

    def _portChange(self, msg, kind: str) -> Optional["PublishedMapping"]:
        tunnel = self.tunnel
        tunnel.heartbeat()
        if msg.port != tunnel.remote_port:
            log.warn("{name} sent {kind} for port {port}, but its port is {remote_port}; ignored",
                     name=printable(tunnel.name), kind=kind, port=msg.port,
                     remote_port=tunnel.remote_port)
            return None
        return tunnel

    def msg_offline_port(self, msg: messages.OfflinePort) -> None:
        tunnel = self._portChange(msg, "offline_port")
        if tunnel is not None and tunnel.group is not None:
            # The port stays open for the group; users go to the other members.
            log.info("client {name} says its service is down; group {group} of port "
                     "{remote_port} sends it no users", name=printable(tunnel.name),
                     group=printable(tunnel.group.name), remote_port=tunnel.remote_port)
            tunnel.serviceUp = False
        elif tunnel is not None:
            log.info("client {name} says its service is down; port {remote_port} offline",
                     name=printable(tunnel.name), remote_port=tunnel.remote_port)
            tunnel.stopListening()

    def msg_online_port(self, msg: messages.OnlinePort) -> None:
        tunnel = self._portChange(msg, "online_port")
        if tunnel is not None and tunnel.group is not None:
            tunnel.serviceUp = True
        elif tunnel is not None and not tunnel.online:
            log.info("client {name} says its service is back; port {remote_port} online",
                     name=printable(tunnel.name), remote_port=tunnel.remote_port)
            tunnel.goOnline()

    def connectionLost(self, reason) -> None:
        channel, tunnel = self.channel, self.tunnel
        registry = channel.registry
        registry.clientLeft(channel.source)
        successor = registry.tunnels.get(tunnel.key)
        if tunnel.closed and successor is not None and successor is not tunnel:
            # The same name registered again: the port stays open for it.
            log.info("the old control channel of client {name} closed; its {mapping} "
                     "is served by the new one", name=printable(tunnel.name),
                     mapping=tunnel.mappingName, remote_port=tunnel.remote_port)
        else:
            log.info("client {name} gone; closing public port {remote_port}",
                     name=printable(tunnel.name), remote_port=tunnel.remote_port)
        registry.clientDropped(tunnel)


class Refused(ChannelState):
    """Refused (its answer on the way, or the connection aborted): nothing more is read."""

    name = "refused"


class Pooled(ChannelState):
    """A data channel kept idle for the next user of its mapping."""

    name = "pooled"

    def frameReceived(self, body: bytes) -> None:
        self.channel.protocolError("a frame on a pooled data channel")

    def attachUser(self, user: "PublicUser") -> bool:
        channel = self.channel
        if channel.transport.disconnecting:
            return False
        if channel._unprocessed:
            # The client sends nothing on a pooled channel before our
            # answer: these bytes would be neither a frame nor the user's.
            channel.protocolError("bytes on a pooled data channel before a user was handed to it")
            return False
        channel.state = Data(channel)
        # Only our client pools data channels.
        if channel._answer(user, ours=True):
            # Outside a frame handler, so switchToRaw's pause is not needed.
            channel.rawFromNow()
            channel._spliceTo(user)
        return True

    def connectionLost(self, reason) -> None:
        self.channel.tunnel.pooledLost(self.channel)


class Data(ChannelState):
    """A data channel spliced to its user: raw bytes both ways."""

    name = "data"

    @classmethod
    def enter(cls, channel: "ServerChannel", user: "PublicUser", ours: bool) -> None:
        channel.state = cls(channel)
        if channel._answer(user, ours=ours):
            channel.switchToRaw()
            channel._spliceTo(user)

    def rawDataReceived(self, data: bytes) -> None:
        self.channel.relayReceived(data)

    def readConnectionLost(self) -> None:
        channel = self.channel
        if channel.peer is not None:
            noteEnding(channel.peer, SERVICE_CLOSED)
        RelayEnd.readConnectionLost(channel)

    def connectionLost(self, reason) -> None:
        channel = self.channel
        if channel.peer is not None:
            noteEnding(channel.peer, endingOf(reason, SERVICE_CLOSED))
        channel.relayConnectionLost(reason)


class Mux(ChannelState):
    """One connection carrying every user of its mapping as streams (gotunnel.mux.session)."""

    name = "mux"

    @classmethod
    def enter(cls, channel: "ServerChannel") -> None:
        channel.state = cls(channel)
        channel.sendMessage(messages.RegisterResp(status="ok"))
        channel.switchToRaw()
        channel.mux.start(channel.transport)
        log.info("client {name} carries the users of port {remote_port} over one connection "
                 "from {peer}", name=printable(channel.tunnel.name),
                 remote_port=channel.tunnel.remote_port, peer=channel.peerDescription)

    def rawDataReceived(self, data: bytes) -> None:
        self.channel.mux.dataReceived(data)

    def closeConnection(self, abort: bool) -> None:
        self.channel.mux.close(abort)

    def connectionLost(self, reason) -> None:
        self.channel.mux.connectionLost()


class Udp(ChannelState):
    """The carrying channel of a UDP mapping: datagram frames from now on (gotunnel.udp.tunnels)."""

    name = "udp"

    @classmethod
    def enter(cls, channel: "ServerChannel") -> None:
        channel.state = cls(channel)
        channel.sendMessage(messages.RegisterResp(status="ok"))
        channel.switchToRaw()
        channel.tunnel.attachCarrier(channel)

    def rawDataReceived(self, data: bytes) -> None:
        self.channel.tunnel.carrierData(self.channel, data)

    def closeConnection(self, abort: bool) -> None:
        # The carrier is the transport's producer for life (see Carrier.close).
        self.channel.transport.unregisterProducer()
        RelayEnd.closeConnection(self.channel, abort)

    def connectionLost(self, reason) -> None:
        self.channel.tunnel.carrierLost(self.channel)


class Closed(ChannelState):
    """The connection is gone; a registration still under way is undone when it completes."""

    name = "closed"

    def registered(self, tunnel: "PublishedMapping") -> None:
        # The connection went away while the port was being opened.
        tunnel.close()

    def refused(self, msg: messages.Register, reason: str) -> None:
        """Nobody is left to tell."""

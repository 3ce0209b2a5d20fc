"""
A connection to the server's control port (L{ServerChannel}): the Twisted
protocol that turns frames into calls on the registry, and the splice of a
data channel to its user.  What it does in each role is its state (see
L{gotunnel.server.channelstates}).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import TYPE_CHECKING, Optional

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from gotunnel.server import channelstates
from gotunnel.wire import messages
from gotunnel.server.access import RegistrationRefused
from gotunnel.wire.framing import MessageReceiver
from gotunnel.mux.session import MuxSession
from gotunnel.relay.splice import RelayEnd, setNoDelay
from gotunnel.relay.eagerio import readWaiting

if TYPE_CHECKING:
    from gotunnel.server.mapping import PublishedMapping
    from gotunnel.server.publicusers import PublicUser
    from gotunnel.server.registry import TunnelRegistry

log = Logger(namespace="gotunnel.server")


def addressGroup(host: str, ipv6Prefix: int) -> str:
    """
    What C{host} counts as in the caps on pending connections: an IPv6
    address its network of C{ipv6Prefix} bits (one host usually holds a
    whole /64), an IPv4 address (mapped into IPv6 or not) itself.
    """
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, ipv6Prefix), strict=False))
    return host


class ServerChannel(MessageReceiver, RelayEnd):
    """
    A connection to the control port.  Its first frame makes it a control
    channel (C{register}) or a data channel (C{data_channel}); a data
    channel then carries raw bytes, spliced to its user.  What it does in
    each role is its current L{state} (see L{gotunnel.server.channelstates}).
    """

    tunnel: Optional[PublishedMapping] = None
    mux: Optional[MuxSession] = None
    tlsMismatchHint = ("a TLS client talking to this plain-TCP port? give the server "
                       "--tls-cert and --tls-key, or connect without TLS")
    firstFrameCall = None
    refusalCall = None
    askedAnyPort = False
    """The register asked for remote port 0: the answer says which port."""
    wantsAddresses = False
    """The data channel asked for the user's addresses (messages.DataChannel.addresses)."""
    pending = False
    """Counted by the registry among the connections yet to send their first frame."""
    source = "?"
    """The address this connection is counted as, in the caps on pending connections."""

    def __init__(self, registry: TunnelRegistry) -> None:
        self.registry = registry
        self.state: channelstates.ChannelState = channelstates.Handshake(self)

    @property
    def role(self) -> str:
        """The name of the current role, for those who watch: "new", "control", "data" ..."""
        return self.state.name

    @property
    def host(self) -> str:
        return getattr(self.transport.getPeer(), "host", "?")

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        self.registry.connections.add(self)
        self.source = addressGroup(self.host, self.registry.settings.ipv6_prefix)
        refusal = self.registry.admit(self)
        if refusal is not None:
            log.warn("refusing a connection from {peer}: {why}",
                     peer=self.peerDescription, why=refusal)
            self.registry.stats.admissionRefusals["pending"] += 1
            self.state = channelstates.Refused(self)
            self.transport.abortConnection()
            return
        self.pending = True
        self.firstFrameCall = self.registry.clock.callLater(
            self.registry.settings.first_frame_timeout, self._firstFrameTimedOut)

    def releasePending(self) -> None:
        """
        This connection is now a control or data channel, or gone: it no
        longer counts against the caps on connections not yet accepted.
        """
        if self.pending:
            self.pending = False
            self.registry.release(self)
        self.cancelFirstFrameTimeout()

    def cancelFirstFrameTimeout(self) -> None:
        if self.firstFrameCall is not None:
            self.firstFrameCall.cancel()
            self.firstFrameCall = None

    def refuse(self, reason: str) -> None:
        """
        Answer C{register_resp} fail and close; a wrong token is answered
        after a delay that grows with the address's failures in a row.
        """
        self.state = channelstates.Refused(self)
        delay = 0.0
        if reason == "authentication failed":
            delay = self.registry.authenticationFailed(self.source)
        if delay <= 0:
            self.fail(reason)
            return
        self.paused = True
        self.transport.pauseProducing()
        self.refusalCall = self.registry.clock.callLater(delay, self._refuseNow, reason)

    def _refuseNow(self, reason: str) -> None:
        self.refusalCall = None
        self.fail(reason)

    def evict(self, held: int) -> None:
        """
        Close this idle connection now, to make room for one from an
        address that holds fewer: its address holds C{held} such connections.
        """
        log.warn("{peer} is the oldest of {held} connections from its address waiting for "
                 "their first frame; closing it to make room for another address's",
                 peer=self.peerDescription, held=held)
        self.releasePending()
        self.transport.abortConnection()

    def _firstFrameTimedOut(self) -> None:
        self.firstFrameCall = None
        self.releasePending()
        log.warn("{peer} sent no register or data_channel within {timeout} s; closing",
                 peer=self.peerDescription, timeout=self.registry.settings.first_frame_timeout)
        self.transport.abortConnection()

    def registered(self, tunnel: PublishedMapping) -> None:
        """The registry opened the port asked for (or the group took us in)."""
        self.state.registered(tunnel)

    def registrationRefused(self, failure, msg: messages.Register) -> None:
        failure.trap(RegistrationRefused)
        self.state.refused(msg, str(failure.value))

    def bufferedBytes(self) -> int:
        held = RelayEnd.bufferedBytes(self)
        if self.mux is not None:
            held += self.mux.bufferedBytes()
        return held

    def muxClosed(self, session: MuxSession) -> None:
        if self.tunnel is not None:
            self.tunnel.muxSessionLost(session)

    def attachUser(self, user: PublicUser) -> bool:
        """
        This pooled data channel now serves C{user}; False if it broke the
        protocol (and is closed) instead.
        """
        return self.state.attachUser(user)

    def _answer(self, user: PublicUser, ours: bool) -> bool:
        """
        Accept this data channel for C{user}.  To our own client, what the
        user has sent so far goes in the same segment as the answer: the
        client reads both at once, and a request that came with its
        connection reaches the service a wake-up sooner; and the answer
        tells the user's and the public address if it asked for them.  A Go
        client gets the answer alone, as the Go server sends it.

        False if that read found the user's connection reset while it
        waited: both connections are then reset, which the client passes
        on to the service.
        """
        early = b""
        if ours:
            try:
                waiting = readWaiting(user.transport)
            except OSError:
                user.transport.abortConnection()
                self.transport.abortConnection()
                return False
            # What the user sent while it waited goes ahead of what it has
            # sent since; the held bytes were counted as they came.
            user.relayed += len(waiting)
            early = user.takeHeld() + waiting
        # A capped mapping's throttle is charged for these once spliced.
        user.earlyBytes = len(early)
        answer = messages.RegisterResp(status="ok")
        if ours and self.wantsAddresses:
            # For our client's PROXY protocol header (see gotunnel.wire.proxyprotocol).
            peer, host = user.transport.getPeer(), user.transport.getHost()
            answer = dataclasses.replace(
                answer, user_host=getattr(peer, "host", None),
                user_port=getattr(peer, "port", None), public_host=getattr(host, "host", None),
                public_port=getattr(host, "port", None))
        self.sendMessage(answer, rawAfter=early)
        return True

    def _spliceTo(self, user: PublicUser) -> None:
        user.dataChannel = self
        throttles = user.tunnel.throttles
        if throttles is not None:
            # A capped mapping's bytes go through Python, where reading
            # pauses while the cap is spent (see gotunnel.relay.ratelimit).
            user.throttle, self.throttle = throttles
        self.registry.splicer.splice(user, self, zeroCopy=throttles is None)
        if throttles is not None and user.earlyBytes:
            # After splice(), which resumes reading: what the user sent
            # while it waited (read in small pieces, see PublicUser) counts
            # against the cap too, and may pause the user again at once.
            user.throttle.passed(user, user.earlyBytes)
        self.registry.stats.dataChannelReady(user, self.registry.clock.seconds() - user.connectedAt)
        # One line per user connection: at debug level, where the formatting
        # and the write cost nothing unless asked for.
        log.debug("data channel for port {remote_port} ready in {ms:.1f} ms",
                  remote_port=user.tunnel.remote_port,
                  ms=(self.registry.clock.seconds() - user.connectedAt) * 1000)

    def rawDataReceived(self, data: bytes) -> None:
        self.state.rawDataReceived(data)

    def readConnectionLost(self) -> None:
        self.state.readConnectionLost()

    def closeConnection(self, abort: bool = False) -> None:
        self.state.closeConnection(abort)

    def stringReceived(self, body: bytes) -> None:
        self.state.frameReceived(body)

    def parseFrame(self, body: bytes) -> None:
        """Parse a frame and hand its message to the current state."""
        super().stringReceived(body)

    def messageReceived(self, message: messages.Message) -> None:
        self.state.messageReceived(message)

    def connectionLost(self, reason=None) -> None:
        self.releasePending()
        if self.refusalCall is not None:
            self.refusalCall.cancel()
            self.refusalCall = None
        self.registry.connections.discard(self)
        ending, self.state = self.state, channelstates.Closed(self)
        ending.connectionLost(reason)


class ServerChannelFactory(Factory):
    noisy = False

    def __init__(self, registry: TunnelRegistry) -> None:
        self.registry = registry

    def buildProtocol(self, addr) -> ServerChannel:
        channel = ServerChannel(self.registry)
        channel.factory = self
        return channel

"""
The client's end of a UDP mapping (issue 19): the control channel of
L{ClientMappingService}, one carrying channel, and per remote peer a session, a UDP
socket of its own connected to the local service, so that the service's
replies go back to the peer that asked.

Sessions are capped (a new peer beyond the cap is dropped and counted) and
end after an idle timeout.
"""

from __future__ import annotations

from typing import Optional

from twisted.application.internet import TimerService
from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.logger import Logger

from gotunnel.client.mapping import ClientMappingService
from gotunnel.client.pool import POOL_REFILL_DELAY
from gotunnel.relay.splice import setNoDelay
from gotunnel.server.accounting import DatagramCounters
from gotunnel.udp.carrier import Carrier
from gotunnel.udp.drops import SWEEPS_PER_TIMEOUT, reportDrops
from gotunnel.udp.sockets import READ_SIZE, SESSION_SOCKET_BUFFER, enlargeBuffers, readInBatches
from gotunnel.udp.pumpends import ClientDatagramPump
from gotunnel.wire import messages
from gotunnel.wire.framing import MessageReceiver

log = Logger(namespace="gotunnel.udp")


class Session(DatagramProtocol):
    """
    One remote peer of a UDP mapping: a UDP socket of its own, connected to
    the local service, so that the service's replies go back to that peer.
    """

    noisy = False

    def __init__(self, tunnel: "UdpTunnelService", peer_id: int, now: float) -> None:
        self.tunnel = tunnel
        self.peer_id = peer_id
        self.lastSeen = now

    def datagramReceived(self, data: bytes, addr) -> None:
        self.tunnel.fromLocal(self, data)

    def batchStarted(self) -> None:
        carrier = self.tunnel.carrier()
        if carrier is not None:
            carrier.cork()

    def batchEnded(self) -> None:
        carrier = self.tunnel.carrier()
        if carrier is not None:
            carrier.uncork()

    def connectionRefused(self) -> None:
        # The local service is not listening (ICMP port unreachable): the
        # datagram is lost, as it would be without the tunnel.
        self.tunnel.counters.dropped_unknown += 1

    def send(self, payload: bytes) -> bool:
        try:
            self.transport.write(payload)
        except (OSError, error.MessageLengthError):
            return False
        return True


class CarrierChannel(MessageReceiver):
    """The client's end of a carrying channel: handshake, then frames."""

    carrier: Optional[Carrier] = None
    tlsMismatchHint = "the server speaks TLS? connect with --tls"

    def __init__(self, tunnel: "UdpTunnelService") -> None:
        self.tunnel = tunnel

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        self.tunnel.connections.add(self)
        mapping, settings = self.tunnel.mapping, self.tunnel.settings
        self.sendMessage(messages.DataChannel(
            local_port=mapping.local_port, remote_port=mapping.remote_port, protocol="udp",
            token=settings.token, name=settings.name, conn_id=self.tunnel.carrierId))

    def msg_register_resp(self, msg: messages.RegisterResp) -> None:
        if self.carrier is not None:
            self.protocolError("register_resp on a carrying channel")
            return
        if not msg.ok:
            log.warn("server refused the carrying channel of {mapping}: {reason}",
                     mapping=str(self.tunnel.mapping), reason=msg.reason)
            self.transport.loseConnection()
            return
        self.switchToRaw()
        self.carrier = Carrier(self.transport, self.tunnel.fromServer)
        splicer = self.tunnel.splicer
        if ClientDatagramPump.usable(self.carrier, splicer.spliceThread):
            self.carrier.pump = ClientDatagramPump(
                self.tunnel, self.carrier, splicer.spliceThread, self.tunnel.reactor,
                splicer.busyPoll, self.tunnel.counters)
            self.carrier.pump.begin()

    def closeConnection(self, abort: bool = False) -> None:
        """Close the carrying channel, as L{closeConnectionOf} asks."""
        if self.carrier is not None:
            self.carrier.close(abort)
        elif abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def rawDataReceived(self, data: bytes) -> None:
        why = self.carrier.feed(data)
        if why is not None:
            self.protocolError(why)

    def connectionLost(self, reason=None) -> None:
        if self.carrier is not None:
            self.carrier.stop()
        self.tunnel.connections.discard(self)
        self.tunnel.carrierLost(self)


class CarrierFactory(Factory):
    noisy = False

    def __init__(self, channel: CarrierChannel) -> None:
        self.channel = channel

    def buildProtocol(self, addr) -> CarrierChannel:
        return self.channel


class UdpTunnelService(ClientMappingService):
    """
    One UDP mapping: the control channel of L{ClientMappingService}, one carrying
    channel, and a session per remote peer.  No TCP probe of the local
    service (a UDP service answers no connect).
    """

    carrierChannel: Optional[CarrierChannel] = None
    carrierId: Optional[str] = None
    """The server's secret for this registration's carrying channel."""
    reopenCall = None
    withdrawn = False
    localAddress: Optional[tuple[str, int]] = None

    def __init__(self, settings, mapping, serverEndpoint, reactor,
                 dataChannelEndpoint=None, splicer=None) -> None:
        super().__init__(settings, mapping, serverEndpoint, reactor, dataChannelEndpoint,
                         splicer)
        self.timeout = settings.udp_session_timeout
        self.maxSessions = settings.udp_max_sessions
        self.sessions: dict[int, Session] = {}
        self.counters = DatagramCounters()
        self._reported: dict[str, int] = {}
        host = mapping.local_host
        if isIPAddress(host) or isIPv6Address(host):
            self.localAddress = (host, mapping.local_port)
        sweeper = TimerService(self.timeout / SWEEPS_PER_TIMEOUT, self.sweep)
        sweeper.clock = reactor
        sweeper.setServiceParent(self)
        self.sweeper = sweeper

    def startService(self) -> None:
        super().startService()
        if self.localAddress is None:
            self.reactor.resolve(self.mapping.local_host).addCallbacks(
                self._resolved, self._unresolved)

    def _resolved(self, address: str) -> None:
        self.localAddress = (address, self.mapping.local_port)

    def _unresolved(self, failure) -> None:
        log.error("cannot look up {host} for {mapping}: {why}", host=self.mapping.local_host,
                  mapping=str(self.mapping), why=failure.getErrorMessage())

    def probeLocalService(self) -> defer.Deferred:
        return defer.succeed(None)

    def registered(self, channel, serverPool: int = 0, mux: bool = False) -> None:
        # mux: never offered for UDP (ControlChannel), so never agreed.
        answer = getattr(channel, "answer", None)
        if answer is None or answer.protocol != "udp":
            log.error("the server answered {mapping} without confirming UDP (a Go server, or "
                      "one without UDP tunnels): withdrawing this mapping; the others go on",
                      mapping=str(self.mapping))
            self.withdrawn = True
            channel.transport.loseConnection()
            self.removeService(self.connector)
            return
        self.carrierId = answer.conn_id
        super().registered(channel, 0)
        self.openCarrier()

    def openCarrier(self) -> None:
        """Open the carrying channel, on the data channels' endpoint."""
        self._cancelReopen()
        if self.channel is None or self.stopping:
            return
        channel = CarrierChannel(self)
        self.carrierChannel = channel

        def failed(failure):
            self.carrierLost(channel)
            if not failure.check(defer.CancelledError):
                log.warn("cannot open a data channel to the server: {why}",
                         why=failure.getErrorMessage())

        endpoint = None
        if self.dataChannelEndpoint is not None:
            endpoint = self.dataChannelEndpoint(self.channel.transport.getPeer())
        if endpoint is None:
            endpoint = self.serverEndpoint
        self._track(endpoint.connect(CarrierFactory(channel))).addErrback(failed)

    def _cancelReopen(self) -> None:
        if self.reopenCall is not None and self.reopenCall.active():
            self.reopenCall.cancel()
        self.reopenCall = None

    def carrierLost(self, channel: CarrierChannel) -> None:
        if channel is not self.carrierChannel:
            return
        self.carrierChannel = None
        if self.channel is not None and not self.stopping:
            self.reopenCall = self.reactor.callLater(POOL_REFILL_DELAY, self.openCarrier)

    def channelLost(self, channel) -> None:
        ours = self.channel is channel
        super().channelLost(channel)
        if ours:
            # Peer ids are the server's registration's: a new one starts anew.
            self._cancelReopen()
            carrier, self.carrierChannel = self.carrierChannel, None
            if carrier is not None and carrier.transport is not None:
                carrier.closeConnection()
            self.closeSessions()

    def fromServer(self, peer_id: int, payload: bytes) -> None:
        """A datagram of peer C{peer_id}: to the local service, from its session."""
        session = self.sessions.get(peer_id)
        now = self.reactor.seconds()
        if session is None:
            if len(self.sessions) >= self.maxSessions or self.localAddress is None:
                self.counters.dropped_sessions += 1
                return
            session = Session(self, peer_id, now)
            host, port = self.localAddress
            try:
                udpPort = self.reactor.listenUDP(0, session, interface="::" if ":" in host
                                                 else "", maxPacketSize=READ_SIZE)
                udpPort.connect(host, port)
                enlargeBuffers(udpPort, SESSION_SOCKET_BUFFER)
                readInBatches(udpPort, session)
            except (OSError, error.CannotListenError) as e:
                log.warn("cannot open a UDP socket for {mapping}: {why}",
                         mapping=str(self.mapping), why=str(e))
                self.counters.dropped_sessions += 1
                return
            self.sessions[peer_id] = session
            carrier = self.carrier()
            if carrier is not None and carrier.pump is not None:
                carrier.pump.watch(udpPort, session)
        session.lastSeen = now
        if session.send(payload):
            self.counters.forwarded_in += 1
        else:
            self.counters.dropped_unknown += 1

    def carrier(self) -> Optional[Carrier]:
        """The carrying channel's frames, while it is up."""
        channel = self.carrierChannel
        return channel.carrier if channel is not None else None

    def fromLocal(self, session: Session, data: bytes) -> None:
        """The local service's reply to a session: back to its peer."""
        session.lastSeen = self.reactor.seconds()
        carrier = self.carrier()
        if carrier is None or not carrier.send(session.peer_id, data):
            self.counters.dropped_backed_up += 1
            return
        self.counters.forwarded_out += 1

    def sweep(self) -> None:
        """End sessions idle for the timeout; log what was dropped since the last sweep."""
        deadline = self.reactor.seconds() - self.timeout
        for peer_id, session in list(self.sessions.items()):
            if session.lastSeen <= deadline:
                self._endSession(peer_id)
        self._reported = reportDrops(self.counters, self._reported, str(self.mapping),
                                      self.sweeper.step)

    def _endSession(self, peer_id: int) -> None:
        session = self.sessions.pop(peer_id)
        if session.transport is not None:
            carrier = self.carrier()
            if carrier is not None and carrier.pump is not None:
                carrier.pump.unwatch(session.transport)
            session.transport.stopListening()

    def closeSessions(self) -> None:
        for peer_id in list(self.sessions):
            self._endSession(peer_id)

    def stopService(self) -> defer.Deferred:
        self._cancelReopen()
        self.closeSessions()
        return super().stopService()

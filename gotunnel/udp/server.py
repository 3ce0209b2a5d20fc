"""
The server's end of a UDP mapping (issue 19): a mapping registered with
C{protocol: "udp"} is published as a UDP port, whose every remote address
gets a peer id; its datagrams go to the client framed with that id on the
carrying channel, and the client's frames go back to the peer they name.

A datagram that finds the carrying channel backed up, or a new peer beyond
the cap on peers, is dropped and counted.  Peers end after an idle timeout.
"""

from __future__ import annotations

from typing import Optional

from twisted.application.internet import TimerService
from twisted.internet import defer, error
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from gotunnel.server.access import tokensMatch
from gotunnel.server.accounting import REFUSED_SOURCE, DatagramCounters
from gotunnel.server.portpolicy import permitted
from gotunnel.server.publicport import PublicPort
from gotunnel.server.access import RegistrationRefused
from gotunnel.server.mapping import PublishedMapping, _whenFired
from gotunnel.server.registry import TunnelRegistry
from gotunnel.udp.carrier import Carrier
from gotunnel.udp.drops import SWEEPS_PER_TIMEOUT, reportDrops
from gotunnel.udp.framing import MAX_PEER_ID
from gotunnel.udp.sockets import PUBLIC_SOCKET_BUFFER, READ_SIZE, enlargeBuffers, readInBatches
from gotunnel.udp.pumpends import ServerDatagramPump
from gotunnel.wire import messages
from gotunnel.wire.printable import printable

log = Logger(namespace="gotunnel.udp")


def udpLabel(remote_port: int) -> str:
    """How a UDP port's totals are labelled in the metrics and the admin API: C{udp:53}."""
    return f"udp:{remote_port}"


class Peer:
    """A remote address of a UDP mapping, known by its peer id."""

    __slots__ = ("peer_id", "address", "lastSeen")

    def __init__(self, peer_id: int, address: tuple, lastSeen: float) -> None:
        self.peer_id = peer_id
        self.address = address
        self.lastSeen = lastSeen


class PublicUDPEndpoint:
    """
    What L{PublicPort} listens with, for a UDP port: C{listen} binds it and
    gives the port, or fails with L{error.CannotListenError}.
    """

    def __init__(self, reactor, port: int, interface: str) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface

    def listen(self, protocol: DatagramProtocol) -> defer.Deferred:
        try:
            listener = self.reactor.listenUDP(self.port, protocol, interface=self.interface,
                                              maxPacketSize=READ_SIZE)
        except error.CannotListenError:
            return defer.fail()
        enlargeBuffers(listener, PUBLIC_SOCKET_BUFFER)
        readInBatches(listener, protocol)
        return defer.succeed(listener)


class PublicDatagrams(DatagramProtocol):
    """The public UDP port of a mapping: every datagram goes to its tunnel."""

    noisy = False

    def __init__(self, tunnel: "UdpTunnel") -> None:
        self.tunnel = tunnel

    def datagramReceived(self, data: bytes, addr) -> None:
        self.tunnel.fromPeer(data, addr)

    def batchStarted(self) -> None:
        carrier = self.tunnel.carrier
        if carrier is not None:
            carrier.cork()

    def batchEnded(self) -> None:
        carrier = self.tunnel.carrier
        if carrier is not None:
            carrier.uncork()


class UdpTunnel(PublishedMapping):
    """
    A mapping published as a UDP port: its peers, and the carrying channel
    its client opened.  Registration, limits, offline/online and heartbeats
    are the TCP mapping's (L{PublishedMapping}); only listening and carrying differ.
    """

    protocol = "udp"
    carrier: Optional[Carrier] = None
    carrierChannel = None

    def __init__(self, registry: TunnelRegistry, channel, register: messages.Register) -> None:
        super().__init__(registry, channel, register)
        settings = registry.settings
        self.timeout = settings.udp_session_timeout
        self.maxPeers = settings.udp_max_sessions
        self.peers: dict[tuple, Peer] = {}
        self.byId: dict[int, Peer] = {}
        self.nextPeerId = 1
        # The port's totals: they go on over registrations, as its users' do.
        if self.stats.datagrams is None:
            self.stats.datagrams = DatagramCounters()
        self.counters = self.stats.datagrams
        self._reported = self.counters.snapshot()
        self.carrierId = registry.newConnectionId()
        """Only the client that registered knows it: no other holder of the
        shared token can take this mapping's datagrams."""
        self.sweeper = TimerService(self.timeout / SWEEPS_PER_TIMEOUT, self.sweep)
        self.sweeper.clock = registry.clock
        self.sweeper.startService()

    def __repr__(self) -> str:
        return f"<UdpTunnel {self.name!r} :{self.remote_port}>"

    @staticmethod
    def portKey(remote_port: int) -> object:
        """
        A port number's UDP port is not its TCP port: both are published at
        once, by the same client or by two.
        """
        return ("udp", remote_port)

    @property
    def statsPort(self) -> str:
        # Its own totals and metric labels, apart from TCP's on the same number.
        return udpLabel(self.remote_port)

    @property
    def mappingName(self) -> str:
        return f"public UDP port {self.remote_port}"

    def registerResp(self) -> messages.RegisterResp:
        """ok, confirming UDP, with the carrying channel's secret; no pool."""
        return messages.RegisterResp(status="ok", protocol="udp", conn_id=self.carrierId)

    def publicPort(self) -> PublicPort:
        """
        The public UDP port of this port number, opened and closed one step
        at a time for the mappings that hold it in turn, as a TCP one is.
        """
        registry = self.registry
        port = registry.udpPorts.get(self.remote_port)
        if port is None:

            def idle(port: PublicPort) -> None:
                if registry.udpPorts.get(port.remote_port) is port:
                    del registry.udpPorts[port.remote_port]

            port = registry.udpPorts[self.remote_port] = PublicPort(
                PublicUDPEndpoint(registry.reactor, self.remote_port,
                                  registry.settings.public_interface),
                self.remote_port, registry.trackStopping, idle)
        return port

    @property
    def listener(self):
        """The public UDP port, while it serves this mapping."""
        port = self.registry.udpPorts.get(self.remote_port)
        if port is not None and port.owner is self:
            return port.listener
        return None

    def listen(self) -> defer.Deferred:
        """
        Bind the public UDP port, once whatever held it before is closed;
        fires with True, False or a L{error.CannotListenError}, as
        L{PublishedMapping.listen}.
        """
        self.online = True

        def listening(listens: bool) -> bool:
            if listens:
                log.info("public UDP port {remote_port} listening for {name}",
                         remote_port=self.remote_port, name=printable(self.name))
                carrier = self.carrier
                if carrier is not None and carrier.pump is not None:
                    carrier.pump.begin()
            return listens

        return self.publicPort().listen(self, PublicDatagrams(self)).addCallback(listening)

    def stopListening(self) -> defer.Deferred:
        """Stop publishing; the Deferred fires once the UDP port is closed."""
        self.online = False
        if self._retryCall is not None:
            self._retryCall.cancel()
            self._retryCall = None
        carrier = self.carrier
        if carrier is not None and carrier.pump is not None:
            # The thread lets go of the port before it closes.
            carrier.pump.reclaim()
        self._stopping = self.publicPort().stop(self)
        return _whenFired(self._stopping)

    def fromPeer(self, data: bytes, address) -> None:
        """A datagram from the public: on to the client, or dropped and counted."""
        peer = self.peers.get(address)
        now = self.registry.clock.seconds()
        if peer is None:
            if not permitted(self.sources, address[0]):
                # The port's source lists hold for datagrams too: a new
                # peer they refuse gets no session (counted, logged as
                # users refused at accept are).
                self.refused(address[0], "source address not allowed", REFUSED_SOURCE)
                return
            if len(self.peers) >= self.maxPeers:
                self.counters.dropped_sessions += 1
                return
            peer = Peer(self.nextPeerId, address, now)
            self.nextPeerId = self.nextPeerId % MAX_PEER_ID + 1
            self.peers[address] = peer
            self.byId[peer.peer_id] = peer
        peer.lastSeen = now
        carrier = self.carrier
        if carrier is None or not carrier.send(peer.peer_id, data):
            self.counters.dropped_backed_up += 1
            return
        self.counters.forwarded_in += 1

    def fromClient(self, peer_id: int, payload: bytes) -> None:
        """A datagram from the client's local service, back to its peer."""
        peer = self.byId.get(peer_id)
        listener = self.listener
        if peer is None or listener is None:
            self.counters.dropped_unknown += 1
            return
        peer.lastSeen = self.registry.clock.seconds()
        try:
            # The port's socket itself: the address came from recvfrom, so
            # Twisted's checks of it (three parses a datagram) are not needed.
            listener.socket.sendto(payload, peer.address)
        except OSError:
            # Too large for the path, or the kernel's buffer is full: lost,
            # as UDP may lose it.
            self.counters.dropped_unknown += 1
            return
        self.counters.forwarded_out += 1

    def attachCarrier(self, channel) -> None:
        """
        C{channel}, a data channel just accepted, carries this mapping's
        datagrams from now on; one carried them before is closed.
        """
        previous, previousCarrier = self.carrierChannel, self.carrier
        self.carrierChannel = channel
        self.carrier = Carrier(channel.transport, self.fromClient)
        if previous is not None:
            previousCarrier.close()
        threads = self.registry.splicer.spliceThread
        if ServerDatagramPump.usable(self.carrier, threads):
            self.carrier.pump = ServerDatagramPump(
                self, self.carrier, threads, self.registry.reactor,
                self.registry.splicer.busyPoll, self.counters)
            self.carrier.pump.begin()
        log.info("datagrams of UDP port {remote_port} carried for {name}",
                 remote_port=self.remote_port, name=self.name)

    def carrierData(self, channel, data: bytes) -> None:
        if channel is not self.carrierChannel:
            return
        why = self.carrier.feed(data)
        if why is not None:
            channel.protocolError(why)

    def carrierLost(self, channel) -> None:
        if channel is self.carrierChannel:
            self.carrierChannel = None
            self.carrier.stop()
            self.carrier = None

    def sweep(self) -> None:
        """Forget peers idle for the timeout; log what was dropped since the last sweep."""
        deadline = self.registry.clock.seconds() - self.timeout
        for address, peer in list(self.peers.items()):
            if peer.lastSeen <= deadline:
                del self.peers[address]
                del self.byId[peer.peer_id]
        self._reported = reportDrops(self.counters, self._reported,
                                      f"port {self.remote_port}", self.sweeper.step)

    def close(self) -> defer.Deferred:
        if not self.closed and self.sweeper.running:
            self.sweeper.stopService()
        channel, carrier = self.carrierChannel, self.carrier
        self.carrierChannel = self.carrier = None
        if carrier is not None:
            carrier.close()
        elif channel is not None:
            channel.transport.loseConnection()
        self.peers.clear()
        self.byId.clear()
        return super().close()


def attachCarrier(registry: TunnelRegistry, msg: messages.DataChannel,
                  certificateName: Optional[str]) -> UdpTunnel:
    """
    The UDP mapping a C{data_channel} of protocol "udp" is to carry.

    @raise RegistrationRefused: a bad token, or no UDP mapping of that port
        for this client (it names another, or not the secret of the answer
        to its C{register}).
    """
    mine = registry._dataChannelOwner(msg, certificateName)
    tunnel = registry.tunnels.get(UdpTunnel.portKey(msg.remote_port))
    if (not isinstance(tunnel, UdpTunnel) or not mine(tunnel)
            or not tokensMatch(msg.conn_id or "", tunnel.carrierId)):
        raise RegistrationRefused(f"no UDP mapping of port {msg.remote_port} to carry")
    return tunnel

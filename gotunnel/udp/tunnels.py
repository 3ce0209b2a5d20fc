"""
UDP tunnels (issue 19; the wire extension is in docs/protocol.md).

A mapping registered with C{protocol: "udp"} is published by our server as a
UDP port.  Its datagrams travel in one TCP connection per mapping, the
I{carrying channel}: a C{data_channel} with C{protocol: "udp"} that, after
the server's answer, carries frames of C{[2-byte payload length][4-byte
peer id][payload]} both ways.  The server gives every remote address a peer
id; the client gives every peer id a session, a UDP socket of its own
connected to the local service, so that replies go back to the peer that
asked.

Nothing queues without bound: a datagram that arrives while the carrying
channel's write buffer is over Twisted's bound (the transport has paused us,
its producer) is dropped and counted, as are datagrams of new peers beyond
the cap on sessions.  Peers and sessions end after an idle timeout.
"""

from __future__ import annotations

import socket
import struct
from typing import Callable, Optional

from twisted.application.internet import TimerService
from twisted.internet import defer, error, tcp
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.logger import Logger
from zope.interface import implementer

from gotunnel.wire import messages
from gotunnel.server.access import tokensMatch
from gotunnel.server.accounting import REFUSED_SOURCE, DatagramCounters
from gotunnel.client.service import POOL_REFILL_DELAY, TunnelService
from gotunnel.wire.framing import MessageReceiver
from gotunnel.server.portpolicy import permitted
from gotunnel.relay.splice import setNoDelay
from gotunnel.relay.eagerio import twistedBuffered, writeThrough
from gotunnel.wire.printable import printable
from gotunnel.server.publicport import PublicPort
from gotunnel.server.service import (
    RegistrationRefused, Tunnel, TunnelRegistry, _whenFired,
)

log = Logger(namespace="gotunnel.udp")

HEADER = struct.Struct(">HI")
"""A frame's header: the payload's length, then the peer id."""

MAX_DATAGRAM = 65527
"""The largest UDP payload (65,535 less the 8-byte UDP header; IPv4's own
limit is 65,507).  A frame announcing more closes the carrying channel."""

READ_SIZE = 65536
"""What every UDP socket of ours reads at once: a whole datagram, never cut
(Twisted reads 8,192 bytes unless told)."""

MAX_PEER_ID = 0xFFFFFFFF

CARRIER_BUFFER = 512 * 1024
"""Bytes a carrying channel's transport buffers before it pauses us and
datagrams are dropped.  Twisted's default (64 KiB) is less than one read of
a busy UDP port (up to 256 KiB), which would drop most of every burst before
the kernel is even asked to take it."""

PUBLIC_SOCKET_BUFFER = 4 * 1024 * 1024
"""What we ask the kernel to buffer for a public UDP port, each way (it gives
at most net.core.rmem_max / wmem_max): a burst from many peers waits there
while the reactor is busy, rather than being dropped."""

SESSION_SOCKET_BUFFER = 256 * 1024
"""The same for a client session's socket, one per peer: smaller, as there
may be a thousand, and each carries one peer's replies."""

SWEEPS_PER_TIMEOUT = 4
"""How often, per idle timeout, idle peers and sessions are looked for."""


def udpLabel(remote_port: int) -> str:
    """How a UDP port's totals are labelled in the metrics and the admin API: C{udp:53}."""
    return f"udp:{remote_port}"


def enlargeBuffers(port, size: int) -> None:
    """Ask for C{size} bytes of kernel buffer on a UDP port's socket, each way."""
    handle = getattr(port, "socket", None)
    if handle is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            handle.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError:
            pass


def readInBatches(port, batch) -> None:
    """
    Call C{batch.batchStarted()} before and C{batch.batchEnded()} after each
    of C{port}'s reads: Twisted reads a UDP socket until it is empty (up to
    256 KiB), so that is one burst of datagrams, written on in one send
    (L{Carrier.cork}).  A port without C{doRead} (a test's) is read as it is.
    """
    doRead = getattr(port, "doRead", None)
    if doRead is None:
        return

    def doReadBatch():
        batch.batchStarted()
        try:
            return doRead()
        finally:
            batch.batchEnded()

    port.doRead = doReadBatch


def encodeFrame(peer_id: int, payload: bytes) -> bytes:
    """One frame of the carrying channel."""
    return HEADER.pack(len(payload), peer_id) + payload


class FrameDecoder:
    """
    Cuts a carrying channel's byte stream into datagrams.  It holds at most
    one partial frame.
    """

    def __init__(self, deliver: Callable[[int, bytes], None]) -> None:
        self.deliver = deliver
        self._buffer = b""

    def feed(self, data: bytes) -> Optional[str]:
        """
        Deliver every whole frame in what has come so far; a sentence saying
        what is wrong if a frame breaks the protocol (the channel must close).
        """
        buffer = self._buffer + data if self._buffer else data
        size = len(buffer)
        offset = 0
        deliver = self.deliver
        while size - offset >= HEADER.size:
            length, peer_id = HEADER.unpack_from(buffer, offset)
            if length > MAX_DATAGRAM:
                self._buffer = b""
                return f"a datagram frame of {length} bytes is over the limit of {MAX_DATAGRAM}"
            if peer_id == 0:
                self._buffer = b""
                return "a datagram frame with peer id 0"
            end = offset + HEADER.size + length
            if end > size:
                break
            deliver(peer_id, buffer[offset + HEADER.size:end])
            offset = end
        self._buffer = buffer[offset:]
        return None

    @property
    def buffered(self) -> int:
        return len(self._buffer)


@implementer(IPushProducer)
class Carrier:
    """
    One end of a carrying channel once its handshake is done: frames out,
    frames in.  It is the streaming producer of its transport, so it knows
    when the transport's buffer is over L{CARRIER_BUFFER}: then C{send} drops.
    """

    paused = False
    corked: Optional[list[bytes]] = None
    """The frames of the batch being read (see L{cork}), or None between batches."""
    room = 0
    """While corked: what the transport's buffer takes, less the frames held,
    before it is over its bound (see L{send})."""

    def __init__(self, transport, deliver: Callable[[int, bytes], None]) -> None:
        self.transport = transport
        self.decoder = FrameDecoder(deliver)
        # Under TLS the buffer that fills is the TCP transport's, below.
        self.tcp = None
        for layer in (transport, getattr(transport, "transport", None)):
            if hasattr(layer, "bufferSize"):
                layer.bufferSize = CARRIER_BUFFER
            if isinstance(layer, tcp.Connection):
                self.tcp = layer
        transport.registerProducer(self, True)

    def send(self, peer_id: int, payload: bytes) -> bool:
        """Write one datagram's frame; False (nothing written) while backed up."""
        if self.paused:
            return False
        frame = HEADER.pack(len(payload), peer_id) + payload
        if self.corked is None:
            self._write(frame)
            return True
        self.corked.append(frame)
        self.room -= len(frame)
        if self.room < 0:
            # Twisted pauses us only on a write: a batch held whole would
            # land on a buffer near its bound in one piece, as much as a
            # read takes (256 KiB) over it.  Written now, the frame that
            # crosses the bound is the last one taken.
            self._flush()
        return True

    def cork(self) -> None:
        """
        Hold the frames sent from now until L{uncork}, to write them in one
        send: a UDP socket's datagrams are read in batches (L{readInBatches}),
        and a burst in one send costs a fraction of a send each.  A batch is
        bounded by what Twisted reads in one go (256 KiB).
        """
        if self.corked is None:
            self.corked = []
            self.room = self._room()

    def uncork(self) -> None:
        """Write the frames held since L{cork}, in one send."""
        frames, self.corked = self.corked, None
        if frames:
            self._write(frames[0] if len(frames) == 1 else b"".join(frames))

    def _flush(self) -> None:
        """Write the frames held so far, and go on holding the batch's next ones."""
        self.uncork()
        self.cork()

    def _room(self) -> int:
        """What the buffer that fills takes before it is over its bound."""
        connection = self.tcp
        if connection is None:
            return CARRIER_BUFFER
        return connection.bufferSize - twistedBuffered(connection)

    def _write(self, data: bytes) -> None:
        # To the kernel now, not at the reactor's next turn (a lone datagram,
        # a query or a ping, waits for nothing; see gotunnel.relay.eagerio).
        writeThrough(self.transport, data)
        connection = self.tcp
        if (connection is not None and connection is not self.transport
                and connection.connected and not connection.disconnecting
                and twistedBuffered(connection)):
            # TLS: its records wait in the TCP transport below.
            connection.doWrite()

    def stop(self) -> None:
        self.corked = None

    def feed(self, data: bytes) -> Optional[str]:
        return self.decoder.feed(data)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True


def _reportDrops(counters: DatagramCounters, reported: dict[str, int], mapping: str,
                 seconds: float) -> dict[str, int]:
    """Log what was dropped since C{reported}; returns the new snapshot."""
    now = counters.snapshot()
    grown = {key: now[key] - reported.get(key, 0) for key in now}
    if grown["dropped_backed_up"] + grown["dropped_sessions"] + grown["dropped_unknown"]:
        log.warn("UDP {mapping}: dropped {backed_up} datagrams with the tunnel backed up, "
                 "{sessions} of new peers over the session limit, {unknown} for expired "
                 "peers, in {seconds:.0f} s", mapping=mapping,
                 backed_up=grown["dropped_backed_up"], sessions=grown["dropped_sessions"],
                 unknown=grown["dropped_unknown"], seconds=seconds)
    return now


# ---------------------------------------------------------------------------
# The server's side


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


class UdpTunnel(Tunnel):
    """
    A mapping published as a UDP port: its peers, and the carrying channel
    its client opened.  Registration, limits, offline/online and heartbeats
    are the TCP mapping's (L{Tunnel}); only listening and carrying differ.
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
        L{Tunnel.listen}.
        """
        self.online = True

        def listening(listens: bool) -> bool:
            if listens:
                log.info("public UDP port {remote_port} listening for {name}",
                         remote_port=self.remote_port, name=printable(self.name))
            return listens

        return self.publicPort().listen(self, PublicDatagrams(self)).addCallback(listening)

    def stopListening(self) -> defer.Deferred:
        """Stop publishing; the Deferred fires once the UDP port is closed."""
        self.online = False
        if self._retryCall is not None:
            self._retryCall.cancel()
            self._retryCall = None
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
            previousCarrier.stop()
            previous.transport.loseConnection()
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
        self._reported = _reportDrops(self.counters, self._reported,
                                      f"port {self.remote_port}", self.sweeper.step)

    def close(self) -> defer.Deferred:
        if not self.closed and self.sweeper.running:
            self.sweeper.stopService()
        channel, carrier = self.carrierChannel, self.carrier
        self.carrierChannel = self.carrier = None
        if carrier is not None:
            carrier.stop()
        if channel is not None:
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


# ---------------------------------------------------------------------------
# The client's side


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


class UdpTunnelService(TunnelService):
    """
    One UDP mapping: the control channel of L{TunnelService}, one carrying
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
                carrier.transport.loseConnection()
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
        self._reported = _reportDrops(self.counters, self._reported, str(self.mapping),
                                      self.sweeper.step)

    def _endSession(self, peer_id: int) -> None:
        session = self.sessions.pop(peer_id)
        if session.transport is not None:
            session.transport.stopListening()

    def closeSessions(self) -> None:
        for peer_id in list(self.sessions):
            self._endSession(peer_id)

    def stopService(self) -> defer.Deferred:
        self._cancelReopen()
        self.closeSessions()
        return super().stopService()

"""
UDP tunnels (issue 19): the datagram framing on string transports, the
server's and the client's ends on memory reactors and a Clock, and whole
tunnels over loopback: a DNS-like exchange, many peers, the largest
datagrams, a flood, a client restart, TLS, and a server without UDP.
"""

from __future__ import annotations

import json
import struct

from twisted.internet import defer, error, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from gotunnel import messages, udp
from gotunnel.client import TunnelClientService
from gotunnel.config import ClientSettings, Mapping, ServerSettings, parseMapping
from gotunnel.control import MessageReceiver
from gotunnel.server import ServerChannelFactory, TunnelRegistry

from .support import (
    HOST, TOKEN, LogWatcher, Tunnel, freePort, retryUntil, waitUntil, within,
)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def jsonFrame(**fields) -> bytes:
    return frame(json.dumps(fields, separators=(",", ":")).encode("utf-8"))


def register(remote_port: int = 10053, protocol: str = "udp", name: str = "edge-1") -> bytes:
    return jsonFrame(type="register", local_port=53, remote_port=remote_port,
                     protocol=protocol, token=TOKEN, name=name)


def carrierHandshake(remote_port: int = 10053, name: str = "edge-1") -> bytes:
    return jsonFrame(type="data_channel", local_port=53, remote_port=remote_port,
                     protocol="udp", token=TOKEN, name=name)


OK = frame(b'{"type":"register_resp","status":"ok"}')
UDP_OK = frame(b'{"type":"register_resp","status":"ok","protocol":"udp"}')


# ---------------------------------------------------------------------------
# The framing


class FrameDecoderTests(unittest.TestCase):
    def setUp(self):
        self.frames = []
        self.decoder = udp.FrameDecoder(lambda peer, payload: self.frames.append((peer, payload)))

    def test_roundTrip(self):
        """A frame is the payload's 2-byte length, the 4-byte peer id, the payload."""
        data = udp.encodeFrame(7, b"hello")
        self.assertEqual(data, b"\x00\x05\x00\x00\x00\x07hello")
        self.assertIsNone(self.decoder.feed(data))
        self.assertEqual(self.frames, [(7, b"hello")])

    def test_splitByteByByte(self):
        """Frames cut anywhere, even one byte at a time, come out whole and in order."""
        data = (udp.encodeFrame(1, b"a" * 300) + udp.encodeFrame(2, b"")
                + udp.encodeFrame(0xFFFFFFFF, b"xyz"))
        for i in range(len(data)):
            self.assertIsNone(self.decoder.feed(data[i:i + 1]))
        self.assertEqual(self.frames, [(1, b"a" * 300), (2, b""), (0xFFFFFFFF, b"xyz")])
        self.assertEqual(self.decoder.buffered, 0)

    def test_coalesced(self):
        """Many frames in one read are all delivered; a partial tail waits."""
        data = b"".join(udp.encodeFrame(i, bytes([i]) * i) for i in range(1, 50))
        tail = udp.encodeFrame(99, b"tail")
        self.assertIsNone(self.decoder.feed(data + tail[:5]))
        self.assertEqual(len(self.frames), 49)
        self.assertEqual(self.decoder.buffered, 5)
        self.decoder.feed(tail[5:])
        self.assertEqual(self.frames[-1], (99, b"tail"))

    def test_largestDatagram(self):
        """65,527 bytes (the largest UDP payload) is a valid frame."""
        payload = bytes(range(256)) * 255 + b"x" * (udp.MAX_DATAGRAM - 256 * 255)
        self.assertIsNone(self.decoder.feed(udp.encodeFrame(3, payload)))
        self.assertEqual(self.frames, [(3, payload)])

    def test_overLongFrame(self):
        """A length over the largest datagram is an error, and nothing is delivered."""
        why = self.decoder.feed(struct.pack(">HI", udp.MAX_DATAGRAM + 1, 1))
        self.assertIn("over the limit", why)
        self.assertEqual(self.frames, [])

    def test_peerIdZero(self):
        """Peer id 0 is never given: a frame naming it is an error."""
        self.assertIn("peer id 0", self.decoder.feed(udp.encodeFrame(0, b"x")))


class CarrierTests(unittest.TestCase):
    def test_dropsWhilePaused(self):
        """
        While the transport has paused its producer (its buffer is over the
        bound), send writes nothing and says so.
        """
        transport = StringTransport()
        carrier = udp.Carrier(transport, lambda *a: None)
        self.assertIs(transport.producer, carrier)
        self.assertTrue(transport.streaming)
        self.assertTrue(carrier.send(1, b"a"))
        carrier.pauseProducing()
        self.assertFalse(carrier.send(1, b"b"))
        carrier.resumeProducing()
        self.assertTrue(carrier.send(2, b"c"))
        self.assertEqual(transport.value(), udp.encodeFrame(1, b"a") + udp.encodeFrame(2, b"c"))


# ---------------------------------------------------------------------------
# The server, on a memory reactor


@implementer(IListeningPort)
class FakeUDPPort:
    """A UDP port that records what is written to it."""

    def __init__(self, port: int, protocol, interface: str) -> None:
        self.port = port
        self.protocol = protocol
        self.interface = interface
        self.written: list[tuple[bytes, object]] = []
        self.connected = None
        self.stopped = False
        protocol.makeConnection(self)

    def write(self, data: bytes, addr=None) -> None:
        self.written.append((data, addr or self.connected))

    def connect(self, host: str, port: int) -> None:
        self.connected = (host, port)

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        self.stopped = True
        self.protocol.doStop()

    def getHost(self):
        return IPv4Address("UDP", self.interface or "0.0.0.0", self.port)


class UDPReactor(MemoryReactorClock):
    """A memory reactor with UDP ports that record their datagrams."""

    def __init__(self) -> None:
        super().__init__()
        self.udpPorts: list[FakeUDPPort] = []
        self.nextPort = 50000

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        self.maxPacketSize = maxPacketSize
        if port == 0:
            self.nextPort += 1
            port = self.nextPort
        udpPort = FakeUDPPort(port, protocol, interface)
        self.udpPorts.append(udpPort)
        return udpPort


class ServerTests(unittest.TestCase):
    def setUp(self):
        self.reactor = UDPReactor()
        self.reactor.advance(1000)
        self.settings = ServerSettings(token=TOKEN, public_interface="203.0.113.5",
                                       udp_session_timeout=60, udp_max_sessions=3)
        self.registry = TunnelRegistry(self.settings, reactor=self.reactor)
        self.factory = ServerChannelFactory(self.registry)

    def connect(self):
        peer = IPv4Address("TCP", "192.0.2.10", 40000)
        transport = StringTransport(peerAddress=peer)
        channel = self.factory.buildProtocol(peer)
        channel.makeConnection(transport)
        return channel, transport

    def registered(self):
        control, transport = self.connect()
        control.dataReceived(register())
        self.assertEqual(transport.value(), UDP_OK)
        carrier, carrierTransport = self.connect()
        carrier.dataReceived(carrierHandshake())
        self.assertEqual(carrierTransport.value(), OK)
        carrierTransport.clear()
        [port] = self.reactor.udpPorts
        return port, carrier, carrierTransport

    def test_registerConfirmsUDP(self):
        """
        register with protocol udp is answered ok with protocol udp (and no
        pool), and the public port is a UDP port that reads whole datagrams;
        nothing listens on TCP.
        """
        control, transport = self.connect()
        control.dataReceived(register())
        self.assertEqual(transport.value(), UDP_OK)
        [port] = self.reactor.udpPorts
        self.assertEqual((port.port, port.interface), (10053, "203.0.113.5"))
        self.assertEqual(self.reactor.maxPacketSize, udp.READ_SIZE)
        self.assertEqual(self.reactor.tcpServers, [])

    def test_udpTurnedOff(self):
        """With server.udp off, a UDP mapping is refused as an unknown protocol."""
        self.settings.udp = False
        control, transport = self.connect()
        control.dataReceived(register())
        self.assertEqual(transport.value(), frame(
            b'{"type":"register_resp","status":"fail",'
            b'"reason":"protocol \'udp\' is not supported, only tcp"}'))
        self.assertEqual(self.reactor.udpPorts, [])

    def test_sameLimitsAsTCP(self):
        """allow_ports applies to UDP mappings as to TCP ones."""
        self.settings.allow_ports = (range(20000, 20001),)
        control, transport = self.connect()
        control.dataReceived(register())
        self.assertIn(b"remote port 10053 is not allowed on this server", transport.value())
        self.assertEqual(self.reactor.udpPorts, [])

    def test_datagramsBothWays(self):
        """
        Each remote address gets its own peer id; datagrams go to the client
        framed with it, and the client's frames go back to that address.
        """
        port, carrier, carrierTransport = self.registered()
        port.protocol.datagramReceived(b"query-a", ("198.51.100.1", 5000))
        port.protocol.datagramReceived(b"query-b", ("198.51.100.2", 5000))
        port.protocol.datagramReceived(b"query-a2", ("198.51.100.1", 5000))
        self.assertEqual(carrierTransport.value(), udp.encodeFrame(1, b"query-a")
                         + udp.encodeFrame(2, b"query-b") + udp.encodeFrame(1, b"query-a2"))
        carrier.dataReceived(udp.encodeFrame(2, b"answer-b") + udp.encodeFrame(1, b"answer-a"))
        self.assertEqual(port.written, [(b"answer-b", ("198.51.100.2", 5000)),
                                        (b"answer-a", ("198.51.100.1", 5000))])

    def test_badFrameClosesCarrier(self):
        """A frame longer than any datagram closes the carrying channel, and only it."""
        port, carrier, carrierTransport = self.registered()
        carrier.dataReceived(struct.pack(">HI", 65535, 1))
        self.assertTrue(carrierTransport.disconnecting)
        self.assertEqual(port.written, [])
        self.assertFalse(port.stopped)

    def test_peersCappedAndExpire(self):
        """
        Beyond udp_max_sessions peers, a new address's datagrams are dropped
        and counted; a peer idle for udp_session_timeout is forgotten, which
        makes room, and a reply to its old id is dropped.
        """
        port, carrier, carrierTransport = self.registered()
        tunnel = self.registry.tunnels[10053]
        for i in range(4):
            port.protocol.datagramReceived(b"x", ("198.51.100.1", 5000 + i))
        self.assertEqual(len(tunnel.peers), 3)
        self.assertEqual(tunnel.counters.dropped_sessions, 1)
        self.reactor.advance(30)
        port.protocol.datagramReceived(b"y", ("198.51.100.1", 5000))
        self.reactor.advance(45)
        self.assertEqual(list(tunnel.byId), [1])
        port.protocol.datagramReceived(b"z", ("198.51.100.1", 5003))
        self.assertEqual(sorted(tunnel.byId), [1, 4])
        carrier.dataReceived(udp.encodeFrame(2, b"late"))
        self.assertEqual(port.written, [])
        self.assertEqual(tunnel.counters.dropped_unknown, 1)

    def test_floodDropsWhenBackedUp(self):
        """
        While the carrying channel's transport has paused us, datagrams are
        dropped and counted, and nothing more is written to it.
        """
        port, carrier, carrierTransport = self.registered()
        tunnel = self.registry.tunnels[10053]
        carrierTransport.producer.pauseProducing()
        for i in range(1000):
            port.protocol.datagramReceived(b"f" * 1000, ("198.51.100.1", 5000))
        self.assertEqual(carrierTransport.value(), b"")
        self.assertEqual(tunnel.counters.dropped_backed_up, 1000)
        carrierTransport.producer.resumeProducing()
        port.protocol.datagramReceived(b"after", ("198.51.100.1", 5000))
        self.assertEqual(carrierTransport.value(), udp.encodeFrame(1, b"after"))

    def test_carrierOfAnotherPort(self):
        """A carrying channel for a port with no UDP mapping is refused."""
        self.registered()
        carrier, transport = self.connect()
        carrier.dataReceived(carrierHandshake(remote_port=10054))
        self.assertIn(b"no UDP mapping of port 10054 to carry", transport.value())

    def test_controlChannelLostClosesAll(self):
        """The control channel's end closes the UDP port and the carrying channel."""
        control, transport = self.connect()
        control.dataReceived(register())
        carrier, carrierTransport = self.connect()
        carrier.dataReceived(carrierHandshake())
        control.connectionLost(None)
        [port] = self.reactor.udpPorts
        self.assertTrue(port.stopped)
        self.assertTrue(carrierTransport.disconnecting)
        self.assertEqual(self.registry.tunnels, {})


class MappingTests(unittest.TestCase):
    def test_parseUdp(self):
        """--map udp:HOST:LOCAL:REMOTE is a UDP mapping; without udp: it is TCP."""
        self.assertEqual(parseMapping("udp:10.0.0.2:53:10053"),
                         Mapping("10.0.0.2", 53, 10053, "udp"))
        self.assertEqual(parseMapping("udp:53:10053"), Mapping("127.0.0.1", 53, 10053, "udp"))
        self.assertEqual(parseMapping("53:10053").protocol, "tcp")
        self.assertEqual(str(parseMapping("udp:53:10053")), "udp:127.0.0.1:53->10053")

    def test_registerResponseExtension(self):
        """register_resp's protocol is parsed and sent only when set."""
        self.assertEqual(messages.parse(b'{"type":"register_resp","status":"ok",'
                                        b'"protocol":"udp"}').protocol, "udp")
        self.assertEqual(messages.encode(messages.RegisterResp()),
                         b'{"type":"register_resp","status":"ok"}')
        self.assertRaises(messages.ProtocolError, messages.parse,
                          b'{"type":"register_resp","status":"ok","protocol":5}')


# ---------------------------------------------------------------------------
# Whole tunnels over loopback


class DnsResponder(DatagramProtocol):
    """
    A DNS-like service: answers each query (a 2-byte id and a name) with the
    id, the name and an address made from the name; counts its queries.
    """

    def __init__(self) -> None:
        self.sources: set = set()

    def datagramReceived(self, data: bytes, addr) -> None:
        self.sources.add(addr)
        self.transport.write(data + b"=A:192.0.2." + str(len(data)).encode(), addr)


class UdpEcho(DatagramProtocol):
    def datagramReceived(self, data: bytes, addr) -> None:
        self.transport.write(data, addr)


class UdpPeer(DatagramProtocol):
    """A remote peer: sends to the public port, collects what comes back."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagramReceived(self, data: bytes, addr) -> None:
        self.received.append(data)


def listenUdp(testCase, protocol) -> int:
    port = reactor.listenUDP(0, protocol, interface=HOST, maxPacketSize=udp.READ_SIZE)
    testCase.addCleanup(port.stopListening)
    return port.getHost().port


def freeUdpPort() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 now."""
    import socket
    while True:
        port = freePort()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        return port


@defer.inlineCallbacks
def exchange(peer: UdpPeer, port: int, payload: bytes, timeout: float = 10):
    """Send C{payload} to C{port} until an answer comes (the first may find no
    carrying channel yet); returns the first answer."""
    before = len(peer.received)

    def attempt():
        if len(peer.received) > before:
            return True
        peer.transport.write(payload, (HOST, port))
        return False

    yield retryUntil(attempt, timeout, "an answer through the UDP tunnel", interval=0.05)
    return peer.received[before]


class UdpTunnelTestCase(unittest.TestCase):
    def setUp(self):
        self.logs = LogWatcher(self)
        self.tunnel = Tunnel(self)

    def startClient(self, target: int, remote: int, **overrides) -> TunnelClientService:
        settings = ClientSettings(
            server=f"tcp:{HOST}:{self.tunnel.controlPort}", token=TOKEN, name="udp-client",
            mappings=[Mapping(HOST, target, remote, "udp")], pool_count=0)
        for key, value in overrides.items():
            setattr(settings, key, value)
        client = TunnelClientService(settings, reactor=reactor)
        client.startService()
        self.addCleanup(lambda: client.stopService() if client.running else None)
        return client

    @defer.inlineCallbacks
    def publish(self, service, serverOverrides=None, **clientOverrides):
        """A server, a UDP service and a client publishing it; (client, public port)."""
        if self.tunnel.server is None:
            yield self.tunnel.startServer(**(serverOverrides or {}))
        target = listenUdp(self, service)
        remote = freeUdpPort()
        client = self.startClient(target, remote, **clientOverrides)
        yield within(self.carrying(client), 10, "the carrying channel")
        return client, remote

    def carrying(self, client) -> defer.Deferred:
        tunnel = client.tunnels[0]
        return waitUntil(lambda: tunnel.carrierChannel is not None
                         and tunnel.carrierChannel.carrier is not None, 10,
                         "the carrying channel to be up")

    def peer(self) -> UdpPeer:
        peer = UdpPeer()
        listenUdp(self, peer)
        return peer


class UdpTunnelTests(UdpTunnelTestCase):
    @defer.inlineCallbacks
    def test_dnsQueryAndAnswer(self):
        """
        A DNS-like query sent to the public UDP port reaches the service on
        the client's side, and its answer comes back to the peer that asked.
        """
        responder = DnsResponder()
        client, public = yield self.publish(responder)
        peer = self.peer()
        answer = yield exchange(peer, public, b"\x12\x34example.com")
        self.assertEqual(answer, b"\x12\x34example.com=A:192.0.2.13")
        tunnel = self.tunnel.server.registry.tunnels[public]
        self.assertIsInstance(tunnel, udp.UdpTunnel)
        self.assertEqual(len(responder.sources), 1)

"""
UDP tunnels (issue 19): the datagram framing on string transports, the
server's and the client's ends on memory reactors and a Clock, and whole
tunnels over loopback: a DNS-like exchange, many peers, the largest
datagrams, a flood, a client restart, TLS, and a server without UDP.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from gotunnel.client.service import TunnelClientService
from gotunnel.config.mappings import Mapping, parseMapping
from gotunnel.config.settings import ClientSettings, ServerSettings
from gotunnel.relay.tcpinternals import twistedBuffered
from gotunnel.server.channel import ServerChannelFactory
from gotunnel.server.registry import TunnelRegistry
from gotunnel.udp.carrier import CARRIER_BUFFER, Carrier
from gotunnel.udp.client import CarrierChannel, UdpTunnelService
from gotunnel.udp.framing import HEADER, MAX_DATAGRAM, FrameDecoder, encodeFrame
from gotunnel.udp.server import PublicDatagrams, UdpTunnel
from gotunnel.udp.sockets import READ_SIZE, readInBatches
from gotunnel.wire import messages
from gotunnel.wire.framing import MessageReceiver

from .support import (
    HOST, TOKEN, LogWatcher, Tunnel, freeUdpPort, retryUntil, waitUntil, within,
)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def jsonFrame(**fields) -> bytes:
    return frame(json.dumps(fields, separators=(",", ":")).encode("utf-8"))


def register(remote_port: int = 10053, protocol: str = "udp", name: str = "edge-1") -> bytes:
    return jsonFrame(type="register", local_port=53, remote_port=remote_port,
                     protocol=protocol, token=TOKEN, name=name)


CARRIER_ID = "c0ffee0123456789"


def carrierHandshake(remote_port: int = 10053, name: str = "edge-1",
                     conn_id: str = CARRIER_ID) -> bytes:
    return jsonFrame(type="data_channel", local_port=53, remote_port=remote_port,
                     protocol="udp", token=TOKEN, name=name, conn_id=conn_id)


OK = frame(b'{"type":"register_resp","status":"ok"}')
UDP_OK = frame(b'{"type":"register_resp","status":"ok","protocol":"udp",'
               b'"conn_id":"c0ffee0123456789"}')


# ---------------------------------------------------------------------------
# The framing


class FrameDecoderTests(unittest.TestCase):
    def setUp(self):
        self.frames = []
        self.decoder = FrameDecoder(lambda peer, payload: self.frames.append((peer, payload)))

    def test_roundTrip(self):
        """A frame is the payload's 2-byte length, the 4-byte peer id, the payload."""
        data = encodeFrame(7, b"hello")
        self.assertEqual(data, b"\x00\x05\x00\x00\x00\x07hello")
        self.assertIsNone(self.decoder.feed(data))
        self.assertEqual(self.frames, [(7, b"hello")])

    def test_splitByteByByte(self):
        """Frames cut anywhere, even one byte at a time, come out whole and in order."""
        data = (encodeFrame(1, b"a" * 300) + encodeFrame(2, b"")
                + encodeFrame(0xFFFFFFFF, b"xyz"))
        for i in range(len(data)):
            self.assertIsNone(self.decoder.feed(data[i:i + 1]))
        self.assertEqual(self.frames, [(1, b"a" * 300), (2, b""), (0xFFFFFFFF, b"xyz")])
        self.assertEqual(self.decoder.buffered, 0)

    def test_coalesced(self):
        """Many frames in one read are all delivered; a partial tail waits."""
        data = b"".join(encodeFrame(i, bytes([i]) * i) for i in range(1, 50))
        tail = encodeFrame(99, b"tail")
        self.assertIsNone(self.decoder.feed(data + tail[:5]))
        self.assertEqual(len(self.frames), 49)
        self.assertEqual(self.decoder.buffered, 5)
        self.decoder.feed(tail[5:])
        self.assertEqual(self.frames[-1], (99, b"tail"))

    def test_largestDatagram(self):
        """65,527 bytes (the largest UDP payload) is a valid frame."""
        payload = bytes(range(256)) * 255 + b"x" * (MAX_DATAGRAM - 256 * 255)
        self.assertIsNone(self.decoder.feed(encodeFrame(3, payload)))
        self.assertEqual(self.frames, [(3, payload)])

    def test_overLongFrame(self):
        """A length over the largest datagram is an error, and nothing is delivered."""
        why = self.decoder.feed(struct.pack(">HI", MAX_DATAGRAM + 1, 1))
        self.assertIn("over the limit", why)
        self.assertEqual(self.frames, [])

    def test_peerIdZero(self):
        """Peer id 0 is never given: a frame naming it is an error."""
        self.assertIn("peer id 0", self.decoder.feed(encodeFrame(0, b"x")))


class CarrierTests(unittest.TestCase):
    def test_dropsWhilePaused(self):
        """
        While the transport has paused its producer (its buffer is over the
        bound), send writes nothing and says so.
        """
        transport = StringTransport()
        carrier = Carrier(transport, lambda *a: None)
        self.assertIs(transport.producer, carrier)
        self.assertTrue(transport.streaming)
        self.assertTrue(carrier.send(1, b"a"))
        carrier.pauseProducing()
        self.assertFalse(carrier.send(1, b"b"))
        carrier.resumeProducing()
        self.assertTrue(carrier.send(2, b"c"))
        self.assertEqual(transport.value(), encodeFrame(1, b"a") + encodeFrame(2, b"c"))


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
        self.socket = self
        protocol.makeConnection(self)

    def write(self, data: bytes, addr=None) -> None:
        self.written.append((data, addr or self.connected))

    def sendto(self, data: bytes, addr) -> None:
        self.written.append((data, addr))

    def setsockopt(self, *args) -> None:
        pass

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


class ServerTestCase(unittest.TestCase):
    def setUp(self):
        self.reactor = UDPReactor()
        self.reactor.advance(1000)
        self.settings = ServerSettings(token=TOKEN, public_interface="203.0.113.5",
                                       udp_session_timeout=60, udp_max_sessions=3)
        self.registry = TunnelRegistry(self.settings, reactor=self.reactor)
        self.factory = ServerChannelFactory(self.registry)
        self.patch(self.registry, "newConnectionId", lambda: CARRIER_ID)

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


class ServerTests(ServerTestCase):
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
        self.assertEqual(self.reactor.maxPacketSize, READ_SIZE)
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
        self.assertEqual(carrierTransport.value(), encodeFrame(1, b"query-a")
                         + encodeFrame(2, b"query-b") + encodeFrame(1, b"query-a2"))
        carrier.dataReceived(encodeFrame(2, b"answer-b") + encodeFrame(1, b"answer-a"))
        self.assertEqual(port.written, [(b"answer-b", ("198.51.100.2", 5000)),
                                        (b"answer-a", ("198.51.100.1", 5000))])

    def test_sourceListsHoldForDatagrams(self):
        """A new peer that the server's source lists refuse gets no session, counted."""
        self.settings.deny_sources = (ipaddress.ip_network("198.51.100.0/24"),)
        port, carrier, carrierTransport = self.registered()
        port.protocol.datagramReceived(b"query-a", ("198.51.100.1", 5000))
        port.protocol.datagramReceived(b"query-b", ("192.0.2.7", 5000))
        self.assertEqual(carrierTransport.value(), encodeFrame(1, b"query-b"))
        tunnel = self.registry.tunnels[("udp", 10053)]
        self.assertEqual((tunnel.refusals.total, tunnel.stats.refused),
                         (1, {"source_address": 1}))

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
        tunnel = self.registry.tunnels[("udp", 10053)]
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
        carrier.dataReceived(encodeFrame(2, b"late"))
        self.assertEqual(port.written, [])
        self.assertEqual(tunnel.counters.dropped_unknown, 1)

    def test_floodDropsWhenBackedUp(self):
        """
        While the carrying channel's transport has paused us, datagrams are
        dropped and counted, and nothing more is written to it.
        """
        port, carrier, carrierTransport = self.registered()
        tunnel = self.registry.tunnels[("udp", 10053)]
        carrierTransport.producer.pauseProducing()
        for i in range(1000):
            port.protocol.datagramReceived(b"f" * 1000, ("198.51.100.1", 5000))
        self.assertEqual(carrierTransport.value(), b"")
        self.assertEqual(tunnel.counters.dropped_backed_up, 1000)
        carrierTransport.producer.resumeProducing()
        port.protocol.datagramReceived(b"after", ("198.51.100.1", 5000))
        self.assertEqual(carrierTransport.value(), encodeFrame(1, b"after"))

    def test_dropsLogged(self):
        """
        What was dropped is logged once per sweep (a quarter of the timeout),
        by reason, and not again while nothing more is dropped.
        """
        logs = LogWatcher(self)
        port, carrier, carrierTransport = self.registered()
        carrierTransport.producer.pauseProducing()
        for i in range(5):
            port.protocol.datagramReceived(b"x", ("198.51.100.1", 5000 + i))
        self.reactor.advance(15)
        dropped = logs.matching(LogWatcher.formatted("UDP {mapping}: dropped"))
        self.assertEqual([(e["mapping"], e["backed_up"], e["sessions"]) for e in dropped],
                         [("port 10053", 3, 2)])
        self.reactor.advance(15)
        self.assertEqual(len(logs.matching(LogWatcher.formatted("UDP {mapping}: dropped"))), 1)

    def test_offlineAndOnline(self):
        """offline_port closes the public UDP port; online_port binds it again."""
        control, transport = self.connect()
        control.dataReceived(register())
        control.dataReceived(jsonFrame(type="offline_port", port=10053))
        [first] = self.reactor.udpPorts
        self.assertTrue(first.stopped)
        control.dataReceived(jsonFrame(type="online_port", port=10053))
        [_, second] = self.reactor.udpPorts
        self.assertEqual(second.port, 10053)
        self.assertFalse(second.stopped)

    def test_secondCarrierReplacesFirst(self):
        """A new carrying channel takes over; the old one is closed and what it sends ignored."""
        port, carrier, carrierTransport = self.registered()
        port.protocol.datagramReceived(b"q", ("198.51.100.1", 5000))
        newer, newerTransport = self.connect()
        newer.dataReceived(carrierHandshake())
        self.assertTrue(carrierTransport.disconnecting)
        carrier.dataReceived(encodeFrame(1, b"from the old one"))
        newer.dataReceived(encodeFrame(1, b"from the new one"))
        self.assertEqual(port.written, [(b"from the new one", ("198.51.100.1", 5000))])
        carrier.connectionLost(None)
        port.protocol.datagramReceived(b"q2", ("198.51.100.1", 5000))
        self.assertEqual(newerTransport.value(), OK + encodeFrame(1, b"q2"))

    def test_noPoolNorUsersForUdp(self):
        """
        A UDP mapping takes no pooled data channel, and a TCP data channel
        (a Go client's) finds no user waiting on it.
        """
        self.registered()
        pooled, transport = self.connect()
        pooled.dataReceived(jsonFrame(type="data_channel", local_port=53, remote_port=10053,
                                      protocol="", token=TOKEN, name="edge-1", pooled=True))
        self.assertIn(b"no mapping of port 10053 to pool for", transport.value())
        goData, transport = self.connect()
        goData.dataReceived(jsonFrame(type="data_channel", local_port=53, remote_port=10053,
                                      protocol="", token=TOKEN, name="edge-1"))
        self.assertIn(b"no user is waiting for this data channel", transport.value())

    def test_carrierNeedsTheSecret(self):
        """
        A carrying channel without the secret of the answer to register, or
        with another, is refused: holding the shared token is not enough to
        take a mapping's datagrams.
        """
        port, carrier, carrierTransport = self.registered()
        for conn_id in (None, "0123456789abcdef"):
            thief, transport = self.connect()
            thief.dataReceived(jsonFrame(
                type="data_channel", local_port=53, remote_port=10053, protocol="udp",
                token=TOKEN, name="edge-1", **({"conn_id": conn_id} if conn_id else {})))
            self.assertIn(b"no UDP mapping of port 10053 to carry", transport.value())
        self.assertFalse(carrierTransport.disconnecting)

    def test_leaseHoldsTheUdpPort(self):
        """
        A UDP mapping whose client vanishes has its port number leased to
        that client, as a TCP mapping does: another client is refused until
        the lease ends, and the first one gets its port back.
        """
        self.settings.port_lease = 30
        control, transport = self.connect()
        control.dataReceived(register(name="edge-1"))
        control.connectionLost(None)
        other, otherTransport = self.connect()
        other.dataReceived(register(name="edge-2"))
        self.assertIn(b"remote port 10053 is reserved for the client that had it",
                      otherTransport.value())
        back, backTransport = self.connect()
        back.dataReceived(register(name="edge-1"))
        self.assertEqual(backTransport.value(), UDP_OK)
        self.assertEqual([p.stopped for p in self.reactor.udpPorts], [True, False])

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


class PortNumberTests(ServerTestCase):
    """A port number's UDP port and its TCP port are two ports, registered apart."""

    def setUp(self):
        super().setUp()
        self.settings.port_lease = 30

    def registerBoth(self, udpName: str = "edge-1", tcpName: str = "edge-2"):
        udpControl, udpTransport = self.connect()
        udpControl.dataReceived(register(name=udpName))
        tcpControl, tcpTransport = self.connect()
        tcpControl.dataReceived(register(protocol="tcp", name=tcpName))
        return (udpControl, udpTransport), (tcpControl, tcpTransport)

    def test_tcpAndUdpOfOneNumberByTwoClients(self):
        """
        One client publishes UDP 10053 and another TCP 10053 at once; each
        port's channels find their own mapping, and closing one leaves the
        other open.
        """
        (udpControl, udpTransport), (tcpControl, tcpTransport) = self.registerBoth()
        self.assertEqual(udpTransport.value(), UDP_OK)
        self.assertIn(b'"status":"ok"', tcpTransport.value())
        self.assertEqual([p.port for p in self.reactor.udpPorts], [10053])
        self.assertEqual([p[0] for p in self.reactor.tcpServers], [10053])
        udpTunnel = self.registry.tunnels[("udp", 10053)]
        tcpTunnel = self.registry.tunnels[10053]
        self.assertEqual((udpTunnel.name, tcpTunnel.name), ("edge-1", "edge-2"))
        carrier, carrierTransport = self.connect()
        carrier.dataReceived(carrierHandshake())
        self.assertEqual(carrierTransport.value(), OK)
        pooled, pooledTransport = self.connect()
        pooled.dataReceived(jsonFrame(type="data_channel", local_port=53, remote_port=10053,
                                      token=TOKEN, name="edge-2", pooled=True))
        self.assertEqual(list(tcpTunnel.pool), [pooled])
        tcpControl.connectionLost(None)
        self.assertFalse(self.reactor.udpPorts[0].stopped)
        self.assertIs(self.registry.tunnels[("udp", 10053)], udpTunnel)
        self.assertNotIn(10053, self.registry.tunnels)

    def test_tcpAndUdpOfOneNumberByOneClient(self):
        """The same client publishes TCP 10053 and UDP 10053: two mappings."""
        (_, udpTransport), (_, tcpTransport) = self.registerBoth("edge-1", "edge-1")
        self.assertEqual(udpTransport.value(), UDP_OK)
        self.assertIn(b'"status":"ok"', tcpTransport.value())
        self.assertEqual(sorted(map(str, self.registry.tunnels)), ["('udp', 10053)", "10053"])

    def test_mappingLimitCountsBoth(self):
        """
        max_mappings_per_client counts the TCP and the UDP port of a number
        as two mappings; registering the same UDP port again replaces it.
        """
        self.settings.max_mappings_per_client = 1
        (udpControl, udpTransport), (_, tcpTransport) = self.registerBoth("edge-1", "edge-1")
        self.assertEqual(udpTransport.value(), UDP_OK)
        self.assertIn(b"too many mappings for client 'edge-1'", tcpTransport.value())
        again, againTransport = self.connect()
        again.dataReceived(register(name="edge-1"))
        self.assertEqual(againTransport.value(), UDP_OK)

    def test_leasesApart(self):
        """
        A lease on UDP 10053 holds UDP 10053 only: another client may take
        TCP 10053 meanwhile, not UDP 10053; and the other way round.
        """
        (udpControl, _), (tcpControl, _) = self.registerBoth("edge-1", "edge-2")
        udpControl.connectionLost(None)
        tcpControl.connectionLost(None)
        self.assertEqual(sorted((lease.protocol, lease.name) for lease in self.registry.leases),
                         [("tcp", "edge-2"), ("udp", "edge-1")])
        (_, udpTransport), (_, tcpTransport) = self.registerBoth("edge-2", "edge-1")
        self.assertIn(b"remote port 10053 is reserved for the client that had it",
                      udpTransport.value())
        self.assertIn(b"remote port 10053 is reserved for the client that had it",
                      tcpTransport.value())
        (_, udpTransport), (_, tcpTransport) = self.registerBoth("edge-1", "edge-2")
        self.assertEqual(udpTransport.value(), UDP_OK)
        self.assertIn(b'"status":"ok"', tcpTransport.value())
        self.assertEqual(len(self.registry.leases), 0)

    def test_tcpGroupLeavesUdpAlone(self):
        """A TCP port served by a group does not stop a UDP mapping of its number."""
        group, groupTransport = self.connect()
        group.dataReceived(jsonFrame(type="register", local_port=53, remote_port=10053,
                                     protocol="tcp", token=TOKEN, name="edge-2",
                                     group="g", group_key="k"))
        self.assertIn(b'"status":"ok"', groupTransport.value())
        control, transport = self.connect()
        control.dataReceived(register(name="edge-1"))
        self.assertEqual(transport.value(), UDP_OK)


class UdpAccountingTests(ServerTestCase):
    """
    A UDP port's datagrams, drops and sessions in /metrics and the admin
    API's port listing, apart from the TCP port of its number.
    """

    ADMIN_TOKEN = "udp-admin-Token-0x53"

    def setUp(self):
        super().setUp()
        from gotunnel.admin.api import AdminAPI
        from gotunnel.admin.auth import AdminAuth
        from gotunnel.admin.metrics import MetricsPage

        auth = AdminAuth(self.ADMIN_TOKEN, "", "", self.reactor)
        self.api = AdminAPI(self.registry, auth)
        self.metrics = MetricsPage(self.registry, auth)

    def call(self, path: str, method: bytes = b"GET"):
        from tests.test_admin_api import request

        req = request(path, method, self.ADMIN_TOKEN)
        resource = self.metrics if path == "/metrics" else self.api
        result = resource.render(req)
        if isinstance(result, bytes):
            req.write(result)
            req.finish()
        self.assertTrue(req.finished)
        return req.responseCode or 200, b"".join(req.written).decode()

    def scrape(self) -> dict:
        from prometheus_client.parser import text_string_to_metric_families

        code, body = self.call("/metrics")
        self.assertEqual(code, 200)
        return {(sample.name, frozenset(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(body)
                for sample in family.samples}

    def traffic(self):
        """Two peers, one reply, one of each drop; and a TCP mapping of the same number."""
        port, carrier, carrierTransport = self.registered()
        tcp, tcpTransport = self.connect()
        tcp.dataReceived(register(protocol="tcp", name="edge-2"))
        port.protocol.datagramReceived(b"q1", ("198.51.100.1", 5000))
        port.protocol.datagramReceived(b"q2", ("198.51.100.2", 5000))
        port.protocol.datagramReceived(b"q3", ("198.51.100.2", 5000))
        carrier.dataReceived(encodeFrame(1, b"a1") + encodeFrame(9, b"lost"))
        for i in range(3):
            port.protocol.datagramReceived(b"new", ("198.51.100.3", 6000 + i))
        carrierTransport.producer.pauseProducing()
        port.protocol.datagramReceived(b"q4", ("198.51.100.1", 5000))
        return port, carrier

    def test_metrics(self):
        """
        gotunnel_udp_datagrams_total by direction, gotunnel_udp_dropped_total
        by reason and gotunnel_udp_sessions, labelled remote_port="udp:10053";
        the TCP port of that number has none of them.
        """
        self.traffic()
        samples = self.scrape()
        port = {("remote_port", "udp:10053"), ("client", "edge-1")}

        def value(name, **labels):
            return samples[(name, frozenset(labels.items()) | frozenset(port))]

        self.assertEqual(value("gotunnel_udp_datagrams_total", direction="in"), 4)
        self.assertEqual(value("gotunnel_udp_datagrams_total", direction="out"), 1)
        self.assertEqual(value("gotunnel_udp_dropped_total", reason="backed_up"), 1)
        self.assertEqual(value("gotunnel_udp_dropped_total", reason="sessions"), 2)
        self.assertEqual(value("gotunnel_udp_dropped_total", reason="unknown_peer"), 1)
        self.assertEqual(value("gotunnel_udp_sessions"), 3)
        udpSeries = {dict(labels)["remote_port"] for name, labels in samples
                     if name.startswith("gotunnel_udp_")}
        self.assertEqual(udpSeries, {"udp:10053"})
        self.assertEqual(samples[("gotunnel_connections_opened_total", frozenset(
            {("remote_port", "10053"), ("client", "edge-2")}))], 0)
        self.reactor.advance(61)
        self.assertEqual(self.scrape()[("gotunnel_udp_sessions", frozenset(port))], 0)

    def test_countersOutliveARegistration(self):
        """The same client registering its UDP port again keeps counting from where it was."""
        self.traffic()
        again, transport = self.connect()
        again.dataReceived(register())
        self.assertEqual(transport.value(), UDP_OK)
        key = ("gotunnel_udp_datagrams_total", frozenset(
            {("remote_port", "udp:10053"), ("client", "edge-1"), ("direction", "in")}))
        self.assertEqual(self.scrape()[key], 4)

    def test_portListing(self):
        """
        /api/ports lists the UDP port with protocol "udp", its sessions,
        datagrams and drops, next to the TCP port of its number; a leased
        UDP port keeps its counts; udp:10053 names it in the actions.
        """
        self.settings.port_lease = 30
        self.traffic()
        code, body = self.call("/api/ports")
        self.assertEqual(code, 200)
        ports = json.loads(body)["ports"]
        self.assertEqual([(p["remote_port"], p.get("protocol"), p["client"]) for p in ports],
                         [(10053, "udp", "edge-1"), (10053, None, "edge-2")])
        self.assertEqual(ports[0]["udp"], {
            "sessions": 3, "datagrams_in": 4, "datagrams_out": 1,
            "dropped": {"backed_up": 1, "sessions": 2, "unknown_peer": 1}})
        self.assertNotIn("udp", ports[1])
        [udpClient] = [c for c in json.loads(self.call("/api/clients")[1])["clients"]
                       if c["name"] == "edge-1"]
        self.assertEqual(udpClient["mappings"],
                         [{"remote_port": 10053, "local_port": 53, "protocol": "udp"}])
        self.assertEqual(self.call("/api/ports/udp:10053/offline", b"POST")[0], 200)
        self.assertTrue(self.reactor.udpPorts[0].stopped)
        self.assertEqual(len(self.reactor.tcpServers), 1)
        self.registry.tunnels[("udp", 10053)].channel.connectionLost(None)
        [leased] = [p for p in json.loads(self.call("/api/ports")[1])["ports"]
                    if p["state"] == "leased"]
        self.assertEqual((leased["protocol"], leased["udp"]["datagrams_in"],
                          leased["udp"]["sessions"]), ("udp", 4, 0))


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
    port = reactor.listenUDP(0, protocol, interface=HOST, maxPacketSize=READ_SIZE)
    testCase.addCleanup(port.stopListening)
    return port.getHost().port


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

    @defer.inlineCallbacks
    def echoLargest(self, peer: UdpPeer, public: int, count: int = 10):
        """Datagrams of 65,507 bytes, one at a time: each must come back whole."""
        for i in range(count):
            payload = bytes([i]) * 65507
            before = len(peer.received)
            peer.transport.write(payload, (HOST, public))
            yield waitUntil(lambda: len(peer.received) > before, 10,
                            f"the echo of datagram {i} of 65,507 bytes")
            self.assertEqual(peer.received[-1], payload)


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
        tunnel = self.tunnel.server.registry.tunnels[("udp", public)]
        self.assertIsInstance(tunnel, UdpTunnel)
        self.assertEqual(len(responder.sources), 1)

    @defer.inlineCallbacks
    def test_manyPeersEachGetTheirOwnReplies(self):
        """
        Twenty peers at once, each with queries of its own: every peer gets
        exactly its own answers, and the service sees one source (a session
        socket on the client) per peer.
        """
        responder = DnsResponder()
        client, public = yield self.publish(responder)
        peers = [self.peer() for _ in range(20)]
        yield exchange(peers[0], public, b"warm-up")
        for round in range(3):
            for i, peer in enumerate(peers):
                peer.transport.write(b"peer-%d-query-%d" % (i, round), (HOST, public))
        yield waitUntil(lambda: all(len(p.received) >= 3 for p in peers[1:])
                        and len(peers[0].received) >= 4, 10, "every peer's answers")
        for i, peer in enumerate(peers):
            mine = [a for a in peer.received if a.startswith(b"peer-%d-" % i)]
            self.assertEqual(len(mine), 3, peer.received)
            self.assertEqual(len(peer.received), 3 + (i == 0), peer.received)
        self.assertEqual(len(responder.sources), 20)
        self.assertEqual(len(client.tunnels[0].sessions), 20)

    @defer.inlineCallbacks
    def test_largestDatagrams(self):
        """
        Datagrams of 65,507 bytes (IPv4's largest) go through whole and come
        back whole: every one, on an idle tunnel, none resent.
        """
        client, public = yield self.publish(UdpEcho())
        peer = self.peer()
        yield exchange(peer, public, b"warm-up")
        yield self.echoLargest(peer, public)
        self.assertEqual(client.tunnels[0].counters.dropped, 0)
        self.assertEqual(self.tunnel.server.registry.tunnels[("udp", public)].counters.dropped, 0)

    def test_floodDropsInsteadOfBuffering(self):
        """
        With the client not reading its carrying channel, a flood of
        datagrams fills the kernel's buffers, then is dropped and counted at
        the server's splice thread: what waits in user space for the
        carrying channel stays within the bound plus one frame.  Once the
        client reads again, the tunnel answers.
        """
        return self.flood(serverThread=True)

    def test_floodDropsInsteadOfBufferingInTheReactor(self):
        """The same, with the server's datagrams moved by its reactor."""
        return self.flood(serverThread=False)

    @defer.inlineCallbacks
    def flood(self, serverThread: bool):
        client, public = yield self.publish(UdpEcho())
        peer = self.peer()
        yield exchange(peer, public, b"warm-up")
        server = self.tunnel.server.registry.tunnels[("udp", public)]
        yield waitUntil(lambda: server.carrier.pump.handedOff, 10, "the server's pump in its thread")
        if not serverThread:
            server.carrier.pump.stop()
        clientChannel = client.tunnels[0].carrierChannel
        # The client's reactor reads the channel from now on, so that
        # pausing its transport stops the reads.
        clientChannel.carrier.pump.stop()
        clientChannel.transport.pauseProducing()
        transport = server.carrierChannel.transport
        bound = transport.bufferSize + HEADER.size + MAX_DATAGRAM
        largest = 0

        def flood():
            nonlocal largest
            for _ in range(200):
                peer.transport.write(b"f" * 1400, (HOST, public))
            with server.carrier.pump.lock:
                buffered = twistedBuffered(transport) + len(server.carrier.pump.pending)
            largest = max(largest, buffered)
            return server.counters.dropped_backed_up > 1000

        yield retryUntil(flood, 30, "the server to drop datagrams", interval=0.002)
        self.assertEqual(server.carrier.pump.handedOff, serverThread)
        self.assertLessEqual(largest, bound)
        self.assertGreater(server.counters.forwarded, 0)
        clientChannel.transport.resumeProducing()
        answer = yield exchange(peer, public, b"after the flood", timeout=20)
        self.assertIn(answer, (b"f" * 1400, b"after the flood"))

    @defer.inlineCallbacks
    def test_clientRestart(self):
        """
        A client that stops and starts again publishes the port again, and
        the same peer gets answers through the new client.
        """
        client, public = yield self.publish(UdpEcho())
        peer = self.peer()
        self.assertEqual((yield exchange(peer, public, b"one")), b"one")
        target = client.tunnels[0].mapping.local_port
        yield client.stopService()
        second = self.startClient(target, public)
        yield within(self.carrying(second), 10, "the second client's carrying channel")
        answer = yield exchange(peer, public, b"two")
        self.assertEqual(answer, b"two")


class GoServerChannel(MessageReceiver):
    """A server that speaks as the Go gotunnel: a plain ok to every register."""

    def msg_register(self, msg: messages.Register) -> None:
        self.factory.registers.append(msg)
        self.sendMessage(messages.RegisterResp(status="ok"))

    def msg_data_channel(self, msg: messages.DataChannel) -> None:
        self.factory.dataChannels.append(msg)
        self.transport.loseConnection()

    def msg_ping(self, msg: messages.Ping) -> None:
        self.sendMessage(messages.Pong(time=msg.time))


class GoServerFactory(Factory):
    protocol = GoServerChannel

    def __init__(self) -> None:
        self.registers: list[messages.Register] = []
        self.dataChannels: list[messages.DataChannel] = []


class ServerWithoutUdpTests(UdpTunnelTestCase):
    @defer.inlineCallbacks
    def test_goServerPlainOk(self):
        """
        A server that answers a UDP register with a plain ok (the Go server,
        which opens a TCP port) gets one clear line; the client withdraws
        that mapping (closes its control channel, never registers it again,
        opens no carrying channel) and keeps its TCP mapping.
        """
        factory = GoServerFactory()
        port = reactor.listenTCP(0, factory, interface=HOST)
        self.addCleanup(port.stopListening)
        self.tunnel.controlPort = port.getHost().port
        settings = ClientSettings(
            server=f"tcp:{HOST}:{self.tunnel.controlPort}", token=TOKEN, name="c",
            mappings=[Mapping(HOST, 53, 10053, "udp"), Mapping(HOST, 22, 10022)], pool_count=0)
        client = TunnelClientService(settings, reactor=reactor)
        client.startService()
        self.addCleanup(client.stopService)
        udpTunnel, tcpTunnel = client.tunnels
        yield within(self.logs.whenMatched(LogWatcher.formatted(
            "the server answered {mapping} without confirming UDP",
            mapping="udp:127.0.0.1:53->10053")), 10, "the line saying the server has no UDP")
        yield within(tcpTunnel.whenRegistered(), 10, "the TCP mapping")
        yield waitUntil(lambda: udpTunnel.channel is None and not udpTunnel.connector.running,
                        10, "the UDP mapping to be withdrawn")
        self.assertTrue(udpTunnel.withdrawn)
        self.assertEqual([r.protocol for r in factory.registers], ["udp", "tcp"])
        self.assertEqual(factory.dataChannels, [])
        self.assertIsNotNone(tcpTunnel.channel)

    @defer.inlineCallbacks
    def test_ourServerWithUdpOff(self):
        """Our server with --no-udp refuses the mapping with its reason."""
        yield self.tunnel.startServer(udp=False)
        client = self.startClient(53, freeUdpPort())
        yield within(self.logs.whenMatched(LogWatcher.formatted(
            "the server refused {mapping}: {reason}",
            reason="protocol 'udp' is not supported, only tcp")), 10, "the refusal")
        self.assertIsNone(client.tunnels[0].channel)


class ClientSessionTests(unittest.TestCase):
    """A UDP mapping's client end on a memory reactor: sessions, their cap and expiry."""

    def setUp(self):
        self.reactor = UDPReactor()
        settings = ClientSettings(token=TOKEN, name="c", udp_session_timeout=60,
                                  udp_max_sessions=2)
        self.tunnel = UdpTunnelService(settings, Mapping("10.0.0.2", 53, 10053, "udp"),
                                           None, self.reactor)
        self.tunnel.sweeper.startService()
        self.addCleanup(self.tunnel.sweeper.stopService)

    def test_sessionPerPeer(self):
        """
        Each peer id gets a UDP socket of its own connected to the local
        service, reading whole datagrams; a peer's datagrams go out of its socket.
        """
        self.tunnel.fromServer(1, b"a")
        self.tunnel.fromServer(2, b"b")
        self.tunnel.fromServer(1, b"c")
        first, second = self.reactor.udpPorts
        self.assertEqual(first.connected, ("10.0.0.2", 53))
        self.assertEqual(first.written, [(b"a", ("10.0.0.2", 53)), (b"c", ("10.0.0.2", 53))])
        self.assertEqual(second.written, [(b"b", ("10.0.0.2", 53))])
        self.assertEqual(self.reactor.maxPacketSize, READ_SIZE)

    def test_sessionsCapped(self):
        """Beyond udp_max_sessions, a new peer's datagrams are dropped and counted."""
        for peer in (1, 2, 3, 3):
            self.tunnel.fromServer(peer, b"x")
        self.assertEqual(len(self.reactor.udpPorts), 2)
        self.assertEqual(self.tunnel.counters.dropped_sessions, 2)

    def test_sessionExpires(self):
        """
        A session idle for udp_session_timeout is closed (its socket too);
        one kept busy, by either direction, stays.
        """
        self.tunnel.fromServer(1, b"a")
        self.tunnel.fromServer(2, b"b")
        first, second = self.reactor.udpPorts
        self.reactor.advance(45)
        second.protocol.datagramReceived(b"reply", ("10.0.0.2", 53))
        self.reactor.advance(30)
        self.assertEqual(list(self.tunnel.sessions), [2])
        self.assertTrue(first.stopped)
        self.assertFalse(second.stopped)
        self.reactor.advance(60)
        self.assertEqual(self.tunnel.sessions, {})

    def test_replyWithoutCarrierDropped(self):
        """A reply with no carrying channel up is dropped and counted, not kept."""
        self.tunnel.fromServer(1, b"a")
        [port] = self.reactor.udpPorts
        port.protocol.datagramReceived(b"reply", ("10.0.0.2", 53))
        self.assertEqual(self.tunnel.counters.dropped_backed_up, 1)

    def test_badFrameClosesCarrier(self):
        """On the client too, a frame longer than any datagram closes the carrying channel."""
        channel = CarrierChannel(self.tunnel)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(OK + struct.pack(">HI", 65534, 9) + b"x" * 10)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.reactor.udpPorts, [])


class UdpOverTLSTests(UdpTunnelTestCase):
    STOP_WAIT = 30
    """Seconds a stop may take; the services' shutdown_timeout is three times that."""

    @defer.inlineCallbacks
    def publishOverTLS(self, **serverOverrides):
        """A TLS server and a client publishing a UDP echo through it; (client, public port)."""
        from .support import temporaryDirectory
        from .test_tls import makeCertificates, sslListen, tlsServer, trustDirectory

        certificates = temporaryDirectory(self)
        makeCertificates(certificates, "--ip", HOST)
        trust = trustDirectory(self, certificates)
        yield self.tunnel.startServer(listen=sslListen(certificates), **serverOverrides)
        client, public = yield self.publish(
            UdpEcho(), server=tlsServer(HOST, self.tunnel.controlPort, trust),
            shutdown_timeout=3 * self.STOP_WAIT)
        return client, public

    @defer.inlineCallbacks
    def test_carryingChannelIsTLS(self):
        """
        Under TLS the carrying channel is a TLS connection too (the data
        channels' endpoint), and datagrams of every size go through it.
        """
        from twisted.internet.interfaces import ISSLTransport

        client, public = yield self.publishOverTLS()
        peer = self.peer()
        self.assertEqual((yield exchange(peer, public, b"over tls")), b"over tls")
        for size in (0, 1400, 65507):
            payload = b"t" * size
            count = len(peer.received)
            peer.transport.write(payload, (HOST, public))
            yield waitUntil(lambda: len(peer.received) > count, 10, f"{size} bytes over TLS")
            self.assertEqual(peer.received[-1], payload)
        self.assertTrue(ISSLTransport.providedBy(client.tunnels[0].carrierChannel.transport))
        server = self.tunnel.server.registry.tunnels[("udp", public)]
        self.assertTrue(ISSLTransport.providedBy(server.carrierChannel.transport))

    @defer.inlineCallbacks
    def test_clientStopClosesTheTLSCarryingChannelAtOnce(self):
        """
        Stopping the client closes its TLS carrying channel at once, not after
        shutdown_timeout: the carrier is the TLS transport's producer, and
        Twisted's TLS closes only once none is registered.
        """
        client, public = yield self.publishOverTLS()
        self.assertEqual((yield exchange(self.peer(), public, b"over tls")), b"over tls")
        yield within(client.stopService(), self.STOP_WAIT, "the client to stop")

    @defer.inlineCallbacks
    def test_serverStopClosesTheTLSCarryingChannelAtOnce(self):
        """The same for the server's end of the carrying channel."""
        client, public = yield self.publishOverTLS(shutdown_timeout=3 * self.STOP_WAIT)
        self.assertEqual((yield exchange(self.peer(), public, b"over tls")), b"over tls")
        yield within(self.tunnel.server.stopService(), self.STOP_WAIT, "the server to stop")


class SettingsTests(unittest.TestCase):
    """--map udp:..., protocol: udp in config.yaml, and the UDP options."""

    def setUp(self):
        from .support import temporaryDirectory
        self.directory = temporaryDirectory(self)

    def parse(self, options, text: str, *argv: str):
        import os
        import textwrap
        path = os.path.join(self.directory, "config.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))
        options.parseOptions(["--config", path, *argv])
        return options.settings()

    def test_clientConfigAndOptions(self):
        """A tunnel with protocol: udp, --map udp:..., and the session options."""
        from gotunnel.cli.tap import ClientOptions
        settings = self.parse(ClientOptions(), """
            client:
              token: t
              udp_session_timeout: 30
              udp_max_sessions: 10
              tunnels:
                - {local_port: 53, remote_port: 10053, protocol: udp}
                - {local_port: 22, remote_port: 10022}
            """)
        self.assertEqual(settings.mappings, [Mapping("127.0.0.1", 53, 10053, "udp"),
                                             Mapping("127.0.0.1", 22, 10022, "tcp")])
        self.assertEqual((settings.udp_session_timeout, settings.udp_max_sessions), (30, 10))
        settings = self.parse(ClientOptions(), "client: {token: t}\n",
                              "--map", "udp:[::1]:53:10053", "--udp-max-sessions", "5")
        self.assertEqual(settings.mappings, [Mapping("::1", 53, 10053, "udp")])
        self.assertEqual(settings.udp_max_sessions, 5)

    def test_badProtocol(self):
        """protocol: sctp is refused with the key's name."""
        from gotunnel.config.yamlfile import ConfigError
        from gotunnel.cli.tap import ClientOptions
        with self.assertRaises(ConfigError) as caught:
            self.parse(ClientOptions(), """
                client:
                  token: t
                  tunnels: [{local_port: 53, remote_port: 10053, protocol: sctp}]
                """)
        self.assertIn("client.tunnels[0].protocol must be tcp or udp", str(caught.exception))

    def test_serverOptions(self):
        """UDP is on by default; --no-udp or udp: false turns it off."""
        from gotunnel.cli.tap import ServerOptions
        self.assertTrue(self.parse(ServerOptions(), "server: {token: t}\n").udp)
        self.assertFalse(self.parse(ServerOptions(), "server: {token: t}\n", "--no-udp").udp)
        settings = self.parse(ServerOptions(), """
            server: {token: t, udp: false, udp_session_timeout: 5, udp_max_sessions: 7}
            """)
        self.assertEqual((settings.udp, settings.udp_session_timeout,
                          settings.udp_max_sessions), (False, 5, 7))


class CarrierBufferTests(unittest.TestCase):
    def test_boundRaised(self):
        """
        The carrying channel's transport (under TLS, the TCP transport below
        it) buffers up to CARRIER_BUFFER before it pauses us.
        """
        tcpTransport = StringTransport()
        tcpTransport.bufferSize = 65536

        class TLSLike(StringTransport):
            transport = tcpTransport

        Carrier(TLSLike(), lambda *a: None)
        self.assertEqual(tcpTransport.bufferSize, CARRIER_BUFFER)

    def carrierOnSocket(self):
        """A carrier on a real TCP connection (one end of a socket pair), and the other end."""
        from twisted.internet import tcp as tcpModule

        left, right = socket.socketpair()
        self.addCleanup(left.close)
        self.addCleanup(right.close)
        clock = MemoryReactorClock()

        class Connection(tcpModule.Connection):
            def startWriting(self):
                pass

            def stopWriting(self):
                pass

        left.setblocking(False)
        right.setblocking(False)
        connection = Connection(left, None, reactor=clock)
        connection.connected = True
        return Carrier(connection, lambda *a: None), right, clock

    def test_loneFrameAtOnce(self):
        """
        A frame sent outside a batch goes to the kernel at once, with no
        timed call left behind for the reactor to run.
        """
        carrier, right, clock = self.carrierOnSocket()
        carrier.send(1, b"one")
        self.assertEqual(right.recv(100), encodeFrame(1, b"one"))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_oneSendPerBatch(self):
        """
        The frames of one batch of reads go to the kernel together when the
        batch ends, in one send: none before, all of them then.
        """
        carrier, right, clock = self.carrierOnSocket()
        carrier.cork()
        carrier.send(2, b"two")
        carrier.send(3, b"three")
        self.assertRaises(BlockingIOError, right.recv, 100)
        carrier.uncork()
        self.assertEqual(right.recv(100), encodeFrame(2, b"two")
                         + encodeFrame(3, b"three"))
        carrier.uncork()
        self.assertRaises(BlockingIOError, right.recv, 100)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_batchStopsAtTheBound(self):
        """
        A batch read while the transport's buffer is near its bound is
        written as soon as it would cross it, so Twisted pauses us there:
        the buffer grows at most one frame over the bound, however many
        datagrams the batch brings, and the rest of them are dropped.
        """
        carrier, right, clock = self.carrierOnSocket()
        connection = carrier.transport
        connection.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        while connection.writeSomeData(b"k" * 65536):
            pass
        connection.write(b"w" * (connection.bufferSize - 10000))
        self.assertFalse(carrier.paused)
        carrier.cork()
        taken = [carrier.send(4, b"d" * 1400) for _ in range(200)]
        carrier.uncork()
        frame = HEADER.size + 1400
        self.assertTrue(carrier.paused)
        self.assertEqual(taken, [True] * (10000 // frame + 1) + [False] * (200 - 10000 // frame - 1))
        self.assertLessEqual(twistedBuffered(connection), connection.bufferSize + frame)

    def test_readsInBatches(self):
        """
        readInBatches brackets each of a port's reads (however many
        datagrams it delivers) with batchStarted and batchEnded, even one
        that fails.
        """
        events = []

        class Port:
            def doRead(self):
                events.append("read")
                if len(events) > 3:
                    raise OSError("broken")

        class Batch:
            def batchStarted(self):
                events.append("started")

            def batchEnded(self):
                events.append("ended")

        port = Port()
        readInBatches(port, Batch())
        port.doRead()
        self.assertRaises(OSError, port.doRead)
        self.assertEqual(events, ["started", "read", "ended", "started", "read", "ended"])

    def test_publicPortBatchesToOneSend(self):
        """
        A burst read from the server's public port in one read is written
        to the carrying channel in one write.
        """
        writes = []

        class Transport(StringTransport):
            def write(self, data):
                writes.append(data)
                super().write(data)

        class Tunnel:
            carrier = Carrier(Transport(), lambda *a: None)

            def fromPeer(self, data, addr):
                self.carrier.send(1, data)

        protocol = PublicDatagrams(Tunnel())

        class Port:
            def doRead(self):
                for i in range(3):
                    protocol.datagramReceived(b"d%d" % i, ("198.51.100.1", 5000))

        port = Port()
        readInBatches(port, protocol)
        port.doRead()
        self.assertEqual(writes, [b"".join(encodeFrame(1, b"d%d" % i) for i in range(3))])


def ipv6Loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class UdpOverIPv6Tests(UdpTunnelTestCase):
    if not ipv6Loopback():
        skip = "no IPv6 loopback"

    @defer.inlineCallbacks
    def test_ipv6PeerAndService(self):
        """
        A public port on ::1 and a local service on ::1: the peer's IPv6
        address gets its answer, from a session socket of the IPv6 family.
        """
        yield self.tunnel.startServer(public_interface="::1")
        service = UdpEcho()
        servicePort = reactor.listenUDP(0, service, interface="::1")
        self.addCleanup(servicePort.stopListening)
        remote = freeUdpPort()
        settings = ClientSettings(
            server=f"tcp:{HOST}:{self.tunnel.controlPort}", token=TOKEN, name="v6",
            mappings=[Mapping("::1", servicePort.getHost().port, remote, "udp")], pool_count=0)
        client = TunnelClientService(settings, reactor=reactor)
        client.startService()
        self.addCleanup(client.stopService)
        yield within(self.carrying(client), 10, "the carrying channel")
        peer = UdpPeer()
        peerPort = reactor.listenUDP(0, peer, interface="::1")
        self.addCleanup(peerPort.stopListening)
        before = len(peer.received)

        def attempt():
            if len(peer.received) > before:
                return True
            peer.transport.write(b"over ipv6", ("::1", remote))
            return False

        yield retryUntil(attempt, 10, "an answer over IPv6", interval=0.05)
        self.assertEqual(peer.received[0], b"over ipv6")

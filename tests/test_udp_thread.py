"""
A UDP mapping's datagrams moved by the splice thread (gotunnel.udp.threadpump):
the pump's steps driven by hand over real sockets, with a thread that only
records its watches; and whole tunnels over loopback whose pumps are in
their threads while peers come and go, sessions expire and the carrying
channel breaks.
"""

from __future__ import annotations

import select
import socket

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from gotunnel.relay.splicethread import READABLE, WRITABLE
from gotunnel.server.accounting import DatagramCounters
from gotunnel.udp.carrier import CARRIER_BUFFER, Carrier
from gotunnel.udp.framing import HEADER, encodeFrame
from gotunnel.udp.server import Peer
from gotunnel.udp.pumpends import ClientDatagramPump, ServerDatagramPump
from gotunnel.udp.threadpump import HANDOVER_LIMIT

from .support import HOST, waitUntil, within
from .test_udp import UdpEcho, UdpTunnelTestCase, exchange


class RecordingThread:
    """A splice thread that runs nothing: it records what it is told to watch."""

    def __init__(self) -> None:
        self.watched: dict[int, object] = {}
        self.rewatched: list[int] = []

    def thread(self) -> "RecordingThread":
        return self

    def adopt(self, pump) -> None:
        for side in pump.sides.values():
            self.watch(side)

    def watch(self, side) -> None:
        side.mask = side.wantedEvents()
        self.watched[side.fd] = side

    def unwatch(self, side) -> None:
        self.watched.pop(side.fd, None)

    def rewatch(self, side) -> None:
        side.mask = side.wantedEvents()
        self.rewatched.append(side.mask)

    def release(self, pump) -> None:
        for side in pump.sides.values():
            self.unwatch(side)


class FakeTransport:
    """What a pump and a carrier use of a TCP transport, over a real socket."""

    connected = True
    disconnecting = False
    TLS = False
    dataBuffer = b""
    offset = 0
    _tempDataLen = 0

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.reading = True
        self.written: list[bytes] = []

    def registerProducer(self, producer, streaming) -> None:
        pass

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True

    def write(self, data: bytes) -> None:
        self.written.append(data)


class FakePort(FakeTransport):
    """A Twisted UDP port, as a pump uses it."""


class ThreadReactor(Clock):
    """A Clock whose callFromThread only records (the test runs the calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.fromThread: list[tuple] = []

    def callFromThread(self, f, *args) -> None:
        self.fromThread.append((f, args))


class FakeServerTunnel:
    def __init__(self, listener, clock) -> None:
        self.listener = listener
        self.peers: dict = {}
        self.byId: dict = {}
        self.registry = type("Registry", (), {"clock": clock})()
        self.fromPeerCalls: list = []
        self.fromClientCalls: list = []
        self.carrierChannel = None

    def fromPeer(self, data, address) -> None:
        self.fromPeerCalls.append((data, address))

    def fromClient(self, peer_id, payload) -> None:
        self.fromClientCalls.append((peer_id, payload))


class ServerPumpTests(unittest.TestCase):
    """A server's pump, its steps run by the test."""

    def setUp(self):
        self.public = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.public.bind((HOST, 0))
        self.public.setblocking(False)
        # Room for a few hundred small datagrams at once (the default may drop some).
        self.public.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind((HOST, 0))
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        for each in (self.public, self.peer, self.ours, self.theirs):
            self.addCleanup(each.close)
        self.reactor = ThreadReactor()
        self.port = FakePort(self.public)
        self.transport = FakeTransport(self.ours)
        self.tunnel = FakeServerTunnel(self.port, self.reactor)
        self.counters = DatagramCounters()
        self.carrier = Carrier(self.transport, self.tunnel.fromClient)
        self.thread = RecordingThread()
        self.pump = ServerDatagramPump(self.tunnel, self.carrier, self.thread, self.reactor,
                                       0.0, self.counters)
        self.carrier.pump = self.pump

    def sides(self):
        side = {s.fd: s for s in self.pump.sides.values()}
        return side[self.ours.fileno()], side[self.public.fileno()]

    def test_handOffTakesTheSocketsFromTheReactor(self):
        """
        Handed off, the carrying channel and the public port are watched by
        the thread and read by the reactor no more; taken back, the reactor
        reads them again.
        """
        self.pump.start()
        self.assertTrue(self.pump.handedOff)
        self.assertEqual(set(self.thread.watched), {self.ours.fileno(), self.public.fileno()})
        self.assertFalse(self.transport.reading)
        self.assertFalse(self.port.reading)
        self.pump.reclaim()
        self.assertFalse(self.pump.handedOff)
        self.assertEqual(self.thread.watched, {})
        self.assertTrue(self.transport.reading)
        self.assertTrue(self.port.reading)

    def test_notSteadyWhileTwistedHoldsBytes(self):
        """
        A channel whose handshake answer is still in Twisted's buffer is
        handed off once it is written, not before.
        """
        self.transport.dataBuffer = b"answer"
        self.pump.begin()
        self.reactor.advance(0)
        self.assertFalse(self.pump.handedOff)
        self.transport.dataBuffer = b""
        self.reactor.advance(0.01)
        self.assertTrue(self.pump.handedOff)

    def test_knownPeerFramedOntoTheCarrier(self):
        """A known peer's datagrams go onto the carrying channel framed with its id."""
        self.pump.start()
        address = self.peer.getsockname()
        self.tunnel.peers[address] = Peer(9, address, 0)
        self.peer.sendto(b"one", self.public.getsockname())
        self.peer.sendto(b"two", self.public.getsockname())
        carrierSide, publicSide = self.sides()
        waitReadable(self.public)
        self.assertTrue(publicSide.moveInThread(READABLE))
        self.assertEqual(self.theirs.recv(100), encodeFrame(9, b"one") + encodeFrame(9, b"two"))
        self.assertEqual(self.counters.forwarded_in, 2)

    def test_newPeersGoToTheReactorBounded(self):
        """
        A new peer's datagram is the reactor's (source lists, the peer id),
        but no more than HANDOVER_LIMIT wait there at once: the rest are
        dropped and counted.
        """
        self.pump.start()
        _, publicSide = self.sides()
        sent = HANDOVER_LIMIT + 10
        for i in range(sent):
            self.peer.sendto(b"%d" % i, self.public.getsockname())
        while len(self.reactor.fromThread) + self.counters.dropped_sessions < sent:
            waitReadable(self.public)
            publicSide.moveInThread(READABLE)
        self.assertEqual(len(self.reactor.fromThread), HANDOVER_LIMIT)
        self.assertEqual(self.counters.dropped_sessions, 10)
        f, args = self.reactor.fromThread[0]
        f(*args)
        self.assertEqual(self.tunnel.fromPeerCalls, [(b"0", self.peer.getsockname())])
        self.assertEqual(self.pump.waiting, HANDOVER_LIMIT - 1)

    def test_backedUpCarrierDropsBeyondTheBound(self):
        """
        While the carrying channel's socket takes nothing, what waits for
        it stays within CARRIER_BUFFER and the rest is dropped and counted;
        the thread watches for writability meanwhile, and once the socket
        drains, it writes what waited and stops watching.
        """
        self.pump.start()
        carrierSide, _ = self.sides()
        frame = encodeFrame(1, b"x" * 60000)
        offered = dropped = 0
        while dropped < 20:
            if not self.carrier.send(1, b"x" * 60000):
                dropped += 1
            offered += 1
            self.assertLess(offered, 10000)
            self.assertLessEqual(len(self.pump.pending), CARRIER_BUFFER)
        self.assertIn(READABLE | WRITABLE, self.thread.rewatched)
        self.assertEqual(carrierSide.mask, READABLE | WRITABLE)
        received = bytearray()
        expected = len(frame) * (offered - dropped)
        while self.pump.pending or len(received) < expected:
            try:
                received += self.theirs.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            carrierSide.moveInThread(WRITABLE)
        self.assertEqual(bytes(received), frame * (len(received) // len(frame)))
        self.assertEqual(len(received), expected)
        self.assertEqual(carrierSide.mask, READABLE)

    def test_reclaimHandsPendingToTwisted(self):
        """What the socket had not taken is written, in order, by Twisted once taken back."""
        self.pump.start()
        self.pump.pending += b"waiting"
        self.pump.reclaim()
        self.assertEqual(self.transport.written, [b"waiting"])
        self.assertEqual(self.pump.pending, b"")

    def test_carrierFramesDelivered(self):
        """Frames from the client are unframed in the thread, a partial one kept."""
        self.pump.start()
        carrierSide, _ = self.sides()
        data = encodeFrame(3, b"reply") + encodeFrame(4, b"ot")[:5]
        self.theirs.sendall(data)
        waitReadable(self.ours)
        self.assertTrue(carrierSide.moveInThread(READABLE))
        self.assertEqual(self.tunnel.fromClientCalls, [(3, b"reply")])
        self.theirs.sendall(encodeFrame(4, b"ot")[5:])
        waitReadable(self.ours)
        self.assertTrue(carrierSide.moveInThread(READABLE))
        self.assertEqual(self.tunnel.fromClientCalls, [(3, b"reply"), (4, b"ot")])

    def test_brokenFrameHandsBackAndCloses(self):
        """A frame with peer id 0 hands the pump back; the reactor closes the channel."""
        errors = []
        self.tunnel.carrierChannel = type("Channel", (), {
            "transport": self.transport, "protocolError": errors.append})()
        self.pump.start()
        carrierSide, _ = self.sides()
        self.theirs.sendall(HEADER.pack(2, 0) + b"no")
        waitReadable(self.ours)
        self.assertFalse(carrierSide.moveInThread(READABLE))
        self.pump.reclaim()
        self.assertEqual(errors, ["a datagram frame with peer id 0"])
        self.assertTrue(self.transport.reading)

    def test_endOfStreamHandsBack(self):
        """The end of the carrying channel's stream is the reactor's to meet."""
        self.pump.start()
        carrierSide, _ = self.sides()
        self.theirs.shutdown(socket.SHUT_WR)
        waitReadable(self.ours)
        self.assertFalse(carrierSide.moveInThread(READABLE))

    def test_stopKeepsThePumpInTheReactor(self):
        """Once the carrier stops, the pump is never handed off again."""
        self.pump.begin()
        self.carrier.stop()
        self.reactor.advance(1)
        self.assertFalse(self.pump.handedOff)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class FakeSession:
    def __init__(self, peer_id, transport) -> None:
        self.peer_id = peer_id
        self.transport = transport
        self.lastSeen = 0


class FakeClientTunnel:
    def __init__(self, clock) -> None:
        self.sessions: dict = {}
        self.reactor = clock
        self.fromServerCalls: list = []
        self.carrierChannel = None

    def fromServer(self, peer_id, payload) -> None:
        self.fromServerCalls.append((peer_id, payload))


class ClientPumpTests(unittest.TestCase):
    def setUp(self):
        self.service = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.service.bind((HOST, 0))
        self.session = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.session.bind((HOST, 0))
        self.session.connect(self.service.getsockname())
        self.session.setblocking(False)
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        for each in (self.service, self.session, self.ours, self.theirs):
            self.addCleanup(each.close)
        self.reactor = ThreadReactor()
        self.transport = FakeTransport(self.ours)
        self.tunnel = FakeClientTunnel(self.reactor)
        self.counters = DatagramCounters()
        self.carrier = Carrier(self.transport, self.tunnel.fromServer)
        self.thread = RecordingThread()
        self.pump = ClientDatagramPump(self.tunnel, self.carrier, self.thread, self.reactor,
                                       0.0, self.counters)
        self.carrier.pump = self.pump
        self.port = FakePort(self.session)

    def test_sessionWatchedOnceOpened(self):
        """
        A frame for a peer with no session goes to the reactor (which opens
        it); once the session is watched, its frames go to its socket from
        the thread, and its replies come back framed.
        """
        self.pump.start()
        carrierSide = self.pump.carrierSide
        self.theirs.sendall(encodeFrame(5, b"first"))
        waitReadable(self.ours)
        carrierSide.moveInThread(READABLE)
        self.assertEqual([args[1] for _, args in self.reactor.fromThread], [(5, b"first")])
        session = FakeSession(5, self.port)
        self.tunnel.sessions[5] = session
        self.pump.watch(self.port, session)
        self.assertFalse(self.port.reading)
        self.assertIn(self.session.fileno(), self.thread.watched)
        self.theirs.sendall(encodeFrame(5, b"second"))
        waitReadable(self.ours)
        carrierSide.moveInThread(READABLE)
        self.assertEqual(self.service.recv(100), b"second")
        self.assertEqual(self.counters.forwarded_in, 1)
        self.service.sendto(b"answer", self.session.getsockname())
        waitReadable(self.session)
        self.thread.watched[self.session.fileno()].moveInThread(READABLE)
        self.assertEqual(self.theirs.recv(100), encodeFrame(5, b"answer"))
        self.assertEqual(self.counters.forwarded_out, 1)

    def test_unwatchBeforeClose(self):
        """A session about to close is watched no more, and is not read again on reclaim."""
        self.pump.start()
        session = FakeSession(5, self.port)
        self.tunnel.sessions[5] = session
        self.pump.watch(self.port, session)
        self.pump.unwatch(self.port)
        self.assertNotIn(self.session.fileno(), self.thread.watched)
        self.pump.reclaim()
        self.assertFalse(self.port.reading)

    def test_refusedByTheServiceCounted(self):
        """An ICMP refusal read from a session's socket is a datagram lost, counted."""
        self.service.close()
        self.pump.start()
        session = FakeSession(5, self.port)
        self.tunnel.sessions[5] = session
        self.pump.watch(self.port, session)
        self.session.send(b"to nobody")
        side = self.thread.watched[self.session.fileno()]
        waitReadable(self.session)
        self.assertTrue(side.moveInThread(READABLE))
        self.assertEqual(self.counters.dropped_unknown, 1)


def waitReadable(sock: socket.socket) -> None:
    """Until C{sock} has something to read (loopback: at once; bounded)."""
    readable, _, _ = select.select([sock], [], [], 5)
    assert readable, "nothing to read within 5 s"


class ThreadedTunnelTests(UdpTunnelTestCase):
    """Whole tunnels whose datagrams are moved by the splice threads."""

    @defer.inlineCallbacks
    def inThreads(self, **clientOverrides):
        client, public = yield self.publish(UdpEcho(), **clientOverrides)
        peer = self.peer()
        yield exchange(peer, public, b"warm-up")
        server = self.tunnel.server.registry.tunnels[("udp", public)]
        clientTunnel = client.tunnels[0]
        yield waitUntil(lambda: server.carrier.pump.handedOff
                        and clientTunnel.carrier().pump.handedOff, 10, "both pumps in threads")
        return client, public, server, clientTunnel

    @defer.inlineCallbacks
    def test_newPeersWhileInThreads(self):
        """
        Peers that come after both ends are in their threads each get only
        their own replies, byte for byte, and each has its session socket
        watched by the client's thread.
        """
        client, public, server, clientTunnel = yield self.inThreads()
        peers = [self.peer() for _ in range(20)]
        answers = yield defer.gatherResults([
            exchange(peer, public, b"peer %d" % i) for i, peer in enumerate(peers)])
        self.assertEqual(answers, [b"peer %d" % i for i in range(20)])
        for i, peer in enumerate(peers):
            self.assertEqual(set(peer.received), {b"peer %d" % i})
        pump = clientTunnel.carrier().pump
        self.assertTrue(pump.handedOff)
        self.assertEqual(len(pump.sides), 1 + len(clientTunnel.sessions))
        self.assertEqual(len(clientTunnel.sessions), 21)

    @defer.inlineCallbacks
    def test_sessionsExpireWhileInThreads(self):
        """
        Sessions that expire are watched no more and closed; the same peer
        then gets a new session, and answers again.
        """
        client, public, server, clientTunnel = yield self.inThreads(udp_session_timeout=0.3)
        pump = clientTunnel.carrier().pump
        first = next(iter(clientTunnel.sessions.values()))
        yield waitUntil(lambda: not clientTunnel.sessions, 10, "the session to expire")
        self.assertEqual(len(pump.sides), 1)
        yield waitUntil(lambda: getattr(first.transport, "socket", None) is None, 10,
                        "the expired session's socket to close")
        peer = self.peer()
        self.assertEqual((yield exchange(peer, public, b"again")), b"again")
        self.assertTrue(pump.handedOff)

    @defer.inlineCallbacks
    def test_carrierLostWhileInThreads(self):
        """
        A carrying channel cut while both pumps are in their threads is
        met by the reactors: the client opens a new one, its own pump goes
        to the thread, and datagrams flow again.
        """
        client, public, server, clientTunnel = yield self.inThreads()
        old = server.carrier
        server.carrierChannel.transport.abortConnection()
        yield waitUntil(lambda: server.carrier is not None and server.carrier is not old
                        and server.carrier.pump.handedOff, 10, "a new carrying channel in the thread")
        peer = self.peer()
        self.assertEqual((yield exchange(peer, public, b"after")), b"after")
        self.assertFalse(old.pump.handedOff)

    @defer.inlineCallbacks
    def test_stopWhileInThreads(self):
        """Stopping the client and the server takes every pump back first, and closes at once."""
        client, public, server, clientTunnel = yield self.inThreads()
        serverPump, clientPump = server.carrier.pump, clientTunnel.carrier().pump
        yield within(client.stopService(), 10, "the client to stop")
        self.assertFalse(clientPump.handedOff)
        yield waitUntil(lambda: not serverPump.handedOff, 10, "the server's pump back")


    @defer.inlineCallbacks
    def test_largestDatagramsInThreads(self):
        """
        Datagrams of 65,507 bytes, moved by both threads, come back whole:
        every one, none resent, none dropped.
        """
        client, public, server, clientTunnel = yield self.inThreads()
        yield self.echoLargest(self.peer(), public)
        self.assertEqual(clientTunnel.counters.dropped, 0)
        self.assertEqual(server.counters.dropped, 0)
        self.assertTrue(server.carrier.pump.handedOff)
        self.assertTrue(clientTunnel.carrier().pump.handedOff)

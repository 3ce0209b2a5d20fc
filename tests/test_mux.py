"""
The multiplexed session (gotunnel.mux.session) as a state machine: two sessions
joined by in-memory transports, time on a Clock.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from gotunnel.mux.frames import ACK, DATA, HEADER, PING, SYN, WINDOW, WINDOW_UPDATE
from gotunnel.mux.session import KEEPALIVE, MAX_STREAMS, SESSION_BUDGET, MuxSession
from gotunnel.mux.stream import CHUNK, READ_SIZE, MuxStream


class Recorder:
    """A stream's protocol that keeps what it is told."""

    def __init__(self, stream: MuxStream) -> None:
        self.stream = stream
        self.data = bytearray()
        self.readEnded = False
        self.lost = None
        stream.protocol = self

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.readEnded = True

    def connectionLost(self, reason) -> None:
        self.lost = reason


class Producer:
    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False


class Pair:
    """A server session and a client session, bytes moved by L{flow}."""

    def __init__(self, clientMaxStreams: int = MAX_STREAMS,
                 serverBudget: int = SESSION_BUDGET) -> None:
        self.clock = Clock()
        self.accepted: list[Recorder] = []
        self.server = MuxSession(self.clock, opens=True, budget=serverBudget)
        self.client = MuxSession(self.clock, opens=False, accept=self._accept,
                                 maxStreams=clientMaxStreams)
        self.serverWire = StringTransport()
        self.clientWire = StringTransport()
        self.server.start(self.serverWire)
        self.client.start(self.clientWire)

    def _accept(self, stream: MuxStream) -> None:
        self.accepted.append(Recorder(stream))

    def flow(self) -> None:
        """Move bytes both ways until neither side has more to say."""
        while True:
            toClient, toServer = self.serverWire.value(), self.clientWire.value()
            if not toClient and not toServer:
                return
            self.serverWire.clear()
            self.clientWire.clear()
            if toClient:
                self.client.dataReceived(toClient)
            if toServer:
                self.server.dataReceived(toServer)

    def open(self) -> tuple[Recorder, Recorder]:
        stream = self.server.openStream()
        near = Recorder(stream)
        self.flow()
        return near, self.accepted[-1]


class FramingTests(SynchronousTestCase):

    def test_framesSplitAcrossReads(self) -> None:
        """A frame that arrives a byte at a time is read whole."""
        pair = Pair()
        stream = pair.server.openStream()
        Recorder(stream)
        stream.write(b"hello, stream")
        wire = pair.serverWire.value()
        for i in range(len(wire)):
            pair.client.dataReceived(wire[i:i + 1])
        self.assertEqual(bytes(pair.accepted[0].data), b"hello, stream")

    def _badFrame(self, frame: bytes) -> Pair:
        pair = Pair()
        near, far = pair.open()
        pair.client.dataReceived(frame)
        self.assertTrue(pair.clientWire.disconnecting)
        self.assertTrue(pair.client.closed)
        self.assertTrue(far.lost.check(error.ConnectionLost))
        self.assertEqual(pair.client.streams, {})
        return pair

    def test_badVersionClosesTheSession(self) -> None:
        self._badFrame(HEADER.pack(1, DATA, 0, 1, 0))

    def test_unknownTypeClosesTheSession(self) -> None:
        self._badFrame(HEADER.pack(0, 9, 0, 1, 0))

    def test_dataOverTheWindowClosesTheSession(self) -> None:
        self._badFrame(HEADER.pack(0, DATA, 0, 1, WINDOW + 1) + b"x" * (WINDOW + 1))

    def test_peerCannotOpenStreamsOnTheServer(self) -> None:
        """Only the server opens streams: a client's SYN closes the session."""
        pair = Pair()
        pair.server.dataReceived(HEADER.pack(0, WINDOW_UPDATE, SYN, 1, 0))
        self.assertTrue(pair.serverWire.disconnecting)

    def test_streamIdReusedClosesTheSession(self) -> None:
        pair = Pair()
        pair.open()
        pair.client.dataReceived(HEADER.pack(0, WINDOW_UPDATE, SYN, 1, 0))
        self.assertTrue(pair.clientWire.disconnecting)

    def test_maxStreams(self) -> None:
        """Past its cap a session resets new streams and opens none."""
        pair = Pair(clientMaxStreams=1)
        first, _ = pair.open()
        second = pair.server.openStream()
        Recorder(second)
        pair.flow()
        self.assertEqual(len(pair.accepted), 1)
        self.assertTrue(second.protocol is None and second.closed)
        self.assertFalse(first.stream.closed)
        pair.server.maxStreams = 1
        self.assertIsNone(pair.server.openStream())


class WindowTests(SynchronousTestCase):

    def test_windowExhaustionStopsAndUpdateResumes(self) -> None:
        """
        A reader that takes nothing gets one window and no more; the writer
        is paused past a window queued; reading again lets the rest through.
        """
        pair = Pair()
        near, far = pair.open()
        writer = Producer()
        near.stream.registerProducer(writer, True)
        far.stream.pauseProducing()
        payload = bytes(range(256)) * 4096  # 1 MiB
        near.stream.write(payload)
        pair.flow()
        self.assertTrue(writer.paused)
        self.assertEqual(far.data, b"")
        self.assertEqual(far.stream.inboxed, WINDOW)
        self.assertEqual(near.stream.queued, len(payload) - WINDOW)
        far.stream.resumeProducing()
        pair.flow()
        self.assertEqual(bytes(far.data), payload)
        self.assertFalse(writer.paused)

    def test_stalledStreamDoesNotStallTheBusyOne(self) -> None:
        """
        One stream whose reader is stalled, one busy, on the same session:
        the busy one moves all its bytes, and what the stalled one holds
        stays within one window at each end.
        """
        pair = Pair()
        stalledNear, stalledFar = pair.open()
        busyNear, busyFar = pair.open()
        stalledFar.stream.pauseProducing()
        stalledWriter = Producer()
        stalledNear.stream.registerProducer(stalledWriter, True)
        payload = b"b" * (4 * 1024 * 1024)
        for offset in range(0, len(payload), 65536):
            stalledNear.stream.write(b"s" * 65536 if not stalledWriter.paused else b"")
            busyNear.stream.write(payload[offset:offset + 65536])
            pair.flow()
        self.assertEqual(len(busyFar.data), len(payload))
        self.assertTrue(stalledWriter.paused)
        self.assertEqual(stalledFar.data, b"")
        self.assertLessEqual(pair.client.bufferedBytes(), WINDOW)
        self.assertLessEqual(pair.server.bufferedBytes(), WINDOW + 65536)

    def test_roundRobin(self) -> None:
        """Queued streams take turns on the connection, a chunk each."""
        pair = Pair()
        a, _ = pair.open()
        b, _ = pair.open()
        pair.server.pauseProducing()
        a.stream.write(b"a" * (3 * CHUNK))
        b.stream.write(b"b" * (3 * CHUNK))
        pair.server.resumeProducing()
        wire = pair.serverWire.value()
        order = []
        while wire:
            _, kind, _, streamId, length = HEADER.unpack_from(wire)
            order.append(streamId)
            wire = wire[HEADER.size + (length if kind == DATA else 0):]
        self.assertEqual(order, [a.stream.streamId, b.stream.streamId] * 3)


class BudgetTests(SynchronousTestCase):
    """The session's budget: what all its streams together keep queued toward the peer."""

    BUDGET = 1024 * 1024
    STALLED = 12
    """Streams whose reader takes nothing: a window each would be 3 MiB."""

    def _stall(self, pair: Pair) -> list[tuple[Recorder, Recorder, Producer]]:
        stalled = []
        for _ in range(self.STALLED):
            near, far = pair.open()
            far.stream.pauseProducing()
            writer = Producer()
            near.stream.registerProducer(writer, True)
            stalled.append((near, far, writer))
        return stalled

    def _feed(self, pair: Pair, writers, rounds: int) -> int:
        """Each running writer writes a read's worth a round; the most the server queued."""
        most = 0
        for _ in range(rounds):
            for near, writer in writers:
                if not writer.paused and not near.stream.closed:
                    near.stream.write(b"s" * READ_SIZE)
                    most = max(most, pair.server.queued)
            pair.flow()
        return most

    def test_stalledStreamsHoldNoMoreThanTheBudget(self) -> None:
        """
        Many streams whose readers take nothing hold the budget (and one
        read past it) together, not a window each; a busy stream opened
        beside them still moves all its bytes; once the stalled readers read
        again, their writers go on.
        """
        pair = Pair(serverBudget=self.BUDGET)
        stalled = self._stall(pair)
        most = self._feed(pair, [(near, writer) for near, _, writer in stalled], rounds=10)
        self.assertLessEqual(most, self.BUDGET + READ_SIZE)
        self.assertTrue(pair.server.overBudget)
        self.assertTrue(all(writer.paused for _, _, writer in stalled))

        busyNear, busyFar = pair.open()
        busyWriter = Producer()
        busyNear.stream.registerProducer(busyWriter, True)
        self._feed(pair, [(busyNear, busyWriter)], rounds=64)
        self.assertEqual(len(busyFar.data), 64 * READ_SIZE)
        self.assertFalse(busyWriter.paused)
        self.assertLessEqual(pair.server.queued, self.BUDGET + READ_SIZE)

        for _, far, _ in stalled:
            far.stream.resumeProducing()
        pair.flow()
        self.assertFalse(pair.server.overBudget)
        self.assertFalse(any(writer.paused for _, _, writer in stalled))
        self._feed(pair, [(near, writer) for near, _, writer in stalled], rounds=4)
        sent = [len(far.data) for _, far, _ in stalled]
        self.assertEqual(pair.server.queued, 0)
        self.assertTrue(all(count > WINDOW for count in sent), sent)

    def test_blockedConnectionOverBudgetPausesTheRunningStreams(self) -> None:
        """
        Over budget, a connection that takes nothing more pauses the streams
        still reading, whose bytes could not go out; they read again once it
        takes bytes again.
        """
        pair = Pair(serverBudget=self.BUDGET)
        stalled = self._stall(pair)
        self._feed(pair, [(near, writer) for near, _, writer in stalled], rounds=10)
        busyNear, busyFar = pair.open()
        busyWriter = Producer()
        busyNear.stream.registerProducer(busyWriter, True)
        self.assertFalse(busyWriter.paused)
        pair.server.pauseProducing()
        self.assertTrue(busyWriter.paused)
        pair.server.resumeProducing()
        self.assertFalse(busyWriter.paused)
        self.assertTrue(all(writer.paused for _, _, writer in stalled))

    def test_closedStreamsGiveTheirQueueBack(self) -> None:
        """A reset stream's queue leaves the session's count."""
        pair = Pair(serverBudget=self.BUDGET)
        stalled = self._stall(pair)
        self._feed(pair, [(near, writer) for near, _, writer in stalled], rounds=10)
        for near, _, _ in stalled:
            near.stream.abortConnection()
        self.assertEqual(pair.server.queued, 0)
        self.assertFalse(pair.server.overBudget)


class EndingTests(SynchronousTestCase):

    def test_halfClose(self) -> None:
        """FIN ends one direction; the other goes on until it ends too."""
        pair = Pair()
        near, far = pair.open()
        near.stream.write(b"request")
        near.stream.loseWriteConnection()
        pair.flow()
        self.assertEqual((bytes(far.data), far.readEnded, far.lost), (b"request", True, None))
        far.stream.write(b"answer")
        pair.flow()
        self.assertEqual(bytes(near.data), b"answer")
        self.assertIsNone(near.lost)
        far.stream.loseWriteConnection()
        pair.flow()
        self.assertTrue(near.readEnded)
        self.assertTrue(near.lost.check(error.ConnectionDone))
        self.assertTrue(far.lost.check(error.ConnectionDone))
        self.assertEqual((pair.server.streams, pair.client.streams), ({}, {}))

    def test_finAfterQueuedBytes(self) -> None:
        """A FIN asked for while bytes wait for window goes out after them."""
        pair = Pair()
        near, far = pair.open()
        far.stream.pauseProducing()
        near.stream.write(b"x" * (WINDOW + 10))
        near.stream.loseWriteConnection()
        pair.flow()
        self.assertFalse(far.readEnded)
        far.stream.resumeProducing()
        pair.flow()
        self.assertEqual(len(far.data), WINDOW + 10)
        self.assertTrue(far.readEnded)

    def test_reset(self) -> None:
        """RST ends the stream at once at both ends, as a connection lost."""
        pair = Pair()
        near, far = pair.open()
        other, otherFar = pair.open()
        far.stream.abortConnection()
        pair.flow()
        self.assertTrue(near.lost.check(error.ConnectionLost))
        self.assertTrue(far.lost.check(error.ConnectionLost))
        self.assertIsNone(otherFar.lost)
        other.stream.write(b"still here")
        pair.flow()
        self.assertEqual(bytes(otherFar.data), b"still here")

    def test_bytesAfterCloseReset(self) -> None:
        """Bytes for a stream this end closed are answered with a reset."""
        pair = Pair()
        near, far = pair.open()
        far.stream.loseConnection()
        near.stream.write(b"nobody reads this")
        pair.flow()
        self.assertTrue(near.lost.check(error.ConnectionLost))

    def test_goAwayClosesOnceStreamsEnd(self) -> None:
        pair = Pair()
        near, far = pair.open()
        pair.client.goAway()
        pair.flow()
        self.assertIsNone(pair.server.openStream())
        self.assertFalse(pair.serverWire.disconnecting)
        near.stream.loseConnection()
        far.stream.loseConnection()
        pair.flow()
        self.assertTrue(pair.serverWire.disconnecting)


    def test_closeLetsGoOfTheTransportFirst(self) -> None:
        """
        Closing unregisters the session as its transport's producer, then
        loses the connection: Twisted's TLS sends its close_notify, and so
        closes, only once no producer is registered.
        """
        pair = Pair()
        self.assertIs(pair.serverWire.producer, pair.server)
        pair.server.close()
        self.assertIsNone(pair.serverWire.producer)
        self.assertTrue(pair.serverWire.disconnecting)


class KeepaliveTests(SynchronousTestCase):

    def test_pingAnswered(self) -> None:
        pair = Pair()
        for _ in range(5):
            pair.clock.advance(KEEPALIVE)
            pair.flow()
        self.assertFalse(pair.serverWire.disconnecting)
        self.assertFalse(pair.clientWire.disconnecting)

    def test_noPingAnswersWhileThePeerReadsNothing(self) -> None:
        """A flood of pings from a peer that reads nothing piles no answers up."""
        pair = Pair()
        pair.server.pauseProducing()
        pair.server.dataReceived(HEADER.pack(0, PING, SYN, 0, 7) * 1000)
        self.assertEqual(pair.serverWire.value(), b"")
        pair.server.resumeProducing()
        pair.server.dataReceived(HEADER.pack(0, PING, SYN, 0, 7))
        self.assertEqual(pair.serverWire.value(), HEADER.pack(0, PING, ACK, 0, 7))

    def test_silentPeerDropped(self) -> None:
        """A peer that answers nothing for two intervals loses the session."""
        pair = Pair()
        near, far = pair.open()
        pair.clock.advance(KEEPALIVE)
        self.assertFalse(pair.serverWire.disconnecting)
        pair.clock.advance(KEEPALIVE)
        self.assertTrue(pair.serverWire.disconnecting)
        self.assertTrue(near.lost.check(error.ConnectionLost))

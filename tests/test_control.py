"""
The framing every connection starts with: frames however TCP cuts them,
dispatch to msg_<type>, bad frames closing the connection, and the switch to
raw bytes after a data channel's handshake; and reading and writing a socket in the
same turn of the reactor (gotunnel.relay.eagerio).
"""

from __future__ import annotations

import select
import struct
from typing import Optional

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from gotunnel.wire import messages
from gotunnel.wire.framing import MAX_BACKLOG, MAX_FRAME, MessageReceiver
from gotunnel.wire.messages import DataChannel, OfflinePort, Ping, Pong, Register
from gotunnel.relay.eagerio import readWaiting, writeThrough

from tests.support import HOST, User, frame, UserFactory, waitingIn, waitUntil, within

WAIT = 30

# Frames from the Go capture (go-gotunnel-wire.json): a ping, and a ping and
# an offline_port coalesced in one TCP segment.
GO_PING = bytes.fromhex(
    "000000217b2274797065223a2270696e67222c2274696d65223a313739353538303632357d")
GO_COALESCED = bytes.fromhex(
    "000000217b2274797065223a2270696e67222c2274696d65223a313739353538303632387d"
    "000000247b2274797065223a226f66666c696e655f706f7274222c22706f7274223a33313030347d")


PING = frame(Ping(time=7))


class Recorder(MessageReceiver):
    """Records each message it is handed; knows ping, offline_port, register."""

    def __init__(self) -> None:
        self.received: list = []

    def msg_ping(self, msg) -> None:
        self.received.append(msg)

    def msg_offline_port(self, msg) -> None:
        self.received.append(msg)

    def msg_register(self, msg) -> None:
        self.received.append(msg)


class Switcher(Recorder):
    """Like a data channel: after C{data_channel}, everything is raw bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: list[bytes] = []

    passingOnInHandler: Optional[bool] = None

    def msg_data_channel(self, msg) -> None:
        self.received.append(msg)
        self.switchToRaw()
        self.passingOnInHandler = self.passingOnLastRead()

    def rawDataReceived(self, data: bytes) -> None:
        self.raw.append(data)


def connected(protocol: MessageReceiver) -> StringTransport:
    transport = StringTransport()
    protocol.makeConnection(transport)
    return transport


class FramingTests(unittest.TestCase):
    """Frames reach their handlers however the bytes are cut."""

    def setUp(self):
        self.protocol = Recorder()
        self.transport = connected(self.protocol)

    def test_byteByByte(self):
        """Frames delivered one byte per read are all dispatched, in order."""
        for i in range(len(GO_COALESCED)):
            self.protocol.dataReceived(GO_COALESCED[i:i + 1])
        self.assertEqual(self.protocol.received,
                         [Ping(time=1795580628), OfflinePort(port=31004)])
        self.assertFalse(self.transport.disconnecting)

    def test_coalesced(self):
        """Two frames in one read (as captured from Go) are both dispatched."""
        self.protocol.dataReceived(GO_COALESCED)
        self.assertEqual(self.protocol.received,
                         [Ping(time=1795580628), OfflinePort(port=31004)])

    def test_splitAcrossReads(self):
        """A frame cut inside its length prefix and its body is read whole."""
        data = GO_PING + PING
        self.protocol.dataReceived(data[:2])
        self.protocol.dataReceived(data[2:20])
        self.assertEqual(self.protocol.received, [])
        self.protocol.dataReceived(data[20:len(GO_PING) + 3])
        self.assertEqual(self.protocol.received, [Ping(time=1795580625)])
        self.protocol.dataReceived(data[len(GO_PING) + 3:])
        self.assertEqual(self.protocol.received, [Ping(time=1795580625), Ping(time=7)])

    def test_dispatchByType(self):
        """Each frame goes to the handler named for its type, parsed."""
        self.protocol.dataReceived(
            frame(b'{"type":"register","local_port":22,"remote_port":10022,'
                  b'"protocol":"tcp","token":"t","name":"c"}') + PING)
        self.assertEqual(self.protocol.received, [
            Register(local_port=22, remote_port=10022, protocol="tcp", token="t", name="c"),
            Ping(time=7),
        ])

    def test_unknownTypeIgnored(self):
        """
        A frame of a type we do not know is skipped and the connection stays
        open: the next frame is still dispatched.
        """
        self.protocol.dataReceived(frame(b'{"type":"open_udp_channel","port":53}') + PING)
        self.assertEqual(self.protocol.received, [Ping(time=7)])
        self.assertFalse(self.transport.disconnecting)

    def test_frameOfMaxLength(self):
        """A frame of exactly MAX_LENGTH bytes is accepted."""
        head = b'{"type":"ping","time":3,"pad":"'
        padded = head + b"x" * (MAX_FRAME - len(head) - 2) + b'"}'
        self.assertEqual(len(padded), MAX_FRAME)
        self.protocol.dataReceived(frame(padded))
        self.assertEqual(self.protocol.received, [Ping(time=3)])
        self.assertFalse(self.transport.disconnecting)

    def test_sendMessage(self):
        """sendMessage writes one length-prefixed frame of the encoded message."""
        self.protocol.sendMessage(messages.Pong(time=1795580625))
        self.assertEqual(self.transport.value(), bytes.fromhex(
            "000000217b2274797065223a22706f6e67222c2274696d65223a313739353538303632357d"))

    def test_sendMessageWithRawBytesAfter(self):
        """Raw bytes given to sendMessage follow the frame, in the same write."""
        writes = []
        self.transport.write = writes.append
        self.protocol.sendMessage(messages.RegisterResp(status="ok"), rawAfter=b"GET / HTTP/1.1")
        self.assertEqual(writes, [bytes.fromhex("00000026") + b'{"type":"register_resp","status":"ok"}'
                                  + b"GET / HTTP/1.1"])


class BadFrameTests(unittest.TestCase):
    """
    A frame that breaks the protocol aborts this connection, and nothing
    after it is dispatched, in the same read or a later one.
    """

    def setUp(self):
        self.protocol = Recorder()
        self.transport = connected(self.protocol)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def assertClosedBy(self, badFrame: bytes, why: str) -> None:
        """
        C{badFrame} followed by a good frame aborts the connection, logs
        C{why}, and dispatches nothing, then or later.
        """
        self.protocol.dataReceived(badFrame + PING)
        self.protocol.dataReceived(PING)
        self.assertEqual(self.protocol.received, [])
        self.assertTrue(self.transport.disconnected, "connection not aborted")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"")
        reasons = [e["why"] for e in self.events
                   if e.get("log_format", "").startswith("protocol error from")]
        self.assertEqual(len(reasons), 1, reasons)
        self.assertIn(why, reasons[0])

    def test_lengthOverLimit(self):
        self.assertClosedBy(struct.pack(">I", MAX_FRAME + 1) + b"{" * 10,
                            f"frame of {MAX_FRAME + 1} bytes is over the limit")

    def test_lengthHuge(self):
        """A 2 GiB length prefix closes at once, without waiting for the body."""
        self.protocol.dataReceived(b"\x7f\xff\xff\xff")
        self.assertTrue(self.transport.disconnected)
        self.protocol.dataReceived(PING)
        self.assertEqual(self.protocol.received, [])

    def test_lengthHugeThenFrame(self):
        self.assertClosedBy(b"\x7f\xff\xff\xff", "frame of 2147483647 bytes")

    def test_lengthAllOnes(self):
        self.assertClosedBy(b"\xff\xff\xff\xff", "frame of 4294967295 bytes")

    def test_httpRequest(self):
        """A browser or curl aimed at the control port is told apart from a long frame."""
        for method in (b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH",
                       b"CONNECT", b"TRACE"):
            self.setUp()
            self.assertClosedBy(method + b" / HTTP/1.1\r\nHost: 127.0.0.1:17000\r\n\r\n",
                                "sent an HTTP request: this is gotunnel's control port; "
                                "an HTTP client should use a public port")

    def test_http2Preface(self):
        self.assertClosedBy(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "sent an HTTP request")

    def test_httpResponse(self):
        """A client whose --server is a web server is told so."""
        self.assertClosedBy(b"HTTP/1.1 400 Bad Request\r\n\r\n",
                            "answered in HTTP: that is a web server, not gotunnel's control port")

    def test_httpAfterAFrame(self):
        """After a frame, the same bytes are only a frame over the limit."""
        self.protocol.dataReceived(PING)
        self.protocol.received.clear()
        self.assertClosedBy(b"GET / HTTP/1.1\r\n\r\n",
                            "frame of 1195725856 bytes is over the limit")

    def test_zeroLength(self):
        self.assertClosedBy(b"\x00\x00\x00\x00", "frame is empty")

    def test_notJson(self):
        self.assertClosedBy(frame(b"GET / HTTP/1.1"), "not JSON")

    def test_notUtf8(self):
        self.assertClosedBy(frame(b'{"type":"\xc3\x28"}'), "not UTF-8")

    def test_jsonArray(self):
        self.assertClosedBy(frame(b'[{"type":"ping"}]'), "not an object")

    def test_noType(self):
        self.assertClosedBy(frame(b'{"time":1}'), "no type")

    def test_wrongFieldType(self):
        self.assertClosedBy(frame(b'{"type":"ping","time":"now"}'), "ping.time")

    def test_knownTypeWithoutHandler(self):
        """A known message this side never receives (pong here) is an error."""
        self.assertClosedBy(frame(b'{"type":"pong","time":1}'), "unexpected pong message")

    def test_badFrameAfterGoodOnes(self):
        """Frames before the bad one are dispatched; the bad one stops the rest."""
        self.protocol.dataReceived(GO_PING + frame(b"nope") + PING)
        self.assertEqual(self.protocol.received, [Ping(time=1795580625)])
        self.assertTrue(self.transport.disconnected)


class SwitchToRawTests(unittest.TestCase):
    """After switchToRaw, bytes are raw, never frames."""

    def setUp(self):
        self.protocol = Switcher()
        self.transport = connected(self.protocol)
        self.handshake = frame(messages.encode(DataChannel(remote_port=10022, conn_id="c1")))

    def test_restOfSameRead(self):
        """
        Bytes after the switching frame in the same read go to
        rawDataReceived, even when they look like a frame.
        """
        self.protocol.dataReceived(self.handshake + PING + b"GET /")
        self.assertEqual(self.protocol.received, [DataChannel(remote_port=10022,
                                                              conn_id="c1")])
        self.assertEqual(b"".join(self.protocol.raw), PING + b"GET /")

    def test_laterReads(self):
        """Later reads go to rawDataReceived whole, frame-shaped or not."""
        self.protocol.dataReceived(self.handshake)
        self.assertEqual(self.protocol.raw, [])
        self.protocol.dataReceived(PING)
        self.protocol.dataReceived(b"\xff\xff\xff\xff")
        self.protocol.dataReceived(b"HTTP/1.0 200 OK\r\n")
        self.assertEqual(self.protocol.raw, [PING, b"\xff\xff\xff\xff", b"HTTP/1.0 200 OK\r\n"])
        self.assertEqual(len(self.protocol.received), 1)
        self.assertFalse(self.transport.disconnecting)

    def test_handshakeSplitThenRaw(self):
        """A handshake cut across reads, with raw bytes behind its last piece."""
        self.protocol.dataReceived(self.handshake[:3])
        self.protocol.dataReceived(self.handshake[3:-1])
        self.protocol.dataReceived(self.handshake[-1:] + b"\x00\x01")
        self.protocol.dataReceived(b"\x02")
        self.assertEqual(len(self.protocol.received), 1)
        self.assertEqual(b"".join(self.protocol.raw), b"\x00\x01\x02")

    def test_noEmptyRawRead(self):
        """A handshake with nothing behind it hands on no empty raw read."""
        self.protocol.dataReceived(self.handshake)
        self.assertEqual(self.protocol.raw, [])

    def test_passingOnLastReadUntilTheRestIsHandedOn(self):
        """
        Inside the switching frame's handler, the rest of the read is still
        to be handed on (a splice made there must not read the socket
        ahead of it); once dataReceived has handed it on, nothing is.
        """
        self.assertFalse(self.protocol.passingOnLastRead())
        self.protocol.dataReceived(self.handshake + b"raw")
        self.assertIs(self.protocol.passingOnInHandler, True)
        self.assertFalse(self.protocol.passingOnLastRead())
        self.assertEqual(self.protocol.raw, [b"raw"])

    def test_framesBeforeSwitchStillDispatched(self):
        """Frames ahead of the switching frame in the same read are dispatched."""
        self.protocol.dataReceived(PING + self.handshake + b"raw")
        self.assertEqual(self.protocol.received,
                         [Ping(time=7), DataChannel(remote_port=10022, conn_id="c1")])
        self.assertEqual(self.protocol.raw, [b"raw"])


class Answerer(Switcher):
    """Answers every ping with a pong, as a control channel does."""

    def msg_ping(self, msg) -> None:
        super().msg_ping(msg)
        self.sendMessage(Pong(time=msg.time))


class SlowReaderTransport(StringTransport):
    """
    A transport whose peer reads only when the test says so: like Twisted's
    own, it pauses a streaming producer once more than C{bufferSize} bytes
    wait, and resumes it once they have all gone (L{drain}).
    """

    bufferSize = 100

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0
        self.producerPaused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.waiting += len(data)
        if self.producer is not None and self.waiting > self.bufferSize:
            self.producerPaused = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        """The peer reads all that waits."""
        self.waiting = 0
        if self.producer is not None and self.producerPaused:
            self.producerPaused = False
            self.producer.resumeProducing()


class BackedUpWritesTests(unittest.TestCase):
    """
    A peer that sends frames and reads none of the answers: the connection
    stops being read while its write buffer is full, and is closed once the
    answers held for it pass L{MAX_BACKLOG}.
    """

    def setUp(self):
        self.protocol = Answerer()
        self.transport = SlowReaderTransport()
        self.protocol.makeConnection(self.transport)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_fullBufferStopsReading(self):
        """
        Of a thousand pings in one read, only those answered before the
        buffer filled are handled, and the transport stops reading; each
        drain lets a few more through, and the last leaves no producer
        registered.
        """
        self.protocol.dataReceived(PING * 1000)
        handled = len(self.protocol.received)
        self.assertLess(handled, 10)
        self.assertEqual(self.transport.producerState, "paused")
        self.assertIs(self.transport.producer, self.protocol)
        drains = 0
        while len(self.protocol.received) < 1000 and drains < 1000:
            self.transport.drain()
            drains += 1
        self.assertEqual(len(self.protocol.received), 1000)
        self.assertGreater(drains, 100)
        self.transport.drain()
        self.assertEqual(self.transport.producerState, "producing")
        self.assertIsNone(self.transport.producer)
        self.assertEqual(len(self.transport.value()), 1000 * len(frame(b'{"type":"pong","time":7}')))

    def test_writesWithRoomLeaveNoProducer(self):
        """While the buffer has room, the transport keeps no producer of ours."""
        self.protocol.dataReceived(PING)
        self.assertEqual(self.protocol.received, [Ping(time=7)])
        self.assertIsNone(self.transport.producer)
        self.assertEqual(self.transport.producerState, "producing")

    def test_backlogOverTheCapCloses(self):
        """
        Frames we send on our own while the peer reads nothing (open_data_channel
        for arriving users, say) close the connection once they pass
        MAX_BACKLOG, with a log line naming the peer.
        """
        self.protocol.dataReceived(PING * 10)
        self.assertEqual(self.transport.producerState, "paused")
        written = len(self.transport.value())
        pong = Pong(time=2 ** 40)
        size = len(messages.encode(pong)) + 4
        for _ in range(MAX_BACKLOG // size):
            self.protocol.sendMessage(pong)
        self.assertFalse(self.transport.disconnecting)
        self.protocol.sendMessage(pong)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(self.transport.value()) - written, size * (MAX_BACKLOG // size))
        [event] = [e for e in self.events if "reads nothing we send" in e.get("log_format", "")]
        self.assertEqual(event["peer"], self.protocol.peerDescription)
        self.assertGreater(event["backlog"], MAX_BACKLOG)

    def test_closingWhileFullReadsNoMore(self):
        """
        A connection closed while its buffer is full reads nothing more once
        it drains, and no longer holds the transport's close up as its
        producer.
        """
        self.protocol.dataReceived(PING * 10)
        handled = len(self.protocol.received)
        self.transport.loseConnection()
        self.transport.drain()
        self.assertEqual(len(self.protocol.received), handled)
        self.assertIsNone(self.transport.producer)
        self.assertEqual(self.transport.producerState, "paused")

    def test_switchToRawLeavesTheTransportFree(self):
        """
        A data channel's answer that fills the buffer, then the switch to raw
        bytes (as the server's handshake does): the transport is left with
        no producer of ours, so that the splice can register its own, and
        the raw bytes are handed on.
        """
        class BigAnswer(Answerer):
            def msg_data_channel(self, msg) -> None:
                self.sendMessage(Pong(time=1), rawAfter=b"early" * 40)
                super().msg_data_channel(msg)

        self.protocol = BigAnswer()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(frame(
            b'{"type":"data_channel","remote_port":10022,"conn_id":"c1"}') + b"raw")
        self.assertTrue(self.transport.producerPaused)
        self.assertIsNone(self.transport.producer)
        self.assertEqual(self.protocol.raw, [b"raw"])
        self.protocol.rawFromNow()
        self.assertIsNone(self.transport.producer)

    def test_rawFromNowLeavesTheTransportFree(self):
        """The same for a pooled channel switched outside a frame handler."""
        self.protocol.dataReceived(PING * 10)
        self.assertIs(self.transport.producer, self.protocol)
        self.protocol.rawFromNow()
        self.assertIsNone(self.transport.producer)
        self.protocol.dataReceived(b"raw")
        self.assertEqual(self.protocol.raw, [b"raw"])


class LoopbackPairTestCase(unittest.TestCase):
    """A sender and a receiving L{User}, connected over loopback."""

    @defer.inlineCallbacks
    def setUp(self):
        accepted: defer.Deferred = defer.Deferred()

        class Accepting(User):
            def connectionMade(self) -> None:
                accepted.callback(self)

        factory = UserFactory()
        factory.protocol = Accepting
        port = reactor.listenTCP(0, factory, interface=HOST)
        self.addCleanup(port.stopListening)
        self.sender = yield TCP4ClientEndpoint(reactor, HOST, port.getHost().port).connect(
            Factory.forProtocol(Protocol))
        self.receiver = yield accepted

        def close():
            self.sender.transport.abortConnection()
            return self.receiver.closed

        self.addCleanup(close)


class WriteNowTests(LoopbackPairTestCase):
    """
    L{writeThrough} over a real loopback connection: a frame goes to the kernel
    in the call when nothing is queued, and never overtakes queued bytes.
    """

    def queued(self) -> int:
        transport = self.sender.transport
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen

    @defer.inlineCallbacks
    def test_sentInTheCall(self):
        """With nothing queued, the bytes are in the kernel when writeThrough returns."""
        writeThrough(self.sender.transport, PING)
        self.assertEqual(self.queued(), 0)
        received = yield self.receiver.whenReceived(len(PING))
        self.assertEqual(received, PING)

    @defer.inlineCallbacks
    def test_queuedBytesFirst(self):
        """Bytes already queued by write() go first; writeThrough's wait behind them."""
        self.sender.transport.write(b"first ")
        writeThrough(self.sender.transport, b"second")
        self.assertEqual(self.queued(), len(b"first second"))
        received = yield self.receiver.whenReceived(len(b"first second"))
        self.assertEqual(received, b"first second")

    def test_tlsGoesThroughWrite(self):
        """On a TCP connection that has started TLS, the bytes go to write(), never raw."""
        written: list[bytes] = []
        self.patch(self.sender.transport, "TLS", True)
        self.patch(self.sender.transport, "write", written.append)
        writeThrough(self.sender.transport, PING)
        self.assertEqual(written, [PING])

    def test_otherTransports(self):
        """A transport that is not a TCP connection is written to as usual."""
        transport = StringTransport()
        writeThrough(transport, PING)
        self.assertEqual(transport.value(), PING)


class ReadWaitingTests(LoopbackPairTestCase):
    """
    L{readWaiting} over a real loopback connection: what the socket holds,
    taken in the call, even while its transport does not read.
    """

    def setUp(self):
        d = super().setUp()

        def paused(_):
            self.receiver.transport.pauseProducing()
            # Reading again, the receiver sees the sender's close at cleanup.
            self.addCleanup(self.receiver.transport.resumeProducing)

        return d.addCallback(paused)

    def waiting(self) -> int:
        return waitingIn(self.receiver.transport.fileno())

    @defer.inlineCallbacks
    def test_takenWhilePaused(self):
        """Bytes waiting in a paused transport's socket are returned, not delivered."""
        writeThrough(self.sender.transport, b"sent with the connection")
        yield waitUntil(lambda: self.waiting() == 24, WAIT, "the bytes to wait in the socket")
        self.assertEqual(readWaiting(self.receiver.transport), b"sent with the connection")
        self.assertEqual(self.waiting(), 0)
        self.assertEqual(self.receiver.received, [])

    def test_nothingWaiting(self):
        """An empty socket gives b"" at once."""
        self.assertEqual(readWaiting(self.receiver.transport), b"")

    @defer.inlineCallbacks
    def test_endOfStreamLeftForTheReactor(self):
        """
        At end-of-stream it gives b"", and the reactor still reads the
        end-of-stream once the transport reads again.
        """
        fd = self.receiver.transport.fileno()
        self.sender.transport.loseConnection()
        yield waitUntil(lambda: select.select([fd], [], [], 0)[0], WAIT,
                        "the end-of-stream to reach the socket")
        self.assertEqual(readWaiting(self.receiver.transport), b"")
        self.receiver.transport.resumeProducing()
        yield within(self.receiver.closed, WAIT, "the reactor to see the end-of-stream")

    @defer.inlineCallbacks
    def test_tlsNeverReadRaw(self):
        """On a TCP connection that has started TLS, the socket's bytes are left alone."""
        writeThrough(self.sender.transport, PING)
        yield waitUntil(lambda: self.waiting() == len(PING), WAIT, "the bytes to wait")
        self.patch(self.receiver.transport, "TLS", True)
        self.assertEqual(readWaiting(self.receiver.transport), b"")
        self.assertEqual(self.waiting(), len(PING))

    def test_otherTransports(self):
        """A transport that is not a TCP connection gives b""."""
        self.assertEqual(readWaiting(StringTransport()), b"")

"""
The zero-copy relay path (gotunnel.relay.zerocopy) on its own, over loopback: two
connections, each accepted by a L{RelayEnd}, spliced with C{zeroCopy} on;
outside each, a peer that writes and collects.  Bytes are checked both
ways, half-closes each way, closes and resets of either side, a slow
reader, bytes held before the splice, and the fallback for transports that
are not plain TCP.

Each of those runs twice: with the pump in the reactor's thread, and
handed to the splice thread (gotunnel.relay.splicethread) while it is steady.

Every wait is on an event, bounded by L{within}; nothing sleeps.
"""

from __future__ import annotations

import errno
import hashlib
import os
import select
from datetime import datetime, timezone
from ipaddress import ip_address
from typing import Optional

from twisted.internet import defer, reactor, ssl, task
from twisted.internet.endpoints import (
    SSL4ClientEndpoint, SSL4ServerEndpoint, TCP4ClientEndpoint, TCP4ServerEndpoint,
)
from twisted.internet.interfaces import IHalfCloseableProtocol, IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from gotunnel.tls import certmaking
from gotunnel.relay import splicepipe, zerocopy
from gotunnel.relay.splice import RelayEnd, splice
from gotunnel.relay.eagerio import twistedBuffered
from gotunnel.relay.splicethread import SpliceThreadService

from tests.support import HOST, LogWatcher, randomBytes, waitingIn, waitUntil, within

MiB = 1024 * 1024
HAND_OFF_AFTER = zerocopy.HAND_OFF_AFTER
WAIT = 30


class End(Protocol, RelayEnd):
    """
    A relay end as the server and client make them: it holds until spliced.
    With C{stillPassingOn} set, it says it is inside the read that made the
    splice, as a data channel is inside its answer's frame.
    """

    stillPassingOn = False

    def __init__(self) -> None:
        self.lostCount = 0
        self.gone: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.holdReading()
        self.factory.accepted.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.relayReceived(data)

    def passingOnLastRead(self) -> bool:
        return self.stillPassingOn

    def connectionLost(self, reason=None) -> None:
        self.lostCount += 1
        self.relayConnectionLost()
        if not self.gone.called:
            self.gone.callback(None)


@implementer(IHalfCloseableProtocol)
class Outside(Protocol):
    """
    A peer outside the relay: collects what it reads (C{ended} fires with it
    at end-of-stream, C{closed} once the connection is gone) and closes at
    end-of-stream, unless C{keepOpen} is set.
    """

    keepOpen = False

    def __init__(self) -> None:
        self.received = bytearray()
        self.ended: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()
        self._waiters: list[tuple[int, defer.Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        still = []
        for size, waiter in self._waiters:
            if len(self.received) >= size:
                waiter.callback(bytes(self.received))
            else:
                still.append((size, waiter))
        self._waiters = still

    def whenReceived(self, size: int) -> defer.Deferred:
        if len(self.received) >= size:
            return defer.succeed(bytes(self.received))
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append((size, waiter))
        return waiter

    def readConnectionLost(self) -> None:
        self.ended.callback(bytes(self.received))
        if not self.keepOpen:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        if not self.ended.called:
            self.ended.callback(bytes(self.received))
        for _, waiter in self._waiters:
            waiter.errback(reason)
        self._waiters = []
        self.closed.callback(bytes(self.received))


@implementer(IPullProducer)
class Sender:
    """Writes C{data} to C{transport} a chunk at a time as it drains."""

    chunk = 256 * 1024

    def __init__(self, transport, data: bytes) -> None:
        self.transport = transport
        self.data = memoryview(data)
        self.sent = 0
        self.done: defer.Deferred = defer.Deferred()
        transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.sent >= len(self.data):
            self.transport.unregisterProducer()
            if not self.done.called:
                self.done.callback(self.sent)
            return
        chunk = self.data[self.sent:self.sent + self.chunk]
        self.sent += len(chunk)
        self.transport.write(bytes(chunk))

    def stopProducing(self) -> None:
        if not self.done.called:
            self.done.callback(self.sent)


class Pair:
    """One loopback connection: the outside peer and the relay end that accepted it."""

    def __init__(self, outside: Outside, end: End) -> None:
        self.outside = outside
        self.end = end


@defer.inlineCallbacks
def connectedPair(testCase, serverEndpoint=None, clientEndpointFor=None):
    """
    A listener accepting one L{End}, and an L{Outside} connected to it;
    both closed (and the listener stopped) at cleanup.
    """
    factory = Factory.forProtocol(End)
    factory.noisy = False
    factory.accepted = defer.Deferred()
    endpoint = serverEndpoint or TCP4ServerEndpoint(reactor, 0, interface=HOST)
    port = yield endpoint.listen(factory)
    testCase.addCleanup(port.stopListening)
    outside = Outside()
    address = port.getHost()
    client = (clientEndpointFor(address.port) if clientEndpointFor
              else TCP4ClientEndpoint(reactor, HOST, address.port))
    yield client.connect(Factory.forProtocol(lambda: outside))
    end = yield within(factory.accepted, WAIT, "the relay end to be accepted")

    def cleanup():
        if not outside.closed.called:
            outside.transport.abortConnection()
        if not end.gone.called:
            end.transport.abortConnection()
        return defer.DeferredList([outside.closed, end.gone])

    testCase.addCleanup(cleanup)
    return Pair(outside, end)


class ZeroCopyTestCase(unittest.TestCase):
    timeout = 120
    spliceThread = False
    busyPoll = 0.0
    handOffAfter: Optional[int] = None
    """None: with the thread, every pump goes to it at its first event, so
    that these tests run the thread's path, not the reactor's first reads."""

    @defer.inlineCallbacks
    def setUp(self):
        self.recordPipes()
        self.a = yield connectedPair(self)
        self.b = yield connectedPair(self)

    def recordPipes(self) -> None:
        """
        Remember every pipe a pump opens, and check at the very end, after
        every cleanup, that none is still open.  (Sockets are the
        transports', closed by their connectionLost; trial's janitor fails
        the test if a reactor registration is left.)
        """
        self.pipes: list[str] = []
        openPipe = zerocopy.Direction.openPipe

        def recording(direction):
            openPipe(direction)
            self.pipes.append(f"pipe:[{os.fstat(direction.pipe[0]).st_ino}]")

        self.patch(zerocopy.Direction, "openPipe", recording)
        self.addCleanup(self.assertPipesClosed)

    def assertPipesClosed(self) -> None:
        open = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                open.add(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        self.assertEqual([pipe for pipe in self.pipes if pipe in open], [],
                         "pipes left open")

    def splice(self, zeroCopy: bool = True, expectPump: bool = True):
        threads = None
        if self.spliceThread:
            threads = SpliceThreadService(reactor)
            threads.startService()
            self.addCleanup(threads.stopService)
        splice(self.a.end, self.b.end, zeroCopy=zeroCopy, spliceThread=threads,
               busyPoll=self.busyPoll,
               handOffAfter=self.handOffAfter or (1 if self.spliceThread else HAND_OFF_AFTER))
        self.pump = self.a.end.pump
        if expectPump:
            self.assertIsNotNone(self.pump, "plain TCP on Linux should take the splice path")
            self.assertIs(self.b.end.pump, self.pump)
            self.assertEqual(self.pump.thread is not None, self.spliceThread)

    def reads(self, end) -> bool:
        """Whether the pump reads C{end}'s socket now, in the reactor or in the splice thread."""
        if self.pump.inThread:
            return bool(self.pump.sides[end].mask & select.EPOLLIN)
        return end.transport in reactor.getReaders()

    @defer.inlineCallbacks
    def assertBothGoneOnce(self):
        """Both relay ends are closed, each connectionLost called exactly once."""
        yield within(defer.gatherResults([self.a.end.gone, self.b.end.gone]), WAIT,
                     "both relay ends to be closed")
        yield within(defer.gatherResults([self.a.outside.closed, self.b.outside.closed]),
                     WAIT, "both outside peers to be closed")
        self.assertEqual((self.a.end.lostCount, self.b.end.lostCount), (1, 1))
        self.assertIsNone(self.a.end.pump)
        self.assertIsNone(self.b.end.pump)
        for end in (self.a.end, self.b.end):
            for name in ("doRead", "doWrite"):
                method = vars(end.transport).get(name)
                self.assertFalse(isinstance(getattr(method, "__self__", None), zerocopy.Side),
                                 f"the pump kept its {name}")
            self.assertEqual([name for name, value in vars(end.transport).items()
                              if getattr(value, "__module__", "").startswith("gotunnel.")],
                             [], "a method of ours was left on a transport")


class PayloadTests(ZeroCopyTestCase):
    @defer.inlineCallbacks
    def test_randomPayloadsBothWays(self):
        """
        4 MiB of random bytes each way at once arrive whole and in order, and
        the kernel moved every one of them.
        """
        self.splice()
        toB, toA = randomBytes(4 * MiB), randomBytes(4 * MiB)
        Sender(self.a.outside.transport, toB)
        Sender(self.b.outside.transport, toA)
        gotB, gotA = yield within(defer.gatherResults([
            self.b.outside.whenReceived(len(toB)), self.a.outside.whenReceived(len(toA))]),
            WAIT, "4 MiB each way")
        self.assertEqual(hashlib.sha256(gotB).digest(), hashlib.sha256(toB).digest())
        self.assertEqual(hashlib.sha256(gotA).digest(), hashlib.sha256(toA).digest())
        self.assertEqual(self.pump.moved, len(toA) + len(toB))
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()

    @defer.inlineCallbacks
    def test_manySmallWrites(self):
        """Small writes, answered one at a time, each arrive as written."""
        self.splice()
        for n in range(50):
            message = randomBytes(1 + n * 7)
            before = len(self.b.outside.received)
            self.a.outside.transport.write(message)
            got = yield within(self.b.outside.whenReceived(before + len(message)), WAIT,
                               f"message {n}")
            self.assertEqual(got[before:], message)
            self.b.outside.transport.write(message[::-1])
            got = yield within(self.a.outside.whenReceived(before + len(message)), WAIT,
                               f"answer {n}")
            self.assertEqual(got[before:], message[::-1])
        self.b.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()

    @defer.inlineCallbacks
    def test_pipeGrowsForAStreamOnly(self):
        """
        A request and its answer leave both pipes at the kernel's default
        size; a stream asks for PIPE_SIZE on its own direction.
        """
        self.splice()
        aToB, bToA = self.pump.sides[self.a.end].outgoing, self.pump.sides[self.b.end].outgoing
        request, answer = randomBytes(2000), randomBytes(30 * 1024)
        self.a.outside.transport.write(request)
        yield within(self.b.outside.whenReceived(len(request)), WAIT, "the request")
        self.b.outside.transport.write(answer)
        yield within(self.a.outside.whenReceived(len(answer)), WAIT, "the answer")
        self.assertEqual((aToB.grown, bToA.grown), (False, False))
        stream = randomBytes(4 * MiB)
        self.a.outside.transport.write(stream)
        got = yield within(self.b.outside.whenReceived(len(request + stream)), WAIT, "the stream")
        self.assertEqual(got, request + stream)
        self.assertEqual((aToB.grown, bToA.grown), (True, False))
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()

    @defer.inlineCallbacks
    def test_heldBytesSentInTheSplice(self):
        """
        Bytes a side held before the splice (the first bytes of a user's
        connection, read with the data channel's answer) go to the kernel
        in the splice call, not at the reactor's next turn.
        """
        held = b"GET / HTTP/1.1\r\n\r\n"
        self.a.end.relayReceived(held)
        self.splice()
        self.assertEqual(twistedBuffered(self.b.end.transport), 0)
        got = yield within(self.b.outside.whenReceived(len(held)), WAIT, "the held bytes")
        self.assertEqual(got, held)
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()

    @defer.inlineCallbacks
    def test_heldBytesGoFirst(self):
        """
        Bytes a side held before the splice, and bytes still in a
        transport's own write buffer, reach the far end before anything the
        pump moves, in order.
        """
        held = randomBytes(64 * 1024)
        buffered = randomBytes(2 * MiB)
        later = randomBytes(MiB)
        self.a.end.relayReceived(held)
        self.b.end.transport.write(buffered)
        self.a.outside.transport.write(later)
        self.splice()
        got = yield within(self.b.outside.whenReceived(len(buffered + held + later)), WAIT,
                           "the buffered, held and later bytes")
        self.assertEqual(got, buffered + held + later)
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()


    @defer.inlineCallbacks
    def test_bytesWaitingAtTheSpliceMoveAtOnce(self):
        """
        What a side's socket already holds when it is spliced is moved on by
        splice() itself, not a reactor turn later behind other events, and
        the stream goes on from there.
        """
        first, later = randomBytes(16 * 1024), randomBytes(MiB)
        self.a.outside.transport.write(first)
        fd = self.a.end.transport.fileno()
        yield waitUntil(lambda: waitingIn(fd) == len(first), WAIT,
                        "the first bytes to wait in A's socket")
        self.splice()
        self.assertEqual(self.pump.moved, len(first))
        self.a.outside.transport.write(later)
        got = yield within(self.b.outside.whenReceived(len(first + later)), WAIT, "every byte")
        self.assertEqual(got, first + later)
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()

    @defer.inlineCallbacks
    def test_bytesPassedOnAfterTheSpliceGoFirst(self):
        """
        Bytes the spliced protocol passes on after the splice (what it read
        past its last frame) reach the far end before the bytes waiting in
        its socket, which the pump moves.
        """
        later = randomBytes(64 * 1024)
        self.a.outside.transport.write(later)
        fd = self.a.end.transport.fileno()
        yield waitUntil(lambda: select.select([fd], [], [], 0)[0], WAIT,
                        "the later bytes to wait in A's socket")
        self.a.end.stillPassingOn = True
        self.splice()
        # The splice thread would read A's socket at once, ahead of these.
        self.assertFalse(self.pump.inThread, "handed to the splice thread before its first event")
        self.assertEqual(self.pump.moved, 0, "read the socket ahead of the bytes passed on")
        self.a.end.relayReceived(b"past the last frame")
        self.a.end.stillPassingOn = False
        got = yield within(self.b.outside.whenReceived(19 + len(later)), WAIT, "every byte")
        self.assertEqual(got, b"past the last frame" + later)
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()


class HalfCloseTests(ZeroCopyTestCase):
    @defer.inlineCallbacks
    def assertHalfClose(self, first: Pair, second: Pair):
        """
        C{first}'s peer sends and shuts down its write side: C{second}'s
        peer gets the bytes then end-of-stream, and can still answer; its
        own end-of-stream closes everything.
        """
        self.splice()
        second.outside.keepOpen = True
        request, answer = randomBytes(MiB), randomBytes(3 * MiB)
        first.outside.transport.write(request)
        first.outside.transport.loseWriteConnection()
        got = yield within(second.outside.ended, WAIT, "the request and its end")
        self.assertEqual(got, request)
        self.assertFalse(first.end.gone.called)
        Sender(second.outside.transport, answer).done.addCallback(
            lambda _: second.outside.transport.loseWriteConnection())
        got = yield within(first.outside.ended, WAIT, "the answer and its end")
        self.assertEqual(got, answer)
        first.outside.transport.loseConnection()
        second.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()
        self.assertEqual(self.pump.moved, len(request) + len(answer))

    def test_halfCloseFromA(self):
        return self.assertHalfClose(self.a, self.b)

    def test_halfCloseFromB(self):
        return self.assertHalfClose(self.b, self.a)


class ClosingTests(ZeroCopyTestCase):
    @defer.inlineCallbacks
    def assertCloseAfterSending(self, first: Pair, second: Pair):
        """C{first}'s peer sends and closes at once: the other gets every byte, then the close."""
        self.splice()
        payload = randomBytes(2 * MiB)
        first.outside.transport.write(payload)
        first.outside.transport.loseConnection()
        got = yield within(second.outside.ended, WAIT, "the bytes and the close")
        self.assertEqual(got, payload)
        yield self.assertBothGoneOnce()

    def test_closeAfterSendingFromA(self):
        return self.assertCloseAfterSending(self.a, self.b)

    def test_closeAfterSendingFromB(self):
        return self.assertCloseAfterSending(self.b, self.a)

    @defer.inlineCallbacks
    def assertResetMidStream(self, reset: Pair, other: Pair):
        """
        C{reset}'s peer resets its connection while the other streams to
        it: both connections close, nothing is left half-open.
        """
        self.splice()
        Sender(other.outside.transport, randomBytes(64 * MiB))
        yield within(reset.outside.whenReceived(MiB), WAIT, "the stream to flow")
        reset.outside.transport.abortConnection()
        yield self.assertBothGoneOnce()

    def test_resetOfA(self):
        return self.assertResetMidStream(self.a, self.b)

    def test_resetOfB(self):
        return self.assertResetMidStream(self.b, self.a)

    @defer.inlineCallbacks
    def test_relayEndAborted(self):
        """
        One relay end's transport is aborted by its owner (as a cut or a
        shutdown does): the pump lets go, and both sides close once.
        """
        self.splice()
        Sender(self.a.outside.transport, randomBytes(64 * MiB))
        yield within(self.b.outside.whenReceived(MiB), WAIT, "the stream to flow")
        self.b.end.transport.abortConnection()
        yield self.assertBothGoneOnce()

    @defer.inlineCallbacks
    def test_relayEndLosesConnection(self):
        """
        loseConnection on a relay end's transport (as a service stopping
        does) closes it after the bytes the pump holds for it are written.
        """
        self.splice()
        payload = randomBytes(8 * MiB)
        self.b.outside.transport.pauseProducing()
        Sender(self.a.outside.transport, payload)
        yield waitUntil(self.b.end.isBackedUp, WAIT, "the pipe to B to fill")
        self.b.end.transport.loseConnection()
        self.a.end.transport.loseConnection()
        self.b.outside.transport.resumeProducing()
        got = yield within(self.b.outside.closed, WAIT, "the bytes and the close")
        self.assertEqual(got, payload[:len(got)])
        self.assertGreater(len(got), 0)
        yield self.assertBothGoneOnce()


class FlowControlTests(ZeroCopyTestCase):
    @defer.inlineCallbacks
    def test_slowReaderPausesTheWriter(self):
        """
        B's peer stops reading while A's sends 32 MiB: the pump stops
        reading A once the pipe to B is full, holding at most a pipe's
        worth; when B reads again, every byte arrives in order.
        """
        self.splice()
        payload = randomBytes(32 * MiB)
        self.b.outside.transport.pauseProducing()
        sender = Sender(self.a.outside.transport, payload)
        sampler = task.LoopingCall(self.sampleHeld)
        self.held = 0
        sampler.start(0.001)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        yield waitUntil(
            lambda: self.b.end.isBackedUp() and not self.reads(self.a.end),
            WAIT, "the pump to stop reading A while B is full")
        self.assertLessEqual(self.heldNow(), splicepipe.PIPE_SIZE)
        self.assertLess(sender.sent, len(payload))
        self.b.outside.transport.resumeProducing()
        got = yield within(self.b.outside.whenReceived(len(payload)), WAIT, "all 32 MiB")
        self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(payload).digest())
        sampler.stop()
        self.assertLessEqual(self.held, splicepipe.PIPE_SIZE)
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()

    def heldNow(self) -> int:
        return self.a.end.bufferedBytes() + self.b.end.bufferedBytes()

    def sampleHeld(self) -> None:
        self.held = max(self.held, self.heldNow())


class FallbackTests(unittest.TestCase):
    def test_notTCP(self):
        """Transports that are not sockets take the ordinary path."""
        a, b = End(), End()
        a.factory = b.factory = Factory()
        a.factory.accepted = defer.Deferred()
        a.makeConnection(StringTransport())
        a.factory.accepted = defer.Deferred()
        b.makeConnection(StringTransport())
        self.assertFalse(zerocopy.usable(a.transport))
        splice(a, b, zeroCopy=True)
        self.assertIsNone(a.pump)
        self.assertIs(a.transport.producer, b.transport)
        a.dataReceived(b"through Python")
        self.assertEqual(b.transport.value(), b"through Python")


class PipeFailureTests(ZeroCopyTestCase):
    """
    A pump whose pipes cannot be made (the process is out of descriptors)
    leaves the connection to the ordinary path, which carries it whole.
    """

    def failPipe(self, number: int) -> None:
        """Make the C{number}th pipe asked for (counting from 1) fail with EMFILE."""
        openPipe = zerocopy.Direction.openPipe
        asked = []

        def failing(direction):
            asked.append(direction)
            if len(asked) == number:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            openPipe(direction)

        self.patch(zerocopy.Direction, "openPipe", failing)

    @defer.inlineCallbacks
    def assertOrdinaryPathCarriesBoth(self):
        logs = LogWatcher(self)
        self.splice(zeroCopy=True, expectPump=False)
        self.assertIsNone(self.pump)
        self.assertIsNone(self.b.end.pump)
        self.assertEqual(
            [event["why"] for event in logs.matching(
                LogWatcher.formatted("cannot make a pipe to splice"))],
            [os.strerror(errno.EMFILE)])
        toB, toA = randomBytes(MiB), randomBytes(MiB)
        Sender(self.a.outside.transport, toB)
        Sender(self.b.outside.transport, toA)
        got = yield within(defer.gatherResults([
            self.b.outside.whenReceived(len(toB)), self.a.outside.whenReceived(len(toA))]),
            WAIT, "1 MiB each way without zero copy")
        self.assertEqual(got, [toB, toA])
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()

    def test_firstPipeFails(self):
        """No pipe at all: the relay goes on through Python."""
        self.failPipe(1)
        return self.assertOrdinaryPathCarriesBoth()

    def test_secondPipeFails(self):
        """
        One pipe made, the other not: the one made is closed (checked at
        cleanup) and the relay goes on through Python.
        """
        self.failPipe(2)
        return self.assertOrdinaryPathCarriesBoth()


class TLSFallbackTests(ZeroCopyTestCase):
    @defer.inlineCallbacks
    def setUp(self):
        now = datetime.now(timezone.utc)
        ca = certmaking.makeCA("zero copy test CA", now)
        issued = certmaking.makeServer(ca, ["localhost"], [ip_address(HOST)], now)
        server = ssl.PrivateCertificate.loadPEM(
            certmaking.certificatePEM(issued.certificate) + certmaking.keyPEM(issued.key))
        self.recordPipes()
        self.a = yield connectedPair(
            self, SSL4ServerEndpoint(reactor, 0, server.options(), interface=HOST),
            lambda port: SSL4ClientEndpoint(reactor, HOST, port, ssl.CertificateOptions()))
        self.b = yield connectedPair(self)

    @defer.inlineCallbacks
    def test_tlsSideTakesTheOrdinaryPath(self):
        """A TLS connection spliced to a TCP one: no pump, bytes intact both ways."""
        self.assertFalse(zerocopy.usable(self.a.end.transport))
        self.assertTrue(zerocopy.usable(self.b.end.transport))
        self.splice(zeroCopy=True, expectPump=False)
        self.assertIsNone(self.pump)
        toB, toA = randomBytes(MiB), randomBytes(MiB)
        Sender(self.a.outside.transport, toB)
        Sender(self.b.outside.transport, toA)
        got = yield within(defer.gatherResults([
            self.b.outside.whenReceived(len(toB)), self.a.outside.whenReceived(len(toA))]),
            WAIT, "1 MiB each way")
        self.assertEqual(got, [toB, toA])
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()


# The same tests with the pump handed to the splice thread.


class PayloadTestsInSpliceThread(PayloadTests):
    spliceThread = True


class HalfCloseTestsInSpliceThread(HalfCloseTests):
    spliceThread = True


class ClosingTestsInSpliceThread(ClosingTests):
    spliceThread = True


class FlowControlTestsInSpliceThread(FlowControlTests):
    spliceThread = True


# And with the splice thread polling between events, as it does by default
# in the server and the client (the classes above have it sleep at once).


class PayloadTestsBusyPolling(PayloadTests):
    spliceThread = True
    busyPoll = 100e-6


class HalfCloseTestsBusyPolling(HalfCloseTests):
    spliceThread = True
    busyPoll = 100e-6


class FlowControlTestsBusyPolling(FlowControlTests):
    spliceThread = True
    busyPoll = 100e-6


class SpliceThreadTests(ZeroCopyTestCase):
    """How a pump goes to the splice thread and comes back."""

    spliceThread = True

    @defer.inlineCallbacks
    def assertCarries(self, size: int = 256 * 1024):
        toB, toA = randomBytes(size), randomBytes(size)
        before = (len(self.b.outside.received), len(self.a.outside.received))
        Sender(self.a.outside.transport, toB)
        Sender(self.b.outside.transport, toA)
        got = yield within(defer.gatherResults([
            self.b.outside.whenReceived(before[0] + size),
            self.a.outside.whenReceived(before[1] + size)]), WAIT, "bytes both ways")
        self.assertEqual([got[0][before[0]:], got[1][before[1]:]], [toB, toA])

    @defer.inlineCallbacks
    def test_writeTakesThePumpBack(self):
        """
        A write through the relay end of a connection the splice thread
        holds takes the pump back to the reactor first; the bytes follow
        what the pipe held, and once they are written the pump goes to the
        thread again.
        """
        self.splice()
        self.assertFalse(self.pump.inThread, "handed to the thread before its first event")
        yield self.assertCarries()
        self.assertTrue(self.pump.inThread)
        self.a.end.writeToConnection(b"from the reactor")
        self.assertFalse(self.pump.inThread)
        got = yield within(self.a.outside.whenReceived(256 * 1024 + 16), WAIT,
                           "the reactor's write")
        self.assertEqual(got[-16:], b"from the reactor")
        yield waitUntil(lambda: self.pump.inThread, WAIT, "the pump to go back to the thread")
        self.assertEqual(self.pump.handOffs, 2)
        yield self.assertCarries()
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()

    @defer.inlineCallbacks
    def test_writeStraightToTheTransport(self):
        """
        A write that does not go through the relay end, to a transport the
        splice thread holds: the reactor's doWrite for it takes the pump
        back before it writes, and the bytes arrive.
        """
        self.splice()
        yield self.assertCarries()
        self.assertTrue(self.pump.inThread)
        self.a.end.transport.write(b"from the reactor")
        got = yield within(self.a.outside.whenReceived(256 * 1024 + 16), WAIT,
                           "the reactor's write")
        self.assertEqual(got[-16:], b"from the reactor")
        yield waitUntil(lambda: self.pump.inThread, WAIT, "the pump to go back to the thread")
        self.assertEqual(self.pump.handOffs, 2)
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()

    @defer.inlineCallbacks
    def pingPong(self, rounds: int) -> defer.Deferred:
        """C{rounds} messages from A's side, each answered from B's side before the next."""
        for n in range(rounds):
            message = b"ping %d" % n
            before = (len(self.b.outside.received), len(self.a.outside.received))
            self.a.outside.transport.write(message)
            got = yield within(self.b.outside.whenReceived(before[0] + len(message)), WAIT,
                               f"ping {n}")
            self.assertEqual(got[before[0]:], message)
            self.b.outside.transport.write(message.upper())
            got = yield within(self.a.outside.whenReceived(before[1] + len(message)), WAIT,
                               f"pong {n}")
            self.assertEqual(got[before[1]:], message.upper())

    @defer.inlineCallbacks
    def caughtInPingPong(self, busyPoll: float) -> defer.Deferred:
        """
        How many events the thread caught while polling, with C{busyPoll},
        in a ping-pong of 10 rounds (after 2 that teach it the answer times);
        then both connections are closed.
        """
        self.busyPoll = busyPoll
        self.splice()
        waiting = self.pump.thread.waiting
        yield self.pingPong(2)
        self.assertTrue(self.pump.inThread)
        before = waiting.caught
        yield self.pingPong(10)
        self.assertTrue(self.pump.inThread)
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()
        return waiting.caught - before

    @defer.inlineCallbacks
    def test_answersCaughtWhilePolling(self):
        """
        With a budget, the thread polls between the events of a ping-pong
        and catches answers without sleeping; every byte still arrives in
        order.  (A budget of 0.2 s: the answer crosses this process's reactor,
        which may wait for the GIL.)
        """
        caught = yield self.caughtInPingPong(0.2)
        self.assertGreater(caught, 0)

    @defer.inlineCallbacks
    def test_noBudgetNoPolling(self):
        """With a budget of 0 the thread sleeps between every event of a ping-pong."""
        caught = yield self.caughtInPingPong(0.0)
        self.assertEqual(caught, 0)

    @defer.inlineCallbacks
    def test_shortExchangesStayInTheReactor(self):
        """
        A pump goes to the thread only after HAND_OFF_AFTER reads in the
        reactor: a request and its answer never pay for the hand-off.
        """
        self.handOffAfter = HAND_OFF_AFTER
        self.splice()
        for n in range(HAND_OFF_AFTER - 1):
            before = len(self.b.outside.received)
            self.a.outside.transport.write(b"%d" % n)
            yield within(self.b.outside.whenReceived(before + len(b"%d" % n)), WAIT,
                         f"message {n}")
        self.assertLess(self.pump.reactorReads, HAND_OFF_AFTER)
        self.assertEqual(self.pump.handOffs, 0)
        yield self.assertCarries()
        self.assertGreaterEqual(self.pump.reactorReads, HAND_OFF_AFTER)
        self.assertTrue(self.pump.inThread)
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()

    @defer.inlineCallbacks
    def test_handedOffBySpliceItself(self):
        """
        Bytes waiting on both sides at the splice: the first side's read
        hands the pump to the thread (HAND_OFF_AFTER is 1 here), and the
        reactor leaves the other side to the thread; both streams arrive.
        """
        toB, toA = randomBytes(16 * 1024), randomBytes(16 * 1024)
        self.a.outside.transport.write(toB)
        self.b.outside.transport.write(toA)
        for side, size in ((self.a.end, len(toB)), (self.b.end, len(toA))):
            fd = side.transport.fileno()
            yield waitUntil(lambda: waitingIn(fd) == size, WAIT, "the bytes to wait")
        read = []
        readWaiting = zerocopy.Side.readWaiting
        self.patch(zerocopy.Side, "readWaiting", lambda side: (read.append(side),
                                                             readWaiting(side)))
        self.splice()
        self.assertTrue(self.pump.inThread)
        self.assertEqual(len(read), 1, "the reactor read a side the thread holds")
        gotB = yield within(self.b.outside.whenReceived(len(toB)), WAIT, "A's bytes at B")
        gotA = yield within(self.a.outside.whenReceived(len(toA)), WAIT, "B's bytes at A")
        self.assertEqual((gotB, gotA), (toB, toA))
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()

    @defer.inlineCallbacks
    def test_loseConnectionWhileInThread(self):
        """The relay end closing a connection the thread holds closes both, each once."""
        self.splice()
        yield self.assertCarries()
        self.assertTrue(self.pump.inThread)
        self.a.end.closeConnection()
        self.assertFalse(self.pump.inThread)
        yield self.assertBothGoneOnce()

    @defer.inlineCallbacks
    def test_abortWhileInThread(self):
        """The relay end aborting a connection the thread holds: both closed, each once."""
        self.splice()
        yield self.assertCarries()
        self.assertTrue(self.pump.inThread)
        self.b.end.closeConnection(abort=True)
        self.assertFalse(self.pump.inThread)
        yield self.assertBothGoneOnce()

    @defer.inlineCallbacks
    def test_failureInTheThreadIsLoggedAndTheReactorGoesOn(self):
        """
        An exception in the splice thread is logged in the reactor, which
        takes the pump back and carries every byte.
        """
        logs = LogWatcher(self)
        moveInThread = zerocopy.Side.moveInThread
        failed = []

        def failingOnce(side, events):
            if not failed:
                failed.append(side)
                raise RuntimeError("a bug in the splice thread")
            return moveInThread(side, events)

        self.patch(zerocopy.Side, "moveInThread", failingOnce)
        self.splice()
        yield self.assertCarries(MiB)
        self.assertEqual(len(failed), 1)
        self.assertEqual(len(logs.matching(LogWatcher.formatted("the splice thread failed"))),
                         1)
        self.flushLoggedErrors(RuntimeError)
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()

    @defer.inlineCallbacks
    def test_heldBytesFirstThenThread(self):
        """
        Bytes held before the splice keep the pump in the reactor until
        Twisted has written them; then it goes to the thread.
        """
        self.a.end.relayReceived(b"early")
        self.splice()
        self.assertFalse(self.pump.inThread)
        got = yield within(self.b.outside.whenReceived(5), WAIT, "the early bytes")
        self.assertEqual(got, b"early")
        yield self.assertCarries()
        self.assertTrue(self.pump.inThread)
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()

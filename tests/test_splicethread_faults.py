"""
The splice thread failing outside any one connection's step: every pump it
held goes back to the reactor, which carries their bytes and closes them as
usual, and the failure is logged; a thread that has ended adopts nothing and
lets go of pumps without raising.  The fault comes in through the thread's
own seam (how it waits for events), over loopback connections.
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import defer, reactor

from gotunnel.relay import zerocopy
from gotunnel.relay.splicethread import BusyPoll, SpliceThread

from tests.support import LogWatcher, randomBytes, waitUntil, within
from tests.test_zerocopy import WAIT, Sender, ZeroCopyTestCase


class FailingWaiting(BusyPoll):
    """The thread's waiting, which raises once told to, after its next events."""

    failing = False

    def wait(self, budget: float) -> list:
        ready = super().wait(budget)
        if self.failing:
            raise RuntimeError("a bug in the splice thread's loop")
        return ready


class ThreadFailureTests(ZeroCopyTestCase):
    spliceThread = True

    def startThread(self, makeWaiting=BusyPoll) -> SpliceThread:
        """A splice thread of this test's own, ended (if it has not) at cleanup."""
        thread = SpliceThread(reactor, makeWaiting)

        def stop():
            thread.stop()
            return waitUntil(lambda: not thread.thread.is_alive(), WAIT,
                             "the splice thread to end")

        self.addCleanup(stop)
        return thread

    def spliceThrough(self, thread: SpliceThread) -> zerocopy.SplicePump:
        """Splice the two relay ends with a pump that hands off to C{thread}."""
        a, b = self.a.end, self.b.end
        pump = zerocopy.SplicePump(a, b, thread, handOffAfter=1)
        pump.openPipes()
        a.peer, b.peer = b, a
        pump.start()
        self.pump = pump
        return pump

    @defer.inlineCallbacks
    def carry(self, size: int) -> defer.Deferred:
        """C{size} random bytes each way, checked end to end."""
        toB, toA = randomBytes(size), randomBytes(size)
        before = (len(self.b.outside.received), len(self.a.outside.received))
        Sender(self.a.outside.transport, toB)
        Sender(self.b.outside.transport, toA)
        got = yield within(defer.gatherResults([
            self.b.outside.whenReceived(before[0] + size),
            self.a.outside.whenReceived(before[1] + size)]), WAIT, "bytes both ways")
        self.assertEqual([got[0][before[0]:], got[1][before[1]:]], [toB, toA])

    @defer.inlineCallbacks
    def test_loopFailureHandsEveryPumpBack(self):
        """
        The thread's loop raises (not inside a connection's step) while it
        holds a pump: the pump goes back to the reactor, which carries 1 MiB
        each way and closes both connections once each; the failure is
        logged once, naming how many connections went back, and the thread
        has ended.
        """
        logs = LogWatcher(self)
        thread = self.startThread(FailingWaiting)
        pump = self.spliceThrough(thread)
        yield self.carry(64 * 1024)
        self.assertTrue(pump.inThread)
        thread.waiting.failing = True
        yield self.carry(1024 * 1024)
        self.assertFalse(pump.inThread)
        yield waitUntil(lambda: not thread.thread.is_alive(), WAIT, "the thread to end")
        [failed] = yield within(logs.whenMatched(LogWatcher.formatted(
            "the splice thread failed; the reactor relays")), WAIT, "the failure's log event")
        self.assertEqual(failed["count"], 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()

    @defer.inlineCallbacks
    def test_endedThreadAdoptsNothing(self):
        """
        A thread that has ended refuses a pump with an OSError (the pump
        stays in the reactor, as when the kernel refuses a watch), and lets
        go of one without raising although its epoll is closed.
        """
        thread = self.startThread()
        thread.stop()
        yield waitUntil(lambda: not thread.thread.is_alive(), WAIT, "the thread to end")
        self.assertTrue(thread.epoll.closed)
        side = SimpleNamespace(fd=self.a.end.transport.fileno(), mask=0,
                               wantedEvents=lambda: 1)
        pump = SimpleNamespace(sides={self.a.end: side})
        self.assertRaises(OSError, thread.adopt, pump)
        thread.release(pump)
        self.assertEqual(thread.sides, {})

    @defer.inlineCallbacks
    def test_pumpOfAnEndedThreadStaysInTheReactor(self):
        """
        A pump whose thread has ended relays its bytes in the reactor, and
        its connections close as usual.
        """
        logs = LogWatcher(self)
        thread = self.startThread()
        thread.stop()
        yield waitUntil(lambda: not thread.thread.is_alive(), WAIT, "the thread to end")
        pump = self.spliceThrough(thread)
        yield self.carry(256 * 1024)
        self.assertFalse(pump.inThread)
        self.assertIsNone(pump.thread)
        [refused] = logs.matching(LogWatcher.formatted("cannot hand a connection"))
        self.assertEqual(refused["why"], "the splice thread has ended")
        self.a.outside.transport.loseConnection()
        yield self.assertBothGoneOnce()

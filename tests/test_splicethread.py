"""
How the splice thread waits for its events (gotunnel.relay.splicethread): how it
polls before it sleeps, on a scripted clock and epoll (BusyPoll), and for
which answers it polls (pollBudget).  The thread itself, moving bytes, is tested over
loopback in test_zerocopy (SpliceThreadTests and the ...InSpliceThread
classes).
"""

from __future__ import annotations

import math
import select
from types import SimpleNamespace

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from gotunnel.client.service import TunnelClientService
from gotunnel.config.mappings import Mapping
from gotunnel.config.settings import ClientSettings, ServerSettings
from gotunnel.server.service import TunnelServerService
from gotunnel.relay.splicethread import BusyPoll, SpliceThreadService, pollBudget

US = 1e-6
BUDGET = 100 * US
EVENT = (7, select.EPOLLIN)


class ScriptedEpoll:
    """
    A clock and an epoll's C{poll} for L{BusyPoll}: events arrive at the
    times given; each poll that does not wait, and each yield, takes
    C{step} seconds; a poll that waits jumps to the next arrival.

    @ivar calls: the timeout of each poll (None: waits as long as it takes).
    @ivar returned: the events the last L{waitFor} returned.
    """

    def __init__(self, step: float = 1 * US) -> None:
        self.now = 0.0
        self.step = step
        self.arrivals: list[float] = []
        self.calls: list = []
        self.yields = 0

    def arriveIn(self, seconds: float) -> None:
        self.arrivals.append(self.now + seconds)

    def clock(self) -> float:
        return self.now

    def yieldCPU(self) -> None:
        self.yields += 1
        self.now += self.step

    def poll(self, timeout=None) -> list:
        self.calls.append(timeout)
        if timeout == 0:
            self.now += self.step
            if self.arrivals and self.arrivals[0] <= self.now:
                self.arrivals.pop(0)
                return [EVENT]
            return []
        self.now = max(self.now, self.arrivals.pop(0))
        return [EVENT]

    def waitFor(self, waiting: BusyPoll, arrivesIn: float, budget: float = BUDGET) -> list:
        """The polls of one C{waiting.wait(budget)}, for events C{arrivesIn} seconds away."""
        self.calls = []
        self.arriveIn(arrivesIn)
        self.returned = waiting.wait(budget)
        return self.calls


class BusyPollTests(unittest.TestCase):
    def setUp(self):
        self.epoll = ScriptedEpoll()
        self.waiting = BusyPoll(self.epoll.poll, self.epoll.clock, self.epoll.yieldCPU)

    def wait(self, arrivesIn: float, budget: float = BUDGET) -> list:
        calls = self.epoll.waitFor(self.waiting, arrivesIn, budget)
        self.assertEqual(self.epoll.returned, [EVENT])
        self.assertEqual(self.waiting.wokeAt, self.epoll.now)
        return calls

    def test_noBudgetSleepsAtOnce(self):
        """With a budget of 0 a wait sleeps until its events, however close they are."""
        self.assertEqual(self.wait(5 * US, budget=0), [None])
        self.assertEqual(self.epoll.yields, 0)
        self.assertEqual(self.waiting.caught, 0)

    def test_eventsWithinTheBudgetArePolledFor(self):
        """
        Events that come within the budget are polled for, with the CPU
        yielded between polls, and never slept for.
        """
        calls = self.wait(20 * US)
        self.assertEqual(set(calls), {0})
        self.assertGreaterEqual(len(calls), 10)
        self.assertEqual(self.epoll.yields, len(calls) - 1)
        self.assertEqual(self.waiting.caught, 1)

    def test_pollingStopsAtTheBudget(self):
        """
        Events that do not come within the budget are polled for until it
        is spent, then slept for.
        """
        calls = self.wait(1.0)
        self.assertEqual(calls[-1], None)
        self.assertEqual(set(calls[:-1]), {0})
        # One poll and one yield per microsecond of the 100 us budget.
        self.assertGreaterEqual(len(calls) - 1, 45)
        self.assertLessEqual(len(calls) - 1, 55)
        self.assertEqual(self.waiting.caught, 0)
        self.assertAlmostEqual(self.epoll.now, 1.0)

    def test_eventsAlreadyThereCostOnePoll(self):
        """Events already there when a polling wait starts: one poll, no yield."""
        self.assertEqual(self.wait(0), [0])
        self.assertEqual(self.epoll.yields, 0)
        self.assertEqual(self.waiting.caught, 1)


class FakeSide:
    """What pollBudget reads and writes of a zerocopy.Side."""

    writtenAt = 0.0
    answerGap = math.inf

    def __init__(self, pump, name: str) -> None:
        self.pump = pump
        self.name = name


def fakePump(budget: float = BUDGET):
    """Two L{FakeSide}s of a pump that polls for C{budget}, each the other's sink."""
    pump = SimpleNamespace(busyPoll=budget)
    a, b = FakeSide(pump, "a"), FakeSide(pump, "b")
    a.outgoing = SimpleNamespace(sink=b)
    b.outgoing = SimpleNamespace(sink=a)
    return a, b


class PollBudgetTests(unittest.TestCase):
    """Which answers the thread polls for: the sockets' own answer times."""

    def test_noAnswerSeenYet(self):
        """Bytes to a socket that has never answered: nothing to poll for."""
        a, b = fakePump()
        self.assertEqual(pollBudget(a, 1.0), 0.0)
        self.assertEqual(b.writtenAt, 1.0)

    def test_aQuickAnswerIsPolledForNextTime(self):
        """
        A socket that answered within the budget is polled for when the
        next bytes go to it; one that took longer is not.
        """
        a, b = fakePump()
        pollBudget(a, 1.0)
        pollBudget(b, 1.0 + 30 * US)
        self.assertAlmostEqual(b.answerGap, 30 * US)
        self.assertEqual(pollBudget(a, 2.0), BUDGET)
        pollBudget(b, 2.0 + 300 * US)
        self.assertEqual(pollBudget(a, 3.0), 0.0)

    def test_eachSocketHasItsOwnAnswerTime(self):
        """
        A ping-pong whose service answers in 30 us and whose user takes
        1 ms for the next request: the thread polls after a request, for
        the service's answer, and sleeps after the answer, until the user's
        next request.
        """
        user, service = fakePump()
        now, budgets = 0.0, []
        for _ in range(5):
            budgets.append(("request", pollBudget(user, now)))
            now += 30 * US
            budgets.append(("answer", pollBudget(service, now)))
            now += 1e-3
        self.assertEqual(budgets[-4:], [("request", BUDGET), ("answer", 0.0)] * 2)

    def test_unansweredStreams(self):
        """A one-way stream: the sink never answers, and the thread never polls."""
        source, sink = fakePump()
        self.assertEqual([pollBudget(source, n * US) for n in range(10)], [0.0] * 10)
        self.assertEqual(sink.answerGap, math.inf)

    def test_noBudget(self):
        """A pump whose budget is 0 is never polled for, however quick its answers."""
        a, b = fakePump(budget=0.0)
        for n in range(5):
            self.assertEqual(pollBudget(a, n * 1e-3), 0.0)
            self.assertEqual(pollBudget(b, n * 1e-3 + US), 0.0)


class SpliceThreadServiceTests(unittest.TestCase):
    """The splice thread as a service: owned by a server or client, joined on stop."""

    def test_stopJoinsTheThread(self):
        """stopService ends the thread and returns once it has ended."""
        from twisted.internet import reactor

        service = SpliceThreadService(reactor)
        service.startService()
        thread = service.thread()
        self.assertTrue(thread.thread.is_alive())
        self.assertIs(service.thread(), thread, "one thread while it runs")
        service.stopService()
        self.assertFalse(thread.thread.is_alive())

    def test_startedAgainAfterItEnded(self):
        """A thread that ended (as after a failure) is replaced for the pumps to come."""
        from twisted.internet import reactor

        service = SpliceThreadService(reactor)
        service.startService()
        self.addCleanup(service.stopService)
        first = service.thread()
        first.stop()
        first.thread.join(5)
        second = service.thread()
        self.assertIsNot(second, first)
        self.assertTrue(second.thread.is_alive())

    def test_serverAndClientOwnTheirs(self):
        """
        With zero_copy and splice_thread, the server's and the client's
        splicer each have a splice thread service, a child of theirs; with
        splice_thread off, none.
        """
        server = TunnelServerService(
            ServerSettings(listen="tcp:0", token="t", zero_copy=True, splice_thread=True),
            reactor=MemoryReactorClock())
        client = TunnelClientService(
            ClientSettings(server="tcp:127.0.0.1:1", token="t", zero_copy=True,
                           splice_thread=True, mappings=[Mapping("127.0.0.1", 2, 3)]),
            reactor=MemoryReactorClock())
        for service in (server, client):
            self.assertIsInstance(service.splicer.spliceThread, SpliceThreadService)
            self.assertIs(service.splicer.spliceThread.parent, service)
        self.assertIs(server.registry.splicer, server.splicer)
        self.assertEqual({tunnel.splicer for tunnel in client.tunnels}, {client.splicer})
        plain = TunnelServerService(
            ServerSettings(listen="tcp:0", token="t", zero_copy=True, splice_thread=False),
            reactor=MemoryReactorClock())
        self.assertIsNone(plain.splicer.spliceThread)

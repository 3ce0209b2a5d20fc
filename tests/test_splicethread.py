"""
How the splice thread waits for its events (gotunnel.splicethread.BusyPoll),
on a scripted clock and epoll: when it polls before it sleeps, for how long,
and when it stops polling.  The thread itself, moving bytes, is tested over
loopback in test_zerocopy (SpliceThreadTests and the ...InSpliceThread
classes).
"""

from __future__ import annotations

import select

from twisted.trial import unittest

from gotunnel.splicethread import BusyPoll

US = 1e-6
BUDGET = 100 * US
EVENT = (7, select.EPOLLIN)


class ScriptedEpoll:
    """
    A clock and an epoll's C{poll} for L{BusyPoll}: events arrive at the
    times given; each poll that does not wait, and each yield, takes
    C{step} seconds; a poll that waits jumps to the next arrival.

    @ivar calls: the timeout of each poll (None: waits as long as it takes).
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
        self.assertEvents = waiting.wait(budget)
        return self.calls


class BusyPollTests(unittest.TestCase):
    def setUp(self):
        self.epoll = ScriptedEpoll()
        self.waiting = BusyPoll(self.epoll.poll, self.epoll.clock, self.epoll.yieldCPU)

    def wait(self, arrivesIn: float, budget: float = BUDGET) -> list:
        calls = self.epoll.waitFor(self.waiting, arrivesIn, budget)
        self.assertEqual(self.epoll.assertEvents, [EVENT])
        return calls

    def test_noBudgetSleepsAtOnce(self):
        """With a budget of 0 every wait sleeps until its events, however close they were."""
        for _ in range(3):
            self.assertEqual(self.wait(5 * US, budget=0), [None])
        self.assertEqual(self.epoll.yields, 0)
        self.assertEqual(self.waiting.caught, 0)

    def test_firstWaitSleeps(self):
        """With no gap seen yet there is nothing to poll for: the first wait sleeps."""
        self.assertEqual(self.wait(5 * US), [None])
        self.assertAlmostEqual(self.waiting.lastGap, 5 * US)

    def test_eventsSoonAfterAShortGapArePolledFor(self):
        """
        After events that came within the budget, the next ones are polled
        for, with the CPU yielded between polls, and never slept for.
        """
        self.wait(5 * US)
        calls = self.wait(20 * US)
        self.assertNotIn(None, calls)
        self.assertEqual(set(calls), {0})
        self.assertGreaterEqual(len(calls), 10)
        self.assertEqual(self.epoll.yields, len(calls) - 1)
        self.assertEqual(self.waiting.caught, 1)
        self.assertLessEqual(abs(self.waiting.lastGap - 20 * US), 2 * US)

    def test_pollingStopsAtTheBudget(self):
        """
        Events that do not come within the budget are polled for until it
        is spent, then slept for.
        """
        self.wait(5 * US)
        start = self.epoll.now
        calls = self.wait(1.0)
        self.assertEqual(calls[-1], None)
        self.assertEqual(set(calls[:-1]), {0})
        polled = len(calls) - 1
        # One poll and one yield per step of 1 us, for the 100 us budget.
        self.assertGreaterEqual(polled, 45)
        self.assertLessEqual(polled, 55)
        self.assertEqual(self.waiting.caught, 0)
        self.assertAlmostEqual(self.epoll.now - start, 1.0)

    def test_noPollingAfterALongGap(self):
        """
        After a gap longer than the budget the thread sleeps at once: slow
        or idle connections cost no polling.
        """
        self.wait(5 * US)
        self.wait(1.0)
        for _ in range(3):
            self.assertEqual(self.wait(2.0), [None])
        self.assertEqual(self.waiting.caught, 0)

    def test_aShortGapStartsPollingAgain(self):
        """A sleep that ended within the budget makes the next wait poll again."""
        self.wait(5 * US)
        self.wait(1.0)
        self.assertEqual(self.wait(30 * US), [None])
        calls = self.wait(30 * US)
        self.assertNotIn(None, calls)
        self.assertEqual(self.waiting.caught, 1)

    def test_eventsAlreadyThereCostOnePoll(self):
        """Events that are already there when a polling wait starts: one poll, no yield."""
        self.wait(5 * US)
        self.assertEqual(self.wait(0), [0])
        self.assertEqual(self.epoll.yields, 0)
        self.assertEqual(self.waiting.caught, 1)

    def test_theBudgetIsEachWaitsOwn(self):
        """
        A gap is short or long by the budget of the wait at hand: the same
        50 us gap is polled for with 100 us and slept for with 20 us.
        """
        self.wait(50 * US, budget=100 * US)
        self.assertEqual(self.wait(50 * US, budget=20 * US)[-1], None)
        self.wait(10 * US, budget=20 * US)
        self.assertNotIn(None, self.wait(50 * US, budget=100 * US))

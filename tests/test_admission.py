"""
Admission to the control port (gotunnel.server.admission) on its own: the caps on
connections yet to send their first frame, what registered clients are
owed, and the back-off on wrong tokens, on a task.Clock.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet.task import Clock
from twisted.trial import unittest

from gotunnel.server.admission import (
    AUTH_FAILURE_MEMORY, MAX_AUTH_FAILURE_SOURCES, Admission, countDown,
)
from gotunnel.config.settings import ServerSettings


class Newcomer:
    """A connection as admission sees it; remembers being evicted."""

    def __init__(self, source: str, idle: bool = True) -> None:
        self.source = source
        self.idle = idle
        self.evicted = None

    def evict(self, held: int) -> None:
        self.evicted = held


class CountDownTests(unittest.TestCase):
    def test_table(self):
        # (counts before, key, counts after)
        cases = [({"a": 2}, "a", {"a": 1}), ({"a": 1}, "a", {}), ({}, "a", {}),
                 ({"a": 1, "b": 3}, "b", {"a": 1, "b": 2})]
        for before, key, after in cases:
            with self.subTest(before=before, key=key):
                counter = Counter(before)
                countDown(counter, key)
                self.assertEqual(dict(counter), after)


class AdmissionTestCase(unittest.TestCase):
    settings = ServerSettings(token="t", max_pending_per_source=3, max_pending_total=5,
                              auth_failure_delay_max=5.0)

    def setUp(self):
        self.clock = Clock()
        self.owed: dict[str, int] = {}
        self.admission = Admission(self.settings, self.clock,
                                   lambda source: self.owed.get(source, 0),
                                   lambda channel: channel.idle)

    def admitted(self, source: str, count: int, idle: bool = True) -> list[Newcomer]:
        channels = [Newcomer(source, idle) for _ in range(count)]
        for channel in channels:
            self.assertIsNone(self.admission.admit(channel))
        return channels


class PendingTests(AdmissionTestCase):
    def test_perSource(self):
        """A source gets max_pending_per_source connections; released ones make room."""
        first, *_ = self.admitted("192.0.2.1", 3)
        self.assertEqual(self.admission.admit(Newcomer("192.0.2.1")),
                         "3 connections from this address are already waiting for their "
                         "first frame")
        self.assertEqual(self.admission.pending, {"192.0.2.1": 3})
        self.admission.release(first)
        self.admitted("192.0.2.1", 1)

    def test_releaseForgetsTheSource(self):
        channels = self.admitted("192.0.2.1", 2)
        for channel in channels:
            self.admission.release(channel)
        self.assertEqual(self.admission.pending, {})
        # Twice, or never admitted: nothing to forget.
        self.admission.release(channels[0])
        self.assertEqual(self.admission.pending, {})

    def test_oldestOfTheHeaviestMakesRoom(self):
        """With all the room taken, the oldest idle connection of the heaviest source goes."""
        heavy = self.admitted("192.0.2.1", 3)
        self.admitted("192.0.2.2", 2)
        newcomer = Newcomer("192.0.2.3")
        self.assertIsNone(self.admission.admit(newcomer))
        self.assertEqual(heavy[0].evicted, 3)
        self.assertEqual([c.evicted for c in heavy[1:]], [None, None])

    def test_busyAreNotEvicted(self):
        """A connection whose first frame is being acted on is not idle: no room."""
        self.admitted("192.0.2.1", 3, idle=False)
        self.admitted("192.0.2.2", 2, idle=False)
        self.assertEqual(self.admission.admit(Newcomer("192.0.2.3")),
                         "5 connections are already waiting for their first frame")

    def test_noneHeavierThanTheNewcomer(self):
        """A source as heavy as the newcomer's own is not made to give way."""
        self.admitted("192.0.2.1", 2)
        self.admitted("192.0.2.2", 2)
        self.admitted("192.0.2.3", 1)
        self.assertEqual(self.admission.admit(Newcomer("192.0.2.1")),
                         "5 connections are already waiting for their first frame")

    def test_owedOnlyToRegisteredClients(self):
        """Connections owed to a source with a control channel are not held to the caps."""
        self.owed["192.0.2.1"] = 4
        self.admitted("192.0.2.1", 3)
        self.assertIsNotNone(self.admission.admit(Newcomer("192.0.2.1")))
        self.admission.clientArrived("192.0.2.1")
        self.admitted("192.0.2.1", 2)
        self.assertEqual(self.admission.pending, {"192.0.2.1": 5})
        self.admission.clientLeft("192.0.2.1")
        self.assertEqual(self.admission.clientHosts, {})

    def test_clientHostsCount(self):
        for _ in range(2):
            self.admission.clientArrived("192.0.2.1")
        self.admission.clientLeft("192.0.2.1")
        self.assertEqual(self.admission.clientHosts, {"192.0.2.1": 1})
        self.admission.clientLeft("192.0.2.1")
        self.admission.clientLeft("192.0.2.1")
        self.assertEqual(self.admission.clientHosts, {})


class BackOffTests(AdmissionTestCase):
    def test_delaysGrow(self):
        delays = [self.admission.authenticationFailed("192.0.2.66") for _ in range(9)]
        self.assertEqual(delays, [0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
        self.assertEqual(self.admission.authenticationFailed("192.0.2.67"), 0.0)

    def test_forgottenAfterAWhile(self):
        self.admission.authenticationFailed("192.0.2.66")
        self.clock.advance(AUTH_FAILURE_MEMORY)
        self.assertEqual(self.admission.authenticationFailed("192.0.2.66"), 0.1)
        self.clock.advance(AUTH_FAILURE_MEMORY + 1)
        self.assertEqual(self.admission.authenticationFailed("192.0.2.66"), 0.0)

    def test_leastRecentForgotten(self):
        """The table is bounded; a source that fails again moves to the recent end."""
        self.admission.authenticationFailed("guesser")
        for n in range(MAX_AUTH_FAILURE_SOURCES - 1):
            self.admission.authenticationFailed(f"spray-{n}")
        self.assertEqual(self.admission.authenticationFailed("guesser"), 0.1)
        self.admission.authenticationFailed("one-more")
        self.assertEqual(len(self.admission.authFailures), MAX_AUTH_FAILURE_SOURCES)
        self.assertNotIn("spray-0", self.admission.authFailures)
        self.assertIn("guesser", self.admission.authFailures)

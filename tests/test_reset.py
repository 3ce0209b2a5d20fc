"""
A reset passed on as a reset: a user whose connection is reset (SO_LINGER 0,
then close), before its data channel arrives or in the middle of a
conversation, resets the service's connection, and a service's reset
resets the user's; neither end sees a clean end-of-stream instead.  Over
loopback, through the server and the client, with zero copy and without.
"""

from __future__ import annotations

import select

from twisted.internet import defer, error
from twisted.trial import unittest

from gotunnel.relay.eagerio import readWaiting

from tests.support import (
    ServiceConnection, Tunnel, connectUser, listenService, waitUntil, within,
)
from tests.test_control import LoopbackPairTestCase


class WatchedService(ServiceConnection):
    """A connection to the local service that remembers how it ended."""

    reason = None

    def connectionLost(self, reason=None) -> None:
        self.reason = reason
        super().connectionLost(reason)


class ResetTestsMixin:
    timeout = 60
    zeroCopy = None
    spliceThread = None

    @defer.inlineCallbacks
    def setUp(self):
        self.tunnel = Tunnel(self, zeroCopy=self.zeroCopy, spliceThread=self.spliceThread)
        yield self.tunnel.startServer()
        self.service = listenService(self, WatchedService)
        _, self.public = yield within(self.tunnel.publish(
            self.service.port, health_check_interval=3600), 15, "the client's registration")
        # The client's first health probe: the next connection is a user's.
        yield within(self.service.nextConnection(), 15, "the client's probe of its service")

    def assertReset(self, reason) -> None:
        self.assertIsNotNone(reason)
        self.assertTrue(reason.check(error.ConnectionLost) and not reason.check(
            error.ConnectionDone), f"a clean close, not a reset: {reason!r}")

    @defer.inlineCallbacks
    def conversation(self):
        """A user and its service connection, after bytes went both ways."""
        user = yield within(connectUser(self, self.public), 15, "the user's connection")
        user.transport.write(b"ping")
        service = yield within(self.service.nextConnection(), 15, "the service's connection")
        yield within(service.whenReceived(4), 15, "the user's bytes at the service")
        service.transport.write(b"pong")
        yield within(user.whenReceived(4), 15, "the service's bytes at the user")
        return user, service

    @defer.inlineCallbacks
    def test_userResetDuringConversation(self):
        """A user's reset after bytes went both ways resets the service's connection."""
        user, service = yield self.conversation()
        user.transport.abortConnection()
        yield within(service.closed, 15, "the service's connection to end")
        self.assertReset(service.reason)

    @defer.inlineCallbacks
    def test_serviceResetDuringConversation(self):
        """The service's reset resets the user's connection."""
        user, service = yield self.conversation()
        reasons = []
        lost = user.connectionLost

        def recordingLost(reason=None):
            reasons.append(reason)
            lost(reason)

        user.connectionLost = recordingLost
        service.transport.abortConnection()
        yield within(user.closed, 15, "the user's connection to end")
        self.assertReset(reasons[0])


class ResetTests(ResetTestsMixin, unittest.TestCase):
    """The server's and client's default settings (zero copy on)."""

    @defer.inlineCallbacks
    def test_userResetBeforeTheSplice(self):
        """
        A user reset as soon as it connects (before its data channel can
        arrive, while the server holds it unread): the service's connection,
        made for it, is reset, not closed.
        """
        user = yield within(connectUser(self, self.public), 15, "the user's connection")
        user.transport.abortConnection()
        service = yield within(self.service.nextConnection(), 15, "the service's connection")
        yield within(service.closed, 15, "the service's connection to end")
        self.assertEqual(service.data, b"")
        self.assertReset(service.reason)


class ZeroCopyResetTests(ResetTestsMixin, unittest.TestCase):
    zeroCopy = True
    spliceThread = False


class SpliceThreadResetTests(ResetTestsMixin, unittest.TestCase):
    """The reset comes while the splice thread moves the connection's bytes."""

    zeroCopy = True
    spliceThread = True


class RelayedResetTests(ResetTestsMixin, unittest.TestCase):
    zeroCopy = False
    spliceThread = False


class ReadWaitingResetTests(LoopbackPairTestCase):
    """L{readWaiting} on a socket whose peer reset it, while its transport does not read."""

    @defer.inlineCallbacks
    def test_resetRaised(self):
        """
        The reset is raised, not returned as b"": the read consumed it, and
        the reactor would see only an end-of-stream afterwards.
        """
        self.receiver.transport.pauseProducing()
        self.addCleanup(self.receiver.transport.resumeProducing)
        fd = self.receiver.transport.fileno()
        self.sender.transport.abortConnection()
        yield waitUntil(lambda: select.select([fd], [], [], 0)[0], 15,
                        "the reset to reach the socket")
        self.assertRaises(ConnectionResetError, readWaiting, self.receiver.transport)

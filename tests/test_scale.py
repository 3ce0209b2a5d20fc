"""
Scale: a thousand users at once through one tunnel, over real loopback
sockets, each echoing 64 KiB that is checked by hash.  Every user connects
in the same instant, so the public listener's and the control listener's
accept queues both take a burst of a thousand connections.

Marked slow (CI runs it); bounded in time.
"""

from __future__ import annotations

import resource
import time

import pytest

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from gotunnel.server.channel import ServerChannel

from tests.support import HOST, Tunnel, waitUntil, within
from tests.test_load import HashingUser, listenLiveEcho

USERS = 1000
SIZE = 64 * 1024
SEED = 20261125
BACKLOG = 2048
# Per user: its socket, the public side, the data channel at both ends, the
# local connection and the echo's side, and the pipes of zero-copy splices
# (about 8 in all were seen at the peak; twice that for margin).
DESCRIPTORS_PER_USER = 16


def raiseOpenFileLimit(testCase, needed: int) -> None:
    """
    Raise this process's soft limit on open files to at least C{needed}
    (up to the hard limit) until the test ends; skip the test if the hard
    limit is lower.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed or soft == resource.RLIM_INFINITY:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise unittest.SkipTest(f"needs {needed} open files; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    testCase.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))


class ThousandUsersTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        raiseOpenFileLimit(self, USERS * DESCRIPTORS_PER_USER + 256)
        self.tunnel = Tunnel(self)
        self.server = yield self.tunnel.startServer()
        self.target = listenLiveEcho(self, backlog=BACKLOG)
        self.client, self.public = yield within(
            self.tunnel.publish(self.target.port, health_check_interval=3600), 15,
            "registration")
        self.endpoint = TCP4ClientEndpoint(reactor, HOST, self.public, timeout=30)

    @pytest.mark.slow
    @defer.inlineCallbacks
    def test_thousandConcurrentEchoes(self):
        """
        1,000 users connect at once and each sends its own 64 KiB and
        half-closes: every one gets exactly its bytes back (length and
        SHA-256) and then the close, with no connection refused or reset;
        afterwards only the control channel is left.
        """
        # Twisted's default of 50 would drop SYNs here, and each dropped one
        # costs its user a second or more.
        self.assertGreaterEqual(self.server.controlPort.backlog, USERS)
        self.assertGreaterEqual(self.server.registry.tunnels[self.public].listener.backlog, USERS)
        users = [HashingUser(SIZE, SEED + n) for n in range(USERS)]

        def abortAll():
            for user in users:
                if user.transport is not None and not user.done.called:
                    user.transport.abortConnection()
            return defer.DeferredList([u.done for u in users if u.transport is not None])

        self.addCleanup(abortAll)
        began = time.monotonic()
        connected = yield within(
            defer.DeferredList([self.endpoint.connect(Factory.forProtocol(lambda u=u: u))
                                for u in users], consumeErrors=True),
            60, f"{USERS} users to connect")
        failed = [f"user {n}: {result.getErrorMessage()}"
                  for n, (ok, result) in enumerate(connected) if not ok]
        self.assertEqual(failed, [], "connections that failed")
        results = yield within(defer.gatherResults([u.done for u in users]), 90,
                               f"{USERS} echoes of {SIZE >> 10} KiB")
        elapsed = time.monotonic() - began
        wrong = [n for n, (user, (received, digest)) in enumerate(zip(users, results))
                 if (user.sent, received, digest) != (SIZE, SIZE, user.sentHash.hexdigest())]
        self.assertEqual(wrong, [], "users that did not get their own bytes back")

        yield waitUntil(lambda: not self.target.live, 30, "the echo connections to close")
        yield waitUntil(lambda: len(self.client.tunnels[0].connections) == 0, 30,
                        "the client's connections to close")
        yield waitUntil(
            lambda: [type(c) for c in self.server.registry.connections] == [ServerChannel], 30,
            "the server's connections to close")
        self.assertLess(elapsed, 90)

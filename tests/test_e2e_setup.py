"""
A user's connection setup over real loopback sockets: the client connects
to its local service while the server answers the data channel, and
whichever of the two fails takes the other down, leaving nothing open.

Every wait is on an event, bounded by L{within}; nothing sleeps.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from gotunnel.server import ServerChannel
from tests.support import Tunnel, connectUser, listenService, waitUntil, within

WAIT = 30
"""Seconds any one step may take, even on a loaded machine."""


class HeldEndpoint:
    """The server's endpoint, with every connect held until L{release}."""

    def __init__(self, endpoint) -> None:
        self.endpoint = endpoint
        self.held: list[tuple[object, defer.Deferred]] = []
        self.requested: defer.Deferred = defer.Deferred()

    def connect(self, factory) -> defer.Deferred:
        connecting: defer.Deferred = defer.Deferred()
        self.held.append((factory, connecting))
        if not self.requested.called:
            self.requested.callback(None)
        return connecting

    def release(self) -> None:
        held, self.held = self.held, []
        for factory, connecting in held:
            self.endpoint.connect(factory).chainDeferred(connecting)


class ParallelSetupTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def publish(self, **serverSettings):
        """A server with C{serverSettings}, and a client publishing a local service."""
        self.tunnel = Tunnel(self)
        self.server = yield self.tunnel.startServer(**serverSettings)
        self.service = listenService(self)
        self.client, self.public = yield within(
            self.tunnel.publish(self.service.port, health_check_interval=3600), WAIT,
            "the server to publish the mapping")
        yield within(self.service.nextConnection(), WAIT, "the client's probe of its service")
        self.mapping = self.client.tunnels[0]
        self.held = HeldEndpoint(self.mapping.serverEndpoint)
        self.patch(self.mapping, "serverEndpoint", self.held)

    @defer.inlineCallbacks
    def assertOnlyControlLeft(self):
        yield waitUntil(lambda: len(self.mapping.connections) == 0, WAIT,
                        "the client's connections to close")
        yield waitUntil(
            lambda: [type(c) for c in self.server.registry.connections] == [ServerChannel],
            WAIT, "the server's connections to close")

    @defer.inlineCallbacks
    def test_localConnectsBeforeTheServerAnswers(self):
        """
        The local service is connected to while the data channel is still
        on its way: it gets a connection before the server has even seen
        the data channel, and the user's bytes once the two are spliced.
        """
        yield self.publish()
        user = yield connectUser(self, self.public)
        user.transport.write(b"hello")
        yield within(self.held.requested, WAIT, "the client to open a data channel")
        local = yield within(self.service.nextConnection(), WAIT,
                             "the local connection, before the data channel is made")
        self.assertEqual(len(self.server.registry.waitingUsers), 1)
        self.held.release()
        received = yield within(local.whenReceived(5), WAIT, "the user's bytes")
        self.assertEqual(received, b"hello")
        local.transport.write(b"world")
        self.assertEqual((yield within(user.whenReceived(5), WAIT, "the answer")), b"world")

    @defer.inlineCallbacks
    def test_refusedDataChannelClosesLocal(self):
        """
        A data channel the server refuses (its user left before it came)
        closes the local connection made for it, which gets no byte; nothing
        stays open on either side.  (A user's close goes unnoticed while its
        reading is held, so here the server gives up on the user first.)
        """
        yield self.publish(data_channel_timeout=0.5)
        user = yield connectUser(self, self.public)
        yield within(self.held.requested, WAIT, "the client to open a data channel")
        local = yield within(self.service.nextConnection(), WAIT, "the local connection")
        yield within(user.closed, WAIT, "the server to give up on the user")
        self.assertEqual(self.server.registry.waitingUsers, {})
        self.held.release()
        received = yield within(local.closed, WAIT, "the local connection to be closed")
        self.assertEqual(received, b"")
        yield self.assertOnlyControlLeft()

    @defer.inlineCallbacks
    def test_localRefusedBeforeTheDataChannel(self):
        """
        The local service refuses while the data channel is still on its
        way: the data channel still goes to the server, so that its user is
        closed at once, and then closes; nothing stays open.
        """
        yield self.publish()
        yield within(self.service.stop(), WAIT, "the local service to stop")
        refused: defer.Deferred = defer.Deferred()
        unreachable = self.mapping.localEndpoint.connect

        def connectLocal(factory):
            connecting = unreachable(factory)
            connecting.addErrback(lambda failure: refused.callback(None) or failure)
            return connecting

        self.patch(self.mapping.localEndpoint, "connect", connectLocal)
        user = yield connectUser(self, self.public)
        user.transport.write(b"anyone there?")
        yield within(refused, WAIT, "the local service to refuse")
        self.assertEqual(len(self.held.held), 1, "the data channel is still held")
        self.held.release()
        data = yield within(user.closed, WAIT, "the user to be closed")
        self.assertEqual(data, b"")
        yield self.assertOnlyControlLeft()

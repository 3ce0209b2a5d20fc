"""
A user's connection setup over real loopback sockets: the client connects
to its local service while the server answers the data channel, and
whichever of the two fails takes the other down, leaving nothing open.
Data channels go to the address the control channel reached.

Every wait is on an event, bounded by L{within}; nothing sleeps.
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from zope.interface import implementer

from gotunnel.client.endpoints import ServerEndpoints
from gotunnel.config.mappings import Mapping
from gotunnel.config.settings import ClientSettings
from gotunnel.server.channel import ServerChannel
from tests.support import (
    Tunnel, connectUser, echoedThrough, listenService, listenTarget, randomBytes, waitUntil,
    within,
)

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


class DataChannelAddressTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_dataChannelsSkipTheNameLookup(self):
        """
        A server given by name: the control channel looks the name up, and
        each data channel connects to the address the control channel
        reached, with no lookup of its own; the bytes go through.
        """
        lookups: list[str] = []
        resolver = reactor.nameResolver

        @implementer(IHostnameResolver)
        class CountingResolver:
            def resolveHostName(self, receiver, hostName, *args, **kwargs):
                lookups.append(hostName)
                return resolver.resolveHostName(receiver, hostName, *args, **kwargs)

        reactor.installNameResolver(CountingResolver())
        self.addCleanup(reactor.installNameResolver, resolver)
        tunnel = Tunnel(self)
        yield tunnel.startServer()
        target = listenTarget(self)
        client, public = yield within(
            tunnel.publish(target, server=f"tcp:localhost:{tunnel.controlPort}",
                           health_check_interval=3600),
            WAIT, "the client to register through the name localhost")
        self.assertEqual(lookups, ["localhost"])
        for _ in range(3):
            payload = randomBytes(4096)
            self.assertTrue((yield echoedThrough(self, public, payload, WAIT)))
        self.assertEqual(lookups, ["localhost"])


class ServerEndpointsTests(unittest.TestCase):
    """L{ServerEndpoints} on a memory reactor: which endpoint each channel gets."""

    def endpoints(self, server: str, **tlsSettings) -> ServerEndpoints:
        settings = ClientSettings(server=server, token="t", name="n",
                                  mappings=[Mapping("127.0.0.1", 22, 10022)])
        for key, value in tlsSettings.items():
            setattr(settings, key, value)
        return ServerEndpoints(MemoryReactorClock(), settings)

    def test_nameIsPinnedToTheAddressReached(self):
        endpoints = self.endpoints("tcp:tunnel.example.com:17000")
        data = endpoints.dataChannel(IPv4Address("TCP", "192.0.2.7", 17000))
        self.assertIsInstance(data, TCP4ClientEndpoint)
        data.connect(Factory.forProtocol(Protocol))
        [(host, port, _, timeout, _)] = endpoints.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("192.0.2.7", 17000, 30))

    def test_addressIsKept(self):
        """An IP address needs no lookup: data channels use the control's endpoint."""
        endpoints = self.endpoints("tcp:192.0.2.7:17000")
        self.assertIsNone(endpoints.dataChannel(IPv4Address("TCP", "192.0.2.7", 17000)))

    def test_otherEndpointsAreKept(self):
        """An endpoint string of another kind, or an address that is not TCP, is left alone."""
        endpoints = self.endpoints("unix:/tmp/gotunnel.sock")
        self.assertIsNone(endpoints.dataChannel(IPv4Address("TCP", "192.0.2.7", 17000)))
        endpoints = self.endpoints("tcp:tunnel.example.com:17000")
        self.assertIsNone(endpoints.dataChannel(None))

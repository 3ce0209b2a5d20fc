"""
Loopback fixtures for integration tests: a server and client run in this
process on the real reactor, target services, and users that collect what
they receive.  Everything binds 127.0.0.1 on ports the OS chooses, and every
helper registers its own cleanup with the test case.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from gotunnel.client import TunnelClientService
from gotunnel.config import ClientSettings, Mapping, ServerSettings
from gotunnel.server import TunnelServerService

HOST = "127.0.0.1"
TOKEN = "test-token"


def freePort() -> int:
    """A TCP port on 127.0.0.1 that the OS says is free now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def randomBytes(size: int) -> bytes:
    return os.urandom(size)


def deferLater(seconds: float) -> defer.Deferred:
    """Let the reactor run for a while (for asserting that nothing happens)."""
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class ConnectionTracker:
    """Remembers the connections a test's listeners accept, to close them at cleanup."""

    def __init__(self) -> None:
        self.protocols: list[Protocol] = []
        self.lost: list[defer.Deferred] = []


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """Echoes what it reads; on end-of-stream, finishes writing and closes."""

    def connectionMade(self) -> None:
        self.factory.tracker.protocols.append(self)
        self.onLost: defer.Deferred = defer.Deferred()
        self.factory.tracker.lost.append(self.onLost)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.onLost.callback(None)


class Banner(Echo):
    """Speaks first, then echoes: like an SSH or SMTP server."""

    banner = b"SSH-2.0-gotunnel-test\r\n"

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(self.banner)


def listenTarget(testCase, protocol: type = Echo) -> int:
    """
    Start a local service on 127.0.0.1 that serves C{protocol}; it and its
    connections are closed when the test ends.  Returns the port.
    """
    factory = Factory.forProtocol(protocol)
    factory.noisy = False
    factory.tracker = ConnectionTracker()
    port = reactor.listenTCP(0, factory, interface=HOST)

    def cleanup():
        for p in factory.tracker.protocols:
            p.transport.loseConnection()
        return defer.DeferredList([defer.maybeDeferred(port.stopListening)] +
                                  factory.tracker.lost)

    testCase.addCleanup(cleanup)
    return port.getHost().port


@implementer(IHalfCloseableProtocol)
class User(Protocol):
    """
    A user of a public port: collects everything it receives; C{closed}
    fires with the bytes once the connection is gone.
    """

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.closed: defer.Deferred = defer.Deferred()
        self.readClosed: defer.Deferred = defer.Deferred()
        self._waiters: list[tuple[int, defer.Deferred]] = []
        self._count = 0

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        self._count += len(data)
        still = []
        for size, waiter in self._waiters:
            if self._count >= size:
                waiter.callback(self.data)
            else:
                still.append((size, waiter))
        self._waiters = still

    @property
    def data(self) -> bytes:
        return b"".join(self.received)

    def whenReceived(self, size: int) -> defer.Deferred:
        """Fires with all received bytes once at least C{size} have arrived."""
        if self._count >= size:
            return defer.succeed(self.data)
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append((size, waiter))
        return waiter

    def readConnectionLost(self) -> None:
        self.readClosed.callback(self.data)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        if not self.readClosed.called:
            self.readClosed.callback(self.data)
        for _, waiter in self._waiters:
            waiter.errback(reason)
        self._waiters = []
        self.closed.callback(self.data)


class UserFactory(Factory):
    noisy = False
    protocol = User


def connectUser(testCase, port: int) -> defer.Deferred:
    """Connect a L{User} to 127.0.0.1:C{port}; it is closed when the test ends."""

    def connected(user: User) -> User:
        def cleanup():
            if not user.closed.called:
                user.transport.abortConnection()
            return user.closed

        testCase.addCleanup(cleanup)
        return user

    endpoint = TCP4ClientEndpoint(reactor, HOST, port)
    return endpoint.connect(UserFactory()).addCallback(connected)


class Tunnel:
    """A server and a client in this process, ready to map ports."""

    def __init__(self, testCase) -> None:
        self.testCase = testCase
        self.server: Optional[TunnelServerService] = None
        self.controlPort: Optional[int] = None

    @defer.inlineCallbacks
    def startServer(self, **overrides):
        settings = ServerSettings(listen=f"tcp:{self.controlPort or 0}:interface={HOST}",
                                  token=TOKEN, public_interface=HOST)
        for key, value in overrides.items():
            setattr(settings, key, value)
        self.server = TunnelServerService(settings, reactor=reactor)
        self.server.startService()
        self.testCase.addCleanup(self._stopServer, self.server)
        port = yield self.server.whenListening()
        self.controlPort = port.getHost().port
        return self.server

    def _stopServer(self, server):
        if server.running:
            return server.stopService()

    def startClient(self, targetPort: int, remotePort: Optional[int] = None,
                    token: str = TOKEN, name: str = "test-client",
                    **overrides) -> TunnelClientService:
        """Start a client that maps 127.0.0.1:targetPort to remotePort."""
        settings = ClientSettings(
            server=f"tcp:{HOST}:{self.controlPort}", token=token, name=name,
            mappings=[Mapping(HOST, targetPort, remotePort or freePort())])
        for key, value in overrides.items():
            setattr(settings, key, value)
        client = TunnelClientService(settings, reactor=reactor)
        client.startService()
        self.testCase.addCleanup(lambda: client.stopService() if client.running else None)
        return client

    @defer.inlineCallbacks
    def publish(self, targetPort: int, **kwargs):
        """
        Start a client for C{targetPort} and wait until the server publishes
        it.  Returns (client, public port).
        """
        client = self.startClient(targetPort, **kwargs)
        yield client.tunnels[0].whenRegistered()
        return client, client.tunnels[0].mapping.remote_port

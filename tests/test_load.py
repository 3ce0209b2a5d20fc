"""
Load through one tunnel, over real loopback sockets: many connections at
once with large payloads checked by hash, and thousands in a row without
leaking descriptors or objects.

Both tests are bounded in count and in time, and marked slow (CI runs them).
"""

from __future__ import annotations

import hashlib
import random
import time

import pytest

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest
from zope.interface import implementer

from gotunnel.server.channel import ServerChannel

from tests.support import (
    HOST, Tunnel, gotunnelObjects, openFileDescriptors, waitUntil, within,
)

SEED = 20261125
CONCURRENT = 200
MIN_SIZE = 64 * 1024
MAX_SIZE = 4 * 1024 * 1024
TOTAL_CAP = 256 * 1024 * 1024
CHUNK = 64 * 1024
SEQUENTIAL = 5000
WARM_UP = 50


def payloadSizes() -> list[int]:
    """
    C{CONCURRENT} sizes from 64 KiB to 4 MiB, log-uniform from a seeded RNG
    (so most are small and a few are large), the two extremes included.
    With this seed they add up to about 190 MiB, under C{TOTAL_CAP}.
    """
    rng = random.Random(SEED)
    sizes = [int(MIN_SIZE * (MAX_SIZE / MIN_SIZE) ** rng.random()) for _ in range(CONCURRENT)]
    sizes[0], sizes[-1] = MIN_SIZE, MAX_SIZE
    return sizes


@implementer(IHalfCloseableProtocol)
class LiveEcho(Protocol):
    """An echo service that remembers only its connections still open."""

    def connectionMade(self) -> None:
        self.factory.live.add(self)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.factory.live.discard(self)


def listenLiveEcho(testCase, backlog: int = 50) -> Factory:
    """A L{LiveEcho} service with an accept queue of C{backlog}, closed at cleanup."""
    factory = Factory.forProtocol(LiveEcho)
    factory.noisy = False
    factory.live = set()
    port = reactor.listenTCP(0, factory, backlog=backlog, interface=HOST)
    factory.port = port.getHost().port

    @defer.inlineCallbacks
    def cleanup():
        yield port.stopListening()
        for protocol in list(factory.live):
            protocol.transport.abortConnection()
        yield waitUntil(lambda: not factory.live, 10, "the echo service's connections to close")

    testCase.addCleanup(cleanup)
    return factory


@implementer(IHalfCloseableProtocol, IPullProducer)
class HashingUser(Protocol):
    """
    Sends C{size} bytes from its own seeded RNG, a chunk at a time as the
    connection drains, then half-closes; hashes what it sends and what
    comes back.  C{done} fires with (bytes received, digest) at the close.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.rng = random.Random(seed)
        self.sent = 0
        self.received = 0
        self.sentHash = hashlib.sha256()
        self.receivedHash = hashlib.sha256()
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.sent >= self.size:
            return
        chunk = self.rng.randbytes(min(CHUNK, self.size - self.sent))
        self.sent += len(chunk)
        self.sentHash.update(chunk)
        self.transport.write(chunk)
        if self.sent >= self.size:
            self.transport.unregisterProducer()
            self.transport.loseWriteConnection()

    def stopProducing(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.receivedHash.update(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        self.done.callback((self.received, self.receivedHash.hexdigest()))


class EchoUser(Protocol):
    """Sends a few bytes and closes once they are back; C{done} fires at the close."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= len(self.payload):
            self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.done.callback(self.received)


class LoadTests(unittest.TestCase):
    timeout = 300
    zeroCopy = True
    spliceThread = True
    """Which relay path every splice takes; the class runs again with it off."""

    @defer.inlineCallbacks
    def setUp(self):
        self.tunnel = Tunnel(self, zeroCopy=self.zeroCopy, spliceThread=self.spliceThread)
        self.server = yield self.tunnel.startServer()
        self.target = listenLiveEcho(self)
        self.client, self.public = yield within(
            self.tunnel.publish(self.target.port, health_check_interval=3600), 15,
            "registration")
        self.endpoint = TCP4ClientEndpoint(reactor, HOST, self.public, timeout=30)

    @defer.inlineCallbacks
    def whenAllClosed(self, what: str):
        """Every tunneled connection is gone: only the control channel is left."""
        yield waitUntil(lambda: not self.target.live, 30, f"{what}: the echo connections")
        yield waitUntil(lambda: len(self.client.tunnels[0].connections) == 0, 30,
                        f"{what}: the client's connections")
        yield waitUntil(
            lambda: [type(c) for c in self.server.registry.connections] == [ServerChannel], 30,
            f"{what}: the server's connections")

    @pytest.mark.slow
    @defer.inlineCallbacks
    def test_concurrentLargePayloads(self):
        """
        200 users at once, each sending its own random payload of 64 KiB to
        4 MiB (about 190 MiB in all) and half-closing: each gets exactly its
        bytes back (same length, same SHA-256), then the close.
        """
        sizes = payloadSizes()
        self.assertLessEqual(sum(sizes), TOTAL_CAP)
        users = [HashingUser(size, SEED + n) for n, size in enumerate(sizes)]

        def connect(user):
            return self.endpoint.connect(Factory.forProtocol(lambda: user))

        def abortAll():
            for user in users:
                if user.transport is not None and not user.done.called:
                    user.transport.abortConnection()
            return defer.DeferredList([u.done for u in users if u.transport is not None])

        self.addCleanup(abortAll)
        began = time.monotonic()
        yield within(defer.gatherResults([connect(u) for u in users]), 60,
                     f"{CONCURRENT} users to connect")
        results = yield within(defer.gatherResults([u.done for u in users]), 180,
                               f"{CONCURRENT} echoes of {sum(sizes) >> 20} MiB")
        elapsed = time.monotonic() - began
        for n, (user, (received, digest)) in enumerate(zip(users, results)):
            self.assertEqual(user.sent, user.size)
            self.assertEqual((received, digest), (user.size, user.sentHash.hexdigest()),
                             f"user {n} ({user.size} bytes) got other bytes back")
        yield self.whenAllClosed("after the concurrent users")
        self.assertLess(elapsed, 180)

    @pytest.mark.slow
    @defer.inlineCallbacks
    def test_sequentialConnectionsLeakNothing(self):
        """
        5,000 users one after another, each echoing 16 random bytes and
        closing: afterwards the process holds no more file descriptors and
        no more gotunnel objects than before (within a small constant).
        """
        rng = random.Random(SEED)

        @defer.inlineCallbacks
        def oneUser(n: int):
            payload = rng.randbytes(16)
            user = EchoUser(payload)
            yield self.endpoint.connect(Factory.forProtocol(lambda: user))
            try:
                received = yield within(user.done, 15, f"user {n}'s echo and close")
            finally:
                if not user.done.called:
                    user.transport.abortConnection()
            self.assertEqual(received, payload, f"user {n} got other bytes back")

        for n in range(WARM_UP):
            yield oneUser(n)
        yield self.whenAllClosed("after the warm-up")
        fdsBefore = openFileDescriptors()
        objectsBefore = gotunnelObjects()

        deadline = time.monotonic() + 240
        for n in range(SEQUENTIAL):
            if time.monotonic() > deadline:
                self.fail(f"only {n} of {SEQUENTIAL} connections within 240 s")
            yield oneUser(n)
        yield self.whenAllClosed(f"after {SEQUENTIAL} users")

        fdsAfter = openFileDescriptors()
        objectsAfter = gotunnelObjects()
        self.assertLessEqual(fdsAfter, fdsBefore + 10,
                             f"file descriptors: {fdsBefore} before, {fdsAfter} after")
        grown = {name: (objectsBefore.get(name, 0), count)
                 for name, count in objectsAfter.items()
                 if count > objectsBefore.get(name, 0) + 10}
        self.assertEqual(grown, {}, "gotunnel objects (before, after) that grew")


class LoadTestsWithoutZeroCopy(LoadTests):
    """The same load on the relay's ordinary path (zero copy off)."""

    zeroCopy = False


class LoadTestsSplicedInReactor(LoadTests):
    """The same load with zero copy in the reactor's thread (no splice thread)."""

    spliceThread = False

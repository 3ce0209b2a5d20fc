"""
What a user does with a tunnel, over real loopback sockets, bytes checked
end to end: web requests, large transfers both ways, many connections at
once, half-close, services that speak first or answer only at the end,
bytes sent before the data channel is ready, a local service that is down,
a slow reader, closes from either side, and two mappings side by side.

Every wait is on an event, bounded by L{within}; nothing sleeps.
"""

from __future__ import annotations

import hashlib

from twisted.internet import defer, error, reactor, task
from twisted.trial import unittest
from twisted.web import resource, static
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from gotunnel.config.mappings import Mapping
from gotunnel.server.publicusers import PublicUser
from tests.support import (
    isStreamPrefix,
    HOST, AnswerAtEnd, Banner, ServiceConnection, Source, StreamOrEcho, StreamUser, Tunnel, connectUser,
    freePort, listenService, listenTarget, listenWeb, randomBytes, startTarget, waitUntil,
    within, writeAndDrain,
)

MiB = 1024 * 1024
WAIT = 30
"""Seconds any one step may take, even on a loaded machine."""


def assertSameBytes(testCase, got: bytes, expected: bytes, what: str) -> None:
    """
    C{got} is C{expected}; on failure say where they part, not a diff of
    megabytes.
    """
    if got == expected:
        return
    where = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                 min(len(got), len(expected)))
    testCase.fail(f"{what}: {len(got)} bytes where {len(expected)} were expected, "
                  f"first difference at offset {where}")


class TunnelDataTests(unittest.TestCase):
    timeout = 120
    zeroCopy = True
    spliceThread = True
    pool = 0
    mux = False
    """Which relay path every splice takes; each class runs again with it off."""

    @defer.inlineCallbacks
    def setUp(self):
        self.tunnel = Tunnel(self, zeroCopy=self.zeroCopy, pool=self.pool,
                             spliceThread=self.spliceThread, mux=self.mux)
        yield self.tunnel.startServer()
        self.target = listenTarget(self)
        self.client, self.public = yield self.tunnel.publish(self.target)

    @defer.inlineCallbacks
    def test_echoOneMebibyte(self):
        """1 MiB of random bytes goes through and comes back unchanged."""
        payload = randomBytes(1024 * 1024)
        user = yield connectUser(self, self.public)
        user.transport.write(payload)
        received = yield user.whenReceived(len(payload))
        self.assertEqual(received, payload)

    @defer.inlineCallbacks
    def test_fiftyConcurrentConnections(self):
        """
        50 users at once, each with its own 64 KiB: every one gets exactly
        its own bytes back (a data channel matched to the wrong user would
        show), and every one closes cleanly.
        """
        count, size = 50, 64 * 1024
        users = yield within(
            defer.gatherResults([connectUser(self, self.public) for _ in range(count)]),
            WAIT, f"{count} users to connect")
        payloads = [randomBytes(size) for _ in range(count)]
        for user, payload in zip(users, payloads):
            user.transport.write(payload)
        echoes = yield within(
            defer.gatherResults([user.whenReceived(size) for user in users]),
            WAIT, f"{count} echoes of {size} bytes")
        for i, (echo, payload) in enumerate(zip(echoes, payloads)):
            assertSameBytes(self, echo, payload, f"echo to user {i}")
        for user in users:
            user.transport.loseConnection()
        closed = yield within(defer.gatherResults([user.closed for user in users]),
                              WAIT, f"{count} users to close")
        for i, (data, payload) in enumerate(zip(closed, payloads)):
            assertSameBytes(self, data, payload, f"all user {i} received")


class BusyPollSettingTests(unittest.TestCase):
    """server.busy_poll and client.busy_poll reach the splices of each side."""

    timeout = 120

    @defer.inlineCallbacks
    def test_eachSideSplicesWithItsOwnBudget(self):
        tunnel = Tunnel(self, zeroCopy=True, spliceThread=True)
        yield tunnel.startServer(busy_poll=300)
        target = listenTarget(self)
        _, public = yield tunnel.publish(target, busy_poll=700)
        user = yield connectUser(self, public)
        sent = b""
        for n in range(20):
            message = b"round %d;" % n
            sent += message
            user.transport.write(message)
            received = yield within(user.whenReceived(len(sent)), WAIT, f"echo {n}")
            self.assertEqual(received, sent)
        self.assertEqual(tunnel.busyPolls, {300e-6, 700e-6})
        user.transport.loseConnection()
        yield within(user.closed, WAIT, "the user to close")


class ServiceTestCase(unittest.TestCase):
    """A server in this process; each test publishes the services it needs."""

    timeout = 120
    zeroCopy = True
    spliceThread = True
    pool = 0
    mux = False
    """Which relay path every splice takes; each class runs again with it off."""

    @defer.inlineCallbacks
    def setUp(self):
        self.tunnel = Tunnel(self, zeroCopy=self.zeroCopy, pool=self.pool,
                             spliceThread=self.spliceThread, mux=self.mux)
        yield self.tunnel.startServer()

    @defer.inlineCallbacks
    def publish(self, service, **overrides):
        """
        Map C{service} (a L{LocalService}) to a public port; returns (client,
        public port) once the server publishes it and the client's first
        health probe has reached the service and been taken from its
        connections, so that the next connection is a user's.
        """
        overrides.setdefault("health_check_interval", 3600)
        client, public = yield within(self.tunnel.publish(service.port, **overrides), WAIT,
                                      "the server to publish the mapping")
        yield within(service.nextConnection(), WAIT, "the client's probe of its service")
        return client, public

    @defer.inlineCallbacks
    def publishPort(self, port: int):
        """Map a local port that is not a L{LocalService}; returns the public port."""
        _, public = yield within(self.tunnel.publish(port, health_check_interval=3600), WAIT,
                                 "the server to publish the mapping")
        return public


class HTTPTests(ServiceTestCase):
    def site(self, body: bytes) -> int:
        """A twisted.web site serving C{body} at /data; returns its port."""
        root = resource.Resource()
        root.putChild(b"data", static.Data(body, "application/octet-stream"))
        return listenWeb(self, root)

    @defer.inlineCallbacks
    def test_agentGet(self):
        """
        twisted.web's Agent gets a page through the tunnel: status, headers
        and body intact; a second request on the kept-alive connection gets
        its 404.
        """
        body = randomBytes(200 * 1024)
        public = yield self.publishPort(self.site(body))
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 1
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool)

        response = yield within(agent.request(b"GET", f"http://{HOST}:{public}/data".encode()),
                                WAIT, "the response to GET /data")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"application/octet-stream"])
        self.assertEqual(response.length, len(body))
        got = yield within(readBody(response), WAIT, "the body of /data")
        assertSameBytes(self, got, body, "the body of /data")

        missing = yield within(agent.request(b"GET", f"http://{HOST}:{public}/nowhere".encode()),
                               WAIT, "the response to GET /nowhere")
        self.assertEqual(missing.code, 404)
        yield within(readBody(missing), WAIT, "the body of the 404")

    @defer.inlineCallbacks
    def test_rawHTTP10Get(self):
        """
        An HTTP/1.0 GET written by hand: the response comes back whole, with
        the status line and Content-Length, and the site's close reaches the
        user after it.
        """
        body = randomBytes(100 * 1024)
        public = yield self.publishPort(self.site(body))
        user = yield connectUser(self, public)
        user.transport.write(b"GET /data HTTP/1.0\r\nHost: tunnel.test\r\n\r\n")
        data = yield within(user.readClosed, WAIT, "the response and the site's close")
        head, separator, got = data.partition(b"\r\n\r\n")
        self.assertEqual(separator, b"\r\n\r\n", data[:200])
        statusLine, *headerLines = head.split(b"\r\n")
        self.assertEqual(statusLine.split(b" ", 2)[1:], [b"200", b"OK"])
        headers = dict(line.split(b": ", 1) for line in headerLines)
        self.assertEqual(int(headers[b"Content-Length"]), len(body))
        assertSameBytes(self, got, body, "the body after the headers")
        yield within(user.closed, WAIT, "the user's connection to close")


class TransferTests(ServiceTestCase):
    @defer.inlineCallbacks
    def test_oneMebibyteToTheService(self):
        """
        1 MiB of random bytes and then end-of-stream from the user: the
        service reads exactly those bytes, then the end; its close reaches
        the user.
        """
        service = listenService(self)
        _, public = yield self.publish(service)
        payload = randomBytes(MiB)
        user = yield connectUser(self, public)
        user.transport.write(payload)
        user.transport.loseWriteConnection()
        sink = yield within(service.nextConnection(), WAIT, "the user's connection to the service")
        got = yield within(sink.readClosed, WAIT, "1 MiB and end-of-stream at the service")
        assertSameBytes(self, got, payload, "what the service read")
        data = yield within(user.closed, WAIT, "the service's close to reach the user")
        self.assertEqual(data, b"")

    @defer.inlineCallbacks
    def test_oneMebibyteFromTheService(self):
        """
        A service that sends 1 MiB on connect and closes: the user gets
        exactly those bytes, then end-of-stream.
        """
        payload = randomBytes(MiB)
        service = listenService(self, Source, payload=payload)
        _, public = yield self.publish(service)
        user = yield connectUser(self, public)
        got = yield within(user.readClosed, WAIT, "1 MiB and end-of-stream at the user")
        assertSameBytes(self, got, payload, "what the user read")
        yield within(user.closed, WAIT, "the user's connection to close")
        source = yield service.nextConnection()
        yield within(source.closed, WAIT, "the service's connection to close")
        self.assertEqual(source.data, b"")

    @defer.inlineCallbacks
    def test_slowReaderGetsEverything(self):
        """
        A user that stops reading while the service sends 8 MiB, and then
        reads in fits and starts, gets every byte in order: flow control
        pauses the sender instead of dropping or reordering.  Each pause
        lasts until the service has pushed 128 KiB more than the user took,
        so the tunnel's buffers are holding bytes whenever reading resumes.
        """
        size, ahead = 8 * MiB, 128 * 1024
        payload = randomBytes(size)
        service = listenService(self, Source, payload=payload)
        _, public = yield self.publish(service)
        user = yield connectUser(self, public)
        user.transport.pauseProducing()
        source = yield within(service.nextConnection(), WAIT, "the data channel to the service")
        yield within(source.whenFlushed(ahead), WAIT,
                     "the service to send 128 KiB to a paused user")
        self.assertEqual(user.data, b"")
        for step in range(1, size // MiB):
            user.transport.resumeProducing()
            yield within(user.whenReceived(step * MiB), WAIT, f"{step} MiB at the user")
            user.transport.pauseProducing()
            yield within(source.whenFlushed(min(len(user.data) + ahead, size)), WAIT,
                         f"the service to get ahead of the paused user after {step} MiB")
        user.transport.resumeProducing()
        got = yield within(user.readClosed, WAIT, "8 MiB and end-of-stream at the user")
        assertSameBytes(self, got, payload, "what the slow user read")

    @defer.inlineCallbacks
    def test_slowReaderKeepsTheTunnelBounded(self):
        """
        64 MiB from the service to a user that reads in fits and starts:
        while the user is paused, flow control reaches back through both
        hops to the service, so the bytes the tunnel holds (Twisted's
        buffers and the splice pipes, server and client together) stay
        under 4 MiB all along; every byte arrives, in order.
        """
        size, step, bound = 64 * MiB, 8 * MiB, 4 * MiB
        payload = randomBytes(size)
        service = listenService(self, Source, payload=payload)
        client, public = yield self.publish(service)
        held = [0]

        def sample():
            # Relay ends, and multiplexed connections with their streams.
            ends = [c for c in [*self.tunnel.server.registry.connections,
                                *client.tunnels[0].connections] if hasattr(c, "bufferedBytes")]
            held[0] = max(held[0], sum(end.bufferedBytes() for end in ends))

        sampler = task.LoopingCall(sample)
        sampler.start(0.005)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        user = yield connectUser(self, public)
        user.transport.pauseProducing()
        source = yield within(service.nextConnection(), WAIT, "the data channel to the service")
        [publicUser] = [c for c in self.tunnel.server.registry.connections
                        if isinstance(c, PublicUser)]
        for received in range(step, size + step, step):
            yield waitUntil(lambda: publicUser.isBackedUp() or source.sent >= size, WAIT,
                            f"the tunnel to back up with {received - step} bytes read")
            user.transport.resumeProducing()
            yield within(user.whenReceived(min(received, size)), WAIT,
                         f"{received >> 20} MiB at the user")
            user.transport.pauseProducing()
        user.transport.resumeProducing()
        got = yield within(user.readClosed, WAIT, "64 MiB and end-of-stream at the user")
        sampler.stop()
        self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(payload).digest())
        self.assertLess(held[0], bound, f"the tunnel held {held[0]} bytes at most")

    @defer.inlineCallbacks
    def test_halfCloseThenAnswer(self):
        """
        The user sends a request and shuts down its write side; the service,
        which answers only at end-of-stream, gets the request and the end,
        and its 1 MiB answer reaches the user whole before the close.
        """
        def answer(request: bytes) -> bytes:
            return hashlib.sha256(request).digest() + request[::-1] * 4

        service = listenService(self, AnswerAtEnd, answer=answer)
        _, public = yield self.publish(service)
        request = randomBytes(256 * 1024)
        user = yield connectUser(self, public)
        user.transport.write(request)
        user.transport.loseWriteConnection()
        connection = yield within(service.nextConnection(), WAIT, "the user's connection")
        got = yield within(connection.readClosed, WAIT, "the request and its end at the service")
        assertSameBytes(self, got, request, "the request the service read")
        data = yield within(user.closed, WAIT, "the answer and the close at the user")
        assertSameBytes(self, data, answer(request), "the answer the user read")

    @defer.inlineCallbacks
    def test_bannerBeforeTheUserSpeaks(self):
        """A service that speaks first reaches a user that has sent nothing."""
        public = yield self.publishPort(listenTarget(self, Banner))
        user = yield connectUser(self, public)
        got = yield within(user.whenReceived(len(Banner.banner)), WAIT, "the banner")
        self.assertEqual(got, Banner.banner)
        user.transport.write(b"hello")
        got = yield within(user.whenReceived(len(Banner.banner) + 5), WAIT, "the echo")
        self.assertEqual(got, Banner.banner + b"hello")


class EarlyBytesTests(ServiceTestCase):
    """What the user sends while its data channel is not yet open."""

    @defer.inlineCallbacks
    def holdDataChannels(self, client):
        """
        Make C{client} hold the server's requests for a data channel.
        Returns (a Deferred that fires with the first request, a function
        that lets the held requests go).
        """
        mapping = client.tunnels[0]
        openDataChannel = mapping.openDataChannel
        requested: defer.Deferred = defer.Deferred()
        released: defer.Deferred = defer.Deferred()

        def held(request):
            if not requested.called:
                requested.callback(request)
            released.addCallback(lambda _: openDataChannel(request))

        self.patch(mapping, "openDataChannel", held)
        yield None
        return requested, lambda: released.callback(None)

    @defer.inlineCallbacks
    def test_bytesBeforeTheDataChannelAreDelivered(self):
        """
        Bytes a user wrote (and the kernel took) before its data channel was
        even asked for reach the service first, in order, before what it
        sends later.
        """
        service = listenService(self)
        client, public = yield self.publish(service)
        requested, release = yield self.holdDataChannels(client)
        user = yield connectUser(self, public)
        early = randomBytes(32 * 1024)
        yield within(writeAndDrain(user.transport, early), WAIT, "the user's early bytes to go out")
        request = yield within(requested, WAIT, "the server to ask for a data channel")
        self.assertIn(request.conn_id, self.tunnel.server.registry.waitingUsers)
        self.assertEqual(len(service.connections), 1, "only the probe should have connected")

        release()
        connection = yield within(service.nextConnection(), WAIT, "the user's connection")
        got = yield within(connection.whenReceived(len(early)), WAIT, "the early bytes")
        assertSameBytes(self, got, early, "the early bytes at the service")
        late = randomBytes(4096)
        user.transport.write(late)
        got = yield within(connection.whenReceived(len(early) + len(late)), WAIT, "the late bytes")
        assertSameBytes(self, got, early + late, "all bytes at the service")

    @defer.inlineCallbacks
    def test_halfCloseBeforeTheDataChannel(self):
        """
        A user that sends its whole request and its end-of-stream before its
        data channel is open still gets the answer: the end is passed on
        after the request, not lost and not early.
        """
        def answer(request: bytes) -> bytes:
            return b"sha256:" + hashlib.sha256(request).hexdigest().encode()

        # The request and its end reach the client with the data channel's
        # answer, so neither spliced pair is ever steady, open both ways.
        self.tunnel.handOffExpected = False
        service = listenService(self, AnswerAtEnd, answer=answer)
        client, public = yield self.publish(service)
        requested, release = yield self.holdDataChannels(client)
        user = yield connectUser(self, public)
        request = randomBytes(16 * 1024)
        yield within(writeAndDrain(user.transport, request), WAIT, "the request to go out")
        user.transport.loseWriteConnection()
        yield within(requested, WAIT, "the server to ask for a data channel")
        release()
        connection = yield within(service.nextConnection(), WAIT, "the user's connection")
        got = yield within(connection.readClosed, WAIT, "the request and its end at the service")
        assertSameBytes(self, got, request, "the request the service read")
        data = yield within(user.closed, WAIT, "the answer and the close at the user")
        self.assertEqual(data, answer(request))


class LocalServiceDownTests(ServiceTestCase):
    # No byte is relayed here, on either path: nothing to check or repeat.
    zeroCopy = None

    @defer.inlineCallbacks
    def test_serviceGoneClosesTheUser(self):
        """
        The local service stops after the client's probe found it up (so the
        port stays published): a user's data channel cannot reach it, and the
        user is closed, having received nothing.  That no timer stands
        between is checked on a clock: test_inmemory's
        test_serviceGoneClosesTheUserWithoutWaiting.
        """
        service = listenService(self)
        _, public = yield self.publish(service)
        yield within(service.stop(), WAIT, "the local service to stop")
        user = yield connectUser(self, public)
        user.transport.write(b"anyone there?")
        data = yield within(user.closed, 10, "the user to be closed")
        self.assertEqual(data, b"")

    @defer.inlineCallbacks
    def test_nothingListensOnTheLocalPort(self):
        """
        A client mapping a port where nothing ever listened: a user is
        either refused (the client's first probe already took the port
        offline) or closed, having received nothing.
        """
        client = self.tunnel.startClient(freePort(), health_check_interval=3600)
        mapping = client.tunnels[0]
        yield within(mapping.whenRegistered(), WAIT, "the server to accept the mapping")
        try:
            user = yield connectUser(self, mapping.mapping.remote_port)
        except error.ConnectionRefusedError:
            pass
        else:
            user.transport.write(b"anyone there?")
            data = yield within(user.closed, 10, "the user to be closed")
            self.assertEqual(data, b"")


class ClosingTests(ServiceTestCase):
    @defer.inlineCallbacks
    def streamingUser(self):
        """
        A user receiving L{StreamOrEcho}'s endless stream, and the target's
        connection tracker; returns them once 256 KiB have arrived intact.
        """
        target = startTarget(self, StreamOrEcho)
        public = yield self.publishPort(target.port)
        user = yield connectUser(self, public, StreamUser)
        user.transport.write(b"S")
        got = yield within(user.whenReceived(256 * 1024), WAIT, "the stream to flow")
        self.assertTrue(isStreamPrefix(got), "the stream arrived corrupted")
        return user, target.factory.tracker

    @defer.inlineCallbacks
    def test_userClosesMidStream(self):
        """The user closes while the service streams: the service's connection closes."""
        user, tracker = yield self.streamingUser()
        user.transport.loseConnection()
        data = yield within(user.closed, WAIT, "the user's connection to close")
        self.assertTrue(isStreamPrefix(data), "the stream arrived corrupted")
        yield within(defer.DeferredList(tracker.lost), WAIT,
                     "the service's connection to close after the user's")

    @defer.inlineCallbacks
    def test_userAbortsMidStream(self):
        """The user resets its connection while the service streams: the service's closes."""
        user, tracker = yield self.streamingUser()
        user.transport.abortConnection()
        yield within(user.closed, WAIT, "the user's connection to close")
        yield within(defer.DeferredList(tracker.lost), WAIT,
                     "the service's connection to close after the user's reset")

    @defer.inlineCallbacks
    def test_userClosesRightAfterSending(self):
        """
        The user writes 512 KiB and closes at once: the service reads every
        byte before it sees its connection end.
        """
        service = listenService(self)
        _, public = yield self.publish(service)
        payload = randomBytes(512 * 1024)
        user = yield connectUser(self, public)
        user.transport.write(payload)
        user.transport.loseConnection()
        yield within(user.closed, WAIT, "the user's connection to close")
        sink = yield within(service.nextConnection(), WAIT, "the user's connection")
        got = yield within(sink.closed, WAIT, "the service's connection to close")
        assertSameBytes(self, got, payload, "what the service read before the close")

    @defer.inlineCallbacks
    def test_serviceClosesAfterAnswering(self):
        """
        The service answers 512 KiB and closes, while the user keeps its
        side open: the user sees the close only after the whole answer.
        """
        request, answer = randomBytes(64 * 1024), randomBytes(512 * 1024)
        service = listenService(self, AnswerAndClose, expect=len(request), answer=answer)
        _, public = yield self.publish(service)
        user = yield connectUser(self, public)
        user.transport.write(request)
        data = yield within(user.readClosed, WAIT, "the answer and the service's close")
        assertSameBytes(self, data, answer, "what the user read before the close")
        yield within(user.closed, WAIT, "the user's connection to close")
        connection = yield service.nextConnection()
        assertSameBytes(self, connection.data, request, "what the service read")


class AnswerAndClose(ServiceConnection):
    """Once its factory's C{expect} bytes have arrived, writes C{answer} and closes."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if len(self.data) == self.factory.expect:
            self.transport.write(self.factory.answer)
            self.transport.loseConnection()


class TwoMappingsTests(ServiceTestCase):
    def answering(self, tag: bytes):
        """A service that answers C{tag}, the request's digest, and the request."""
        return listenService(
            self, AnswerAtEnd,
            answer=lambda request: tag + hashlib.sha256(request).digest() + request)

    @defer.inlineCallbacks
    def assertEachGetsItsOwn(self, services, publics, tags):
        """Users of every public port at once each get their own service's answer."""
        requests = [randomBytes(128 * 1024) for _ in publics]
        users = yield within(defer.gatherResults([connectUser(self, p) for p in publics]),
                             WAIT, "the users to connect")
        for user, request in zip(users, requests):
            user.transport.write(request)
            user.transport.loseWriteConnection()
        answers = yield within(defer.gatherResults([user.closed for user in users]),
                               WAIT, "every answer")
        for tag, request, got, public in zip(tags, requests, answers, publics):
            expected = tag + hashlib.sha256(request).digest() + request
            assertSameBytes(self, got, expected, f"the answer through port {public}")
        for service, request in zip(services, requests):
            connection = yield within(service.nextConnection(), WAIT, "a user's connection")
            assertSameBytes(self, connection.data, request, f"what {service.port} read")

    @defer.inlineCallbacks
    def test_twoClientsTwoServices(self):
        """Two clients, each with its own service, in use at the same time."""
        tags = [b"service A\n", b"service B\n"]
        services = [self.answering(tag) for tag in tags]
        published = yield defer.gatherResults([
            self.publish(services[0], name="client-a"),
            self.publish(services[1], name="client-b")])
        publics = [public for _, public in published]
        self.assertNotEqual(publics[0], publics[1])
        yield self.assertEachGetsItsOwn(services, publics, tags)

    @defer.inlineCallbacks
    def test_oneClientTwoMappings(self):
        """One client with two mappings: each public port reaches its own service."""
        tags = [b"service A\n", b"service B\n"]
        services = [self.answering(tag) for tag in tags]
        mappings = [Mapping(HOST, service.port, freePort()) for service in services]
        client = self.tunnel.startClient(services[0].port, mappings=mappings,
                                         health_check_interval=3600)
        yield within(defer.gatherResults([t.whenRegistered() for t in client.tunnels]),
                     WAIT, "the server to publish both mappings")
        yield within(defer.gatherResults([s.nextConnection() for s in services]),
                     WAIT, "the client's probes of both services")
        publics = [m.remote_port for m in mappings]
        yield self.assertEachGetsItsOwn(services, publics, tags)


# Every test above again, with the relay's ordinary path (zero copy off).


class TunnelDataTestsWithoutZeroCopy(TunnelDataTests):
    zeroCopy = False


class HTTPTestsWithoutZeroCopy(HTTPTests):
    zeroCopy = False


class TransferTestsWithoutZeroCopy(TransferTests):
    zeroCopy = False


class EarlyBytesTestsWithoutZeroCopy(EarlyBytesTests):
    zeroCopy = False


class ClosingTestsWithoutZeroCopy(ClosingTests):
    zeroCopy = False


class TwoMappingsTestsWithoutZeroCopy(TwoMappingsTests):
    zeroCopy = False


# Again with zero copy in the reactor's own thread: no splice thread.


class TunnelDataTestsSplicedInReactor(TunnelDataTests):
    spliceThread = False


class HTTPTestsSplicedInReactor(HTTPTests):
    spliceThread = False


class TransferTestsSplicedInReactor(TransferTests):
    spliceThread = False


class EarlyBytesTestsSplicedInReactor(EarlyBytesTests):
    spliceThread = False


class ClosingTestsSplicedInReactor(ClosingTests):
    spliceThread = False


class TwoMappingsTestsSplicedInReactor(TwoMappingsTests):
    spliceThread = False


# And again with pooled data channels: users served by channels opened ahead
# of them, on both relay paths.  (EarlyBytesTests hold a data channel the
# server asked for; a pooled one is there before the user.)


class TunnelDataTestsWithPool(TunnelDataTests):
    pool = 2


class TransferTestsWithPool(TransferTests):
    pool = 2


class ClosingTestsWithPool(ClosingTests):
    pool = 2


class HTTPTestsWithPoolWithoutZeroCopy(HTTPTests):
    zeroCopy = False
    pool = 2


class ClosingTestsWithPoolWithoutZeroCopy(ClosingTests):
    zeroCopy = False
    pool = 2


# And again with users carried as streams of one multiplexed connection per
# mapping (zero copy does not apply to a stream's bytes).


class TunnelDataTestsMultiplexed(TunnelDataTests):
    zeroCopy = False
    mux = True


class HTTPTestsMultiplexed(HTTPTests):
    zeroCopy = False
    mux = True


class TransferTestsMultiplexed(TransferTests):
    zeroCopy = False
    mux = True


class ClosingTestsMultiplexed(ClosingTests):
    zeroCopy = False
    mux = True


class TwoMappingsTestsMultiplexed(TwoMappingsTests):
    zeroCopy = False
    mux = True

    @defer.inlineCallbacks
    def assertEachGetsItsOwn(self, services, publics, tags):
        # One client's mappings each have a multiplexed connection of their own.
        tunnels = self.tunnel.server.registry.tunnels
        yield waitUntil(lambda: all(getattr(tunnels.get(p), "muxSession", None) for p in publics),
                        WAIT, "every mapping's multiplexed connection")
        yield TwoMappingsTests.assertEachGetsItsOwn(self, services, publics, tags)

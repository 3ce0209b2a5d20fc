"""
Users carried as streams of one multiplexed connection (gotunnel.mux.session), over
real loopback sockets: the tunnel's integrity tests again over TLS, a
stalled stream beside a busy one on the same connection, and the fallback
to data channels when the server does not agree.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

import gotunnel.server.mapping
from gotunnel.wire import messages
from gotunnel.mux.frames import WINDOW
from gotunnel.server.access import RegistrationRefused
from tests.support import (
    HOST, Source, Tunnel, connectUser, listenService, listenTarget, randomBytes, temporaryDirectory,
    waitUntil, within,
)
from tests import test_e2e_tunnel as e2e
from tests.test_e2e_tunnel import WAIT
from tests.test_tls import SERVER_NAME, makeCertificates, sslListen, tlsServer, trustDirectory

MiB = 1024 * 1024


class MultiplexedOverTLS:
    """A server listening with TLS, clients that verify it and multiplex."""

    serverOverrides: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        certificates = temporaryDirectory(self)
        makeCertificates(certificates, "--name", SERVER_NAME, "--ip", HOST)
        trust = trustDirectory(self, certificates)
        self.tunnel = Tunnel(self, zeroCopy=False, mux=True)
        yield self.tunnel.startServer(listen=sslListen(certificates), **self.serverOverrides)
        startClient = self.tunnel.startClient

        def tlsClient(targetPort, **overrides):
            overrides.setdefault("server", tlsServer(HOST, self.tunnel.controlPort, trust))
            return startClient(targetPort, **overrides)

        self.tunnel.startClient = tlsClient


class TunnelDataTestsMultiplexedOverTLS(MultiplexedOverTLS, e2e.TunnelDataTests):
    @defer.inlineCallbacks
    def setUp(self):
        yield MultiplexedOverTLS.setUp(self)
        self.target = listenTarget(self)
        self.client, self.public = yield self.tunnel.publish(self.target)


class TransferTestsMultiplexedOverTLS(MultiplexedOverTLS, e2e.TransferTests):
    pass


class ClosingTestsMultiplexedOverTLS(MultiplexedOverTLS, e2e.ClosingTests):
    pass


class StoppingOverTLSTests(MultiplexedOverTLS, unittest.TestCase):
    """
    Stopping either end closes a multiplexed TLS connection at once, not
    after shutdown_timeout: its session is the TLS transport's producer, and
    Twisted's TLS closes only once none is registered.
    """

    NEVER = 3 * WAIT
    serverOverrides = {"shutdown_timeout": NEVER}

    @defer.inlineCallbacks
    def carryOneUser(self):
        target = listenTarget(self)
        client, public = yield self.tunnel.publish(target, shutdown_timeout=self.NEVER)
        user = yield connectUser(self, public)
        user.transport.write(b"ping")
        self.assertEqual((yield user.whenReceived(4)), b"ping")
        user.transport.loseConnection()
        return client

    @defer.inlineCallbacks
    def test_clientStops(self):
        client = yield self.carryOneUser()
        yield within(client.stopService(), WAIT, "the client to stop")

    @defer.inlineCallbacks
    def test_serverStops(self):
        yield self.carryOneUser()
        yield within(self.tunnel.server.stopService(), WAIT, "the server to stop")


class WindowTests(unittest.TestCase):
    """The per-stream windows, on one real connection."""

    timeout = 120

    @defer.inlineCallbacks
    def test_stalledStreamBesideABusyOne(self):
        """
        Two users of one mapping, carried by the same multiplexed connection,
        each fed 16 MiB by its service: one stops reading, the other reads
        everything meanwhile.  The stalled stream holds no more than about
        its window at either end (its queue and its unread bytes), and gets
        every byte once its user reads again.
        """
        tunnel = Tunnel(self, zeroCopy=False, mux=True)
        yield tunnel.startServer()
        payload = randomBytes(16 * MiB)
        service = listenService(self, Source, payload=payload)
        client, public = yield within(tunnel.publish(service.port, health_check_interval=3600),
                                      WAIT, "the mapping")
        yield within(service.nextConnection(), WAIT, "the client's probe")
        serverSession = tunnel.server.registry.tunnels[public].muxSession
        clientSession = client.tunnels[0].muxChannel.session

        stalled = yield connectUser(self, public)
        stalled.transport.pauseProducing()
        source = yield within(service.nextConnection(), WAIT, "the stalled user's service")
        yield waitUntil(lambda: source.sent >= MiB, WAIT, "the stalled user's service to send")

        busy = yield connectUser(self, public)
        yield waitUntil(lambda: len(clientSession.streams) == 2, WAIT, "the busy user's stream")
        self.assertEqual(len(serverSession.streams), 2)
        got = yield within(busy.readClosed, WAIT, "16 MiB at the busy user beside the stalled one")
        self.assertEqual(got, payload)

        self.assertLess(source.sent, len(payload), "the stalled user's service was not held back")
        for session in (serverSession, clientSession):
            stream = session.streams[min(session.streams)]
            self.assertLessEqual(stream.bufferedBytes(), WINDOW + 2 * Source.chunkSize)
        stalled.transport.resumeProducing()
        got = yield within(stalled.readClosed, WAIT, "16 MiB at the stalled user once it reads")
        self.assertEqual(got, payload)


class AccountingTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_bytesCountedBothWays(self):
        """A multiplexed user's bytes both ways reach the mapping's counters."""
        tunnel = Tunnel(self, zeroCopy=False, mux=True)
        yield tunnel.startServer()
        target = listenTarget(self)
        _, public = yield tunnel.publish(target)
        user = yield connectUser(self, public)
        payload = randomBytes(100_000)
        user.transport.write(payload)
        yield within(user.whenReceived(len(payload)), WAIT, "the echo")
        user.transport.loseConnection()
        yield within(user.closed, WAIT, "the close")
        stats = tunnel.server.registry.tunnels[public].stats
        yield waitUntil(lambda: stats.bytesIn, WAIT, "the user's connection to be counted")
        self.assertEqual((stats.bytesIn, stats.bytesOut), (len(payload), len(payload)))


class FallbackTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_serverThatDoesNotAgree(self):
        """
        A client that offers mux to a server that does not answer it (ours
        with --no-mux, as a Go server) uses a data channel per user, and
        opens no multiplexed connection.
        """
        tunnel = Tunnel(self, zeroCopy=False)
        yield tunnel.startServer(mux=False)
        target = listenTarget(self)
        client, public = yield tunnel.publish(target, mux=True)
        user = yield connectUser(self, public)
        payload = randomBytes(MiB)
        user.transport.write(payload)
        got = yield within(user.whenReceived(len(payload)), WAIT, "the echo")
        self.assertEqual(got, payload)
        self.assertIsNone(client.tunnels[0].muxChannel)
        self.assertIsNone(tunnel.server.registry.tunnels[public].muxSession)

    @defer.inlineCallbacks
    def test_refusedConnectionFallsBackToThePool(self):
        """
        A server that agrees at register but then refuses the multiplexed
        connection: the client keeps its pool of data channels, as without.
        """
        def refuse(tunnel, session):
            raise RegistrationRefused("no mapping of port 1 agreed to multiplexing")

        self.patch(gotunnel.server.mapping.PublishedMapping, "addMuxSession", refuse)
        tunnel = Tunnel(self, zeroCopy=False, pool=2)
        yield tunnel.startServer()
        target = listenTarget(self)
        client, public = yield within(tunnel.publish(target, mux=True), WAIT,
                                      "the mapping and its pool")
        user = yield connectUser(self, public)
        payload = randomBytes(MiB)
        user.transport.write(payload)
        got = yield within(user.whenReceived(len(payload)), WAIT, "the echo")
        self.assertEqual(got, payload)
        self.assertIsNone(client.tunnels[0].muxChannel)

    def test_registerWithoutMuxIsGoBytes(self):
        """A client without mux sends the Go register, field for field."""
        self.assertEqual(
            messages.encode(messages.Register(local_port=1, remote_port=2, token="t", name="n")),
            b'{"type":"register","local_port":1,"remote_port":2,"protocol":"tcp",'
            b'"token":"t","name":"n"}')
        self.assertEqual(messages.parse(b'{"type":"register","mux":1}').mux, 1)
        self.assertRaises(messages.ProtocolError, messages.parse,
                          b'{"type":"register","mux":2}')


class ManyUsersTests(unittest.TestCase):
    """Issue 21's many users through one tunnel, short (bench/manyusers.py has 10,000)."""

    timeout = 120
    USERS = 500

    @defer.inlineCallbacks
    def test_manyUsersAtOnceEachEchoing16KiB(self):
        """
        500 users open at once over one multiplexed connection, each echoing
        16 KiB that carry its number: every one gets its own bytes back, and
        the server holds a stream for each (one descriptor per user).
        """
        tunnel = Tunnel(self, zeroCopy=False, mux=True)
        yield tunnel.startServer()
        target = listenTarget(self)
        _, public = yield tunnel.publish(target)
        users = yield within(defer.gatherResults(
            [connectUser(self, public) for _ in range(self.USERS)]), WAIT, "the users' connects")
        block = randomBytes(16 * 1024)
        payloads = [n.to_bytes(8, "big") + block[8:] for n in range(self.USERS)]
        for user, payload in zip(users, payloads):
            user.transport.write(payload)
        got = yield within(defer.gatherResults(
            [user.whenReceived(len(block)) for user in users]), WAIT, "every user's echo")
        self.assertEqual(got, payloads)
        self.assertEqual(len(tunnel.server.registry.tunnels[public].muxSession.streams),
                         self.USERS)

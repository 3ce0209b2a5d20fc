"""
Faults in the middle of use, over real loopback sockets with the bytes
checked: a client killed, a server restarted, a local service dying, a data
channel cut, a client whose network stalls, processes asked to stop.

Timeouts and intervals are shortened through the settings (or the command
line); every wait is on an event, or a bounded poll of one.
"""

from __future__ import annotations

import re
import signal
from typing import Optional


from twisted.internet import defer, error, reactor
from twisted.trial import unittest

from gotunnel.client.datachannel import DataChannelClient, LocalServiceConnection
from gotunnel.server.channel import ServerChannel
from gotunnel.server.publicusers import PublicUser

from tests.support import (
    isStreamPrefix,
    HOST, TOKEN, LogWatcher, StreamOrEcho, StreamUser, Tunnel, connectRaw, connectUser,
    connectionRefused, echoedThrough, freePort, jsonFrame, randomBytes, registerMessage, retryUntil, spawn,
    startTarget, temporaryDirectory, venvScript, waitUntil, waitUntilRefused, within,
)

TWISTD = venvScript("twistd")
SERVER_SCRIPT = venvScript("gotunnel-server")
LISTENING = re.compile(r"control channel listening on 127\.0\.0\.1:(\d+)")
START_TIMEOUT = 60
EXIT_TIMEOUT = 30
STREAM_START = 256 * 1024


class FaultTestCase(unittest.TestCase):
    timeout = 120
    zeroCopy: Optional[bool] = None
    """The relay path every splice in this process takes (None: not checked)."""
    spliceThread = True

    def setUp(self):
        self.logs = LogWatcher(self)
        self.tunnel = Tunnel(self, zeroCopy=self.zeroCopy, spliceThread=self.spliceThread)
        self.cwd = temporaryDirectory(self)

    @defer.inlineCallbacks
    def assertEchoes(self, port: int, size: int = 64 * 1024, timeout: float = 15):
        ok = yield echoedThrough(self, port, randomBytes(size), timeout)
        self.assertTrue(ok, f"{size} bytes did not come back through port {port}")

    @defer.inlineCallbacks
    def streamingUser(self, port: int):
        """A user of C{port} receiving the target's endless stream; returns it once it flows."""
        user = yield connectUser(self, port, StreamUser)
        user.transport.write(b"S")
        yield within(user.whenReceived(STREAM_START), 30, "the stream to flow to the user")
        return user

    @defer.inlineCallbacks
    def assertClosedWithStream(self, user, what: str, timeout: float = 15):
        """C{user} is closed within C{timeout}, having received an intact prefix of the stream."""
        data = yield within(user.closed, timeout, what)
        self.assertGreaterEqual(len(data), STREAM_START)
        self.assertTrue(isStreamPrefix(data), "the user received corrupted bytes")

    def serverChannels(self, server, role: str) -> list:
        return [c for c in server.registry.connections
                if isinstance(c, ServerChannel) and c.role == role]

    @defer.inlineCallbacks
    def assertNoLeftovers(self, server, client, target):
        """
        Nothing of a tunneled connection is left: the server (if in this
        process) holds only the control channel, the client no data channel
        or local connection, and the target no connection.
        """
        yield waitUntil(lambda: len(client.tunnels[0].connections) == 0, 15,
                        "the client's tunneled connections to close")
        if server is not None:
            yield waitUntil(
                lambda: [type(c) for c in server.registry.connections] == [ServerChannel], 15,
                "the server to hold only the control channel")
            self.assertEqual(self.serverChannels(server, "control"),
                             list(server.registry.connections))
        yield within(defer.DeferredList(target.factory.tracker.lost), 15,
                     "the target's connections to close")

    def spawnClient(self, controlPort: int, targetPort: int, public: int, *extra: str):
        return spawn(self, [TWISTD, "-n", "--pidfile=", "gotunnel-client",
                            "--server", f"tcp:{HOST}:{controlPort}", "--token", TOKEN,
                            "--name", "child", "--heartbeat-interval", "0.5",
                            "--map", f"{targetPort}:{public}", *extra], self.cwd)

    @defer.inlineCallbacks
    def whenChildRegistered(self, child, targetPort: int, public: int):
        yield within(child.whenOutput(f"registered {HOST}:{targetPort}->{public}", (1,)),
                     START_TIMEOUT, "the client process to register")

    def assertCleanExit(self, child, byTwistd: bool) -> None:
        """
        The child shut its reactor down and exited without a traceback.
        twistd ends itself with the SIGTERM it received (status -15, as its
        parent sees it); the console scripts exit with status 0.
        """
        expected = (None, signal.SIGTERM) if byTwistd else (0, None)
        self.assertEqual((child.exitCode, child.signal), expected, child.describe())
        self.assertIn("Main loop terminated.", child.stdout, child.describe())
        for bad in ("Traceback", "Unhandled", "CRITICAL"):
            self.assertNotIn(bad, child.stdout + child.stderr, child.describe())


class ClientKilledTests(FaultTestCase):
    @defer.inlineCallbacks
    def test_clientKilledMidTransfer(self):
        """
        SIGKILL the client process while a user is receiving a stream: the
        server closes the user and frees the public port at once; a client
        started again registers and carries bytes.
        """
        server = yield self.tunnel.startServer(heartbeat_timeout=3.0,
                                               heartbeat_check_interval=0.2)
        target = startTarget(self, StreamOrEcho)
        public = freePort()
        child = self.spawnClient(self.tunnel.controlPort, target.port, public)
        yield self.whenChildRegistered(child, target.port, public)
        user = yield self.streamingUser(public)

        child.sendSignal("KILL")
        yield within(child.ended, EXIT_TIMEOUT, "the client process to die")
        self.assertEqual(child.signal, signal.SIGKILL)
        yield self.assertClosedWithStream(user, "the user to be closed after the client died")
        yield waitUntil(lambda: public not in server.registry.tunnels, 10,
                        "the server to forget the dead client")
        self.assertTrue((yield connectionRefused(public)), "the public port is still open")
        yield waitUntil(lambda: len(server.registry.connections) == 0, 10,
                        "the server to close every connection of the dead client")
        yield within(defer.DeferredList(target.factory.tracker.lost), 15,
                     "the dead client's connections to the target to close")
        self.assertEqual(self.logs.matching(LogWatcher.formatted("heartbeat timeout")), [],
                         "the server waited for the heartbeat instead of seeing the close")

        again = self.spawnClient(self.tunnel.controlPort, target.port, public)
        yield self.whenChildRegistered(again, target.port, public)
        yield self.assertEchoes(public)
        user = yield self.streamingUser(public)
        user.transport.loseConnection()
        yield within(user.closed, 15, "the user to close")


class ServerRestartTests(FaultTestCase):
    @defer.inlineCallbacks
    def test_clientReconnectsWithBackoff(self):
        """
        The server stops while a user is receiving: the user is closed; the
        client retries after growing delays (1 s, then 2 s, each plus up to
        1 s of jitter) and, once a server listens again on the same port,
        registers and carries bytes with nobody acting.
        """
        server = yield self.tunnel.startServer()
        target = startTarget(self, StreamOrEcho)
        client, public = yield within(
            self.tunnel.publish(target.port, reconnect_max_delay=2.0), 15, "registration")
        mapping = client.tunnels[0]
        user = yield self.streamingUser(public)
        retrying = LogWatcher.formatted("reconnecting")
        before = len(self.logs.matching(retrying))

        stoppedAt = reactor.seconds()
        yield within(server.stopService(), 15, "the server to stop")
        yield self.assertClosedWithStream(user, "the user to be closed with the server")
        retries = yield within(self.logs.whenMatched(retrying, before + 2), 15,
                               "two retries while the server is down")
        delays = [event["delay"] for event in retries[before:]]
        self.assertGreaterEqual(delays[0], 1.0, delays)
        self.assertGreaterEqual(delays[1], 2.0, delays)
        self.assertLess(max(delays), 3.0, delays)
        self.assertGreaterEqual(reactor.seconds() - stoppedAt, delays[0])
        self.assertIsNone(mapping.channel)

        second = yield self.tunnel.startServer()
        yield within(mapping.whenRegistered(), 15, "registration with the new server")
        self.assertIn(public, second.registry.tunnels)
        yield self.assertEchoes(public)


class LocalServiceTests(FaultTestCase):
    zeroCopy = True

    @defer.inlineCallbacks
    def test_serviceDiesAndComesBack(self):
        """
        The local service stops: the user it was serving is closed, a user
        arriving before the probe notices is closed at once (or refused), the
        probe takes the port offline; the service starts again and the probe
        brings the port back.
        """
        server = yield self.tunnel.startServer()
        target = startTarget(self, StreamOrEcho)
        client, public = yield within(
            self.tunnel.publish(target.port, health_check_interval=1.0), 15, "registration")
        serving = yield self.streamingUser(public)

        yield within(target.stop(), 15, "the service to stop")
        yield self.assertClosedWithStream(serving, "the served user to be closed")
        try:
            between = yield connectUser(self, public)
        except error.ConnectionRefusedError:
            pass
        else:
            between.transport.write(b"anyone there?")
            self.assertEqual((yield within(between.closed, 10, "a user in between to be closed")),
                             b"")
        yield waitUntilRefused(public, 15, "the probe to take the port offline")
        self.assertFalse(server.registry.tunnels[public].online)
        self.assertTrue(self.logs.matching(LogWatcher.formatted("local service {mapping} is down")))

        target.start()
        yield retryUntil(lambda: echoedThrough(self, public, b"back?", 10), 15,
                         "the probe to bring the port back online")
        self.assertTrue(server.registry.tunnels[public].online)
        yield self.assertEchoes(public)
        yield self.assertNoLeftovers(server, client, target)


class DataChannelCutTests(FaultTestCase):
    zeroCopy = True

    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        self.server = yield self.tunnel.startServer()
        self.target = startTarget(self, StreamOrEcho)
        self.client, self.public = yield within(
            self.tunnel.publish(self.target.port, health_check_interval=3600), 15,
            "registration")

    @defer.inlineCallbacks
    def assertCutClosesBothEnds(self, cut):
        user = yield self.streamingUser(self.public)
        [dataChannel] = self.serverChannels(self.server, "data")
        [clientChannel] = [c for c in self.client.tunnels[0].connections
                           if isinstance(c, DataChannelClient)]
        cut(dataChannel, clientChannel)
        yield self.assertClosedWithStream(user, "the user to be closed after the cut")
        yield self.assertNoLeftovers(self.server, self.client, self.target)
        yield self.assertEchoes(self.public)
        yield self.assertNoLeftovers(self.server, self.client, self.target)

    def test_serverSideCut(self):
        """
        The server's end of a busy data channel is aborted: the user and the
        connection to the local service are both closed; nothing half-open
        is left.
        """
        return self.assertCutClosesBothEnds(lambda server, client: server.transport.abortConnection())

    def test_clientSideCut(self):
        """The same, with the client's end of the data channel aborted."""
        return self.assertCutClosesBothEnds(lambda server, client: client.transport.abortConnection())

    def test_localServiceSideCut(self):
        """The same, with the client's connection to the local service aborted."""

        def cut(server, client):
            [local] = [c for c in self.client.tunnels[0].connections
                       if isinstance(c, LocalServiceConnection)]
            local.transport.abortConnection()

        return self.assertCutClosesBothEnds(cut)

    @defer.inlineCallbacks
    def test_cutWhileUserIsBackedUp(self):
        """
        The data channel is cut while the user has stopped reading (the
        server holds bytes for it and has paused the data channel): once
        the user reads again, it gets what was held, then the close.
        """
        user = yield self.streamingUser(self.public)
        user.transport.pauseProducing()
        [publicUser] = [c for c in self.server.registry.connections if isinstance(c, PublicUser)]
        yield waitUntil(publicUser.isBackedUp, 15,
                        "the server to pause the data channel for the slow user")
        [dataChannel] = self.serverChannels(self.server, "data")
        dataChannel.transport.abortConnection()
        user.transport.resumeProducing()
        yield self.assertClosedWithStream(user, "the user to be closed after the cut", 10)
        yield self.assertNoLeftovers(self.server, self.client, self.target)


class StalledClientTests(FaultTestCase):
    @defer.inlineCallbacks
    def test_stalledControlChannelIsDropped(self):
        """
        A client that registers, then neither reads nor sends (its users
        wait, the server's requests pile up unread), is dropped after the
        heartbeat timeout with its port and waiting users; a client that
        pings keeps carrying bytes throughout.
        """
        # The good client pings 20 times within the timeout: a loaded
        # machine must not make it look stalled too.
        server = yield self.tunnel.startServer(heartbeat_timeout=4.0,
                                               heartbeat_check_interval=0.1)
        goodTarget = startTarget(self, StreamOrEcho)
        good, goodPublic = yield within(
            self.tunnel.publish(goodTarget.port, name="good", heartbeat_interval=0.2), 15,
            "the good client's registration")
        goodChannel = good.tunnels[0].channel

        public = freePort()
        # Before the register is sent: the server's clock for the timeout
        # starts when it reads it, a few milliseconds later under load.
        registeredAt = reactor.seconds()
        stalled = yield connectRaw(self, self.tunnel.controlPort,
                                   jsonFrame(registerMessage(public, "stalled")))
        yield within(stalled.whenFrame(), 15, "the stalled client's register_resp")
        stalled.transport.pauseProducing()
        users = []
        for _ in range(3):
            user = yield connectUser(self, public)
            user.transport.write(b"hello?")
            users.append(user)
        streaming = yield self.streamingUser(goodPublic)

        dropped = yield within(self.logs.whenMatched(LogWatcher.formatted(
            "heartbeat timeout", name="stalled")), 15, "the server to drop the stalled client")
        self.assertGreaterEqual(reactor.seconds() - registeredAt, 4.0)
        self.assertEqual(len(dropped), 1)
        closed = yield within(defer.gatherResults([u.closed for u in users]), 10,
                              "the stalled client's users to be closed")
        self.assertEqual(closed, [b""] * 3)
        self.assertTrue((yield connectionRefused(public)))
        self.assertNotIn(public, server.registry.tunnels)
        stalled.transport.resumeProducing()
        yield within(stalled.closed, 10, "the stalled connection to be closed by the server")

        self.assertFalse(streaming.closed.called, "the good client's user was disturbed")
        received = len(streaming.data)
        yield within(streaming.whenReceived(received + STREAM_START), 15,
                     "the good client's stream to go on")
        self.assertIs(good.tunnels[0].channel, goodChannel)
        self.assertEqual(self.logs.matching(LogWatcher.formatted("heartbeat timeout", name="good")),
                         [])
        yield self.assertEchoes(goodPublic)


class ProcessStopTests(FaultTestCase):
    """SIGTERM to a server or client process while a user is receiving through it."""

    @defer.inlineCallbacks
    def startServerProcess(self, *argv: str):
        server = spawn(self, [*argv, "--listen", f"tcp:0:interface={HOST}",
                              "--public-interface", HOST, "--token", TOKEN], self.cwd)
        found = yield within(server.whenOutput(LISTENING, (1,)), START_TIMEOUT,
                             "the server's 'listening' line")
        self.tunnel.controlPort = int(found.group(1))
        return server

    @defer.inlineCallbacks
    def assertServerStopsCleanly(self, argv: list[str], byTwistd: bool):
        server = yield self.startServerProcess(*argv)
        target = startTarget(self, StreamOrEcho)
        client, public = yield within(
            self.tunnel.publish(target.port, reconnect_max_delay=1.0), 15, "registration")
        user = yield self.streamingUser(public)

        server.sendSignal("TERM")
        yield within(server.ended, EXIT_TIMEOUT, "the server to exit after SIGTERM")
        self.assertCleanExit(server, byTwistd)
        yield self.assertClosedWithStream(user, "the user to be closed with the server")
        self.assertTrue((yield connectionRefused(public)))
        yield waitUntil(lambda: client.tunnels[0].channel is None, 15,
                        "the client to notice the server is gone")
        yield within(client.stopService(), 15, "the client to stop")
        yield self.assertNoLeftovers(None, client, target)

    def test_sigtermTwistdServer(self):
        return self.assertServerStopsCleanly([TWISTD, "-n", "--pidfile=", "gotunnel-server"],
                                             byTwistd=True)

    def test_sigtermServerScript(self):
        return self.assertServerStopsCleanly([SERVER_SCRIPT], byTwistd=False)

    @defer.inlineCallbacks
    def test_sigtermTwistdClient(self):
        """
        SIGTERM to the client process: it exits cleanly, the user it served
        is closed and the server frees the public port.
        """
        server = yield self.tunnel.startServer()
        target = startTarget(self, StreamOrEcho)
        public = freePort()
        child = self.spawnClient(self.tunnel.controlPort, target.port, public)
        yield self.whenChildRegistered(child, target.port, public)
        user = yield self.streamingUser(public)

        child.sendSignal("TERM")
        yield within(child.ended, EXIT_TIMEOUT, "the client to exit after SIGTERM")
        self.assertCleanExit(child, byTwistd=True)
        yield self.assertClosedWithStream(user, "the user to be closed with the client")
        yield waitUntil(lambda: public not in server.registry.tunnels, 10,
                        "the server to forget the stopped client")
        self.assertTrue((yield connectionRefused(public)))
        yield waitUntil(lambda: len(server.registry.connections) == 0, 10,
                        "the server to hold no connection of the stopped client")
        yield within(defer.DeferredList(target.factory.tracker.lost), 15,
                     "the stopped client's connections to the target to close")

    @defer.inlineCallbacks
    def test_sigtermServerWithStalledUser(self):
        """
        SIGTERM while a user has stopped reading (its buffers full): the
        server still exits, within a bounded time.
        """
        server = yield self.startServerProcess(SERVER_SCRIPT)
        target = startTarget(self, StreamOrEcho)
        client, public = yield within(
            self.tunnel.publish(target.port, reconnect_max_delay=1.0), 15, "registration")
        user = yield self.streamingUser(public)
        user.transport.pauseProducing()
        # Let the server's buffer for this user fill: the stream stops
        # reaching the client's side too once every buffer on the way is full.
        [dataChannel] = [c for c in client.tunnels[0].connections
                         if isinstance(c, DataChannelClient)]
        yield waitUntil(dataChannel.isBackedUp, 15,
                        "the stream to back up to the client")

        server.sendSignal("TERM")
        try:
            yield within(server.ended, 15, "the server to exit after SIGTERM")
        finally:
            user.transport.resumeProducing()
        self.assertCleanExit(server, byTwistd=False)


# The tests of cuts and of a dying service again, on the relay's ordinary
# path (zero copy off).


class LocalServiceTestsWithoutZeroCopy(LocalServiceTests):
    zeroCopy = False


class DataChannelCutTestsWithoutZeroCopy(DataChannelCutTests):
    zeroCopy = False


# And with zero copy in the reactor's own thread (no splice thread).


class LocalServiceTestsSplicedInReactor(LocalServiceTests):
    spliceThread = False


class DataChannelCutTestsSplicedInReactor(DataChannelCutTests):
    spliceThread = False

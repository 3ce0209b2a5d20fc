"""
What happens to a tunnel over its life, over real loopback sockets: the
server restarts, tokens are wrong, ports are taken, the local service goes
down and comes back, a client falls silent, a client stops.

Intervals are shortened through the settings; every wait is on an event
(or a bounded poll of one), never a fixed sleep.
"""

from __future__ import annotations

import json
import sys

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.basic import Int32StringReceiver
from twisted.trial import unittest

from tests.support import (
    REGISTERED,
    HOST, TOKEN, Collector, LogWatcher, StreamCapture, Tunnel, connectUser, connectionRefused,
    echoedThrough, freePort, jsonFrame, listenTarget, randomBytes, retryUntil, spawn, startTarget,
    startsWith, temporaryDirectory, venvScript, waitUntil, waitUntilRefused, within,
)

AUTH_FAILED_LINE = "[ERROR][1002] Authentication failed, please check token"
UNREACHABLE_PREFIX = "[ERROR][1001] Failed to connect to server"


@defer.inlineCallbacks
def assertEchoes(testCase, port: int, size: int = 64 * 1024):
    """A user of C{port} gets C{size} random bytes back unchanged."""
    payload = randomBytes(size)
    user = yield connectUser(testCase, port)
    user.transport.write(payload)
    received = yield within(user.whenReceived(len(payload)), 15,
                            f"echo of {size} bytes through port {port}")
    testCase.assertEqual(received, payload)
    user.transport.loseConnection()
    yield within(user.closed, 10, "user connection to close")


class RawControl(Int32StringReceiver):
    """A control channel that registers, then says nothing more."""

    def __init__(self, register: dict) -> None:
        self.register = register
        self.frames = Collector()
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(jsonFrame(self.register))

    def stringReceived(self, body: bytes) -> None:
        self.frames.add(json.loads(body))

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(reactor.seconds())


@defer.inlineCallbacks
def connectRawControl(testCase, controlPort: int, remote_port: int, name: str):
    """
    A L{RawControl} that registers C{remote_port} as C{name}; returns it once
    the server has answered.  It is closed when the test ends.
    """
    control = RawControl({"type": "register", "local_port": 22, "remote_port": remote_port,
                          "protocol": "tcp", "token": TOKEN, "name": name})
    endpoint = TCP4ClientEndpoint(reactor, HOST, controlPort, timeout=5)
    yield endpoint.connect(Factory.forProtocol(lambda: control))

    def close():
        if not control.closed.called:
            control.transport.abortConnection()
        return control.closed

    testCase.addCleanup(close)
    yield within(control.frames.whenMatched(lambda f: f["type"] == "register_resp"), 15,
                 "register_resp")
    return control


class LifecycleTestCase(unittest.TestCase):
    timeout = 90

    def setUp(self):
        # The client reports errors on the real standard error; keep them.
        self.stderr = StreamCapture()
        self.patch(sys, "__stderr__", self.stderr)
        self.logs = LogWatcher(self)
        self.tunnel = Tunnel(self)


class ServerRestartTests(LifecycleTestCase):
    @defer.inlineCallbacks
    def test_clientReconnectsAfterServerRestart(self):
        """
        A client whose server goes away registers again with a new server on
        the same control port, and its public port carries bytes again.
        """
        server = yield self.tunnel.startServer()
        controlPort = self.tunnel.controlPort
        target = listenTarget(self)
        client, public = yield within(
            self.tunnel.publish(target, reconnect_max_delay=0.5), 15, "first registration")
        mapping = client.tunnels[0]
        firstChannel = mapping.channel
        yield assertEchoes(self, public)

        yield within(server.stopService(), 15, "the server to stop")
        self.assertTrue((yield connectionRefused(public)),
                        "the public port is still open after the server stopped")
        yield waitUntil(lambda: mapping.channel is None, 15,
                        "the client to notice its control channel is gone")

        second = yield self.tunnel.startServer()
        self.assertEqual(second.controlPort.getHost().port, controlPort)
        channel = yield within(mapping.whenRegistered(), 20, "registration with the new server")
        self.assertIsNot(channel, firstChannel)
        self.assertIn(public, second.registry.tunnels)
        yield assertEchoes(self, public)


class AuthenticationTests(LifecycleTestCase):
    @defer.inlineCallbacks
    def test_wrongTokenIsRefusedAndRetriedWithBackoff(self):
        """
        A wrong token: the client prints the Go client's 1002 line, tries
        again after growing delays (not in a tight loop), and the server
        never opens the public port.
        """
        server = yield self.tunnel.startServer()
        target = listenTarget(self)
        started = reactor.seconds()
        client = self.tunnel.startClient(target, token="wrong-token", reconnect_max_delay=16)
        public = client.tunnels[0].mapping.remote_port

        # Each refusal is followed by a retry scheduled after a delay, and
        # the line says a retry will not help.
        retries = yield within(self.logs.whenMatched(LogWatcher.formatted(
            "the server refused {mapping}: {reason}; will retry in {delay:.1f} s; this will "
            "not change until", reason="authentication failed"), 2),
            30, "two retries after authentication failures")
        window = reactor.seconds() - started
        self.assertEqual(self.stderr.items, [AUTH_FAILED_LINE] * 2)

        refusals = self.logs.matching(LogWatcher.formatted("refused registration"))
        self.assertEqual(len(refusals), 2, f"registration attempts in {window:.1f} s")
        self.assertEqual({e["reason"] for e in refusals}, {"authentication failed"})

        delays = [e["delay"] for e in retries]
        self.assertGreaterEqual(delays[0], 1.0)
        self.assertGreater(delays[1], delays[0])
        # The second attempt came no sooner than the first delay allowed.
        self.assertGreaterEqual(window, delays[0])

        self.assertIsNone(client.tunnels[0].channel)
        self.assertEqual(server.registry.tunnels, {})
        self.assertEqual(self.logs.matching(LogWatcher.formatted("public port")), [])
        self.assertTrue((yield connectionRefused(public)))


class UnreachableServerTests(LifecycleTestCase):
    @defer.inlineCallbacks
    def test_unreachableServerIsReported(self):
        """A server that refuses connections is reported as error 1001, with the cause."""
        self.tunnel.controlPort = freePort()
        target = listenTarget(self)
        client = self.tunnel.startClient(target)
        [line] = yield within(self.stderr.whenMatched(startsWith("[ERROR]")), 15,
                              "an error report")
        prefix = f"{UNREACHABLE_PREFIX} 127.0.0.1:{self.tunnel.controlPort}: "
        self.assertTrue(line.startswith(prefix), line)
        self.assertIn("refused", line[len(prefix):].lower())
        self.assertIsNone(client.tunnels[0].channel)


class PortOwnershipTests(LifecycleTestCase):
    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        self.server = yield self.tunnel.startServer()
        self.target = listenTarget(self)
        self.first, self.public = yield within(
            self.tunnel.publish(self.target, name="first"), 15, "first registration")
        self.firstChannel = self.first.tunnels[0].channel

    @defer.inlineCallbacks
    def test_portHeldByAnotherClientIsRefused(self):
        """
        A second client (another name) asking for a port that a live client
        holds is refused, told the port is taken; the first keeps working.
        """
        other = listenTarget(self)
        intruder = self.tunnel.startClient(other, self.public, name="second")
        [event] = yield within(
            self.logs.whenMatched(LogWatcher.formatted("the server refused")), 15,
            "the second client to be refused")
        self.assertIn("taken", event["reason"])
        self.assertIn(str(self.public), event["reason"])
        self.assertIsNone(intruder.tunnels[0].channel)

        yield assertEchoes(self, self.public)
        self.assertIs(self.first.tunnels[0].channel, self.firstChannel)
        self.assertEqual(self.server.registry.tunnels[self.public].name, "first")
        self.assertEqual(self.stderr.items, [])

    @defer.inlineCallbacks
    def test_sameNameTakesThePortOver(self):
        """
        A client registering again under the same name (a restarted client)
        takes the port over: the old control channel is dropped and users
        reach the new client's service.
        """
        # Keep the old client from reconnecting (and taking the port back)
        # while we look.
        self.first.tunnels[0].failedRegistrations = 20
        newTarget = listenTarget(self)
        newcomer = self.tunnel.startClient(newTarget, self.public, name="first")
        yield within(newcomer.tunnels[0].whenRegistered(), 15, "the newcomer's registration")
        yield waitUntil(lambda: self.first.tunnels[0].channel is None, 15,
                        "the old client's control channel to be dropped")
        yield within(self.first.stopService(), 15, "the old client to stop")
        tunnel = self.server.registry.tunnels[self.public]
        self.assertEqual(tunnel.channel.transport.getPeer().port,
                         newcomer.tunnels[0].channel.transport.getHost().port)
        self.assertEqual(tunnel.local_port, newTarget)
        yield assertEchoes(self, self.public)



class PortLeaseTests(LifecycleTestCase):
    lease = 5.0
    """Long enough for the steps taken during it, even on a loaded machine."""

    @defer.inlineCallbacks
    def test_killedClientsPortIsKeptForIt(self):
        """
        A gotunnel-client killed with SIGKILL: its public port refuses users
        at once and is refused to another name during the lease; the same
        name gets it back at once (listening, users served); once a lease
        has run out, another name takes the port.
        """
        server = yield self.tunnel.startServer(port_lease=self.lease)
        target = listenTarget(self)
        public = freePort()
        directory = temporaryDirectory(self)
        client = spawn(self, [venvScript("gotunnel-client"), "--server",
                              f"tcp:{HOST}:{self.tunnel.controlPort}", "--token", TOKEN,
                              "--name", "office", "--map", f"{target}:{public}"], directory)
        yield within(self.logs.whenMatched(LogWatcher.formatted(
            "client {name} registered", name="office")), 30, "the client to register")
        yield assertEchoes(self, public)

        reserved = LogWatcher.formatted("public port {remote_port} reserved",
                                        remote_port=public)
        client.sendSignal("KILL")
        yield within(self.logs.whenMatched(reserved), 15, "the lease to start")
        self.assertTrue((yield connectionRefused(public)), "users are let in during the lease")
        intruder = yield connectRawControl(self, self.tunnel.controlPort, public, "intruder")
        [answer] = intruder.frames.items
        self.assertEqual(answer["status"], "fail")
        self.assertIn(f"remote port {public} is reserved for the client that had it",
                      answer["reason"])

        back, _ = yield within(self.tunnel.publish(target, remotePort=public, name="office"),
                               15, "the same name to register again")
        self.assertEqual(len(self.logs.matching(LogWatcher.formatted(
            "client {name} is back", name="office"))), 1)
        self.assertEqual(len(server.registry.leases), 0)
        yield assertEchoes(self, public)

        # The protocol has no goodbye: a client that stops leaves a lease too.
        yield within(back.stopService(), 15, "the client to stop")
        yield within(self.logs.whenMatched(reserved, count=2), 15, "the second lease")
        yield within(self.logs.whenMatched(LogWatcher.formatted(
            "lease of public port {remote_port} for {name} expired", remote_port=public)),
            self.lease + 15, "the lease to expire")
        other = listenTarget(self)
        yield within(self.tunnel.publish(other, remotePort=public, name="newcomer"), 15,
                     "another name to take the port")
        self.assertEqual(server.registry.tunnels[public].name, "newcomer")
        yield assertEchoes(self, public)

class HealthProbeTests(LifecycleTestCase):
    @defer.inlineCallbacks
    def test_targetDownTakesThePortOfflineAndBackOnline(self):
        """
        With a short probe interval, stopping the local service closes the
        public port; starting it again on the same port reopens it.
        """
        server = yield self.tunnel.startServer()
        target = startTarget(self)
        client, public = yield within(
            self.tunnel.publish(target.port, health_check_interval=0.1), 15, "registration")
        channel = client.tunnels[0].channel
        yield assertEchoes(self, public)

        yield within(target.stop(), 10, "the target to stop")
        yield waitUntilRefused(public, 15, "the public port to go offline")
        self.assertIn(public, server.registry.tunnels)
        self.assertFalse(server.registry.tunnels[public].online)

        target.start()
        payload = randomBytes(4096)
        yield retryUntil(lambda: echoedThrough(self, public, payload, 10), 15,
                         "the public port to come back online")
        yield assertEchoes(self, public)
        self.assertTrue(server.registry.tunnels[public].online)
        # Offline and online again on the same control channel.
        self.assertIs(client.tunnels[0].channel, channel)


class HeartbeatTests(LifecycleTestCase):
    heartbeatTimeout = 2.0

    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        self.server = yield self.tunnel.startServer(
            heartbeat_timeout=self.heartbeatTimeout, heartbeat_check_interval=0.1)
        self.target = listenTarget(self)
        self.good, self.goodPublic = yield within(
            self.tunnel.publish(self.target, name="good", heartbeat_interval=0.1), 15,
            "the good client's registration")
        self.goodChannel = self.good.tunnels[0].channel

    @defer.inlineCallbacks
    def test_silentControlChannelIsDropped(self):
        """
        A control channel that registers and then sends no ping is closed
        after the heartbeat timeout, with its public port; a client that
        pings is unaffected.
        """
        public = freePort()
        began = reactor.seconds()
        control = yield connectRawControl(self, self.tunnel.controlPort, public, "silent")
        self.assertEqual(control.frames.items, [REGISTERED])
        self.assertIn(public, self.server.registry.tunnels)

        droppedAt = yield within(control.closed, 30, "the server to drop the silent channel")
        self.assertGreaterEqual(droppedAt - began, self.heartbeatTimeout)
        self.assertTrue((yield connectionRefused(public)),
                        "the silent client's public port is still open")
        self.assertNotIn(public, self.server.registry.tunnels)
        self.assertEqual(
            [e["name"] for e in self.logs.matching(LogWatcher.formatted("heartbeat timeout"))],
            ["silent"])

        self.assertIs(self.good.tunnels[0].channel, self.goodChannel)
        yield assertEchoes(self, self.goodPublic)

    @defer.inlineCallbacks
    def test_clientThatStopsPingingIsDroppedAndReconnects(self):
        """
        A real client whose pings are far apart is dropped after the
        heartbeat timeout, its port closed; it then registers again.
        """
        target = listenTarget(self)
        lazy, public = yield within(
            self.tunnel.publish(target, name="lazy", heartbeat_interval=3600), 15,
            "the lazy client's registration")
        lazyTunnel = self.server.registry.tunnels[public]
        firstChannel = lazy.tunnels[0].channel
        stoppedPublic = LogWatcher.formatted("public port {remote_port} stopped",
                                             remote_port=public)
        yield within(self.logs.whenMatched(stoppedPublic), 30, "the lazy client's port to close")
        self.assertTrue(lazyTunnel.closed)
        self.assertEqual(
            [e["name"] for e in self.logs.matching(LogWatcher.formatted("heartbeat timeout"))],
            ["lazy"])
        yield waitUntil(lambda: lazy.tunnels[0].channel is not firstChannel, 15,
                        "the lazy client to notice it was dropped")
        yield within(lazy.tunnels[0].whenRegistered(), 20, "the lazy client to register again")
        yield assertEchoes(self, public)
        self.assertIs(self.good.tunnels[0].channel, self.goodChannel)
        yield assertEchoes(self, self.goodPublic)


class ClientStopTests(LifecycleTestCase):
    @defer.inlineCallbacks
    def test_stoppingTheClientClosesItsConnectionsAndPort(self):
        """
        Stopping the client service closes the connections it tunnels, and
        the server then stops publishing its port.
        """
        server = yield self.tunnel.startServer()
        target = startTarget(self)
        client, public = yield within(self.tunnel.publish(target.port), 15, "registration")
        users = []
        for _ in range(3):
            user = yield connectUser(self, public)
            user.transport.write(b"hello")
            yield within(user.whenReceived(5), 15, "an echo through the tunnel")
            users.append(user)
        # (The health probe's connections are counted too.)
        self.assertGreaterEqual(len(target.factory.tracker.protocols), 3)

        yield within(client.stopService(), 15, "the client to stop")
        self.assertEqual(len(client.tunnels[0].connections), 0)
        yield within(defer.DeferredList([u.closed for u in users]), 15,
                     "the users' connections to close")
        yield within(defer.DeferredList(target.factory.tracker.lost), 15,
                     "the target's connections to close")
        yield waitUntil(lambda: public not in server.registry.tunnels, 15,
                        "the server to forget the client")
        self.assertTrue((yield connectionRefused(public)),
                        "the public port is still open after the client stopped")



class PortStateTests(LifecycleTestCase):
    @defer.inlineCallbacks
    def test_offlineOnlineOfflineEndsOffline(self):
        """
        offline_port, online_port, offline_port arriving together (a local
        service that flaps) leave the public port offline.
        """
        server = yield self.tunnel.startServer()
        public = freePort()
        control = yield connectRawControl(self, self.tunnel.controlPort, public, "flappy")
        self.assertEqual(control.frames.items, [REGISTERED])

        def isPong(f):
            return f["type"] == "pong"

        control.transport.write(
            jsonFrame({"type": "offline_port", "port": public}) +
            jsonFrame({"type": "online_port", "port": public}) +
            jsonFrame({"type": "offline_port", "port": public}) +
            jsonFrame({"type": "ping", "time": 1}))
        yield within(control.frames.whenMatched(isPong), 15, "pong")
        # A stop in progress completes within a reactor turn or two; these
        # round trips let it (and whatever it triggers) finish.
        for n in (2, 3):
            control.transport.write(jsonFrame({"type": "ping", "time": n}))
            yield within(control.frames.whenMatched(isPong, n), 15, "pong")
        yield waitUntilRefused(public, 5, "the public port to end offline")
        self.assertFalse(server.registry.tunnels[public].online)

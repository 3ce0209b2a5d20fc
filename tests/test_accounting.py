"""
The line each user connection leaves when it ends, and the counts behind
the admin API and the metrics: on a memory reactor for every way a
connection ends, and over real loopback sockets (each relay path) for the
bytes, on the server and on the client.
"""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.internet.protocol import Protocol
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from gotunnel.server import accounting
from gotunnel.config.yamlfile import ConfigFile
from gotunnel.cli.tap import ClientOptions, ServerOptions
from tests.support import (
    LogWatcher, Tunnel, connectUser, listenTarget, randomBytes, within,
)
from tests.test_server import ServerTestCase, dataChannel

ENDED = "connection {conn} from {user} to {client} port {remote_port}"
CLIENT_ENDED = "connection {conn} to {client} port {remote_port}"
WAIT = 30


class Events:
    """Log events of the test, kept from the global publisher."""

    def __init__(self, testCase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        testCase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def ended(self) -> list[dict]:
        return [e for e in self.events if e.get("log_format", "").startswith(ENDED)]


class ServerLineTests(ServerTestCase):
    """How a user's connection ended, as the server's line says."""

    def setUp(self):
        super().setUp()
        self.log = Events(self)

    def spliced(self):
        self.registered()
        user = self.connectUser()
        data = self.connect()
        return user, data

    def test_userClosedWithBytesAndDuration(self):
        """
        A user who closes first: one info line with the
        mapping, the user's address, the bytes each way (those sent early
        too) and the seconds since the user connected.
        """
        user, data = self.spliced()
        user.protocol.dataReceived(b"early ")
        self.reactor.advance(0.25)
        data.send(dataChannel("conn-1") + b"12345")
        user.protocol.dataReceived(b"GET /")
        data.send(b"678")
        self.reactor.advance(1.5)
        self.assertEqual(self.log.ended(), [])
        user.protocol.connectionLost(Failure(error.ConnectionDone()))
        [event] = self.log.ended()
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(
            formatEvent(event),
            f"connection u1 from {user.protocol.peerAddress} to edge-1 port 10022 -> local "
            "port 22 ended (user closed) after 1.750 s: 11 bytes in, 8 bytes out")
        self.assertTrue(user.protocol.peerAddress.startswith("198.51.100.99:"))
        stats = self.registry.stats.ports[(10022, "edge-1")]
        self.assertEqual((stats.opened, stats.ended, stats.bytesIn, stats.bytesOut),
                         (1, {"user closed": 1}, 11, 8))
        self.assertEqual(stats.setup.count, 1)
        self.assertEqual(self.registry.stats.users, {})

    def test_serviceClosed(self):
        """The data channel ends first: the service closed."""
        user, data = self.spliced()
        data.send(dataChannel("conn-1"))
        data.channel.readConnectionLost()
        user.protocol.connectionLost(Failure(error.ConnectionDone()))
        [event] = self.log.ended()
        self.assertEqual(event["how"], "service closed")

    def test_serviceReset(self):
        """The data channel is lost with an error: reset."""
        user, data = self.spliced()
        data.send(dataChannel("conn-1"))
        data.channel.connectionLost(Failure(error.ConnectionLost()))
        user.protocol.connectionLost(Failure(error.ConnectionDone()))
        [event] = self.log.ended()
        self.assertEqual(event["how"], "reset")

    def test_userReset(self):
        """The user's connection is lost with an error: reset."""
        user, data = self.spliced()
        data.send(dataChannel("conn-1"))
        user.protocol.connectionLost(Failure(error.ConnectionLost()))
        [event] = self.log.ended()
        self.assertEqual(event["how"], "reset")

    def test_dataChannelTimeout(self):
        """No data channel in time: data-channel timeout, and a refusal counted."""
        self.registered()
        user = self.connectUser()
        self.reactor.advance(self.settings.data_channel_timeout)
        self.assertTrue(user.transport.disconnecting)
        user.protocol.connectionLost(Failure(error.ConnectionDone()))
        [event] = self.log.ended()
        self.assertEqual(event["how"], "data-channel timeout")
        self.assertEqual((event["bytes_in"], event["bytes_out"]), (0, 0))
        stats = self.registry.stats.ports[(10022, "edge-1")]
        self.assertEqual(stats.refused, {"data_channel_timeout": 1})

    def test_refusedWhenClientGoes(self):
        """A user still waiting when its client goes: refused."""
        control = self.registered()
        user = self.connectUser()
        control.lose()
        user.protocol.connectionLost(Failure(error.ConnectionDone()))
        [event] = self.log.ended()
        self.assertEqual(event["how"], "refused")
        stats = self.registry.stats.ports[(10022, "edge-1")]
        self.assertEqual(stats.refused, {"client_gone": 1})

    def test_refusedOverWaitingCap(self):
        """A user over max_waiting_users: refused, and an admission refusal counted."""
        self.settings.max_waiting_users = 1
        self.registered()
        self.connectUser()
        second = self.connectUser()
        self.assertTrue(second.transport.disconnecting)
        second.protocol.connectionLost(Failure(error.ConnectionDone()))
        [event] = self.log.ended()
        self.assertEqual(event["how"], "refused")
        self.assertEqual(self.registry.stats.admissionRefusals["waiting_users"], 1)

    def test_debugLevel(self):
        """connection_log: debug logs the line at debug."""
        self.registry.stats.logLevel = accounting.connectionLogLevel("debug")
        user, data = self.spliced()
        data.send(dataChannel("conn-1"))
        user.protocol.connectionLost(Failure(error.ConnectionDone()))
        [event] = self.log.ended()
        self.assertEqual(event["log_level"], LogLevel.debug)

    def test_off(self):
        """connection_log: off logs nothing, and still counts."""
        self.registry.stats.logLevel = accounting.connectionLogLevel("off")
        user, data = self.spliced()
        data.send(dataChannel("conn-1"))
        user.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.log.ended(), [])
        self.assertEqual(self.registry.stats.ports[(10022, "edge-1")].ended, {"user closed": 1})

    def test_authFailuresAndAdmissionCounted(self):
        """A wrong token and a connection over the pending cap are counted."""
        from tests.test_server import register

        self.connect().send(register(token="wrong"))
        self.assertEqual(self.registry.stats.authFailures["control"], 1)
        self.settings.max_pending_per_source = 1
        self.connect("192.0.2.77")
        self.connect("192.0.2.77")
        self.assertEqual(self.registry.stats.admissionRefusals["pending"], 1)


class PortStatsBoundTests(ServerTestCase):
    def test_foldedIntoOther(self):
        """
        Past MAX_PORT_STATS (port, client) pairs, the oldest that no tunnel
        holds is folded into "other"; pairs held by a tunnel keep their own.
        """
        self.patch(accounting, "MAX_PORT_STATS", 2)
        first = self.registered(remote_port=10001, name="a")
        user = self.connectUser(10001)
        user.protocol.connectionLost(Failure(error.ConnectionDone()))
        first.lose()
        self.registered(remote_port=10002, name="b")
        self.registered(remote_port=10003, name="c")
        ports = self.registry.stats.ports
        self.assertEqual(sorted(ports), [(10002, "b"), (10003, "c")])
        self.assertEqual(self.registry.stats.other.opened, 1)
        self.registered(remote_port=10004, name="d")
        self.assertEqual(sorted(ports), [(10002, "b"), (10003, "c")])
        self.assertIs(self.registry.tunnels[10004].stats, self.registry.stats.other)


class SettingTests(unittest.TestCase):
    def test_configKeyAndOption(self):
        """connection_log in both sections (a bare off too), and --connection-log."""
        config = ConfigFile("config.yaml", {"server": {"connection_log": False},
                                            "client": {"connection_log": "DEBUG"}},
                            {"server": {"connection_log": "off"},
                             "client": {"connection_log": "DEBUG"}})
        self.assertEqual(config.serverValues(), {"connection_log": "off"})
        self.assertEqual(config.clientValues(), {"connection_log": "debug"})
        options = ServerOptions()
        options.parseOptions(["--token", "t", "--connection-log", "debug"])
        self.assertEqual(options.settings().connection_log, "debug")
        options = ClientOptions()
        options.parseOptions(["--token", "t", "--map", "22:10022", "--connection-log", "off"])
        self.assertEqual(options.settings().connection_log, "off")
        with self.assertRaises(Exception):
            ServerOptions().parseOptions(["--token", "t", "--connection-log", "loud"])


class SpeakAndClose(Protocol):
    """A service that sends a fixed answer to whatever comes, then closes."""

    answer = b"bye" * 1000

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.answer)
        self.transport.loseConnection()


class LoopbackLineMixin:
    """Both lines over real sockets, bytes exact, on each relay path."""

    zeroCopy: bool
    spliceThread = None

    @defer.inlineCallbacks
    def test_transferBothLines(self):
        watcher = LogWatcher(self)
        tunnel = Tunnel(self, zeroCopy=self.zeroCopy, spliceThread=self.spliceThread)
        yield tunnel.startServer()
        _, public = yield tunnel.publish(listenTarget(self))
        payload = randomBytes(512 * 1024)
        user = yield connectUser(self, public)
        user.transport.write(payload)
        yield within(user.whenReceived(len(payload)), WAIT, "the echo")
        user.transport.loseConnection()
        [server] = yield within(watcher.whenMatched(watcher.formatted(ENDED)), WAIT,
                                "the server's line")
        [client] = yield within(watcher.whenMatched(watcher.formatted(CLIENT_ENDED)), WAIT,
                                "the client's line")
        self.assertEqual((server["how"], server["bytes_in"], server["bytes_out"]),
                         ("user closed", len(payload), len(payload)))
        self.assertEqual((client["how"], client["bytes_in"], client["bytes_out"]),
                         ("user closed", len(payload), len(payload)))
        self.assertEqual(server["remote_port"], public)
        self.assertIn(f"port {public} -> 127.0.0.1:", formatEvent(client))

    @defer.inlineCallbacks
    def test_serviceClosesFirst(self):
        watcher = LogWatcher(self)
        tunnel = Tunnel(self, zeroCopy=self.zeroCopy)
        yield tunnel.startServer()
        _, public = yield tunnel.publish(listenTarget(self, SpeakAndClose))
        user = yield connectUser(self, public)
        user.transport.write(b"hello")
        yield within(user.closed, WAIT, "the service to close")
        [server] = yield within(watcher.whenMatched(watcher.formatted(ENDED)), WAIT,
                                "the server's line")
        [client] = yield within(watcher.whenMatched(watcher.formatted(CLIENT_ENDED)), WAIT,
                                "the client's line")
        answer = len(SpeakAndClose.answer)
        self.assertEqual((server["how"], server["bytes_in"], server["bytes_out"]),
                         ("service closed", 5, answer))
        self.assertEqual((client["how"], client["bytes_in"], client["bytes_out"]),
                         ("service closed", 5, answer))


class ZeroCopyLineTests(LoopbackLineMixin, unittest.TestCase):
    zeroCopy = True
    spliceThread = False


class SpliceThreadLineTests(LoopbackLineMixin, unittest.TestCase):
    zeroCopy = True
    spliceThread = True


class OrdinaryLineTests(LoopbackLineMixin, unittest.TestCase):
    zeroCopy = False

"""
Hostile input on the control port, over real loopback sockets: every bad
frame closes only the connection that sent it, the log says what was wrong
and who sent it, and the server goes on serving good clients.  Then the
same, property-based, on a L{ServerChannel} with no sockets at all.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, event, given, settings, strategies as st

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from gotunnel.wire import messages
from gotunnel.server.admission import MAX_AUTH_FAILURE_SOURCES
from gotunnel.config.settings import ServerSettings
from gotunnel.server.channel import ServerChannel, addressGroup
from gotunnel.server.publicusers import MAX_EARLY_BYTES, PublicUser
from gotunnel.server.registry import TunnelRegistry

from tests.support import (
    REGISTERED,
    HOST, TOKEN, LogWatcher, Tunnel, connectRaw, connectUser, connectionRefused,
    dataChannelMessage, echoedThrough, freePort, frame, jsonFrame, listenTarget,
    openFileDescriptors, randomBytes, registerMessage, waitUntil, within,
)

WRONG_TOKEN = "wrong-token-4c1d2e"
OVER_LIMIT = (64 * 1024 + 1).to_bytes(4, "big")
_fresh = itertools.count(1)


def assertTokenNeverLogged(testCase: unittest.TestCase, logs: LogWatcher, token: str) -> None:
    """No event C{logs} saw holds C{token}, in its text or in any field."""
    for logged in logs.items:
        testCase.assertNotIn(token, formatEvent(logged))
        for key, value in logged.items():
            testCase.assertNotIn(token, repr(value), f"the token is in the log field {key}")


class ServerUnderAttack(unittest.TestCase):
    """
    A server with a good client already publishing a port.  Subclasses
    change L{overrides} (server settings) and whether the good client
    registers before the test starts.
    """

    timeout = 60
    overrides: dict = {"first_frame_timeout": 60.0}
    registerGoodClient = True

    @defer.inlineCallbacks
    def setUp(self):
        self.logs = LogWatcher(self)
        self.tunnel = Tunnel(self)
        self.server = yield self.tunnel.startServer(**self.overrides)
        self.controlPort = self.tunnel.controlPort
        self.good = self.goodChannel = self.goodPublic = None
        if self.registerGoodClient:
            yield self.registerGood()

    @defer.inlineCallbacks
    def registerGood(self):
        target = listenTarget(self)
        self.good, self.goodPublic = yield within(
            self.tunnel.publish(target, name="good"), 20, "the good client's registration")
        self.goodChannel = self.good.tunnels[0].channel

    @defer.inlineCallbacks
    def assertEchoes(self, port: int, size: int = 32 * 1024):
        ok = yield echoedThrough(self, port, randomBytes(size), 15)
        self.assertTrue(ok, f"{size} bytes did not come back through port {port}")

    @defer.inlineCallbacks
    def assertServerStillServes(self):
        """
        The good client's tunnel (if any) carries bytes on its original
        control channel, and a new client registers and carries bytes.
        """
        if self.good is not None:
            self.assertIs(self.good.tunnels[0].channel, self.goodChannel,
                          "the good client lost its control channel")
            yield self.assertEchoes(self.goodPublic)
        target = listenTarget(self)
        fresh, public = yield within(
            self.tunnel.publish(target, name=f"fresh-{next(_fresh)}"), 20,
            "a new client's registration")
        yield self.assertEchoes(public)
        yield within(fresh.stopService(), 15, "the new client to stop")

    def assertNotConnected(self, raw) -> None:
        """The server holds no connection from C{raw}'s address any more."""
        peers = {c.transport.getPeer().port for c in self.server.registry.connections}
        self.assertNotIn(raw.localPort, peers)

    @defer.inlineCallbacks
    def assertProtocolError(self, send: bytes, why: str):
        """
        C{send} on a new connection is logged as a protocol error naming our
        address and C{why}; that connection is closed without an answer and
        the server serves on.
        """
        raw = yield connectRaw(self, self.controlPort, send)
        yield within(raw.closed, 15, "the server to close the offending connection")
        events = yield within(
            self.logs.whenMatched(LogWatcher.formatted("protocol error from", peer=raw.peerName)),
            5, "the protocol error's log event")
        self.assertEqual(len(events), 1)
        self.assertIn(why, events[0]["why"])
        self.assertEqual(raw.frames.items, [])
        self.assertNotConnected(raw)
        yield self.assertServerStillServes()
        return events[0]

    @defer.inlineCallbacks
    def assertRefused(self, send: bytes, reason: str, logPrefix: str):
        """
        C{send} on a new connection is answered C{register_resp} fail with
        C{reason}, logged with our address, and the connection is closed.
        """
        raw = yield connectRaw(self, self.controlPort, send)
        yield within(raw.closed, 15, "the server to close the refused connection")
        self.assertEqual(raw.frames.items,
                         [{"type": "register_resp", "status": "fail", "reason": reason}])
        [event] = yield within(self.logs.whenMatched(
            LogWatcher.formatted(logPrefix, peer=raw.peerName)), 5, "the refusal's log event")
        self.assertEqual(event["reason"], reason)
        self.assertNotConnected(raw)
        return event

    @defer.inlineCallbacks
    def rawControl(self, name: str):
        """A raw control channel registered for a new public port; (raw, port)."""
        public = freePort()
        raw = yield connectRaw(self, self.controlPort, jsonFrame(registerMessage(public, name)))
        [resp] = yield within(raw.whenFrame(), 15, "register_resp")
        self.assertEqual(resp, REGISTERED)
        return raw, public

    @defer.inlineCallbacks
    def assertDataChannelServes(self, public: int, conn_id: str, user):
        """The real data channel for C{conn_id} carries C{user}'s bytes both ways."""
        channel = yield connectRaw(self, self.controlPort,
                                   jsonFrame(dataChannelMessage(public, conn_id)), rawAfter=1)
        [resp] = yield within(channel.whenFrame(), 15, "the data channel's register_resp")
        self.assertEqual(resp, {"type": "register_resp", "status": "ok"})
        early = yield within(channel.whenRaw(5), 15, "the user's early bytes")
        self.assertEqual(early, b"early")
        channel.transport.write(b"answer")
        received = yield within(user.whenReceived(6), 15, "the answer at the user")
        self.assertEqual(received, b"answer")
        self.assertNotIn(conn_id, self.server.registry.waitingUsers)
        user.transport.loseConnection()
        yield within(channel.closed, 15, "the data channel to close after the user")

    def assertTokenNeverLogged(self, token: str) -> None:
        assertTokenNeverLogged(self, self.logs, token)


class BadFrameOverLoopbackTests(ServerUnderAttack):
    """
    Two malformed first frames over real sockets: the protocol error closes
    the connection and the server serves on (the rest of the table runs on
    StringTransport, in L{BadFrameTests}).
    """

    def test_lengthOverTheLimit(self):
        return self.assertProtocolError(OVER_LIMIT + b"x" * 1000, "65537 bytes is over the limit")

    def test_notJson(self):
        return self.assertProtocolError(frame(b"GET / HTTP/1.1\r\n\r\n"), "not JSON")


class BadFrameTests(unittest.TestCase):
    """
    Each malformed first frame is a protocol error of its own connection,
    on a registry on a fake reactor beside a registered good client.
    """

    def setUp(self):
        self.logs = LogWatcher(self)
        self.harness = Harness()
        self.goodPublic = FUZZ_PORTS[0]
        [resp] = self.harness.goodRegister(self.goodPublic, "192.0.2.1")
        self.assertEqual(resp, REGISTERED)

    def assertProtocolError(self, send: bytes, why: str) -> dict:
        """
        C{send} on a new connection is logged as a protocol error naming its
        address and C{why}; that connection is closed without an answer, and
        the good client's port stays and a new client registers.
        """
        channel, transport = self.harness.connect()
        self.harness.feed(len(self.harness.channels) - 1, send)
        self.assertTrue(transport.disconnecting, "the offending connection is still open")
        events = self.logs.matching(LogWatcher.formatted(
            "protocol error from", peer=channel.peerDescription))
        self.assertEqual(len(events), 1)
        self.assertIn(why, events[0]["why"])
        self.assertEqual(transport.value(), b"")
        self.assertNotIn(channel, self.harness.registry.connections)
        self.assertTrue(self.harness.registry.tunnels[self.goodPublic].online)
        self.assertEqual(self.harness.goodRegister(FUZZ_PORTS[1], "192.0.2.2"), [REGISTERED])
        return events[0]

    def test_lengthPrefixMaximal(self):
        """0x7fffffff is refused on the prefix alone: the server allocates nothing for it."""
        return self.assertProtocolError(b"\x7f\xff\xff\xff", "2147483647 bytes")

    def test_lengthPrefixAllOnes(self):
        return self.assertProtocolError(b"\xff\xff\xff\xff" + b"{}", "4294967295 bytes")

    def test_zeroLengthFrame(self):
        return self.assertProtocolError(frame(b""), "frame is empty")

    def test_notUtf8(self):
        return self.assertProtocolError(frame(b'{"type":"\xff\xfe register"}'), "not UTF-8")

    def test_deeplyNestedJson(self):
        """Nesting deep enough to exhaust the parser's recursion is a protocol error too."""
        return self.assertProtocolError(frame(b"[" * 30000 + b"]" * 30000), "not JSON")

    def test_jsonArray(self):
        return self.assertProtocolError(jsonFrame([{"type": "register"}]), "JSON list")

    def test_jsonNumber(self):
        return self.assertProtocolError(jsonFrame(42), "JSON int")

    def test_jsonString(self):
        return self.assertProtocolError(jsonFrame("register"), "JSON str")

    def test_missingType(self):
        message = registerMessage(FUZZ_PORTS[2], "typeless")
        del message["type"]
        return self.assertProtocolError(jsonFrame(message), "no type")

    def test_typeNotAString(self):
        return self.assertProtocolError(jsonFrame({"type": ["register"]}), "type is not a string")

    def test_portAsString(self):
        message = registerMessage(str(FUZZ_PORTS[2]), "stringy")
        return self.assertProtocolError(jsonFrame(message), "register.remote_port must be an integer")

    def test_portAsBoolean(self):
        message = registerMessage(FUZZ_PORTS[2], "boolean", local_port=True)
        return self.assertProtocolError(jsonFrame(message), "register.local_port must be an integer")

    def test_portAsFloat(self):
        body = jsonFrame(registerMessage(1e400, "floaty"))[4:].replace(b"Infinity", b"1e400")
        return self.assertProtocolError(frame(body), "register.remote_port must be an integer")

    def test_negativePort(self):
        return self.assertProtocolError(jsonFrame(registerMessage(-1, "negative")),
                                        "register.remote_port must be a port from 0 to 65535")

    def test_portOver65535(self):
        return self.assertProtocolError(jsonFrame(registerMessage(65536, "too-high")),
                                        "register.remote_port must be a port from 0 to 65535")

    def test_hugePortNumber(self):
        return self.assertProtocolError(
            frame(b'{"type":"register","remote_port":' + b"9" * 5000 + b"}"), "not JSON")

    def test_tokenAsNumber(self):
        message = registerMessage(FUZZ_PORTS[2], "numeric", token=123456)
        return self.assertProtocolError(jsonFrame(message), "register.token must be a string")

    def test_tokenOfWrongTypeNotLogged(self):
        """A token sent as a number is a wrong token: its value is not logged either."""
        message = registerMessage(FUZZ_PORTS[2], "numeric", token=987654321)
        self.assertProtocolError(jsonFrame(message), "register.token must be a string")
        assertTokenNeverLogged(self, self.logs, "987654321")

    def test_hugeName(self):
        message = registerMessage(FUZZ_PORTS[2], "n" * (messages.MAX_STRING + 1))
        return self.assertProtocolError(jsonFrame(message), "register.name is longer than 1024")

    def test_nameBiggerThanAFrame(self):
        message = registerMessage(FUZZ_PORTS[2], "n" * (100 * 1024))
        return self.assertProtocolError(jsonFrame(message), "over the limit")

    def test_nameOfWrongType(self):
        message = registerMessage(FUZZ_PORTS[2], {"first": "name"})
        return self.assertProtocolError(jsonFrame(message), "register.name must be a string")

    def test_pingFirst(self):
        return self.assertProtocolError(jsonFrame({"type": "ping", "time": 1}),
                                        "ping before a successful register")

    def test_offlinePortFirst(self):
        return self.assertProtocolError(jsonFrame({"type": "offline_port", "port": self.goodPublic}),
                                        "offline_port before a successful register")

    def test_offlinePortFirstLeavesOthersPortAlone(self):
        """A stranger's offline_port for the good client's port closes nothing but itself."""
        self.assertProtocolError(
            jsonFrame({"type": "offline_port", "port": self.goodPublic}), "offline_port")
        self.assertTrue(self.harness.registry.tunnels[self.goodPublic].online)

    def test_serverMessageFirst(self):
        return self.assertProtocolError(
            jsonFrame({"type": "register_resp", "status": "ok"}), "unexpected register_resp")

    def test_openDataChannelFirst(self):
        return self.assertProtocolError(
            jsonFrame({"type": "open_data_channel", "local_port": 22, "conn_id": "x"}),
            "unexpected open_data_channel")


class BadSequenceTests(ServerUnderAttack):
    """Frames that are well formed but come at the wrong time, or ask for the impossible."""

    @defer.inlineCallbacks
    def test_secondRegisterOnControlChannel(self):
        """
        A second register on a registered control channel is a protocol
        error: that channel and its public port are closed, nobody else's.
        """
        raw, public = yield self.rawControl("twice")
        raw.transport.write(jsonFrame(registerMessage(freePort(), "twice")))
        yield within(raw.closed, 15, "the server to close the control channel")
        [event] = self.logs.matching(LogWatcher.formatted("protocol error from",
                                                          peer=raw.peerName))
        self.assertIn("register on a connection that is already a control channel", event["why"])
        self.assertNotIn(public, self.server.registry.tunnels)
        self.assertTrue((yield connectionRefused(public)))
        yield self.assertServerStillServes()

    @defer.inlineCallbacks
    def test_dataChannelOnControlChannel(self):
        raw, public = yield self.rawControl("mixed")
        raw.transport.write(jsonFrame(dataChannelMessage(public, None)))
        yield within(raw.closed, 15, "the server to close the control channel")
        [event] = self.logs.matching(LogWatcher.formatted("protocol error from",
                                                          peer=raw.peerName))
        self.assertIn("data_channel on a connection that is already a control", event["why"])
        self.assertNotIn(public, self.server.registry.tunnels)
        yield self.assertServerStillServes()

    @defer.inlineCallbacks
    def test_garbageAfterRegister(self):
        """
        Garbage right behind a valid register (in the same segment) registers,
        then breaks the channel: it is closed and its port freed.
        """
        public = freePort()
        raw = yield connectRaw(self, self.controlPort,
                               jsonFrame(registerMessage(public, "garbage")) +
                               frame(b"\x00\x01garbage\xff") + b"\xff" * 64)
        yield within(raw.closed, 15, "the server to close the control channel")
        [event] = self.logs.matching(LogWatcher.formatted("protocol error from",
                                                          peer=raw.peerName))
        self.assertIn("not UTF-8", event["why"])
        self.assertEqual(len(self.logs.matching(LogWatcher.formatted(
            "client {name} registered", name="garbage"))), 1)
        yield waitUntil(lambda: public not in self.server.registry.tunnels, 10,
                        "the server to forget the broken channel's tunnel")
        self.assertTrue((yield connectionRefused(public)))
        yield self.assertServerStillServes()

    @defer.inlineCallbacks
    def test_garbageLengthAfterRegister(self):
        public = freePort()
        raw = yield connectRaw(self, self.controlPort,
                               jsonFrame(registerMessage(public, "garbage")) + b"\x7f\xff\xff\xff")
        yield within(raw.closed, 15, "the server to close the control channel")
        [event] = self.logs.matching(LogWatcher.formatted("protocol error from",
                                                          peer=raw.peerName))
        self.assertIn("over the limit", event["why"])
        yield waitUntil(lambda: public not in self.server.registry.tunnels, 10,
                        "the server to forget the broken channel's tunnel")
        yield self.assertServerStillServes()

    @defer.inlineCallbacks
    def test_dataChannelWithNobodyWaiting(self):
        yield self.assertRefused(jsonFrame(dataChannelMessage(self.goodPublic, None)),
                                 "no user is waiting for this data channel",
                                 "refused a data channel from")
        yield self.assertServerStillServes()

    @defer.inlineCallbacks
    def test_dataChannelForAnUnknownPort(self):
        yield self.assertRefused(jsonFrame(dataChannelMessage(freePort(), None)),
                                 "no user is waiting for this data channel",
                                 "refused a data channel from")
        yield self.assertServerStillServes()

    @defer.inlineCallbacks
    def test_dataChannelWithWrongConnId(self):
        """
        A data channel naming a conn_id nobody waits under is refused, and
        the user who does wait keeps waiting for its own.
        """
        raw, public = yield self.rawControl("holder")
        user = yield connectUser(self, public)
        user.transport.write(b"early")
        [request] = yield within(raw.whenFrame(lambda f: f["type"] == "open_data_channel"), 15,
                                 "open_data_channel")
        yield self.assertRefused(
            jsonFrame(dataChannelMessage(public, "0123456789abcdef")) + b"stolen?",
            "no user is waiting for this data channel", "refused a data channel from")
        self.assertIn(request["conn_id"], self.server.registry.waitingUsers)
        yield self.assertDataChannelServes(public, request["conn_id"], user)
        yield self.assertServerStillServes()

    @defer.inlineCallbacks
    def test_registerUnsupportedProtocol(self):
        yield self.assertRefused(jsonFrame(registerMessage(freePort(), "sctp", protocol="sctp")),
                                 "protocol 'sctp' is not supported, only tcp",
                                 "refused registration")
        yield self.assertServerStillServes()

    @defer.inlineCallbacks
    def test_registerPortInUse(self):
        """A port the server cannot listen on (its own control port) is refused with the cause."""
        raw = yield connectRaw(self, self.controlPort,
                               jsonFrame(registerMessage(self.controlPort, "squatter")))
        yield within(raw.closed, 15, "the server to close the refused connection")
        [resp] = raw.frames.items
        self.assertEqual(resp["status"], "fail")
        self.assertTrue(resp["reason"].startswith(f"cannot listen on port {self.controlPort}"),
                        resp)
        self.assertNotIn(self.controlPort, self.server.registry.tunnels)
        yield self.assertServerStillServes()

    @defer.inlineCallbacks
    def test_registerPortOfAnotherClient(self):
        yield self.assertRefused(jsonFrame(registerMessage(self.goodPublic, "thief")),
                                 f"remote port {self.goodPublic} is already taken by another "
                                 "client", "refused registration")
        self.assertEqual(self.server.registry.tunnels[self.goodPublic].name, "good")
        yield self.assertServerStillServes()


class WaitingUserCapTests(ServerUnderAttack):
    overrides = {"first_frame_timeout": 60.0, "max_waiting_users": 3}

    @defer.inlineCallbacks
    def test_usersOverTheCapAreClosed(self):
        """
        Users of a client that never opens data channels: those over
        max_waiting_users are closed at once; those under it still get their
        data channel.
        """
        raw, public = yield self.rawControl("sluggish")
        users = []
        for n in range(5):
            user = yield connectUser(self, public)
            user.transport.write(b"early")
            users.append(user)
        requests = yield within(raw.whenFrame(lambda f: f["type"] == "open_data_channel", 3),
                                15, "three open_data_channel requests")
        closed = yield within(defer.gatherResults([u.closed for u in users[3:]]), 15,
                              "the users over the cap to be closed")
        self.assertEqual(closed, [b"", b""])
        self.assertEqual(len(self.logs.matching(LogWatcher.formatted(
            "{limit} users already wait", remote_port=public))), 2)
        self.assertEqual(len(self.server.registry.tunnels[public].waiting), 3)
        yield self.assertDataChannelServes(public, requests[0]["conn_id"], users[0])
        yield self.assertServerStillServes()


class WrongTokenTests(ServerUnderAttack):
    overrides = {"first_frame_timeout": 60.0, "auth_failure_delay_max": 0.5}

    @defer.inlineCallbacks
    def test_registerWithWrongToken(self):
        """Refused as authentication failed; logged with our address, never the token."""
        public = freePort()
        event = yield self.assertRefused(
            jsonFrame(registerMessage(public, "guesser", token=WRONG_TOKEN)),
            "authentication failed", "refused registration")
        self.assertEqual(event["name"], "guesser")
        self.assertTrue((yield connectionRefused(public)))
        self.assertTokenNeverLogged(WRONG_TOKEN)
        self.assertTokenNeverLogged(TOKEN)
        yield self.assertServerStillServes()

    @defer.inlineCallbacks
    def test_dataChannelWithWrongToken(self):
        yield self.assertRefused(
            jsonFrame(dataChannelMessage(self.goodPublic, None, token=WRONG_TOKEN)),
            "authentication failed", "refused a data channel from")
        self.assertTokenNeverLogged(WRONG_TOKEN)
        self.assertTokenNeverLogged(TOKEN)
        yield self.assertServerStillServes()

    @defer.inlineCallbacks
    def test_wrongTokenDataChannelNeverAttaches(self):
        """
        A data channel with the right conn_id but a wrong token (and bytes
        behind it) is refused; the waiting user gets nothing from it and is
        then served by its real data channel.
        """
        raw, public = yield self.rawControl("holder")
        user = yield connectUser(self, public)
        user.transport.write(b"early")
        [request] = yield within(raw.whenFrame(lambda f: f["type"] == "open_data_channel"), 15,
                                 "open_data_channel")
        for conn_id in (request["conn_id"], None):
            yield self.assertRefused(
                jsonFrame(dataChannelMessage(public, conn_id, token=WRONG_TOKEN)) + b"EVIL",
                "authentication failed", "refused a data channel from")
            self.assertIn(request["conn_id"], self.server.registry.waitingUsers)
        self.assertEqual(user.data, b"")
        self.assertFalse(user.closed.called)
        yield self.assertDataChannelServes(public, request["conn_id"], user)
        self.assertNotIn(b"EVIL", user.data)
        self.assertTokenNeverLogged(WRONG_TOKEN)
        yield self.assertServerStillServes()

    @defer.inlineCallbacks
    def test_repeatedFailuresAreAnsweredSlower(self):
        """
        Wrong tokens in a row from one address are answered after 0, 0.1,
        0.2, 0.4 s, then no slower than auth_failure_delay_max (0.5 s here,
        where doubling would give 0.8, 1.6, 3.2 s); a right token meanwhile
        is not held back.
        """
        expected = [0.0, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
        took = []
        for n in range(len(expected)):
            began = reactor.seconds()
            raw = yield connectRaw(self, self.controlPort, jsonFrame(
                registerMessage(freePort(), f"guess-{n}", token=f"{WRONG_TOKEN}-{n}")))
            yield within(raw.closed, 15, f"the answer to wrong token {n}")
            took.append(reactor.seconds() - began)
            self.assertEqual(raw.frames.items[0]["reason"], "authentication failed")
        for n, (actual, least) in enumerate(zip(took, expected)):
            self.assertGreaterEqual(actual, least - 0.005, f"answer {n} came early: {took}")
        self.assertLess(took[-1], 3.0, f"the delay is not capped: {took}")
        yield self.assertServerStillServes()


class SilentConnectionTests(ServerUnderAttack):
    overrides = {"first_frame_timeout": 0.5}

    @defer.inlineCallbacks
    def assertClosedAfterTimeout(self, send: bytes = b""):
        began = reactor.seconds()
        raw = yield connectRaw(self, self.controlPort, send)
        closedAt = yield within(raw.closed, 15, "the server to close a silent connection")
        self.assertGreaterEqual(closedAt - began, 0.5)
        [event] = yield within(self.logs.whenMatched(LogWatcher.formatted(
            "{peer} sent no register or data_channel", peer=raw.peerName)), 5,
            "the timeout's log event")
        self.assertEqual(event["timeout"], 0.5)
        self.assertEqual(self.server.registry.pending, {})
        self.assertNotConnected(raw)
        yield self.assertServerStillServes()

    def test_nothingSent(self):
        return self.assertClosedAfterTimeout()

    def test_lengthPrefixOnly(self):
        return self.assertClosedAfterTimeout(b"\x00\x00\x00\x40")

    def test_halfAFrame(self):
        return self.assertClosedAfterTimeout(jsonFrame(registerMessage(freePort(), "half"))[:30])

    def test_onlyFramesOfUnknownType(self):
        """Frames of a type we do not know are ignored, which does not keep a connection open."""
        return self.assertClosedAfterTimeout(
            jsonFrame({"type": "hello"}) + jsonFrame({"type": "future_thing", "x": [1, 2]}))

    @defer.inlineCallbacks
    def test_tricklingRegister(self):
        """
        A valid register sent one byte every 20 ms (slower than the
        timeout allows) is cut off at the timeout, not served.
        """
        public = freePort()
        payload = jsonFrame(registerMessage(public, "trickle"))
        raw = yield connectRaw(self, self.controlPort)
        began = reactor.seconds()
        sent = iter(range(len(payload)))

        def sendByte():
            n = next(sent, None)
            if n is None or raw.closed.called:
                trickle.stop()
                return
            raw.transport.write(payload[n:n + 1])

        trickle = LoopingCall(sendByte)
        trickle.start(0.02)
        self.addCleanup(lambda: trickle.stop() if trickle.running else None)
        closedAt = yield within(raw.closed, 15, "the server to cut the trickle off")
        self.assertGreaterEqual(closedAt - began, 0.5)
        self.assertNotIn(public, self.server.registry.tunnels)
        self.assertTrue(self.logs.matching(LogWatcher.formatted(
            "{peer} sent no register", peer=raw.peerName)))
        yield self.assertServerStillServes()


class PendingCapTests(ServerUnderAttack):
    """Idle connections from an address that has no registered client."""

    overrides = {"first_frame_timeout": 3.0, "max_pending_per_source": 3}
    registerGoodClient = False

    @defer.inlineCallbacks
    def test_idleConnectionsOverTheCapAreRefused(self):
        """
        Three idle connections from 127.0.0.1 are held; the fourth and fifth
        are closed at once, logged with their address.  A client started
        meanwhile registers once the idle ones time out, with nobody acting.
        """
        idle = []
        for _ in range(3):
            idle.append((yield connectRaw(self, self.controlPort)))
        yield waitUntil(lambda: self.server.registry.pending == {HOST: 3}, 10,
                        "the server to count three idle connections")
        extra = []
        for _ in range(2):
            extra.append((yield connectRaw(self, self.controlPort)))
        for raw in extra:
            [event] = yield within(self.logs.whenMatched(LogWatcher.formatted(
                "refusing a connection from", peer=raw.peerName)), 10, "a refusal event")
            self.assertIn("3 connections from this address", event["why"])
            yield within(raw.closed, 10, "a connection over the cap to close")
        # The refusals came well before the idle connections' timeout.
        self.assertEqual([raw.closed.called for raw in idle], [False] * 3)
        self.assertEqual(self.server.registry.pending, {HOST: 3})

        yield self.registerGood()
        yield within(defer.gatherResults([raw.closed for raw in idle]), 10,
                     "the idle connections' timeout")
        yield self.assertServerStillServes()

    @defer.inlineCallbacks
    def test_registeredClientsAddressIsExempt(self):
        """
        Once a client from 127.0.0.1 is registered, idle connections from
        127.0.0.1 beyond the per-source cap are held (not refused), within
        the room for its pool, and the client's data channels, from the same
        address, still get through.
        """
        yield self.registerGood()
        idle = []
        for _ in range(6):
            idle.append((yield connectRaw(self, self.controlPort)))
        yield waitUntil(lambda: self.server.registry.pending.get(HOST) == 6, 10,
                        "the server to count six idle connections")
        self.assertEqual(self.logs.matching(LogWatcher.formatted("refusing a connection")), [])
        yield self.assertServerStillServes()

    @defer.inlineCallbacks
    def test_delayedRefusalsCountAgainstTheCap(self):
        """
        Connections held open while their wrong-token refusal is delayed are
        connections from that address the server holds for nothing: no more
        of them than max_pending_per_source.
        """
        self.server.settings.auth_failure_delay_max = 30.0
        refused = LogWatcher.formatted("refused registration")
        for n in range(5):
            raw = yield connectRaw(self, self.controlPort, jsonFrame(
                registerMessage(freePort(), "guesser", token=WRONG_TOKEN)))
            yield within(raw.closed, 15, "a wrong token's answer")
        held = []
        for n in range(10):
            raw = yield connectRaw(self, self.controlPort, jsonFrame(
                registerMessage(freePort(), "guesser", token=WRONG_TOKEN)))
            held.append(raw)

            def answered(count=n + 1):
                return len(self.logs.matching(refused)) - 5 + len(self.logs.matching(
                    LogWatcher.formatted("refusing a connection"))) >= count

            yield waitUntil(answered, 10, "the server to read the wrong token or refuse us")
        waiting = [c for c in self.server.registry.connections
                   if getattr(c, "refusalCall", None) is not None]
        for raw in held:
            raw.transport.abortConnection()
        yield within(defer.gatherResults([raw.closed for raw in held]), 10, "closing them")
        yield self.assertServerStillServes()
        self.assertLessEqual(len(waiting), 3)

    @defer.inlineCallbacks
    def test_pendingTotalDoesNotBlockRegisteredClients(self):
        """
        Idle connections from a registered client's address filling
        max_pending_total do not keep that client's data channels out.
        (That strangers are refused once it is full is checked without
        sockets, in L{PendingTotalTests}: it needs a second address.)
        """
        self.server.settings.max_pending_total = 4
        self.server.settings.first_frame_timeout = 30.0
        yield self.registerGood()
        for _ in range(5):
            yield connectRaw(self, self.controlPort)
        yield waitUntil(lambda: self.server.registry.pending.get(HOST) == 5, 10,
                        "the server to count five idle connections")
        yield self.assertEchoes(self.goodPublic)
        self.assertEqual(self.logs.matching(LogWatcher.formatted("refusing a connection")), [])


# ---------------------------------------------------------------------------
# Property-based: a ServerChannel over StringTransport, its registry on a
# MemoryReactorClock.  No sockets; everything a test does happens at once.

FUZZ_HOST = "127.0.0.1"
GOOD_PORT = 50000
FUZZ_PORTS = (1000, 1001, 1002)


class Harness:
    """
    A registry on a fake reactor, and the connections a test opens to it:
    control-port channels and users of its public ports.  Like the real
    reactor, it delivers connectionLost to whatever a protocol closed.
    """

    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.settings = ServerSettings(listen="tcp:0", token=TOKEN, public_interface=HOST,
                                       first_frame_timeout=5.0, data_channel_timeout=7.0,
                                       heartbeat_timeout=11.0, max_waiting_users=4,
                                       auth_failure_delay_max=2.0)
        self.registry = TunnelRegistry(self.settings, self.clock)
        # Hypothesis replays an example to shrink it: its conn_ids must come
        # out the same every time, not from secrets.
        connectionIds = itertools.count(1)
        self.registry.newConnectionId = lambda: f"{next(connectionIds):016x}"
        self.channels: list[tuple[ServerChannel, StringTransport]] = []
        self.users: list[tuple[PublicUser, StringTransport]] = []
        self.lost: set[int] = set()
        self.rolesSeen: set[str] = set()
        self._ports = itertools.count(30000)

    def transport(self, host: str = FUZZ_HOST) -> StringTransport:
        return StringTransport(peerAddress=IPv4Address("TCP", host, next(self._ports)),
                               lenient=True)

    def connect(self, host: str = FUZZ_HOST) -> tuple[ServerChannel, StringTransport]:
        channel = ServerChannel(self.registry)
        transport = self.transport(host)
        channel.makeConnection(transport)
        self.channels.append((channel, transport))
        self.settle()
        return channel, transport

    def connectUser(self, index: int) -> None:
        """A user connects to one of the public ports listening now."""
        listening = [t for t in self.registry.tunnels.values() if t.online]
        if not listening:
            return
        tunnel = listening[index % len(listening)]
        user = PublicUser(tunnel)
        transport = self.transport("198.51.100.7")
        user.makeConnection(transport)
        self.users.append((user, transport))
        self.settle()

    def feed(self, index: int, data: bytes) -> None:
        live = [(c, t) for c, t in self.channels if id(c) not in self.lost]
        if not live:
            live = [self.connect()]
        channel, _ = live[index % len(live)]
        channel.dataReceived(data)
        self.rolesSeen.add(channel.role)
        self.settle()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.settle()

    def settle(self) -> None:
        """Deliver connectionLost to every protocol whose transport was closed."""
        again = True
        while again:
            again = False
            for protocol, transport in self.channels + self.users:
                if transport.disconnecting and id(protocol) not in self.lost:
                    self.lost.add(id(protocol))
                    protocol.connectionLost(Failure(ConnectionDone()))
                    again = True

    def closeAll(self) -> None:
        for protocol, transport in self.channels + self.users:
            transport.disconnecting = True
        self.settle()
        self.clock.advance(60)
        self.settle()

    def goodRegister(self, remote_port: int, host: str) -> list[dict]:
        """A fresh channel registers C{remote_port}; the frames it gets back."""
        channel, transport = self.connect(host)
        channel.dataReceived(jsonFrame(registerMessage(remote_port, f"good-{host}")))
        self.settle()
        return decodeFrames(transport.value())


def decodeFrames(data: bytes) -> list:
    import json

    frames = []
    while len(data) >= 4:
        length = int.from_bytes(data[:4], "big")
        frames.append(json.loads(data[4:4 + length]))
        data = data[4 + length:]
    return frames


def splitAt(data: bytes, cuts: list[int]) -> list[bytes]:
    """C{data} cut at the given offsets (taken modulo its length)."""
    if not data:
        return [data]
    points = sorted({c % len(data) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


jsonScalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=False), st.text(max_size=12))
jsonValues = st.recursive(jsonScalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
fuzzPorts = st.sampled_from(FUZZ_PORTS)
oddValues = st.one_of(jsonScalars, st.integers(-3, 70000), st.just("x" * (messages.MAX_STRING + 1)))


@st.composite
def validMessages(draw, waitingIds: list[str]) -> dict:
    """A well-formed client message, on the fuzz ports, mostly with the right token."""
    kind = draw(st.sampled_from(["register", "data_channel", "ping", "offline_port",
                                 "online_port"]))
    token = draw(st.sampled_from([TOKEN, TOKEN, TOKEN, "not-the-token"]))
    if kind == "register":
        return registerMessage(draw(fuzzPorts), draw(st.sampled_from(["a", "b"])), token=token)
    if kind == "data_channel":
        ids = [None, "f" * 16] + list(waitingIds) * 3
        return dataChannelMessage(draw(fuzzPorts), draw(st.sampled_from(ids)), token=token)
    if kind == "ping":
        return {"type": "ping", "time": draw(st.integers(0, 2**40))}
    return {"type": kind, "port": draw(fuzzPorts)}


@st.composite
def frames(draw, waitingIds: list[str]) -> bytes:
    """
    One frame: most often a valid message or one with a field broken,
    removed or added; otherwise any JSON, any bytes, or a length over the
    limit.
    """
    kind = draw(st.sampled_from(["valid", "valid", "valid", "mutated", "mutated", "json",
                                 "bytes", "length"]))
    if kind == "bytes":
        return frame(draw(st.binary(max_size=64)))
    if kind == "length":
        return draw(st.integers(64 * 1024 + 1, 2**32 - 1)).to_bytes(4, "big") + \
            draw(st.binary(max_size=16))
    if kind == "json":
        return jsonFrame(draw(jsonValues))
    message = draw(validMessages(waitingIds))
    if kind == "mutated":
        fields = sorted(message) + ["conn_id", "extra", "type"]
        field = draw(st.sampled_from(fields))
        change = draw(st.sampled_from(["set", "set", "remove"]))
        if change == "remove":
            message.pop(field, None)
        elif field == "type":
            message["type"] = draw(st.one_of(oddValues, st.sampled_from(
                ["register_resp", "pong", "open_data_channel", "unknown", "REGISTER"])))
        else:
            message[field] = draw(oddValues)
    return jsonFrame(message)


FUZZ_SETTINGS = settings(max_examples=200, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.data_too_large])


class ServerChannelPropertyTests(unittest.TestCase):
    """
    Whatever arrives on the control port, dataReceived returns normally,
    the registry stays consistent, and a good client can still register.
    """

    def setUp(self):
        self.failures: list[dict] = []

        def observe(event):
            if "log_failure" in event:
                self.failures.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def assertRecovers(self, harness: Harness) -> None:
        for role in sorted(harness.rolesSeen):
            event(f"a channel became {role}")
        if harness.users:
            event("users connected")
        # Another address registers while the hostile connections live...
        self.assertEqual(harness.goodRegister(GOOD_PORT, "192.0.2.10"),
                         [REGISTERED])
        harness.closeAll()
        registry = harness.registry
        self.assertEqual(registry.tunnels, {})
        self.assertEqual(registry.waitingUsers, {})
        self.assertEqual(registry.pending, {})
        self.assertEqual(registry.admission.clientHosts, {})
        self.assertEqual(len(registry.connections), 0)
        self.assertEqual(harness.clock.getDelayedCalls(), [])
        # ... and, once they are gone, the same address does too.
        self.assertEqual(harness.goodRegister(FUZZ_PORTS[0], FUZZ_HOST),
                         [REGISTERED])
        self.assertEqual(self.failures, [])

    @FUZZ_SETTINGS
    @given(st.one_of(st.binary(max_size=4096), st.lists(st.one_of(
        st.binary(max_size=64).map(frame), st.binary(max_size=8)), max_size=8).map(b"".join)),
        st.lists(st.integers(0, 4096), max_size=12))
    def test_randomBytes(self, data, cuts):
        """
        Random bytes (or random bodies behind plausible lengths), cut into
        random reads, on one connection.
        """
        harness = Harness()
        channel, transport = harness.connect()
        for chunk in splitAt(data, cuts):
            channel.dataReceived(chunk)
            harness.settle()
        self.assertRecovers(harness)

    @FUZZ_SETTINGS
    @given(st.data())
    def test_randomFrameSequences(self, data):
        """
        Random sequences of valid and invalid frames on several connections,
        cut into random reads, with users arriving and time passing between.
        """
        harness = Harness()
        for _ in range(data.draw(st.integers(1, 25), label="steps")):
            action = data.draw(st.sampled_from(
                ["new", "new", "new", "existing", "existing", "register", "user", "user",
                 "serve", "time", "heartbeats"]))
            if action == "register":
                harness.connect()
                harness.feed(-1, jsonFrame(registerMessage(
                    data.draw(fuzzPorts), data.draw(st.sampled_from(["a", "b"])))))
            elif action == "serve" and harness.registry.waitingUsers:
                # The right data channel for a waiting user, then anything at all.
                conn_id = data.draw(st.sampled_from(sorted(harness.registry.waitingUsers)))
                harness.connect()
                harness.feed(-1, jsonFrame(dataChannelMessage(FUZZ_PORTS[0], conn_id)) +
                             data.draw(st.binary(max_size=64)))
            elif action in ("new", "existing"):
                waiting = sorted(harness.registry.waitingUsers)
                stream = b"".join(data.draw(st.lists(frames(waiting), min_size=1, max_size=3)))
                if action == "new":
                    harness.connect()
                    index = -1
                else:
                    index = data.draw(st.integers(0, 10))
                cuts = data.draw(st.lists(st.integers(0, 10**4), max_size=4))
                for chunk in splitAt(stream, cuts):
                    harness.feed(index, chunk)
            elif action == "user":
                harness.connectUser(data.draw(st.integers(0, 10)))
            elif action == "time":
                harness.advance(data.draw(st.sampled_from([0.05, 0.5, 3.0, 6.0, 12.0])))
            else:
                harness.registry.checkHeartbeats()
                harness.settle()
        self.assertRecovers(harness)


class PendingTotalTests(unittest.TestCase):
    """max_pending_total with two addresses, which loopback sockets cannot give us."""

    def test_strangersRefusedClientsAdmitted(self):
        """
        Once idle connections from two addresses fill max_pending_total, a
        new connection from one of them is refused, while the registered
        client's address still gets its data channels in.
        """
        harness = Harness()
        harness.settings.max_pending_total = 4
        self.assertEqual(harness.goodRegister(GOOD_PORT, FUZZ_HOST),
                         [REGISTERED])
        for _ in range(2):
            harness.connect("192.0.2.1")
            harness.connect("192.0.2.2")
        self.assertEqual(harness.registry.pending, {"192.0.2.1": 2, "192.0.2.2": 2})
        stranger, transport = harness.connect("192.0.2.2")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(stranger.role, "closed")
        self.assertEqual(harness.registry.pending, {"192.0.2.1": 2, "192.0.2.2": 2})
        tunnel = harness.registry.tunnels[GOOD_PORT]
        harness.connectUser(0)
        [conn_id] = harness.registry.waitingUsers
        channel, transport = harness.connect(FUZZ_HOST)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(jsonFrame(dataChannelMessage(GOOD_PORT, conn_id)) + b"hello")
        self.assertEqual(channel.role, "data")
        self.assertEqual(decodeFrames(transport.value()),
                         [{"type": "register_resp", "status": "ok"}])
        self.assertEqual(harness.users[0][1].value(), b"hello")
        self.assertEqual(tunnel.waiting, {})
        harness.closeAll()


class RegisteredAddressCapTests(unittest.TestCase):
    """
    The address of a registered client gets room for the data channels its
    client owes (one per waiting user, and its pool) on top of the
    per-address cap, and no more.
    """

    def setUp(self):
        self.harness = Harness()
        settings = self.harness.settings
        settings.max_pending_per_source = 3
        settings.max_pending_total = 20
        settings.max_pool_count = 2
        settings.max_waiting_users = 10
        self.assertEqual(self.harness.goodRegister(GOOD_PORT, FUZZ_HOST),
                         [dict(REGISTERED, pool=2)])
        self.addCleanup(self.harness.closeAll)

    def idle(self, host: str, count: int) -> list[bool]:
        """Whether each of C{count} new idle connections from C{host} was refused."""
        return [transport.disconnecting
                for _, transport in (self.harness.connect(host) for _ in range(count))]

    def test_idleConnectionsOfARegisteredAddressAreCapped(self):
        """
        Idle connections from a registered client's address: its pool's two
        and the per-address three are held, the rest refused at once; they
        do not fill the global cap, and a stranger still gets in.
        """
        self.assertEqual(self.idle(FUZZ_HOST, 30), [False] * 5 + [True] * 25)
        self.assertEqual(self.harness.registry.pending, {FUZZ_HOST: 5})
        self.assertEqual(self.idle("198.51.100.2", 1), [False])

    def test_dataChannelsForWaitingUsersAreAdmitted(self):
        """
        With its per-address three idle connections held, the client still
        gets in a data channel for each of six waiting users, and its two
        pooled ones, all at once; one more connection is refused.
        """
        self.assertEqual(self.idle(FUZZ_HOST, 3), [False] * 3)
        for _ in range(6):
            self.harness.connectUser(0)
        waiting = sorted(self.harness.registry.waitingUsers)
        self.assertEqual(len(waiting), 6)
        channels = [self.harness.connect(FUZZ_HOST) for _ in range(8)]
        self.assertEqual([t.disconnecting for _, t in channels], [False] * 8)
        self.assertEqual(self.idle(FUZZ_HOST, 1), [True])
        for (channel, transport), conn_id in zip(channels, waiting):
            channel.dataReceived(jsonFrame(dataChannelMessage(GOOD_PORT, conn_id)))
            self.assertEqual(channel.role, "data")
        for channel, transport in channels[6:]:
            channel.dataReceived(jsonFrame(dict(dataChannelMessage(GOOD_PORT, None), pooled=True)))
            self.assertEqual(channel.role, "pooled")
        self.assertEqual(self.harness.registry.pending, {FUZZ_HOST: 3})


class GlobalCapFairnessTests(unittest.TestCase):
    """
    max_pending_total filled by a flood from many addresses: a new address
    still gets in, and IPv6 sources count by network.
    """

    def setUp(self):
        self.harness = Harness()
        self.addCleanup(self.harness.closeAll)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def flood(self, addresses: int, each: int) -> list[StringTransport]:
        return [self.harness.connect(f"203.0.113.{a}")[1]
                for _ in range(each) for a in range(1, addresses + 1)]

    def test_newAddressRegistersDuringAFlood(self):
        """
        64 addresses x 16 idle connections fill the 1024: a new address's
        connection closes the oldest of them (logged) and registers; the
        flooding addresses are still held to 16 each.
        """
        flood = self.flood(64, 16)
        self.assertEqual(sum(self.harness.registry.pending.values()), 1024)
        self.assertFalse(any(t.disconnecting for t in flood))
        self.assertEqual(self.harness.goodRegister(GOOD_PORT, "192.0.2.10"), [REGISTERED])
        self.assertEqual([t.disconnecting for t in flood[:2]], [True, False])
        [event] = [e for e in self.events if "to make room" in e.get("log_format", "")]
        self.assertEqual(event["held"], 16)
        self.assertEqual(sum(self.harness.registry.pending.values()), 1023)
        _, again = self.harness.connect("203.0.113.2")
        self.assertTrue(again.disconnecting)

    def test_addressesHoldingAsManyAreRefused(self):
        """
        Room is made only for an address that holds fewer than the one that
        holds the most: with four addresses holding one each, a second from
        one of them is refused, and nobody is closed.
        """
        self.harness.settings.max_pending_total = 4
        flood = self.flood(4, 1)
        _, again = self.harness.connect("203.0.113.1")
        self.assertTrue(again.disconnecting)
        self.assertFalse(any(t.disconnecting for t in flood))

    def test_registeredClientsDataChannelsAreNotClosed(self):
        """
        The data channels a registered client owes are never closed to make
        room: with its pool's eight on the way filling the cap, a stranger is
        refused instead.
        """
        self.harness.settings.max_pending_total = 8
        self.assertEqual(self.harness.goodRegister(GOOD_PORT, FUZZ_HOST), [REGISTERED])
        pooled = [self.harness.connect(FUZZ_HOST)[1] for _ in range(8)]
        _, stranger = self.harness.connect("198.51.100.2")
        self.assertTrue(stranger.disconnecting)
        self.assertFalse(any(t.disconnecting for t in pooled))

    def test_ipv6NetworkIsOneAddress(self):
        """
        Sixteen connections from different addresses of one /64 are its
        whole share; another network's address still gets in.
        """
        network = [self.harness.connect(f"2001:db8:1:2::{n:x}")[1] for n in range(1, 18)]
        self.assertEqual([t.disconnecting for t in network], [False] * 16 + [True])
        self.assertEqual(self.harness.registry.pending, {"2001:db8:1:2::/64": 16})
        _, other = self.harness.connect("2001:db8:1:3::1")
        self.assertFalse(other.disconnecting)

    def test_ipv6PrefixIsASetting(self):
        """With ipv6_prefix 128, each IPv6 address is its own."""
        self.harness.settings.ipv6_prefix = 128
        network = [self.harness.connect(f"2001:db8:1:2::{n:x}")[1] for n in range(1, 18)]
        self.assertFalse(any(t.disconnecting for t in network))

    def test_addressGroup(self):
        self.assertEqual(addressGroup("2001:db8::1", 64), "2001:db8::/64")
        self.assertEqual(addressGroup("2001:db8:0:0:ffff::1%eth0", 48), "2001:db8::/48")
        self.assertEqual(addressGroup("::ffff:192.0.2.1", 64), "192.0.2.1")
        self.assertEqual(addressGroup("192.0.2.1", 64), "192.0.2.1")
        self.assertEqual(addressGroup("?", 64), "?")


class AuthFailureTableTests(unittest.TestCase):
    """The back-off table is bounded by forgetting its least recent entries."""

    def setUp(self):
        self.clock = Clock()
        self.registry = TunnelRegistry(ServerSettings(token=TOKEN, auth_failure_delay_max=5.0),
                                       self.clock)

    def test_sprayDoesNotResetAGuesser(self):
        """
        A guesser that goes on guessing while 20,000 other addresses each
        fail once keeps its growing delay; the table never holds more than
        MAX_AUTH_FAILURE_SOURCES, and the sprayed addresses first in are the
        first forgotten.
        """
        delays = [self.registry.authenticationFailed("192.0.2.66") for _ in range(4)]
        self.assertEqual(delays, [0.0, 0.1, 0.2, 0.4])
        for n in range(20_000):
            self.registry.authenticationFailed(f"2001:db8:{n // 256:x}:{n % 256:x}::/64")
            self.assertLessEqual(len(self.registry.admission.authFailures),
                                 MAX_AUTH_FAILURE_SOURCES)
            if n % 1000 == 999:
                self.clock.advance(1)
                delays.append(self.registry.authenticationFailed("192.0.2.66"))
        self.assertEqual(delays[4:], [0.8, 1.6, 3.2] + [5.0] * 17)
        self.assertEqual(len(self.registry.admission.authFailures), MAX_AUTH_FAILURE_SOURCES)
        self.assertNotIn("2001:db8:0:0::/64", self.registry.admission.authFailures)
        self.assertIn("2001:db8:4e:1f::/64", self.registry.admission.authFailures)

    def test_forgottenAfterAMinute(self):
        """A failure more than 60 s after the last starts the count again."""
        self.registry.authenticationFailed("192.0.2.66")
        self.assertEqual(self.registry.authenticationFailed("192.0.2.66"), 0.1)
        self.clock.advance(61)
        self.assertEqual(self.registry.authenticationFailed("192.0.2.66"), 0.0)


class UsersGivingUpTests(ServerUnderAttack):
    """Users that leave while their client sends no data channel."""

    overrides = {"first_frame_timeout": 60.0, "data_channel_timeout": 60.0}
    registerGoodClient = False

    @defer.inlineCallbacks
    def test_closedWhileWaitingFreedAtOnce(self):
        """
        200 users of a client that never opens a data channel connect and
        close: the server lets every one go at once (they used to hold a
        descriptor each for the 60 s data channel timeout), and the
        server's descriptors are back where they were.
        """
        raw, public = yield self.rawControl("hung")
        registry = self.server.registry
        before = openFileDescriptors()
        users = []
        for _ in range(200):
            users.append((yield connectUser(self, public)))
        yield waitUntil(lambda: len(registry.waitingUsers) == 200, 20,
                        "the server to announce 200 users")
        self.assertGreaterEqual(openFileDescriptors(), before + 400)
        for user in users:
            user.transport.loseConnection()
        yield within(defer.gatherResults([user.closed for user in users]), 20, "users to close")
        yield waitUntil(lambda: not registry.waitingUsers and openFileDescriptors() <= before,
                        20, "the server to let the users go")
        self.assertEqual(len(raw.frames.items), 1 + 200)

    @defer.inlineCallbacks
    def test_earlyBytesHeldAreBounded(self):
        """
        50 waiting users that each send 256 KiB at once have the server hold
        less than twice MAX_EARLY_BYTES of it each (it reads them in small
        pieces and stops), not a 64 KiB read or more each.
        """
        raw, public = yield self.rawControl("hung")
        registry = self.server.registry
        users = []
        for _ in range(50):
            user = yield connectUser(self, public)
            user.transport.write(b"x" * 256 * 1024)
            users.append(user)

        def held() -> list[int]:
            return [user._heldBytes for user in registry.waitingUsers.values()]

        yield waitUntil(lambda: len(held()) == 50 and min(held()) >= MAX_EARLY_BYTES, 20,
                        "the server to read every user's first bytes")
        self.assertLess(max(held()), 2 * MAX_EARLY_BYTES)

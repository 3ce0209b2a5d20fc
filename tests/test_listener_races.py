"""
A public port's listener when a client changes its mind faster than a
socket closes: offline_port and online_port in one write, and the same
mapping registered again from two connections at once, over loopback,
where closing a listening socket takes a reactor turn.  Then, on a memory
reactor, online_port for a port that something else took meanwhile.
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import defer, error
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from gotunnel.server.publicport import PublicPort
from gotunnel.server.mapping import ONLINE_RETRY_DELAYS

from tests.support import (
    REGISTERED, LogWatcher, Tunnel, connectRaw, connectUser, freePort, jsonFrame,
    registerMessage, waitUntil, within,
)
from tests.test_server import ServerTestCase, jsonFrame as serverFrame, openDataChannel


def isOpenDataChannel(frame) -> bool:
    return isinstance(frame, dict) and frame.get("type") == "open_data_channel"


class ListenerRaceTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.logs = LogWatcher(self)
        self.tunnel = Tunnel(self)
        self.server = yield self.tunnel.startServer(first_frame_timeout=60.0)
        self.controlPort = self.tunnel.controlPort

    @defer.inlineCallbacks
    def register(self, public: int, name: str):
        raw = yield connectRaw(self, self.controlPort, jsonFrame(registerMessage(public, name)))
        [resp] = yield within(raw.whenFrame(), 15, "register_resp")
        self.assertEqual(resp, REGISTERED)
        return raw

    def whenLogged(self, what: str, public: int, count: int) -> defer.Deferred:
        return within(self.logs.whenMatched(
            LogWatcher.formatted(f"public port {{remote_port}} {what}", remote_port=public),
            count), 15, f"public port {public} {what} ({count})")

    @defer.inlineCallbacks
    def assertAccepts(self, public: int, control) -> defer.Deferred:
        """A user of C{public} is accepted and announced on C{control}."""
        announced = len(control.frames.matching(isOpenDataChannel))
        user = yield within(connectUser(self, public), 15, f"a user of port {public}")
        yield within(control.whenFrame(isOpenDataChannel, announced + 1), 15,
                     "open_data_channel for the user")
        user.transport.abortConnection()
        yield user.closed

    def portMessage(self, kind: str, public: int) -> bytes:
        return jsonFrame({"type": kind, "port": public})

    @defer.inlineCallbacks
    def test_offlineOnlineTwiceInOneWrite(self):
        """
        offline_port, online_port, offline_port, online_port in one write end
        with the port listening (one listener, opened after the old one
        closed), and a later offline_port / online_port still work.
        """
        public = freePort()
        control = yield self.register(public, "flappy")
        yield self.whenLogged("listening", public, 1)
        control.transport.write(b"".join(self.portMessage(kind, public) for kind in (
            "offline_port", "online_port", "offline_port", "online_port")))
        yield self.whenLogged("stopped", public, 1)
        yield self.whenLogged("listening", public, 2)
        yield self.assertAccepts(public, control)
        self.assertEqual(self.logs.matching(LogWatcher.formatted("cannot listen")), [])

        control.transport.write(self.portMessage("offline_port", public))
        yield self.whenLogged("stopped", public, 2)
        control.transport.write(self.portMessage("online_port", public))
        yield self.whenLogged("listening", public, 3)
        yield self.assertAccepts(public, control)

    @defer.inlineCallbacks
    def test_twoRegistersAtOnce(self):
        """
        Two connections registering the same name and port in the same turn
        (the first registration still up) end with exactly one listener,
        serving whichever came last; the other connection is closed.  Run a
        few times, as the order in which the server reads them varies.
        """
        for attempt in range(6):
            public = freePort()
            name = f"twice-{attempt}"
            first = yield self.register(public, name)
            a = yield connectRaw(self, self.controlPort)
            b = yield connectRaw(self, self.controlPort)
            message = jsonFrame(registerMessage(public, name))
            a.transport.write(message)
            b.transport.write(message)
            yield within(first.closed, 15, "the first registration to be replaced")

            def settled():
                answered = [raw for raw in (a, b)
                            if REGISTERED in raw.frames.items and not raw.closed.called]
                return (len(answered) == 1 and all(raw.closed.called for raw in (a, b)
                                                   if raw is not answered[0])
                        and answered)

            [winner] = yield waitUntil(settled, 15, "one registration to win")
            tunnel = self.server.registry.tunnels[public]
            self.assertEqual(tunnel.channel.transport.getPeer().port, winner.localPort)
            self.assertIs(self.server.registry.publicPorts[public].owner, tunnel)
            yield self.assertAccepts(public, winner)
            winner.transport.loseConnection()
            yield winner.closed


class SlowlyClosingEndpoint:
    """
    A public port's endpoint whose listeners close only when the test says
    so, and which cannot bind while one is still open, as a real port.
    """

    def __init__(self) -> None:
        self.bound: list[object] = []
        self.closing: list[tuple[object, defer.Deferred]] = []
        self.listens = 0

    def listen(self, factory) -> defer.Deferred:
        if self.bound:
            return defer.fail(error.CannotListenError(
                "", 10022, OSError(98, "Address already in use")))
        self.listens += 1
        listener = SimpleNamespace(factory=factory, stopListening=None)
        listener.stopListening = lambda: self._close(listener)
        self.bound.append(listener)
        return defer.succeed(listener)

    def _close(self, listener) -> defer.Deferred:
        closed: defer.Deferred = defer.Deferred()
        self.closing.append((listener, closed))
        return closed

    def finishClosing(self) -> None:
        closing, self.closing = self.closing, []
        for listener, closed in closing:
            self.bound.remove(listener)
            closed.callback(None)


class PublicPortTests(unittest.TestCase):
    """L{PublicPort}'s steps, one at a time, with listeners that close when told."""

    def setUp(self):
        self.endpoint = SlowlyClosingEndpoint()
        self.tracked: list[defer.Deferred] = []
        self.idle: list[PublicPort] = []
        self.port = PublicPort(self.endpoint, 10022, self.tracked.append, self.idle.append)

    def tunnel(self, name: str):
        return SimpleNamespace(name=name, factory=object())

    def test_changesOfMindWhileClosing(self):
        """
        stop, listen, stop, listen while the first listener still closes:
        nothing is bound until it has closed, then one listener opens, and
        every listen is answered True.
        """
        tunnel = self.tunnel("a")
        self.assertTrue(self.successResultOf(self.port.listen(tunnel, tunnel.factory)))
        stopped = self.port.stop(tunnel)
        answers = [self.port.listen(tunnel, tunnel.factory), self.port.stop(tunnel),
                   self.port.listen(tunnel, tunnel.factory)]
        self.assertEqual(self.endpoint.listens, 1)
        self.assertNoResult(stopped)
        self.endpoint.finishClosing()
        self.assertEqual(self.endpoint.listens, 2)
        self.assertEqual([self.successResultOf(d) for d in answers], [True, None, True])
        self.assertIs(self.port.owner, tunnel)
        self.assertEqual(len(self.endpoint.bound), 1)
        self.assertEqual(self.idle, [])

    def test_lastRegistrationWins(self):
        """
        Two tunnels take the port over while its first listener closes: the
        one asked for last gets it, the other is answered False, and only
        one listener is ever bound at a time.
        """
        first, second, third = (self.tunnel(name) for name in "abc")
        self.successResultOf(self.port.listen(first, first.factory))
        self.port.stop(first)
        secondListens = self.port.listen(second, second.factory)
        self.port.stop(second)
        thirdListens = self.port.listen(third, third.factory)
        self.endpoint.finishClosing()
        self.assertFalse(self.successResultOf(secondListens))
        self.assertTrue(self.successResultOf(thirdListens))
        self.assertIs(self.port.owner, third)
        self.assertIs(self.endpoint.bound[0].factory, third.factory)

    def test_idleOnceClosed(self):
        """The port says it is idle once closed and asked for by nobody; shutdown waits for it."""
        tunnel = self.tunnel("a")
        self.port.listen(tunnel, tunnel.factory)
        stopped = self.port.stop(tunnel)
        self.assertEqual(self.idle, [])
        self.assertEqual([d.called for d in self.tracked], [True, False])
        self.endpoint.finishClosing()
        self.successResultOf(stopped)
        self.assertEqual(self.idle, [self.port])
        self.assertTrue(all(d.called for d in self.tracked))


class BusyPortTests(ServerTestCase):
    """online_port when the public port cannot be bound: tried again, with a bound."""

    def setUp(self):
        super().setUp()
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.control = self.registered()
        self.control.send(serverFrame(type="offline_port", port=10022))
        self.reactor.portsInUse.add(10022)

    def cannotListen(self) -> list[dict]:
        return [e for e in self.events
                if e.get("log_format", "").startswith("cannot listen on public port")]

    def test_onlineRetried(self):
        """
        A failed listen after online_port is logged and tried again after a
        growing delay; once the port is free it listens and serves users.
        """
        self.control.send(serverFrame(type="online_port", port=10022))
        self.assertEqual(self.listening(10022), [])
        [first] = self.cannotListen()
        self.assertEqual(first["log_level"], LogLevel.warn)
        self.assertEqual(formatEvent(first), "cannot listen on public port 10022 again: "
                         "[Errno 98] Address already in use; trying again in 1 s")
        self.reactor.advance(1)
        self.assertEqual([e["delay"] for e in self.cannotListen()], [1, 2])
        self.reactor.portsInUse.clear()
        self.reactor.advance(1.9)
        self.assertEqual(self.listening(10022), [])
        self.reactor.advance(0.1)
        self.assertEqual(len(self.listening(10022)), 1)
        self.connectUser()
        self.assertEqual(self.control.sent(), openDataChannel("conn-1"))

    def test_retriesBounded(self):
        """
        After the last retry the server gives up (logged as an error) and
        the mapping is offline: a later online_port tries again at once.
        """
        self.control.send(serverFrame(type="online_port", port=10022))
        for delay in ONLINE_RETRY_DELAYS:
            self.reactor.advance(delay)
        attempts = len(ONLINE_RETRY_DELAYS) + 1
        self.assertEqual(len(self.cannotListen()), attempts)
        last = self.cannotListen()[-1]
        self.assertEqual(last["log_level"], LogLevel.error)
        self.assertEqual(last["attempts"], attempts)
        self.reactor.advance(600)
        self.assertEqual(len(self.cannotListen()), attempts)
        self.assertFalse(self.registry.tunnels[10022].online)
        self.reactor.portsInUse.clear()
        self.control.send(serverFrame(type="online_port", port=10022))
        self.assertEqual(len(self.listening(10022)), 1)

    def test_offlineStopsRetrying(self):
        """offline_port while a retry waits cancels it."""
        self.control.send(serverFrame(type="online_port", port=10022))
        self.control.send(serverFrame(type="offline_port", port=10022))
        self.reactor.portsInUse.clear()
        self.reactor.advance(60)
        self.assertEqual(len(self.cannotListen()), 1)
        self.assertEqual(self.listening(10022), [])

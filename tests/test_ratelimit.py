"""
Bandwidth caps: the rate syntax, the token bucket and the throttle on a
Clock, and a capped mapping over loopback that takes as long as its cap says.
"""

from __future__ import annotations

import os
import time

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from gotunnel.wire import messages
from gotunnel.config.mappings import Mapping
from gotunnel.config.settings import ClientPolicy
from gotunnel.config.yamlfile import readConfigFile
from gotunnel.relay.ratelimit import Throttle, TokenBucket, parseRate
from gotunnel.cli.tap import ServerOptions
from tests.support import HOST, Tunnel, connectUser, freePort, listenTarget, within

TIMEOUT = 60


class ParseRateTests(unittest.TestCase):
    def test_units(self):
        for text, rate in [("10MB", 10_000_000), ("512 KiB", 524_288), ("1.5GB", 1_500_000_000),
                           ("2048", 2048), (4096, 4096), ("50MB/s", 50_000_000), ("1GiB", 2**30),
                           ("0", 0)]:
            self.assertEqual(parseRate(text, "x"), rate, text)

    def test_bad(self):
        for text in ("fast", "10XB", "-1MB", True, ""):
            with self.assertRaises(ValueError) as raised:
                parseRate(text, "client.tunnels[0].bandwidth_limit")
            self.assertIn("client.tunnels[0].bandwidth_limit must be a rate like 10MB",
                          str(raised.exception))

    def test_settings(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("server:\n  token: t\n  bandwidth_limit: 100MB\n"
                    "  clients:\n    alice: {token: a, bandwidth_limit: 1MB}\n"
                    "client:\n  tunnels:\n    - {local_port: 1, remote_port: 2, "
                    "bandwidth_limit: 10MB}\n")
        config = readConfigFile(path)
        values = config.serverValues()
        self.assertEqual(values["bandwidth_limit"], 100_000_000)
        self.assertEqual(values["clients"]["alice"].bandwidth_limit, 1_000_000)
        self.assertEqual(config.clientValues()["mappings"][0].bandwidth_limit, 10_000_000)
        options = ServerOptions()
        options.parseOptions(["--token", "t", "--bandwidth-limit", "5MiB", "--config", os.devnull])
        self.assertEqual(options.settings().bandwidth_limit, 5 * 2**20)

    def test_wire(self):
        msg = messages.parse(b'{"type":"register","bandwidth_limit":1000}')
        self.assertEqual(msg.bandwidth_limit, 1000)
        with self.assertRaises(messages.ProtocolError):
            messages.parse(b'{"type":"register","bandwidth_limit":-1}')


class TokenBucketTests(unittest.TestCase):
    def test_debt(self):
        clock = Clock()
        bucket = TokenBucket(clock, 1000, burst=100)
        self.assertEqual(bucket.take(100), 0)
        self.assertEqual(bucket.take(500), 0.5)
        clock.advance(0.5)
        self.assertEqual(bucket.take(0), 0)
        clock.advance(10)
        self.assertEqual(bucket.take(100), 0)
        self.assertAlmostEqual(bucket.take(1), 0.001)


class FakeTransport:
    def __init__(self):
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self):
        self.paused += 1

    def resumeProducing(self):
        self.resumed += 1


class FakeEnd:
    _readClosed = False
    peer = object()
    """Spliced (see gotunnel.relay.splice.RelayEnd.peer)."""

    def __init__(self):
        self.transport = FakeTransport()


class ThrottleTests(unittest.TestCase):
    def test_pausesUntilPaid(self):
        clock = Clock()
        throttle = Throttle(clock, 100_000)
        a, b = FakeEnd(), FakeEnd()
        throttle.passed(a, 16 * 1024)
        self.assertEqual(a.transport.paused, 0)
        throttle.passed(a, 50_000)
        throttle.passed(b, 10)
        self.assertEqual((a.transport.paused, b.transport.paused), (1, 1))
        throttle.passed(a, 10)
        self.assertEqual(a.transport.paused, 1)
        clock.advance(0.4)
        self.assertEqual(a.transport.resumed, 0)
        clock.advance(0.2)
        self.assertEqual((a.transport.resumed, b.transport.resumed), (1, 1))
        self.assertEqual(len(throttle), 0)

    def test_forget(self):
        clock = Clock()
        throttle = Throttle(clock, 1000)
        end = FakeEnd()
        throttle.passed(end, 100_000)
        throttle.forget(end)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_noReadAfterEndOfStream(self):
        clock = Clock()
        throttle = Throttle(clock, 1000)
        end = FakeEnd()
        throttle.passed(end, 100_000)
        end._readClosed = True
        clock.advance(1000)
        self.assertEqual(end.transport.resumed, 0)

    def test_noResumeOfAnEndNoLongerSpliced(self):
        """
        A throttle never resumes an end that lost its splice: whatever
        pauses it then (a waiting user's early-bytes bound) keeps it paused.
        """
        clock = Clock()
        throttle = Throttle(clock, 1000)
        end = FakeEnd()
        throttle.passed(end, 100_000)
        end.peer = None
        clock.advance(1000)
        self.assertEqual(end.transport.resumed, 0)


class CappedMappingTests(unittest.TestCase):
    @defer.inlineCallbacks
    def echoTime(self, size: int, mapping: dict = {}, **server):
        tunnel = Tunnel(self)
        yield tunnel.startServer(**server)
        target = listenTarget(self)
        remote = freePort()
        client = tunnel.startClient(target, mappings=[Mapping(HOST, target, remote, **mapping)],
                                    name="alice", token=server.get("clients", {}).get(
                                        "alice", ClientPolicy("test-token")).token)
        yield within(client.tunnels[0].whenRegistered(), TIMEOUT, "registration")
        user = yield connectUser(self, remote)
        payload = os.urandom(size)
        started = time.monotonic()
        user.transport.write(payload)
        received = yield within(user.whenReceived(size), TIMEOUT, "the echo")
        elapsed = time.monotonic() - started
        self.assertEqual(received, payload)
        return elapsed

    @defer.inlineCallbacks
    def test_clientAsksForACap(self):
        """300 kB each way under a 200 kB/s cap take at least (300 kB - a burst) / 200 kB/s."""
        elapsed = yield self.echoTime(300_000, {"bandwidth_limit": 200_000})
        self.assertGreater(elapsed, (300_000 - 16 * 1024) / 200_000 * 0.95)

    @defer.inlineCallbacks
    def test_serverCapWinsOverAWiderAsk(self):
        elapsed = yield self.echoTime(200_000, {"bandwidth_limit": 10**9},
                                      bandwidth_limit=200_000)
        self.assertGreater(elapsed, (200_000 - 16 * 1024) / 200_000 * 0.95)

"""
C{python -m gotunnel demo}: the page comes through the tunnel, in this
process and as the command a person runs, and everything stops cleanly.
"""

from __future__ import annotations

import re
import sys

from twisted.internet import defer, reactor
from twisted.python import usage
from twisted.trial import unittest

from gotunnel.cli import demo as demoModule
from gotunnel.cli.demo import Demo, DemoOptions, PublicPortUnavailable, hostForURL, startDemo
from tests.support import (
    connectUser, connectionRefused, spawn, startTarget, temporaryDirectory, within,
)

TIMEOUT = 30.0
PAGE_TEXT = b"This page came through gotunnel."
URL_LINE = re.compile(r"^Public URL: http://127\.0\.0\.1:(\d+)/\n", re.M)


@defer.inlineCallbacks
def fetchPage(testCase, port: int):
    """The whole HTTP/1.0 response from 127.0.0.1:C{port}, once the server has closed."""
    user = yield connectUser(testCase, port)
    user.transport.write(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    response = yield within(user.closed, TIMEOUT, f"the page from port {port}")
    return response


class DemoTests(unittest.TestCase):
    """The demo started in this process, as tests and embedders start it."""

    @defer.inlineCallbacks
    def test_pageComesThroughTheTunnel(self):
        """
        The page is served on the public URL; after stop() the public port,
        the control port and the page's own port are all closed.
        """
        demo = yield startDemo(reactor, 0)
        self.addCleanup(demo.stop)
        ports = {"public": demo.publicPort,
                 "control": demo.server.controlPort.getHost().port,
                 "web page": demo.webPort.getHost().port}
        self.assertEqual(demo.url, f"http://127.0.0.1:{demo.publicPort}/")

        response = yield fetchPage(self, demo.publicPort)
        self.assertTrue(response.startswith(b"HTTP/1.0 200 OK\r\n"), response[:80])
        self.assertIn(PAGE_TEXT, response)

        yield demo.stop()
        for name, port in ports.items():
            refused = yield connectionRefused(port)
            self.assertTrue(refused, f"the {name} port {port} is still open after stop()")

    @defer.inlineCallbacks
    def test_busyPort(self):
        """A public port someone else holds fails the start, saying so."""
        busy = startTarget(self).port
        failure = yield self.assertFailure(startDemo(reactor, busy), PublicPortUnavailable)
        self.assertEqual(str(failure), f"port {busy} is busy on 127.0.0.1; choose another "
                                       "with --port N, or --port 0 for any free port")

    @defer.inlineCallbacks
    def test_portTakenAfterTheCheck(self):
        """
        If another program takes the public port between the check and the
        server's listen, the start gives up after registrationTimeout
        instead of retrying for ever, and stops what it started.
        """
        busy = startTarget(self).port
        self.patch(demoModule, "claimablePort", lambda interface, port: port)
        demo = Demo(reactor, busy)
        demo.registrationTimeout = 0.5
        yield self.assertFailure(demo.start(), defer.TimeoutError)
        self.assertEqual((demo.client, demo.server, demo.webPort), (None, None, None))


class DemoOptionsTests(unittest.TestCase):
    def parse(self, *argv: str) -> DemoOptions:
        options = DemoOptions()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self):
        options = self.parse()
        self.assertEqual((options["port"], options["public-interface"]), (8080, "127.0.0.1"))

    def test_choices(self):
        options = self.parse("--port", "0", "--public-interface", "0.0.0.0")
        self.assertEqual((options["port"], options["public-interface"]), (0, "0.0.0.0"))

    def test_badPort(self):
        for text in ("65536", "-1", "http"):
            e = self.assertRaises(usage.UsageError, self.parse, "--port", text)
            self.assertIn("--port must be a number from 0 to 65535", str(e))

    def test_badInterface(self):
        e = self.assertRaises(usage.UsageError, self.parse, "--public-interface", "lan")
        self.assertIn("must be an IP address", str(e))

    def test_urlHost(self):
        """Wildcard interfaces are reached through loopback; IPv6 goes in brackets."""
        self.assertEqual([hostForURL(i) for i in ("127.0.0.1", "0.0.0.0", "::", "::1")],
                         ["127.0.0.1", "127.0.0.1", "[::1]", "[::1]"])


class DemoCommandTests(unittest.TestCase):
    """C{python -m gotunnel demo} as a person runs it."""

    def spawnDemo(self, *args: str):
        # Output goes to a pipe without PYTHONUNBUFFERED, as with "| tee":
        # the demo itself must make its lines appear at once.
        return spawn(self, [sys.executable, "-m", "gotunnel", "demo", *args],
                     cwd=temporaryDirectory(self), env={"PYTHONUNBUFFERED": ""})

    @defer.inlineCallbacks
    def test_servesUntilSIGINT(self):
        """
        It prints the public URL, serves the page there, and on SIGINT
        stops cleanly with exit code 0.
        """
        child = self.spawnDemo("--port", "0")
        found = yield within(child.whenOutput(URL_LINE, fds=(1,)), TIMEOUT, "the public URL")
        self.assertIn("Press Ctrl-C to stop.", child.stdout)

        response = yield fetchPage(self, int(found.group(1)))
        self.assertIn(PAGE_TEXT, response)

        child.sendSignal("INT")
        yield within(child.ended, TIMEOUT, "the demo to exit after SIGINT")
        self.assertEqual(child.exitCode, 0, child.describe())
        self.assertNotIn("Traceback", child.stdout + child.stderr)
        self.assertIn("gotunnel demo stopped.", child.stdout)

    @defer.inlineCallbacks
    def test_busyPortExitsWith2(self):
        """A busy --port is one line on standard error and exit code 2."""
        busy = startTarget(self).port
        child = self.spawnDemo("--port", str(busy))
        yield within(child.ended, TIMEOUT, "the demo to exit")
        self.assertEqual(child.exitCode, 2, child.describe())
        self.assertEqual(child.stderr, f"gotunnel demo: error: port {busy} is busy on 127.0.0.1; "
                                       "choose another with --port N, or --port 0 for any free "
                                       "port\n")

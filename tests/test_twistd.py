"""
The three entry points as a person runs them: twistd plugins and console
scripts in real child processes, each in a temporary directory, their
output read as it arrives.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import sys

from twisted.internet import defer
from twisted.trial import unittest

from tests.support import (
    connectUser, connectionRefused, freePort, listenTarget, randomBytes, spawn,
    temporaryDirectory, venvScript, within,
)

TWISTD = venvScript("twistd")
SERVER_SCRIPT = venvScript("gotunnel-server")
CLIENT_SCRIPT = venvScript("gotunnel-client")

LISTENING = re.compile(r"control channel listening on 127\.0\.0\.1:(\d+)")
RAISED = re.compile(r"open-file limit raised from (\d+) to (\d+)")
AUTH_FAILED_LINE = "[ERROR][1002] Authentication failed, please check token"
START_TIMEOUT = 60
EXIT_TIMEOUT = 30


def newToken(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(12)}"


class ProcessTestCase(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.cwd = temporaryDirectory(self)

    def spawn(self, *argv: str):
        return spawn(self, list(argv), self.cwd)

    @defer.inlineCallbacks
    def startServer(self, token: str):
        """twistd running gotunnel-server on a control port the OS picks; returns (child, port)."""
        server = self.spawn(TWISTD, "-n", "--pidfile=", "gotunnel-server",
                            "--listen", "tcp:0:interface=127.0.0.1",
                            "--public-interface", "127.0.0.1", "--token", token)
        found = yield within(server.whenOutput(LISTENING, (1,)), START_TIMEOUT,
                             "the server's 'listening' line")
        return server, int(found.group(1))

    @defer.inlineCallbacks
    def terminate(self, *children):
        """
        SIGTERM each child; each shuts its reactor down and exits without a
        traceback.  twistd, once shut down, ends itself with the signal it
        received (so that its parent sees why it stopped); the console
        scripts exit with status 0.
        """
        for child in children:
            child.sendSignal("TERM")
        for child in children:
            yield within(child.ended, EXIT_TIMEOUT, f"{child.argv[0]} to exit after SIGTERM")
            if child.argv[0] == TWISTD:
                self.assertEqual((child.exitCode, child.signal), (None, signal.SIGTERM),
                                 child.describe())
                self.assertIn("Server Shut Down.", child.stdout, child.describe())
            else:
                self.assertEqual((child.exitCode, child.signal), (0, None), child.describe())
            self.assertIn("Main loop terminated.", child.stdout, child.describe())
            self.assertNotIn("Traceback", child.stdout + child.stderr, child.describe())
            self.assertNotIn("Unhandled", child.stdout + child.stderr, child.describe())

    def assertNoSecret(self, token: str, *children):
        for child in children:
            self.assertNotIn(token, child.stdout + child.stderr, f"the token leaked:\n"
                             f"{child.describe()}")


class TwistdPluginTests(ProcessTestCase):
    @defer.inlineCallbacks
    def test_helpListsPlugins(self):
        """C{twistd --help} lists both plugins."""
        child = self.spawn(TWISTD, "--help")
        yield within(child.ended, START_TIMEOUT, "twistd --help to exit")
        self.assertEqual(child.exitCode, 0, child.describe())
        self.assertIn("gotunnel-server", child.stdout)
        self.assertIn("gotunnel-client", child.stdout)

    @defer.inlineCallbacks
    def test_tunnelThroughTwistd(self):
        """
        A server and a client run by twistd carry 256 KiB both ways to a
        service in this process, stop cleanly on SIGTERM, never print the
        token, and leave no files behind.  Plain, they never load
        cryptography (pyOpenSSL is left out, see gotunnel.cli.footprint).
        """
        token = newToken("secret")
        server, controlPort = yield self.startServer(token)
        target = listenTarget(self)
        public = freePort()
        client = self.spawn(TWISTD, "-n", "--pidfile=", "gotunnel-client",
                            "--server", f"tcp:127.0.0.1:{controlPort}", "--token", token,
                            "--name", "twistd-test", "--map", f"{target}:{public}")
        yield within(client.whenOutput(f"registered 127.0.0.1:{target}->{public}", (1,)),
                     START_TIMEOUT, "the client's 'registered' line")
        yield within(server.whenOutput("client twistd-test registered", (1,)),
                     START_TIMEOUT, "the server's 'registered' line")

        payload = randomBytes(256 * 1024)
        user = yield connectUser(self, public)
        user.transport.write(payload)
        received = yield within(user.whenReceived(len(payload)), 30, "the echo of 256 KiB")
        self.assertEqual(received, payload)
        user.transport.loseConnection()
        yield within(user.closed, 15, "the user's connection to close")

        for child in (server, client):
            with open(f"/proc/{child.transport.pid}/maps") as maps:
                self.assertNotIn("/cryptography/", maps.read(), child.describe())
        yield self.terminate(client, server)
        self.assertTrue((yield connectionRefused(public)))
        self.assertNoSecret(token, server, client)
        self.assertEqual(os.listdir(self.cwd), [])


class OpenFileLimitTests(ProcessTestCase):
    @defer.inlineCallbacks
    def test_serverRaisesItsOpenFileLimit(self):
        """
        twistd started with a soft limit of 256 open files (the server would
        run out at about 40 zero-copy connections) raises it and says so.
        """
        lowered = ("import os, resource, sys; "
                   "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
                   "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
                   "os.execv(sys.argv[1], sys.argv[1:])")
        server = self.spawn(sys.executable, "-c", lowered, TWISTD, "-n", "--pidfile=",
                            "gotunnel-server", "--listen", "tcp:0:interface=127.0.0.1",
                            "--token", newToken("secret"))
        raised = yield within(server.whenOutput(RAISED, (1,)), START_TIMEOUT,
                              "the server's 'open-file limit raised' line")
        yield within(server.whenOutput(LISTENING, (1,)), START_TIMEOUT,
                     "the server's 'listening' line")
        self.assertEqual(raised.group(1), "256")
        with open(f"/proc/{server.transport.pid}/limits") as limits:
            soft = next(line for line in limits if line.startswith("Max open files")).split()[3]
        self.assertEqual(soft, raised.group(2))
        self.assertGreater(int(soft), 256)


class ConsoleScriptUsageTests(ProcessTestCase):
    """Bad options: one clear line on standard error, exit status 2, no traceback."""

    @defer.inlineCallbacks
    def assertUsageError(self, argv: list[str], mentions: str):
        child = self.spawn(*argv)
        # A process that accepted its options starts logging on stdout: do
        # not wait for it to exit.
        yield within(defer.DeferredList([child.ended, child.whenOutput(re.compile(r"\S"), (1,))],
                                        fireOnOneCallback=True, consumeErrors=True),
                     START_TIMEOUT, f"{argv[0]} to exit or to start")
        self.assertFalse(child.running, f"it started instead of refusing its options:\n"
                         f"{child.describe()}")
        self.assertEqual(child.exitCode, 2, child.describe())
        self.assertNotIn("Traceback", child.stderr, child.describe())
        self.assertEqual(child.stdout, "", child.describe())
        lines = child.stderr.splitlines()
        name = os.path.basename(argv[0])
        # The error, then at most a hint to read --help.
        self.assertTrue(lines[0].startswith(f"{name}: error: "), child.describe())
        self.assertIn(mentions, lines[0])
        self.assertLessEqual(len(lines), 2, child.describe())
        self.assertTrue(all("--help" in line for line in lines[1:]), child.describe())

    def test_serverWithoutToken(self):
        return self.assertUsageError(
            [SERVER_SCRIPT, "--listen", "tcp:0:interface=127.0.0.1"], "--token")

    def test_clientWithoutToken(self):
        return self.assertUsageError([CLIENT_SCRIPT, "--map", "22:10022"], "--token")

    def test_clientWithoutMap(self):
        return self.assertUsageError([CLIENT_SCRIPT, "--token", "t"], "--map")

    def test_clientBadMap(self):
        return self.assertUsageError([CLIENT_SCRIPT, "--token", "t", "--map", "abc"], "'abc'")

    def test_clientMapHostIsANumber(self):
        """8000:18000:1 is a port too many, not host "8000" (issue 16)."""
        return self.assertUsageError(
            [CLIENT_SCRIPT, "--token", "t", "--map", "8000:18000:1"], "'8000' is a number")

    def test_clientRemotePortOutOfRange(self):
        return self.assertUsageError(
            [CLIENT_SCRIPT, "--token", "t", "--map", "22:70000"], "70000")

    def test_clientLocalPortOutOfRange(self):
        return self.assertUsageError(
            [CLIENT_SCRIPT, "--token", "t", "--map", "70000:10022"], "70000")

    def test_serverListenPortOutOfRange(self):
        return self.assertUsageError(
            [SERVER_SCRIPT, "--token", "t", "--listen", "tcp:70000:interface=127.0.0.1"],
            "70000")

    def test_serverListenNotAnEndpoint(self):
        return self.assertUsageError(
            [SERVER_SCRIPT, "--token", "t", "--listen", "tcp:abc"], "tcp:abc")

    def test_clientServerNotAnEndpoint(self):
        return self.assertUsageError(
            [CLIENT_SCRIPT, "--token", "t", "--map", "22:10022", "--server", "nonsense:1"],
            "nonsense:1")

    def test_clientServerPortOutOfRange(self):
        return self.assertUsageError(
            [CLIENT_SCRIPT, "--token", "t", "--map", "22:10022",
             "--server", "tcp:127.0.0.1:70000"], "70000")


class WrongTokenTests(ProcessTestCase):
    @defer.inlineCallbacks
    def test_wrongTokenReportedAndNeverPrinted(self):
        """
        The real client with a wrong token prints the Go client's 1002 line
        on standard error; neither process prints either token.
        """
        token, wrong = newToken("right"), newToken("wrong")
        server, controlPort = yield self.startServer(token)
        target = listenTarget(self)
        public = freePort()
        client = self.spawn(CLIENT_SCRIPT, "--server", f"tcp:127.0.0.1:{controlPort}",
                            "--token", wrong, "--name", "wrong-client",
                            "--map", f"{target}:{public}")
        yield within(client.whenOutput(AUTH_FAILED_LINE, (2,)), START_TIMEOUT,
                     "the client's [ERROR][1002] line")
        yield within(server.whenOutput("refused registration", (1,)), START_TIMEOUT,
                     "the server's refusal line")
        # Behind the time, as the client's log lines have it.
        self.assertRegex(client.stderr.splitlines()[0],
                         r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} "
                         + re.escape(AUTH_FAILED_LINE) + "$")
        self.assertTrue((yield connectionRefused(public)))

        yield self.terminate(client, server)
        self.assertNoSecret(token, server, client)
        self.assertNoSecret(wrong, server, client)
        self.assertEqual(os.listdir(self.cwd), [])

"""
config.yaml as a person uses it: the console scripts and twistd in child
processes, each in a temporary directory.  A bad file stops a process
before its reactor runs, with one line that names the file and the key;
Go gotunnel config files run our server and client; the log level decides
what they print.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess

from twisted.internet import defer
from twisted.trial import unittest

from tests.support import (
    connectionRefused, echoedThrough, freePort, listenTarget, randomBytes, retryUntil, spawn,
    temporaryDirectory, venvScript, within,
)

TWISTD = venvScript("twistd")
SERVER_SCRIPT = venvScript("gotunnel-server")
CLIENT_SCRIPT = venvScript("gotunnel-client")
EXIT_TIMEOUT = 60
START_TIMEOUT = 60
TWO_1001_ERRORS = re.compile(r"\[ERROR\]\[1001\][\s\S]*\[ERROR\]\[1001\]")
STAMPED_1001 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[ERROR\]\[1001\] "
                          r"Failed to connect to server 127\.0\.0\.1:\d+: \S")


def write(directory: str, text: str, name: str = "config.yaml") -> str:
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def runToExit(argv: list[str], cwd: str) -> subprocess.CompletedProcess:
    """
    Run C{argv} in C{cwd} and wait for it to exit; one that runs on (it
    accepted its configuration) is killed at the timeout and fails the test.
    """
    try:
        return subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{argv} did not exit: it accepted its configuration\n"
                             f"{e.stdout}\n{e.stderr}") from None


class BadConfigTests(unittest.TestCase):
    """A bad config file: one line on standard error naming file and key, exit status 2."""

    def setUp(self):
        self.cwd = temporaryDirectory(self)

    def assertRefused(self, script: str, config: str, line: str, argv=()):
        """C{script}, run where ./config.yaml holds C{config}, prints exactly C{line}."""
        if config is not None:
            write(self.cwd, config)
        result = runToExit([script, *argv], self.cwd)
        described = f"exit status {result.returncode}\n{result.stdout}\n{result.stderr}"
        self.assertEqual(result.returncode, 2, described)
        self.assertEqual(result.stdout, "", described)
        self.assertEqual(result.stderr, f"{os.path.basename(script)}: error: {line}\n",
                         described)

    def test_portOutOfRange(self):
        self.assertRefused(CLIENT_SCRIPT, "client:\n  token: t\n  local_ports: [22]\n"
                           "  remote_port: 70000\n",
                           "config.yaml: client.remote_port must be from 1 to 65535, got 70000")

    def test_serverAddrPortOutOfRange(self):
        self.assertRefused(SERVER_SCRIPT, "server:\n  token: t\n  addr: '0.0.0.0:70000'\n",
                           "config.yaml: the port in server.addr must be from 1 to 65535, "
                           "got 70000")

    def test_unknownKey(self):
        self.assertRefused(SERVER_SCRIPT, "server:\n  token: t\n  adr: ':17000'\n",
                           "config.yaml: server.adr is not a known key "
                           "(did you mean server.addr?)")

    def test_unknownSection(self):
        self.assertRefused(CLIENT_SCRIPT, "clients:\n  token: t\n",
                           "config.yaml: unknown section 'clients'; "
                           "expected server: and/or client:")

    def test_wrongType(self):
        self.assertRefused(CLIENT_SCRIPT, "client:\n  token: t\n  local_ports: [22]\n"
                           "  heartbeat_interval: often\n",
                           "config.yaml: client.heartbeat_interval must be a number of "
                           "seconds greater than 0, got 'often'")

    def test_badLogLevel(self):
        self.assertRefused(SERVER_SCRIPT, "server:\n  token: t\n  log_level: verbose\n",
                           "config.yaml: server.log_level must be one of debug, info, warn, "
                           "error, got 'verbose'")

    def test_missingToken(self):
        self.assertRefused(SERVER_SCRIPT, "server:\n  addr: ':17000'\n",
                           "config.yaml: server.token is missing "
                           "(set it there or give --token TOKEN)")

    def test_yamlSyntax(self):
        self.assertRefused(CLIENT_SCRIPT, "client:\n  token: 't\n  name: x\n",
                           "config.yaml: not valid YAML at line 4, column 1: "
                           "found unexpected end of stream")

    def test_unreadable(self):
        self.assertRefused(SERVER_SCRIPT, None,
                           "missing.yaml: cannot read it: No such file or directory",
                           argv=["--config", "missing.yaml", "--token", "t"])

    def test_configOptionNamesItsFile(self):
        """--config FILE: the message names that file; ./config.yaml is not read."""
        write(self.cwd, "server:\n  token: fine\n")
        other = write(self.cwd, "server:\n  token: 7\n  heartbeat_timeout: -1\n", "other.yaml")
        result = runToExit([SERVER_SCRIPT, "--config", other], self.cwd)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stderr, f"gotunnel-server: error: {other}: server."
                         "heartbeat_timeout must be a number of seconds greater than 0, "
                         "got -1\n")

    def test_twistd(self):
        """twistd reports the same sentence (after its usage text), without a traceback."""
        write(self.cwd, "client:\n  token: t\n  local_ports: [22]\n  remote_port: 70000\n")
        result = runToExit([TWISTD, "-n", "--pidfile=", "gotunnel-client"], self.cwd)
        self.assertNotEqual(result.returncode, 0)
        self.assertTrue(result.stdout.rstrip("\n").endswith(
            ": config.yaml: client.remote_port must be from 1 to 65535, got 70000"),
            result.stdout)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        self.assertEqual(os.listdir(self.cwd), ["config.yaml"])


class ProcessTestCase(unittest.TestCase):
    timeout = 180

    def directory(self, config: str = None) -> str:
        """A new working directory, with C{config} as its config.yaml."""
        path = temporaryDirectory(self)
        if config is not None:
            write(path, config)
        return path

    @defer.inlineCallbacks
    def assertEchoes(self, port: int):
        payload = randomBytes(64 * 1024)
        yield retryUntil(lambda: echoedThrough(self, port, payload, 10), START_TIMEOUT,
                         f"an echo through public port {port}")

    @defer.inlineCallbacks
    def stop(self, *children):
        for child in children:
            child.sendSignal("TERM")
        for child in children:
            yield within(child.ended, EXIT_TIMEOUT, f"{child.argv[0]} to exit after SIGTERM")
            self.assertNotIn("Traceback", child.stdout + child.stderr, child.describe())


class GoConfigFileTests(ProcessTestCase):
    @defer.inlineCallbacks
    def test_goConfigFilesInWorkingDirectory(self):
        """
        A Go server's and a Go client's config.yaml, each in the directory
        the program runs in: ours run from them with no options, and at
        log_level error print nothing while all goes well.
        """
        control, public, target = freePort(), freePort(), listenTarget(self)
        server = spawn(self, [SERVER_SCRIPT], self.directory(
            f'server:\n  addr: "127.0.0.1:{control}"\n  token: "go-token"\n'
            f'  log_level: "error"\n'))
        # It prints nothing when it is ready: wait until it accepts connections.
        yield retryUntil(lambda: connectionRefused(control).addCallback(lambda no: not no),
                         START_TIMEOUT, "the server to listen")
        client = spawn(self, [CLIENT_SCRIPT], self.directory(
            f'client:\n  name: "bench"\n  token: "go-token"\n'
            f'  server_addr: "127.0.0.1:{control}"\n  local_ports: [{target}]\n'
            f'  remote_port: {public}\n  log_level: "error"\n  heartbeat_interval: 10\n'
            f'  health_check_interval: 30\n'))
        yield self.assertEchoes(public)
        self.assertEqual((server.stdout, client.stdout), ("", ""),
                         server.describe() + client.describe())
        yield self.stop(client, server)

    @defer.inlineCallbacks
    def test_goTemplateWithConfigOptionAndOverride(self):
        """
        One file in the Go template's shape (server: and client:) named by
        --config for both roles, the server under twistd with --listen
        overriding server.addr.
        """
        control, unused, public = freePort(), freePort(), freePort()
        target = listenTarget(self)
        shared = write(self.directory(), f"""\
server:
  addr: "127.0.0.1:{unused}"
  token: "shared-token"
  log_level: "info"
  log_lang: "en"
client:
  name: "template-client"
  token: "shared-token"
  server_addr: "127.0.0.1:{control}"
  local_ports: [{target}]
  remote_port: {public}
  heartbeat_interval: 10
  health_check_interval: 30
  log_level: "info"
  log_lang: "en"
""", "gotunnel.yaml")
        server = spawn(self, [TWISTD, "-n", "--pidfile=", "gotunnel-server", "--config", shared,
                              "--listen", f"tcp:{control}:interface=127.0.0.1"],
                       self.directory())
        yield within(server.whenOutput(f"control channel listening on 127.0.0.1:{control}",
                                       (1,)), START_TIMEOUT, "the server's 'listening' line")
        client = spawn(self, [CLIENT_SCRIPT, "--config", shared], self.directory())
        yield within(client.whenOutput(f"registered 127.0.0.1:{target}->{public} as "
                                       "template-client", (1,)),
                     START_TIMEOUT, "the client's 'registered' line")
        yield self.assertEchoes(public)
        yield self.stop(client, server)


class LogLevelTests(ProcessTestCase):
    """
    A client whose server is down logs [ERROR][1001] (error) and
    'reconnecting ...' (info) again and again; the level decides which are
    written.
    """

    def clientConfig(self, level: str) -> str:
        return (f"client:\n  token: t\n  server_addr: '127.0.0.1:{freePort()}'\n"
                f"  local_ports: [22]\n  log_level: {level}\n")

    @defer.inlineCallbacks
    def test_consoleScript(self):
        quiet = spawn(self, [CLIENT_SCRIPT], self.directory(self.clientConfig("error")))
        chatty = spawn(self, [CLIENT_SCRIPT, "--log-level", "debug"],
                       self.directory(self.clientConfig("error")))
        for child in (quiet, chatty):
            yield within(child.whenOutput(TWO_1001_ERRORS, (2,)), START_TIMEOUT,
                         "two [ERROR][1001] lines on stderr")
        # The console shows [ERROR] lines once, on stderr, not again in the log.
        self.assertNotIn("[ERROR]", quiet.stdout + chatty.stdout)
        # Each behind the time, as the log has it, naming the server.
        self.assertRegex(quiet.stderr.splitlines()[0], STAMPED_1001)
        self.assertNotIn("reconnecting", quiet.stdout, quiet.describe())
        self.assertIn("reconnecting", chatty.stdout, chatty.describe())
        yield self.stop(quiet, chatty)

    @defer.inlineCallbacks
    def test_twistdWithLogfile(self):
        """twistd writes where --logfile says, at the file's log_level."""
        cwd = self.directory(self.clientConfig("warning"))
        child = spawn(self, [TWISTD, "-n", "--pidfile=", "--logfile", "client.log",
                             "gotunnel-client"], cwd)
        yield within(child.whenOutput(TWO_1001_ERRORS, (2,)), START_TIMEOUT,
                     "two [ERROR][1001] lines on stderr")
        yield retryUntil(lambda: TWO_1001_ERRORS.search(self.read(cwd, "client.log")),
                         START_TIMEOUT, "two [ERROR][1001] lines in client.log")
        logged = self.read(cwd, "client.log")
        self.assertNotIn("reconnecting", logged)
        self.assertNotIn("starting up", logged)
        self.assertEqual(child.stdout, "")
        yield self.stop(child)
        self.assertEqual((child.exitCode, child.signal), (None, signal.SIGTERM))

    def read(self, directory: str, name: str) -> str:
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            return f.read()

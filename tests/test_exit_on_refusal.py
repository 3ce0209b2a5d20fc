"""
--exit-on-refusal as a person (or systemd) runs it: the console script and
twistd against a real server process, each exiting with the status
documented for the refusal (docs/troubleshooting.md).
"""

from __future__ import annotations

import os
import re

from twisted.internet import defer
from twisted.trial import unittest

from gotunnel.server.refusals import EXIT_AUTHENTICATION_FAILED, EXIT_PORT_TAKEN
from tests.support import freePort, listenTarget, spawn, temporaryDirectory, venvScript, within

TWISTD = venvScript("twistd")
SERVER_SCRIPT = venvScript("gotunnel-server")
CLIENT_SCRIPT = venvScript("gotunnel-client")
LISTENING = re.compile(r"control channel listening on 127\.0\.0\.1:(\d+)")
AUTH_FAILED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} "
                         r"\[ERROR\]\[1002\] Authentication failed, please check token$",
                         re.MULTILINE)
START_TIMEOUT = 60
EXIT_TIMEOUT = 60


class ExitOnRefusalTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.cwd = temporaryDirectory(self)

    def spawn(self, *argv: str):
        return spawn(self, list(argv), self.cwd)

    @defer.inlineCallbacks
    def startServer(self, token: str):
        server = self.spawn(SERVER_SCRIPT, "--listen", "tcp:0:interface=127.0.0.1",
                            "--public-interface", "127.0.0.1", "--token", token)
        self.addCleanup(lambda: server.sendSignal("TERM"))
        found = yield within(server.whenOutput(LISTENING, (1,)), START_TIMEOUT,
                             "the server's 'listening' line")
        return int(found.group(1))

    @defer.inlineCallbacks
    def assertExits(self, child, status: int):
        yield within(child.ended, EXIT_TIMEOUT, f"{child.argv[0]} to exit")
        self.assertEqual((child.exitCode, child.signal), (status, None), child.describe())
        self.assertNotIn("Traceback", child.stdout + child.stderr, child.describe())

    @defer.inlineCallbacks
    def test_consoleScriptWrongToken(self):
        """
        gotunnel-client --exit-on-refusal with a token the server does not
        have: [ERROR][1002] on standard error, a line saying why it exits,
        and exit status 3.
        """
        control = yield self.startServer("the-servers-token")
        client = self.spawn(CLIENT_SCRIPT, "--server", f"tcp:127.0.0.1:{control}",
                            "--token", "another-token", "--map", f"{listenTarget(self)}:"
                            f"{freePort()}", "--exit-on-refusal")
        yield self.assertExits(client, EXIT_AUTHENTICATION_FAILED)
        self.assertRegex(client.stderr, AUTH_FAILED)
        self.assertIn(": authentication failed; exiting with status 3 (exit_on_refusal), as "
                      "this will not change until the client's token is the server's",
                      client.stdout)

    @defer.inlineCallbacks
    def test_twistdPortTakenFromConfigFile(self):
        """
        twistd -n gotunnel-client with exit_on_refusal: true in config.yaml,
        asking for a port another client holds: exit status 5, and no
        pidfile left behind.
        """
        token = "shared-token"
        control = yield self.startServer(token)
        public = freePort()
        holder = self.spawn(CLIENT_SCRIPT, "--server", f"tcp:127.0.0.1:{control}",
                            "--token", token, "--name", "holder",
                            "--map", f"{listenTarget(self)}:{public}")
        self.addCleanup(lambda: holder.sendSignal("TERM"))
        yield within(holder.whenOutput(f"->{public} as holder", (1,)), START_TIMEOUT,
                     "the first client's 'registered' line")
        with open(os.path.join(self.cwd, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(f"client:\n  server_addr: '127.0.0.1:{control}'\n  token: {token}\n"
                    f"  name: latecomer\n  local_ports: [{listenTarget(self)}]\n"
                    f"  remote_port: {public}\n  exit_on_refusal: true\n")
        client = self.spawn(TWISTD, "-n", "--pidfile", "client.pid", "gotunnel-client")
        yield self.assertExits(client, EXIT_PORT_TAKEN)
        self.assertIn(f"remote port {public} is already taken by another client; exiting "
                      "with status 5", client.stdout)
        self.assertEqual(os.listdir(self.cwd), ["config.yaml"])


class DeploymentDocTests(unittest.TestCase):
    def test_systemdUnitKeepsRefusalsStopped(self):
        """
        docs/deployment.md's client unit runs with --exit-on-refusal and
        tells systemd not to restart on exactly the refusal statuses.
        """
        from gotunnel.server import refusals

        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "deployment.md")
        with open(path, encoding="utf-8") as f:
            unit = f.read().split("gotunnel-client.service`:", 1)[1].split("```", 2)[1]
        self.assertRegex(unit, r"ExecStart=\S+/gotunnel-client .*--exit-on-refusal")
        [statuses] = re.findall(r"^RestartPreventExitStatus=(.*)$", unit, re.MULTILINE)
        self.assertEqual(sorted(int(s) for s in statuses.split()), sorted({
            refusals.EXIT_AUTHENTICATION_FAILED, refusals.EXIT_PORT_NOT_ALLOWED,
            refusals.EXIT_PORT_TAKEN, refusals.EXIT_PORT_BUSY}))

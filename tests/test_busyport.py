"""
A control port that is already taken, as a person meets it: the console
script and twistd each say so in one line and exit with status 1.
"""

from __future__ import annotations

import socket
import subprocess

from twisted.trial import unittest

from tests.support import HOST, temporaryDirectory, venvScript

EXIT_TIMEOUT = 60


class BusyControlPortTests(unittest.TestCase):
    def setUp(self):
        self.cwd = temporaryDirectory(self)
        self.taken = socket.socket()
        self.addCleanup(self.taken.close)
        self.taken.bind((HOST, 0))
        self.taken.listen()
        self.port = self.taken.getsockname()[1]
        self.listen = f"tcp:{self.port}:interface={HOST}"

    def runToExit(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), cwd=self.cwd, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=EXIT_TIMEOUT)

    def assertOneLine(self, result: subprocess.CompletedProcess, prefix: str) -> None:
        output = result.stdout + result.stderr
        described = f"exit status {result.returncode}\n{output}"
        self.assertEqual(result.returncode, 1, described)
        self.assertNotIn("Traceback", output, described)
        said = [line for line in output.splitlines() if "Address already in use" in line]
        self.assertEqual(len(said), 1, described)
        self.assertIn(f"{prefix}cannot start: Couldn't listen on {HOST}:{self.port}", said[0])

    def test_consoleScript(self):
        result = self.runToExit(venvScript("gotunnel-server"), "--token", "t",
                                "--listen", self.listen)
        self.assertOneLine(result, "gotunnel-server: error: ")

    def test_twistd(self):
        result = self.runToExit(venvScript("twistd"), "-n", "--pidfile=", "gotunnel-server",
                          "--token", "t", "--listen", self.listen)
        self.assertOneLine(result, "[gotunnel.tap#critical] ")

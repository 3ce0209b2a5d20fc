"""
A web client aimed at gotunnel's control port, as a person meets it: curl
gets no answer, and the server's log says what happened in one line.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from twisted.internet import defer
from twisted.trial import unittest

from tests.support import HOST, spawn, temporaryDirectory, venvScript, within

START_TIMEOUT = 60
LISTENING = re.compile(r"control channel listening on 127\.0\.0\.1:(\d+)")


class CurlOnControlPortTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_curl(self):
        curl = shutil.which("curl")
        if curl is None:
            raise unittest.SkipTest("curl is not installed")
        server = spawn(self, [venvScript("gotunnel-server"), "--token", "t",
                              "--listen", f"tcp:0:interface={HOST}"], temporaryDirectory(self))
        found = yield within(server.whenOutput(LISTENING, (1,)), START_TIMEOUT,
                             "the server to listen")
        result = subprocess.run([curl, "-sS", "--max-time", "30",
                                 f"http://{HOST}:{found.group(1)}/"],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=60)
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertEqual(result.stdout, "")
        line = yield within(server.whenOutput(re.compile(r".*sent an HTTP request.*"), (1,)),
                            START_TIMEOUT, "the server's line about the HTTP request")
        self.assertIn(f"protocol error from {HOST}:", line.group(0))
        self.assertTrue(line.group(0).endswith(
            ": sent an HTTP request: this is gotunnel's control port; an HTTP client should "
            "use a public port; closing the connection"), line.group(0))
        server.sendSignal("TERM")
        yield within(server.ended, START_TIMEOUT, "the server to stop")
        self.assertEqual(server.exitCode, 0, server.describe())

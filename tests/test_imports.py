"""
A plain run imports what it uses: a server and a client without TLS, a
config file, virtual hosts or the admin API load none of the code for them.
(pyOpenSSL is loaded anyway: Twisted's own endpoints and tcp modules import
it when it is installed.)
"""

from __future__ import annotations

import json
import sys

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tests.support import temporaryDirectory

PLAIN_RUN = """
import json, sys
from gotunnel.cli import tap

server = tap.ServerOptions()
server.parseOptions(["--token", "t", "--listen", "tcp:0:interface=127.0.0.1"])
client = tap.ClientOptions()
client.parseOptions(["--token", "t", "--server", "tcp:127.0.0.1:9", "--map", "127.0.0.1:9:9"])
services = [tap.makeServerService(server), tap.makeClientService(client)]
for service in services:
    service.startService()
print(json.dumps(sorted(sys.modules)))
for service in services:
    service.stopService()
"""

UNUSED = ("yaml", "gotunnel.tls.contexts", "gotunnel.tls.certs", "gotunnel.tls.certmaking",
          "gotunnel.server.vhostroutes", "gotunnel.server.vhostports", "gotunnel.admin",
          "gotunnel.cli.demo", "gotunnel.cli.status", "twisted.web", "prometheus_client")
"""Packages and modules a plain server and client have no use for."""


class PlainRunImportsTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_plainServerAndClientImportNoUnusedCode(self):
        """
        A fresh interpreter that starts a plain server and client service
        (in a directory without a config.yaml) has imported none of
        L{UNUSED}.
        """
        out, err, status = yield getProcessOutputAndValue(
            sys.executable, ["-c", PLAIN_RUN], path=temporaryDirectory(self))
        self.assertEqual(status, 0, err.decode(errors="replace"))
        modules = json.loads(out.decode().strip().splitlines()[-1])
        self.assertIn("gotunnel.server", modules)
        loaded = [name for name in modules
                  if any(name == unused or name.startswith(unused + ".") for unused in UNUSED)]
        self.assertEqual(loaded, [])

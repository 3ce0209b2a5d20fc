"""
A plain run imports what it uses: a server and a client without TLS, a
config file, virtual hosts or the admin API load none of the code for them,
and, started as a process of their own (console scripts, twistd), not even
pyOpenSSL, which Twisted's reactor and endpoints would otherwise import.
"""

from __future__ import annotations

import json
import sys
from unittest import mock

from twisted.internet import defer
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial import unittest

from gotunnel.cli import footprint
from gotunnel.cli.tap import ClientOptions, ServerOptions
from gotunnel.config.kinds import quoteEndpointArgument
from gotunnel.config.settings import Mapping
from gotunnel.relay import splicer
from gotunnel.wire.framing import tlsFailure
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


@defer.inlineCallbacks
def modulesAfter(testCase, script: str, *args: str):
    """The names in sys.modules of a fresh interpreter after it ran C{script}."""
    out, err, status = yield getProcessOutputAndValue(
        sys.executable, ["-c", script, *args], path=temporaryDirectory(testCase))
    testCase.assertEqual(status, 0, err.decode(errors="replace"))
    return json.loads(out.decode().strip().splitlines()[-1])


PARSING = """
import json, sys
import gotunnel.__main__, gotunnel.cli.server_tap, gotunnel.cli.client_tap
print(json.dumps(sorted(sys.modules)))
"""

DECIDED_LATER = ("OpenSSL", "cryptography", "twisted.protocols.tls", "twisted.internet.tcp",
                 "twisted.internet.endpoints", "twisted.internet.reactor",
                 "gotunnel.server.service", "gotunnel.client.service")
"""What must not be imported before a run's options are parsed: they load pyOpenSSL."""

OWN_PROCESS = """
import json, sys
from gotunnel.cli import tap

role = sys.argv[1]
options = tap.ServerOptions() if role == "server" else tap.ClientOptions()
options.ownsProcess = True
options.parseOptions(sys.argv[2:])
service = (tap.makeServerService if role == "server" else tap.makeClientService)(options)
service.startService()
service.stopService()
print(json.dumps({name: module is not None for name, module in sys.modules.items()}))
"""

PLAIN_SERVER = ("server", "--token", "t", "--listen", "tcp:0:interface=127.0.0.1")
PLAIN_CLIENT = ("client", "--token", "t", "--server", "tcp:127.0.0.1:9", "--map", "127.0.0.1:9:9")


class LeftOutOpenSSLTests(unittest.TestCase):
    """
    The console scripts and twistd leave pyOpenSSL (and cryptography) out
    of a plain run, and keep it for a run that may use TLS.
    """

    @defer.inlineCallbacks
    def test_parsingImportsNoTLS(self):
        """
        The entry points and everything option parsing imports load neither
        pyOpenSSL nor what imports it: the run decides afterwards.
        """
        modules = yield modulesAfter(self, PARSING)
        self.assertIn("gotunnel.cli.tap", modules)
        self.assertEqual([name for name in DECIDED_LATER if name in modules], [])

    @defer.inlineCallbacks
    def test_plainRunsLeaveItOut(self):
        """
        A plain server and a plain client, each started as its process's
        own, cannot import pyOpenSSL and have not loaded cryptography or
        Twisted's TLS.
        """
        for argv in (PLAIN_SERVER, PLAIN_CLIENT):
            modules = yield modulesAfter(self, OWN_PROCESS, *argv)
            self.assertIn("twisted.internet.reactor", modules)
            self.assertIs(modules.get("OpenSSL"), False, argv)
            self.assertEqual([name for name in ("cryptography", "twisted.protocols.tls")
                              if name in modules], [], argv)

    @defer.inlineCallbacks
    def test_tlsRunKeepsIt(self):
        """A client with --tls keeps pyOpenSSL and Twisted's TLS."""
        modules = yield modulesAfter(self, OWN_PROCESS, *PLAIN_CLIENT, "--tls")
        self.assertIs(modules.get("OpenSSL"), True)
        self.assertIs(modules.get("twisted.protocols.tls"), True)

    @defer.inlineCallbacks
    def test_embeddedOptionsKeepIt(self):
        """Options of a program that embeds the services decide nothing for its process."""
        modules = yield modulesAfter(self, OWN_PROCESS.replace(
            "options.ownsProcess = True", ""), *PLAIN_SERVER)
        self.assertIs(modules.get("OpenSSL"), True)


class NeedsOpenSSLTests(unittest.TestCase):
    """Which settings keep pyOpenSSL in a run's process."""

    def test_plainEndpoints(self):
        for description in ("tcp:17000", "tcp6:17000:interface=\\:\\:1", "unix:/run/g.sock",
                            "17000", "TCP:17000"):
            self.assertTrue(footprint.isPlainEndpoint(description), description)
        for description in ("ssl:17000", "tls:example.com:443", "systemd:domain=INET:index=0"):
            self.assertFalse(footprint.isPlainEndpoint(description), description)

    def test_server(self):
        options = ServerOptions()
        self.assertFalse(options.needsOpenSSL({"listen": "tcp:17000", "token": "t"}))
        self.assertFalse(options.needsOpenSSL({}))
        for values in ({"listen": "ssl:17000"}, {"tls_cert": "server.pem"},
                       {"admin": "tcp:7400"}, {"vhost_http": "tcp:80"},
                       {"vhost_https": "tcp:443"}, {"subdomain_host": "example.com"}):
            self.assertTrue(options.needsOpenSSL(values), values)

    def test_client(self):
        options = ClientOptions()
        plain = Mapping("127.0.0.1", 22, 10022)
        self.assertFalse(options.needsOpenSSL({"server": "tcp:h:17000", "mappings": [plain]}))
        for values in ({"tls": True}, {"tls_ca": "ca.pem"}, {"server": "tls:h:17000"},
                       {"mappings": [plain, Mapping("127.0.0.1", 80, 0, vhost="http")]}):
            self.assertTrue(options.needsOpenSSL(values), values)

    def test_quotedAsTwistedQuotes(self):
        """Our quoting of endpoint arguments is Twisted's."""
        for argument in ("::1", "a\\b:c", "plain", "\\:", ""):
            self.assertEqual(quoteEndpointArgument(argument), quoteStringArgument(argument))


class WithoutOpenSSLTests(unittest.TestCase):
    """Code a plain run reaches does not import pyOpenSSL when it is left out."""

    def test_noTLSFailure(self):
        with mock.patch.dict(sys.modules, {"OpenSSL.SSL": None}):
            self.assertIsNone(tlsFailure(Failure(ConnectionError("gone"))))

    def test_noTLSPump(self):
        self.assertTrue(splicer.tlsLoaded())
        with mock.patch.dict(sys.modules, {"twisted.protocols.tls": None}):
            self.assertFalse(splicer.tlsLoaded())

    def test_freeHeapGivenBack(self):
        """On glibc (the platforms the suite runs on), malloc_trim is there."""
        self.assertTrue(footprint.giveBackFreeHeap())

"""
C{gotunnel status}, run as a subprocess (the console script and
C{python -m gotunnel status}) against a real server in this process, with a
real client and a user connected; and its formatting, unit by unit.
"""

from __future__ import annotations

import json
import os
import re
import sys

from twisted.internet import defer
from twisted.trial import unittest

from gotunnel.cli.status import humanBytes, humanSeconds, render
from tests.support import (
    HOST, Tunnel, connectUser, freePort, listenTarget, spawn, temporaryDirectory, venvScript,
    within,
)

ADMIN_TOKEN = "status-Token-0x5747"
WAIT = 60


class FormatTests(unittest.TestCase):
    def test_humanBytes(self):
        self.assertEqual([humanBytes(n) for n in (0, 1023, 1024, 4200, 5 * 1024 ** 2,
                                                  3 * 1024 ** 3 + 1)],
                         ["0 B", "1023 B", "1.0 KiB", "4.1 KiB", "5.0 MiB", "3.0 GiB"])

    def test_humanSeconds(self):
        self.assertEqual([humanSeconds(s) for s in (0, 59.9, 61, 3600 * 2 + 180, 86400 * 4 + 3600)],
                         ["0s", "59s", "1m 01s", "2h 03m", "4d 01h"])

    def test_emptyTables(self):
        text = render({"time": 0, "clients": [], "ports": [], "connections": []})
        self.assertEqual(text.count("(none)"), 3)
        self.assertIn("CLIENTS (0)", text)

    def test_leasedPort(self):
        """A leased port shows its state and the lease holder, with no local port."""
        text = render({"time": 0, "clients": [], "connections": [], "ports": [{
            "remote_port": 10022, "client": "office-pc", "client_id": None, "local_port": None,
            "state": "leased", "users_now": 0, "users_total": 3, "bytes_in": 2048,
            "bytes_out": 0, "pool": 0}]})
        self.assertRegex(text, r"10022\s+office-pc\s+-\s+leased\s+0\s+3\s+2\.0 KiB\s+0 B\s+0")

    def test_virtualHosts(self):
        """A virtual host shows as its scheme and domains, wherever a port would."""
        vhost = {"remote_port": 0, "vhost": "https", "domains": ["a.example", "b.example"]}
        text = render({"time": 10, "clients": [{
            "id": "c4", "name": "web", "address": "192.0.2.1:5000", "identity": "shared-token",
            "connected_since": 0, "last_heartbeat": 0,
            "mappings": [dict(vhost, local_port=8443)]}], "ports": [dict(
                vhost, client="web", client_id="c4", local_port=8443, state="online",
                users_now=1, users_total=1, bytes_in=0, bytes_out=0, pool=0)],
            "connections": [dict(vhost, id="u1", client="web", user="198.51.100.1:1",
                                 bytes_in=0, bytes_out=0, age=1)]})
        self.assertIn("https://a.example,b.example->8443", text)
        self.assertRegex(text, r"https://a\.example,b\.example\s+web\s+8443\s+online")
        self.assertRegex(text, r"u1\s+https://a\.example,b\.example\s+web")


class StatusCommandTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.tunnel = Tunnel(self)
        server = yield self.tunnel.startServer(admin=f"tcp:0:interface={HOST}",
                                               admin_token=ADMIN_TOKEN)
        port = yield server.admin.whenListening()
        self.url = f"http://{HOST}:{port.getHost().port}"
        _, self.public = yield self.tunnel.publish(listenTarget(self), name="office-pc")
        self.user = yield connectUser(self, self.public)
        payload = b"x" * 5000
        self.user.transport.write(payload)
        yield within(self.user.whenReceived(len(payload)), WAIT, "the echo")
        self.directory = temporaryDirectory(self)

    @defer.inlineCallbacks
    def status(self, argv, env=None):
        child = spawn(self, argv, self.directory, env=env)
        yield within(child.ended, WAIT, "gotunnel status to exit")
        return child

    @defer.inlineCallbacks
    def test_tables(self):
        """The console script prints the client, the port and the connection, bytes in KiB."""
        child = yield self.status([venvScript("gotunnel"), "status", "--admin", self.url,
                                   "--admin-token", ADMIN_TOKEN])
        self.assertEqual(child.exitCode, 0, child.describe())
        out = child.stdout
        self.assertIn("CLIENTS (1)", out)
        self.assertRegex(out, r"c1\s+office-pc\s+127\.0\.0\.1:\d+\s+shared-token")
        self.assertRegex(out, rf"{self.public}\s+office-pc\s+\d+\s+online\s+1\s+1\s+"
                              r"4\.9 KiB\s+4\.9 KiB\s+0")
        self.assertRegex(out, rf"u1\s+{self.public}\s+office-pc\s+127\.0\.0\.1:\d+\s+"
                              r"4\.9 KiB\s+4\.9 KiB\s+\d+s")

    @defer.inlineCallbacks
    def test_jsonWithTokenFromEnvironment(self):
        """python -m gotunnel status --json, the token from GOTUNNEL_ADMIN_TOKEN."""
        child = yield self.status([sys.executable, "-m", "gotunnel", "status", "--admin",
                                   self.url, "--json"],
                                  env={"GOTUNNEL_ADMIN_TOKEN": ADMIN_TOKEN})
        self.assertEqual(child.exitCode, 0, child.describe())
        overview = json.loads(child.stdout)
        self.assertEqual([c["name"] for c in overview["clients"]], ["office-pc"])
        [port] = overview["ports"]
        self.assertEqual((port["remote_port"], port["bytes_in"], port["bytes_out"]),
                         (self.public, 5000, 5000))
        self.assertEqual(len(overview["connections"]), 1)

    @defer.inlineCallbacks
    def test_wrongToken(self):
        child = yield self.status([venvScript("gotunnel"), "status", "--admin", self.url,
                                   "--admin-token", "wrong"])
        self.assertEqual(child.exitCode, 1)
        self.assertIn("refused the token", child.stderr)
        self.assertEqual(child.stdout, "")

    @defer.inlineCallbacks
    def test_unreachable(self):
        child = yield self.status([venvScript("gotunnel"), "status", "--admin",
                                   f"http://{HOST}:{freePort()}", "--admin-token", "x"])
        self.assertEqual(child.exitCode, 1)
        self.assertTrue(re.search(r"cannot reach the admin endpoint", child.stderr),
                        child.describe())


class TLSStatusTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_sslAdminEndpoint(self):
        """
        An ssl: admin endpoint: gotunnel status reads it over https:// with
        --ca, and refuses a certificate it cannot verify without.
        """
        from gotunnel.tls import certs
        from tests.test_tls import makeCertificates, sslListen

        certificates = temporaryDirectory(self)
        makeCertificates(certificates, "--name", "admin.example.com", "--ip", HOST)
        tunnel = Tunnel(self)
        server = yield tunnel.startServer(admin=sslListen(certificates), admin_token=ADMIN_TOKEN)
        port = yield server.admin.whenListening()
        url = f"https://{HOST}:{port.getHost().port}"
        directory = temporaryDirectory(self)
        env = {"GOTUNNEL_ADMIN_TOKEN": ADMIN_TOKEN}
        child = spawn(self, [venvScript("gotunnel"), "status", "--admin", url, "--json", "--ca",
                             os.path.join(certificates, certs.CA_CERT)], directory, env=env)
        yield within(child.ended, WAIT, "gotunnel status to exit")
        self.assertEqual(child.exitCode, 0, child.describe())
        self.assertEqual(json.loads(child.stdout)["clients"], [])
        child = spawn(self, [venvScript("gotunnel"), "status", "--admin", url], directory,
                      env=env)
        yield within(child.ended, WAIT, "gotunnel status to exit")
        self.assertEqual(child.exitCode, 1, child.describe())

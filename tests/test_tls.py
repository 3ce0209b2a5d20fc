"""
The tunnel over TLS, on real loopback sockets: certificates made by
L{gotunnel.tls.certs} in a temporary directory, a server listening with an
C{ssl:} endpoint string, clients connecting with C{tls:} endpoint strings
that verify the server against a CA.  Also the commands of docs/tls.md, run
as a person runs them.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import sys

from cryptography import x509
from twisted.internet import defer
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.interfaces import ISSLTransport
from twisted.trial import unittest

from gotunnel.tls import certs
from gotunnel.client.datachannel import DataChannelClient
from tests.support import (
    HOST, LogWatcher, StreamCapture, Tunnel, connectUser, connectionRefused, freePort,
    listenTarget, randomBytes, spawn, temporaryDirectory, venvScript, waitUntil, within,
)

SERVER_NAME = "tunnel.example.com"
UNREACHABLE_PREFIX = "[ERROR][1001] Failed to connect to server "
DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "tls.md")


def makeCertificates(directory: str, *serverArguments: str, ca: str = "") -> None:
    """
    With L{certs.main}: a CA in C{directory} (unless C{ca} names another
    one's directory) and a server certificate signed by it.
    """
    quiet = io.StringIO()
    if not ca:
        assert certs.main(["ca", "--out", directory], stdout=quiet) == 0
    caArguments = ["--ca", ca] if ca else []
    assert certs.main(["server", "--out", directory, *caArguments, *serverArguments],
                      stdout=quiet) == 0


def trustDirectory(testCase, certificates: str) -> str:
    """
    A directory holding only the CA certificate of C{certificates}:
    C{trustRoots=} trusts every .pem file in the directory it names.
    """
    trust = temporaryDirectory(testCase)
    shutil.copy(os.path.join(certificates, certs.CA_CERT), trust)
    return trust


def sslListen(certificates: str) -> str:
    """An C{ssl:} endpoint string on 127.0.0.1 with the server key and certificate."""
    key = quoteStringArgument(os.path.join(certificates, certs.SERVER_KEY))
    cert = quoteStringArgument(os.path.join(certificates, certs.SERVER_CERT))
    return f"ssl:0:interface={HOST}:privateKey={key}:certKey={cert}"


def tlsServer(host: str, port: int, trust: str) -> str:
    """
    A C{tls:} endpoint string that checks the server's certificate against
    the CAs in C{trust} and C{host}; a DNS name is verified while the TCP
    connection goes to 127.0.0.1 (the C{endpoint=} argument).
    """
    endpoint = f"tls:{host}:{port}:trustRoots={quoteStringArgument(trust)}"
    if host != HOST:
        endpoint += f":endpoint={quoteStringArgument(f'tcp:{HOST}:{port}')}"
    return endpoint


def assertChannelsAreTLS(testCase, client, server, certificatePath: str) -> None:
    """
    C{client}'s control channel and its one data channel, and the server's
    ends of both, are TLS, and the client saw the certificate in
    C{certificatePath} on each.
    """
    with open(certificatePath, "rb") as f:
        serverCertificate = x509.load_pem_x509_certificate(f.read())
    control = client.tunnels[0].channel
    [dataChannel] = [c for c in client.tunnels[0].connections
                     if isinstance(c, DataChannelClient)]
    for channel in (control, dataChannel):
        testCase.assertTrue(ISSLTransport.providedBy(channel.transport))
        testCase.assertEqual(channel.transport.getPeerCertificate().to_cryptography(),
                             serverCertificate)
    roles = {c.role: c for c in server.registry.connections if hasattr(c, "role")}
    testCase.assertEqual(sorted(roles), ["control", "data"])
    for channel in roles.values():
        testCase.assertTrue(ISSLTransport.providedBy(channel.transport))


class TLSTestCase(unittest.TestCase):
    """A CA, a server certificate for tunnel.example.com and 127.0.0.1, and a local service."""

    def setUp(self):
        self.logs = LogWatcher(self)
        self.stderr = StreamCapture()
        self.patch(sys, "__stderr__", self.stderr)
        self.certificates = temporaryDirectory(self)
        makeCertificates(self.certificates, "--name", SERVER_NAME, "--ip", HOST)
        self.trust = trustDirectory(self, self.certificates)
        self.tunnel = Tunnel(self)
        self.target = listenTarget(self)

    def startServer(self, certificates: str = "") -> defer.Deferred:
        return self.tunnel.startServer(listen=sslListen(certificates or self.certificates))

    def untrustedCA(self) -> str:
        """A trust directory holding another CA, one that signed nothing of ours."""
        other = temporaryDirectory(self)
        makeCertificates(other, "--name", SERVER_NAME, "--ip", HOST)
        return trustDirectory(self, other)

    def otherNameCertificates(self) -> str:
        """A server certificate from our CA for other.example.com only."""
        other = temporaryDirectory(self)
        makeCertificates(other, "--name", "other.example.com", ca=self.certificates)
        return other

    @defer.inlineCallbacks
    def assertNeverRegisters(self, server: str):
        """
        A client connecting with the endpoint string C{server} loses its
        control channel without registering, and nothing is published.
        """
        client = self.tunnel.startClient(self.target, server=server)
        tunnel = client.tunnels[0]
        yield within(self.logs.whenMatched(LogWatcher.formatted(
            "reconnecting {mapping}", mapping=str(tunnel.mapping))), 15,
            "the client to give up its first control channel")
        self.assertIsNone(tunnel.channel)
        self.assertEqual(tunnel.failedRegistrations, 1)
        self.assertEqual(self.tunnel.server.registry.tunnels, {})
        self.assertTrue((yield connectionRefused(tunnel.mapping.remote_port)))
        return client


class TLSTunnelTests(TLSTestCase):
    @defer.inlineCallbacks
    def test_echoOneMebibyte(self):
        """
        1 MiB of random bytes goes through and comes back unchanged, and both
        the control channel and the data channel are TLS connections on which
        the client saw our server certificate.
        """
        yield self.startServer()
        client, public = yield within(self.tunnel.publish(
            self.target, server=tlsServer(HOST, self.tunnel.controlPort, self.trust)),
            15, "registration over TLS")
        payload = randomBytes(1024 * 1024)
        user = yield connectUser(self, public)
        user.transport.write(payload)
        received = yield within(user.whenReceived(len(payload)), 30, "the echo of 1 MiB")
        self.assertEqual(received, payload)

        assertChannelsAreTLS(self, client, self.tunnel.server,
                             os.path.join(self.certificates, certs.SERVER_CERT))

    @defer.inlineCallbacks
    def test_serverNameVerified(self):
        """A client that checks the server's DNS name in its certificate registers."""
        yield self.startServer()
        server = tlsServer(SERVER_NAME, self.tunnel.controlPort, self.trust)
        yield within(self.tunnel.publish(self.target, server=server), 15,
                     f"registration with {SERVER_NAME} verified")

    def test_untrustedCARefused(self):
        """A client that trusts another CA never registers."""
        d = self.startServer()
        d.addCallback(lambda _: self.assertNeverRegisters(
            tlsServer(HOST, self.tunnel.controlPort, self.untrustedCA())))
        return d

    def test_serverNameMismatchRefused(self):
        """
        A server whose certificate is for another name is refused by a
        client that expects tunnel.example.com.
        """
        d = self.startServer(self.otherNameCertificates())
        d.addCallback(lambda _: self.assertNeverRegisters(
            tlsServer(SERVER_NAME, self.tunnel.controlPort, self.trust)))
        return d

    def test_serverAddressMismatchRefused(self):
        """A certificate that does not list 127.0.0.1 is refused by a client that dials it."""
        d = self.startServer(self.otherNameCertificates())
        d.addCallback(lambda _: self.assertNeverRegisters(
            tlsServer(HOST, self.tunnel.controlPort, self.trust)))
        return d


class TLSFailureReportTests(TLSTestCase):
    """What the server and the client say when a TLS handshake fails."""

    @defer.inlineCallbacks
    def test_serverLogsFailedHandshake(self):
        """
        A gotunnel.server warning that names the failed TLS handshake and the
        peer, once the server has dropped the connection.
        """
        yield self.startServer()
        yield self.assertNeverRegisters(
            tlsServer(HOST, self.tunnel.controlPort, self.untrustedCA()))
        registry = self.tunnel.server.registry
        yield waitUntil(lambda: len(registry.connections) == 0, 15,
                        "the server to drop the connection")
        events = self.logs.matching(lambda e: (
            e.get("log_namespace", "").startswith("gotunnel.server")
            and e.get("log_level").name in ("warn", "error")
            and "handshake" in (e.get("log_format") or "").lower()))
        self.assertEqual(len(events), 1, self.logs.text())
        self.assertIn(HOST, self.logs.text())

    @defer.inlineCallbacks
    def test_clientReportsUntrustedServer(self):
        """[ERROR][1001] with OpenSSL's reason, before the client retries."""
        yield self.startServer()
        yield self.assertNeverRegisters(
            tlsServer(HOST, self.tunnel.controlPort, self.untrustedCA()))
        lines = self.stderr.matching(lambda line: line.startswith(UNREACHABLE_PREFIX))
        self.assertEqual(len(lines), 1, self.stderr.items)
        self.assertIn("certificate verify failed", lines[0])

    @defer.inlineCallbacks
    def test_clientReportsNameMismatch(self):
        """[ERROR][1001] naming the host name the certificate does not match."""
        yield self.startServer(self.otherNameCertificates())
        yield self.assertNeverRegisters(
            tlsServer(SERVER_NAME, self.tunnel.controlPort, self.trust))
        lines = self.stderr.matching(lambda line: line.startswith(UNREACHABLE_PREFIX))
        self.assertEqual(len(lines), 1, self.stderr.items)
        self.assertIn(SERVER_NAME, lines[0])


# ---------------------------------------------------------------------------
# docs/tls.md, as a person runs it.


DAEMONS = (".venv/bin/gotunnel-server", ".venv/bin/gotunnel-client")


def documentedCommands(scenario: str = "") -> list[str]:
    """
    The lines of the ```sh blocks of docs/tls.md, in order.  A block whose
    info string names a scenario (```sh mutual-tls) replaces the server and
    client of the untagged blocks: the scenario runs the untagged blocks'
    other commands, then its own block.
    """
    with open(DOCS, encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"^```sh(?: ([\w-]+))?\n(.*?)^```", text,
                        flags=re.MULTILINE | re.DOTALL)
    lines = []
    for tag, block in blocks:
        for line in block.splitlines():
            if not line.strip():
                continue
            if tag == scenario or (not tag and not line.startswith(DAEMONS)):
                lines.append(line)
    return lines


class DocumentedCommandsTests(unittest.TestCase):
    timeout = 120

    def test_scenarios(self):
        """Each scenario of docs/tls.md has one server and one client, and a test below."""
        for scenario in ("", "mutual-tls", "endpoint-strings"):
            daemons = [line.split()[0] for line in documentedCommands(scenario)
                       if line.startswith(DAEMONS)]
            self.assertEqual(sorted(daemons), sorted(DAEMONS), scenario)

    def test_documentedCommands(self):
        """
        Every command of docs/tls.md, in a temporary directory, with the
        ports made free ones: the certificates are made, the server listens
        with TLS, the client registers, and 256 KiB go through and back.
        """
        return self.runScenario("")

    def test_mutualTLSCommands(self):
        """The same with the commands of the mutual TLS section."""
        return self.runScenario("mutual-tls")

    def test_endpointStringCommands(self):
        """The same with the commands of the endpoint strings section."""
        return self.runScenario("endpoint-strings")

    @defer.inlineCallbacks
    def runScenario(self, scenario: str):
        cwd = temporaryDirectory(self)
        target = listenTarget(self)
        ports = {"17000": freePort(), "10080": freePort(), "8000": target}
        programs = {".venv/bin/python": sys.executable,
                    ".venv/bin/gotunnel-server": venvScript("gotunnel-server"),
                    ".venv/bin/gotunnel-client": venvScript("gotunnel-client")}
        children = {}
        for line in documentedCommands(scenario):
            line = re.sub(r"\b(17000|10080|8000)\b", lambda m: str(ports[m.group(1)]), line)
            argv = shlex.split(line)
            if argv[0] in DAEMONS:
                children[argv[0]] = spawn(self, [programs[argv[0]]] + argv[1:], cwd)
                continue
            if argv[0] == ".venv/bin/python":
                argv[0] = programs[argv[0]]
            else:
                argv = ["sh", "-c", line]
            done = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=60)
            self.assertEqual(done.returncode, 0, f"{line}\n{done.stdout}\n{done.stderr}")
        self.assertEqual(sorted(children), sorted(DAEMONS))

        client = children[".venv/bin/gotunnel-client"]
        yield within(client.whenOutput(f"registered 127.0.0.1:{target}->{ports['10080']}", (1,)),
                     60, f"the client's 'registered' line:\n{client.describe()}")
        payload = randomBytes(256 * 1024)
        user = yield connectUser(self, ports["10080"])
        user.transport.write(payload)
        received = yield within(user.whenReceived(len(payload)), 30, "the echo of 256 KiB")
        self.assertEqual(received, payload)
        user.transport.loseConnection()
        yield within(user.closed, 15, "the user's connection to close")

        for child in children.values():
            child.sendSignal("TERM")
        for child in children.values():
            yield within(child.ended, 30, f"{child.argv[0]} to exit after SIGTERM")
            self.assertEqual((child.exitCode, child.signal), (0, None), child.describe())
            self.assertNotIn("Traceback", child.stdout + child.stderr, child.describe())

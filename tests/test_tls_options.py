"""
TLS from the friendly settings, on real loopback sockets: a server with
tls_cert and tls_key, clients with tls, tls_ca and tls_server_name; mutual
TLS with client certificates and the client's name taken from them; a plain
client meeting a TLS server and the reverse; and the console scripts
refusing TLS options that cannot work, with one line.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

from cryptography import x509
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from gotunnel.tls import certs
from gotunnel.tls import contexts as tls
from gotunnel.client.datachannel import DataChannelClient
from gotunnel.config.settings import ClientSettings, ServerSettings
from gotunnel.cli.tap import ClientOptions
from tests.support import (
    REGISTERED,
    HOST, LogWatcher, RawConnection, StreamCapture, Tunnel, connectRaw, connectUser,
    connectionRefused, dataChannelMessage, freePort, jsonFrame, listenTarget, randomBytes,
    registerMessage, temporaryDirectory, venvScript, within,
)
from tests.test_tls import (
    SERVER_NAME, UNREACHABLE_PREFIX, assertChannelsAreTLS, makeCertificates, sslListen,
)

SERVER_SCRIPT = venvScript("gotunnel-server")
CLIENT_SCRIPT = venvScript("gotunnel-client")


def makeClientCertificate(directory: str, name: str, ca: str = "") -> tuple[str, str]:
    """A client certificate for C{name} from the CA in C{ca} (or C{directory})."""
    caArguments = ["--ca", ca] if ca else []
    assert certs.main(["client", "--out", directory, "--name", name, *caArguments],
                      stdout=io.StringIO()) == 0
    cert, key = certs.clientFiles(name)
    return os.path.join(directory, cert), os.path.join(directory, key)


class FriendlyTLSTestCase(unittest.TestCase):
    """
    A CA, a server certificate for tunnel.example.com and 127.0.0.1, a local
    echo service, and log events and standard error collected.
    """

    def setUp(self):
        self.logs = LogWatcher(self)
        self.stderr = StreamCapture()
        self.patch(sys, "__stderr__", self.stderr)
        self.certificates = temporaryDirectory(self)
        makeCertificates(self.certificates, "--name", SERVER_NAME, "--ip", HOST)
        self.ca = self.path(certs.CA_CERT)
        self.tunnel = Tunnel(self)
        self.target = listenTarget(self)

    def path(self, name: str) -> str:
        return os.path.join(self.certificates, name)

    def startServer(self, **overrides) -> defer.Deferred:
        settings = dict(tls_cert=self.path(certs.SERVER_CERT),
                        tls_key=self.path(certs.SERVER_KEY))
        settings.update(overrides)
        return self.tunnel.startServer(**settings)

    def tlsClient(self, **overrides) -> dict:
        settings = dict(tls=True, tls_ca=self.ca)
        settings.update(overrides)
        return settings

    def otherCA(self) -> str:
        """The directory of another CA, one that signed nothing of ours."""
        other = temporaryDirectory(self)
        makeCertificates(other, "--name", SERVER_NAME, "--ip", HOST)
        return other

    def unreachableLines(self) -> list[str]:
        return self.stderr.matching(lambda line: line.startswith(UNREACHABLE_PREFIX))

    @defer.inlineCallbacks
    def assertNeverRegisters(self, **clientSettings):
        """
        A client with C{clientSettings} gives up its first control channel
        without registering, and nothing is published.
        """
        client = self.tunnel.startClient(self.target, **clientSettings)
        tunnel = client.tunnels[0]
        yield within(self.logs.whenMatched(LogWatcher.formatted(
            "reconnecting {mapping}", mapping=str(tunnel.mapping))), 15,
            "the client to give up its first control channel")
        self.assertIsNone(tunnel.channel)
        self.assertEqual(self.tunnel.server.registry.tunnels, {})
        self.assertTrue((yield connectionRefused(tunnel.mapping.remote_port)))
        return client


class FriendlyTLSTests(FriendlyTLSTestCase):
    @defer.inlineCallbacks
    def test_oneMebibyteThroughTLS(self):
        """
        1 MiB of random bytes goes to the service and comes back unchanged;
        the control channel and the data channel are both TLS, on both
        sides, and the client saw our server's certificate on each.
        """
        yield self.startServer()
        client, public = yield within(self.tunnel.publish(self.target, **self.tlsClient()),
                                      15, "registration over TLS")
        payload = randomBytes(1024 * 1024)
        user = yield connectUser(self, public)
        user.transport.write(payload)
        received = yield within(user.whenReceived(len(payload)), 30, "the echo of 1 MiB")
        self.assertEqual(received, payload)

        assertChannelsAreTLS(self, client, self.tunnel.server, self.path(certs.SERVER_CERT))

    @defer.inlineCallbacks
    def test_serverNameChecked(self):
        """--server-name: the certificate must hold that name, whatever address is dialled."""
        yield self.startServer()
        yield within(self.tunnel.publish(
            self.target, **self.tlsClient(tls_server_name=SERVER_NAME)), 15,
            f"registration with {SERVER_NAME} verified")

    @defer.inlineCallbacks
    def test_serverByNameDataChannelsVerified(self):
        """
        A server given by name (localhost) with --server-name: data channels
        go to the address the control channel reached, and are TLS verified
        against the same name.
        """
        yield self.startServer()
        client, public = yield within(self.tunnel.publish(
            self.target, **self.tlsClient(
                server=f"tcp:localhost:{self.tunnel.controlPort}",
                tls_server_name=SERVER_NAME)), 15, "registration through localhost")
        payload = randomBytes(65536)
        user = yield connectUser(self, public)
        user.transport.write(payload)
        self.assertEqual((yield within(user.whenReceived(len(payload)), 30, "the echo")),
                         payload)
        with open(self.path(certs.SERVER_CERT), "rb") as f:
            serverCertificate = x509.load_pem_x509_certificate(f.read())
        [dataChannel] = [c for c in client.tunnels[0].connections
                         if isinstance(c, DataChannelClient)]
        self.assertTrue(ISSLTransport.providedBy(dataChannel.transport))
        self.assertEqual(dataChannel.transport.getPeer().host, HOST)
        self.assertEqual(dataChannel.transport.getPeerCertificate().to_cryptography(),
                         serverCertificate)

    @defer.inlineCallbacks
    def test_wrongCARefused(self):
        """
        A client that trusts another CA never registers; it says why on
        standard error, and the server logs the failed handshake.
        """
        yield self.startServer()
        other = os.path.join(self.otherCA(), certs.CA_CERT)
        yield self.assertNeverRegisters(**self.tlsClient(tls_ca=other))
        [line] = self.unreachableLines()
        self.assertIn("certificate verify failed", line)
        yield within(self.logs.whenMatched(LogWatcher.formatted("TLS handshake with")), 15,
                     "the server's log line")

    @defer.inlineCallbacks
    def test_systemTrustRefusesPrivateCA(self):
        """Without --ca the system's CAs decide, and none of them signed our server."""
        yield self.startServer()
        yield self.assertNeverRegisters(tls=True)
        [line] = self.unreachableLines()
        self.assertIn("certificate verify failed", line)

    @defer.inlineCallbacks
    def test_hostNameMismatchRefused(self):
        """A server name the certificate does not hold is refused, and named."""
        yield self.startServer()
        yield self.assertNeverRegisters(**self.tlsClient(tls_server_name="other.example.com"))
        [line] = self.unreachableLines()
        self.assertIn("other.example.com", line)
        self.assertIn("the server's certificate does not hold the name or address checked",
                      line)


class MutualTLSTests(FriendlyTLSTestCase):
    """The server requires client certificates from its CA; their common name is the client."""

    def startServer(self, **overrides) -> defer.Deferred:
        return super().startServer(tls_client_ca=self.ca, **overrides)

    def clientCertificate(self, name: str, ca: str = "") -> dict:
        cert, key = makeClientCertificate(temporaryDirectory(self), name,
                                          ca or self.certificates)
        return self.tlsClient(tls_client_cert=cert, tls_client_key=key)

    @defer.inlineCallbacks
    def test_accepted(self):
        """alice's certificate, name alice: registered, and bytes go through."""
        yield self.startServer()
        client, public = yield within(self.tunnel.publish(
            self.target, name="alice", **self.clientCertificate("alice")), 15,
            "registration with a client certificate")
        [tunnel] = self.tunnel.server.registry.tunnels.values()
        self.assertEqual(tunnel.name, "alice")
        payload = randomBytes(64 * 1024)
        user = yield connectUser(self, public)
        user.transport.write(payload)
        received = yield within(user.whenReceived(len(payload)), 30, "the echo")
        self.assertEqual(received, payload)

    @defer.inlineCallbacks
    def test_nameFromCertificate(self):
        """A client that sends no name is registered under its certificate's name."""
        yield self.startServer()
        yield within(self.tunnel.publish(self.target, name="", **self.clientCertificate("bob")),
                     15, "registration without a name")
        [tunnel] = self.tunnel.server.registry.tunnels.values()
        self.assertEqual(tunnel.name, "bob")

    @defer.inlineCallbacks
    def test_noCertificateRefused(self):
        """A client without a certificate never registers; both sides say why."""
        yield self.startServer()
        yield self.assertNeverRegisters(name="alice", **self.tlsClient())
        [line] = self.unreachableLines()
        self.assertIn("client certificate", line)
        found = yield within(self.logs.whenMatched(
            LogWatcher.formatted("TLS handshake with")), 15, "the server's log line")
        self.assertIn("certificate", found[0]["why"])

    @defer.inlineCallbacks
    def test_otherCARefused(self):
        """A certificate from another CA is refused in the handshake."""
        yield self.startServer()
        other = self.otherCA()
        yield self.assertNeverRegisters(name="alice", **self.clientCertificate("alice", other))
        self.assertEqual(len(self.unreachableLines()), 1, self.stderr.items)
        found = yield within(self.logs.whenMatched(
            LogWatcher.formatted("TLS handshake with")), 15, "the server's log line")
        self.assertIn("certificate verify failed", found[0]["why"])

    @defer.inlineCallbacks
    def test_nameOtherThanCertificateRefused(self):
        """alice's certificate with the name bob: refused, with the reason on both sides."""
        yield self.startServer()
        client = self.tunnel.startClient(self.target, name="bob",
                                         **self.clientCertificate("alice"))
        reason = "client name 'bob' is not the name in the client's certificate ('alice')"
        yield within(self.logs.whenMatched(LogWatcher.formatted(
            "the server refused {mapping}", reason=reason)), 15, "the client's log line")
        yield within(self.logs.whenMatched(LogWatcher.formatted(
            "refused registration", reason=reason)), 15, "the server's log line")
        self.assertIsNone(client.tunnels[0].channel)
        self.assertEqual(self.tunnel.server.registry.tunnels, {})


    @defer.inlineCallbacks
    def connectRawTLS(self, identity: dict, send: bytes, rawAfter=None):
        """A L{RawConnection} over TLS with the client certificate of C{identity}."""
        settings = ClientSettings(server=f"tcp:{HOST}:{self.tunnel.controlPort}", **identity)
        options = tls.clientOptions(settings, HOST)
        raw = RawConnection(rawAfter)
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, HOST,
                                                              self.tunnel.controlPort))
        yield within(endpoint.connect(Factory.forProtocol(lambda: raw)), 15,
                     "a raw TLS connection")

        def cleanup():
            if not raw.closed.called:
                raw.transport.abortConnection()
            return raw.closed

        self.addCleanup(cleanup)
        raw.transport.write(send)
        return raw

    @defer.inlineCallbacks
    def test_dataChannelOfAnotherCertificateRefused(self):
        """
        bob, with his own certificate and the right token, cannot take a user
        of alice's port; a data channel with alice's certificate (and no
        name: the certificate's) can.
        """
        yield self.startServer()
        alice, bob = self.clientCertificate("alice"), self.clientCertificate("bob")
        public = freePort()
        control = yield self.connectRawTLS(alice, jsonFrame(registerMessage(public, "alice")))
        [answer] = yield within(control.whenFrame(), 15, "register_resp")
        self.assertEqual(answer, REGISTERED)
        user = yield connectUser(self, public)
        [request] = yield within(control.whenFrame(
            lambda f: f.get("type") == "open_data_channel"), 15, "open_data_channel")

        stranger = yield self.connectRawTLS(bob, jsonFrame(
            dataChannelMessage(public, request["conn_id"], name="bob")))
        [answer] = yield within(stranger.whenFrame(), 15, "bob's answer")
        self.assertEqual(answer, {"type": "register_resp", "status": "fail",
                                  "reason": "no user is waiting for this data channel"})

        data = yield self.connectRawTLS(alice, jsonFrame(
            dataChannelMessage(public, request["conn_id"], name="")), rawAfter=1)
        [answer] = yield within(data.whenFrame(), 15, "alice's answer")
        self.assertEqual(answer, {"type": "register_resp", "status": "ok"})
        user.transport.write(b"for alice")
        self.assertEqual((yield within(data.whenRaw(9), 15, "the user's bytes")), b"for alice")


class MismatchTests(FriendlyTLSTestCase):
    """TLS on one side only: a readable reason on both sides, at once."""

    @defer.inlineCallbacks
    def test_plainClientToTLSServer(self):
        """
        A plain client gets register_resp fail naming TLS, and the server
        logs that the client does not speak TLS.
        """
        yield self.startServer()
        client = self.tunnel.startClient(self.target)
        [event] = yield within(self.logs.whenMatched(LogWatcher.formatted(
            "the server refused {mapping}")), 15, "the client's log line")
        self.assertEqual(event["reason"], tls.NOT_TLS_REASON)
        self.assertIn("--tls", event["reason"])
        yield within(self.logs.whenMatched(LogWatcher.formatted(
            "{peer} sent something that is not TLS (a plain-TCP client talking to a TLS "
            "port?)")), 15, "the server's log line")
        self.assertIsNone(client.tunnels[0].channel)
        self.assertEqual(self.tunnel.server.registry.tunnels, {})

    @defer.inlineCallbacks
    def test_plainGoClientToTLSServer(self):
        """A Go client's register frame in plain TCP: the same answer, then the end."""
        yield self.startServer()
        raw = yield connectRaw(self, self.tunnel.controlPort,
                               jsonFrame(registerMessage(freePort(), "go-client")))
        [frame] = yield within(raw.whenFrame(), 15, "the server's answer")
        self.assertEqual(frame, {"type": "register_resp", "status": "fail",
                                 "reason": tls.NOT_TLS_REASON})
        yield within(raw.closed, 15, "the server to close the connection")

    @defer.inlineCallbacks
    def test_tlsClientToPlainServer(self):
        """
        The plain server sees a TLS record where a frame length should be and
        says so; the client says the connection closed in the TLS handshake.
        """
        yield self.tunnel.startServer()
        yield self.assertNeverRegisters(**self.tlsClient())
        [line] = self.unreachableLines()
        self.assertIn("closed during the TLS handshake (is the server plain TCP?", line)
        [event] = yield within(self.logs.whenMatched(LogWatcher.formatted(
            "protocol error from {peer}")), 15, "the server's log line")
        self.assertIn("sent TLS where a gotunnel frame was expected (a TLS client talking "
                      "to this plain-TCP port?", event["why"])

    @defer.inlineCallbacks
    def test_plainClientToSSLEndpoint(self):
        """An ssl: endpoint string (no friendly options): OpenSSL's reason, explained."""
        yield self.tunnel.startServer(listen=sslListen(self.certificates))
        raw = yield connectRaw(self, self.tunnel.controlPort,
                               jsonFrame(registerMessage(freePort(), "go-client")))
        yield within(raw.closed, 15, "the server to close the connection")
        [event] = yield within(self.logs.whenMatched(LogWatcher.formatted(
            "TLS handshake with")), 15, "the server's log line")
        self.assertIn("a plain-TCP client talking to a TLS port?", event["why"])


class SettingsCheckTests(unittest.TestCase):
    """L{tls.checkServerSettings} and L{tls.checkClientSettings}, in this process."""

    def setUp(self):
        self.certificates = temporaryDirectory(self)
        makeCertificates(self.certificates, "--ip", HOST)

    def path(self, name: str) -> str:
        return os.path.join(self.certificates, name)

    def assertRefused(self, check, settings, *words: str) -> None:
        with self.assertRaises(tls.TLSSettingsError) as caught:
            check(settings)
        for word in words:
            self.assertIn(word, str(caught.exception))

    def test_serverGood(self):
        tls.checkServerSettings(ServerSettings(
            tls_cert=self.path(certs.SERVER_CERT), tls_key=self.path(certs.SERVER_KEY),
            tls_client_ca=self.path(certs.CA_CERT)))

    def test_keyOfAnotherCertificate(self):
        self.assertRefused(tls.checkServerSettings, ServerSettings(
            tls_cert=self.path(certs.SERVER_CERT), tls_key=self.path(certs.CA_KEY)),
            "server.tls_key", "is not the key of the certificate")

    def test_keyIsNotAKey(self):
        self.assertRefused(tls.checkServerSettings, ServerSettings(
            tls_cert=self.path(certs.SERVER_CERT), tls_key=self.path(certs.SERVER_CERT)),
            "not a PEM private key")

    def test_clientNeedsTCPEndpoint(self):
        self.assertRefused(tls.checkClientSettings, ClientSettings(
            server="unix:/tmp/gotunnel.sock", tls=True), "needs a tcp: server endpoint")

    def test_clientGood(self):
        cert, key = makeClientCertificate(self.certificates, "alice")
        tls.checkClientSettings(ClientSettings(
            server=f"tcp:{HOST}:17000", tls=True, tls_ca=self.path(certs.CA_CERT),
            tls_client_cert=cert, tls_client_key=key))


class ClientNameTests(unittest.TestCase):
    def test_nameFromClientCertificate(self):
        """Without --name, a client with a certificate is named by it, not by its host."""
        directory = temporaryDirectory(self)
        makeCertificates(directory, "--ip", HOST)
        cert, key = makeClientCertificate(directory, "alice")
        options = ClientOptions()
        options.parseOptions(["-t", "t", "-m", "22:10022", "--tls", "--ca",
                              os.path.join(directory, certs.CA_CERT),
                              "--tls-client-cert", cert, "--tls-client-key", key])
        self.assertEqual(options.settings().name, "alice")


# ---------------------------------------------------------------------------
# The console scripts


class BadTLSOptionsTests(unittest.TestCase):
    """TLS options that cannot work: exit status 2 and one line, before anything starts."""

    def setUp(self):
        self.cwd = temporaryDirectory(self)
        makeCertificates(os.path.join(self.cwd, "certs"), "--ip", HOST)
        with open(os.path.join(self.cwd, "bad.pem"), "w") as f:
            f.write("not a certificate\n")

    def assertRefused(self, script: str, argv: list[str], line: str,
                      config: str = "") -> None:
        if config:
            with open(os.path.join(self.cwd, "config.yaml"), "w") as f:
                f.write(config)
        done = subprocess.run([script, *argv], cwd=self.cwd, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)
        described = f"exit status {done.returncode}\n{done.stdout}\n{done.stderr}"
        self.assertEqual(done.returncode, 2, described)
        self.assertEqual(done.stderr, f"{os.path.basename(script)}: error: {line}\n",
                         described)

    def test_certWithoutKey(self):
        self.assertRefused(SERVER_SCRIPT, ["-t", "t", "--tls-cert", "certs/server.pem"],
                           "--tls-cert needs --tls-key as well")

    def test_clientCAWithoutCert(self):
        self.assertRefused(SERVER_SCRIPT, ["-t", "t", "--tls-client-ca", "certs/ca.pem"],
                           "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")

    def test_unreadableCert(self):
        self.assertRefused(SERVER_SCRIPT, ["-t", "t", "--tls-cert", "missing.pem",
                                           "--tls-key", "certs/server.key"],
                           "--tls-cert missing.pem: cannot read it: No such file or directory")

    def test_badPEM(self):
        self.assertRefused(SERVER_SCRIPT, ["-t", "t", "--tls-cert", "bad.pem",
                                           "--tls-key", "certs/server.key"],
                           "--tls-cert bad.pem: no PEM certificate in it")

    def test_certAndSSLEndpoint(self):
        self.assertRefused(
            SERVER_SCRIPT, ["-t", "t", "--tls-cert", "certs/server.pem",
                            "--tls-key", "certs/server.key", "--listen",
                            "ssl:0:privateKey=certs/server.key:certKey=certs/server.pem"],
            "--tls-cert and an ssl: endpoint in --listen both set up TLS; use one of them")

    def test_configKeyWithoutKey(self):
        self.assertRefused(SERVER_SCRIPT, [],
                           "config.yaml: server.tls_cert needs server.tls_key as well",
                           config="server:\n  token: t\n  tls_cert: certs/server.pem\n")

    def test_caWithoutTLS(self):
        self.assertRefused(CLIENT_SCRIPT, ["-t", "t", "-m", "22:10022", "--ca", "certs/ca.pem"],
                           "--ca is for TLS; turn TLS on with --tls")

    def test_tlsWithTLSEndpoint(self):
        self.assertRefused(CLIENT_SCRIPT, ["-t", "t", "-m", "22:10022", "--tls", "--server",
                                           "tls:127.0.0.1:17000"],
                           "--tls needs a tcp: server endpoint in --server (got tls:); "
                           "a tls: endpoint string sets up its own connection")

    def test_clientCertWithoutKey(self):
        self.assertRefused(CLIENT_SCRIPT, ["-t", "t", "-m", "22:10022", "--tls",
                                           "--tls-client-cert", "certs/server.pem"],
                           "--tls-client-cert needs --tls-client-key as well")

    def test_badCA(self):
        self.assertRefused(CLIENT_SCRIPT, ["-t", "t", "-m", "22:10022", "--tls",
                                           "--ca", "bad.pem"],
                           "--ca bad.pem: no PEM certificate in it")

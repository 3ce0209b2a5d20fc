"""
The cipher suites L{gotunnel.tls} negotiates: our server and client settle
on AES-128-GCM (in TLS 1.3 and in TLS 1.2), and each still accepts a peer
that offers only AES-256-GCM.  Handshakes in memory (L{twisted.test.iosim}):
our ends are Twisted's TLS with the options the tunnel uses; the other
peers are the standard library's C{ssl} (an C{SSLObject} on memory BIOs),
or pyOpenSSL where C{ssl} cannot restrict TLS 1.3's suites.
"""

from __future__ import annotations

import os
import ssl as stdlib

from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial import unittest

from gotunnel.tls import certs
from gotunnel.tls import contexts as tls
from gotunnel.config.settings import ClientSettings, ServerSettings
from tests.support import HOST, temporaryDirectory
from tests.test_tls import makeCertificates

AES128_TLS13 = "TLS_AES_128_GCM_SHA256"
AES256_TLS13 = "TLS_AES_256_GCM_SHA384"
AES128_TLS12 = "ECDHE-ECDSA-AES128-GCM-SHA256"
AES256_TLS12 = "ECDHE-ECDSA-AES256-GCM-SHA384"


class HandshakingPeer(Protocol):
    """
    A TLS end other than Twisted's, on iosim's transport: C{feed} takes
    what came from the other end and returns what to send; C{suite} and
    C{version} once the handshake is done.
    """

    done = False

    def connectionMade(self) -> None:
        self.dataReceived(b"")

    def dataReceived(self, data: bytes) -> None:
        out = self.feed(data)
        if out:
            self.transport.write(out)


class StdlibPeer(HandshakingPeer):
    """The standard library's C{ssl}: an C{SSLObject} on two memory BIOs."""

    def __init__(self, context: stdlib.SSLContext, serverSide: bool) -> None:
        self.incoming, self.outgoing = stdlib.MemoryBIO(), stdlib.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=serverSide,
                                    server_hostname=None if serverSide else HOST)

    def feed(self, data: bytes) -> bytes:
        self.incoming.write(data)
        if not self.done:
            try:
                self.tls.do_handshake()
                self.done = True
            except stdlib.SSLWantReadError:
                pass
        return self.outgoing.read()

    @property
    def suite(self) -> str:
        return self.tls.cipher()[0]

    @property
    def version(self) -> str:
        return self.tls.version()


class PyOpenSSLPeer(HandshakingPeer):
    """pyOpenSSL's C{Connection} on its memory BIO, for TLS 1.3 suites C{ssl} cannot choose."""

    def __init__(self, context: SSL.Context, serverSide: bool) -> None:
        self.tls = SSL.Connection(context, None)
        if serverSide:
            self.tls.set_accept_state()
        else:
            self.tls.set_connect_state()

    def feed(self, data: bytes) -> bytes:
        if data:
            self.tls.bio_write(data)
        if not self.done:
            try:
                self.tls.do_handshake()
                self.done = True
            except SSL.WantReadError:
                pass
        out = b""
        while True:
            try:
                out += self.tls.bio_read(1 << 16)
            except SSL.WantReadError:
                break
        return out

    @property
    def suite(self) -> str:
        return self.tls.get_cipher_name()

    @property
    def version(self) -> str:
        return self.tls.get_protocol_version_name()


class SuiteTests(unittest.TestCase):
    def setUp(self) -> None:
        self.certificates = temporaryDirectory(self)
        makeCertificates(self.certificates, "--ip", HOST)

    def path(self, name: str) -> str:
        return os.path.join(self.certificates, name)

    def ourServer(self) -> Protocol:
        settings = ServerSettings(tls_cert=self.path(certs.SERVER_CERT),
                                  tls_key=self.path(certs.SERVER_KEY))
        factory = TLSMemoryBIOFactory(tls.serverContextFactory(settings), False,
                                      Factory.forProtocol(Protocol))
        return factory.buildProtocol(IPv4Address("TCP", HOST, 0))

    def ourClient(self) -> Protocol:
        settings = ClientSettings(tls=True, tls_ca=self.path(certs.CA_CERT))
        factory = TLSMemoryBIOFactory(tls.clientOptions(settings, HOST), True,
                                      Factory.forProtocol(Protocol))
        return factory.buildProtocol(IPv4Address("TCP", HOST, 0))

    def stdlibContext(self, serverSide: bool, suite: str = "",
                      maximum: stdlib.TLSVersion = stdlib.TLSVersion.MAXIMUM_SUPPORTED):
        """
        A standard-library context, at most TLS C{maximum}; C{suite} (a TLS
        1.2 cipher) is the only one it offers.
        """
        if serverSide:
            context = stdlib.SSLContext(stdlib.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.path(certs.SERVER_CERT), self.path(certs.SERVER_KEY))
        else:
            context = stdlib.SSLContext(stdlib.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(self.path(certs.CA_CERT))
        context.maximum_version = maximum
        if suite:
            context.set_ciphers(suite)
        return context

    def pyOpenSSLContext(self, serverSide: bool, tls13Suites: bytes) -> SSL.Context:
        """A pyOpenSSL context in TLS 1.3 that offers only C{tls13Suites}."""
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        context.set_tls13_ciphersuites(tls13Suites)
        if serverSide:
            context.use_certificate_chain_file(self.path(certs.SERVER_CERT))
            context.use_privatekey_file(self.path(certs.SERVER_KEY))
        return context

    def handshake(self, server: Protocol, client: Protocol) -> None:
        """Join C{server} and C{client} in memory and run their handshake to its end."""
        pump = iosim.connect(server, iosim.makeFakeServer(server),
                             client, iosim.makeFakeClient(client), greet=False)
        pump.flush()
        for end in (server, client):
            tlsConnection = getattr(end, "_tlsConnection", None)
            if tlsConnection is None:
                self.assertTrue(end.done, "the peer's handshake did not finish")
            else:
                self.assertTrue(end._handshakeDone, "our handshake did not finish")

    def negotiated(self, end: Protocol) -> tuple[str, str]:
        """The protocol version and the suite C{end} settled on."""
        tlsConnection = getattr(end, "_tlsConnection", None)
        if tlsConnection is None:
            return end.version, end.suite
        return tlsConnection.get_protocol_version_name(), tlsConnection.get_cipher_name()

    def test_ourEndsNegotiateAES128(self):
        """Our server and our client settle on TLS 1.3 with AES-128-GCM."""
        server, client = self.ourServer(), self.ourClient()
        self.handshake(server, client)
        self.assertEqual(self.negotiated(server), ("TLSv1.3", AES128_TLS13))
        self.assertEqual(self.negotiated(client), ("TLSv1.3", AES128_TLS13))

    def test_serverPrefersAES128OverClientOrder(self):
        """
        Our server picks AES-128-GCM from a stdlib client that offers OpenSSL's
        default order (AES-256 first), in TLS 1.3 and in TLS 1.2.
        """
        for maximum, suite in ((stdlib.TLSVersion.TLSv1_3, AES128_TLS13),
                               (stdlib.TLSVersion.TLSv1_2, AES128_TLS12)):
            server = self.ourServer()
            client = StdlibPeer(self.stdlibContext(False, maximum=maximum), False)
            self.handshake(server, client)
            self.assertEqual(self.negotiated(server)[1], suite)
            self.assertEqual(client.suite, suite)

    def test_clientOffersAES128First(self):
        """
        A stdlib server that honours the client's order (OpenSSL's default;
        Python's own is its server's order, AES-256 first) gets AES-128-GCM
        from our client, in TLS 1.3 and in TLS 1.2.
        """
        for maximum, suite in ((stdlib.TLSVersion.TLSv1_3, AES128_TLS13),
                               (stdlib.TLSVersion.TLSv1_2, AES128_TLS12)):
            context = self.stdlibContext(True, maximum=maximum)
            context.options &= ~stdlib.OP_CIPHER_SERVER_PREFERENCE
            server = StdlibPeer(context, True)
            client = self.ourClient()
            self.handshake(server, client)
            self.assertEqual(self.negotiated(client)[1], suite)

    def test_serverAcceptsAES256OnlyClient(self):
        """Our server still accepts a client that offers only AES-256-GCM, in TLS 1.3 and 1.2."""
        server = self.ourServer()
        client = PyOpenSSLPeer(self.pyOpenSSLContext(False, AES256_TLS13.encode()), False)
        self.handshake(server, client)
        self.assertEqual(self.negotiated(server), ("TLSv1.3", AES256_TLS13))

        server = self.ourServer()
        client = StdlibPeer(self.stdlibContext(False, AES256_TLS12, stdlib.TLSVersion.TLSv1_2),
                            False)
        self.handshake(server, client)
        self.assertEqual(self.negotiated(server), ("TLSv1.2", AES256_TLS12))

    def test_clientAcceptsAES256OnlyServer(self):
        """Our client still accepts a server that offers only AES-256-GCM, in TLS 1.3 and 1.2."""
        server = PyOpenSSLPeer(self.pyOpenSSLContext(True, AES256_TLS13.encode()), True)
        client = self.ourClient()
        self.handshake(server, client)
        self.assertEqual(self.negotiated(client), ("TLSv1.3", AES256_TLS13))

        server = StdlibPeer(self.stdlibContext(True, AES256_TLS12, stdlib.TLSVersion.TLSv1_2),
                            True)
        client = self.ourClient()
        self.handshake(server, client)
        self.assertEqual(self.negotiated(client), ("TLSv1.2", AES256_TLS12))

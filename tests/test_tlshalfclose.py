"""
L{gotunnel.tls.halfclose} in memory: two TLS ends joined by
L{twisted.test.iosim}, each direction's end-of-stream carried on its own
as a close_notify, in TLS 1.3 and 1.2, and against Twisted's own TLS (which
closes both ways, as a Go peer does).
"""

from __future__ import annotations

from datetime import datetime, timezone
from ipaddress import ip_address

from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test import iosim
from twisted.trial import unittest
from zope.interface import implementer

from gotunnel.tls import certmaking
from gotunnel.relay.splice import canHalfClose
from gotunnel.tls.halfclose import HalfCloseableClientTLSFactory, HalfCloseableTLS

NAME = "tunnel.example.com"


def tlsOptions(maximum=None) -> tuple[object, object]:
    """Server and client TLS options for L{NAME}, at most TLS version C{maximum}."""
    now = datetime.now(timezone.utc)
    ca = certmaking.makeCA("test CA", now)
    server = certmaking.makeServer(ca, [NAME], [ip_address("127.0.0.1")], now)
    limit = {} if maximum is None else {"lowerMaximumSecurityTo": maximum}
    serverOptions = ssl.CertificateOptions(certificate=server.certificate,
                                           privateKey=server.key, **limit)
    trust = ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(ca.certificate))])
    clientOptions = ssl.optionsForClientTLS(NAME, trustRoot=trust,
                                            extraCertificateOptions=limit or None)
    return serverOptions, clientOptions


class Plain(Protocol):
    """What a wrapped protocol is told, in order; what it reads, joined."""

    def __init__(self) -> None:
        self.received = b""
        self.events: list[object] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason=None) -> None:
        self.events.append(reason.type)


@implementer(IHalfCloseableProtocol)
class HalfCloseable(Plain):
    def readConnectionLost(self) -> None:
        self.events.append("read ended")

    def writeConnectionLost(self) -> None:
        self.events.append("write ended")


class HalfCloseTests(unittest.TestCase):
    def connect(self, server: Protocol, client: Protocol, maximum=None,
                serverTLS=HalfCloseableTLS, handshake: bool = True) -> iosim.IOPump:
        """
        Join C{server} and C{client} through TLS in memory: the server's
        TLS is C{serverTLS}, the client's the one the tunnel's client uses;
        with C{handshake}, the handshake is done before this returns.
        """
        clock = Clock()
        serverOptions, clientOptions = tlsOptions(maximum)
        serverEnd = serverTLS(TLSMemoryBIOFactory(serverOptions, False, Factory(), clock), server)
        clientFactory = HalfCloseableClientTLSFactory(clientOptions, True, Factory(), clock)
        clientEnd = clientFactory.protocol(clientFactory, client)
        pump = iosim.connect(serverEnd, iosim.makeFakeServer(serverEnd),
                             clientEnd, iosim.makeFakeClient(clientEnd), clock=clock,
                             greet=handshake)
        self.assertEqual(clientEnd._handshakeDone, handshake)
        self.serverTransport, self.clientTransport = serverEnd.transport, clientEnd.transport
        return pump

    def halfCloseThenAnswer(self, maximum=None) -> None:
        server, client = HalfCloseable(), HalfCloseable()
        pump = self.connect(server, client, maximum)
        self.assertTrue(canHalfClose(client.transport))
        client.transport.write(b"question")
        client.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual((server.received, server.events), (b"question", ["read ended"]))
        self.assertEqual(client.events, ["write ended"])
        self.assertFalse(self.serverTransport.disconnecting)

        server.transport.write(b"answer")
        pump.flush()
        self.assertEqual(client.received, b"answer")
        server.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual(client.events, ["write ended", "read ended", ConnectionDone])
        self.assertEqual(server.events, ["read ended", "write ended", ConnectionDone])

    def test_halfCloseThenAnswer(self):
        """
        The client's end-of-stream reaches the server as readConnectionLost,
        the server's answer still reaches the client, and the server's own
        end-of-stream then closes the connection, cleanly, at both ends.
        """
        self.halfCloseThenAnswer()

    def test_halfCloseThenAnswerInTLS12(self):
        """The same in TLS 1.2, where OpenSSL also reads and writes on after a close_notify."""
        self.halfCloseThenAnswer(ssl.TLSVersion.TLSv1_2)

    def test_halfCloseBeforeTheHandshake(self):
        """
        Written and half-closed before the handshake is done: the bytes,
        then the end-of-stream, go once it is, and the answer still comes.
        """
        server, client = HalfCloseable(), HalfCloseable()
        pump = self.connect(server, client, handshake=False)
        client.transport.write(b"early")
        client.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual((server.received, server.events), (b"early", ["read ended"]))
        server.transport.write(b"answer")
        pump.flush()
        self.assertEqual((client.received, client.events), (b"answer", ["write ended"]))

    def test_halfCloseBeforeTheHandshakeWithNothingWritten(self):
        """Half-closed before the handshake, with nothing written: the end goes once it is done."""
        server, client = HalfCloseable(), HalfCloseable()
        pump = self.connect(server, client, handshake=False)
        client.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual((server.received, server.events), (b"", ["read ended"]))
        self.assertEqual(client.events, ["write ended"])

    def test_writesAfterTheEndAreDropped(self):
        """
        A write after loseWriteConnection is dropped, as TCP drops it,
        instead of OpenSSL's refusal breaking the connection.
        """
        server, client = HalfCloseable(), HalfCloseable()
        pump = self.connect(server, client)
        client.transport.loseWriteConnection()
        client.transport.write(b"late")
        server.transport.write(b"answer")
        pump.flush()
        self.assertEqual((server.received, client.received), (b"", b"answer"))
        self.assertEqual(client.events, ["write ended"])

    def test_closeDoesNotWaitForThePeer(self):
        """
        A full close sends close_notify and closes the TCP connection at
        once: the peer, which only read an end-of-stream, is not waited for.
        """
        server, client = HalfCloseable(), HalfCloseable()
        pump = self.connect(server, client)
        server.transport.write(b"bye")
        server.transport.loseConnection()
        pump.flush()
        self.assertEqual(client.received, b"bye")
        self.assertEqual(client.events, ["read ended", ConnectionDone])
        self.assertEqual(server.events, [ConnectionDone])

    def test_twistedPeerClosesBothWays(self):
        """
        Against Twisted's own TLS, which answers a close_notify by closing
        both ways (as a Go peer closes), a half-close ends the connection,
        and both ends learn it.
        """
        server, client = Plain(), HalfCloseable()
        pump = self.connect(server, client, serverTLS=TLSMemoryBIOProtocol)
        server.transport.write(b"banner")
        client.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual(client.received, b"banner")
        self.assertEqual(client.events, ["write ended", "read ended", ConnectionDone])
        self.assertEqual(server.events, [ConnectionDone])

    def test_peerThatClosesLikeGo(self):
        """
        A peer that closes as Go's crypto/tls does, a close_notify and at
        once a FIN: its end-of-stream, then a clean end of the connection.
        """
        server, client = Plain(), HalfCloseable()
        pump = self.connect(server, client, serverTLS=TLSMemoryBIOProtocol)
        server.transport.write(b"bye")
        server.transport.loseConnection()
        self.serverTransport.loseConnection()
        pump.flush()
        self.assertEqual(client.received, b"bye")
        self.assertEqual(client.events, ["read ended", ConnectionDone])

    def test_otherProtocolsCloseBothWays(self):
        """
        A wrapped protocol that does not take each direction's end on its
        own keeps Twisted's behaviour: the peer's close_notify ends it.
        """
        server, client = Plain(), Plain()
        pump = self.connect(server, client)
        client.transport.loseConnection()
        pump.flush()
        self.assertEqual((server.events, client.events), ([ConnectionDone], [ConnectionDone]))

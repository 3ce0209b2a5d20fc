"""
writes.writeThrough: what the relay writes goes to a plain TCP socket at
once, not at the reactor's next turn, and never ahead of bytes Twisted
still holds.  And end-of-stream: half-close where the transport can.
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from zope.interface import implementer

from gotunnel.relay.splice import RelayEnd, canHalfClose
from gotunnel.relay.eagerio import twistedBuffered, writeThrough

from tests.support import randomBytes, within
from tests.test_zerocopy import connectedPair

WAIT = 30


class WriteThroughTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.pair = yield connectedPair(self)
        self.transport = self.pair.end.transport

    @defer.inlineCallbacks
    def test_sentAtOnce(self):
        """Into an empty buffer, the bytes go to the kernel in the call itself."""
        writeThrough(self.transport, b"now")
        self.assertEqual(twistedBuffered(self.transport), 0)
        self.assertNotIn(self.transport, reactor.getWriters())
        got = yield within(self.pair.outside.whenReceived(3), WAIT, "the bytes")
        self.assertEqual(got, b"now")

    @defer.inlineCallbacks
    def test_afterWhatIsBuffered(self):
        """Behind bytes Twisted still holds, the bytes wait their turn, in order."""
        first, second = randomBytes(64 * 1024), b"second"
        self.transport.write(first)
        writeThrough(self.transport, second)
        self.assertEqual(twistedBuffered(self.transport), len(first) + len(second))
        got = yield within(self.pair.outside.whenReceived(len(first + second)), WAIT,
                           "both writes")
        self.assertEqual(got, first + second)

    @defer.inlineCallbacks
    def test_fullSocketKeepsTheRest(self):
        """What the socket does not take is buffered as Twisted's write would."""
        self.pair.outside.transport.pauseProducing()
        payload = randomBytes(32 * 1024 * 1024)
        writeThrough(self.transport, payload)
        self.assertGreater(twistedBuffered(self.transport), 0)
        self.pair.outside.transport.resumeProducing()
        got = yield within(self.pair.outside.whenReceived(len(payload)), WAIT, "32 MiB")
        self.assertEqual(got, payload)

    def test_otherTransports(self):
        """Transports that are not plain TCP get an ordinary write."""
        transport = StringTransport()
        writeThrough(transport, b"bytes")
        self.assertEqual(transport.value(), b"bytes")


@implementer(IHalfCloseableDescriptor)
class HalfCloseableTransport(StringTransport):
    """A TCP-like fake: records a half-close."""

    writeLost = False

    def loseWriteConnection(self) -> None:
        self.writeLost = True


class TLSEndOfStreamTests(unittest.TestCase):
    def tlsOver(self, below: StringTransport):
        """A relay end whose transport is TLS (client side) over C{below}."""
        end = RelayEnd()
        factory = TLSMemoryBIOFactory(optionsForClientTLS("tunnel.example.com"), True,
                                      Factory.forProtocol(Protocol))
        tls = factory.buildProtocol(None)
        tls.makeConnection(below)
        end.transport = tls
        return end

    def test_plainTCPHalfCloses(self):
        below = HalfCloseableTransport()
        end = RelayEnd()
        end.transport = below
        below.registerProducer(StringTransport(), True)
        self.assertTrue(canHalfClose(below))
        end.shutdownWrite()
        self.assertTrue(below.writeLost)

    def test_tlsDoesNotHalfCloseTheSocketBelow(self):
        """
        A TLS transport copies the interfaces of the TCP one below it, yet
        end-of-stream must not go to that socket under the TLS stream: the
        relay sends nothing and closes nothing, and the answer still owed
        can come back.
        """
        below = HalfCloseableTransport()
        end = self.tlsOver(below)
        self.assertTrue(IHalfCloseableDescriptor.providedBy(end.transport))
        self.assertFalse(canHalfClose(end.transport))
        end.transport.registerProducer(StringTransport(), True)
        end.shutdownWrite()
        self.assertFalse(below.writeLost)
        self.assertFalse(below.disconnecting)
        self.assertFalse(end.transport.disconnecting)

"""
Half-close through TLS: a data channel carries each direction's
end-of-stream on its own, as a TLS close_notify, while the other direction
goes on (TLS 1.3 allows it, RFC 8446 section 6.1; OpenSSL reads on after
sending its close_notify, and writes on after receiving the peer's).

Twisted's L{TLSMemoryBIOProtocol} cannot: it answers a close_notify with
its own and closes the connection both ways (C{_flushReceiveBIO}), and it
has no C{loseWriteConnection} of its own, so the name falls through
C{ProtocolWrapper.__getattr__} to the TCP transport, whose bare FIN under
the TLS stream the peer takes for a truncation.  L{HalfCloseableTLS}
changes that for a wrapped protocol that provides
L{IHalfCloseableProtocol} (a relay end, see L{gotunnel.relay.splice}):

  - C{loseWriteConnection} sends a close_notify once what is written has
    gone into TLS records, and goes on reading;
  - a close_notify received is that protocol's C{readConnectionLost}, and
    its writes go on;
  - once both have passed, or the protocol closes the connection, the TCP
    connection is closed after our close_notify, without waiting for the
    peer's (a peer that still has bytes to send must not keep it open).

Another protocol (the client's control channel) keeps Twisted's behaviour.
A Go peer (crypto/tls) reads a close_notify as io.EOF, as it reads a FIN in
plain TCP, and closes with a close_notify and a FIN: we read its
end-of-stream, then the end of the connection.

The Twisted internals this relies on (twisted/protocols/tls.py, checked
with Twisted 26.10): C{_flushReceiveBIO}'s loop (copied below with the
close_notify handled), C{_checkHandshakeStatus}, C{_unbufferPendingWrites},
C{_write}, C{_shutdownTLS}, C{_flushSendBIO}, C{_tlsShutdownFinished}, and
the attributes C{_tlsConnection}, C{_appSendBuffer}, C{_handshakeDone},
C{_lostTLSConnection}, C{_aborted}; C{BufferingTLSTransport._aggregator}.
The methods are listed in L{gotunnel.relay.tcpinternals.HALF_CLOSE_TLS_OVERRIDES},
whose check a test runs.
"""

from __future__ import annotations

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import IHalfCloseableProtocol, IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import (
    BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from gotunnel.relay.splice import IHalfCloseableTLS


@implementer(IHalfCloseableTLS)
class HalfCloseableTLS(TLSMemoryBIOProtocol):
    """
    A L{TLSMemoryBIOProtocol} that half-closes each direction on its own
    for a wrapped protocol that provides L{IHalfCloseableProtocol}.
    """

    _halfCloses = False
    """Whether the wrapped protocol takes each direction's end on its own."""
    _writeEnding = False
    """C{loseWriteConnection} was called: a close_notify follows what is buffered."""
    _writeEnded = False
    """Our close_notify is sent: nothing more is written."""
    _readEnded = False
    """The peer's close_notify came: nothing more is read."""

    def __init__(self, factory, wrappedProtocol, *args, **kwargs) -> None:
        super().__init__(factory, wrappedProtocol, *args, **kwargs)
        self._halfCloses = IHalfCloseableProtocol.providedBy(wrappedProtocol)

    def loseWriteConnection(self) -> None:
        """
        Send a close_notify once what is written has gone out (after the
        handshake, which holds what is written before it), and go on
        reading.
        """
        if self._writeEnding or self.disconnecting or not self.connected:
            return
        self._writeEnding = True
        self._endWriting()

    def _endWriting(self) -> None:
        if not self._writeEnding or self._writeEnded or not self._handshakeDone \
                or self._appSendBuffer or self._lostTLSConnection:
            return
        self._writeEnded = True
        try:
            both = self._tlsConnection.shutdown()
        except Error:
            both = False
        self._flushSendBIO()
        if self._halfCloses:
            self.wrappedProtocol.writeConnectionLost()
        if both or self._readEnded:
            self.transport.loseConnection()

    def _checkHandshakeStatus(self) -> None:
        super()._checkHandshakeStatus()
        self._endWriting()

    def _unbufferPendingWrites(self) -> None:
        super()._unbufferPendingWrites()
        self._endWriting()

    def _write(self, bytes: bytes) -> None:
        # After our close_notify OpenSSL refuses to write, and Twisted takes
        # its refusal for a broken connection: a late write is dropped, as
        # a TCP transport drops one after loseWriteConnection.
        if not self._writeEnded:
            super()._write(bytes)

    def _shutdownTLS(self) -> None:
        super()._shutdownTLS()
        # Twisted waits for the peer's close_notify before it closes the
        # TCP connection; a peer that half-closes answers only when its own
        # direction ends, and what it sends meanwhile has no reader.
        if self._halfCloses and self.disconnecting and not self._aborted:
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if self._halfCloses and self.disconnecting and not self._aborted:
            # We closed without waiting for the peer's close_notify: its
            # absence is no truncation (which Twisted would report as
            # ConnectionLost, and the relay pass on as a reset).
            self._lostTLSConnection = True
        super().connectionLost(reason)

    def _flushReceiveBIO(self) -> None:
        if not self._halfCloses:
            super()._flushReceiveBIO()
            return
        # Twisted's loop, except on a close_notify (ZeroReturnError).
        while not self._lostTLSConnection and not self._readEnded:
            try:
                data = self._tlsConnection.recv(2**15)
            except WantReadError:
                break
            except ZeroReturnError:
                self._peerEndedWriting()
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
        self._flushSendBIO()

    def _peerEndedWriting(self) -> None:
        self._readEnded = True
        self.wrappedProtocol.readConnectionLost()
        if self._writeEnded:
            self.transport.loseConnection()


class HalfCloseableClientTLS(HalfCloseableTLS, BufferingTLSTransport):
    """Twisted's client TLS transport (small writes gathered), half-closeable."""

    def loseWriteConnection(self) -> None:
        self._aggregator.flush()
        super().loseWriteConnection()


class HalfCloseableClientTLSFactory(TLSMemoryBIOFactory):
    protocol = HalfCloseableClientTLS
    noisy = False


@implementer(IStreamClientEndpoint)
class HalfCloseableTLSEndpoint:
    """
    L{twisted.internet.endpoints.wrapClientTLS}, with connections that
    half-close (L{HalfCloseableClientTLS}).
    """

    def __init__(self, connectionCreator, wrappedEndpoint: IStreamClientEndpoint) -> None:
        self.connectionCreator = connectionCreator
        # Named as Twisted's wrapper names it: gotunnel.client.endpoints.serverAddress
        # finds the address through it.
        self._wrappedEndpoint = wrappedEndpoint

    def connect(self, protocolFactory):
        wrapper = HalfCloseableClientTLSFactory(self.connectionCreator, True, protocolFactory)
        connecting = self._wrappedEndpoint.connect(wrapper)
        return connecting.addCallback(lambda protocol: protocol.wrappedProtocol)

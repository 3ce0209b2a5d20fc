"""
The framing every gotunnel connection starts with: 4-byte big-endian length,
one JSON object per frame, dispatched to C{msg_<type>} methods.
"""

from __future__ import annotations

import sys
from typing import Optional

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from gotunnel.wire import messages
from gotunnel.wire.messages import Message, ProtocolError
from gotunnel.relay.eagerio import writeThrough

MAX_FRAME = 64 * 1024

MAX_BACKLOG = 1024 * 1024
"""Bytes of frames a connection may have us write while its peer reads none of them."""

TLS_RECORD_TYPES = range(0x14, 0x18)
"""change_cipher_spec, alert, handshake, application_data."""

TLS_HINTS = (
    ("wrong version number", "the peer sent something that is not TLS "
                             "(a plain-TCP client talking to a TLS port?)"),
    ("certificate verify failed", "the client's certificate is not signed by a CA of "
                                  "--tls-client-ca, or has expired"),
    ("peer did not return a certificate", "the client presented no certificate "
                                          "(mutual TLS: --tls-client-cert)"),
    ("alert unknown ca", "the client does not trust this server's certificate (its --ca "
                         "must be the CA that signed --tls-cert)"),
    ("alert certificate expired", "the client says this server's certificate (--tls-cert) "
                                  "has expired"),
)
"""OpenSSL's words for a handshake the server saw fail, and what they most likely mean."""

CLIENT_TLS_HINTS = (
    ("wrong version number", "the server answered with something that is not TLS "
                             "(a plain-TCP server? then connect without --tls)"),
    ("certificate verify failed", "the server's certificate is not signed by a CA this "
                                  "client trusts (check --ca)"),
    ("certificate required", "the server requires a client certificate "
                             "(give --tls-client-cert and --tls-client-key)"),
    ("unknown ca", "the server does not trust the CA of this client certificate"),
    ("alert certificate expired", "the server says this client's certificate "
                                  "(--tls-client-cert) has expired"),
    ("Mismatch(", "the server's certificate does not hold the name or address checked "
                  "(give --server-name, or add it to the certificate)"),
)
"""The same for the client: each hint names only the client's own options."""


HTTP_REQUEST_STARTS = frozenset((b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI",
                                 b"PATC", b"CONN", b"TRAC", b"PRI "))
"""The first four bytes of an HTTP request (PRI: HTTP/2's preface), read as a frame length."""

HTTP_REQUEST = ("sent an HTTP request: this is gotunnel's control port; "
                "an HTTP client should use a public port")
HTTP_RESPONSE = ("answered in HTTP: that is a web server, not gotunnel's control port "
                 "(check --server)")


def looksLikeTLS(length: int) -> bool:
    """Whether a frame length is really the start of a TLS record: its type, then version 3.x."""
    return (length >> 24) in TLS_RECORD_TYPES and (length >> 16) & 0xFF == 3


def describePeer(transport: object) -> str:
    """
    A short "host:port" for log lines about the far end of C{transport}.
    """
    try:
        peer = transport.getPeer()  # type: ignore[attr-defined]
    except Exception:
        return "?"
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    if host is None:
        return str(peer)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tlsFailure(reason: Optional[Failure], hints: tuple[tuple[str, str], ...] = TLS_HINTS,
               transport: object = None, now: float = 0.0) -> Optional[str]:
    """
    What went wrong, if a connection ended because its TLS handshake or the
    peer's certificate failed, with the likely cause from C{hints}; None for
    any other ending.  Given the connection's C{transport} and the time
    C{now}, a certificate refused for its dates is named, with the date.
    """
    if reason is None or sys.modules.get("OpenSSL.SSL") is None:
        # Without pyOpenSSL loaded (a plain run may leave it out) there was
        # no TLS to fail.
        return None
    from OpenSSL.SSL import Error as SSLError
    from service_identity import VerificationError

    from gotunnel.tls.contexts import outOfDate

    if reason.check(SSLError, VerificationError):
        message = reason.getErrorMessage()
        if transport is not None and "certificate verify failed" in message:
            dates = outOfDate(transport, now)
            if dates is not None:
                return f"{message}: {dates}"
        for words, hint in hints:
            if words in message:
                return f"{message}: {hint}"
        return message
    return None


@implementer(IPushProducer)
class MessageReceiver(Int32StringReceiver):
    """
    Turns frames into calls of C{msg_<type>(message)} and messages into
    frames.  A frame that breaks the protocol is logged and closes this
    connection, and only this one.

    A peer that sends frames and reads none of the answers must not make us
    hold the answers: while the transport's write buffer is full, this
    connection is not read (it is the transport's producer then), and one
    that makes us write more than L{MAX_BACKLOG} bytes meanwhile is closed.

    A subclass may call L{switchToRaw} from a handler: the frames stop there,
    and every byte after the current frame goes to L{rawDataReceived}.
    """

    MAX_LENGTH = MAX_FRAME
    tlsMismatchHint = "TLS on one side of the connection only?"
    """What a TLS record where a frame should be most likely means, on this side."""
    log = Logger()
    _raw = False
    _framed = False
    """Whether a frame has come; before one, HTTP is told from a long frame."""
    peerDescription = "?"
    _producing = False
    """Registered as the transport's producer: while a frame is written, and while paused."""
    _writePaused = False
    """The transport found its write buffer full, and has not yet drained it."""
    _backlog = 0
    """Bytes written since then."""

    def makeConnection(self, transport) -> None:
        self.peerDescription = describePeer(transport)
        super().makeConnection(transport)

    def sendMessage(self, message: Message, rawAfter: bytes = b"") -> None:
        """
        Send C{message} as one frame, and C{rawAfter}, stream bytes that
        follow it, in the same write.
        """
        body = messages.encode(message)
        data = len(body).to_bytes(4, "big") + body + rawAfter
        if self._raw:
            writeThrough(self.transport, data)
            return
        if self._writePaused:
            self._backlog += len(data)
            if self._backlog > MAX_BACKLOG:
                self.log.warn("{peer} reads nothing we send: {backlog} bytes wait for it; "
                              "closing the connection",
                              peer=self.peerDescription, backlog=self._backlog)
                self.transport.abortConnection()
                return
            self.transport.write(data)
            return
        # Registered only around the write: the transport tells a streaming
        # producer when its buffer is full, and only then do we need to know.
        # Left registered, it would hold up a TLS transport's loseConnection.
        self._producing = True
        self.transport.registerProducer(self, True)
        writeThrough(self.transport, data)
        if not self._writePaused:
            self._stopProducing()

    def _stopProducing(self) -> None:
        if self._producing:
            self._producing = False
            self._writePaused = False
            self._backlog = 0
            self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        """
        The transport's write buffer is full: read no more frames until it
        has drained, since each may add an answer to it.
        """
        if self._writePaused:
            return
        self._writePaused = True
        self.paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """
        The transport has written everything: read on, from the frames
        already received.
        """
        if not self._writePaused:
            return
        self._stopProducing()
        if self.transport.disconnecting:
            # Unregistering above lets a close that waited for the buffer
            # go on; a connection that is closing reads nothing more.
            return
        self.paused = False
        self.transport.resumeProducing()
        self.dataReceived(b"")

    def stopProducing(self) -> None:
        """The connection is gone: nothing to do, connectionLost follows."""
        self._producing = self._writePaused = False

    def dataReceived(self, data: bytes) -> None:
        if self._raw:
            self.rawDataReceived(data)
            return
        super().dataReceived(data)
        if self._raw:
            # We stopped the frame loop (see switchToRaw); what it left
            # behind is the start of the raw stream.
            self.paused = False
            rest, self._unprocessed = self._unprocessed, b""
            if rest:
                self.rawDataReceived(rest)

    def switchToRaw(self) -> None:
        """
        Stop reading frames: everything after the frame being handled is raw.
        """
        # A splice registers its own producers on this transport.
        self._stopProducing()
        self._raw = True
        # Int32StringReceiver's loop stops at the next frame boundary when
        # paused is set; dataReceived above hands on the remainder.
        self.paused = True

    def rawFromNow(self) -> None:
        """
        Outside a frame handler: every byte from now on is raw.
        """
        self._stopProducing()
        self._raw = True

    def rawDataReceived(self, data: bytes) -> None:
        raise NotImplementedError

    def passingOnLastRead(self) -> bool:
        # Set by switchToRaw inside a frame handler; dataReceived clears it
        # once it has handed on what followed the frame.
        return self._raw and self.paused

    def stringReceived(self, body: bytes) -> None:
        self._framed = True
        if self.transport is None or getattr(self.transport, "disconnecting", False):
            return
        try:
            message = messages.parse(body)
        except ProtocolError as e:
            self.protocolError(str(e))
            return
        if message is None:
            self.log.debug("ignoring a frame of unknown type from {peer}", peer=self.peerDescription)
            return
        self.messageReceived(message)

    def messageReceived(self, message: Message) -> None:
        """Hand C{message} to the C{msg_<type>} method; a type without one breaks the protocol."""
        handler = getattr(self, "msg_" + message.type, None)
        if handler is None:
            self.protocolError(f"unexpected {message.type} message")
            return
        handler(message)

    def lengthLimitExceeded(self, length: int) -> None:
        start = length.to_bytes(4, "big")
        if not self._framed and start in HTTP_REQUEST_STARTS:
            # A browser or curl aimed at the control port.
            self.protocolError(HTTP_REQUEST)
            return
        if not self._framed and start == b"HTTP":
            self.protocolError(HTTP_RESPONSE)
            return
        if looksLikeTLS(length):
            self.protocolError(f"sent TLS where a gotunnel frame was expected "
                               f"({self.tlsMismatchHint})")
            return
        self.protocolError(f"frame of {length} bytes is over the limit of {self.MAX_LENGTH}")

    def protocolError(self, why: str) -> None:
        """
        Log what was wrong and close this connection without waiting for
        buffered output.
        """
        self.log.warn("protocol error from {peer}: {why}; closing the connection",
                      peer=self.peerDescription, why=why)
        self.paused = True
        self._unprocessed = b""
        if self.transport is not None:
            self.transport.abortConnection()

    def fail(self, reason: str, logMessage: Optional[str] = None) -> None:
        """
        Answer C{register_resp} fail with C{reason} and close once it is sent.
        """
        self.sendMessage(messages.RegisterResp(status="fail", reason=reason))
        self.paused = True
        self._unprocessed = b""
        self.transport.loseConnection()

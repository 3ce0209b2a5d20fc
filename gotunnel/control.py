"""
The framing every gotunnel connection starts with: 4-byte big-endian length,
one JSON object per frame, dispatched to C{msg_<type>} methods.
"""

from __future__ import annotations

from typing import Optional

from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from gotunnel import messages
from gotunnel.messages import Message, ProtocolError
from gotunnel.sameturn import writeThrough

MAX_FRAME = 64 * 1024

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
    if reason is None:
        return None
    from OpenSSL.SSL import Error as SSLError
    from service_identity import VerificationError

    from gotunnel.tls import outOfDate

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


class MessageReceiver(Int32StringReceiver):
    """
    Turns frames into calls of C{msg_<type>(message)} and messages into
    frames.  A frame that breaks the protocol is logged and closes this
    connection, and only this one.

    A subclass may call L{switchToRaw} from a handler: the frames stop there,
    and every byte after the current frame goes to L{rawDataReceived}.
    """

    MAX_LENGTH = MAX_FRAME
    tlsMismatchHint = "TLS on one side of the connection only?"
    """What a TLS record where a frame should be most likely means, on this side."""
    log = Logger()
    _raw = False
    peerDescription = "?"

    def makeConnection(self, transport) -> None:
        self.peerDescription = describePeer(transport)
        super().makeConnection(transport)

    def sendMessage(self, message: Message, rawAfter: bytes = b"") -> None:
        """
        Send C{message} as one frame, and C{rawAfter}, stream bytes that
        follow it, in the same write.
        """
        body = messages.encode(message)
        writeThrough(self.transport, len(body).to_bytes(4, "big") + body + rawAfter)

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
        self._raw = True
        # Int32StringReceiver's loop stops at the next frame boundary when
        # paused is set; dataReceived above hands on the remainder.
        self.paused = True

    def rawDataReceived(self, data: bytes) -> None:
        raise NotImplementedError

    def passingOnLastRead(self) -> bool:
        # Set by switchToRaw inside a frame handler; dataReceived clears it
        # once it has handed on what followed the frame.
        return self._raw and self.paused

    def stringReceived(self, body: bytes) -> None:
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
        handler = getattr(self, "msg_" + message.type, None)
        if handler is None:
            self.protocolError(f"unexpected {message.type} message")
            return
        handler(message)

    def lengthLimitExceeded(self, length: int) -> None:
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

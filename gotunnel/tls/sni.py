"""
The server name (SNI) of a TLS ClientHello, read without terminating TLS:
the server's HTTPS virtual-host port routes by it and passes every byte on
unchanged, so the service keeps its own certificate.

The ClientHello may come split across TCP reads and across TLS records;
L{serverName} says when it needs more bytes, up to L{MAX_HELLO}.
"""

from __future__ import annotations

from typing import Optional

MAX_HELLO = 16 * 1024
"""The most bytes we read looking for a whole ClientHello."""

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_HOST_NAME = 0


class NeedMore(Exception):
    """The bytes so far are the start of a ClientHello: read on."""


class BadHello(Exception):
    """The bytes are not a TLS ClientHello we can read; the message says how."""


def _handshakeBytes(data: bytes) -> bytes:
    """
    The payload of the handshake records at the start of C{data}, joined
    (the last one perhaps cut short); what follows them (0-RTT data) is
    left alone.
    """
    payload = []
    offset = 0
    while len(data) - offset >= 5:
        kind, major = data[offset], data[offset + 1]
        length = int.from_bytes(data[offset + 3:offset + 5], "big")
        if kind != _HANDSHAKE:
            if not payload:
                raise BadHello("the first record is not a TLS handshake")
            break
        if major != 3 or not 0 < length <= 2 ** 14:
            raise BadHello("a record header that is not TLS")
        payload.append(data[offset + 5:offset + 5 + length])
        offset += 5 + length
    return b"".join(payload)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise BadHello("a ClientHello field runs past its end")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, lengthSize: int) -> bytes:
        return self.take(self.number(lengthSize))


def serverName(data: bytes) -> Optional[str]:
    """
    The host name a ClientHello at the start of C{data} asks for, lower-case;
    None if it names none.

    @raise NeedMore: C{data} is a ClientHello's start, shorter than it.
    @raise BadHello: not a ClientHello, malformed, or longer than L{MAX_HELLO}.
    """
    if data[:1] and data[0] != _HANDSHAKE:
        raise BadHello("the first record is not a TLS handshake")
    if len(data) > 2 * MAX_HELLO:
        raise BadHello(f"no whole ClientHello within {2 * MAX_HELLO} bytes")
    payload = _handshakeBytes(data)
    if len(payload) >= 1 and payload[0] != _CLIENT_HELLO:
        raise BadHello("the first handshake message is not a ClientHello")
    if len(payload) < 4:
        raise NeedMore()
    length = int.from_bytes(payload[1:4], "big")
    if length + 4 > MAX_HELLO:
        raise BadHello(f"a ClientHello longer than {MAX_HELLO} bytes")
    if len(payload) < 4 + length:
        raise NeedMore()
    hello = _Reader(payload[4:4 + length])
    hello.take(2 + 32)  # version, random
    hello.vector(1)  # session id
    hello.vector(2)  # cipher suites
    hello.vector(1)  # compression methods
    if hello.offset == len(hello.data):
        return None
    extensions = _Reader(hello.vector(2))
    while extensions.offset < len(extensions.data):
        kind = extensions.number(2)
        body = extensions.vector(2)
        if kind != _SERVER_NAME:
            continue
        names = _Reader(_Reader(body).vector(2))
        while names.offset < len(names.data):
            nameType = names.number(1)
            name = names.vector(2)
            if nameType == _HOST_NAME:
                try:
                    text = name.decode("ascii").lower().rstrip(".")
                except UnicodeDecodeError:
                    raise BadHello("a server name that is not ASCII") from None
                if not text:
                    raise BadHello("an empty server name")
                return text
        return None
    return None

"""
A TLS connection's records made and read by the splice thread
(L{gotunnel.relay.tlspump}), with the very C{OpenSSL.SSL.Connection} that
Twisted's TLS layer handshook.

OpenSSL is called through pyOpenSSL's own cffi bindings rather than its
methods: each of those makes a new buffer and copies every byte once more
(C{bio_read}, C{recv_into}), which cost as much CPU as the encryption itself
(see bench/README.md, "TLS").  Here OpenSSL writes into two buffers made
once per connection.  A pyOpenSSL without the private names used here
keeps every TLS connection in the reactor (L{recordsUsable}).
"""

from __future__ import annotations

from OpenSSL.SSL import Connection as SSLConnection
from OpenSSL.SSL import Error as SSLError
from OpenSSL.SSL import WantReadError

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:
    _ffi = _lib = None

RECORD = 1 << 14
"""The most plaintext one TLS record carries: what one C{send} of the TLS
connection encrypts."""

RECORD_OVERHEAD = 64
"""More than a TLS record adds to its plaintext (header, tag, padding)."""

OPENSSL_NEEDS = ("_ssl", "_from_ssl", "_raise_ssl_error")
"""What is read or called of pyOpenSSL's private C{Connection}."""

OPENSSL_CALLS = ("SSL_write", "SSL_read", "BIO_read")
"""The OpenSSL functions called through pyOpenSSL's bindings."""


def recordsUsable(connection: object) -> bool:
    """Whether L{Records} can work C{connection} (a pyOpenSSL C{Connection})."""
    return (isinstance(connection, SSLConnection)
            and all(hasattr(connection, name) for name in OPENSSL_NEEDS)
            and all(hasattr(_lib, name) for name in OPENSSL_CALLS))


class Records:
    """
    Encrypts into and decrypts out of one TLS connection's memory BIOs.

    @ivar plainView: where records are decrypted to (L{decryptInto}).
    @ivar recordView: where the records that L{encrypt} made are read out
        of the memory BIO.
    """

    plainView: memoryview
    recordView: memoryview

    def __init__(self, connection: SSLConnection) -> None:
        self.connection = connection
        self.ssl = connection._ssl

    def allocate(self, readSize: int) -> None:
        """Make the buffers for reads of at most C{readSize} bytes."""
        self.plainView = memoryview(bytearray(readSize + 4 * RECORD))
        self.plainAt = _ffi.from_buffer(self.plainView)
        self.recordView = memoryview(bytearray(
            readSize + RECORD_OVERHEAD * (readSize // RECORD + 2)))
        self.recordsAt = _ffi.from_buffer(self.recordView)

    def encrypt(self, data: memoryview) -> bytes | memoryview:
        """Encrypt C{data}: the records to send (see L{records})."""
        n = len(data)
        source = _ffi.from_buffer(data)
        offset = 0
        while offset < n:
            # Twisted's connections write partially: a record per call.
            written = _lib.SSL_write(self.ssl, source + offset, n - offset)
            if written <= 0:
                self.raiseFor(written)
            offset += written
        return self.records()

    def records(self) -> bytes | memoryview:
        """
        The records OpenSSL has encrypted into the memory BIO, to send: a
        view of L{recordView}, which holds the records of one full read.
        """
        size = _lib.BIO_read(self.connection._from_ssl, self.recordsAt,
                             len(self.recordView))
        if size <= 0:
            return b""
        if size < len(self.recordView):
            return self.recordView[:size]
        return bytes(self.recordView) + self.encrypted(RECORD)

    def decryptInto(self, offset: int) -> int:
        """Decrypt a record's bytes into L{plainView} at C{offset}: how many."""
        got = _lib.SSL_read(self.ssl, self.plainAt + offset, RECORD)
        if got <= 0:
            self.raiseFor(got)
        return got

    def raiseFor(self, result: int) -> None:
        """Raise pyOpenSSL's exception for what an OpenSSL call returned, C{result}."""
        self.connection._raise_ssl_error(self.ssl, result)
        raise SSLError(f"OpenSSL returned {result} and no error")

    def encrypted(self, expected: int) -> bytes:
        """What OpenSSL has written to the memory BIO: the records to send."""
        chunks = []
        size = expected
        while True:
            try:
                data = self.connection.bio_read(size)
            except WantReadError:
                break
            chunks.append(data)
            if len(data) < size:
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

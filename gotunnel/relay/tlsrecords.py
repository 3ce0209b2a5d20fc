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

While the splice thread holds the connection, OpenSSL is given the socket
itself (L{Records.attach}, C{SSL_set_fd}): no copy into a memory BIO, out of
it, nor the zeroing of its growth, and one C{SSL_write} per read.  The
bindings have no C{BIO_up_ref}, so pyOpenSSL's memory BIOs (empty, checked)
are freed then, and L{Records.detach} gives it new ones.
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

SOCKET_CALLS = ("SSL_set_fd", "SSL_set_bio", "BIO_new", "BIO_s_mem", "BIO_get_mem_data",
                "SSL_pending", "SSL_set_mode", "SSL_clear_mode", "SSL_get_error",
                "ERR_clear_error")
"""What giving OpenSSL the socket (L{Records.attach}) calls besides."""


def recordsUsable(connection: object) -> bool:
    """Whether L{Records} can work C{connection} (a pyOpenSSL C{Connection})."""
    return (isinstance(connection, SSLConnection)
            and all(hasattr(connection, name) for name in OPENSSL_NEEDS)
            and all(hasattr(_lib, name) for name in OPENSSL_CALLS))


class Records:
    """
    Encrypts into and decrypts out of one TLS connection's memory BIOs, or,
    L{attach}ed, its socket.

    @ivar plainView: where records are decrypted to (L{decryptInto}).
    @ivar recordView: where the records that L{encrypt} made are read out
        of the memory BIO.
    """

    plainView: memoryview
    recordView: memoryview
    partialWrite = 0
    """Whether pyOpenSSL's C{SSL_MODE_ENABLE_PARTIAL_WRITE}, cleared while
    L{attach}ed, was set."""

    def __init__(self, connection: SSLConnection) -> None:
        self.connection = connection
        self.ssl = connection._ssl

    def attach(self, fd: int) -> bool:
        """
        Give OpenSSL the socket C{fd} in place of pyOpenSSL's memory BIOs,
        if they are empty and nothing decrypted waits: whether it took it.
        """
        connection = self.connection
        if (not all(hasattr(_lib, name) for name in SOCKET_CALLS)
                or not hasattr(connection, "_into_ssl")
                or _lib.SSL_pending(self.ssl)
                or _memPending(connection._into_ssl) or _memPending(connection._from_ssl)):
            return False
        if not _lib.SSL_set_fd(self.ssl, fd):
            _lib.ERR_clear_error()
            return False
        # One SSL_write per read: OpenSSL loops over the records itself.
        self.partialWrite = _lib.SSL_set_mode(self.ssl, 0) & _lib.SSL_MODE_ENABLE_PARTIAL_WRITE
        _lib.SSL_clear_mode(self.ssl, self.partialWrite)
        return True

    def detach(self, pending: bytes | memoryview) -> bytes:
        """
        Give pyOpenSSL new memory BIOs in place of the socket; C{pending},
        the plaintext an L{send} left unwritten (or nothing), is encrypted
        into them: the records to send, for Twisted's transport.
        """
        into = _lib.BIO_new(_lib.BIO_s_mem())
        out = _lib.BIO_new(_lib.BIO_s_mem())
        _lib.SSL_set_bio(self.ssl, into, out)
        connection = self.connection
        connection._into_ssl, connection._from_ssl = into, out
        records = b""
        if pending:
            try:
                # The very plaintext of the write OpenSSL has begun: it goes
                # on where the socket stopped it, all of it at once.
                self.send(pending)
                records = bytes(self.records())
            except SSLError:
                # The socket broke: the reactor meets that, and nothing goes.
                pass
        _lib.SSL_set_mode(self.ssl, self.partialWrite)
        return records

    def send(self, data: memoryview) -> bool:
        """
        Encrypt and write C{data} (L{attach}ed: to the socket): whether all
        of it went.  If not, the next call must give the same C{data}.
        """
        result = _lib.SSL_write(self.ssl, _ffi.from_buffer(data), len(data))
        if result > 0:
            return True
        if _lib.SSL_get_error(self.ssl, result) == _lib.SSL_ERROR_WANT_WRITE:
            return False
        self.raiseFor(result)

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


def _memPending(bio) -> int:
    """How many bytes wait in the memory BIO C{bio}."""
    return _lib.BIO_get_mem_data(bio, _ffi.NULL)

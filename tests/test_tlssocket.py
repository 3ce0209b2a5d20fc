"""
OpenSSL given a TLS connection's socket while the splice thread holds it
(gotunnel/relay/tlsrecords.py, Records.attach and Records.detach), on one
real loopback connection: the bytes written before, while and after OpenSSL
holds the socket, a record split across the swaps, a write the socket had no
room for, the close_notify and the end-of-stream.
"""

from __future__ import annotations

import socket
from datetime import datetime, timezone
from ipaddress import ip_address

from OpenSSL import SSL
from twisted.trial import unittest

from gotunnel.relay.tlsrecords import RECORD, Records
from gotunnel.tls.certmaking import makeCA, makeServer
from tests.support import randomBytes

READ_SIZE = 1 << 18


def handshaken() -> tuple[SSL.Connection, SSL.Connection]:
    """A server's and a client's pyOpenSSL connection, handshaken in memory as Twisted's are."""
    now = datetime.now(timezone.utc)
    server = makeServer(makeCA("test CA", now), [], [ip_address("127.0.0.1")], now)
    serverContext = SSL.Context(SSL.TLS_METHOD)
    serverContext.use_certificate(server.certificate)
    serverContext.use_privatekey(server.key)
    ends = (SSL.Connection(serverContext), SSL.Connection(SSL.Context(SSL.TLS_METHOD)))
    ends[0].set_accept_state()
    ends[1].set_connect_state()
    for _ in range(10):
        for end in ends:
            try:
                end.do_handshake()
            except SSL.WantReadError:
                pass
        for source, sink in (ends, ends[::-1]):
            try:
                sink.bio_write(source.bio_read(1 << 16))
            except SSL.WantReadError:
                pass
    return ends


class SocketSwapTests(unittest.TestCase):
    """The server's connection swaps between its memory BIOs and its socket."""

    def setUp(self):
        self.server, self.client = handshaken()
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        self.clientSocket = socket.create_connection(listener.getsockname())
        self.serverSocket, _ = listener.accept()
        for s in (self.clientSocket, self.serverSocket):
            s.setblocking(False)
            self.addCleanup(s.close)
        self.records = Records(self.server)
        self.records.allocate(READ_SIZE)

    # -- the client, always through its memory BIOs, over its socket

    def clientSends(self, data: bytes) -> bytes:
        """The records the client makes of C{data}."""
        self.client.sendall(data)
        return self.client.bio_read(1 << 24)

    def clientReceives(self) -> bytes:
        """What the client decrypts of everything the server's socket sent it."""
        chunks = []
        while True:
            try:
                chunks.append(self.clientSocket.recv(1 << 20))
            except BlockingIOError:
                break
        self.client.bio_write(b"".join(chunks))
        return self.readAll(self.client)

    @staticmethod
    def readAll(connection: SSL.Connection) -> bytes:
        got = []
        while True:
            try:
                got.append(connection.recv(RECORD))
            except SSL.WantReadError:
                return b"".join(got)

    # -- the server as Twisted's TLS works it, and as the thread does

    def serverSendsInMemory(self, data: bytes) -> None:
        self.server.sendall(data)
        self.serverSocket.sendall(self.server.bio_read(1 << 24))

    def serverReceivesInMemory(self, records: bytes) -> bytes:
        self.server.bio_write(records)
        return self.readAll(self.server)

    def serverReceivesOnSocket(self) -> bytes:
        got = []
        while True:
            try:
                n = self.records.decryptInto(0)
            except SSL.WantReadError:
                return b"".join(got)
            got.append(bytes(self.records.plainView[:n]))

    def test_bytesBeforeWhileAndAfter(self):
        """
        Both ways, the bytes of before the socket is attached, while, and
        after it is detached come through whole and in order, a record
        split across each swap included.
        """
        sent, received = [], []
        # Before: Twisted's way.  Half a record stays in OpenSSL.
        first = randomBytes(100_000)
        records = self.clientSends(first)
        received.append(self.serverReceivesInMemory(records[:-1000]))
        sent.append(randomBytes(70_000))
        self.serverSendsInMemory(sent[-1])
        self.assertTrue(self.records.attach(self.serverSocket.fileno()))
        # While: OpenSSL reads the rest of the record from the socket.
        self.clientSocket.sendall(records[-1000:])
        second = randomBytes(300_000)
        self.clientSocket.sendall(self.clientSends(second))
        received.append(self.serverReceivesOnSocket())
        sent.append(randomBytes(200_000))
        self.assertTrue(self.records.send(memoryview(sent[-1])))
        # Half a record in OpenSSL again as the socket is taken away.
        third = randomBytes(50_000)
        records = self.clientSends(third)
        self.clientSocket.sendall(records[:777])
        received.append(self.serverReceivesOnSocket())
        self.assertEqual(self.records.detach(b""), b"")
        # After: Twisted's way, on the new memory BIOs.
        received.append(self.serverReceivesInMemory(records[777:]))
        sent.append(randomBytes(90_000))
        self.serverSendsInMemory(sent[-1])
        self.assertEqual(b"".join(received), first + second + third)
        self.assertEqual(self.clientReceives(), b"".join(sent))

    def test_writeTheSocketHadNoRoomFor(self):
        """
        A write the socket stopped (the client not reading) goes on into
        the memory BIOs at the detach: the records it returns, after what
        the socket took, make every byte written.
        """
        self.assertTrue(self.records.attach(self.serverSocket.fileno()))
        payload = randomBytes(READ_SIZE)
        written = []
        while True:
            view = memoryview(payload)
            if not self.records.send(view):
                break
            written.append(payload)
        # A retry gives the same bytes, and the socket is still full.
        self.assertFalse(self.records.send(view))
        records = self.records.detach(view)
        self.assertTrue(records)
        got = self.clientReceives()
        self.client.bio_write(records)
        got += self.readAll(self.client)
        self.assertEqual(got, b"".join(written) + payload)
        # Twisted's writes go on after it, each a record again.
        self.serverSendsInMemory(b"after")
        self.assertEqual(self.clientReceives(), b"after")

    def test_attachRefusedWithBytesInAMemoryBIO(self):
        """
        Bytes Twisted's TLS has not read out of a memory BIO keep the
        connection on its memory BIOs, which go on working.
        """
        records = self.clientSends(b"unread")
        self.server.bio_write(records)
        self.assertFalse(self.records.attach(self.serverSocket.fileno()))
        self.assertEqual(self.readAll(self.server), b"unread")

    def test_closeNotify(self):
        """
        The client's close_notify read from the socket ends the server's
        reads there and again after the detach (as Twisted's TLS reads it
        again); the server still writes after it (a half-close), and its
        own close_notify reaches the client.
        """
        self.assertTrue(self.records.attach(self.serverSocket.fileno()))
        self.clientSocket.sendall(self.clientSends(b"last words"))
        self.client.shutdown()
        self.clientSocket.sendall(self.client.bio_read(1 << 16))
        self.assertEqual(self.records.decryptInto(0), len(b"last words"))
        self.assertRaises(SSL.ZeroReturnError, self.records.decryptInto, 0)
        self.assertTrue(self.records.send(memoryview(b"the answer")))
        self.records.detach(b"")
        self.assertRaises(SSL.ZeroReturnError, self.server.recv, RECORD)
        self.assertEqual(self.clientReceives(), b"the answer")
        self.server.shutdown()
        self.serverSocket.sendall(self.server.bio_read(1 << 16))
        self.assertRaises(SSL.ZeroReturnError, self.clientReceives)

    def test_endOfStream(self):
        """
        A TCP end-of-stream with no close_notify, read by OpenSSL from the
        socket, is the error Twisted's TLS turns into a lost connection.
        """
        self.assertTrue(self.records.attach(self.serverSocket.fileno()))
        self.clientSocket.shutdown(socket.SHUT_WR)
        with self.assertRaises(SSL.SysCallError) as caught:
            self.records.decryptInto(0)
        self.assertEqual(caught.exception.args, (-1, "Unexpected EOF"))

"""
OpenSSL given a TLS connection's socket while the splice thread holds it
(gotunnel/relay/tlsrecords.py, Records.attach and Records.detach), on one
real loopback connection: the bytes written before, while and after OpenSSL
holds the socket, a record split across the swaps, a write the socket had no
room for, the close_notify and the end-of-stream; an answer OpenSSL makes as
it reads (here to a TLS 1.2 renegotiation) with the socket full; and what the
thread does with each outcome of a read.
"""

from __future__ import annotations

import socket
from datetime import datetime, timezone
from ipaddress import ip_address

from OpenSSL import SSL
from twisted.trial import unittest

from gotunnel.relay.tlsends import Flow, TLSEnd
from gotunnel.relay.tlsrecords import RECORD, Records
from gotunnel.tls.certmaking import makeCA, makeServer
from tests.support import randomBytes

READ_SIZE = 1 << 18


def handshaken(clientVersion: int = 0) -> tuple[SSL.Connection, SSL.Connection]:
    """
    A server's and a client's pyOpenSSL connection, handshaken in memory as
    Twisted's are; C{clientVersion}, if given, the highest TLS version the
    client offers.
    """
    now = datetime.now(timezone.utc)
    server = makeServer(makeCA("test CA", now), [], [ip_address("127.0.0.1")], now)
    serverContext = SSL.Context(SSL.TLS_METHOD)
    serverContext.use_certificate(server.certificate)
    serverContext.use_privatekey(server.key)
    clientContext = SSL.Context(SSL.TLS_METHOD)
    if clientVersion:
        clientContext.set_max_proto_version(clientVersion)
    ends = (SSL.Connection(serverContext), SSL.Connection(clientContext))
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


TLS_ALERT, TLS_APPLICATION_DATA = 21, 23


def splitRecords(wire: bytes) -> list[tuple[int, int]]:
    """The (content type, length) of each TLS record in C{wire}, which must hold whole ones."""
    records = []
    offset = 0
    while offset < len(wire):
        if len(wire) - offset < 5:
            raise AssertionError(f"{len(wire) - offset} bytes after the last whole record")
        kind, length = wire[offset], int.from_bytes(wire[offset + 3:offset + 5], "big")
        if offset + 5 + length > len(wire):
            raise AssertionError(f"a record of {length} bytes cut short")
        records.append((kind, length))
        offset += 5 + length
    return records


class SocketSwapTests(unittest.TestCase):
    """The server's connection swaps between its memory BIOs and its socket."""

    clientVersion = 0

    def setUp(self):
        self.server, self.client = handshaken(self.clientVersion)
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
        self.client.bio_write(self.drain())
        return self.readAll(self.client)

    def drain(self) -> bytes:
        """Every byte the server's socket has sent the client so far, undecrypted."""
        chunks = []
        while True:
            try:
                chunks.append(self.clientSocket.recv(1 << 20))
            except BlockingIOError:
                return b"".join(chunks)

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


class AnswerOnAFullSocketTests(SocketSwapTests):
    """
    A record that makes OpenSSL answer as it reads (a TLS 1.3 key update;
    here, a TLS 1.2 client asking to renegotiate, which OpenSSL refuses with
    an alert) while the socket has no room: a send has stopped part way.
    The answer goes out between whole records, and no byte of the send is
    lost, whether the thread goes on (the send retried on the socket) or
    hands the connection back (L{Records.detach}).  The swap tests above run
    again here, in TLS 1.2.
    """

    clientVersion = SSL.TLS1_2_VERSION

    def fillThenAskToRenegotiate(self) -> tuple[int, memoryview]:
        """
        Send until the socket is full, then read the client's request to
        renegotiate: the bytes sent whole, and the send left part way.
        """
        self.assertTrue(self.records.attach(self.serverSocket.fileno()))
        payload = randomBytes(READ_SIZE)
        whole = 0
        for _ in range(1000):
            view = memoryview(payload)
            if not self.records.send(view):
                break
            whole += len(view)
        else:
            self.fail("the socket never filled")
        self.client.renegotiate()
        self.assertRaises(SSL.WantReadError, self.client.do_handshake)
        self.clientSocket.sendall(self.client.bio_read(1 << 16))
        # No plaintext, and nothing for the thread to hand back: the answer
        # waits in OpenSSL behind the record the socket stopped.
        self.assertRaises(SSL.WantReadError, self.records.decryptInto, 0)
        return whole, view

    def assertEverySentByteIn(self, wire: bytes, total: int) -> None:
        """
        C{wire} is whole records, one of them the alert, whose plaintext
        adds up to C{total}; the client decrypts them up to the alert.
        """
        records = splitRecords(wire)
        self.assertEqual([kind for kind, _ in records].count(TLS_ALERT), 1)
        self.assertEqual({kind for kind, _ in records}, {TLS_ALERT, TLS_APPLICATION_DATA})
        self.server.sendall(b"x")
        overhead = len(self.server.bio_read(1 << 16)) - 5 - 1
        carried = sum(length - overhead for kind, length in records
                      if kind == TLS_APPLICATION_DATA)
        self.assertEqual(carried, total)
        self.client.bio_write(wire)
        before = []
        with self.assertRaises(SSL.Error):
            while True:
                before.append(self.client.recv(RECORD))
        alertAt = [kind for kind, _ in records].index(TLS_ALERT)
        self.assertEqual(len(b"".join(before)),
                         sum(length - overhead for _, length in records[:alertAt]))

    def sendThenEnd(self, rest: bytes) -> bytes:
        """
        Send C{rest} on the server's socket as the client reads, then end
        the stream: everything the client received, to the end.
        """
        wire = []
        for _ in range(1000):
            if not rest:
                break
            try:
                rest = rest[self.serverSocket.send(rest):]
            except BlockingIOError:
                pass
            wire.append(self.drain())
        self.serverSocket.shutdown(socket.SHUT_WR)
        self.clientSocket.settimeout(10)
        while True:
            data = self.clientSocket.recv(1 << 20)
            if not data:
                return b"".join(wire)
            wire.append(data)

    def test_retriedOnTheSocket(self):
        """The client reads; the send, retried, goes on, and the alert with it."""
        whole, view = self.fillThenAskToRenegotiate()
        wire = []
        for _ in range(1000):
            wire.append(self.drain())
            if self.records.send(view):
                break
        else:
            self.fail("the send never finished")
        self.assertEqual(self.records.detach(b""), b"")
        wire.append(self.sendThenEnd(b""))
        self.assertEverySentByteIn(b"".join(wire), whole + len(view))

    def test_handedBack(self):
        """The reactor takes the connection back with the send part way: the alert too."""
        whole, view = self.fillThenAskToRenegotiate()
        records = self.records.detach(view)
        self.assertTrue(records)
        self.assertEverySentByteIn(self.sendThenEnd(bytes(records)), whole + len(view))


class _ScriptedRecords:
    """A L{Records} stand-in whose C{decryptInto} gives what a test scripts, in turn."""

    def __init__(self, outcomes: list) -> None:
        self.plainView = memoryview(bytearray(4 * RECORD))
        self.outcomes = outcomes

    def decryptInto(self, offset: int) -> int:
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class _Pump:
    def __init__(self, records: _ScriptedRecords) -> None:
        self.records = records


class _Transport:
    socket = None

    def fileno(self) -> int:
        return -1


class ThreadDecryptTests(unittest.TestCase):
    """L{TLSEnd.decrypt}: what the thread makes of each outcome of a read on the socket."""

    def decrypt(self, outcomes: list) -> tuple[bool, TLSEnd]:
        end = TLSEnd(_Pump(_ScriptedRecords(outcomes)), None, _Transport())
        end.onSocket = True
        end.outgoing = Flow(end, None)
        return end.decrypt(), end

    def test_answerWithNoRoomHandsBack(self):
        """
        OpenSSL's answer finding the socket full (C{WantWriteError}) hands the
        connection back, with what was decrypted before it passed on, and
        no ending: the reactor's TLS sends the answer and reads on.
        """
        carryOn, end = self.decrypt([1000, 500, SSL.WantWriteError()])
        self.assertFalse(carryOn)
        self.assertIsNone(end.ended)
        self.assertEqual(len(end.outgoing.held), 1500)
        self.assertEqual(end.outgoing.moved, 1500)

    def test_nothingMoreToReadCarriesOn(self):
        """C{WantReadError} ends a read of the socket, and the thread goes on."""
        carryOn, end = self.decrypt([RECORD, SSL.WantReadError()])
        self.assertTrue(carryOn)
        self.assertEqual(len(end.outgoing.held), RECORD)

    def test_closeNotifyIsKeptForTheReactor(self):
        """A close_notify hands back, kept in C{ended} for the reactor to meet."""
        closed = SSL.ZeroReturnError()
        carryOn, end = self.decrypt([10, closed])
        self.assertFalse(carryOn)
        self.assertIs(end.ended, closed)
        self.assertEqual(len(end.outgoing.held), 10)

"""
The splice thread's side of a L{gotunnel.relay.tlspump.TLSPump}: its two
connections (L{PlainEnd}, L{TLSEnd}) and the bytes waiting between them
(L{Flow}).

While the thread holds a TLS connection, OpenSSL reads and writes its socket
itself (L{gotunnel.relay.tlsrecords.Records.attach}): C{SSL_read} decrypts
records straight from the socket and C{SSL_write} sends them, with none of
the copies into and out of pyOpenSSL's memory BIOs, nor their zeroing.  A
build that cannot do that keeps the memory BIOs, and the thread reads and
writes the socket itself as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from OpenSSL.SSL import Error as SSLError
from OpenSSL.SSL import SysCallError, WantReadError, WantWriteError, ZeroReturnError

from gotunnel.relay.splicethread import HUNG_UP, READABLE, WRITABLE
from gotunnel.relay.tlsrecords import RECORD

if TYPE_CHECKING:
    from gotunnel.relay.tlspump import TLSPump


class Flow:
    """
    Bytes one way through the thread: read from C{source}, passed on to
    C{sink}'s socket.

    @ivar held: bytes waiting for the sink's socket to take them.
    @ivar moved: bytes of plaintext passed on so far (for the relay's counts).
    """

    held: bytes | memoryview = b""
    moved = 0

    def __init__(self, source: "End", sink: "End") -> None:
        self.source = source
        self.sink = sink

    @property
    def pending(self) -> int:
        """How many bytes wait for the sink's socket."""
        return len(self.held)

    def flush(self) -> None:
        """
        Write what is held to the sink's socket, until it is written or
        the socket is full; OSError if it is broken.
        """
        if self.sink.onSocket:
            if self.held and self.sink.pump.records.send(self.held):
                self.held = b""
            return
        sock = self.sink.socket
        while self.held:
            try:
                n = sock.send(self.held)
            except BlockingIOError:
                return
            self.held = self.held[n:]
        # Not an empty view: the buffer it looks at is read into again.
        self.held = b""

    def take(self) -> bytes:
        """What is held, for Twisted's transport to write instead."""
        held, self.held = self.held, b""
        return bytes(held)


class End:
    """
    One of the pump's two connections as the splice thread sees it: its
    socket, the flows to and from it, and the attributes
    L{splicethread.SpliceThread} and L{splicethread.pollBudget} use.
    """

    mask = 0
    onSocket = False
    writtenAt = 0.0
    answerGap = float("inf")
    outgoing: Flow
    incoming: Flow
    buffer: bytearray
    """What the thread reads the socket into."""

    def __init__(self, pump: "TLSPump", relayEnd: object, transport: object) -> None:
        self.pump = pump
        self.relayEnd = relayEnd
        self.transport = transport
        self.socket = transport.socket
        self.fd = transport.fileno()

    def wantedEvents(self) -> int:
        """Readable while what it read last has gone on; writable while bytes wait for it."""
        return ((0 if self.outgoing.pending else READABLE)
                | (WRITABLE if self.incoming.pending else 0))

    def moveInThread(self, events: int) -> bool:
        """
        In the splice thread, for C{events} on this socket: write what waits
        for it, read what it has on to the other; False if anything but
        bytes came, for the reactor to handle.
        """
        if events & HUNG_UP:
            return False
        try:
            if events & WRITABLE and self.incoming.pending:
                self.incoming.flush()
                self.pump.eventsChanged = True
            if events & READABLE and not self.outgoing.pending:
                if not self.receive():
                    return False
                self.outgoing.flush()
                if self.outgoing.pending:
                    self.pump.eventsChanged = True
        except BlockingIOError:
            return True
        except (OSError, SSLError):
            # The reactor reads or writes the broken socket again, and
            # closes the connection as it always does (an SSL error here
            # is the socket's, met by OpenSSL on it).
            return False
        return True

    def receive(self) -> bool:
        """Read the socket and pass its bytes on (L{move}); False to hand back."""
        n = self.socket.recv_into(self.buffer)
        if not n:
            # The end-of-stream stays in the socket for the reactor's own
            # doRead.
            return False
        return self.move(memoryview(self.buffer)[:n])


class PlainEnd(End):
    """The plain connection: what it sends is encrypted for the TLS one."""

    def move(self, data: memoryview) -> bool:
        self.outgoing.moved += len(data)
        if self.outgoing.sink.onSocket:
            self.outgoing.held = data
        else:
            self.outgoing.held = self.pump.records.encrypt(data)
        return True


class TLSEnd(End):
    """The TLS connection: what it sends is decrypted for the plain one."""

    ended: Optional[BaseException] = None
    """The close_notify or alert the thread met, for the reactor to handle."""

    def receive(self) -> bool:
        return self.decrypt() if self.onSocket else End.receive(self)

    def decrypt(self) -> bool:
        """
        Decrypt records from the socket (L{Records.attach}) until it has no
        more or L{Records.plainView} is full: what is left stays in the
        socket.  False at a close_notify, an alert or the end-of-stream
        (kept in L{ended} for the reactor), or a broken socket.
        """
        records = self.pump.records
        view = records.plainView
        room = len(view) - RECORD
        size = 0
        carryOn = True
        while size <= room:
            try:
                size += records.decryptInto(size)
            except WantReadError:
                break
            except WantWriteError:
                # OpenSSL's answer (a key update) found the socket full:
                # the reactor's TLS sends it.
                carryOn = False
                break
            except SysCallError as e:
                # An end-of-stream before a close_notify: OpenSSL has read
                # it, and Twisted's TLS meets it as an error, as it would
                # have.  A socket's error (errno) the reactor meets again.
                if e.args[0] == -1:
                    self.ended = e
                carryOn = False
                break
            except (ZeroReturnError, SSLError) as e:
                self.ended = e
                carryOn = False
                break
        self.outgoing.moved += size
        self.outgoing.held = view[:size]
        return carryOn

    def move(self, data: memoryview) -> bool:
        pump = self.pump
        records = pump.records
        tls = records.connection
        tls.bio_write(data)
        view = records.plainView
        room = len(view) - RECORD
        size = 0
        extra = []
        carryOn = True
        while True:
            try:
                if size <= room:
                    size += records.decryptInto(size)
                else:
                    extra.append(tls.recv(RECORD))
            except WantReadError:
                break
            except (ZeroReturnError, SSLError) as e:
                self.ended = e
                carryOn = False
                break
        held = view[:size]
        if extra:
            held = bytes(held) + b"".join(extra)
        self.outgoing.moved += len(held)
        self.outgoing.held = held
        # Reading can make OpenSSL answer (a key update): that goes out
        # after what was encrypted before.
        answer = records.encrypted(RECORD)
        if answer:
            self.incoming.held = bytes(self.incoming.held) + answer
            pump.eventsChanged = True
        return carryOn

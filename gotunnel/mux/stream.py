"""
One stream of a multiplexed data connection, as a transport (write,
half-close, reset, producer) to the protocol that owns it, so that the relay
splices it to a TCP connection as it would any other transport.  Each
stream has its own credit-based window both ways: a slow reader holds at
most its window in our memory and never stalls the other streams.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from twisted.internet import error
from twisted.internet.protocol import Protocol
from twisted.internet.interfaces import (
    IHalfCloseableDescriptor, IPushProducer, ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from gotunnel.mux.frames import DATA, FIN, RST, WINDOW, WINDOW_UPDATE, MuxError
from gotunnel.relay.splice import RelayEnd

if TYPE_CHECKING:
    from gotunnel.mux.session import MuxSession

CHUNK = 32 * 1024
"""The most of one stream written per turn of the round robin."""

READ_SIZE = 64 * 1024
"""
What the producer feeding a stream may hand it in one go (Twisted reads a
TCP connection 64 KiB at a time): over budget, a stream keeps reading only
with at least this much window and nothing queued.
"""


@implementer(ITransport, IHalfCloseableDescriptor, IPushProducer)
class MuxStream:
    """
    One stream of a L{MuxSession}, as a transport to its protocol.  What is
    written waits in its queue until the peer's window takes it; past one
    window queued, the producer writing to it is paused.
    """

    disconnecting = False
    producer = None
    producerPaused = False
    """The producer writing to us is paused: our queue is full, or the session over budget."""
    _queueFull = False
    paused = False
    _finSent = False
    _finWanted = False
    _finReceived = False
    _closeWanted = False
    _readEnded = False
    closed = False

    def __init__(self, session: "MuxSession", streamId: int) -> None:
        self.session = session
        self.streamId = streamId
        self.sendWindow = WINDOW
        self.recvWindow = WINDOW
        self._queue = bytearray()
        self.queued = 0
        self._inbox: list[bytes] = []
        self.inboxed = 0
        self._consumed = 0
        self.protocol = None

    # ITransport
    def write(self, data: bytes) -> None:
        if self.closed or self._finWanted or not data:
            return
        self._queue += data
        self.queued += len(data)
        self.session.queuedChanged(len(data))
        self.session.wantsToSend(self)
        self.syncProducer()

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        """End-of-stream (FIN) once the queue has gone out."""
        if self.closed or self._finWanted:
            return
        self._finWanted = True
        self.session.wantsToSend(self)

    def loseConnection(self) -> None:
        """End-of-stream after the queue; anything the peer sends later resets the stream."""
        self._closeWanted = True
        self.disconnecting = True
        self.loseWriteConnection()
        self._maybeClosed()

    def abortConnection(self) -> None:
        """Reset (RST) now: the queue is dropped."""
        if self.closed:
            return
        self.session.sendFrame(WINDOW_UPDATE, RST, self.streamId, 0)
        self._close(Failure(error.ConnectionLost("stream reset by this end")))

    def getPeer(self):
        return self.session.transport.getPeer()

    def getHost(self):
        return self.session.transport.getHost()

    # IConsumer
    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer
        self.producerPaused = False
        if not self.closed:
            self.session.reading.add(self)
            self.syncProducer()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.session.reading.discard(self)

    def syncProducer(self) -> None:
        """Pause or resume the producer writing to us, as our queue and the session's budget say."""
        producer = self.producer
        if producer is None or self.closed:
            return
        if self.queued >= WINDOW:
            self._queueFull = True
        elif self.queued < WINDOW // 2:
            self._queueFull = False
        session = self.session
        pause = self._queueFull or (session.overBudget and (
            self.queued > 0 or self.sendWindow < READ_SIZE or session.paused))
        if pause and not self.producerPaused:
            self.producerPaused = True
            session.reading.discard(self)
            producer.pauseProducing()
        elif not pause and self.producerPaused:
            self.producerPaused = False
            session.reading.add(self)
            producer.resumeProducing()

    # IPushProducer: the protocol reading this stream is full or not.
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._deliver()

    def stopProducing(self) -> None:
        self.abortConnection()

    # From the session
    def received(self, data: bytes) -> None:
        if len(data) > self.recvWindow:
            raise MuxError(f"stream {self.streamId} sent {len(data)} bytes over its window")
        self.recvWindow -= len(data)
        if self._closeWanted or self._finReceived:
            # Nobody reads these: a reset tells the peer so, as TCP would.
            self.abortConnection()
            return
        self._inbox.append(data)
        self.inboxed += len(data)
        self._deliver()

    def finReceived(self) -> None:
        self._finReceived = True
        self._deliver()

    def _deliver(self) -> None:
        while self._inbox and not self.paused and not self.closed:
            data = self._inbox.pop(0)
            self.inboxed -= len(data)
            self._consumed += len(data)
            self.protocol.dataReceived(data)
        if self._consumed >= WINDOW // 2 and not self.closed:
            # Credit in batches, not a frame per read.
            self.recvWindow += self._consumed
            self.session.sendFrame(WINDOW_UPDATE, 0, self.streamId, self._consumed)
            self._consumed = 0
        if self._finReceived and not self._inbox and not self.closed:
            if not self._readEnded:
                self._readEnded = True
                readConnectionLost = getattr(self.protocol, "readConnectionLost", None)
                if readConnectionLost is not None:
                    readConnectionLost()
            self._maybeClosed()

    def windowUpdate(self, delta: int) -> None:
        if self.sendWindow + delta > 2**31 - 1:
            raise MuxError(f"stream {self.streamId} window overflows")
        self.sendWindow += delta
        self.session.wantsToSend(self)
        self.syncProducer()

    def reset(self) -> None:
        self._close(Failure(error.ConnectionLost("stream reset by the peer")))

    def hasSomethingToSend(self) -> bool:
        return ((self.queued and self.sendWindow > 0)
                or (self._finWanted and not self._finSent and not self.queued))

    def sendSome(self) -> None:
        """One turn of the round robin: at most L{CHUNK} bytes, or the FIN."""
        if self.queued and self.sendWindow > 0:
            size = min(CHUNK, self.sendWindow)
            piece = bytes(self._queue[:size])
            # Deleting from the front of a bytearray moves no bytes.
            del self._queue[:size]
            self.queued -= len(piece)
            self.sendWindow -= len(piece)
            flags = FIN if (self._finWanted and not self.queued) else 0
            self.session.sendFrame(DATA, flags, self.streamId, len(piece), piece)
            if flags:
                self._finSent = True
            self.session.queuedChanged(-len(piece))
            self.syncProducer()
        elif self._finWanted and not self._finSent and not self.queued:
            self._finSent = True
            self.session.sendFrame(WINDOW_UPDATE, FIN, self.streamId, 0)
        self._maybeClosed()

    def _maybeClosed(self) -> None:
        if self.closed:
            return
        if self._finSent and (self._finReceived and not self._inbox):
            self._close(None)

    def _close(self, reason: Optional[Failure]) -> None:
        if self.closed:
            return
        self.closed = True
        self.disconnecting = True
        dropped = self.queued
        self._queue, self.queued = bytearray(), 0
        self._inbox, self.inboxed = [], 0
        self.session.reading.discard(self)
        self.session.streamClosed(self)
        if dropped:
            self.session.queuedChanged(-dropped)
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connectionLost(reason or Failure(error.ConnectionDone()))

    def bufferedBytes(self) -> int:
        """What this stream holds in our memory: its queue and its unread inbox."""
        return self.queued + self.inboxed


class StreamEnd(Protocol, RelayEnd):
    """
    A stream's side of a splice: what the stream receives goes to the
    connection it is spliced to, with the same flow control and endings as
    a data channel's side.
    """

    def __init__(self, stream: MuxStream) -> None:
        stream.protocol = self
        self.makeConnection(stream)

    def dataReceived(self, data: bytes) -> None:
        self.relayReceived(data)

    def connectionLost(self, reason=None) -> None:
        self.relayConnectionLost(reason)

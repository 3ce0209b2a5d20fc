"""
Splicing two connections into one byte stream, as portforward.py does, with
flow control in both directions and half-close.

Each side is a L{RelayEnd}.  Until it is spliced, a side holds what it reads
(and does not read further); once spliced, what one side reads is written to
the other side's transport, and each transport is registered as the other's
streaming producer, so a slow reader pauses the fast writer instead of
filling our memory.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IHalfCloseableDescriptor, IHalfCloseableProtocol
from zope.interface import implementer


def setNoDelay(transport: object) -> None:
    """
    Turn Nagle's algorithm off where the transport is TCP: a tunnel adds two
    hops, and each must forward small writes at once.
    """
    setTcpNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setTcpNoDelay is not None:
        try:
            setTcpNoDelay(True)
        except OSError:
            pass


@implementer(IHalfCloseableProtocol)
class RelayEnd:
    """
    One side of a splice.  Mixed into a Protocol, which calls
    L{relayReceived} with the bytes it reads and L{relayConnectionLost} from
    its C{connectionLost}.
    """

    transport: object
    peer: Optional["RelayEnd"] = None
    _held: Optional[list[bytes]] = None
    _readClosed = False
    _writeClosed = False

    def holdReading(self) -> None:
        """
        Stop reading until L{splice}: a connection that is not yet spliced
        keeps what the far end sends in the kernel's buffers.
        """
        self.transport.pauseProducing()

    def relayReceived(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None:
            peer.transport.write(data)
        elif self._held is None:
            self._held = [data]
        else:
            self._held.append(data)

    def readConnectionLost(self) -> None:
        """
        The far end will send nothing more: pass the end-of-stream on and
        keep the other direction open.
        """
        self._readClosed = True
        if self.peer is not None:
            self.peer.shutdownWrite()
        if self._writeClosed:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self._writeClosed = True
        if self._readClosed:
            self.transport.loseConnection()

    def shutdownWrite(self) -> None:
        """
        Send end-of-stream after what is buffered, where the transport can
        half-close; otherwise close it once the buffer has drained.
        """
        # The other side has read its last byte: it must not stay our
        # producer, or a full buffer draining would resume it instead of
        # sending the end-of-stream (see FileDescriptor.doWrite).
        self.transport.unregisterProducer()
        if IHalfCloseableDescriptor.providedBy(self.transport):
            self.transport.loseWriteConnection()
        else:
            self.transport.loseConnection()

    def relayConnectionLost(self) -> None:
        """
        This side is gone: close the other after it has written what it
        still holds.
        """
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            # As in shutdownWrite: a dead producer would be resumed instead
            # of the connection being closed once its buffer drains.
            peer.transport.unregisterProducer()
            peer.transport.loseConnection()

    def _flushHeld(self) -> None:
        held, self._held = self._held, None
        if held:
            self.peer.transport.writeSequence(held)
        if self._readClosed:
            self.peer.shutdownWrite()


def splice(a: RelayEnd, b: RelayEnd) -> None:
    """
    Join two connected sides: what either reads goes to the other, with
    flow control both ways.
    """
    a.peer, b.peer = b, a
    a.transport.registerProducer(b.transport, True)
    b.transport.registerProducer(a.transport, True)
    a._flushHeld()
    b._flushHeld()
    a.transport.resumeProducing()
    b.transport.resumeProducing()


class ConnectionSet:
    """
    The live connections a service owns, so that stopping it can close them
    and wait until they are gone.
    """

    def __init__(self) -> None:
        self._live: dict[object, list[Deferred]] = {}

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self):
        return iter(list(self._live))

    def add(self, protocol: object) -> None:
        self._live[protocol] = []

    def discard(self, protocol: object) -> None:
        for waiter in self._live.pop(protocol, ()):
            waiter.callback(None)

    def closeAll(self, clock, timeout: float) -> Deferred:
        """
        Close every connection once what it has buffered is written, and
        abort those still open after C{timeout} seconds (a peer that stopped
        reading must not keep us from stopping); fires when all are gone.
        """
        waiting = []
        for protocol, waiters in list(self._live.items()):
            waiter: Deferred = Deferred()
            waiters.append(waiter)
            waiting.append(waiter)
            protocol.transport.loseConnection()
        if not waiting:
            return DeferredList([])

        def abortTheRest() -> None:
            for protocol in list(self._live):
                protocol.transport.abortConnection()

        deadline = clock.callLater(timeout, abortTheRest)
        allGone = DeferredList(waiting)

        def gone(result):
            if deadline.active():
                deadline.cancel()
            return result

        return allGone.addBoth(gone)

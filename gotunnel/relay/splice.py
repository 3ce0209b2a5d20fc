"""
Splicing two connections into one byte stream, as portforward.py does, with
flow control in both directions and half-close.

Each side is a L{RelayEnd}.  Until it is spliced, a side holds what it reads
(and does not read further); once spliced, what one side reads is written to
the other side's transport, and each transport is registered as the other's
streaming producer, so a slow reader pauses the fast writer instead of
filling our memory.  Where both sides are plain TCP on Linux, a
L{SplicePump} moves the bytes in the kernel instead (see L{gotunnel.relay.zerocopy}).

Once spliced, whatever writes to or closes a side's connection does it
through the side's L{RelayEnd} (L{RelayEnd.writeToConnection},
L{RelayEnd.shutdownWrite}, L{RelayEnd.closeConnection}, or
L{closeConnectionOf} for any protocol), never through the transport: a pump
may have the connection's socket in its splice thread, and must hand it
back to the reactor first.
"""

from __future__ import annotations

import socket
from typing import Callable, Optional

from twisted.internet import error
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import (
    IHalfCloseableDescriptor, IHalfCloseableProtocol, ISSLTransport,
)
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from gotunnel.relay.ratelimit import Throttle
from gotunnel.relay.eagerio import writeThrough
from gotunnel.relay.tcpinternals import heldByTwisted
from gotunnel.relay.zerocopy import HAND_OFF_AFTER, SplicePump


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


IDLE_KEEPALIVE = 30
"""Seconds of silence before L{setKeepAlive}'s probes start."""


def setKeepAlive(transport: object, idle: int = IDLE_KEEPALIVE) -> None:
    """
    Probe the peer after C{idle} seconds of silence, and give up after three
    unanswered probes C{idle} / 3 seconds apart, where the transport is TCP:
    a connection that waits idle (a pooled data channel) must not be found
    dead only when it is handed a user, after a NAT or firewall dropped it.
    """
    handle = getattr(transport, "socket", None)
    setTcpKeepAlive = getattr(transport, "setTcpKeepAlive", None)
    if handle is None or setTcpKeepAlive is None:
        return
    try:
        setTcpKeepAlive(True)
        for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", max(idle // 3, 1)),
                              ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):
                handle.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except OSError:
        pass


class IHalfCloseableTLS(Interface):
    """
    A TLS transport whose C{loseWriteConnection} sends a close_notify and
    goes on reading (L{gotunnel.tls.halfclose}).
    """


def canHalfClose(transport: object) -> bool:
    """
    Whether C{transport} can send end-of-stream and go on reading.  A TLS
    transport of Twisted's own cannot, though it claims to: it copies the
    interfaces of the TCP transport below it, whose loseWriteConnection
    would put a bare FIN under the TLS stream and leave the TLS layer to
    close a socket that is already gone (an AttributeError inside
    twisted.protocols.tls).  Ours can (L{IHalfCloseableTLS}).
    """
    if IHalfCloseableTLS.providedBy(transport):
        return True
    return (IHalfCloseableDescriptor.providedBy(transport)
            and not ISSLTransport.providedBy(transport))


def isReset(reason: Optional[Failure]) -> bool:
    """
    Whether a connection ended by a reset (or another error: a broken pipe,
    a timeout, our own abort) rather than a clean close, as Twisted reports
    it: a reset that the relay passes on as a reset.
    """
    return reason is not None and reason.check(error.ConnectionLost) is not None


@implementer(IHalfCloseableProtocol)
class RelayEnd:
    """
    One side of a splice.  Mixed into a Protocol, which calls
    L{relayReceived} with the bytes it reads and L{relayConnectionLost} from
    its C{connectionLost}.
    """

    transport: object
    peer: Optional["RelayEnd"] = None
    pump: Optional[SplicePump] = None
    throttle: Optional[Throttle] = None
    """The bandwidth cap of what this side reads, if any (see gotunnel.relay.ratelimit)."""
    _held: Optional[list[bytes]] = None
    _readClosed = False
    _writeClosed = False
    relayed = 0
    """Bytes read from this side's connection and passed on through Python."""
    pumpedOut = None
    """With zero copy, the pump's direction from this side: its C{moved}
    counts the bytes the kernel passed on (see L{bytesRead})."""
    pumpedIn = None
    """With a TLS pump (L{gotunnel.relay.tlspump}), its direction to this side:
    what the splice thread holds for this side's socket, which the
    reactor's transport knows nothing of."""

    @property
    def readClosed(self) -> bool:
        """The far end will send nothing more (its end-of-stream was read)."""
        return self._readClosed

    def bytesRead(self, final: bool = False) -> int:
        """
        Bytes read from this side's connection for the other so far: one
        addition per read, and the pump's own count, read without a lock
        (the splice thread adds to it).  C{final}: with what the pipe still
        holds, once this side is gone; without, the count never goes down.
        """
        direction = self.pumpedOut
        if direction is None:
            return self.relayed
        return self.relayed + direction.moved + (direction.pending if final else 0)

    def holdReading(self) -> None:
        """
        Stop reading until L{splice}: a connection that is not yet spliced
        keeps what the far end sends in the kernel's buffers.
        """
        self.transport.pauseProducing()

    def passingOnLastRead(self) -> bool:
        """
        Whether this side's protocol is still inside the read that made the
        splice, with bytes of that read yet to pass on (L{relayReceived}):
        they go first, so the pump leaves the socket until the reactor's
        next turn.
        """
        return False

    def relayReceived(self, data: bytes) -> None:
        self.relayed += len(data)
        peer = self.peer
        if peer is not None and peer.pump is None:
            writeThrough(peer.transport, data)
        elif peer is not None:
            # Only the read that made the splice gets here: Twisted's buffer
            # goes out before the pump's pipe.
            peer.writeToConnection(data)
        elif self._held is None:
            self._held = [data]
        else:
            self._held.append(data)
        if self.throttle is not None:
            self.throttle.passed(self, len(data))

    def readConnectionLost(self) -> None:
        """
        The far end will send nothing more: pass the end-of-stream on and
        keep the other direction open.
        """
        self._readClosed = True
        if self.pump is not None:
            self.pump.readEnded(self)
        if self.peer is not None:
            self.peer.shutdownWrite()
        if self._writeClosed:
            self.closeConnection()

    def writeConnectionLost(self) -> None:
        self._writeClosed = True
        if self._readClosed:
            self.closeConnection()

    def writeToConnection(self, data: bytes) -> None:
        """Write C{data} to this side's connection, after what it holds."""
        if self.pump is not None:
            self.pump.handBack()
        self.transport.write(data)

    def closeConnection(self, abort: bool = False) -> None:
        """
        Close this side's connection once what it holds is written, or at
        once with C{abort}; a pump that holds its socket finishes it.
        """
        if self.pump is not None:
            self.pump.finish(self, abort)
        elif abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def shutdownWrite(self) -> None:
        """
        Send end-of-stream after what is buffered, where the transport can
        half-close; otherwise close it once the buffer has drained.
        """
        # The other side has read its last byte: it must not stay our
        # producer, or a full buffer draining would resume it instead of
        # sending the end-of-stream (see FileDescriptor.doWrite).
        if self.pump is not None:
            self.pump.handBack()
        self.transport.unregisterProducer()
        if canHalfClose(self.transport):
            self.transport.loseWriteConnection()
        elif ISSLTransport.providedBy(self.transport):
            # Twisted's own TLS (an ssl: endpoint string) answers a
            # close_notify by closing both ways, so sending one would cut
            # off the answer the far end still owes: the end-of-stream is
            # not carried, and the connection closes when the other
            # direction ends.
            pass
        else:
            self.closeConnection()

    def relayConnectionLost(self, reason: Optional[Failure] = None) -> None:
        """
        This side is gone: close the other after it has written what it
        still holds; if this side was reset (see L{isReset}), reset the
        other at once, so that the far end learns the stream broke, as a
        plain TCP proxy would tell it, rather than see a clean end.
        """
        peer, self.peer = self.peer, None
        pump, self.pump = self.pump, None
        if pump is not None:
            pump.lost(self)
        if self.throttle is not None:
            self.throttle.forget(self)
        if peer is not None:
            peer.peer = None
            # As in shutdownWrite: a dead producer would be resumed instead
            # of the connection being closed once its buffer drains.
            peer.transport.unregisterProducer()
            peer.closeConnection(abort=isReset(reason))

    def bufferedBytes(self) -> int:
        """Bytes the relay holds for this side's connection, not yet written to it."""
        held = heldByTwisted(self.transport)
        if self.pump is not None:
            held += self.pump.bufferedFor(self)
        if self.pumpedIn is not None:
            held += self.pumpedIn.pending
        return held

    def isBackedUp(self) -> bool:
        """
        This side's connection takes no more for now, and its peer is not
        read until it does.
        """
        if self.pump is not None:
            return self.pump.backedUp(self)
        if self.pumpedIn is not None and self.pumpedIn.pending:
            # The splice thread holds bytes for this socket and reads the
            # other side no more until they are written.
            return True
        return bool(getattr(self.transport, "producerPaused", False))

    def _flushHeld(self) -> None:
        held, self._held = self._held, None
        if held:
            # At once: these are usually a connection's first bytes, read
            # behind the data channel's handshake, and the service answers
            # nothing until it has them.
            writeThrough(self.peer.transport, b"".join(held))
        if self._readClosed:
            self.peer.shutdownWrite()


def splice(a: RelayEnd, b: RelayEnd, zeroCopy: bool = False, spliceThread: object = None,
           busyPoll: float = 0.0, handOffAfter: int = HAND_OFF_AFTER,
           onHandOff: Optional[Callable[[], None]] = None) -> None:
    """
    Join two connected sides: what either reads goes to the other, with
    flow control both ways.  With C{zeroCopy}, and both sides plain TCP on
    Linux, the kernel moves the bytes (after what the sides held); given
    C{spliceThread} too (a L{gotunnel.relay.splicethread.SpliceThreadService}),
    its thread runs those moves while the connections are steady (after
    C{handOffAfter} reads in the reactor, telling C{onHandOff}), and polls
    for up to C{busyPoll} seconds for a socket's answer before it sleeps.
    """
    a.peer, b.peer = b, a
    pump = SplicePump.forEnds(a, b, spliceThread, busyPoll, handOffAfter,
                              onHandOff) if zeroCopy else None
    if pump is not None:
        a.pumpedOut, b.pumpedOut = pump.sides[a].outgoing, pump.sides[b].outgoing
    if pump is None:
        a.transport.registerProducer(b.transport, True)
        b.transport.registerProducer(a.transport, True)
    a._flushHeld()
    b._flushHeld()
    if pump is None:
        a.transport.resumeProducing()
        b.transport.resumeProducing()
    else:
        pump.start()


def closeConnectionOf(protocol: object, abort: bool = False) -> None:
    """
    Close C{protocol}'s connection (at once, with C{abort}): through its own
    C{closeConnection} where it has one (a L{RelayEnd}, which may have to take
    its socket back from a splice thread first; a connection whose protocol
    is its transport's producer for life, which must let go of it before
    Twisted's TLS will close); else through its transport.
    """
    closeConnection = getattr(protocol, "closeConnection", None)
    if closeConnection is not None:
        closeConnection(abort)
    elif abort:
        protocol.transport.abortConnection()
    else:
        protocol.transport.loseConnection()


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
            closeConnectionOf(protocol)
        if not waiting:
            return DeferredList([])

        def abortTheRest() -> None:
            for protocol in list(self._live):
                closeConnectionOf(protocol, abort=True)

        deadline = clock.callLater(timeout, abortTheRest)
        allGone = DeferredList(waiting)

        def gone(result):
            if deadline.active():
                deadline.cancel()
            return result

        return allGone.addBoth(gone)

"""
Zero-copy splicing: once two plain TCP connections on Linux are spliced,
their bytes go from one socket into a pipe and from the pipe into the other
socket with C{os.splice}, and never through Python.

The Twisted transports stay what the reactor watches (epoll keeps one
object per descriptor): a L{SplicePump} only takes over their C{doRead} and
C{doWrite} (L{tcpinternals.takeOverIO}).  A read moves bytes into a pipe
instead of calling C{dataReceived}, and a write drains the pipe after what
Twisted itself still holds.  End-of-stream, errors and every close go on
through the transports as before (C{readConnectionLost},
C{loseWriteConnection}, C{loseConnection}, C{abortConnection},
C{connectionLost}), so the protocols see the events of the ordinary path,
each connection's C{connectionLost} exactly once.

Each socket's handlers are a L{Side} (L{gotunnel.relay.splicedsocket}).
Flow control is the pipe (a L{Direction}, L{gotunnel.relay.splicepipe}): a
side is read only while the pipe towards the other side is empty, so each
direction holds at most one pipe's worth of bytes.

Given a L{SpliceThread}, a pump whose connections are in their steady state
moves its bytes there instead of in the reactor (see
L{gotunnel.relay.splicethread}), with the same pipes and the same rules.
While it is there, the relay writes to and closes either connection
through its L{gotunnel.relay.splice.RelayEnd}, which hands the pump back
to the reactor first (L{SplicePump.handBack}, L{SplicePump.finish}).
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Optional

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorFDSet, ISSLTransport
from twisted.logger import Logger

from gotunnel.relay import splicethread
from gotunnel.relay.splicedsocket import Side
from gotunnel.relay.splicepipe import Direction
from gotunnel.relay.tcpinternals import twistedBuffered, writeDisconnecting

log = Logger(namespace="gotunnel.zerocopy")


def usable(transport: object) -> bool:
    """
    Whether C{transport} is a connected, plain TCP socket that a
    L{SplicePump} can move bytes for.
    """
    return (hasattr(os, "splice")
            and isinstance(transport, tcp.Connection)
            and not ISSLTransport.providedBy(transport)
            and not getattr(transport, "TLS", False)
            and IReactorFDSet.providedBy(transport.reactor)
            and transport.connected
            and not transport.disconnecting
            and not writeDisconnecting(transport))

HAND_OFF_AFTER = 16
"""
Reads a pump makes in the reactor before it goes to the splice thread.  A
hand-off and the hand-back at the end cost the reactor about as much as a
short connection's whole relay (eight epoll_ctl calls, a wake-up through
callFromThread): a request and its answer stay in the reactor, and what
goes on talking (a shell, a stream, a bulk transfer) goes to the thread.
"""

class SplicePump:
    """
    Moves the bytes of two spliced L{RelayEnd}s with C{os.splice}, both
    ways, from L{start} until both connections are lost: in the reactor,
    or in C{thread} while both connections are steady.

    @ivar inThread: the splice thread holds the pump (under C{lock}).
    @ivar handedOff: the pump went to the splice thread and the reactor
        has not taken it back yet (the thread may have let go already).
    @ivar handOffs: how many times the pump went to the splice thread.
    @ivar busyPoll: seconds the splice thread polls for an answer from
        either socket before it sleeps (see L{splicethread.pollBudget}).
    """

    inThread = False
    handedOff = False
    handOffs = 0
    reactorReads = 0
    eventsChanged = False
    """The splice thread must wait for other events on the pump's sockets."""

    def __init__(self, a: object, b: object, thread: object = None,
                 busyPoll: float = 0.0, handOffAfter: int = HAND_OFF_AFTER,
                 onHandOff: Optional[Callable[[], None]] = None) -> None:
        """
        @param handOffAfter: reads in the reactor before the pump goes to
            C{thread} (see L{HAND_OFF_AFTER}).
        @param onHandOff: told each time the pump goes to C{thread}.
        """
        self.handOffAfter = handOffAfter
        self.onHandOff = onHandOff
        self.sides = {a: Side(self, a), b: Side(self, b)}
        sideA, sideB = self.sides[a], self.sides[b]
        sideA.outgoing = sideB.incoming = Direction(sideA, sideB)
        sideB.outgoing = sideA.incoming = Direction(sideB, sideA)
        self.thread = thread
        self.busyPoll = busyPoll
        self.lock = threading.Lock()

    @classmethod
    def forEnds(cls, a: object, b: object, threads: object = None, busyPoll: float = 0.0,
                handOffAfter: int = HAND_OFF_AFTER,
                onHandOff: Optional[Callable[[], None]] = None) -> Optional["SplicePump"]:
        """
        A pump for C{a} and C{b}, with its pipes (and, given C{threads}, a
        L{splicethread.SpliceThreadService}, its splice thread, polling for
        up to C{busyPoll} seconds for an answer); None if either is not
        plain TCP, or if the pipes cannot be made, so that the connection
        takes the ordinary path instead.
        """
        if not (usable(a.transport) and usable(b.transport)):
            return None
        thread = None
        if threads is not None and splicethread.available():
            thread = threads.thread()
        pump = cls(a, b, thread, busyPoll, handOffAfter, onHandOff)
        try:
            pump.openPipes()
        except OSError as e:
            pump.closePipes()
            log.warn("cannot make a pipe to splice a connection ({why}); "
                     "relaying it without zero copy", why=os.strerror(e.errno))
            return None
        return pump

    def openPipes(self) -> None:
        # Made before the pump takes over, not at the first read: a pipe
        # that cannot be made (out of descriptors) then costs the
        # connection its zero copy, not its life.
        for side in self.sides.values():
            side.outgoing.openPipe()

    def closePipes(self) -> None:
        for side in self.sides.values():
            side.outgoing.close()

    @property
    def moved(self) -> int:
        """Bytes moved so far, both ways."""
        return sum(side.outgoing.moved for side in self.sides.values())

    def start(self) -> None:
        """
        Take over both transports and start reading, each side once the
        other has written what Twisted holds for it; move on at once what a
        side's socket already holds, unless its protocol still has bytes
        of its last read to pass on.
        """
        for end, side in self.sides.items():
            end.pump = self
            side.take()
            if end.readClosed:
                side.outgoing.end()
        # Not handed to the splice thread here: the protocol that spliced
        # may still pass on bytes it read past its last frame, which must go
        # out before any the pump moves.  The first read or write settles it
        # (and a read here is one only where nothing is left to pass on).
        for side in self.sides.values():
            side.outgoing.resume()
        for end, side in self.sides.items():
            if self.inThread:
                # The first read handed the pump over: the thread reads now.
                break
            if not end.passingOnLastRead():
                side.readWaiting()

    def steady(self) -> bool:
        """
        Both connections are open both ways, with nothing in Twisted's
        buffers and no event for the reactor to handle: the splice thread
        can move their bytes.
        """
        for side in self.sides.values():
            transport = side.transport
            if (side.outgoing.ended or side.incoming.dropped or side.broken is not None
                    or side.readFailed or not transport.connected or transport.disconnecting
                    or writeDisconnecting(transport) or twistedBuffered(transport)
                    or transport.producer is not None):
                return False
        return True

    def settle(self) -> None:
        """
        Hand the pump to the splice thread, if it has one, is steady, and
        has moved bytes in the reactor C{handOffAfter} times.
        """
        if (self.thread is not None and self.reactorReads >= self.handOffAfter
                and not self.handedOff and self.steady()):
            self.handOff()

    def handOff(self) -> None:
        """
        Take both transports off the reactor and give their sockets to the
        splice thread, until L{reclaim}: the relay ends ask for that before
        they write to or close either connection (L{handBack}, L{finish}).
        """
        for side in self.sides.values():
            side.transport.stopReading()
            side.transport.stopWriting()
        self.handedOff = True
        with self.lock:
            try:
                self.inThread = True
                self.thread.adopt(self)
            except OSError as e:
                # Out of epoll watches: this pump stays with the reactor.
                self.leaveThread()
                self.thread = None
                log.warn("cannot hand a connection to the splice thread ({why}); "
                         "the reactor splices it", why=e.strerror or os.strerror(e.errno))
        if self.thread is None:
            self.handedOff = False
            self._resume()
        else:
            self.handOffs += 1
            if self.onHandOff is not None:
                self.onHandOff()

    def reclaim(self) -> None:
        """
        In the reactor: take the pump back from the splice thread (which
        gave it back, or is made to let go), and go on in the reactor.
        """
        with self.lock:
            self.leaveThread()
        if self.handedOff:
            self.handedOff = False
            self._resume()

    def handBack(self) -> None:
        """
        The relay is about to write to, pause or half-close one of the
        connections: the pump goes on in the reactor, where Twisted's
        transport does that.
        """
        if self.handedOff:
            self.reclaim()

    def finish(self, end: object, abort: bool = False) -> None:
        """
        Close C{end}'s connection, once what the pipe to it holds is
        written (or at once, with C{abort}); the pump comes back to the
        reactor first, so that the thread never touches a socket that the
        reactor closes.
        """
        self.handBack()
        if abort:
            end.transport.abortConnection()
        else:
            end.transport.loseConnection()

    def leaveThread(self) -> None:
        """The splice thread lets go of the pump (C{lock} held by the caller)."""
        if self.inThread:
            self.inThread = False
            self.thread.release(self)

    def _resume(self) -> None:
        """Watch both transports in the reactor again, as the pipes' state asks."""
        for side in self.sides.values():
            if side.incoming.pending or side.broken is not None:
                side.transport.startWriting()
        for side in self.sides.values():
            side.outgoing.resume()
            if side.readFailed:
                side.transport.startReading()

    def readEnded(self, end: object) -> None:
        """C{end}'s connection will send nothing more."""
        side = self.sides.get(end)
        if side is not None:
            side.outgoing.end()

    def lost(self, end: object) -> None:
        """
        C{end}'s connection is gone: what the pipe from it holds still goes
        to the other side (which is closing), what the pipe to it holds is
        dropped.
        """
        side = self.sides.get(end)
        if side is None:
            return
        if self.handedOff:
            # Lost by a path that did not go through a relay end (the
            # reactor's own disconnectAll at shutdown).
            with self.lock:
                self.leaveThread()
            self.handedOff = False
        side.release()
        side.outgoing.end()
        side.incoming.drop()

    def bufferedFor(self, end: object) -> int:
        """Bytes waiting in the pipe towards C{end}."""
        side = self.sides.get(end)
        return side.incoming.pending if side is not None else 0

    def backedUp(self, end: object) -> bool:
        """
        C{end}'s socket takes no more for now: bytes wait in the pipe to it,
        and the other side is not being read.
        """
        side = self.sides.get(end)
        return side is not None and side.incoming.pending > 0

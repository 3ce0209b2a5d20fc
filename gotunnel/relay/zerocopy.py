"""
Zero-copy splicing: once two plain TCP connections on Linux are spliced,
their bytes go from one socket into a pipe and from the pipe into the other
socket with C{os.splice}, and never through Python.

The Twisted transports stay what the reactor watches (epoll keeps one
object per descriptor): a L{SplicePump} only takes over their C{doRead} and
C{doWrite}.  A read moves bytes into a pipe instead of calling
C{dataReceived}, and a write drains the pipe after what Twisted itself still
holds.  End-of-stream, errors and every close go on through the transports
as before (C{readConnectionLost}, C{loseWriteConnection}, C{loseConnection},
C{abortConnection}, C{connectionLost}), so the protocols see the events of
the ordinary path, each connection's C{connectionLost} exactly once.

Flow control is the pipe: a side is read only while the pipe towards the
other side is empty, so each direction holds at most one pipe's worth of
bytes.

Given a L{SpliceThread}, a pump whose connections are in their steady state
moves its bytes there instead of in the reactor (see
L{gotunnel.relay.splicethread}), with the same pipes and the same rules.
"""

from __future__ import annotations

import fcntl
import math
import os
import threading
from typing import Callable, Optional

from twisted.internet import main, tcp
from twisted.internet.interfaces import IReactorFDSet, ISSLTransport
from twisted.logger import Logger

from gotunnel.relay import splicethread
from gotunnel.relay.splicethread import HUNG_UP, READABLE, WRITABLE
from gotunnel.relay.eagerio import twistedBuffered
from gotunnel.relay.tcpinternals import writeDisconnecting

log = Logger(namespace="gotunnel.zerocopy")

FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
READ_SIZE = 1 << 20
"""The most one splice from a socket asks for; the pipe's room limits it too."""

PIPE_SIZE = 1 << 20
"""The size asked of a pipe that fills up (Linux allows 1 MiB to anyone by
default); a pipe starts at the kernel's default (64 KiB), so that idle and
interactive connections do not hold big pipes."""

GROW_AFTER = 32 * 1024
"""A read this big asks for the bigger pipe: half the kernel's default
pipe, which a stream fills and a request and its answer seldom do.  (A
pipe cut down by the user's pipe quota never sees such a read, and keeps
the size it has.)"""

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


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


class Direction:
    """
    Bytes from C{source}'s socket, through a pipe, to C{sink}'s socket.

    @ivar pending: bytes in the pipe.
    @ivar moved: bytes written to the sink so far.
    @ivar ended: the source will be read no more (end-of-stream, or gone).
    """

    pipe: Optional[tuple[int, int]] = None
    grown = False
    pending = 0
    moved = 0
    ended = False
    dropped = False

    def __init__(self, source: "Side", sink: "Side") -> None:
        self.source = source
        self.sink = sink

    def openPipe(self) -> None:
        self.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def grow(self) -> None:
        """A read of a stream's size came: ask for a bigger pipe, where the kernel allows it."""
        self.grown = True
        try:
            fcntl.fcntl(self.pipe[1], F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            # Over the user's pipe quota: the size it has still works.
            pass

    def close(self) -> None:
        pipe, self.pipe = self.pipe, None
        if pipe is not None:
            os.close(pipe[0])
            os.close(pipe[1])

    def mayRead(self) -> bool:
        """
        The source may be read now: the pipe is empty, the sink has no bytes
        of its own to write first, and both connections go on.
        """
        source, sink = self.source.transport, self.sink.transport
        return (not self.ended and not self.pending and not self.dropped
                and source.connected and not source.disconnecting
                and sink.connected and not sink.disconnecting
                and not writeDisconnecting(sink) and not twistedBuffered(sink))

    def resume(self) -> None:
        """Read the source again if it may be read."""
        if self.mayRead():
            self.source.transport.startReading()

    def fill(self) -> int:
        """
        Splice what the source's socket has into the empty pipe: the bytes
        moved, 0 at end-of-stream; BlockingIOError if there are none yet,
        another OSError if the socket is broken.
        """
        n = os.splice(self.source.fd, self.pipe[1], READ_SIZE, flags=FLAGS)
        if n:
            self.pending = n
            if n >= GROW_AFTER and not self.grown:
                self.grow()
        return n

    def forward(self) -> None:
        """Write what L{fill} read on to the sink; a broken sink is its own to report."""
        broken = self.flush()
        if broken is not None:
            # Its own doWrite reports it, so that the reactor closes that
            # connection, not the source.
            self.sink.broken = broken

    def flush(self) -> Optional[OSError]:
        """
        Write what the pipe holds to the sink, until it is empty or the
        sink's socket is full; the error if the sink's socket is broken.
        """
        sinkFd = self.sink.fd
        readEnd = self.pipe[0]
        while self.pending:
            try:
                n = os.splice(readEnd, sinkFd, self.pending, flags=FLAGS)
            except BlockingIOError:
                return None
            except OSError as e:
                return e
            self.pending -= n
            self.moved += n
        if self.ended:
            self.close()
        return None

    def end(self) -> None:
        """The source will send nothing more."""
        self.ended = True
        if not self.pending:
            self.close()

    def drop(self) -> None:
        """The sink is gone: what the pipe holds goes nowhere."""
        self.dropped = True
        self.ended = True
        self.pending = 0
        self.close()


class Side:
    """
    One spliced connection: the C{doRead} and C{doWrite} its transport runs
    while the pump owns it.
    """

    outgoing: Direction
    incoming: Direction
    broken: Optional[OSError] = None
    readFailed = False
    """Reading the socket failed in the splice thread: the reactor's doRead says so."""
    mask = 0
    """The events the splice thread waits for on this socket."""
    writtenAt = 0.0
    """When the splice thread last passed bytes on to this socket that it
    has not answered yet (0: none)."""
    answerGap = math.inf
    """Seconds this socket took to answer the last bytes passed on to it."""

    def __init__(self, pump: "SplicePump", end: object) -> None:
        self.pump = pump
        self.transport = end.transport
        self.fd = self.transport.fileno()

    def take(self) -> None:
        transport = self.transport
        transport.doRead = self.doRead
        transport.doWrite = self.doWrite

    def release(self) -> None:
        """Give the transport its own methods back (unless an abort replaced ours)."""
        attributes = self.transport.__dict__
        for name, ours in (("doRead", self.doRead), ("doWrite", self.doWrite)):
            if attributes.get(name) == ours:
                del attributes[name]

    def doRead(self):
        """
        Splice what the socket has into the pipe towards the other side and
        on into its socket.  End-of-stream and errors are returned to the
        reactor, as C{tcp.Connection.doRead} returns them.
        """
        if self.readFailed:
            return main.CONNECTION_LOST
        if not self.outgoing.mayRead():
            self.transport.stopReading()
            return None
        try:
            n = self._move()
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not n:
            self.outgoing.end()
            return main.CONNECTION_DONE
        return None

    def readWaiting(self) -> None:
        """
        Move on at once what the socket already holds, as L{doRead} would
        at the reactor's next poll.  A connection's first bytes usually
        arrive while it is being spliced, and that poll would put them
        behind whatever else is ready.
        """
        if self.readFailed or not self.outgoing.mayRead():
            return
        try:
            self._move()
        except BlockingIOError:
            pass
        except OSError:
            # The socket is readable once broken, so the reactor calls
            # doRead, which reports it.
            self.readFailed = True
        # An end-of-stream stays in the socket, for doRead to read again.

    def _move(self) -> int:
        """
        Splice what the socket has on towards the other side: the bytes
        read, 0 at end-of-stream; L{Direction.fill}'s errors.
        """
        out = self.outgoing
        n = out.fill()
        if n:
            out.forward()
            if out.pending:
                self.transport.stopReading()
                out.sink.transport.startWriting()
            else:
                pump = self.pump
                pump.reactorReads += 1
                pump.settle()
        return n

    def doWrite(self):
        """
        Write what Twisted's buffer holds, then what the pipe towards this
        socket holds; then let Twisted finish a pending half-close or close.
        """
        if self.broken is not None:
            return main.CONNECTION_LOST
        incoming = self.incoming
        transport = self.transport
        if incoming.pending:
            broken = incoming.flush()
            if broken is not None:
                return main.CONNECTION_LOST
            if incoming.pending:
                return None
        if (twistedBuffered(transport) or transport.disconnecting
                or writeDisconnecting(transport)):
            why = type(transport).doWrite(transport)
            if why is None:
                incoming.resume()
                self.pump.settle()
            return why
        transport.stopWriting()
        incoming.resume()
        self.pump.settle()
        return None

    def wantedEvents(self) -> int:
        """What the splice thread waits for: room in the pipe out, bytes in the pipe in."""
        return ((0 if self.outgoing.pending else READABLE)
                | (WRITABLE if self.incoming.pending else 0))

    def moveInThread(self, events: int) -> bool:
        """
        In the splice thread, for C{events} on this socket: write what the
        pipe towards it holds, read what it has on into the other socket;
        False if anything but bytes came (end-of-stream, an error, a
        hang-up), for the reactor to handle.

        The usual event, bytes that the other socket takes at once, costs
        two splices and no epoll_ctl: this is the tunnel's round trip.
        """
        if events & HUNG_UP:
            return False
        if events & WRITABLE:
            incoming = self.incoming
            if incoming.pending:
                broken = incoming.flush()
                if broken is not None:
                    self.broken = broken
                    return False
                self.pump.eventsChanged = True
        if events & READABLE:
            out = self.outgoing
            if out.pending:
                return True
            try:
                n = out.fill()
            except BlockingIOError:
                return True
            except OSError:
                self.readFailed = True
                return False
            if not n:
                # Left unread for the reactor, whose doRead reads it again.
                return False
            out.forward()
            if out.sink.broken is not None:
                return False
            if out.pending:
                self.pump.eventsChanged = True
        return True


HAND_OFF_AFTER = 16
"""
Reads a pump makes in the reactor before it goes to the splice thread.  A
hand-off and the hand-back at the end cost the reactor about as much as a
short connection's whole relay (eight epoll_ctl calls, a wake-up through
callFromThread): a request and its answer stay in the reactor, and what
goes on talking (a shell, a stream, a bulk transfer) goes to the thread.
"""

GUARDED = ("write", "writeSequence", "loseConnection", "loseWriteConnection",
           "abortConnection", "startReading", "startWriting", "stopReading", "stopWriting",
           "pauseProducing", "resumeProducing", "stopProducing")
"""The transport methods that take a pump back from the splice thread before they run."""


class SplicePump:
    """
    Moves the bytes of two spliced L{RelayEnd}s with C{os.splice}, both
    ways, from L{start} until both connections are lost: in the reactor,
    or in C{thread} while both connections are steady.

    @ivar inThread: the splice thread holds the pump (under C{lock}).
    @ivar handOffs: how many times the pump went to the splice thread.
    @ivar busyPoll: seconds the splice thread polls for an answer from
        either socket before it sleeps (see L{splicethread.pollBudget}).
    """

    inThread = False
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
        self._guards: list[tuple[object, str, object]] = []

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
            if end._readClosed:
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
                and not self._guards and self.steady()):
            self.handOff()

    def handOff(self) -> None:
        """
        Take both transports off the reactor and give their sockets to the
        splice thread; until L{reclaim}, any of the L{GUARDED} methods
        called on either takes them back first.
        """
        for side in self.sides.values():
            side.transport.stopReading()
            side.transport.stopWriting()
        for side in self.sides.values():
            self._guard(side.transport)
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
            self._unguard()
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
        if self._guards:
            self._unguard()
            self._resume()

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

    def _guard(self, transport) -> None:
        for name in GUARDED:
            def reclaimFirst(*args, _name=name, **kwargs):
                self.reclaim()
                return getattr(transport, _name)(*args, **kwargs)

            transport.__dict__[name] = reclaimFirst
            self._guards.append((transport, name, reclaimFirst))

    def _unguard(self) -> None:
        guards, self._guards = self._guards, []
        for transport, name, guard in guards:
            if transport.__dict__.get(name) is guard:
                del transport.__dict__[name]

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
        if self._guards:
            # Lost by a path that called no guarded method.
            with self.lock:
                self.leaveThread()
            self._unguard()
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

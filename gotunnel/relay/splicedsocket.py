"""
One socket of a zero-copy splice (a L{Side}): the C{doRead} and C{doWrite}
the reactor runs for it while a L{gotunnel.relay.zerocopy.SplicePump} owns
it, and the moves the splice thread makes for it.  Its bytes go out
through one L{Direction} and come in through another.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from twisted.internet import main

from gotunnel.relay.splicepipe import Direction
from gotunnel.relay.splicethread import HUNG_UP, READABLE, WRITABLE
from gotunnel.relay.tcpinternals import (
    giveBackIO, takeOverIO, twistedBuffered, twistedDoWrite, writeDisconnecting,
)

if TYPE_CHECKING:
    from gotunnel.relay.zerocopy import SplicePump


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
        takeOverIO(self.transport, self.doRead, self.doWrite)

    def release(self) -> None:
        """Give the transport its own methods back (unless an abort replaced ours)."""
        giveBackIO(self.transport, self.doRead, self.doWrite)

    def doRead(self):
        """
        Splice what the socket has into the pipe towards the other side and
        on into its socket.  End-of-stream and errors are returned to the
        reactor, as C{tcp.Connection.doRead} returns them.
        """
        if self.pump.handedOff:
            # Reading again while the splice thread holds the pump: a
            # close that did not come through the relay end.
            self.pump.reclaim()
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
        if self.pump.handedOff:
            # As in doRead: a write or a close not through the relay end.
            self.pump.reclaim()
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
            why = twistedDoWrite(transport)
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

"""
One direction of a zero-copy splice: the pipe that bytes from one socket
go through, with C{os.splice}, on their way into the other, and what it
holds.  L{gotunnel.relay.zerocopy} runs two of them for each spliced pair
of connections.
"""

from __future__ import annotations

import fcntl
import os
from typing import TYPE_CHECKING, Optional

from gotunnel.relay.tcpinternals import twistedBuffered, writeDisconnecting

if TYPE_CHECKING:
    from gotunnel.relay.splicedsocket import Side

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


"""
Many user connections over one data connection (the C{mux} extension, see
docs/protocol.md), framed as yamux frames (L{gotunnel.mux.frames}).

L{MuxSession} is the state machine of one such connection: bytes in, calls
on its streams (L{gotunnel.mux.stream}) out, frames to its transport, with
a budget on what all its streams queue together.  Zero copy does not
apply: a stream's bytes are framed in Python.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

from twisted.internet import error
from twisted.logger import Logger
from twisted.python.failure import Failure

from gotunnel.mux.frames import (
    ACK, DATA, FIN, GO_AWAY, HEADER, PING, RST, SYN, VERSION, WINDOW, WINDOW_UPDATE, MuxError,
)
from gotunnel.mux.stream import MuxStream

log = Logger(namespace="gotunnel.mux")

MAX_STREAMS = 65536
"""The most streams one session holds at once."""

KEEPALIVE = 30.0
"""Seconds between pings; a session that answers none for two is dropped."""

SESSION_BUDGET = 16 * 1024 * 1024
"""
The most bytes a session's streams keep queued toward the peer, all streams
together.  A window bounds one stream; without this, a peer that takes
nothing would hold a window per stream of ours, thousands of them.  Past it,
only a stream whose next read can go out at once keeps reading, until half
of it has gone.
"""

BUDGET_LOG_INTERVAL = 60.0
"""Seconds between two lines about one session being over its budget."""


class MuxSession:
    """
    The streams of one data connection.  C{opens}: whether this end opens
    streams (the server) or accepts them (the client, through C{accept}, a
    callable given each new stream; it sets the stream's protocol).
    C{admit}, if given, is asked before each stream the peer opens: False
    answers it with a reset.
    """

    transport = None
    goneAway = False
    closed = False
    paused = False
    """The connection's buffer is full: nothing more is written to it for now."""
    overBudget = False
    """The streams' queues reached L{budget}, and have not yet drained to half of it."""
    queued = 0
    """Bytes all streams keep queued toward the peer."""
    _pingCall = None
    _lastHeard = 0.0
    _budgetLogged = None

    def __init__(self, clock, opens: bool,
                 accept: Optional[Callable[[MuxStream], None]] = None,
                 maxStreams: int = MAX_STREAMS,
                 onClose: Optional[Callable[["MuxSession"], None]] = None,
                 budget: int = SESSION_BUDGET,
                 admit: Optional[Callable[[], bool]] = None) -> None:
        self.clock = clock
        self.opens = opens
        self.accept = accept
        self.admit = admit
        self.maxStreams = maxStreams
        self.onClose = onClose
        self.budget = budget
        self.streams: dict[int, MuxStream] = {}
        self.reading: set[MuxStream] = set()
        """Streams whose producer is running: over budget, they are few."""
        self._ready: OrderedDict[int, None] = OrderedDict()
        self._buffer = bytearray()
        self._nextId = 1
        self._pingId = 0
        self._heldByConnection: list[MuxStream] = []

    def start(self, transport) -> None:
        """Carry frames over C{transport}, which pushes back through L{pauseProducing}."""
        self.transport = transport
        transport.registerProducer(self, True)
        self._lastHeard = self.clock.seconds()
        self._pingCall = self.clock.callLater(KEEPALIVE, self._keepalive)

    # Frames out
    def sendFrame(self, kind: int, flags: int, streamId: int, length: int,
                  payload: bytes = b"") -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(HEADER.pack(VERSION, kind, flags, streamId, length) + payload)

    def wantsToSend(self, stream: MuxStream) -> None:
        if stream.hasSomethingToSend():
            self._ready[stream.streamId] = None
        self._pump()

    def queuedChanged(self, delta: int) -> None:
        """A stream queued (or sent or dropped) C{delta} bytes toward the peer."""
        self.queued += delta
        if delta > 0 and not self.overBudget and self.queued >= self.budget:
            self.overBudget = True
            self._logOverBudget()
            # Only running producers can add to the queues; a stream that
            # has its own queue to send, or too little window, waits.
            for stream in list(self.reading):
                stream.syncProducer()
        elif delta < 0 and self.overBudget and self.queued <= self.budget // 2:
            self.overBudget = False
            self._heldByConnection = []
            for stream in list(self.streams.values()):
                stream.syncProducer()

    def _logOverBudget(self) -> None:
        now = self.clock.seconds()
        if self._budgetLogged is not None and now - self._budgetLogged < BUDGET_LOG_INTERVAL:
            return
        self._budgetLogged = now
        log.info("the streams of a multiplexed connection to {peer} queued {queued} bytes the "
                 "peer has not taken (budget {budget}); streams that cannot send stop reading "
                 "until half of it has gone", peer=_peer(self.transport), queued=self.queued,
                 budget=self.budget)

    def _pump(self) -> None:
        # Round robin: one chunk per ready stream per turn, until the
        # connection's buffer is full (we are paused) or nothing is ready.
        while self._ready and not self.paused and not self.closed:
            streamId, _ = self._ready.popitem(last=False)
            stream = self.streams.get(streamId)
            if stream is None:
                continue
            stream.sendSome()
            if stream.hasSomethingToSend() and not stream.closed:
                self._ready[streamId] = None

    def pauseProducing(self) -> None:
        self.paused = True
        if self.overBudget:
            # What the few running streams read now could not go out.
            running = list(self.reading)
            for stream in running:
                stream.syncProducer()
            self._heldByConnection.extend(running)

    def resumeProducing(self) -> None:
        self.paused = False
        self._pump()
        held, self._heldByConnection = self._heldByConnection, []
        for stream in held:
            stream.syncProducer()

    def stopProducing(self) -> None:
        self.paused = True

    # Streams
    def openStream(self) -> Optional[MuxStream]:
        """A new stream to the peer, or None if this session takes no more."""
        if not self.opens or self.goneAway or self.closed or len(self.streams) >= self.maxStreams:
            return None
        streamId = self._nextId
        self._nextId += 2
        stream = MuxStream(self, streamId)
        self.streams[streamId] = stream
        self.sendFrame(WINDOW_UPDATE, SYN, streamId, 0)
        return stream

    def streamClosed(self, stream: MuxStream) -> None:
        self.streams.pop(stream.streamId, None)
        self._ready.pop(stream.streamId, None)
        if self.goneAway and not self.streams:
            self.close()

    # Frames in
    def dataReceived(self, data: bytes) -> None:
        """Bytes from the connection; a framing error closes the session."""
        self._lastHeard = self.clock.seconds()
        self._buffer += data
        try:
            while len(self._buffer) >= HEADER.size and not self.closed:
                version, kind, flags, streamId, length = HEADER.unpack_from(self._buffer)
                if version != VERSION:
                    raise MuxError(f"frame version {version}")
                if kind == DATA:
                    if length > WINDOW:
                        raise MuxError(f"a data frame of {length} bytes")
                    if len(self._buffer) < HEADER.size + length:
                        return
                    payload = bytes(self._buffer[HEADER.size:HEADER.size + length])
                    del self._buffer[:HEADER.size + length]
                else:
                    payload = b""
                    del self._buffer[:HEADER.size]
                self._frame(kind, flags, streamId, length, payload)
        except MuxError as e:
            log.warn("closing a multiplexed data connection from {peer}: {why}",
                     peer=_peer(self.transport), why=str(e))
            self.close(abort=True)

    def _frame(self, kind: int, flags: int, streamId: int, length: int, payload: bytes) -> None:
        if kind == PING:
            if streamId != 0:
                raise MuxError("a ping on a stream")
            if flags & SYN and not self.paused:
                # Not while the peer reads nothing of ours: a flood of pings
                # must not pile answers up in our buffer.
                self.sendFrame(PING, ACK, 0, length)
            return
        if kind == GO_AWAY:
            self.goneAway = True
            if not self.streams:
                self.close()
            return
        if kind not in (DATA, WINDOW_UPDATE):
            raise MuxError(f"frame type {kind}")
        if streamId == 0:
            raise MuxError("a stream frame for stream 0")
        stream = self.streams.get(streamId)
        if flags & SYN:
            if self.opens or stream is not None or streamId % 2 != 1:
                raise MuxError(f"the peer cannot open stream {streamId}")
            if (len(self.streams) >= self.maxStreams or self.goneAway
                    or (self.admit is not None and not self.admit())):
                self.sendFrame(WINDOW_UPDATE, RST, streamId, 0)
                return
            stream = MuxStream(self, streamId)
            self.streams[streamId] = stream
            self.sendFrame(WINDOW_UPDATE, ACK, streamId, 0)
            self.accept(stream)
        if stream is None:
            # A stream we already reset or closed: frames in flight are dropped.
            return
        if flags & RST:
            stream.reset()
            return
        if kind == WINDOW_UPDATE and length:
            stream.windowUpdate(length)
        if payload:
            stream.received(payload)
        if flags & FIN and not stream.closed:
            stream.finReceived()

    # Lifetime
    def _keepalive(self) -> None:
        self._pingCall = None
        if self.closed:
            return
        if self.clock.seconds() - self._lastHeard >= 2 * KEEPALIVE:
            log.warn("a multiplexed data connection to {peer} answered nothing for {seconds:g} s; "
                     "closing it", peer=_peer(self.transport), seconds=2 * KEEPALIVE)
            self.close(abort=True)
            return
        self._pingId = (self._pingId + 1) & 0xFFFFFFFF
        self.sendFrame(PING, SYN, 0, self._pingId)
        self._pingCall = self.clock.callLater(KEEPALIVE, self._keepalive)

    def goAway(self) -> None:
        """Tell the peer this end opens and accepts no more streams."""
        if not self.goneAway:
            self.sendFrame(GO_AWAY, 0, 0, 0)
        self.goneAway = True
        if not self.streams:
            self.close()

    def close(self, abort: bool = False) -> None:
        """Close the connection; its streams are reset."""
        if self.transport is not None and not self.closed:
            # Twisted's TLS sends its close_notify, and so closes, only once
            # no producer is registered: the session is one for its whole life.
            self.transport.unregisterProducer()
            if abort:
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()
        self.connectionLost()

    def connectionLost(self) -> None:
        """The connection is gone: every stream ends with a reset."""
        if self.closed:
            return
        self.closed = True
        if self._pingCall is not None and self._pingCall.active():
            self._pingCall.cancel()
        self._pingCall = None
        for stream in list(self.streams.values()):
            stream._close(Failure(error.ConnectionLost("the multiplexed connection was lost")))
        if self.onClose is not None:
            self.onClose(self)

    def bufferedBytes(self) -> int:
        """What every stream holds in our memory."""
        return sum(stream.bufferedBytes() for stream in self.streams.values()) + len(self._buffer)


def _peer(transport) -> str:
    peer = getattr(transport, "getPeer", None)
    address = peer() if peer is not None else None
    return f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"

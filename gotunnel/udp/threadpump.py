"""
A UDP mapping's datagrams moved by the splice thread
(L{gotunnel.relay.splicethread}), off the reactor.

A datagram's round trip through the tunnel wakes the server and the client
twice each; in the reactor each of those turns costs more Python than the
datagram's own work, and the echo took three times socat's (bench/README.md,
"UDP tunnels").  So once a plain carrying channel is up, a L{DatagramPump}
gives its sockets to the splice thread: the carrying channel, and the
server's public port or the client's session sockets.  The thread frames,
unframes and sends, and polls for an answer where one is expected soon, as
it does for TCP.

What needs the reactor stays there: a datagram from a new peer (the
server's source lists, the client's new session socket) is handed to the
reactor, a bounded number at a time, and the rest of that peer's datagrams
are moved by the thread once its session is known.  Whatever the thread
cannot do (end of stream, an error, a broken frame) hands the pump back to
the reactor, whose Twisted transports then meet it as they always do.  The
reactor takes the pump back (L{DatagramPump.reclaim}) before it closes any
of its sockets.

Bytes the kernel does not take at once wait in the pump (L{pending}), at
most L{CARRIER_BUFFER}: beyond that, datagrams are dropped and counted, as
in the reactor.
"""

from __future__ import annotations

import socket
import threading
from typing import Callable, Optional

from twisted.internet import tcp
from twisted.logger import Logger

from gotunnel.relay.splicethread import HUNG_UP, READABLE, WRITABLE
from gotunnel.relay.tcpinternals import twistedBuffered
from gotunnel.udp.carrier import CARRIER_BUFFER, Carrier
from gotunnel.udp.framing import HEADER
from gotunnel.udp.sockets import READ_SIZE

log = Logger(namespace="gotunnel.udp")

READ_BATCH = 64
"""Datagrams the thread reads from one socket before it looks at the others."""

HANDOVER_LIMIT = 256
"""Datagrams of new peers handed to the reactor and not yet taken there;
beyond it, a new peer's datagram is dropped (a flood of new source addresses
must not grow the reactor's queue)."""

STEADY_TRIES = 20
STEADY_RETRY = 0.01
"""A carrying channel whose first bytes (the answer to its handshake) are
still in Twisted's buffer is handed to the thread once they are written:
looked at again every L{STEADY_RETRY} seconds, L{STEADY_TRIES} times."""


class Outgoing:
    """Where a side's datagrams went last (for L{gotunnel.relay.splicethread.pollBudget})."""

    __slots__ = ("sink",)

    def __init__(self, sink: "DatagramSide") -> None:
        self.sink = sink


class DatagramSide:
    """One socket of a pump, as the splice thread watches it."""

    mask = 0
    writtenAt = 0.0
    answerGap = float("inf")

    def __init__(self, pump: "DatagramPump", sock: socket.socket) -> None:
        self.pump = pump
        self.socket = sock
        self.fd = sock.fileno()
        self.outgoing = Outgoing(self)

    def wantedEvents(self) -> int:
        return READABLE

    def moveInThread(self, events: int) -> bool:
        raise NotImplementedError()


class CarrierSide(DatagramSide):
    """The carrying channel's TCP socket: frames both ways."""

    def wantedEvents(self) -> int:
        return READABLE | WRITABLE if self.pump.pending else READABLE

    def moveInThread(self, events: int) -> bool:
        return self.pump.carrierEvents(events)


class PortSide(DatagramSide):
    """
    A UDP socket of the mapping (the server's public port, a client's
    session): its datagrams framed onto the carrying channel.
    """

    def __init__(self, pump: "DatagramPump", sock: socket.socket, port: object,
                 session: object = None) -> None:
        super().__init__(pump, sock)
        self.port = port
        self.session = session
        self.outgoing.sink = pump.carrierSide

    def moveInThread(self, events: int) -> bool:
        return self.pump.portReadable(self)


class DatagramPump:
    """
    The sockets of one UDP mapping's end, moved by the splice thread while
    it holds them (L{handedOff}).

    @ivar lock: held by the thread while it moves, and by the reactor while
        it sends, hands a datagram over or takes the pump back.
    @ivar sides: the sides the thread watches, by socket.
    @ivar pending: what the carrying channel's socket has not taken yet.
    @ivar failedWith: why the thread found the carrying channel broken (a
        bad frame), for the reactor to close it.
    """

    inThread = False
    handedOff = False
    eventsChanged = False
    failedWith: Optional[str] = None
    waiting = 0
    triesLeft = STEADY_TRIES
    retry = None

    def __init__(self, tunnel: object, carrier: Carrier, threads: object, reactor: object,
                 busyPoll: float, counters: object) -> None:
        self.tunnel = tunnel
        self.carrier = carrier
        self.threads = threads
        self.thread = None
        self.reactor = reactor
        self.busyPoll = busyPoll
        self.counters = counters
        self.lock = threading.RLock()
        self.pending = bytearray()
        self.sides: dict[object, DatagramSide] = {}
        self.carrierSide: Optional[CarrierSide] = None

    @staticmethod
    def usable(carrier: Carrier, threads: object) -> bool:
        """Whether a pump can move C{carrier}'s datagrams: a plain TCP channel, and a thread."""
        transport = carrier.transport
        return (threads is not None and isinstance(transport, tcp.Connection)
                and not transport.TLS)

    # -- in the reactor ----------------------------------------------------

    def begin(self) -> None:
        """
        Hand the pump to the thread at the reactor's next turn: not now,
        in the middle of a read whose rest Twisted still delivers.
        """
        self._cancelRetry()
        self.triesLeft = STEADY_TRIES
        self.retry = self.reactor.callLater(0, self.start)

    def start(self) -> None:
        """Hand the pump to the thread, now or once its channel is steady (see L{STEADY_TRIES})."""
        self._cancelRetry()
        if self.handedOff:
            return
        if self.steady():
            self.handOff()
        elif self.triesLeft > 0 and self.carrier.transport.connected:
            self.triesLeft -= 1
            self.retry = self.reactor.callLater(STEADY_RETRY, self.start)

    def steady(self) -> bool:
        transport = self.carrier.transport
        return (transport.connected and not transport.disconnecting
                and not twistedBuffered(transport) and self.ports() is not None)

    def ports(self) -> Optional[list[tuple[object, object]]]:
        """The UDP ports the thread is to read, with their sessions; None: not yet."""
        raise NotImplementedError()

    def handOff(self) -> None:
        transport = self.carrier.transport
        ports = self.ports()
        transport.stopReading()
        for port, _ in ports:
            port.stopReading()
        with self.lock:
            self.carrierSide = CarrierSide(self, transport.socket)
            self.sides = {transport: self.carrierSide}
            for port, session in ports:
                self.sides[port] = self.carrierSide.outgoing.sink = PortSide(
                    self, port.socket, port, session)
            try:
                self.thread = self.threads.thread()
                self.inThread = self.handedOff = True
                self.thread.adopt(self)
            except OSError as e:
                self.leaveThread()
                self.handedOff = False
                log.warn("cannot hand a UDP mapping to the splice thread ({why}); the "
                         "reactor moves its datagrams", why=e.strerror)
        if not self.handedOff:
            self._resume(ports)

    def reclaim(self) -> None:
        """
        In the reactor: take the pump back from the thread, which let go of
        it or is made to, and go on in the reactor (Twisted's transports
        read again; what the kernel had not taken is written by Twisted).
        """
        self._cancelRetry()
        with self.lock:
            self.leaveThread()
            if not self.handedOff:
                return
            self.handedOff = False
            pending = bytes(self.pending)
            del self.pending[:]
            ports = [(side.port, side.session) for side in self.sides.values()
                     if isinstance(side, PortSide)]
            self.sides = {}
        transport = self.carrier.transport
        if pending and transport.connected:
            transport.write(pending)
        self._resume(ports)
        why, self.failedWith = self.failedWith, None
        if why is not None:
            self.brokenFrame(why)

    def _resume(self, ports) -> None:
        transport = self.carrier.transport
        if transport.connected and not transport.disconnecting:
            transport.startReading()
        for port, _ in ports:
            if self.stillOpen(port):
                port.startReading()

    def stop(self) -> None:
        """In the reactor: the carrying channel is closing; the pump is the reactor's for good."""
        self.triesLeft = 0
        self.reclaim()

    def stillOpen(self, port: object) -> bool:
        return getattr(port, "socket", None) is not None

    def brokenFrame(self, why: str) -> None:
        """The thread found a frame that breaks the protocol: close the channel."""
        raise NotImplementedError()

    def _cancelRetry(self) -> None:
        if self.retry is not None and self.retry.active():
            self.retry.cancel()
        self.retry = None

    def send(self, frame: bytes) -> Optional[bool]:
        """
        In the reactor: write one frame on the carrying channel while the
        thread holds it (whether it was taken, as L{Carrier.send});
        None once it does not, the pump taken back: Twisted writes it.
        """
        with self.lock:
            if self.inThread:
                return self.write([frame]) == 1
        self.reclaim()
        return None

    def watch(self, port: object, session: object) -> None:
        """In the reactor: a new session's socket, for the thread to read too."""
        with self.lock:
            if not self.inThread:
                return
            port.stopReading()
            side = self.sides[port] = PortSide(self, port.socket, port, session)
            try:
                self.thread.watch(side)
            except OSError:
                del self.sides[port]
                port.startReading()

    def unwatch(self, port: object) -> None:
        """In the reactor: the thread reads C{port} no more (it is about to close)."""
        with self.lock:
            side = self.sides.pop(port, None)
            if side is not None and self.inThread:
                self.thread.unwatch(side)

    def leaveThread(self) -> None:
        """The splice thread lets go of the pump (C{lock} held by the caller)."""
        if self.inThread:
            self.inThread = False
            self.thread.release(self)

    def _inReactor(self, deliver: Callable, args: tuple) -> None:
        with self.lock:
            self.waiting -= 1
            deliver(*args)

    # -- in the thread, the lock held --------------------------------------

    def handOver(self, deliver: Callable, *args) -> bool:
        """Have the reactor call C{deliver(*args)}; False if too many wait already."""
        if self.waiting >= HANDOVER_LIMIT:
            return False
        self.waiting += 1
        self.reactor.callFromThread(self._inReactor, deliver, args)
        return True

    def write(self, frames: list) -> int:
        """
        Write C{frames} (whole frames) on the carrying channel, in one send;
        the number taken: those that would take L{pending} over
        L{CARRIER_BUFFER} are dropped.
        """
        room = CARRIER_BUFFER - len(self.pending)
        taken = []
        for frame in frames:
            if len(frame) <= room:
                room -= len(frame)
                taken.append(frame)
        if not taken:
            return 0
        data = taken[0] if len(taken) == 1 else b"".join(taken)
        if self.pending:
            self.pending += data
            return len(taken)
        try:
            sent = self.carrierSide.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Broken: the thread meets it as an error event, and hands back.
            sent = 0
        if sent < len(data):
            self.pending += memoryview(data)[sent:]
            self._watchWrites()
        return len(taken)

    def _watchWrites(self) -> None:
        if self.inThread:
            self.thread.rewatch(self.carrierSide)

    def carrierEvents(self, events: int) -> bool:
        if events & WRITABLE and self.pending:
            try:
                sent = self.carrierSide.socket.send(self.pending)
            except BlockingIOError:
                sent = 0
            except OSError:
                return False
            del self.pending[:sent]
            if not self.pending:
                self._watchWrites()
        if events & (READABLE | HUNG_UP):
            try:
                data = self.carrierSide.socket.recv(READ_SIZE)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                # End of stream: the reactor's transport reads it again.
                return False
            why = self.carrier.decoder.feed(data, self.fromCarrier)
            if why is not None:
                self.failedWith = why
                return False
        return True

    def fromCarrier(self, peer_id: int, payload: bytes) -> None:
        raise NotImplementedError()

    def portReadable(self, side: PortSide) -> bool:
        raise NotImplementedError()

    def frames(self, side: PortSide, datagrams: list) -> None:
        """Frame C{datagrams} (peer id, payload) onto the carrying channel, counting."""
        if not datagrams:
            return
        pack = HEADER.pack
        taken = self.write([pack(len(payload), peer_id) + payload
                            for peer_id, payload in datagrams])
        self.forwarded(taken)
        self.counters.dropped_backed_up += len(datagrams) - taken

    def forwarded(self, count: int) -> None:
        raise NotImplementedError()


"""
TLS off the reactor: once a TLS data channel and the plain connection it is
spliced to (the user's, or the local service's) are in their steady state,
the splice thread moves their bytes, encrypting and decrypting with the
very C{OpenSSL.SSL.Connection} that Twisted's L{TLSMemoryBIOProtocol}
made and handshook (so every certificate and name check has happened, in
Twisted, before).

In the reactor each 64 KiB read costs a dozen Python calls through Twisted's
TLS layer and the relay, one C{send} per 16 KiB record; the thread reads
256 KiB at a time, encrypts record after record into the memory BIO (cffi
releases the GIL while OpenSSL works), and writes them in one C{send}.
L{gotunnel.relay.tlsends} is the thread's side of the pump; while the thread
holds it, OpenSSL reads and writes the TLS socket itself.
L{gotunnel.relay.tlsrecords} makes and reads the records.

The hand-off follows L{gotunnel.relay.zerocopy.SplicePump}: the pump counts the
reads its transports make in the reactor and, after C{handOffAfter} of them,
with nothing buffered anywhere, stops the reactor reading and writing both
sockets and gives them to the splice thread.  Anything but bytes (an
end-of-stream, a socket error, a TLS close_notify or alert) hands the pump
back: what the thread holds is written through the transports, and the
reactor meets the event itself, as if it had never left.  Whatever the
reactor does to either connection (write, close, abort, pause) takes the
pump back first.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Optional

from OpenSSL.SSL import ZeroReturnError
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from gotunnel.relay import splicethread
from gotunnel.relay.eagerio import twistedBuffered
from gotunnel.relay.tcpinternals import GUARDED, writeDisconnecting
from gotunnel.relay.tlsends import Flow, PlainEnd, TLSEnd
from gotunnel.relay.tlsrecords import Records, recordsUsable
from gotunnel.relay.zerocopy import HAND_OFF_AFTER, usable

log = Logger(namespace="gotunnel.tlspump")

READ_SIZE = 1 << 18
"""The most one read of either socket takes in the thread."""

TLS_GUARDED = ("write", "writeSequence", "loseConnection", "abortConnection",
               "registerProducer", "unregisterProducer",
               "pauseProducing", "resumeProducing", "stopProducing")
"""The TLS transport's methods that take a pump back from the thread before they run."""


TLS_NEEDS = ("_tlsConnection", "_handshakeDone", "_lostTLSConnection", "_aborted",
             "_appSendBuffer", "_flushReceiveBIO", "_tlsShutdownFinished")
"""What the pump reads or calls of Twisted's private TLS protocol: a Twisted
without one of them keeps every TLS connection in the reactor."""


def tlsUsable(transport: object) -> bool:
    """
    Whether C{transport} is Twisted's TLS over a plain TCP connection, its
    handshake done and nothing under way to close it.
    """
    return (isinstance(transport, TLSMemoryBIOProtocol)
            and all(hasattr(transport, name) for name in TLS_NEEDS)
            and recordsUsable(transport._tlsConnection)
            and transport._handshakeDone
            and not transport._lostTLSConnection
            and not transport._aborted
            and not transport.disconnecting
            and usable(transport.transport))


class TLSPump:
    """
    Moves the bytes between a plain and a TLS L{RelayEnd} in the splice
    thread while both are steady; in the reactor, Twisted's TLS and the
    relay move them as ever, and the pump only counts reads.

    @ivar inThread: the splice thread holds the pump (under C{lock}).
    @ivar handOffs: how many times the pump went to the splice thread.
    """

    inThread = False
    useSocket = True
    """OpenSSL reads and writes the TLS socket while the thread holds it
    (L{Records.attach}); False keeps pyOpenSSL's memory BIOs."""
    handOffs = 0
    reactorReads = 0
    eventsChanged = False

    def __init__(self, plain: object, tls: object, thread: object,
                 busyPoll: float = 0.0, handOffAfter: int = HAND_OFF_AFTER,
                 onHandOff: Optional[Callable[[], None]] = None) -> None:
        self.tlsTransport = tls.transport
        self.records = Records(tls.transport._tlsConnection)
        self.plain = PlainEnd(self, plain, plain.transport)
        self.tls = TLSEnd(self, tls, tls.transport.transport)
        self.plain.outgoing = self.tls.incoming = Flow(self.plain, self.tls)
        self.tls.outgoing = self.plain.incoming = Flow(self.tls, self.plain)
        self.sides = {plain: self.plain, tls: self.tls}
        self.thread = thread
        self.busyPoll = busyPoll
        self.handOffAfter = handOffAfter
        self.onHandOff = onHandOff
        self.lock = threading.Lock()
        self._guards: list[tuple[object, str, object, object]] = []

    @classmethod
    def forEnds(cls, a: object, b: object, threads: object, busyPoll: float = 0.0,
                handOffAfter: int = HAND_OFF_AFTER,
                onHandOff: Optional[Callable[[], None]] = None) -> Optional["TLSPump"]:
        """
        A pump for C{a} and C{b}, one of them plain TCP and the other TLS
        over TCP with its handshake done, given C{threads} (a
        L{splicethread.SpliceThreadService}); None otherwise, for the
        ordinary path.
        """
        if threads is None or not splicethread.available():
            return None
        if usable(a.transport) and tlsUsable(b.transport):
            plain, tls = a, b
        elif usable(b.transport) and tlsUsable(a.transport):
            plain, tls = b, a
        else:
            return None
        return cls(plain, tls, threads.thread(), busyPoll, handOffAfter, onHandOff)

    @property
    def moved(self) -> int:
        """Plaintext bytes moved in the thread so far, both ways."""
        return self.plain.outgoing.moved + self.tls.outgoing.moved

    # -- in the reactor

    def start(self) -> None:
        """
        Count the reads of both sockets in the reactor, and hand off when
        steady: after a read, or after a write that emptied Twisted's
        buffer (a stream keeps the slower socket's buffer full, and only
        then is nothing buffered).
        """
        for end in self.sides.values():
            transport = end.transport
            attributes = transport.__dict__
            ownRead = attributes.get("doRead") or transport.doRead
            ownWrite = attributes.get("doWrite") or transport.doWrite

            def doRead(_ownRead=ownRead):
                if self._guards:
                    # An event the reactor polled before the hand-off.
                    return None
                why = _ownRead()
                if why is None:
                    self.reactorReads += 1
                    self.settle()
                return why

            def doWrite(_ownWrite=ownWrite, _transport=transport):
                if self._guards:
                    # As in doRead: Twisted's own doWrite would stop writing
                    # after taking the pump back, and leave what the thread
                    # held in its buffer unwritten.
                    return None
                why = _ownWrite()
                if why is None and not twistedBuffered(_transport):
                    self.settle()
                return why

            attributes["doRead"] = doRead
            attributes["doWrite"] = doWrite

    def steady(self) -> bool:
        """
        Both connections open both ways, TLS's handshake done, nothing in
        Twisted's buffers (nor in its TLS layer) and nobody paused: the
        thread can move their bytes.
        """
        tls = self.tlsTransport
        if not tlsUsable(tls) or tls._appSendBuffer or getattr(tls, "_producerPaused", False):
            return False
        aggregator = getattr(tls, "_aggregator", None)
        if aggregator is not None and getattr(aggregator, "_buffer", None):
            return False
        relayTLS = self.tls.relayEnd
        if relayTLS._readClosed or self.plain.relayEnd._readClosed:
            return False
        for end in self.sides.values():
            transport = end.transport
            if (not transport.connected or transport.disconnecting
                    or writeDisconnecting(transport) or twistedBuffered(transport)
                    or transport.producerPaused):
                return False
        return True

    def settle(self) -> None:
        if (self.reactorReads >= self.handOffAfter and not self._guards
                and self.thread is not None and self.steady()):
            self.handOff()

    def handOff(self) -> None:
        """
        Take both sockets off the reactor and give them to the splice
        thread; until L{reclaim}, any guarded method called on either
        transport (or on the TLS layer) takes them back first.
        """
        if not self.handOffs:
            # At the first hand-off, as the sockets' read buffers: a
            # connection that never goes to the thread holds none of them.
            self.records.allocate(READ_SIZE)
            for end in self.sides.values():
                end.buffer = bytearray(READ_SIZE)
        for end in self.sides.values():
            end.transport.stopReading()
            end.transport.stopWriting()
        self.tls.ended = None
        self._guard(self.plain.transport, GUARDED)
        self._guard(self.tls.transport, GUARDED)
        self._guard(self.tlsTransport, TLS_GUARDED)
        with self.lock:
            try:
                self.inThread = True
                self.tls.onSocket = self.useSocket and self.records.attach(self.tls.fd)
                self.thread.adopt(self)
            except OSError as e:
                self.leaveThread()
                self.thread = None
                log.warn("cannot hand a TLS connection to the splice thread ({why}); "
                         "the reactor relays it", why=e.strerror or os.strerror(e.errno))
        if self.thread is None:
            self._unguard()
            self._resume()
        else:
            self.handOffs += 1
            self.reactorReads = 0
            if self.onHandOff is not None:
                self.onHandOff()

    def reclaim(self) -> None:
        """In the reactor: take the pump back from the splice thread, and go on in the reactor."""
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
            if self.tls.onSocket:
                # pyOpenSSL's memory BIOs back, with the records of a write
                # the socket had no room for.
                self.tls.onSocket = False
                flow = self.tls.incoming
                flow.held = self.records.detach(flow.held)

    def _resume(self) -> None:
        """
        The reactor reads both sockets again, and Twisted's transports take
        what the thread still held for them: plaintext decrypted for the
        plain connection, records encrypted for the TLS one.  Then Twisted's
        TLS meets the close_notify or alert the thread left to it.
        """
        for end in self.sides.values():
            end.transport.startReading()
        for end in self.sides.values():
            pending = end.incoming.take()
            if pending:
                end.transport.write(pending)
        ended, self.tls.ended = self.tls.ended, None
        if isinstance(ended, ZeroReturnError):
            # Twisted's TLS reads the close_notify again, and answers it.
            self.tlsTransport._flushReceiveBIO()
        elif ended is not None:
            self.tlsTransport._tlsShutdownFinished(Failure(ended))

    def _guard(self, transport: object, names: tuple[str, ...]) -> None:
        attributes = transport.__dict__
        for name in names:
            previous = attributes.get(name)

            def reclaimFirst(*args, _name=name, **kwargs):
                self.reclaim()
                return getattr(transport, _name)(*args, **kwargs)

            attributes[name] = reclaimFirst
            self._guards.append((transport, name, reclaimFirst, previous))

    def _unguard(self) -> None:
        guards, self._guards = self._guards, []
        for transport, name, guard, previous in reversed(guards):
            attributes = transport.__dict__
            if attributes.get(name) is guard:
                if previous is None:
                    del attributes[name]
                else:
                    attributes[name] = previous

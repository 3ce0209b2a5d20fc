"""
How a server or a client joins a user's connection to its data channel: a
L{Splicer}, given to its service, holds the choices (zero copy, the splice
thread, when a pump goes to it) and counts what it did.  Tests give their
own instead of patching module functions.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

import twisted
from twisted.logger import Logger

from gotunnel.relay import splice as relay
from gotunnel.relay.splicethread import SpliceThreadService
from gotunnel.relay.tcpinternals import missingForZeroCopy
from gotunnel.relay.zerocopy import HAND_OFF_AFTER

log = Logger(namespace="gotunnel.splicer")


def tlsLoaded() -> bool:
    """
    Whether this process can hold a TLS connection at all: only once
    Twisted's TLS protocol is imported.  A plain run may leave it (and
    pyOpenSSL) out; then the TLS pump is not imported either.
    """
    return sys.modules.get("twisted.protocols.tls") is not None


class Splicer:
    """
    Splices relay ends the way it was told to, and counts them.

    @ivar spliceThread: the L{SpliceThreadService} steady pumps go to (a
        child of the service that owns this splicer), or None.
    @ivar splices: ends spliced so far; C{pumped}: of those, how many with
        a zero-copy pump; C{handOffs}: times a pump went to the thread;
        C{tlsPumped}: of those spliced, how many with a L{gotunnel.relay.tlspump.TLSPump}.
    @ivar tlsThread: whether a TLS data channel's bytes go to the splice
        thread too (see L{gotunnel.relay.tlspump}).
    """

    splices = 0
    pumped = 0
    handOffs = 0
    tlsPumped = 0

    def __init__(self, zeroCopy: bool = False,
                 spliceThread: Optional[SpliceThreadService] = None,
                 busyPoll: float = 0.0, handOffAfter: int = HAND_OFF_AFTER,
                 tlsThread: bool = True) -> None:
        self.tlsThread = tlsThread
        self.zeroCopy = zeroCopy
        self.spliceThread = spliceThread
        self.busyPoll = busyPoll
        self.handOffAfter = handOffAfter

    @classmethod
    def fromSettings(cls, settings: object, reactor: object, threads: bool = True,
                     check: Callable[[], list[str]] = missingForZeroCopy) -> "Splicer":
        """
        The splicer C{settings} ask for (C{zero_copy}, C{splice_thread},
        C{busy_poll} in microseconds); with C{threads} False, never a
        splice thread (for an owner that is not a service).  Zero copy is
        off, said in one log line, if C{check} finds the installed Twisted
        lacks what it needs (see L{tcpinternals}).
        """
        zeroCopy = settings.zero_copy
        if zeroCopy:
            missing = check()
            if missing:
                log.warn("zero copy is off: this Twisted ({version}) lacks {missing}",
                         version=twisted.__version__, missing=", ".join(missing))
                zeroCopy = False
        thread = None
        if threads and zeroCopy and settings.splice_thread:
            thread = SpliceThreadService(reactor)
        return cls(zeroCopy, thread, settings.busy_poll / 1e6)

    def splice(self, a: relay.RelayEnd, b: relay.RelayEnd,
               zeroCopy: bool = True) -> Optional[object]:
        """
        Join C{a} and C{b} (see L{relay.splice}); C{zeroCopy} False keeps
        their bytes in Python (a capped mapping's, see L{gotunnel.relay.ratelimit}).
        Returns their pump (a L{gotunnel.relay.zerocopy.SplicePump} or a
        L{gotunnel.relay.tlspump.TLSPump}), if they have one.
        """
        relay.splice(a, b, self.zeroCopy and zeroCopy, self.spliceThread, self.busyPoll,
                     self.handOffAfter, self._handedOff)
        self.splices += 1
        if a.pump is not None:
            self.pumped += 1
            return a.pump
        if self.tlsThread and self.zeroCopy and zeroCopy and tlsLoaded():
            from gotunnel.relay.tlspump import TLSPump

            pump = TLSPump.forEnds(a, b, self.spliceThread, self.busyPoll,
                                   self.handOffAfter, self._handedOff)
            if pump is not None:
                self.tlsPumped += 1
                a.pumpedOut, b.pumpedOut = pump.sides[a].outgoing, pump.sides[b].outgoing
                a.pumpedIn, b.pumpedIn = pump.sides[a].incoming, pump.sides[b].incoming
                pump.start()
                return pump
        return None

    def _handedOff(self) -> None:
        self.handOffs += 1

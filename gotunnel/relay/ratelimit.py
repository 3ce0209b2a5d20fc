"""
Bandwidth caps: a token bucket per mapping and direction, shared by every
connection of the mapping, that pauses the reading side of a splice when
the mapping has sent more than its rate allows, and resumes it once the
debt is paid.  Reading less is the whole mechanism: TCP's own flow control
then slows the far end, and nothing is buffered beyond one read.
"""

from __future__ import annotations

import re
from typing import Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
         "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}

MIN_BURST = 16 * 1024
"""The least a bucket holds when full: a few reads' worth."""


def parseRate(text: object, what: str) -> int:
    """
    Bytes a second from C{10MB}, C{512 KiB}, C{1.5GB} or a plain number of
    bytes (units of 1000, or of 1024 with an i; a trailing C{/s} is
    allowed); ValueError naming C{what} otherwise.  0 means no cap.
    """
    if isinstance(text, bool):
        raise ValueError(f"{what} must be a rate like 10MB (bytes a second), got {text!r}")
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*(?:/s)?\s*", str(text))
    unit = match and UNITS.get(match.group(2).lower())
    if not match or unit is None:
        raise ValueError(f"{what} must be a rate like 10MB, 512KiB or 1GB (bytes a second), "
                         f"got {text!r}")
    return int(float(match.group(1)) * unit)


class TokenBucket:
    """
    C{rate} bytes a second, up to C{burst} in hand.  Taking more than is in
    hand goes into debt; L{take} says how long until it is paid.
    """

    def __init__(self, clock: IReactorTime, rate: float, burst: Optional[float] = None) -> None:
        self.clock = clock
        self.rate = float(rate)
        self.burst = burst if burst is not None else max(self.rate / 20, MIN_BURST)
        self.tokens = self.burst
        self.last = clock.seconds()

    def take(self, size: int) -> float:
        """Take C{size} bytes; the seconds to wait before taking more (0: none)."""
        now = self.clock.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= size
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Throttle:
    """
    One direction of a mapping's cap: the reading ends of its splices that
    went over it, paused until their bucket's debt is paid.
    """

    def __init__(self, clock: IReactorTime, rate: float) -> None:
        self.clock = clock
        self.bucket = TokenBucket(clock, rate)
        self._paused: dict[object, IDelayedCall] = {}

    def passed(self, end, size: int) -> None:
        """C{end} (a L{gotunnel.relay.splice.RelayEnd}) read C{size} bytes and passed them on."""
        delay = self.bucket.take(size)
        if delay > 0 and end not in self._paused:
            end.transport.pauseProducing()
            self._paused[end] = self.clock.callLater(delay, self._resume, end)

    def _resume(self, end) -> None:
        del self._paused[end]
        if not end._readClosed and end.peer is not None:
            # An end-of-stream already read must not be read again; and an
            # end no longer spliced is not ours to resume (a user waiting
            # for its data channel is paused by its own early-bytes bound).
            end.transport.resumeProducing()

    def forget(self, end) -> None:
        """C{end}'s connection is gone."""
        call = self._paused.pop(end, None)
        if call is not None and call.active():
            call.cancel()

    def __len__(self) -> int:
        return len(self._paused)

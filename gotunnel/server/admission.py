"""
Admission to the control port: caps on the connections that have yet to
say what they are (per source address, and in all), and the back-off that
makes guessing tokens slow.

Strangers must not be able to hold all our descriptors, nor starve the
data channels we asked a registered client for: what a source address's
clients are owed (see L{gotunnel.server.registry.TunnelRegistry.owedTo}) is not held
to the caps.  Only counts and times here; closing a connection is the
channel's own business (C{evict}).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Callable, Hashable, Optional, Protocol

from twisted.internet.interfaces import IReactorTime

from gotunnel.config.settings import ServerSettings

MAX_AUTH_FAILURE_SOURCES = 10_000
"""Source addresses whose wrong tokens in a row the server remembers."""

AUTH_FAILURE_MEMORY = 60.0
"""Seconds after which a wrong token no longer counts as one in a row."""


def countDown(counter: Counter, key: Hashable) -> None:
    """Take one from C{key}'s count, dropping the key at zero, so that an idle table is empty."""
    left = counter[key] - 1
    if left > 0:
        counter[key] = left
    else:
        counter.pop(key, None)


class Newcomer(Protocol):
    """What admission knows of a connection: where it is from, and how to close it."""

    source: str

    def evict(self, held: int) -> None:
        """Close now, to make room for another address's; the address holds C{held}."""


class Admission:
    """
    The connections from each source address yet to send their first
    frame, oldest first; the registered control channels per address; and
    the wrong tokens in a row per address.
    """

    def __init__(self, settings: ServerSettings, clock: IReactorTime,
                 owedTo: Callable[[str], int], idle: Callable[[Newcomer], bool]) -> None:
        """
        @param owedTo: how many connections the clients registered from a
            source address may have on the way at once.
        @param idle: whether a pending connection is idle (has sent no
            first frame being acted on), and so may be evicted.
        """
        self.settings = settings
        self.clock = clock
        self._owedTo = owedTo
        self._idle = idle
        self._pending: dict[str, OrderedDict[Newcomer, None]] = {}
        self.clientHosts: Counter[str] = Counter()
        """Control channels per source address: the data channels their clients
        owe us are not held to the caps."""
        self.authFailures: OrderedDict[str, tuple[int, float]] = OrderedDict()
        """Wrong tokens in a row and the time of the last, per source address,
        least recent first."""

    @property
    def pending(self) -> dict[str, int]:
        """How many connections wait for their first frame, per source address."""
        return {source: len(channels) for source, channels in self._pending.items()}

    def _owed(self, source: str) -> int:
        return self._owedTo(source) if source in self.clientHosts else 0

    def admit(self, channel: Newcomer) -> Optional[str]:
        """
        Count a new connection that has yet to say what it is; the reason to
        refuse it, or None.  When all the room is taken, the oldest such
        connection of the address that holds the most makes room for one
        from an address that holds fewer.
        """
        settings = self.settings
        source = channel.source
        count = len(self._pending.get(source, ()))
        owed = self._owed(source)
        if count >= owed:
            if count - owed >= settings.max_pending_per_source:
                return (f"{settings.max_pending_per_source} connections from this address are "
                        "already waiting for their first frame")
            if (sum(len(channels) for channels in self._pending.values())
                    >= settings.max_pending_total and not self._evictFor(count - owed)):
                return (f"{settings.max_pending_total} connections are already waiting "
                        "for their first frame")
        # Below what it is owed: data channels we asked this address's
        # clients for come in bursts, and strangers' idle connections must
        # not starve them.
        self._pending.setdefault(source, OrderedDict())[channel] = None
        return None

    def _evictFor(self, held: int) -> bool:
        """
        Close the oldest idle connection of the address that holds the most
        beyond what it is owed, if that is more than C{held}; whether one
        was closed.
        """
        most, heaviest = held, None
        for source, channels in self._pending.items():
            excess = len(channels) - self._owed(source)
            if excess > most:
                most, heaviest = excess, source
        if heaviest is None:
            return False
        for victim in self._pending[heaviest]:
            # One that sent its first frame is being registered: it is not idle.
            if self._idle(victim):
                victim.evict(most)
                return True
        return False

    def release(self, channel: Newcomer) -> None:
        """A connection counted by L{admit} has sent its first frame, or gone."""
        channels = self._pending.get(channel.source)
        if channels is not None:
            channels.pop(channel, None)
            if not channels:
                del self._pending[channel.source]

    def clientArrived(self, host: str) -> None:
        self.clientHosts[host] += 1

    def clientLeft(self, host: str) -> None:
        countDown(self.clientHosts, host)

    def authenticationFailed(self, host: str) -> float:
        """
        Record a wrong token from C{host}; how long to wait before answering,
        growing with each failure in a row so that guessing is slow.
        """
        now = self.clock.seconds()
        count, last = self.authFailures.pop(host, (0, now))
        if now - last > AUTH_FAILURE_MEMORY:
            count = 0
        count += 1
        self.authFailures[host] = (count, now)
        if len(self.authFailures) > MAX_AUTH_FAILURE_SOURCES:
            # The least recent: clearing the whole table instead would let
            # a spray of addresses reset a guesser's back-off.
            self.authFailures.popitem(last=False)
        if count == 1:
            return 0.0
        return min(0.1 * 2 ** (count - 2), self.settings.auth_failure_delay_max)

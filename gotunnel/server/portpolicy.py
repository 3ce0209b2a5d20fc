"""
Who may use a public port: allow and deny lists of source networks, checked
by the server when it accepts a user, before anything is sent to the client.

Pure policy, no sockets: L{SourceSet} answers "is this address in one of
these networks" in a few set lookups (one per prefix length in use, not one
per network), so that a list of thousands of CIDRs costs an accept next to
nothing.  L{RefusalLog} turns a flood of refusals into a line every few
seconds.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger(namespace="gotunnel.portpolicy")

IP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

MAX_REQUESTED_SOURCES = 1024
"""The most networks a client may send in one list of its C{register}."""

REFUSAL_LOG_INTERVAL = 10.0
"""Seconds between two lines about users a public port refused."""


def parseNetwork(text: str, what: str) -> Network:
    """
    A CIDR (C{192.0.2.0/24}, C{2001:db8::/32}) or one address; ValueError
    naming C{what} otherwise.  Host bits set are refused: C{10.0.0.1/8} is
    a typing error more often than not.
    """
    try:
        return ipaddress.ip_network(str(text).strip())
    except ValueError as e:
        raise ValueError(f"{what} must be an address or a network like 192.0.2.0/24 or "
                         f"2001:db8::/32, got {text!r} ({e})") from None


def sourceAddress(host: object) -> Optional[IP]:
    """The IP address of a peer's host (IPv4-mapped IPv6 as IPv4), or None."""
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class SourceSet:
    """
    A set of networks, looked up by prefix length: for each length in use,
    the set of network numbers of that length.  A lookup masks the address
    once per length, so its cost grows with the lengths in use (at most 33
    for IPv4, 129 for IPv6), not with the networks.
    """

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)
        self._byLength: dict[int, dict[int, set[int]]] = {4: {}, 6: {}}
        for network in self.networks:
            self._byLength[network.version].setdefault(network.prefixlen, set()).add(
                int(network.network_address))
        self._masks = {
            version: [(length, (((1 << bits) - 1) >> length) ^ ((1 << bits) - 1), numbers)
                      for length, numbers in sorted(table.items())]
            for version, table, bits in ((4, self._byLength[4], 32), (6, self._byLength[6], 128))}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __len__(self) -> int:
        return len(self.networks)

    def __contains__(self, ip: IP) -> bool:
        number = int(ip)
        for _, mask, numbers in self._masks[ip.version]:
            if number & mask in numbers:
                return True
        return False


@dataclass(frozen=True)
class SourcePolicy:
    """
    One party's say on who may connect: not in C{deny}, and in C{allow}
    unless C{allow} is empty.
    """

    allow: SourceSet
    deny: SourceSet

    @classmethod
    def of(cls, allow: Iterable[Network] = (), deny: Iterable[Network] = ()) -> "SourcePolicy":
        return cls(SourceSet(allow), SourceSet(deny))

    def __bool__(self) -> bool:
        return bool(self.allow) or bool(self.deny)

    def permits(self, ip: Optional[IP]) -> bool:
        if ip is None:
            # Not an IP peer: only a policy with no allow list lets it in.
            return not self.allow
        if self.deny and ip in self.deny:
            return False
        return not self.allow or ip in self.allow


def permitted(policies: Iterable[SourcePolicy], host: object) -> bool:
    """
    Whether every one of C{policies} lets C{host} in: a client's own lists
    can only narrow the server's, never widen them.
    """
    ip = None
    for policy in policies:
        if ip is None:
            ip = sourceAddress(host)
        if not policy.permits(ip):
            return False
    return True


class RefusalLog:
    """
    Log refused users of one public port: the first at once, then at most
    one line per L{REFUSAL_LOG_INTERVAL} with how many since the last, so
    that a flood of refusals is not a flood of lines.
    """

    def __init__(self, clock: IReactorTime, remote_port: int,
                 interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self.clock = clock
        self.remote_port = remote_port
        self.interval = interval
        self.total = 0
        self._unlogged = 0
        self._last: tuple[str, str] = ("", "")
        self._call = None

    def refused(self, host: str, reason: str) -> None:
        self.total += 1
        self._unlogged += 1
        self._last = (host, reason)
        if self._call is None:
            self._flush()

    def _flush(self) -> None:
        count, self._unlogged = self._unlogged, 0
        if not count:
            self._call = None
            return
        host, reason = self._last
        log.warn("public port {remote_port} refused {count} users ({reason}; the last from "
                 "{host}); {total} in all", remote_port=self.remote_port, count=count,
                 reason=reason, host=host, total=self.total)
        self._call = self.clock.callLater(self.interval, self._flush)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


MAX_RATE_SOURCES = 10_000
"""Source addresses L{SourceRate} remembers at once; the least recently
seen is forgotten first, so a flood from many addresses costs bounded
memory."""


def narrowest(*limits: Optional[float]) -> float:
    """The strictest of C{limits}, where 0 and None mean no limit (and so does the result 0)."""
    set_ = [limit for limit in limits if limit]
    return min(set_) if set_ else 0


class SourceRate:
    """
    New connections per second per source address, as a token bucket per
    address (C{rate} tokens a second, up to C{rate}, at least 1, in hand):
    a burst of C{rate} at once, then C{rate} a second.  The table of
    addresses is LRU-bounded by C{maxSources}.
    """

    def __init__(self, clock: IReactorTime, rate: float,
                 maxSources: int = MAX_RATE_SOURCES) -> None:
        self.clock = clock
        self.rate = rate
        self.burst = max(rate, 1.0)
        self.maxSources = maxSources
        self._buckets: "OrderedDict[str, tuple[float, float]]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, host: str) -> bool:
        """Take a token for a new connection from C{host}; False if it has none."""
        now = self.clock.seconds()
        tokens, last = self._buckets.pop(host, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        admitted = tokens >= 1
        if admitted:
            tokens -= 1
        if len(self._buckets) >= self.maxSources:
            self._buckets.popitem(last=False)
        self._buckets[host] = (tokens, now)
        return admitted

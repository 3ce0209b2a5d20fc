"""
What the server's user connections and published ports have carried, and
the one log line each user connection leaves when it ends.

Counting costs nothing on the hot path: the relay adds a read's length to
its side's count (L{gotunnel.relay.splice.RelayEnd.bytesRead}), the kernel's moves
are counted by the splice pump itself, and everything else here happens
once per connection or when someone asks (the admin API, a scrape).

The tables are bounded: live users are the connections the server holds
anyway; per-port totals are kept for at most L{MAX_PORT_STATS} (public
port, client name) pairs, and a pair no tunnel holds is folded into the
"other" totals to make room for a new one.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Optional, Union

from twisted.internet import error
from twisted.logger import Logger, LogLevel

from gotunnel.wire.printable import printable

log = Logger(namespace="gotunnel.accounting")

USER_CLOSED = "user closed"
SERVICE_CLOSED = "service closed"
RESET = "reset"
TIMED_OUT = "data-channel timeout"
REFUSED = "refused"
BY_ADMIN = "closed by admin"
ENDINGS = (USER_CLOSED, SERVICE_CLOSED, RESET, TIMED_OUT, REFUSED, BY_ADMIN)
"""How a user connection ended, as its log line and the admin API say."""

REFUSED_WAITING_USERS = "waiting_users"
"""A user refused because too many already wait for a data channel."""
REFUSED_CLIENT_GONE = "client_gone"
"""A user still waiting when its client's control channel went."""
REFUSED_TIMEOUT = "data_channel_timeout"
"""A user whose data channel did not come in time."""
REFUSED_SOURCE = "source_address"
"""A user refused at accept by the port's source lists (L{gotunnel.server.portpolicy})."""
REFUSED_MAX_USERS = "max_users"
"""A user refused at accept: the port already has its most users at once."""
REFUSED_CONNECTION_RATE = "connection_rate"
"""A user refused at accept: its address opened connections faster than allowed."""
REFUSED_NO_MEMBER = "no_group_member"
"""A user refused at accept: no member of the port's group has its service up."""

SETUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 30.0, 60.0)
"""Upper bounds, in seconds, of the data-channel setup latency histogram."""

MAX_PORT_STATS = 200
"""(public port, client name) pairs with totals of their own; the rest are "other"."""

OTHER = "other"


def connectionLogLevel(setting: str) -> Optional[LogLevel]:
    """The level of the per-connection line for a connection_log setting; None: off."""
    return None if setting == "off" else LogLevel.levelWithName(setting)


def logClientConnection(setting: str, channel, clock) -> None:
    """
    The client's line for a user connection that ended, from the data
    channel that served it (see L{gotunnel.client.datachannel.DataChannelClient}).
    """
    level = connectionLogLevel(setting)
    if level is None:
        return
    local = channel.servedLocal
    mapping = channel.tunnel.mapping
    log.emit(level,
             "connection {conn} to {client} port {remote_port} -> {local} ended ({how}) after "
             "{seconds:.3f} s: {bytes_in} bytes in, {bytes_out} bytes out",
             conn=channel.request.conn_id if channel.request is not None else "(pooled)",
             client=channel.tunnel.settings.name, remote_port=mapping.remote_port,
             local=f"{mapping.local_host}:{mapping.local_port}", how=channel.endedBy,
             seconds=clock.seconds() - channel.startedAt, bytes_in=channel.bytesRead(True),
             bytes_out=local.bytesRead(True) if local is not None else 0)


def endingOf(reason, cleanly: str) -> str:
    """C{cleanly} if a connection was lost with C{reason} by a close, else L{RESET}."""
    if reason is None or reason.check(error.ConnectionDone):
        return cleanly
    return RESET


def noteEnding(connection: object, how: str) -> None:
    """Remember how C{connection} ended, unless something ended it before."""
    if getattr(connection, "endedBy", None) is None:
        connection.endedBy = how


class Histogram:
    """Counts of observations at or under each of L{SETUP_BUCKETS}, their sum and number."""

    def __init__(self) -> None:
        self.counts = [0] * (len(SETUP_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(SETUP_BUCKETS, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count) pairs, as a Prometheus histogram's buckets are, with "+Inf" last."""
        running, buckets = 0, []
        for bound, count in zip(SETUP_BUCKETS + (float("inf"),), self.counts):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return buckets

    def add(self, other: "Histogram") -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.sum += other.sum
        self.count += other.count


@dataclass
class DatagramCounters:
    """What one UDP mapping's end forwarded and dropped, by reason (see L{gotunnel.udp.tunnels})."""

    forwarded_in: int = 0
    """From remote peers towards the local service."""
    forwarded_out: int = 0
    """From the local service back to its peers."""
    dropped_backed_up: int = 0
    """The carrying channel was over its bound, or not up."""
    dropped_sessions: int = 0
    """A new peer beyond the cap on sessions (or, on the client, no socket for it)."""
    dropped_unknown: int = 0
    """For a peer id no longer known (expired), or the socket would not send."""

    @property
    def forwarded(self) -> int:
        return self.forwarded_in + self.forwarded_out

    @property
    def dropped(self) -> int:
        return self.dropped_backed_up + self.dropped_sessions + self.dropped_unknown

    def snapshot(self) -> dict[str, int]:
        return {field.name: getattr(self, field.name) for field in fields(self)}

    def add(self, other: "DatagramCounters") -> None:
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


class PortStats:
    """
    Totals of one public port as published by one client name, over every
    registration: users accepted, how they ended, the bytes of those that
    ended (live ones are added when asked), data-channel setup times.
    """

    def __init__(self, remote_port: str, client: str) -> None:
        self.remote_port = remote_port
        self.client = client
        self.opened = 0
        self.ended: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.bytesIn = 0
        self.bytesOut = 0
        self.setup = Histogram()
        self.datagrams: Optional[DatagramCounters] = None
        """A UDP port's datagrams (None for a TCP port)."""
        self.holders = 0
        """Tunnels and live users counting on these totals now (not folded while any do)."""

    def fold(self, other: "PortStats") -> None:
        """Add C{other}'s totals to these."""
        self.opened += other.opened
        for mine, theirs in ((self.ended, other.ended), (self.refused, other.refused)):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count
        self.bytesIn += other.bytesIn
        self.bytesOut += other.bytesOut
        self.setup.add(other.setup)
        if other.datagrams is not None:
            if self.datagrams is None:
                self.datagrams = DatagramCounters()
            self.datagrams.add(other.datagrams)


class ServerStats:
    """
    The server's counts, and its live users by id ("u17"), for the admin
    API, the metrics and the per-connection log line.
    """

    def __init__(self, clock, connectionLog: str = "info") -> None:
        self.clock = clock
        self.logLevel = connectionLogLevel(connectionLog)
        self.ports: OrderedDict[tuple[int, str], PortStats] = OrderedDict()
        self.other = PortStats(OTHER, OTHER)
        self.users: dict[str, object] = {}
        self._userIds = itertools.count(1)
        self._clientIds = itertools.count(1)
        self.authFailures: dict[str, int] = {"control": 0, "admin": 0}
        self.admissionRefusals: dict[str, int] = {"pending": 0, REFUSED_WAITING_USERS: 0}

    def newClientId(self) -> str:
        return f"c{next(self._clientIds)}"

    def portStats(self, remote_port: Union[int, str], client: str) -> PortStats:
        """
        The totals of C{remote_port} (or of a virtual host, by its label)
        published by C{client}, held until L{release}: its own while there
        is room, else "other".
        """
        key = (remote_port, client)
        stats = self.ports.get(key)
        if stats is None:
            if len(self.ports) >= MAX_PORT_STATS and not self._foldOne():
                stats = self.other
            else:
                stats = self.ports[key] = PortStats(str(remote_port), client)
        else:
            self.ports.move_to_end(key)
        stats.holders += 1
        return stats

    def release(self, stats: PortStats) -> None:
        """A tunnel holding C{stats} is closed."""
        stats.holders -= 1

    def _foldOne(self) -> bool:
        """Fold the least recently used totals no tunnel holds into "other"; False if none."""
        for key, stats in self.ports.items():
            if stats.holders <= 0:
                del self.ports[key]
                self.other.fold(stats)
                return True
        return False

    def allPortStats(self) -> list[PortStats]:
        folded = self.other.opened or self.other.datagrams is not None
        return list(self.ports.values()) + ([self.other] if folded else [])

    def userOpened(self, user) -> None:
        """C{user} connected to a public port."""
        user.userId = f"u{next(self._userIds)}"
        self.users[user.userId] = user
        user.tunnel.stats.opened += 1
        user.tunnel.stats.holders += 1

    def portRefused(self, stats: PortStats, why: str) -> None:
        """
        A connection to the port of C{stats} is refused for C{why}; one
        refused at accept (source lists, per-port limits) never was a user.
        """
        stats.refused[why] = stats.refused.get(why, 0) + 1

    def userRefused(self, user, why: str) -> None:
        """C{user} is closed before it reached the service, for C{why}."""
        self.portRefused(user.tunnel.stats, why)
        if why == REFUSED_WAITING_USERS:
            self.admissionRefusals[why] += 1
        noteEnding(user, TIMED_OUT if why == REFUSED_TIMEOUT else REFUSED)

    def dataChannelReady(self, user, seconds: float) -> None:
        user.tunnel.stats.setup.observe(seconds)

    def userClosed(self, user, reason) -> None:
        """C{user}'s connection is gone: count it, and log its line."""
        if self.users.pop(getattr(user, "userId", None), None) is None:
            return
        noteEnding(user, endingOf(reason, USER_CLOSED))
        tunnel = user.tunnel
        stats = tunnel.stats
        stats.ended[user.endedBy] = stats.ended.get(user.endedBy, 0) + 1
        bytesIn, bytesOut = userBytes(user, final=True)
        stats.bytesIn += bytesIn
        stats.bytesOut += bytesOut
        stats.holders -= 1
        if self.logLevel is not None:
            log.emit(self.logLevel,
                     "connection {conn} from {user} to {client} port {remote_port} -> local port "
                     "{local_port} ended ({how}) after {seconds:.3f} s: {bytes_in} bytes in, "
                     "{bytes_out} bytes out",
                     conn=user.userId, user=user.peerAddress, client=printable(tunnel.name),
                     remote_port=tunnel.remote_port, local_port=tunnel.local_port,
                     how=user.endedBy, seconds=self.clock.seconds() - user.connectedAt,
                     bytes_in=bytesIn, bytes_out=bytesOut)


def userBytes(user, final: bool = False) -> tuple[int, int]:
    """
    Bytes from C{user} towards the service, and from the service to
    C{user}, so far (see L{gotunnel.relay.splice.RelayEnd.bytesRead}).
    """
    channel = getattr(user, "dataChannel", None)
    return (user.bytesRead(final),
            channel.bytesRead(final) if channel is not None else 0)

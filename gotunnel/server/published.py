"""
What the server publishes: which mapping holds each public port (or
virtual host), the groups of clients that share a port, the users connected
to each port, and the users waiting for a data channel.

Only the tables, no sockets and no policy: L{gotunnel.server.registry.TunnelRegistry}
decides, these remember.  A waiting user is one record in one table
(L{WaitingUsers}), added and removed in one place, and found there by its
C{conn_id} or as the oldest of its mapping.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Hashable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gotunnel.server.access import RegistrationRefused
from gotunnel.server.admission import countDown
from gotunnel.server.leases import PortLeases
from gotunnel.wire.printable import printable

if TYPE_CHECKING:
    from gotunnel.server.groups import Group
    from gotunnel.server.publicport import PublicPort
    from gotunnel.server.mapping import PublishedMapping
    from gotunnel.server.publicusers import PublicUser

log = Logger(namespace="gotunnel.published")


class WaitingUsers(Mapping):
    """
    The users waiting for a data channel, by C{conn_id}.  Each is recorded
    once, with its mapping (C{user.tunnel}); the mapping's users are kept in
    the order they came, so that a data channel that names none (a Go
    client's) takes the one that waited longest without a search.
    """

    def __init__(self) -> None:
        self._byId: dict[str, PublicUser] = {}
        self._byTunnel: dict[PublishedMapping, dict[str, PublicUser]] = {}

    def __getitem__(self, conn_id: str) -> PublicUser:
        return self._byId[conn_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._byId)

    def __len__(self) -> int:
        return len(self._byId)

    def add(self, user: PublicUser) -> None:
        """C{user}, with its C{conn_id} and C{tunnel} set, now waits."""
        self._byId[user.conn_id] = user
        self._byTunnel.setdefault(user.tunnel, {})[user.conn_id] = user

    def remove(self, user: PublicUser) -> bool:
        """C{user} no longer waits; whether it did."""
        if self._byId.get(user.conn_id) is not user:
            return False
        del self._byId[user.conn_id]
        mine = self._byTunnel[user.tunnel]
        del mine[user.conn_id]
        if not mine:
            del self._byTunnel[user.tunnel]
        return True

    def of(self, tunnel: PublishedMapping) -> Mapping[str, PublicUser]:
        """The users waiting on C{tunnel}, oldest first (read only)."""
        return self._byTunnel.get(tunnel, {})

    def oldestOf(self, tunnel: PublishedMapping) -> Optional[PublicUser]:
        """The user that has waited longest on C{tunnel}, if any."""
        return next(iter(self.of(tunnel).values()), None)


class PublishedPorts:
    """
    The mapping that holds each public port (or virtual host, by its key),
    the group of each port that several clients serve, the socket of each
    public port, the ports held for clients that went away, users connected
    per port and users waiting.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.tunnels: dict[Hashable, PublishedMapping] = {}
        """The holder of each port (L{PublishedMapping.key}): a group's holds its listener."""
        self.groups: dict[int, Group] = {}
        """The group of each public port several clients serve."""
        self.publicPorts: dict[int, PublicPort] = {}
        """The socket of each public TCP port, shared by the tunnels that hold it in turn."""
        self.leases = PortLeases(clock)
        """Ports held for the client that had them (see L{gotunnel.server.leases})."""
        self.waiting = WaitingUsers()
        self._users: Counter[int] = Counter()
        """Users connected, per public port (a mapping registered again keeps its count)."""

    def userArrived(self, remote_port: int) -> None:
        self._users[remote_port] += 1

    def userLeft(self, remote_port: int) -> None:
        countDown(self._users, remote_port)

    def usersOf(self, remote_port: int) -> int:
        """Users connected to C{remote_port} now."""
        return self._users[remote_port]

    def allTunnels(self) -> list[PublishedMapping]:
        """Every registered mapping: the holder of each port, and the other members of groups."""
        tunnels = list(self.tunnels.values())
        for group in self.groups.values():
            tunnels.extend(member for member in group.members.values()
                           if self.tunnels.get(member.remote_port) is not member)
        return tunnels

    def freePorts(self, allowed: tuple[range, ...]) -> Iterator[int]:
        """Ports of C{allowed} neither published nor reserved, from a random one on."""
        total = sum(len(ports) for ports in allowed)
        start = secrets.randbelow(total)
        for i in range(total):
            index = (start + i) % total
            for ports in allowed:
                if index < len(ports):
                    port = ports[index]
                    break
                index -= len(ports)
            if port not in self.tunnels and self.leases.get(port) is None:
                yield port

    def takeLease(self, name: str, remote_port: int, limit: int,
                  protocol: Optional[str] = None) -> None:
        """
        End the lease on C{remote_port} (of C{protocol}: None for TCP) if
        C{name} holds it: C{name} is back.  Also ends C{name}'s oldest
        leases on other ports past the C{limit} of mappings it may hold at
        once, so that leases stay within it.

        @raise RegistrationRefused: another name holds the lease.
        """
        leased = protocol or "tcp"
        lease = self.leases.get(remote_port, leased)
        if lease is not None and lease.name != name:
            raise RegistrationRefused(
                f"remote port {remote_port} is reserved for the client that had it, "
                f"for {self.leases.remaining(lease):.0f} s more")
        held = sum(1 for tunnel in self.tunnels.values() if tunnel.name == name
                   and (tunnel.remote_port, tunnel.protocol) != (remote_port, protocol))
        others = [other for other in self.leases.heldBy(name) if other is not lease]
        for other in others[:max(held + len(others) + 1 - limit, 0)]:
            self.leases.end(other.remote_port, other.protocol)
            log.info("lease of public port {remote_port} for {name} ended: {name} "
                     "registered another port", remote_port=other.remote_port,
                     name=printable(name))
        if lease is not None:
            self.leases.end(remote_port, leased)
            log.info("client {name} is back: public port {remote_port} is its again",
                     name=printable(name), remote_port=remote_port)

    def portIdle(self, port: PublicPort) -> None:
        """C{port}'s socket is closed and no tunnel waits for it."""
        if self.publicPorts.get(port.remote_port) is port:
            del self.publicPorts[port.remote_port]

    def forget(self, tunnel: PublishedMapping) -> None:
        """
        C{tunnel} is closed: it no longer holds its port, nor belongs to its
        group; a group that goes on keeps the port open for its next member.
        """
        group = tunnel.group
        if group is not None:
            group.remove(tunnel)
            if group.members:
                self._handOver(tunnel, next(iter(group.members.values())))
                return
            if self.groups.get(tunnel.remote_port) is group:
                del self.groups[tunnel.remote_port]
        if self.tunnels.get(tunnel.key) is tunnel:
            del self.tunnels[tunnel.key]

    def _handOver(self, leaving: PublishedMapping, successor: PublishedMapping) -> None:
        """
        C{leaving} leaves its group: if it held the port's listener, the
        port stays open and C{successor} holds it now.
        """
        log.info("client {name} left group {group} of public port {remote_port}; "
                 "{count} members go on", name=printable(leaving.name),
                 group=printable(leaving.group.name),
                 remote_port=leaving.remote_port, count=len(leaving.group.members))
        if self.tunnels.get(leaving.remote_port) is not leaving:
            return
        self.tunnels[leaving.remote_port] = successor
        port = self.publicPorts.get(leaving.remote_port)
        factory = port.handOver(leaving, successor) if port is not None else None
        if factory is not None:
            # The same socket, and its factory, serve the successor now.
            factory.tunnel = successor
            successor.online = True

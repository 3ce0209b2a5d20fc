"""
Port leases: a public port whose client's control channel went (killed,
cut off, silent past the heartbeat timeout; or stopped, for the protocol
has no goodbye) stays reserved for that client for a while, so that no
other client takes it before it comes back.

The listener itself is closed while the lease runs: users are refused by
the kernel at once, as when no client is there, and a lease holds no
descriptor.
"""

from __future__ import annotations

from typing import Iterator, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from gotunnel.wire.printable import printable

log = Logger(namespace="gotunnel.leases")


class PortLease:
    """One public port held for the client name that had it, until C{expiry}."""

    def __init__(self, name: str, remote_port: int, expiry: IDelayedCall,
                 protocol: str = "tcp") -> None:
        self.name = name
        self.remote_port = remote_port
        self.expiry = expiry
        self.protocol = protocol
        """"tcp", or "udp": a port number's UDP port is leased apart from its TCP port."""

    @property
    def statsPort(self) -> object:
        """What the port's totals are kept under (see L{gotunnel.server.accounting.ServerStats})."""
        return self.remote_port if self.protocol == "tcp" else f"{self.protocol}:{self.remote_port}"


class PortLeases:
    """
    The leases of one server, at most one per port and protocol, ending on
    C{clock}.
    A lease is for a name: the same name can only be registered with the
    same token (or certificate) as before, see L{TunnelRegistry.authenticate}.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._leases: dict[tuple[str, int], PortLease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def __iter__(self) -> Iterator[PortLease]:
        return iter(list(self._leases.values()))

    def get(self, remote_port: int, protocol: str = "tcp") -> Optional[PortLease]:
        return self._leases.get((protocol, remote_port))

    def remaining(self, lease: PortLease) -> float:
        """Seconds until C{lease} ends."""
        return max(lease.expiry.getTime() - self.clock.seconds(), 0.0)

    def start(self, name: str, remote_port: int, duration: float,
              protocol: str = "tcp") -> None:
        """
        Hold C{remote_port} for C{name} for C{duration} seconds; nothing if
        that is 0.  The port's own L{gotunnel.server.publicport.PublicPort} orders the closing of the
        dropped client's listener before any new one.
        """
        if duration <= 0:
            return
        self.end(remote_port, protocol)
        key = (protocol, remote_port)
        expiry = self.clock.callLater(duration, self._expired, key)
        self._leases[key] = PortLease(name, remote_port, expiry, protocol)
        log.info("public port {remote_port} reserved for {name} for {seconds:g} s",
                 remote_port=remote_port, name=printable(name), seconds=duration,
                 protocol=protocol)

    def _expired(self, key: tuple[str, int]) -> None:
        lease = self._leases.pop(key)
        log.info("lease of public port {remote_port} for {name} expired; the port is free",
                 remote_port=lease.remote_port, name=printable(lease.name),
                 protocol=lease.protocol)

    def end(self, remote_port: int, protocol: str = "tcp") -> None:
        """End the lease of C{remote_port} (of C{protocol}), if any."""
        lease = self._leases.pop((protocol, remote_port), None)
        if lease is not None and lease.expiry.active():
            lease.expiry.cancel()

    def heldBy(self, name: str) -> list[PortLease]:
        """The leases of C{name}, oldest first."""
        return [lease for lease in self._leases.values() if lease.name == name]

    def clear(self) -> None:
        """End every lease (the server is stopping)."""
        for protocol, remote_port in list(self._leases):
            self.end(remote_port, protocol)

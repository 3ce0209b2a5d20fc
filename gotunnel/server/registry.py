"""
The server's state put to work: L{TunnelRegistry} is what the channels talk
to.  It composes admission to the control port (L{gotunnel.server.admission}),
the access rules (L{gotunnel.server.access}) and the tables of published
ports and waiting users (L{gotunnel.server.published}), registers mappings
(L{gotunnel.server.registration}), matches data channels to users, drops
silent clients and closes everything on shutdown.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Callable, Optional

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gotunnel.server import access
from gotunnel.server import channelstates
from gotunnel.wire import messages
from gotunnel.server.access import RegistrationRefused
from gotunnel.server.accounting import ServerStats
from gotunnel.server.admission import Admission
from gotunnel.config.settings import ServerSettings
from gotunnel.server.groups import Group
from gotunnel.server.leases import PortLeases
from gotunnel.server.mapping import _whenFired
from gotunnel.mux.session import MuxSession
from gotunnel.server.portpolicy import SourcePolicy
from gotunnel.wire.printable import printable
from gotunnel.server.publicport import PublicPort
from gotunnel.server.published import PublishedPorts, WaitingUsers
from gotunnel.server.registration import MappingRegistration
from gotunnel.relay.splice import ConnectionSet
from gotunnel.relay.splicer import Splicer

if TYPE_CHECKING:
    from gotunnel.server.channel import ServerChannel
    from gotunnel.server.mapping import PublishedMapping
    from gotunnel.server.publicusers import PublicUser

log = Logger(namespace="gotunnel.server")


def _idle(channel: "ServerChannel") -> bool:
    """Whether C{channel} may be evicted: it has not registered, or was refused."""
    return isinstance(channel.state, (channelstates.Handshake, channelstates.Refused))


class TunnelRegistry(MappingRegistration):
    """
    Registering mappings (L{MappingRegistration}), matching data channels
    to users, and dropping silent clients: the server's state
    (L{admission}, L{published}) and rules (L{gotunnel.server.access}) put
    to work.
    """

    def __init__(self, settings: ServerSettings, reactor) -> None:
        self.settings = settings
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.published = PublishedPorts(self.clock)
        self.connections = ConnectionSet()
        # Per source address (see gotunnel.server.channel.addressGroup).
        self.admission = Admission(settings, self.clock, self.owedTo, _idle)
        self.stats = ServerStats(reactor, settings.connection_log)
        self.splicer = Splicer()
        """Set by L{TunnelServerService} to its own, as the settings ask."""
        self._stoppingListeners: set[defer.Deferred] = set()
        self.refusedUsers = 0
        """Users public ports refused (source policy, limits), since the start."""
        self._sourcePolicies: dict[Optional[str], tuple[SourcePolicy, ...]] = {}
        self.virtualHosts = None
        """The L{gotunnel.server.vhostroutes.VirtualHosts}, on a server with virtual-host ports."""
        self.udpPorts: dict[int, PublicPort] = {}
        """The public UDP ports of UDP mappings (L{gotunnel.udp.tunnels}), apart: a
        port number's UDP socket is not its TCP socket."""

    @property
    def tunnels(self) -> dict:
        """The mapping that holds each port, by L{PublishedMapping.key} (see L{PublishedPorts})."""
        return self.published.tunnels

    @property
    def groups(self) -> dict[int, Group]:
        return self.published.groups

    @property
    def publicPorts(self) -> dict[int, PublicPort]:
        return self.published.publicPorts

    @property
    def waitingUsers(self) -> WaitingUsers:
        return self.published.waiting

    @property
    def leases(self) -> PortLeases:
        return self.published.leases

    def userArrived(self, remote_port: int) -> None:
        self.published.userArrived(remote_port)

    def userLeft(self, remote_port: int) -> None:
        self.published.userLeft(remote_port)

    def usersOf(self, remote_port: int) -> int:
        """Users connected to C{remote_port} now."""
        return self.published.usersOf(remote_port)

    def trackStopping(self, stopping: defer.Deferred) -> defer.Deferred:
        """
        Remember a public listener that is closing, so that shutdown waits
        for it; returns C{stopping}.
        """
        self._stoppingListeners.add(stopping)

        def done(result):
            self._stoppingListeners.discard(stopping)
            return result

        return stopping.addBoth(done)

    @property
    def pending(self) -> dict[str, int]:
        """How many connections wait for their first frame, per source address."""
        return self.admission.pending

    def admit(self, channel: "ServerChannel") -> Optional[str]:
        """A new connection that has yet to say what it is: L{Admission.admit}."""
        return self.admission.admit(channel)

    def owedTo(self, source: str) -> int:
        """
        How many connections the clients registered from C{source} may have
        on the way at once: a data channel for each user waiting on their
        ports, and the room left in their pools.
        """
        room = self.settings.max_pool_count
        return sum(len(tunnel.waiting) + max(room - len(tunnel.pool), 0)
                   for tunnel in self.allTunnels()
                   if getattr(tunnel.channel, "source", None) == source)

    def release(self, channel: "ServerChannel") -> None:
        """A connection counted by L{admit} has sent its first frame, or gone."""
        self.admission.release(channel)

    def clientArrived(self, host: str) -> None:
        self.admission.clientArrived(host)

    def clientLeft(self, host: str) -> None:
        self.admission.clientLeft(host)

    def authenticationFailed(self, host: str) -> float:
        """A wrong token from C{host}: how long to wait before answering (L{Admission})."""
        self.stats.authFailures["control"] += 1
        return self.admission.authenticationFailed(host)

    def publicPort(self, remote_port: int) -> PublicPort:
        """
        The socket of public port C{remote_port}, shared by every tunnel
        that holds the port in turn, so that they open and close it one at
        a time.
        """
        port = self.publicPorts.get(remote_port)
        if port is None:
            port = self.publicPorts[remote_port] = PublicPort(
                self.publicEndpoint(remote_port), remote_port, self.trackStopping,
                self.published.portIdle)
        return port

    def publicEndpoint(self, port: int):
        interface = self.settings.public_interface
        endpointType = TCP6ServerEndpoint if ":" in interface else TCP4ServerEndpoint
        return endpointType(self.reactor, port, backlog=self.settings.public_backlog,
                            interface=interface)

    def clientDropped(self, tunnel: PublishedMapping) -> None:
        """
        C{tunnel}'s control channel went away without its mapping being
        replaced or the server stopping: close it, and hold its port for
        the same client for C{settings.port_lease} seconds.
        """
        if tunnel.closed:
            return
        if tunnel.group is not None and len(tunnel.group.members) > 1:
            # The port stays open for the rest of the group: no lease.
            tunnel.close()
            return
        tunnel.dropped()

    def newConnectionId(self) -> str:
        """
        A conn_id for a user: unguessable, so that only the client asked
        can name it in its data channel.
        """
        return secrets.token_hex(8)

    def forget(self, tunnel: PublishedMapping) -> None:
        """C{tunnel} is closed: L{PublishedPorts.forget}."""
        self.published.forget(tunnel)

    def allTunnels(self) -> list[PublishedMapping]:
        """Every registered mapping: the holder of each port, and the other members of groups."""
        return self.published.allTunnels()

    def _dataChannelOwner(self, msg: messages.DataChannel,
                          certificateName: Optional[str]) -> Callable[[PublishedMapping], bool]:
        """
        Check a data channel's credentials; return a test of whether a
        tunnel is one this data channel may serve: one registered by the
        same holder (L{access.sameHolder}), on a port that holder may publish.
        """
        name = self.authenticate(msg.name, msg.token, certificateName)

        def mine(tunnel: PublishedMapping) -> bool:
            if not access.sameHolder(self.settings, name, tunnel.name):
                log.warn("a data channel of {name!r} asked for a user of {owner!r}",
                         name=name, owner=tunnel.name)
                return False
            try:
                tunnel.checkAllowed(name)
            except RegistrationRefused as e:
                log.warn("a data channel of {name!r}: {reason}", name=name, reason=str(e))
                return False
            return True

        return mine

    def attachDataChannel(self, msg: messages.DataChannel,
                          certificateName: Optional[str] = None) -> PublicUser:
        """
        The waiting user a data channel belongs to.  C{certificateName}: the
        common name of the client certificate the data channel came with.

        @raise RegistrationRefused: bad token, a mapping of another client,
            or nobody is waiting for it.
        """
        mine = self._dataChannelOwner(msg, certificateName)
        if msg.conn_id is not None:
            user = self.waitingUsers.get(msg.conn_id)
            if user is not None and mine(user.tunnel):
                return user.tunnel.takeUser(msg.conn_id)
            raise RegistrationRefused("no user is waiting for this data channel")
        tunnel = self.tunnels.get(msg.remote_port)
        if tunnel is not None and not mine(tunnel):
            tunnel = None
        user = tunnel.takeUser(None) if tunnel is not None else None
        if user is None:
            raise RegistrationRefused("no user is waiting for this data channel")
        return user

    def poolDataChannel(self, channel: "ServerChannel", msg: messages.DataChannel,
                        certificateName: Optional[str] = None) -> PublishedMapping:
        """
        Keep C{channel}, a data channel opened ahead of any user, in the
        pool of the mapping it names.

        @raise RegistrationRefused: bad token, no such mapping (or one of
            another client), or its pool is full.
        """
        mine = self._dataChannelOwner(msg, certificateName)
        if msg.vhost is not None and self.virtualHosts is not None:
            tunnel = self.virtualHosts.mappingOf(msg)
        else:
            tunnel = self.tunnels.get(msg.remote_port)
            group = self.groups.get(msg.remote_port)
            if group is not None:
                # Each member pools for itself: its own local service answers.
                tunnel = group.members.get(msg.name or certificateName or "")
        if tunnel is None or not mine(tunnel):
            raise RegistrationRefused(f"no mapping of port {msg.remote_port} to pool for")
        tunnel.addPooled(channel)
        return tunnel

    def muxDataChannel(self, session: MuxSession, msg: messages.DataChannel,
                       certificateName: Optional[str] = None) -> PublishedMapping:
        """
        Make C{session} the multiplexed connection of the mapping C{msg} names.

        @raise RegistrationRefused: bad token, no such mapping (or one of
            another client), it did not agree to multiplexing, or has its
            connection already.
        """
        mine = self._dataChannelOwner(msg, certificateName)
        tunnel = self.tunnels.get(msg.remote_port)
        if tunnel is None or not mine(tunnel):
            raise RegistrationRefused(
                f"no mapping of port {msg.remote_port} agreed to multiplexing")
        tunnel.addMuxSession(session)
        return tunnel

    def checkHeartbeats(self) -> None:
        """Drop control channels that have been silent too long."""
        deadline = self.clock.seconds() - self.settings.heartbeat_timeout
        for tunnel in self.allTunnels():
            if tunnel.lastSeen < deadline:
                log.warn("heartbeat timeout: client {name} (port {remote_port}) sent nothing "
                         "for {timeout} s; dropping it",
                         name=printable(tunnel.name), remote_port=tunnel.remote_port,
                         timeout=self.settings.heartbeat_timeout)
                self.clientDropped(tunnel)
                tunnel.channel.transport.abortConnection()

    def closeAll(self) -> defer.Deferred:
        """
        Stop every public listener, then close every connection once its
        buffered bytes are written.
        """
        self.leases.clear()
        if self.virtualHosts is not None:
            self.virtualHosts.clear()
        for tunnel in self.allTunnels():
            tunnel.close()
        stopping = defer.DeferredList([_whenFired(d) for d in list(self._stoppingListeners)])
        return stopping.addCallback(lambda _: self.connections.closeAll(
            self.clock, self.settings.shutdown_timeout))

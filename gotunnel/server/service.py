"""
The tunnel server: one port where clients open control channels and data
channels, and a public listener for every registered mapping.

L{TunnelRegistry} is what the channels talk to: it composes admission to
the control port (L{gotunnel.server.admission}), the access rules
(L{gotunnel.server.access}) and the tables of published ports and waiting users
(L{gotunnel.server.published}), and acts on them.  L{ServerChannel} only turns
frames into calls on it.  L{TunnelServerService} owns the lifetime.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from typing import Callable, Optional

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from gotunnel.server import access
from gotunnel.server import channelstates
from gotunnel.wire import messages
# RegistrationRefused is imported from here by gotunnel.udp.tunnels and gotunnel.server.vhostroutes.
from gotunnel.server.access import RegistrationRefused
from gotunnel.server.accounting import (
    REFUSED_CLIENT_GONE, REFUSED_CONNECTION_RATE, REFUSED_MAX_USERS, REFUSED_NO_MEMBER,
    REFUSED_SOURCE, REFUSED_TIMEOUT, REFUSED_WAITING_USERS, USER_CLOSED,
    ServerStats, noteEnding,
)
from gotunnel.server.admission import Admission
from gotunnel.config.settings import ServerSettings
from gotunnel.wire.framing import MessageReceiver, describePeer
from gotunnel.server.groups import Group
from gotunnel.server.leases import PortLeases
from gotunnel.mux.session import MuxSession
from gotunnel.mux.stream import StreamEnd
from gotunnel.server.portpolicy import (
    RefusalLog, SourcePolicy, SourceRate, permitted,
)
from gotunnel.wire.printable import printable
from gotunnel.server.publicport import PublicPort
from gotunnel.server.published import PublishedPorts, WaitingUsers
from gotunnel.relay.ratelimit import Throttle
from gotunnel.relay.splice import ConnectionSet, RelayEnd, setNoDelay, splice
from gotunnel.relay.eagerio import readWaiting
from gotunnel.relay.splicer import Splicer

log = Logger(namespace="gotunnel.server")


BACKLOG_ENDPOINTS = ("tcp", "tcp6", "ssl", "unix")
"""The kinds of server endpoint string that take C{backlog=}."""


def withBacklog(description: str, backlog: int) -> str:
    """
    The server endpoint string C{description} with C{backlog=} added, if it
    is of a kind that takes one and does not set its own: Twisted's default
    of 50 overflows when many users arrive at once, each bringing a data
    channel to the control port.
    """
    kind, _, arguments = description.partition(":")
    if kind not in BACKLOG_ENDPOINTS:
        return description
    if any(argument.startswith("backlog=") for argument in re.split(r"(?<!\\):", arguments)):
        return description
    return f"{description}:backlog={backlog}"


ANY_PORT_ATTEMPTS = 16
"""Ports tried for a C{register} of remote port 0 before it is refused."""

ONLINE_RETRY_DELAYS = (1, 2, 4, 8, 16, 30, 30, 30)
"""
Seconds to wait before each new try to listen on a public port that the
client asked back online but that could not be bound; about two minutes in
all, then the port stays offline until the client asks again.
"""


def addressGroup(host: str, ipv6Prefix: int) -> str:
    """
    What C{host} counts as in the caps on pending connections: an IPv6
    address its network of C{ipv6Prefix} bits (one host usually holds a
    whole /64), an IPv4 address (mapped into IPv6 or not) itself.
    """
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, ipv6Prefix), strict=False))
    return host


def peerCommonName(transport: object) -> Optional[str]:
    """
    L{gotunnel.tls.contexts.peerCommonName}, imported only for a TLS connection: a
    plain server never loads the TLS code.
    """
    if not ISSLTransport.providedBy(transport):
        return None
    from gotunnel.tls import contexts as tls

    return tls.peerCommonName(transport)


def _whenFired(d: defer.Deferred) -> defer.Deferred:
    """
    A new Deferred that fires with None once C{d} has fired, leaving C{d}'s
    own result alone for whoever else waits on it.
    """
    fired: defer.Deferred = defer.Deferred()

    def fire(result):
        fired.callback(None)
        return result

    d.addBoth(fire)
    return fired


MAX_EARLY_BYTES = 4 * 1024
"""
About what a user may send before its data channel comes and have us hold
it (the rest waits in the kernel): thousands of users may wait at once.
"""


class PublicUser(Protocol, RelayEnd):
    """
    A user's connection to a public port.  While it waits for its data
    channel it is read on, so that a user who gives up is let go at once,
    but in reads of L{MAX_EARLY_BYTES}, and only until it has sent that
    many: after that what it sends waits in the kernel.
    """

    conn_id: Optional[str] = None
    connectedAt: float = 0.0
    timeoutCall = None
    userId: Optional[str] = None
    """The admin API's name for this connection ("u17")."""
    peerAddress = "?"
    dataChannel: Optional["ServerChannel"] = None
    endedBy: Optional[str] = None
    """How the connection ended (L{gotunnel.server.accounting.ENDINGS}), once it has."""
    _heldBytes = 0
    _readSize: Optional[int] = None
    earlyBytes = 0
    """What it sent before its data channel's answer, sent with that answer."""

    def __init__(self, tunnel: "Tunnel") -> None:
        self.tunnel = tunnel
        self.remote_port = tunnel.remote_port

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        self.peerAddress = describePeer(self.transport)
        self.tunnel.registry.connections.add(self)
        self.tunnel.registry.userArrived(self.remote_port)
        self.tunnel.registry.stats.userOpened(self)
        self.tunnel.userConnected(self)

    def dataReceived(self, data: bytes) -> None:
        self.relayReceived(data)
        if self.peer is None:
            self._heldBytes += len(data)
            if self._heldBytes >= MAX_EARLY_BYTES:
                self.transport.pauseProducing()

    def waitForDataChannel(self) -> None:
        """Read in small pieces until L{doneWaiting}."""
        # FileDescriptor.bufferSize is the most one read takes (64 KiB).
        self._readSize = getattr(self.transport, "bufferSize", None)
        if self._readSize is not None:
            self.transport.bufferSize = MAX_EARLY_BYTES

    def doneWaiting(self) -> None:
        """Read as much at a time as any connection again (it is also the write buffer's size)."""
        if self._readSize is not None:
            self.transport.bufferSize, self._readSize = self._readSize, None

    def takeHeld(self) -> bytes:
        """What this user sent before its splice, taken from it to send now."""
        held, self._held = self._held, None
        self._heldBytes = 0
        return b"".join(held or ())

    def readConnectionLost(self) -> None:
        if self._readClosed:
            # Read while it waited, and read again once the splice resumed
            # the transport: the end was passed on the first time.
            return
        noteEnding(self, USER_CLOSED)
        if self.peer is None and not self._held and self.tunnel.userGaveUp(self):
            # It closed while it waited and sent nothing: there is nothing
            # to pass on, and a descriptor to give back now rather than at
            # the data channel timeout.
            self.transport.loseConnection()
            return
        RelayEnd.readConnectionLost(self)

    def connectionLost(self, reason=None) -> None:
        self.tunnel.registry.stats.userClosed(self, reason)
        self.tunnel.userLost(self)
        self.tunnel.registry.userLeft(self.remote_port)
        self.tunnel.registry.connections.discard(self)
        self.relayConnectionLost(reason)


class PublicUserFactory(Factory):
    noisy = False

    def __init__(self, tunnel: "Tunnel") -> None:
        self.tunnel = tunnel

    def buildProtocol(self, addr) -> Optional[PublicUser]:
        # Refused here, before a byte is read or the client hears of it:
        # Twisted closes the socket of a connection given no protocol.
        if not self.tunnel.admitUser(addr):
            return None
        tunnel = self.tunnel
        if tunnel.group is not None:
            # The port's listener serves its whole group: the next member up.
            tunnel = tunnel.group.pick()
            if tunnel is None:
                self.tunnel.refused(getattr(addr, "host", "?"), "no member of the group is up",
                                    REFUSED_NO_MEMBER)
                return None
        return PublicUser(tunnel)


class Tunnel:
    """
    One registered mapping: its control channel, its public listener, the
    users waiting for a data channel, and the data channels waiting for a
    user (the client's pool, see L{messages.DataChannel.pooled}).
    """

    protocol: Optional[str] = None
    """What register_resp confirms: None for TCP, "udp" for L{gotunnel.udp.tunnels.UdpTunnel}."""

    def __init__(self, registry: "TunnelRegistry", channel: "ServerChannel",
                 register: messages.Register) -> None:
        self.registry = registry
        self.channel = channel
        self.name = register.name
        self.local_port = register.local_port
        self.remote_port = register.remote_port
        self.pool: OrderedDict[ServerChannel, None] = OrderedDict()
        self.lastSeen = registry.clock.seconds()
        self.closed = False
        # True from listen() until stopListening(): what the client last
        # asked for, even while the listener is still starting or stopping,
        # or waiting to try a busy port again.
        self.online = False
        self._stopping: defer.Deferred = defer.succeed(None)
        self.sources: tuple[SourcePolicy, ...] = ()
        """Who may connect: every one of these must let a user in."""
        self.maxUsers = 0
        """Users connected to this port at once (0: no limit)."""
        self.sourceRate: Optional[SourceRate] = None
        """New connections a second per source address, if limited."""
        self.throttles: Optional[tuple[Throttle, Throttle]] = None
        """The bandwidth cap, if any: of what users send, and of what they get."""
        self.group: Optional[Group] = None
        """The group this mapping serves its port with, if any (see gotunnel.server.groups)."""
        self.serviceUp = True
        """The client's local service answers (offline_port / online_port)."""
        self.refusals = RefusalLog(registry.clock, self.remote_port)
        # What the admin API and the metrics say of this mapping.
        self.clientId = registry.stats.newClientId()
        self.connectedSince = registry.clock.seconds()
        self.stats = registry.stats.portStats(self.statsPort, self.name)
        self._retryCall = None
        # Virtual hosts are matched by name in the user's first bytes, before
        # a stream is opened: they keep data channels; UDP has its own channel.
        self.muxAgreed = bool(register.mux == 1 and registry.settings.mux
                              and register.vhost is None and register.protocol == "tcp")
        self.muxSession: Optional[MuxSession] = None

    def __repr__(self) -> str:
        return f"<Tunnel {self.name!r} :{self.remote_port}>"

    @property
    def waiting(self) -> Mapping[str, PublicUser]:
        """The users waiting for a data channel of this mapping, oldest first."""
        return self.registry.waitingUsers.of(self)

    @property
    def listener(self) -> Optional[IListeningPort]:
        """The public port's listener, while it serves this tunnel."""
        port = self.registry.publicPorts.get(self.remote_port)
        if port is not None and port.owner is self:
            return port.listener
        return None

    @property
    def key(self) -> object:
        """What the registry knows this mapping by: its port (see L{gotunnel.server.vhost})."""
        return self.portKey(self.remote_port)

    @staticmethod
    def portKey(remote_port: int) -> object:
        """
        What the registry knows a mapping of this kind on C{remote_port} by:
        the number for TCP (see L{gotunnel.udp.tunnels.UdpTunnel.portKey}).
        """
        return remote_port

    @property
    def mappingName(self) -> str:
        """What users reach this mapping by, for a log line: C{public port 10022}."""
        return f"public port {self.remote_port}"

    @property
    def statsPort(self) -> object:
        """The port its totals and metrics are labelled with (see L{gotunnel.server.vhost})."""
        return self.remote_port

    def checkAllowed(self, name: str) -> None:
        """
        Refuse, as L{RegistrationRefused}, a data channel of C{name} for this
        mapping if C{name} may not publish it.
        """
        self.registry.checkPort(name, self.remote_port)

    def dropped(self) -> None:
        """
        The control channel went away: close, and hold the port for the same
        client for C{settings.port_lease} seconds.
        """
        self.close()
        self.registry.leases.start(self.name, self.remote_port, self.registry.settings.port_lease,
                                   self.protocol or "tcp")

    def registerResp(self) -> messages.RegisterResp:
        """The answer to the C{register} that made this mapping."""
        return messages.RegisterResp(status="ok",
                                     pool=self.registry.settings.max_pool_count or None,
                                     mux=1 if self.muxAgreed else None)

    def listen(self) -> defer.Deferred:
        """
        Publish this tunnel's port, once whatever held it before is closed.

        @return: a Deferred that fires with True once the port listens for
            this tunnel, with False if a later request (the client's, or a
            registration that replaced this tunnel) came first, or fails
            with L{error.CannotListenError}.
        """
        self.online = True
        return self.registry.publicPort(self.remote_port).listen(self, PublicUserFactory(self))

    def stopListening(self) -> defer.Deferred:
        """
        Stop publishing; the Deferred fires once the port is closed.
        """
        self.online = False
        if self._retryCall is not None:
            self._retryCall.cancel()
            self._retryCall = None
        self._stopping = self.registry.publicPort(self.remote_port).stop(self)
        return _whenFired(self._stopping)

    def goOnline(self, attempt: int = 0) -> None:
        """
        Publish again, as the client asked with online_port.  A port that
        cannot be bound (another program took it meanwhile) is tried again
        after each of L{ONLINE_RETRY_DELAYS}, then left offline until the
        client asks again.
        """
        self._retryCall = None

        def failed(failure) -> None:
            failure.trap(error.CannotListenError)
            if self.closed or not self.online:
                return
            reason = failure.value.socketError
            if attempt >= len(ONLINE_RETRY_DELAYS):
                self.online = False
                log.error("cannot listen on public port {remote_port} again: {reason}; gave up "
                          "after {attempts} attempts, until client {name} sends online_port "
                          "again", remote_port=self.remote_port, reason=reason,
                          attempts=attempt + 1, name=printable(self.name))
                return
            delay = ONLINE_RETRY_DELAYS[attempt]
            log.warn("cannot listen on public port {remote_port} again: {reason}; "
                     "trying again in {delay} s", remote_port=self.remote_port,
                     reason=reason, delay=delay)
            self._retryCall = self.registry.clock.callLater(delay, self.goOnline, attempt + 1)

        self.listen().addErrback(failed)

    def heartbeat(self) -> None:
        self.lastSeen = self.registry.clock.seconds()

    def admitUser(self, addr: object) -> bool:
        """
        Whether a user connecting from C{addr} may use this port; a refusal
        is counted (here and in the port's accounting) and logged (at most
        a line per interval).
        """
        host = getattr(addr, "host", "?")
        if not permitted(self.sources, host):
            self.refused(host, "source address not allowed", REFUSED_SOURCE)
            return False
        if self.maxUsers and self.registry.usersOf(self.remote_port) >= self.maxUsers:
            self.refused(host, f"{self.maxUsers} users already connected", REFUSED_MAX_USERS)
            return False
        if self.sourceRate is not None and not self.sourceRate.admit(host):
            self.refused(host, f"more than {self.sourceRate.rate:g} new connections a second "
                               "from one address", REFUSED_CONNECTION_RATE)
            return False
        return True

    def refused(self, host: str, reason: str, why: str) -> None:
        """A user from C{host} refused at accept for C{reason} (C{why}: accounting's name)."""
        self.refusals.refused(host, reason)
        self.registry.refusedUsers += 1
        self.registry.stats.portRefused(self.stats, why)

    def portChosen(self, remote_port: int) -> None:
        """The system chose C{remote_port} for this mapping, registered for port 0."""
        self.remote_port = self.refusals.remote_port = remote_port
        self.registry.stats.release(self.stats)
        self.stats = self.registry.stats.portStats(remote_port, self.name)

    def userConnected(self, user: PublicUser) -> None:
        clock = self.registry.clock
        user.connectedAt = clock.seconds()
        if self.muxSession is not None and self._openStreamFor(user):
            return
        while self.pool:
            channel, _ = self.pool.popitem(last=False)
            if channel.attachUser(user):
                return
        limit = self.registry.settings.max_waiting_users
        if len(self.waiting) >= limit:
            log.warn("{limit} users already wait for a data channel on port {remote_port}; "
                     "closing a new one", limit=limit, remote_port=self.remote_port)
            self.registry.stats.userRefused(user, REFUSED_WAITING_USERS)
            user.transport.loseConnection()
            return
        user.conn_id = self.registry.newConnectionId()
        user.waitForDataChannel()
        user.timeoutCall = clock.callLater(
            self.registry.settings.data_channel_timeout, self._userTimedOut, user)
        self.registry.waitingUsers.add(user)
        self.channel.sendMessage(messages.OpenDataChannel(
            local_port=self.local_port, conn_id=user.conn_id))

    def _openStreamFor(self, user: PublicUser) -> bool:
        """Splice C{user} to a new stream of the multiplexed connection, if it takes one."""
        stream = self.muxSession.openStream()
        if stream is None:
            return False
        end = StreamEnd(stream)
        # The admin API and the connection log count the service's bytes here.
        user.dataChannel = end
        # Not through the splicer: a stream's bytes are framed in Python, no zero copy.
        splice(user, end)
        self.registry.stats.dataChannelReady(user, self.registry.clock.seconds() - user.connectedAt)
        return True

    def addMuxSession(self, session: MuxSession) -> None:
        """
        Carry users over C{session} from now on.

        @raise RegistrationRefused: the client did not offer multiplexing, or
            this mapping already has its multiplexed connection.
        """
        if not self.muxAgreed:
            raise RegistrationRefused(
                f"no mapping of port {self.remote_port} agreed to multiplexing")
        if self.muxSession is not None:
            raise RegistrationRefused(
                f"mapping {self.remote_port} already has its multiplexed connection")
        self.muxSession = session

    def muxSessionLost(self, session: MuxSession) -> None:
        if self.muxSession is session:
            self.muxSession = None

    def _forget(self, user: PublicUser) -> None:
        user.doneWaiting()
        self.registry.waitingUsers.remove(user)
        if user.timeoutCall is not None and user.timeoutCall.active():
            user.timeoutCall.cancel()
        user.timeoutCall = None

    def userLost(self, user: PublicUser) -> None:
        self._forget(user)

    def userGaveUp(self, user: PublicUser) -> bool:
        """
        A waiting user ended its side of the connection: it no longer waits
        (True), or it was not waiting (False).
        """
        if self.waiting.get(user.conn_id) is not user:
            return False
        self._forget(user)
        return True

    def _userTimedOut(self, user: PublicUser) -> None:
        user.timeoutCall = None
        log.warn("no data channel for a user of port {remote_port} within {timeout} s; "
                 "closing the user's connection",
                 remote_port=self.remote_port, timeout=self.registry.settings.data_channel_timeout)
        self.registry.stats.userRefused(user, REFUSED_TIMEOUT)
        self._forget(user)
        user.transport.loseConnection()

    def takeUser(self, conn_id: Optional[str]) -> Optional[PublicUser]:
        """
        The user a data channel is for: the one named by C{conn_id}, or, for
        a peer that sends none, the one that has waited longest.
        """
        if conn_id is None:
            user = self.registry.waitingUsers.oldestOf(self)
        else:
            user = self.waiting.get(conn_id)
        if user is not None:
            self._forget(user)
        return user

    def addPooled(self, channel: "ServerChannel") -> None:
        """
        Keep a data channel for the next user.

        @raise RegistrationRefused: the pool is full, or this server keeps none.
        """
        limit = self.registry.settings.max_pool_count
        if not limit:
            raise RegistrationRefused("this server keeps no pooled data channels")
        if len(self.pool) >= limit:
            raise RegistrationRefused(
                f"the pool of port {self.remote_port} already holds {limit} data channels")
        self.pool[channel] = None

    def pooledLost(self, channel: "ServerChannel") -> None:
        self.pool.pop(channel, None)

    def close(self) -> defer.Deferred:
        """
        Stop publishing and close the users still waiting and the pooled
        data channels; connections already spliced go on until either end
        closes them.
        """
        if self.closed:
            return _whenFired(self._stopping)
        self.closed = True
        self.registry.forget(self)
        self.registry.stats.release(self.stats)
        for user in list(self.waiting.values()):
            self._forget(user)
            self.registry.stats.userRefused(user, REFUSED_CLIENT_GONE)
            user.transport.loseConnection()
        pool, self.pool = self.pool, OrderedDict()
        for channel in pool:
            channel.transport.loseConnection()
        session, self.muxSession = self.muxSession, None
        if session is not None:
            # Its streams are users already spliced: they go on, and the
            # connection closes when the last one ends.
            session.goAway()
        self.refusals.stop()
        if self.listener is None and self.group is not None:
            # A group member whose port's listener went on with the group.
            return _whenFired(self._stopping)
        return self.stopListening()


def _idle(channel: "ServerChannel") -> bool:
    """Whether C{channel} may be evicted: it has not registered, or was refused."""
    return isinstance(channel.state, (channelstates.Handshake, channelstates.Refused))


class TunnelRegistry:
    """
    Registering mappings, matching data channels to users, and dropping
    silent clients: the server's state (L{admission}, L{published}) and
    rules (L{gotunnel.server.access}) put to work.
    """

    def __init__(self, settings: ServerSettings, reactor) -> None:
        self.settings = settings
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.published = PublishedPorts(self.clock)
        self.connections = ConnectionSet()
        # Per source address (see addressGroup).
        self.admission = Admission(settings, self.clock, self.owedTo, _idle)
        self.stats = ServerStats(reactor, settings.connection_log)
        self.splicer = Splicer()
        """Set by L{TunnelServerService} to its own, as the settings ask."""
        self._stoppingListeners: set[defer.Deferred] = set()
        self.refusedUsers = 0
        """Users public ports refused (source policy, limits), since the start."""
        self._sourcePolicies: dict[Optional[str], tuple[SourcePolicy, ...]] = {}
        self.virtualHosts = None
        """The L{gotunnel.server.vhost.VirtualHosts}, on a server with virtual-host ports."""
        self.udpPorts: dict[int, PublicPort] = {}
        """The public UDP ports of UDP mappings (L{gotunnel.udp.tunnels}), apart: a
        port number's UDP socket is not its TCP socket."""

    @property
    def tunnels(self) -> dict:
        """The mapping that holds each port, by L{Tunnel.key} (see L{PublishedPorts})."""
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

    def applyLimits(self, tunnel: "Tunnel", msg: messages.Register) -> None:
        """
        C{tunnel}'s limits on users: the stricter of the server's (or a
        listed client's), and what the client asked for.
        """
        limits = access.userLimits(self.settings, msg)
        tunnel.maxUsers = limits.max_users
        rate, bandwidth = limits.connection_rate, limits.bandwidth
        tunnel.sourceRate = SourceRate(self.clock, rate) if rate else None
        tunnel.throttles = (Throttle(self.clock, bandwidth), Throttle(self.clock, bandwidth)) \
            if bandwidth else None

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

    def authenticate(self, name: str, token: str, certificateName: Optional[str]) -> str:
        """L{access.authenticate} under this server's settings."""
        return access.authenticate(self.settings, name, token, certificateName)

    def checkLimits(self, name: str, remote_port: int, protocol: Optional[str] = None) -> None:
        """
        Refuse a port outside what C{name} may publish, or one mapping too
        many for C{name}.  C{protocol}: None for TCP, "udp" (a mapping of
        the same port number and protocol is replaced, not added).
        """
        if remote_port:
            # 0: the server chooses one that name may publish.
            self.checkPort(name, remote_port)
        access.checkMappingCount(self.settings, name, sum(
            1 for tunnel in self.allTunnels() if tunnel.name == name
            and (tunnel.remote_port, tunnel.protocol) != (remote_port, protocol)))

    def mappingLimit(self, name: str) -> int:
        """How many mappings C{name} may hold at once."""
        return access.mappingLimit(self.settings, name)

    def checkPort(self, name: str, remote_port: int) -> None:
        """Refuse a port outside what C{name} may publish."""
        access.checkPort(self.settings, name, remote_port)

    def sourcePolicies(self, name: str, msg: messages.Register) -> tuple[SourcePolicy, ...]:
        """
        The source policies of a mapping C{name} registers: the server's,
        then what the client asks for (see L{access.serverSources}).

        @raise RegistrationRefused: the client's lists are not networks.
        """
        # Built once per listed client, once for all the others: 1,000
        # networks are not parsed again for every register.
        key = name if name in self.settings.clients else None
        policies = self._sourcePolicies.get(key)
        if policies is None:
            policies = self._sourcePolicies[key] = access.serverSources(self.settings, name)
        return policies + access.askedSources(msg)

    def register(self, channel: "ServerChannel", msg: messages.Register) -> defer.Deferred:
        """
        Publish C{msg.remote_port} for C{channel}.

        @return: a Deferred that fires with the L{Tunnel}, or fails with
            L{RegistrationRefused}.
        """
        if msg.vhost is not None:
            if self.virtualHosts is None:
                return defer.fail(RegistrationRefused(
                    "this server has no virtual hosts (--http, --https)"))
            return self.virtualHosts.register(channel, msg)
        try:
            name = self.authenticate(msg.name, msg.token, peerCommonName(channel.transport))
            if name != msg.name:
                msg = dataclasses.replace(msg, name=name)
            tunnelType = Tunnel
            if access.isUdp(self.settings, msg):
                from gotunnel.udp.tunnels import UdpTunnel
                tunnelType = UdpTunnel
            protocol = tunnelType.protocol
            self.checkLimits(msg.name, msg.remote_port, protocol)
            sources = self.sourcePolicies(msg.name, msg)
            if msg.remote_port == 0:
                return self._registerAnyPort(channel, msg, sources)
            self.published.takeLease(msg.name, msg.remote_port, self.mappingLimit(msg.name),
                                     protocol)
        except RegistrationRefused as e:
            return defer.fail(e)
        if tunnelType is Tunnel:
            # Groups are of TCP ports: UDP on the same number is another port.
            try:
                joined = self._joinGroup(channel, msg, sources)
            except RegistrationRefused as e:
                return defer.fail(e)
            if joined is not None:
                return joined
        return self._publish(channel, msg, tunnelType, sources)

    def _publish(self, channel: "ServerChannel", msg: messages.Register, tunnelType: type,
                 sources: tuple[SourcePolicy, ...]) -> defer.Deferred:
        """
        Publish C{msg}'s port, allowed to its client, for a new mapping of
        C{tunnelType}, taking it over from the same client's previous one.
        """
        key = tunnelType.portKey(msg.remote_port)
        previous = self.tunnels.get(key)
        if previous is not None:
            if previous.name != msg.name:
                return defer.fail(RegistrationRefused(
                    f"remote port {msg.remote_port} is already taken by another client"))
            log.info("client {name} registered port {remote_port} again; "
                     "dropping its previous control channel",
                     name=printable(msg.name), remote_port=msg.remote_port)
            previous.close()
            previous.channel.transport.loseConnection()
        tunnel = tunnelType(self, channel, msg)
        tunnel.sources = sources
        self.applyLimits(tunnel, msg)
        if msg.group:
            group = Group(msg.remote_port, msg.group, msg.group_key or "")
            group.add(tunnel)
            self.groups[msg.remote_port] = group
        self.tunnels[key] = tunnel

        def listening(listens: bool) -> Tunnel:
            if not listens:
                tunnel.close()
                raise RegistrationRefused(
                    f"port {msg.remote_port} was registered again or closed before it opened")
            return tunnel

        def refused(failure):
            failure.trap(error.CannotListenError)
            tunnel.close()
            reason = failure.value.socketError
            raise RegistrationRefused(
                f"cannot listen on port {msg.remote_port}: {reason}")

        return tunnel.listen().addCallbacks(listening, refused)

    def _registerAnyPort(self, channel: "ServerChannel", msg: messages.Register,
                         sources: tuple[SourcePolicy, ...]) -> defer.Deferred:
        """
        Publish a port the server chooses for C{msg} (whose C{remote_port}
        is 0): a free one of those C{msg.name} may publish, or, where any is
        allowed, one the OS chooses.  A port free of tunnels and leases that
        the OS will not bind is skipped, up to L{ANY_PORT_ATTEMPTS} times.
        """
        allowed = access.allowedPorts(self.settings, msg.name)
        candidates = self.published.freePorts(allowed) if allowed else None
        attempts = iter(range(ANY_PORT_ATTEMPTS))

        def attempt(_=None):
            if next(attempts, None) is None:
                raise RegistrationRefused(
                    f"no free remote port for {msg.name!r} after {ANY_PORT_ATTEMPTS} tries")
            if candidates is None:
                return self._listenEphemeral(channel, msg, sources).addCallback(
                    lambda tunnel: tunnel if tunnel is not None else attempt())
            port = next(candidates, None)
            if port is None:
                raise RegistrationRefused(f"no free remote port for {msg.name!r}: every port "
                                          "it may publish is taken or reserved")
            d = self.register(channel, dataclasses.replace(msg, remote_port=port))
            return d.addErrback(notBound)

        def notBound(failure):
            failure.trap(RegistrationRefused)
            if not str(failure.value).startswith("cannot listen on port"):
                return failure
            return attempt()

        return defer.maybeDeferred(attempt)

    def _listenEphemeral(self, channel: "ServerChannel", msg: messages.Register,
                         sources: tuple[SourcePolicy, ...]) -> defer.Deferred:
        """
        Publish C{msg} on a port the OS chooses; fires with the L{Tunnel},
        or None if the OS chose a port another client holds or has reserved.
        """
        tunnel = Tunnel(self, channel, msg)
        tunnel.sources = sources
        self.applyLimits(tunnel, msg)

        def listening(port: IListeningPort) -> Optional[Tunnel]:
            number = port.getHost().port
            lease = self.leases.get(number)
            if (number in self.tunnels or number in self.publicPorts
                    or (lease is not None and lease.name != msg.name)):
                self.trackStopping(defer.maybeDeferred(port.stopListening))
                return None
            if lease is not None:
                self.leases.end(number)
            tunnel.portChosen(number)
            self.tunnels[number] = tunnel
            # From now on the port's listener is ordered as any other's.
            self.publicPort(number).adopt(tunnel, factory, port)
            tunnel.online = True
            return tunnel

        def refused(failure):
            failure.trap(error.CannotListenError)
            raise RegistrationRefused(
                f"cannot listen on a port the system chooses: {failure.value.socketError}")

        factory = PublicUserFactory(tunnel)
        endpoint = self.publicEndpoint(0)
        return endpoint.listen(factory).addCallbacks(listening, refused)

    def clientDropped(self, tunnel: Tunnel) -> None:
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

    def forget(self, tunnel: Tunnel) -> None:
        """C{tunnel} is closed: L{PublishedPorts.forget}."""
        self.published.forget(tunnel)

    def allTunnels(self) -> list[Tunnel]:
        """Every registered mapping: the holder of each port, and the other members of groups."""
        return self.published.allTunnels()

    def _joinGroup(self, channel: "ServerChannel", msg: messages.Register,
                   sources: tuple[SourcePolicy, ...]) -> Optional[defer.Deferred]:
        """
        Add C{msg}'s mapping to the group of its port, if the port has one
        that C{msg} names with the right key; None if it is not a join.

        @raise RegistrationRefused: the port's group is another, or the key
            is wrong.
        """
        group = self.groups.get(msg.remote_port)
        if group is None:
            return None
        if not msg.group:
            if list(group.members) == [msg.name]:
                # Its only member, now without a group: it takes the port over.
                return None
            raise RegistrationRefused(
                f"remote port {msg.remote_port} is served by a group of clients")
        if not group.admits(msg.group, msg.group_key or ""):
            raise RegistrationRefused(
                f"remote port {msg.remote_port} is served by another group, or the group key "
                "is wrong")
        previous = group.members.get(msg.name)
        if previous is not None and len(group.members) == 1:
            # Its only member again (a reconnect): as for any mapping.
            return None
        tunnel = Tunnel(self, channel, msg)
        tunnel.sources = sources
        self.applyLimits(tunnel, msg)
        if previous is not None:
            log.info("client {name} registered port {remote_port} again; "
                     "dropping its previous control channel",
                     name=printable(msg.name), remote_port=msg.remote_port)
            previous.close()
            previous.channel.transport.loseConnection()
        group.add(tunnel)
        tunnel.online = True
        log.info("client {name} joined group {group} of public port {remote_port} "
                 "({count} members)", name=printable(msg.name), group=printable(group.name),
                 remote_port=msg.remote_port, count=len(group.members))
        return defer.succeed(tunnel)

    def _dataChannelOwner(self, msg: messages.DataChannel,
                          certificateName: Optional[str]) -> Callable[[Tunnel], bool]:
        """
        Check a data channel's credentials; return a test of whether a
        tunnel is one this data channel may serve: one registered by the
        same holder (L{access.sameHolder}), on a port that holder may publish.
        """
        name = self.authenticate(msg.name, msg.token, certificateName)

        def mine(tunnel: Tunnel) -> bool:
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
                        certificateName: Optional[str] = None) -> Tunnel:
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
                       certificateName: Optional[str] = None) -> Tunnel:
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


class ServerChannel(MessageReceiver, RelayEnd):
    """
    A connection to the control port.  Its first frame makes it a control
    channel (C{register}) or a data channel (C{data_channel}); a data
    channel then carries raw bytes, spliced to its user.  What it does in
    each role is its current L{state} (see L{gotunnel.server.channelstates}).
    """

    tunnel: Optional[Tunnel] = None
    mux: Optional[MuxSession] = None
    tlsMismatchHint = ("a TLS client talking to this plain-TCP port? give the server "
                       "--tls-cert and --tls-key, or connect without TLS")
    firstFrameCall = None
    refusalCall = None
    askedAnyPort = False
    """The register asked for remote port 0: the answer says which port."""
    wantsAddresses = False
    """The data channel asked for the user's addresses (messages.DataChannel.addresses)."""
    pending = False
    """Counted by the registry among the connections yet to send their first frame."""
    source = "?"
    """The address this connection is counted as, in the caps on pending connections."""

    def __init__(self, registry: TunnelRegistry) -> None:
        self.registry = registry
        self.state: channelstates.ChannelState = channelstates.Handshake(self)

    @property
    def role(self) -> str:
        """The name of the current role, for those who watch: "new", "control", "data" ..."""
        return self.state.name

    @property
    def host(self) -> str:
        return getattr(self.transport.getPeer(), "host", "?")

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        self.registry.connections.add(self)
        self.source = addressGroup(self.host, self.registry.settings.ipv6_prefix)
        refusal = self.registry.admit(self)
        if refusal is not None:
            log.warn("refusing a connection from {peer}: {why}",
                     peer=self.peerDescription, why=refusal)
            self.registry.stats.admissionRefusals["pending"] += 1
            self.state = channelstates.Refused(self)
            self.transport.abortConnection()
            return
        self.pending = True
        self.firstFrameCall = self.registry.clock.callLater(
            self.registry.settings.first_frame_timeout, self._firstFrameTimedOut)

    def releasePending(self) -> None:
        """
        This connection is now a control or data channel, or gone: it no
        longer counts against the caps on connections not yet accepted.
        """
        if self.pending:
            self.pending = False
            self.registry.release(self)
        self.cancelFirstFrameTimeout()

    def cancelFirstFrameTimeout(self) -> None:
        if self.firstFrameCall is not None:
            self.firstFrameCall.cancel()
            self.firstFrameCall = None

    def refuse(self, reason: str) -> None:
        """
        Answer C{register_resp} fail and close; a wrong token is answered
        after a delay that grows with the address's failures in a row.
        """
        self.state = channelstates.Refused(self)
        delay = 0.0
        if reason == "authentication failed":
            delay = self.registry.authenticationFailed(self.source)
        if delay <= 0:
            self.fail(reason)
            return
        self.paused = True
        self.transport.pauseProducing()
        self.refusalCall = self.registry.clock.callLater(delay, self._refuseNow, reason)

    def _refuseNow(self, reason: str) -> None:
        self.refusalCall = None
        self.fail(reason)

    def evict(self, held: int) -> None:
        """
        Close this idle connection now, to make room for one from an
        address that holds fewer: its address holds C{held} such connections.
        """
        log.warn("{peer} is the oldest of {held} connections from its address waiting for "
                 "their first frame; closing it to make room for another address's",
                 peer=self.peerDescription, held=held)
        self.releasePending()
        self.transport.abortConnection()

    def _firstFrameTimedOut(self) -> None:
        self.firstFrameCall = None
        self.releasePending()
        log.warn("{peer} sent no register or data_channel within {timeout} s; closing",
                 peer=self.peerDescription, timeout=self.registry.settings.first_frame_timeout)
        self.transport.abortConnection()

    def registered(self, tunnel: Tunnel) -> None:
        """The registry opened the port asked for (or the group took us in)."""
        self.state.registered(tunnel)

    def registrationRefused(self, failure, msg: messages.Register) -> None:
        failure.trap(RegistrationRefused)
        self.state.refused(msg, str(failure.value))

    def bufferedBytes(self) -> int:
        held = RelayEnd.bufferedBytes(self)
        if self.mux is not None:
            held += self.mux.bufferedBytes()
        return held

    def muxClosed(self, session: MuxSession) -> None:
        if self.tunnel is not None:
            self.tunnel.muxSessionLost(session)

    def attachUser(self, user: PublicUser) -> bool:
        """
        This pooled data channel now serves C{user}; False if it broke the
        protocol (and is closed) instead.
        """
        return self.state.attachUser(user)

    def _answer(self, user: PublicUser, ours: bool) -> bool:
        """
        Accept this data channel for C{user}.  To our own client, what the
        user has sent so far goes in the same segment as the answer: the
        client reads both at once, and a request that came with its
        connection reaches the service a wake-up sooner; and the answer
        tells the user's and the public address if it asked for them.  A Go
        client gets the answer alone, as the Go server sends it.

        False if that read found the user's connection reset while it
        waited: both connections are then reset, which the client passes
        on to the service.
        """
        early = b""
        if ours:
            try:
                waiting = readWaiting(user.transport)
            except OSError:
                user.transport.abortConnection()
                self.transport.abortConnection()
                return False
            # What the user sent while it waited goes ahead of what it has
            # sent since; the held bytes were counted as they came.
            user.relayed += len(waiting)
            early = user.takeHeld() + waiting
        # A capped mapping's throttle is charged for these once spliced.
        user.earlyBytes = len(early)
        answer = messages.RegisterResp(status="ok")
        if ours and self.wantsAddresses:
            # For our client's PROXY protocol header (see gotunnel.wire.proxyprotocol).
            peer, host = user.transport.getPeer(), user.transport.getHost()
            answer = dataclasses.replace(
                answer, user_host=getattr(peer, "host", None),
                user_port=getattr(peer, "port", None), public_host=getattr(host, "host", None),
                public_port=getattr(host, "port", None))
        self.sendMessage(answer, rawAfter=early)
        return True

    def _spliceTo(self, user: PublicUser) -> None:
        user.dataChannel = self
        throttles = user.tunnel.throttles
        if throttles is not None:
            # A capped mapping's bytes go through Python, where reading
            # pauses while the cap is spent (see gotunnel.relay.ratelimit).
            user.throttle, self.throttle = throttles
        self.registry.splicer.splice(user, self, zeroCopy=throttles is None)
        if throttles is not None and user.earlyBytes:
            # After splice(), which resumes reading: what the user sent
            # while it waited (read in small pieces, see PublicUser) counts
            # against the cap too, and may pause the user again at once.
            user.throttle.passed(user, user.earlyBytes)
        self.registry.stats.dataChannelReady(user, self.registry.clock.seconds() - user.connectedAt)
        # One line per user connection: at debug level, where the formatting
        # and the write cost nothing unless asked for.
        log.debug("data channel for port {remote_port} ready in {ms:.1f} ms",
                  remote_port=user.tunnel.remote_port,
                  ms=(self.registry.clock.seconds() - user.connectedAt) * 1000)

    def rawDataReceived(self, data: bytes) -> None:
        self.state.rawDataReceived(data)

    def readConnectionLost(self) -> None:
        self.state.readConnectionLost()

    def stringReceived(self, body: bytes) -> None:
        self.state.frameReceived(body)

    def parseFrame(self, body: bytes) -> None:
        """Parse a frame and hand its message to the current state."""
        super().stringReceived(body)

    def messageReceived(self, message: messages.Message) -> None:
        self.state.messageReceived(message)

    def connectionLost(self, reason=None) -> None:
        self.releasePending()
        if self.refusalCall is not None:
            self.refusalCall.cancel()
            self.refusalCall = None
        self.registry.connections.discard(self)
        ending, self.state = self.state, channelstates.Closed(self)
        ending.connectionLost(reason)


class ServerChannelFactory(Factory):
    noisy = False

    def __init__(self, registry: TunnelRegistry) -> None:
        self.registry = registry

    def buildProtocol(self, addr) -> ServerChannel:
        channel = ServerChannel(self.registry)
        channel.factory = self
        return channel


class TunnelServerService(MultiService):
    """
    The whole server as one service: the control listener, the heartbeat
    check, and on stop, every listener closed.

    C{whenListening} fires with the control port's L{IListeningPort} once
    it listens (tests and embedders read the bound address from it).
    """

    controlPort: Optional[IListeningPort] = None
    _listenOutcome = None
    virtualHostService = None
    """The L{gotunnel.server.vhost.VirtualHostService}, with --http or --https."""

    def __init__(self, settings: ServerSettings, reactor=None,
                 splicer: Optional[Splicer] = None) -> None:
        """
        @param splicer: how users are spliced to data channels; by default
            as C{settings} say.  Its splice thread becomes a child.
        """
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.settings = settings
        self.registry = TunnelRegistry(settings, reactor)
        self.splicer = self.registry.splicer = splicer or Splicer.fromSettings(settings, reactor)
        if self.splicer.spliceThread is not None:
            self.splicer.spliceThread.setServiceParent(self)
        listen = withBacklog(settings.listen, settings.control_backlog)
        if settings.tls_cert:
            from gotunnel.tls import contexts as tls

            self.controlEndpoint = tls.serverEndpoint(
                reactor, dataclasses.replace(settings, listen=listen))
        else:
            self.controlEndpoint = serverFromString(reactor, listen)
        self._listenWaiters: list[defer.Deferred] = []
        if settings.vhost_http or settings.vhost_https:
            from gotunnel.server.vhostports import VirtualHostService
            from gotunnel.server.vhostroutes import VirtualHosts

            endpoints = {scheme: description for scheme, description in (
                ("http", settings.vhost_http), ("https", settings.vhost_https)) if description}
            self.registry.virtualHosts = VirtualHosts(self.registry, tuple(endpoints))
            self.virtualHostService = VirtualHostService(self.registry.virtualHosts, endpoints,
                                                         reactor)
            self.virtualHostService.setServiceParent(self)
        heartbeat = TimerService(settings.heartbeat_check_interval, self.registry.checkHeartbeats)
        heartbeat.clock = reactor
        heartbeat.setServiceParent(self)
        self.admin = None
        if settings.admin:
            from gotunnel.admin.service import AdminService

            self.admin = AdminService(settings, self.registry, reactor)
            self.admin.setServiceParent(self)

    def whenListening(self) -> defer.Deferred:
        """
        A Deferred that fires with the control port's L{IListeningPort} once
        it listens, or fails if it cannot.
        """
        if self._listenOutcome is not None:
            return defer.succeed(self._listenOutcome) if self.controlPort else defer.fail(
                self._listenOutcome)
        waiter: defer.Deferred = defer.Deferred()
        self._listenWaiters.append(waiter)
        return waiter

    def startService(self) -> None:
        super().startService()
        listening = self.controlEndpoint.listen(ServerChannelFactory(self.registry))
        listening.addCallbacks(self._listening, self._cannotListen)
        if self.controlPort is None and self._listenOutcome is not None:
            # Raised here so that twistd and the console scripts refuse to
            # start, as StreamServerEndpointService does.
            self._listenOutcome.raiseException()

    def _listening(self, port: IListeningPort) -> None:
        self.controlPort = port
        self._listenOutcome = port
        address = port.getHost()
        log.info("control channel listening on {host}:{port}",
                 host=getattr(address, "host", "?"), port=getattr(address, "port", "?"))
        waiters, self._listenWaiters = self._listenWaiters, []
        for waiter in waiters:
            waiter.callback(port)

    def _cannotListen(self, failure) -> None:
        self._listenOutcome = failure
        waiters, self._listenWaiters = self._listenWaiters, []
        for waiter in waiters:
            waiter.errback(failure)

    def stopService(self) -> defer.Deferred:
        """
        Stop accepting (control and public ports), then close every
        connection after its buffered bytes are written.
        """
        stopping = [defer.maybeDeferred(super().stopService)]
        port, self.controlPort = self.controlPort, None
        if port is not None:
            stopping.append(defer.maybeDeferred(port.stopListening))
        listenersClosed = defer.DeferredList(stopping)
        return listenersClosed.addCallback(lambda _: self.registry.closeAll())

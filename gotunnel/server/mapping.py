"""
One registered mapping as the server publishes it: its control channel, its
public listener, its users waiting for a data channel, its pool of data
channels and its multiplexed connection.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Optional

from twisted.internet import defer, error
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from gotunnel.wire import messages
from gotunnel.server.access import RegistrationRefused
from gotunnel.server.accounting import (
    REFUSED_CLIENT_GONE, REFUSED_CONNECTION_RATE, REFUSED_MAX_USERS, REFUSED_SOURCE,
    REFUSED_TIMEOUT, REFUSED_WAITING_USERS,
)
from gotunnel.server.groups import Group
from gotunnel.mux.session import MuxSession
from gotunnel.mux.stream import StreamEnd
from gotunnel.server.portpolicy import RefusalLog, SourcePolicy, SourceRate, permitted
from gotunnel.wire.printable import printable
from gotunnel.server.publicusers import PublicUser, PublicUserFactory
from gotunnel.relay.ratelimit import Throttle
from gotunnel.relay.splice import splice

if TYPE_CHECKING:
    from gotunnel.server.channel import ServerChannel
    from gotunnel.server.registry import TunnelRegistry

log = Logger(namespace="gotunnel.server")


ONLINE_RETRY_DELAYS = (1, 2, 4, 8, 16, 30, 30, 30)
"""
Seconds to wait before each new try to listen on a public port that the
client asked back online but that could not be bound; about two minutes in
all, then the port stays offline until the client asks again.
"""

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


class PublishedMapping:
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
        return f"<PublishedMapping {self.name!r} :{self.remote_port}>"

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
        """What the registry knows this mapping by: its port (see L{gotunnel.server.vhostroutes})."""
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
        """The port its totals and metrics are labelled with (see L{gotunnel.server.vhostroutes})."""
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

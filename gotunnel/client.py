"""
The tunnel client: for every mapping, a control channel kept up by
L{ClientService}, a data channel per user, and a health probe of the local
service.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from typing import Callable, Optional

from twisted.application.internet import ClientService, TimerService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, clientFromString,
)
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from gotunnel import datachannelstates, messages
from gotunnel.accounting import REFUSED, SERVICE_CLOSED, endingOf, noteEnding
from gotunnel.config import ClientSettings, Mapping, clientEndpointString
from gotunnel.control import CLIENT_TLS_HINTS, MessageReceiver, tlsFailure
from gotunnel.muxclient import MuxDataChannel
from gotunnel.printable import printable
from gotunnel.refusals import lastingRefusal
from gotunnel.relay import (
    ConnectionSet, RelayEnd, isReset, setKeepAlive, setNoDelay,
)
from gotunnel.report import AUTHENTICATION_FAILED, SERVER_UNREACHABLE, reportError
from gotunnel.splicer import Splicer
from gotunnel.tcpinternals import (
    endpointBindAddress, endpointHost, endpointPort, endpointTimeout,
)

log = Logger()

LOCAL_CONNECT_TIMEOUT = 10

EARLY_LOCAL_CONNECTS = 8
"""
How many local connections a mapping makes at once ahead of the server's
answer to their data channels.  Early connections take a round trip off a
user's setup; past this many, a burst of users reaches the local service
paced by the server's answers, as the Go client does, so that a service
with a short accept queue is not flooded (Twisted's default is 50, Python's
socketserver's 5).
"""

MAX_WAITING_DATA_CHANNEL_REQUESTS = 4096
"""
The server's requests for a data channel a mapping keeps waiting while
C{max_pending_data_channels} are being opened; more are dropped.  A request
is a few dozen bytes: this many cost well under a megabyte, and serve a
burst of users as large as our server lets wait on one port.
"""

DROPPED_REQUESTS_LOG_INTERVAL = 10.0
"""Seconds between two lines about requests for a data channel dropped."""

POOL_REFILL_DELAY = 1.0
"""
Seconds before a pooled data channel that closed unused is replaced: the
server closed it or could not be reached, and asking again at once would
only repeat that.
"""

POOL_REPLACE_DELAY = 0.005
"""
Seconds between a pooled data channel being handed a user and the opening
of its replacement, while the pool still holds a channel: opened at once,
the replacement's connect and TLS handshake (about a millisecond of CPU in
each process) fall in the same turns of both reactors as that user's first
exchange, and delay it (see bench/README.md, "Connection setup").
"""

POOL_REFUSALS_IN_A_ROW = 3
"""
Pooled data channels the server refuses in a row (none handed a user in
between) before the client stops pooling until it registers again.  One
refusal may be of the moment (the pool full while the server has yet to see
a channel close, a mapping being replaced); the same refusal again and
again is one that will repeat (a server that keeps no pool, a token it
refuses), and asking on would only load it.
"""


def localEndpoint(reactor, host: str, port: int) -> IStreamClientEndpoint:
    """
    An endpoint for the local service; IP literals skip name resolution,
    which keeps connection setup fast.
    """
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=LOCAL_CONNECT_TIMEOUT)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=LOCAL_CONNECT_TIMEOUT)
    return HostnameEndpoint(reactor, host, port, timeout=LOCAL_CONNECT_TIMEOUT)


class ServerEndpoints:
    """
    Where the client connects: control channels to C{settings.server}, its
    host name looked up again on every reconnect, and data channels to the
    address their control channel reached.  A name with several addresses
    (round-robin DNS in front of several servers) must not send a data
    channel to a server other than the one that asked for it, and no user's
    connection waits for a name lookup (the Go client looks the name up for
    each).  Both with the same TLS settings.
    """

    def __init__(self, reactor, settings: ClientSettings) -> None:
        self.reactor = reactor
        named = clientFromString(reactor, clientEndpointString(settings.server))
        host = endpointHost(named)
        self.options = None
        if settings.tls:
            # Only then: a plain client never loads the TLS code.
            from gotunnel import tls

            self.options = tls.clientOptions(settings, host)
        self.timeout = endpointTimeout(named, 30)
        # A tcp: string is a TCP4ClientEndpoint, which looks a name up for
        # IPv4 only: a name is looked up for both families on every connect.
        self.pinnable = (isinstance(named, TCP4ClientEndpoint) and bool(host)
                         and not isIPAddress(host) and not isIPv6Address(host))
        if self.pinnable:
            named = HostnameEndpoint(reactor, host, endpointPort(named), timeout=self.timeout,
                                     bindAddress=endpointBindAddress(named))
        self.control = self._withTLS(named)

    def _withTLS(self, endpoint: IStreamClientEndpoint) -> IStreamClientEndpoint:
        if self.options is None:
            return endpoint
        from gotunnel.tlshalfclose import HalfCloseableTLSEndpoint

        return HalfCloseableTLSEndpoint(self.options, endpoint)

    def dataChannel(self, reached: object) -> Optional[IStreamClientEndpoint]:
        """
        The endpoint of a data channel whose control channel reached
        C{reached}, or None where that is the control channel's own.
        """
        if not self.pinnable or getattr(reached, "type", None) != "TCP":
            return None
        if isinstance(reached, IPv4Address):
            return self._withTLS(TCP4ClientEndpoint(self.reactor, reached.host, reached.port,
                                                    timeout=self.timeout))
        if isinstance(reached, IPv6Address):
            return self._withTLS(TCP6ClientEndpoint(self.reactor, reached.host, reached.port,
                                                    timeout=self.timeout))
        return None


def serverAddress(endpoint: object) -> Optional[str]:
    """
    HOST:PORT (an IPv6 host in brackets) that a client endpoint connects
    to, for a person to read; None where Twisted's endpoint does not tell.
    """
    while endpoint is not None:
        host = getattr(endpoint, "_hostText", None) or getattr(endpoint, "_host", None)
        port = getattr(endpoint, "_port", None)
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        if host and isinstance(port, int):
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        endpoint = getattr(endpoint, "_wrappedEndpoint", None)
    return None


@implementer(IStreamClientEndpoint)
class ReportingEndpoint:
    """
    The server's endpoint, printing C{[ERROR][1001]} with the server's
    address when it cannot be reached.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, lang: str = "en", clock=None) -> None:
        self.endpoint = endpoint
        self.lang = lang
        self.address = serverAddress(endpoint)
        self.clock = clock

    def __repr__(self) -> str:
        return f"<server endpoint {self.endpoint!r}>"

    def connect(self, factory) -> defer.Deferred:
        def failed(failure):
            if not failure.check(defer.CancelledError):
                reportError(SERVER_UNREACHABLE, failure.getErrorMessage(), self.lang,
                            self.address, self.clock.seconds() if self.clock else None)
            return failure

        return self.endpoint.connect(factory).addErrback(failed)


@implementer(IHandshakeListener)
class ControlChannel(MessageReceiver):
    """
    The client's side of a control channel: registers its mapping, sends
    heartbeats, and asks for a data channel when the server says a user is
    waiting.
    """

    registered = False
    answer: Optional[messages.RegisterResp] = None
    """The server's register_resp, once it accepted the mapping."""
    lastPong = 0.0
    handshakeDone = False
    registerTimeout = None
    timedOut = False
    tlsMismatchHint = "the server speaks TLS? connect with --tls"

    def __init__(self, tunnel: "TunnelService") -> None:
        self.tunnel = tunnel
        self.heartbeat = LoopingCall(self._ping)
        self.heartbeat.clock = tunnel.reactor

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        mapping, settings = self.tunnel.mapping, self.tunnel.settings
        virtualHost = {}
        if mapping.vhost:
            virtualHost = dict(vhost=mapping.vhost, domains=mapping.domains or None,
                               subdomain=mapping.subdomain or None,
                               http_auth=mapping.http_auth or None,
                               host_header_rewrite=mapping.host_header_rewrite or None)
        # A virtual host is routed by the user's first bytes, and UDP has its
        # carrying channel: no streams for them.  A stream's opening carries
        # no user address, which a PROXY protocol header needs: such a
        # mapping keeps to data channels.
        mux = 1 if (settings.mux and not mapping.vhost and mapping.protocol == "tcp"
                    and mapping.proxy_protocol is None) else None
        self.sendMessage(messages.Register(
            local_port=mapping.local_port, remote_port=mapping.remote_port,
            protocol=mapping.protocol, token=settings.token, name=settings.name, mux=mux,
            allow_sources=mapping.allow_sources or None,
            deny_sources=mapping.deny_sources or None, max_users=mapping.max_users or None,
            max_connection_rate=mapping.max_connection_rate or None,
            bandwidth_limit=mapping.bandwidth_limit or None, group=mapping.group or None,
            group_key=mapping.group_key or None, **virtualHost))
        # A server that never answers (hung, or not a gotunnel server) would
        # otherwise hold this mapping unpublished, silently, for good.
        self.registerTimeout = self.tunnel.reactor.callLater(
            settings.register_timeout, self._registerTimedOut)

    def _registerTimedOut(self) -> None:
        self.registerTimeout = None
        self.timedOut = True
        log.warn("the server did not answer the registration of {mapping} within {seconds:g} s; "
                 "closing the control channel", mapping=str(self.tunnel.mapping),
                 seconds=self.tunnel.settings.register_timeout)
        self.transport.abortConnection()

    def _cancelRegisterTimeout(self) -> None:
        if self.registerTimeout is not None and self.registerTimeout.active():
            self.registerTimeout.cancel()
        self.registerTimeout = None

    def handshakeCompleted(self) -> None:
        self.handshakeDone = True

    def msg_register_resp(self, msg: messages.RegisterResp) -> None:
        self._cancelRegisterTimeout()
        if self.registered:
            self.protocolError("register_resp on a registered control channel")
            return
        if not msg.ok:
            self.tunnel.registrationRefused(printable(msg.reason))
            self.transport.loseConnection()
            return
        if self.tunnel.mapping.vhost and msg.vhost != self.tunnel.mapping.vhost:
            # A Go server answers ok to any register, and publishes port 0:
            # a port of its kernel's choosing, closed with this channel.
            self.tunnel.withdraw()
            return
        self.registered = True
        self.answer = msg
        if self.tunnel.mapping.remote_port == 0 and not self.tunnel.mapping.vhost:
            self.tunnel.portChosen(msg.remote_port, self.transport.getPeer())
        self.lastPong = self.tunnel.reactor.seconds()
        self.heartbeat.start(self.tunnel.settings.heartbeat_interval, now=False)
        # A Go server sends no pool: it gets no pooled data channels.
        self.tunnel.registered(self, serverPool=msg.pool or 0,
                               mux=msg.mux == 1 and self.tunnel.settings.mux)

    def _ping(self) -> None:
        now = self.tunnel.reactor.seconds()
        silence = now - self.lastPong
        if silence > self.tunnel.settings.server_timeout:
            log.warn("no pong from the server for {seconds:.0f} s; reconnecting", seconds=silence)
            self.transport.abortConnection()
            return
        self.sendMessage(messages.Ping(time=int(now)))

    def msg_pong(self, msg: messages.Pong) -> None:
        self.lastPong = self.tunnel.reactor.seconds()

    def msg_open_data_channel(self, msg: messages.OpenDataChannel) -> None:
        if not self.registered:
            self.protocolError("open_data_channel before register_resp")
            return
        self.tunnel.openDataChannel(msg)

    def sendPortState(self, online: bool) -> None:
        port = self.tunnel.mapping.remote_port
        self.sendMessage(messages.OnlinePort(port=port) if online else messages.OfflinePort(port=port))

    def connectionLost(self, reason=None) -> None:
        self._cancelRegisterTimeout()
        if self.heartbeat.running:
            self.heartbeat.stop()
        why = tlsFailure(reason, CLIENT_TLS_HINTS, self.transport,
                         self.tunnel.reactor.seconds())
        # A handshake we cut short on the timeout says nothing about the
        # server speaking plain TCP; the timeout's line has said why.
        if (why is None and ISSLTransport.providedBy(self.transport) and not self.handshakeDone
                and not self.timedOut):
            why = ("the connection closed during the TLS handshake "
                   "(is the server plain TCP? then connect without --tls)")
        if why is not None and not self.registered:
            self.tunnel.reportUnreachable(why)
        self.tunnel.channelLost(self)


class ControlChannelFactory(Factory):
    noisy = False

    def __init__(self, tunnel: "TunnelService") -> None:
        self.tunnel = tunnel

    def buildProtocol(self, addr) -> ControlChannel:
        return ControlChannel(self.tunnel)


class DataChannelClient(MessageReceiver, RelayEnd):
    """
    One data channel and its connection to the local service, opened
    together when the server asks for a data channel: the data channel says
    which user it is for, and once the server accepts it and the local
    connection is up, the two are spliced.  Connecting to the local service
    while the server answers takes a round trip off every user's setup.

    A pooled data channel (C{request} None) is opened ahead of any user and
    waits at the server; the server's answer comes with the next user, and
    only then is the local service connected to (a service sees no idle
    connections of ours).

    Whichever side fails takes the other down with it: a local service that
    refuses closes the data channel (and so the server closes the user), and
    a data channel that fails or is refused closes the local connection.

    Beyond L{EARLY_LOCAL_CONNECTS} such early connections at once, the local
    connection waits for the server's answer instead.

    How far it has come (connecting, asking, answered, spliced, refused,
    closed) is its L{state} object (see L{gotunnel.datachannelstates}).
    """

    localConnecting: Optional[defer.Deferred] = None
    local: Optional["LocalServiceConnection"] = None
    answerTimeout = None
    early = False
    """This channel holds one of its mapping's early local connections."""
    proxyHeader = b""
    """The PROXY protocol header to write first on the local connection."""
    servedLocal: Optional["LocalServiceConnection"] = None
    """The local connection this channel was spliced to."""
    endedBy: Optional[str] = None
    """How the user's connection ended (L{gotunnel.accounting.ENDINGS})."""

    def __init__(self, tunnel: "TunnelService",
                 request: Optional[messages.OpenDataChannel]) -> None:
        self.tunnel = tunnel
        self.request = request
        self.startedAt = tunnel.reactor.seconds()
        self.state: datachannelstates.DataChannelState = datachannelstates.Connecting(self)

    @property
    def pooled(self) -> bool:
        return self.request is None

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        # Pooled or not: a server that vanishes silently must not hold this
        # channel, and the local connection spliced to it, forever.
        setKeepAlive(self.transport)
        self.tunnel.connections.add(self)
        self.state.connected()

    def unanswered(self) -> None:
        self.answerTimeout = None
        log.warn("the server did not answer a data channel for {mapping} within {seconds:g} s; "
                 "closing it", mapping=str(self.tunnel.mapping),
                 seconds=self.tunnel.settings.register_timeout)
        self.transport.abortConnection()

    def answered(self) -> None:
        if self.answerTimeout is not None and self.answerTimeout.active():
            self.answerTimeout.cancel()
        self.answerTimeout = None
        self.tunnel.dataChannelAnswered(self)

    def messageReceived(self, message: messages.Message) -> None:
        self.state.messageReceived(message)

    def connectEarly(self) -> None:
        """Connect to the local service now, ahead of the server's answer."""
        self.state.connectEarly()

    def connectLocal(self) -> None:
        """Start the connection to the local service."""
        self.localConnecting = self.tunnel.connectLocal(self)
        self.localConnecting.addErrback(self._localUnreachable)

    def replaceInPool(self) -> None:
        # The replacement is asked for once the user's connection is set up,
        # not when the server hands this channel a user: its connect would
        # go ahead of the local connection's.
        if self.pooled:
            self.tunnel.replacePooled()

    def earlyDone(self) -> None:
        if self.early:
            self.early = False
            self.tunnel.earlyLocalConnections -= 1

    def cannotConnect(self, failure):
        """The data channel could not be made: the local connection goes too."""
        self.state.cannotConnect()
        return failure

    def localConnected(self, local: "LocalServiceConnection") -> None:
        self.localConnecting = None
        self.state.localConnected(local)

    def _localUnreachable(self, failure) -> None:
        self.localConnecting = None
        if failure.check(defer.CancelledError):
            return
        log.warn("local service {host}:{port} is unreachable ({why}); closing the user's "
                 "connection", host=self.tunnel.mapping.local_host,
                 port=self.tunnel.mapping.local_port, why=failure.getErrorMessage())
        noteEnding(self, REFUSED)
        self.localLost()

    def localLost(self) -> None:
        """
        The local service refused, or closed before the splice: close the
        data channel (at once if it is up, else right after its first frame).
        """
        self.earlyDone()
        self.local = None
        self.state.localLost()

    def dropLocal(self, reset: bool = False) -> None:
        self.earlyDone()
        connecting, self.localConnecting = self.localConnecting, None
        if connecting is not None:
            connecting.cancel()
        local, self.local = self.local, None
        if local is not None and self.peer is None:
            if reset:
                # The user's reset, passed on by the server.
                local.transport.abortConnection()
            else:
                local.transport.loseConnection()

    def rawDataReceived(self, data: bytes) -> None:
        self.state.rawDataReceived(data)

    def readConnectionLost(self) -> None:
        self.state.readConnectionLost()

    def connectionLost(self, reason=None) -> None:
        ending, self.state = self.state, datachannelstates.Closed(self)
        self.answered()
        self.tunnel.connections.discard(self)
        ending.connectionLost(reason)
        self.dropLocal(isReset(reason))
        self.relayConnectionLost(reason)


class _Always(Factory):
    """A factory that gives one protocol, already made."""

    noisy = False

    def __init__(self, protocol) -> None:
        self.protocol = protocol

    def buildProtocol(self, addr):
        return self.protocol


class DataChannelFactory(Factory):
    noisy = False

    def __init__(self, channel: DataChannelClient) -> None:
        self.channel = channel

    def buildProtocol(self, addr) -> DataChannelClient:
        return self.channel


class LocalServiceConnection(Protocol, RelayEnd):
    """
    The tunnel's connection to the local service; it reads nothing until it
    is spliced to its data channel.
    """

    def __init__(self, dataChannel: DataChannelClient) -> None:
        self.dataChannel = dataChannel

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        self.dataChannel.tunnel.connections.add(self)
        self.dataChannel.localConnected(self)
        if self.peer is None:
            # Not spliced yet (the server has not answered): what the
            # service says first waits in the kernel.  Not before, or a
            # connection spliced at once would stop reading only to start
            # again.
            self.holdReading()

    def dataReceived(self, data: bytes) -> None:
        self.relayReceived(data)

    def readConnectionLost(self) -> None:
        noteEnding(self.dataChannel, SERVICE_CLOSED)
        RelayEnd.readConnectionLost(self)

    def connectionLost(self, reason=None) -> None:
        noteEnding(self.dataChannel, endingOf(reason, SERVICE_CLOSED))
        self.dataChannel.tunnel.connections.discard(self)
        if self.peer is None and self.dataChannel.local is self:
            mapping = self.dataChannel.tunnel.mapping
            log.warn("local service {host}:{port} closed a connection before the user's data "
                     "channel was ready; closing the user's connection",
                     host=mapping.local_host, port=mapping.local_port)
            self.dataChannel.localLost()
        self.relayConnectionLost(reason)


class LocalServiceFactory(Factory):
    noisy = False

    def __init__(self, dataChannel: DataChannelClient) -> None:
        self.dataChannel = dataChannel

    def buildProtocol(self, addr) -> LocalServiceConnection:
        return LocalServiceConnection(self.dataChannel)


class _Probe(Protocol):
    def connectionMade(self) -> None:
        self.transport.loseConnection()


class _ProbeFactory(Factory):
    noisy = False
    protocol = _Probe


class TunnelService(MultiService):
    """
    One mapping kept published: a reconnecting control channel, and a
    periodic probe of the local service that takes the public port offline
    while the service is down.
    """

    channel: Optional[ControlChannel] = None
    earlyLocalConnections = 0
    """Local connections made ahead of the server's answer, not yet spliced."""
    poolSize = 0
    """Pooled data channels to keep open: ours and the server's limit, the lesser."""
    refillCall = None
    poolRefusals = 0
    """Pooled data channels refused in a row since one was handed a user."""
    localUp = True
    failedRegistrations = 0
    stopping = False
    droppedRequests = 0
    """Requests for a data channel dropped since the service started."""
    _droppedUnlogged = 0
    _droppedLogCall = None
    _openingWaiting = False
    _refusalDelay: Optional[float] = None
    """The delay before asking again after a refusal, told as the refusal is logged."""
    muxChannel: Optional[MuxDataChannel] = None
    """The multiplexed data connection, while the server and we agree on one."""
    serverPool = 0
    muxCall = None

    def __init__(self, settings: ClientSettings, mapping: Mapping,
                 serverEndpoint: IStreamClientEndpoint, reactor,
                 dataChannelEndpoint=None, splicer: Optional[Splicer] = None) -> None:
        """
        @param dataChannelEndpoint: given the address the control channel
            reached, the endpoint for a data channel, or None for
            C{serverEndpoint} (see L{ServerEndpoints.dataChannel}).
        @param splicer: how data channels are spliced to the local service
            (shared by a client's mappings); by default as C{settings} say,
            its splice thread a child of this service.
        """
        super().__init__()
        if splicer is None:
            splicer = Splicer.fromSettings(settings, reactor)
            if splicer.spliceThread is not None:
                splicer.spliceThread.setServiceParent(self)
        self.splicer = splicer
        self.settings = settings
        self.mapping = mapping
        self.reactor = reactor
        self.serverEndpoint = serverEndpoint
        self.dataChannelEndpoint = dataChannelEndpoint
        self.connections = ConnectionSet()
        self.pool: set[DataChannelClient] = set()
        """Pooled data channels opened or opening, not yet handed a user."""
        self.replaceCalls: set = set()
        """The openings of channels in place of pooled ones handed users, a moment away."""
        self._connecting: set[defer.Deferred] = set()
        self._registrationWaiters: list[defer.Deferred] = []
        self.opening: set[DataChannelClient] = set()
        """Data channels opened for users, not yet answered by the server."""
        self.waitingRequests: deque[messages.OpenDataChannel] = deque()
        """Requests for a data channel waiting for one of L{opening} to end."""
        self.localEndpoint = localEndpoint(reactor, mapping.local_host, mapping.local_port)
        self._backoff = backoffPolicy(initialDelay=0.5, maxDelay=settings.reconnect_max_delay,
                                      factor=2.0, jitter=random.random)
        self.reportingEndpoint = ReportingEndpoint(serverEndpoint, settings.log_lang, reactor)
        self.connector = ClientService(self.reportingEndpoint,
                                       ControlChannelFactory(self),
                                       retryPolicy=self._retryDelay, clock=reactor)
        self.connector.setServiceParent(self)
        probe = TimerService(settings.health_check_interval, self.probeLocalService)
        probe.clock = reactor
        probe.setServiceParent(self)

    def _retryDelay(self, attempt: int) -> float:
        # ClientService counts failed connects only, and starts again from 1
        # after every connect that succeeds; a control channel that ended
        # without being registered (refused, or cut by the server) must back
        # off too, not retry every second.
        delay, self._refusalDelay = self._refusalDelay, None
        if delay is None:
            delay = self._backoff(attempt + max(self.failedRegistrations - 1, 0))
        log.info("reconnecting {mapping} to the server in {delay:.1f} s",
                 mapping=str(self.mapping), delay=delay)
        return delay

    def whenRegistered(self) -> defer.Deferred:
        """
        A Deferred that fires with the control channel once the server has
        accepted this mapping (at once if it has already).
        """
        if self.channel is not None:
            return defer.succeed(self.channel)
        waiter: defer.Deferred = defer.Deferred()
        self._registrationWaiters.append(waiter)
        return waiter

    def registered(self, channel: ControlChannel, serverPool: int = 0,
                   mux: bool = False) -> None:
        self.channel = channel
        self.failedRegistrations = 0
        log.info("registered {mapping} as {name}", mapping=str(self.mapping),
                 name=self.settings.name)
        if not self.localUp:
            channel.sendPortState(False)
        self.serverPool = serverPool
        # Users come as streams while the multiplexed connection is up: a
        # pool would only hold descriptors.
        self.poolSize = 0 if mux else min(self.settings.pool_count, serverPool)
        self.poolRefusals = 0
        self.fillPool()
        if mux:
            self.openMuxChannel()
        waiters, self._registrationWaiters = self._registrationWaiters, []
        for waiter in waiters:
            waiter.callback(channel)

    def portChosen(self, remote_port: Optional[int], server: object) -> None:
        """
        The server chose C{remote_port} for a mapping that asked for 0:
        from now on the mapping is that port's, and registering again asks
        for it (and so gets it back within the server's port lease).
        """
        if not remote_port:
            log.warn("the server published {mapping} on a port of its choosing but did not "
                     "say which (a Go server?)", mapping=str(self.mapping))
            return
        self.mapping = dataclasses.replace(self.mapping, remote_port=remote_port)
        host = getattr(server, "host", "?")
        log.info("the server chose public port {remote_port} for {mapping}: users connect to "
                 "{address}", remote_port=remote_port, mapping=str(self.mapping),
                 address=f"[{host}]:{remote_port}" if ":" in host else f"{host}:{remote_port}")

    def registrationRefused(self, reason: str) -> None:
        if reason == "authentication failed":
            reportError(AUTHENTICATION_FAILED, lang=self.settings.log_lang,
                        when=self.reactor.seconds())
        lasting = lastingRefusal(reason)
        if lasting is None:
            log.error("the server refused {mapping}: {reason}", mapping=str(self.mapping),
                      reason=reason)
        elif self.settings.exit_on_refusal and isinstance(self.parent, TunnelClientService):
            log.error("the server refused {mapping}: {reason}; exiting with status {status} "
                      "(exit_on_refusal), as this will not change until {until}",
                      mapping=str(self.mapping), reason=reason, status=lasting.exit_status,
                      until=lasting.until)
            self.parent.exit(lasting.exit_status)
        else:
            # The delay _retryDelay will be asked for: attempt 1 (the
            # connection was made), with this refusal one more failed
            # registration.
            self._refusalDelay = self._backoff(1 + self.failedRegistrations)
            log.error("the server refused {mapping}: {reason}; will retry in {delay:.1f} s; "
                      "this will not change until {until}", mapping=str(self.mapping),
                      reason=reason, delay=self._refusalDelay, until=lasting.until)

    def withdraw(self) -> None:
        """
        The server accepted a virtual host without confirming it: it has
        none.  Stop publishing this mapping, for good.
        """
        log.error("the server has no {vhost} virtual hosts (a Go gotunnel server, or one "
                  "without --{vhost}); withdrawing {mapping}", vhost=self.mapping.vhost,
                  mapping=str(self.mapping))
        self.stopService()

    def reportUnreachable(self, why: str) -> None:
        """Print C{[ERROR][1001]} with the server's address and C{why}."""
        reportError(SERVER_UNREACHABLE, why, self.settings.log_lang,
                    self.reportingEndpoint.address, self.reactor.seconds())

    def channelLost(self, channel: ControlChannel) -> None:
        if not channel.registered:
            self.failedRegistrations += 1
        if self.channel is channel:
            self.channel = None
            log.info("control channel for {mapping} lost", mapping=str(self.mapping))
            # The server closes its end of the pool with the control channel,
            # and the users it asked data channels for.
            self.emptyPool()
            self.waitingRequests.clear()
            self.closeMuxChannel()

    def openMuxChannel(self) -> None:
        """Connect the mapping's multiplexed data connection."""
        self.muxCall = None
        if self.channel is None or self.stopping or self.muxChannel is not None:
            return
        self.muxChannel = channel = MuxDataChannel(self)
        endpoint = self.dataChannelEndpoint(self.channel.transport.getPeer()) \
            if self.dataChannelEndpoint is not None else None
        if endpoint is None:
            endpoint = self.serverEndpoint

        def failed(failure):
            self.muxLost(channel)

        self._track(endpoint.connect(_Always(channel))).addErrback(failed)

    def closeMuxChannel(self) -> None:
        """No new users over it; it closes once its streams have ended."""
        if self.muxCall is not None and self.muxCall.active():
            self.muxCall.cancel()
        self.muxCall = None
        channel, self.muxChannel = self.muxChannel, None
        if channel is not None:
            channel.goAway()

    def muxLost(self, channel: MuxDataChannel) -> None:
        """The multiplexed connection went: another, a second later, while registered."""
        if self.muxChannel is channel:
            self.muxChannel = None
            if self.channel is not None and not self.stopping:
                self.muxCall = self.reactor.callLater(POOL_REFILL_DELAY, self.openMuxChannel)

    def muxRefused(self, channel: MuxDataChannel) -> None:
        """The server would not multiplex after all: keep a pool as without."""
        if self.muxChannel is channel:
            self.muxChannel = None
            self.poolSize = min(self.settings.pool_count, self.serverPool)
            self.fillPool()

    def _cancelRefill(self) -> None:
        if self.refillCall is not None and self.refillCall.active():
            self.refillCall.cancel()
        self.refillCall = None
        replacing, self.replaceCalls = self.replaceCalls, set()
        for call in replacing:
            call.cancel()

    def replacePooled(self) -> None:
        """
        A pooled channel was handed a user: open one in its place after
        L{POOL_REPLACE_DELAY}, once that user's first exchange is through;
        at once (with any other replacement waiting) if the pool is empty,
        where the next user would wait for a channel.
        """
        if not self.pool:
            self.fillPool()
            return
        call = self.reactor.callLater(POOL_REPLACE_DELAY, lambda: self._replaceOne(call))
        self.replaceCalls.add(call)

    def _replaceOne(self, call) -> None:
        self.replaceCalls.discard(call)
        if self.channel is not None and not self.stopping and len(self.pool) < self.poolSize:
            channel = DataChannelClient(self, None)
            self.pool.add(channel)
            self._connectDataChannel(channel)

    def fillPool(self) -> None:
        """Open pooled data channels until the pool holds L{poolSize}."""
        self._cancelRefill()
        while self.channel is not None and not self.stopping and len(self.pool) < self.poolSize:
            channel = DataChannelClient(self, None)
            self.pool.add(channel)
            self._connectDataChannel(channel)

    def emptyPool(self) -> None:
        """Close the pooled data channels not yet handed a user."""
        self.poolSize = 0
        self._cancelRefill()
        pool, self.pool = self.pool, set()
        for channel in pool:
            if channel.transport is not None:
                channel.transport.loseConnection()

    def pooledChannelTaken(self, channel: DataChannelClient) -> None:
        """
        The server handed C{channel} a user: it is the user's now, and stays
        open if the control channel goes.  L{fillPool} replaces it.
        """
        self.pool.discard(channel)
        self.poolRefusals = 0

    def pooledChannelLost(self, channel: DataChannelClient) -> None:
        """C{channel} closed, or could not connect, before the server used it."""
        if channel in self.pool:
            self.pool.discard(channel)
            if self.refillCall is None and self.channel is not None and not self.stopping:
                self.refillCall = self.reactor.callLater(POOL_REFILL_DELAY, self.fillPool)

    def poolRefused(self, channel: DataChannelClient) -> None:
        """
        The server refused C{channel}: replace it later, as a channel lost
        unused; after L{POOL_REFUSALS_IN_A_ROW} refusals in a row, stop
        pooling until we register again.
        """
        self.poolRefusals += 1
        if self.poolRefusals < POOL_REFUSALS_IN_A_ROW:
            self.pooledChannelLost(channel)
            return
        self.pool.discard(channel)
        if self.poolSize:
            log.warn("the server refused {count} pooled data channels in a row; {mapping} "
                     "opens data channels only when asked until it registers again",
                     count=self.poolRefusals, mapping=str(self.mapping))
        self.poolSize = 0
        self._cancelRefill()

    def stopService(self) -> defer.Deferred:
        """
        Stop reconnecting and probing, close the control channel, then close
        the tunneled connections once their buffers are written.
        """
        self.stopping = True
        self.emptyPool()
        self.closeMuxChannel()
        self.waitingRequests.clear()
        if self._droppedLogCall is not None and self._droppedLogCall.active():
            self._droppedLogCall.cancel()
        self._droppedLogCall = None
        for connecting in list(self._connecting):
            connecting.cancel()
        stopped = defer.maybeDeferred(super().stopService)
        return stopped.addCallback(lambda _: self.connections.closeAll(
            self.reactor, self.settings.shutdown_timeout))

    def _track(self, connecting: defer.Deferred) -> defer.Deferred:
        """Remember a connection attempt, so that stopping cancels it."""
        self._connecting.add(connecting)

        def done(result):
            self._connecting.discard(connecting)
            return result

        return connecting.addBoth(done)

    def openDataChannel(self, request: messages.OpenDataChannel) -> None:
        """
        Connect a data channel to the server and, at the same time, a
        connection to the local service (see L{DataChannelClient}); or, with
        C{max_pending_data_channels} unanswered already, wait for one of
        them to end, so that a server sending requests without end (hostile
        or broken) holds a bounded number of our descriptors.
        """
        if self.stopping:
            return
        if len(self.opening) >= self.settings.max_pending_data_channels:
            if len(self.waitingRequests) < MAX_WAITING_DATA_CHANNEL_REQUESTS:
                self.waitingRequests.append(request)
            else:
                self._dropRequest()
            return
        self._open(request)

    def dataChannelAnswered(self, channel: DataChannelClient) -> None:
        """C{channel} was answered, or failed: a waiting request may go."""
        if channel not in self.opening:
            return
        self.opening.discard(channel)
        if self._openingWaiting:
            # A connect that failed at once, inside the loop below.
            return
        self._openingWaiting = True
        try:
            while (self.waitingRequests and not self.stopping
                   and len(self.opening) < self.settings.max_pending_data_channels):
                self._open(self.waitingRequests.popleft())
        finally:
            self._openingWaiting = False

    def _dropRequest(self) -> None:
        self.droppedRequests += 1
        self._droppedUnlogged += 1
        if self._droppedLogCall is None:
            self._logDropped()

    def _logDropped(self) -> None:
        # One line at the first drop, then at most one per interval: a flood
        # of requests must not become a flood of lines.
        count, self._droppedUnlogged = self._droppedUnlogged, 0
        if not count:
            self._droppedLogCall = None
            return
        log.warn("dropped {count} requests for a data channel for {mapping} ({total} in all): "
                 "{opening} data channels are being opened and {waiting} requests wait; the "
                 "server closes those users when it stops waiting for their data channels",
                 count=count, total=self.droppedRequests, mapping=str(self.mapping),
                 opening=len(self.opening), waiting=len(self.waitingRequests))
        self._droppedLogCall = self.reactor.callLater(DROPPED_REQUESTS_LOG_INTERVAL,
                                                      self._logDropped)

    def _open(self, request: messages.OpenDataChannel) -> None:
        channel = DataChannelClient(self, request)
        self.opening.add(channel)
        self._connectDataChannel(channel)
        if self.earlyLocalConnections < EARLY_LOCAL_CONNECTS:
            channel.connectEarly()

    def _connectDataChannel(self, channel: DataChannelClient) -> None:
        def failed(failure):
            if channel.pooled:
                self.pooledChannelLost(channel)
            if not failure.check(defer.CancelledError):
                log.warn("cannot open a data channel to the server: {why}",
                         why=failure.getErrorMessage())

        endpoint = None
        if self.dataChannelEndpoint is not None and self.channel is not None:
            endpoint = self.dataChannelEndpoint(self.channel.transport.getPeer())
        if endpoint is None:
            endpoint = self.serverEndpoint
        self._track(endpoint.connect(DataChannelFactory(channel))).addErrback(
            channel.cannotConnect).addErrback(failed)

    def connectLocal(self, channel: DataChannelClient) -> defer.Deferred:
        """Connect to the local service for C{channel}."""
        return self._track(self.localEndpoint.connect(LocalServiceFactory(channel)))

    def probeLocalService(self) -> defer.Deferred:
        def answered(up: bool) -> None:
            if up == self.localUp:
                return
            self.localUp = up
            if up:
                log.info("local service {mapping} is back; publishing it again",
                         mapping=str(self.mapping))
            else:
                log.warn("local service {mapping} is down; taking its public port offline",
                         mapping=str(self.mapping))
            if self.channel is not None:
                self.channel.sendPortState(up)

        d = self.localEndpoint.connect(_ProbeFactory())
        d.addCallbacks(lambda _: True, lambda _: False)
        return d.addCallback(answered)


class TunnelClientService(MultiService):
    """The whole client: one L{TunnelService} per mapping."""

    exitStatus: Optional[int] = None
    """Set when the client gave up (C{exit_on_refusal}): the process's exit status."""
    whenExiting: Optional[Callable[[int], None]] = None
    """Told the exit status before the reactor is stopped (see tap.py, for twistd)."""

    def __init__(self, settings: ClientSettings, reactor=None,
                 splicer: Optional[Splicer] = None) -> None:
        """
        @param splicer: how every mapping's data channels are spliced; by
            default as C{settings} say.  Its splice thread becomes a child.
        """
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.settings = settings
        from gotunnel.udp import UdpTunnelService

        self.splicer = splicer or Splicer.fromSettings(settings, reactor)
        if self.splicer.spliceThread is not None:
            self.splicer.spliceThread.setServiceParent(self)
        endpoints = ServerEndpoints(reactor, settings)
        self.tunnels = [(UdpTunnelService if mapping.protocol == "udp" else TunnelService)(
                            settings, mapping, endpoints.control, reactor, endpoints.dataChannel,
                            self.splicer)
                        for mapping in settings.mappings]
        for tunnel in self.tunnels:
            tunnel.setServiceParent(self)

    def exit(self, status: int) -> None:
        """Stop the reactor, for the process to exit with C{status}."""
        if self.exitStatus is not None:
            return
        self.exitStatus = status
        if self.whenExiting is not None:
            self.whenExiting(status)
        try:
            self.reactor.stop()
        except error.ReactorNotRunning:
            pass

"""
One mapping of the client kept published: a control channel kept up by
L{ClientService}, the mapping's data channels, and a health probe of the
local service.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from typing import Optional

from twisted.application.internet import ClientService, TimerService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from gotunnel.client.control import ControlChannel, ControlChannelFactory
from gotunnel.client.datachannel import DataChannelClient, DataChannelFactory, LocalServiceFactory
from gotunnel.client.datachannelrequests import DataChannelRequests
from gotunnel.client.endpoints import ReportingEndpoint, localEndpoint
from gotunnel.client.pool import DataChannelPool
from gotunnel.wire import messages
from gotunnel.config.mappings import Mapping
from gotunnel.config.settings import ClientSettings
from gotunnel.server.refusals import lastingRefusal
from gotunnel.relay.splice import ConnectionSet
from gotunnel.report import AUTHENTICATION_FAILED, SERVER_UNREACHABLE, reportError
from gotunnel.relay.splicer import Splicer

log = Logger(namespace="gotunnel.client")


class _Probe(Protocol):
    def connectionMade(self) -> None:
        self.transport.loseConnection()


class _ProbeFactory(Factory):
    noisy = False
    protocol = _Probe


class ClientMappingService(DataChannelRequests, DataChannelPool, MultiService):
    """
    One mapping kept published: a reconnecting control channel, and a
    periodic probe of the local service that takes the public port offline
    while the service is down.  Its data channels are opened as the server
    asks for them (L{DataChannelRequests}) or ahead of users
    (L{DataChannelPool}).
    """

    channel: Optional[ControlChannel] = None
    localUp = True
    failedRegistrations = 0
    stopping = False
    _refusalDelay: Optional[float] = None
    """The delay before asking again after a refusal, told as the refusal is logged."""

    def __init__(self, settings: ClientSettings, mapping: Mapping,
                 serverEndpoint: IStreamClientEndpoint, reactor,
                 dataChannelEndpoint=None, splicer: Optional[Splicer] = None) -> None:
        """
        @param dataChannelEndpoint: given the address the control channel
            reached, the endpoint for a data channel, or None for
            C{serverEndpoint} (see
            L{gotunnel.client.endpoints.ServerEndpoints.dataChannel}).
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
        # Imported here: gotunnel.client.service imports this module.
        from gotunnel.client.service import TunnelClientService

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

"""
The tunnel server as one service: the control port where clients open
control channels and data channels, the heartbeat check, and on stop every
listener closed.  The channels talk to L{gotunnel.server.registry.TunnelRegistry}.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from gotunnel.config.settings import ServerSettings
from gotunnel.server.channel import ServerChannelFactory
from gotunnel.server.registry import TunnelRegistry
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
    """The L{gotunnel.server.vhostports.VirtualHostService}, with --http or --https."""

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

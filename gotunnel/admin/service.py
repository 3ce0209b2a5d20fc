"""
The admin endpoint as a child service of the server: it listens on
startService (on server.admin, any server endpoint string: tcp:, ssl:, ...)
and stops, with every admin connection closed, on stopService.
"""

from __future__ import annotations

from typing import Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from gotunnel.admin.api import AdmissionFactory, adminSite
from gotunnel.admin.auth import AdminAuth
from gotunnel.admin.metrics import MetricsPage

log = Logger()


class AdminService(Service):
    """
    The admin endpoint of the server whose registry is C{registry}.

    C{whenListening} fires with the L{IListeningPort} once it listens.
    """

    name = "admin"
    port: Optional[IListeningPort] = None
    _outcome = None

    def __init__(self, settings, registry, reactor) -> None:
        self.settings = settings
        self.endpoint = serverFromString(reactor, settings.admin)
        self.auth = AdminAuth(settings.admin_token, settings.admin_user, settings.admin_password,
                              reactor, counted=self._countFailure)
        self.registry = registry
        self.factory = AdmissionFactory(adminSite(registry, self.auth,
                                                  MetricsPage(registry, self.auth), reactor))
        self._waiters: list[defer.Deferred] = []

    def _countFailure(self) -> None:
        self.registry.stats.authFailures["admin"] += 1

    def whenListening(self) -> defer.Deferred:
        if self._outcome is not None:
            return defer.succeed(self.port) if self.port else defer.fail(self._outcome)
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def startService(self) -> None:
        super().startService()
        if not self.auth.configured:
            log.warn("the admin endpoint has no credentials (give --admin-token, or "
                     "--admin-user and --admin-password): it answers 401 to every "
                     "/api and /metrics request")
        self.endpoint.listen(self.factory).addCallbacks(self._listening, self._cannotListen)
        if self.port is None and self._outcome is not None:
            # As the control port: twistd and the console scripts refuse to start.
            self._outcome.raiseException()

    def _listening(self, port: IListeningPort) -> None:
        self.port = self._outcome = port
        address = port.getHost()
        log.info("admin endpoint listening on {host}:{port}",
                 host=getattr(address, "host", "?"), port=getattr(address, "port", "?"))
        self._fire(lambda waiter: waiter.callback(port))

    def _cannotListen(self, failure) -> None:
        self._outcome = failure
        self._fire(lambda waiter: waiter.errback(failure))

    def _fire(self, how) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            how(waiter)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        port, self.port = self.port, None
        stopped = defer.maybeDeferred(port.stopListening) if port is not None \
            else defer.succeed(None)
        return stopped.addCallback(lambda _: self.factory.closeAll())

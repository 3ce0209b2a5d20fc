"""
Where a client connects: the local service, and the server (control
channels to its name, data channels to the address their control channel
reached), whose address is reported when it cannot be reached.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, clientFromString,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from gotunnel.config.mappings import clientEndpointString
from gotunnel.config.settings import ClientSettings
from gotunnel.report import SERVER_UNREACHABLE, reportError
from gotunnel.relay.tcpinternals import (
    endpointAddress, endpointBindAddress, endpointHost, endpointPort, endpointTimeout,
)

LOCAL_CONNECT_TIMEOUT = 10


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
            from gotunnel.tls import contexts as tls

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
        from gotunnel.tls.halfclose import HalfCloseableTLSEndpoint

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
    address = endpointAddress(endpoint)
    if address is None:
        return None
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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

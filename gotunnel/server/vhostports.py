"""
The server's virtual-host ports: many web services on one public port, an
HTTP port routed by each request's Host and an HTTPS port routed by the
TLS ClientHello's server name (SNI), without terminating TLS.

A user's connection (L{VirtualHostUser}) is read only as far as its first
request head or its ClientHello, routed by L{gotunnel.server.vhostroutes},
then waits for a data channel and is spliced to it as any user of a public
port, the head (rewritten) first.  One user connection stays on one
client: keep-alive, pipelined requests and WebSocket upgrades go to the
client the first request was routed to.
"""

from __future__ import annotations

from typing import Optional

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, ISSLTransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from gotunnel.wire.framing import describePeer
from gotunnel.server.httphead import (
    MAX_HEAD, BadHead, Head, checkBasicAuth, errorPage, headEnd, hostName, parseHead,
)
from gotunnel.relay.splice import canHalfClose, setNoDelay
from gotunnel.server.publicusers import PublicUser
from gotunnel.server.registry import TunnelRegistry
from gotunnel.server.vhostroutes import MAX_READING_PER_SOURCE, VirtualHostMapping, VirtualHosts
from gotunnel.tls.sni import BadHello, NeedMore, serverName

log = Logger(namespace="gotunnel.vhost")

LINGER = 2.0
"""Seconds a connection answered with an error page stays open for reading,
so that a user still sending does not get a reset instead of the page."""

MAX_DISCARD = 256 * 1024
"""The most bytes read and dropped from a connection answered with an error page."""


class VirtualHostUser(PublicUser):
    """
    A user's connection to a virtual-host port: read until its first
    request head (HTTP) or ClientHello (HTTPS) routes it, then a public
    user of that tunnel, what was read going first.
    """

    tunnel: Optional[VirtualHostMapping] = None  # type: ignore[assignment]
    headCall = None
    lingerCall = None
    answered = False
    discarded = 0
    counted = False
    """Whether this connection counts in L{VirtualHosts.reading}."""

    def __init__(self, hosts: VirtualHosts, scheme: str) -> None:
        self.hosts = hosts
        self.scheme = scheme
        self.buffer = b""

    @property
    def registry(self) -> TunnelRegistry:
        return self.hosts.registry

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        self.peerAddress = describePeer(self.transport)
        self.registry.connections.add(self)
        if not self.hosts.startReading(self.peerHost):
            self._close(f"{MAX_READING_PER_SOURCE} connections from this address are already "
                        "sending their first request")
            return
        self.counted = True
        self.headCall = self.registry.clock.callLater(
            self.registry.settings.vhost_head_timeout, self._headTimedOut)

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            super().dataReceived(data)
        elif self.answered:
            self.discarded += len(data)
            if self.discarded > MAX_DISCARD:
                self.transport.loseConnection()
        else:
            self.buffer += data
            if self.scheme == "http":
                self._readHead()
            else:
                self._readHello()

    @property
    def peerHost(self) -> str:
        return getattr(self.transport.getPeer(), "host", "?")

    def _readHead(self) -> None:
        end = headEnd(self.buffer)
        if end < 0 or end + 4 > MAX_HEAD:
            if len(self.buffer) > MAX_HEAD:
                self._refuse(431, f"a request head longer than {MAX_HEAD} bytes")
            return
        try:
            head = parseHead(self.buffer[:end + 4])
        except BadHead as e:
            self._refuse(e.status, str(e))
            return
        if head.host is None:
            self._refuse(400, "a request without a Host to route by")
            return
        tunnel = self.hosts.route("http", head.host)
        if tunnel is None:
            self._refuse(404, f"no virtual host {head.host}")
            return
        if not tunnel.online:
            self._refuse(503, f"virtual host {head.host} is offline")
            return
        removed: tuple[bytes, ...] = ()
        if tunnel.http_auth is not None:
            if not checkBasicAuth(head, tunnel.http_auth):
                self._refuse(401, f"no valid credentials for {head.host}", (
                    (b"WWW-Authenticate", b'Basic realm="restricted", charset="UTF-8"'),))
                return
            removed = (b"authorization",)
        self._route(tunnel, self._rewrite(head, tunnel, removed) + self.buffer[end + 4:])

    def _rewrite(self, head: Head, tunnel: VirtualHostMapping, removed: tuple[bytes, ...]) -> bytes:
        added = []
        host = None
        if tunnel.host_header_rewrite:
            host = tunnel.host_header_rewrite.encode("ascii", "replace")
            added.append((b"X-Forwarded-Host", b", ".join(head.header(b"host"))))
            removed += (b"x-forwarded-host",)
        if self.registry.settings.vhost_forwarded_headers:
            forwardedFor = head.header(b"x-forwarded-for") + [self.peerHost.encode("ascii")]
            proto = b"https" if ISSLTransport.providedBy(self.transport) else b"http"
            added += [(b"X-Forwarded-For", b", ".join(forwardedFor)),
                      (b"X-Forwarded-Proto", proto)]
            removed += (b"x-forwarded-for", b"x-forwarded-proto")
        return head.rewrite(removed, tuple(added), host)

    def _readHello(self) -> None:
        try:
            name = serverName(self.buffer)
        except NeedMore:
            return
        except BadHello as e:
            self._close(str(e))
            return
        if name is None:
            self._close("a ClientHello without a server name")
            return
        try:
            if ":" in name:
                raise BadHead(400, "a port in a server name")
            name = hostName(name.encode("ascii"))
        except BadHead:
            # Up to 16 KiB, and it is looked up once per label: a host name only.
            self._close("a server name that is not a host name")
            return
        tunnel = self.hosts.route("https", name)
        if tunnel is None or not tunnel.online:
            self._close(f"no virtual host {name}")
            return
        self._route(tunnel, self.buffer)

    def _route(self, tunnel: VirtualHostMapping, first: bytes) -> None:
        self._cancelHeadTimeout()
        self.buffer = b""
        self.tunnel = tunnel
        self.registry.stats.userOpened(self)
        # Held, and counted, as what a user of a public port sends early.
        super().dataReceived(first)
        tunnel.userConnected(self)

    def _cancelHeadTimeout(self) -> None:
        if self.headCall is not None and self.headCall.active():
            self.headCall.cancel()
        self.headCall = None
        if self.counted:
            self.counted = False
            self.hosts.doneReading(self.peerHost)

    def _headTimedOut(self) -> None:
        self.headCall = None
        if self.scheme == "http" and self.buffer:
            self._refuse(408, "no whole request head within "
                              f"{self.registry.settings.vhost_head_timeout:g} s")
        else:
            self._close(f"nothing to route by within "
                        f"{self.registry.settings.vhost_head_timeout:g} s")

    def _close(self, why: str) -> None:
        log.info("closing a connection from {peer} to the {scheme} virtual-host port: {why}",
                 peer=self.peerHost, scheme=self.scheme, why=why)
        self._cancelHeadTimeout()
        self.answered = True
        self.transport.loseConnection()

    def _refuse(self, status: int, why: str,
                extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """
        Answer C{status} and close, after reading on for a moment: a socket
        closed with unread bytes sends a reset, which may reach the user
        before the answer.
        """
        log.info("answered {status} to {peer} on the HTTP virtual-host port: {why}",
                 status=status, peer=self.peerHost, why=why)
        self._cancelHeadTimeout()
        self.answered = True
        self.buffer = b""
        self.transport.write(errorPage(status, extra))
        if canHalfClose(self.transport):
            self.transport.loseWriteConnection()
            self.lingerCall = self.registry.clock.callLater(LINGER, self.transport.loseConnection)
        else:
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        if self.tunnel is not None:
            super().readConnectionLost()
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self._cancelHeadTimeout()
        if self.lingerCall is not None and self.lingerCall.active():
            self.lingerCall.cancel()
        self.lingerCall = None
        if self.tunnel is not None:
            self.registry.stats.userClosed(self, reason)
            self.tunnel.userLost(self)
        self.registry.connections.discard(self)
        self.relayConnectionLost()


class VirtualHostUserFactory(Factory):
    noisy = False

    def __init__(self, hosts: VirtualHosts, scheme: str) -> None:
        self.hosts = hosts
        self.scheme = scheme

    def buildProtocol(self, addr) -> VirtualHostUser:
        return VirtualHostUser(self.hosts, self.scheme)


class VirtualHostService(MultiService):
    """
    The virtual-host ports: listening while the server runs; on stop,
    closed and every domain lease ended.  C{ports} holds the
    L{IListeningPort} of each scheme once it listens.
    """

    def __init__(self, hosts: VirtualHosts, endpoints: dict[str, str], reactor) -> None:
        super().__init__()
        self.hosts = hosts
        self.endpoints = {scheme: serverFromString(reactor, description)
                          for scheme, description in endpoints.items()}
        self.ports: dict[str, IListeningPort] = {}

    def startService(self) -> None:
        super().startService()
        failures = []
        for scheme, endpoint in self.endpoints.items():
            listening = endpoint.listen(VirtualHostUserFactory(self.hosts, scheme))
            listening.addCallbacks(self._listening, failures.append, callbackArgs=(scheme,))
        if failures:
            failures[0].raiseException()

    def _listening(self, port: IListeningPort, scheme: str) -> None:
        self.ports[scheme] = port
        address = port.getHost()
        log.info("{scheme} virtual-host port listening on {host}:{port}", scheme=scheme.upper(),
                 host=getattr(address, "host", "?"), port=getattr(address, "port", "?"))

    def stopService(self) -> defer.Deferred:
        self.hosts.clear()
        ports, self.ports = self.ports, {}
        stopping = [defer.maybeDeferred(super().stopService)]
        stopping += [defer.maybeDeferred(port.stopListening) for port in ports.values()]
        return defer.DeferredList(stopping)

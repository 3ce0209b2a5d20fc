"""
Virtual hosts: many web services on one public port of the server, an
HTTP port routed by each request's Host and an HTTPS port routed by the
TLS ClientHello's server name (SNI), without terminating TLS.

A client registers a mapping with C{vhost} "http" or "https" and the
domains it serves (see docs/protocol.md); L{VirtualHosts} checks that the
client may claim them and routes them to a L{VirtualHostTunnel}, a
L{Tunnel} with domains instead of a port of its own.  A user's connection
(L{VirtualHostUser}) is read only as far as its first request head or its
ClientHello, then waits for a data channel and is spliced to it as any
user of a public port, the head (rewritten) first.  One user connection
stays on one client: keep-alive, pipelined requests and WebSocket upgrades
go to the client the first request was routed to.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort, ISSLTransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from gotunnel.wire import messages
from gotunnel.tls import contexts as tls
from gotunnel.wire.framing import describePeer
from gotunnel.server.httphead import (
    MAX_HEAD, BadHead, Head, checkBasicAuth, errorPage, headEnd, hostName, parseHead,
)
from gotunnel.relay.splice import canHalfClose, setNoDelay
from gotunnel.server.access import RegistrationRefused
from gotunnel.server.mapping import PublishedMapping as Tunnel
from gotunnel.server.publicusers import PublicUser
from gotunnel.server.registry import TunnelRegistry
from gotunnel.tls.sni import BadHello, NeedMore, serverName

log = Logger(namespace="gotunnel.vhost")

SCHEMES = ("http", "https")

LINGER = 2.0
"""Seconds a connection answered with an error page stays open for reading,
so that a user still sending does not get a reset instead of the page."""

MAX_DISCARD = 256 * 1024
"""The most bytes read and dropped from a connection answered with an error page."""

MAX_READING_PER_SOURCE = 64
"""Connections from one address whose head (or ClientHello) is still being read; more
are closed at once, so that one address cannot hold the server's descriptors with
connections that send nothing."""

_LABEL = r"[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"(\*\.)?({_LABEL}\.)*{_LABEL}")
_SUBDOMAIN = re.compile(_LABEL)


def normalDomain(text: str) -> str:
    """
    C{text} as a domain we route: lower-case, no trailing dot, made of
    DNS labels, perhaps starting with C{*.}; ValueError if it is not one.
    """
    domain = text.strip().lower().rstrip(".")
    if not domain or len(domain) > 253 or not _DOMAIN.fullmatch(domain):
        raise ValueError(f"{text!r} is not a domain name (or *.DOMAIN)")
    return domain


def domainMatches(pattern: str, domain: str) -> bool:
    """Whether C{domain} (itself perhaps C{*.x}) is C{pattern} or within a C{*.} pattern."""
    if pattern == domain:
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return domain.endswith(suffix) and len(domain) > len(suffix)
    return False


def vhostLabel(vhost: str, domains: tuple[str, ...]) -> str:
    """How a virtual host's totals are labelled in the metrics: C{http:a.example,b.example}."""
    return f"{vhost}:{','.join(domains)}"


class VirtualHostTunnel(Tunnel):
    """
    A mapping published on a virtual-host port under some domains: no
    listener of its own; L{VirtualHosts} routes users to it while it is
    online (the client's local service is up).
    """

    def __init__(self, hosts: "VirtualHosts", channel, register: messages.Register,
                 domains: tuple[str, ...]) -> None:
        self.vhost = register.vhost
        self.domains = domains
        super().__init__(hosts.registry, channel, register)
        self.hosts = hosts
        self.http_auth = register.http_auth
        self.host_header_rewrite = register.host_header_rewrite

    def __repr__(self) -> str:
        return f"<VirtualHostTunnel {self.name!r} {self.vhost} {','.join(self.domains)}>"

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        return (self.vhost, self.domains)

    @property
    def mappingName(self) -> str:
        return f"{self.vhost} virtual host {','.join(self.domains)}"

    @property
    def statsPort(self) -> str:
        # Its own totals and metric labels: all virtual hosts have port 0.
        return vhostLabel(self.vhost, self.domains)

    def listen(self) -> defer.Deferred:
        self.online = True
        return defer.succeed(None)

    def stopListening(self) -> defer.Deferred:
        self.online = False
        return defer.succeed(None)

    def checkAllowed(self, name: str) -> None:
        self.hosts.checkAllowed(name, self.domains)

    def dropped(self) -> None:
        self.hosts.reserve(self, self.registry.settings.port_lease)
        self.close()

    def close(self) -> defer.Deferred:
        self.hosts.release(self)
        return super().close()


class DomainLease:
    """A domain held for the client name that had it, until C{expiry}."""

    def __init__(self, name: str, expiry: IDelayedCall) -> None:
        self.name = name
        self.expiry = expiry


class VirtualHosts:
    """
    Which client serves which domain, on which scheme; who may claim a
    domain; and the leases of domains whose client went away.
    """

    def __init__(self, registry: TunnelRegistry, schemes: tuple[str, ...]) -> None:
        self.registry = registry
        self.schemes = schemes
        self.routes: dict[tuple[str, str], VirtualHostTunnel] = {}
        self.leases: dict[str, DomainLease] = {}
        self.reading: dict[str, int] = {}
        """Connections whose head is being read, per source address."""

    def startReading(self, host: str) -> bool:
        """Count a new connection from C{host}; False if it has too many already."""
        count = self.reading.get(host, 0)
        if count >= MAX_READING_PER_SOURCE:
            return False
        self.reading[host] = count + 1
        return True

    def doneReading(self, host: str) -> None:
        count = self.reading.pop(host, 0) - 1
        if count > 0:
            self.reading[host] = count

    @property
    def settings(self):
        return self.registry.settings

    def claimedDomains(self, msg) -> tuple[str, ...]:
        """
        The domains C{msg} (a register, or a pooled data channel) asks for,
        normalized; L{RegistrationRefused} if bad.
        """
        domains = []
        for text in msg.domains or ():
            try:
                domains.append(normalDomain(text))
            except ValueError as e:
                raise RegistrationRefused(str(e)) from None
        if msg.subdomain is not None:
            subdomain = msg.subdomain.strip().lower()
            if not self.settings.subdomain_host:
                raise RegistrationRefused("this server has no subdomain_host: ask for domains")
            if not _SUBDOMAIN.fullmatch(subdomain):
                raise RegistrationRefused(f"subdomain {msg.subdomain!r} is not one DNS label")
            domains.append(f"{subdomain}.{self.settings.subdomain_host}")
        if not domains:
            raise RegistrationRefused("a virtual host needs domains or a subdomain")
        return tuple(sorted(set(domains)))

    def checkAllowed(self, name: str, domains: tuple[str, ...]) -> None:
        """
        Refuse a domain C{name} may not claim: a listed client's own
        domains, any name under subdomain_host, or, with neither configured
        on this server, any domain.
        """
        settings = self.settings
        client = settings.clients.get(name)
        own = client.domains if client is not None else ()
        restricted = bool(settings.subdomain_host) or any(
            policy.domains for policy in settings.clients.values())
        for domain in domains:
            if any(domainMatches(pattern, domain) for pattern in own):
                continue
            if settings.subdomain_host:
                label, _, parent = domain.partition(".")
                if parent == settings.subdomain_host and _SUBDOMAIN.fullmatch(label):
                    continue
            if restricted:
                raise RegistrationRefused(f"domain {domain} is not allowed for client {name!r}")

    def register(self, channel, msg: messages.Register) -> defer.Deferred:
        """
        Route C{msg}'s domains to a new L{VirtualHostTunnel} for C{channel}.

        @return: a Deferred that fires with the tunnel, or fails with
            L{RegistrationRefused}.
        """
        registry = self.registry
        try:
            name = registry.authenticate(msg.name, msg.token, tls.peerCommonName(channel.transport))
            if name != msg.name:
                msg = dataclasses.replace(msg, name=name)
            if msg.protocol not in ("tcp", ""):
                raise RegistrationRefused(f"protocol {msg.protocol!r} is not supported, only tcp")
            if msg.vhost not in self.schemes:
                raise RegistrationRefused(
                    f"this server has no {msg.vhost.upper()} virtual hosts")
            domains = self.claimedDomains(msg)
            self.checkAllowed(name, domains)
            previous = self._previous(name, domains, msg.vhost)
            held = sum(1 for tunnel in registry.tunnels.values()
                       if tunnel.name == name and tunnel not in previous)
            limit = registry.mappingLimit(name)
            if held >= limit:
                raise RegistrationRefused(
                    f"too many mappings for client {name!r}: it may hold {limit} at once")
        except RegistrationRefused as e:
            return defer.fail(e)
        for tunnel in previous:
            log.info("client {name} registered {domains} again; dropping its previous "
                     "control channel", name=name, domains=",".join(tunnel.domains))
            tunnel.close()
            tunnel.channel.transport.loseConnection()
        for domain in domains:
            lease = self.leases.pop(domain, None)
            if lease is not None and lease.expiry.active():
                lease.expiry.cancel()
        tunnel = VirtualHostTunnel(self, channel, msg, domains)
        registry.tunnels[tunnel.key] = tunnel
        for domain in domains:
            self.routes[(tunnel.vhost, domain)] = tunnel
        log.info("{vhost} virtual host {domains} routed to {name}", vhost=tunnel.vhost,
                 domains=",".join(domains), name=name)
        return tunnel.listen().addCallback(lambda _: tunnel)

    def _previous(self, name: str, domains: tuple[str, ...],
                  vhost: str) -> set[VirtualHostTunnel]:
        """
        The tunnels of C{name} that hold some of C{domains} on C{vhost} (a
        client registering again); L{RegistrationRefused} if another client
        holds one, on either scheme, or its lease.
        """
        previous = set()
        for domain in domains:
            lease = self.leases.get(domain)
            if lease is not None and lease.name != name:
                remaining = max(lease.expiry.getTime() - self.registry.clock.seconds(), 0.0)
                raise RegistrationRefused(
                    f"domain {domain} is reserved for the client that had it, "
                    f"for {remaining:.0f} s more")
            for scheme in SCHEMES:
                tunnel = self.routes.get((scheme, domain))
                if tunnel is None:
                    continue
                if tunnel.name != name:
                    raise RegistrationRefused(f"domain {domain} is already taken by another client")
                if scheme == vhost:
                    previous.add(tunnel)
        return previous

    def mappingOf(self, msg: messages.DataChannel) -> Optional[VirtualHostTunnel]:
        """The virtual host a pooled data channel names, as its register did; or None."""
        try:
            domains = self.claimedDomains(msg)
        except RegistrationRefused:
            return None
        return self.registry.tunnels.get((msg.vhost, domains))

    def route(self, scheme: str, host: str) -> Optional[VirtualHostTunnel]:
        """The tunnel serving C{host}: its own domain, else the closest C{*.} domain."""
        tunnel = self.routes.get((scheme, host))
        if tunnel is not None:
            return tunnel
        labels = host.split(".")
        for i in range(1, len(labels)):
            tunnel = self.routes.get((scheme, "*." + ".".join(labels[i:])))
            if tunnel is not None:
                return tunnel
        return None

    def release(self, tunnel: VirtualHostTunnel) -> None:
        """Stop routing C{tunnel}'s domains to it."""
        for domain in tunnel.domains:
            if self.routes.get((tunnel.vhost, domain)) is tunnel:
                del self.routes[(tunnel.vhost, domain)]

    def reserve(self, tunnel: VirtualHostTunnel, duration: float) -> None:
        """Hold C{tunnel}'s domains for its client for C{duration} seconds (0: not at all)."""
        if duration <= 0:
            return
        for domain in tunnel.domains:
            old = self.leases.pop(domain, None)
            if old is not None and old.expiry.active():
                old.expiry.cancel()
            expiry = self.registry.clock.callLater(duration, self._expired, domain)
            self.leases[domain] = DomainLease(tunnel.name, expiry)
        log.info("domains {domains} reserved for {name} for {seconds:g} s",
                 domains=",".join(tunnel.domains), name=tunnel.name, seconds=duration)

    def _expired(self, domain: str) -> None:
        lease = self.leases.pop(domain)
        log.info("lease of domain {domain} for {name} expired", domain=domain, name=lease.name)

    def clear(self) -> None:
        """End every lease (the server is stopping)."""
        leases, self.leases = self.leases, {}
        for lease in leases.values():
            if lease.expiry.active():
                lease.expiry.cancel()


class VirtualHostUser(PublicUser):
    """
    A user's connection to a virtual-host port: read until its first
    request head (HTTP) or ClientHello (HTTPS) routes it, then a public
    user of that tunnel, what was read going first.
    """

    tunnel: Optional[VirtualHostTunnel] = None  # type: ignore[assignment]
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

    def _rewrite(self, head: Head, tunnel: VirtualHostTunnel, removed: tuple[bytes, ...]) -> bytes:
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

    def _route(self, tunnel: VirtualHostTunnel, first: bytes) -> None:
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

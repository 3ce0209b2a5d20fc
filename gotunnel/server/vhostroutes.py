"""
Virtual hosts' routing table: which mapping serves which domain on the
server's HTTP and HTTPS virtual-host ports, who may claim a domain, and the
leases of domains whose client went away.

A client registers a mapping with C{vhost} "http" or "https" and the
domains it serves (see docs/protocol.md); L{VirtualHosts} checks that the
client may claim them and routes them to a L{VirtualHostMapping}, a
published mapping with domains instead of a port of its own.  The ports
themselves, and what they read of a user's connection to route it, are in
L{gotunnel.server.vhostports}.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from gotunnel.wire import messages
from gotunnel.tls import contexts as tls
from gotunnel.server.access import RegistrationRefused
from gotunnel.server.mapping import PublishedMapping
from gotunnel.server.registry import TunnelRegistry

log = Logger(namespace="gotunnel.vhost")

SCHEMES = ("http", "https")

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


class VirtualHostMapping(PublishedMapping):
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
        return f"<VirtualHostMapping {self.name!r} {self.vhost} {','.join(self.domains)}>"

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
        self.routes: dict[tuple[str, str], VirtualHostMapping] = {}
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
        Route C{msg}'s domains to a new L{VirtualHostMapping} for C{channel}.

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
        tunnel = VirtualHostMapping(self, channel, msg, domains)
        registry.tunnels[tunnel.key] = tunnel
        for domain in domains:
            self.routes[(tunnel.vhost, domain)] = tunnel
        log.info("{vhost} virtual host {domains} routed to {name}", vhost=tunnel.vhost,
                 domains=",".join(domains), name=name)
        return tunnel.listen().addCallback(lambda _: tunnel)

    def _previous(self, name: str, domains: tuple[str, ...],
                  vhost: str) -> set[VirtualHostMapping]:
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

    def mappingOf(self, msg: messages.DataChannel) -> Optional[VirtualHostMapping]:
        """The virtual host a pooled data channel names, as its register did; or None."""
        try:
            domains = self.claimedDomains(msg)
        except RegistrationRefused:
            return None
        return self.registry.tunnels.get((msg.vhost, domains))

    def route(self, scheme: str, host: str) -> Optional[VirtualHostMapping]:
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

    def release(self, tunnel: VirtualHostMapping) -> None:
        """Stop routing C{tunnel}'s domains to it."""
        for domain in tunnel.domains:
            if self.routes.get((tunnel.vhost, domain)) is tunnel:
                del self.routes[(tunnel.vhost, domain)]

    def reserve(self, tunnel: VirtualHostMapping, duration: float) -> None:
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

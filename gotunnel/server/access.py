"""
Who may do what on the server: which name a client is, which ports it may
publish and how many, which users and data channels its mappings take.

Pure functions of the settings and the request, with no I/O and no state
beyond their arguments, so that each rule reads (and is tested) on its
own; L{gotunnel.server.registry.TunnelRegistry} asks them and acts on the answer.
A refusal is raised as L{RegistrationRefused}, whose message is the reason
sent back to the client.
"""

from __future__ import annotations

import hmac
from typing import NamedTuple, Optional

from gotunnel.wire import messages
from gotunnel.config.settings import ServerSettings
from gotunnel.server.portpolicy import SourcePolicy, narrowest, parseNetwork


class RegistrationRefused(Exception):
    """The server will not do what a client asked; the message is the reason sent back."""


def tokensMatch(given: str, expected: str) -> bool:
    """Compare tokens in constant time."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def authenticate(settings: ServerSettings, name: str, token: str,
                 certificateName: Optional[str]) -> str:
    """
    The client's name once its token (and certificate, with mutual TLS)
    is checked: a client listed in C{settings.clients} needs its own
    token, any other the shared one, if the server has one.  With a
    client certificate, its common name is the client's name.

    @raise RegistrationRefused: why not.
    """
    if certificateName is not None:
        if not name:
            name = certificateName
        elif name != certificateName:
            raise RegistrationRefused(
                f"client name {name!r} is not the name in the client's certificate "
                f"({certificateName!r})")
    client = settings.clients.get(name)
    expected = client.token if client is not None else settings.token
    if not expected or not tokensMatch(token, expected):
        raise RegistrationRefused("authentication failed")
    return name


def ownsItsName(settings: ServerSettings, name: str) -> bool:
    """Whether C{name} can be held by one client only: a listed one, or with mutual TLS."""
    return name in settings.clients or bool(settings.tls_client_ca)


def holderOf(settings: ServerSettings, name: str) -> Optional[str]:
    """
    Who holds what is registered under C{name}: the name itself when
    only one client can hold it (see L{ownsItsName}), or None for the
    shared token, which every holder of it shares.
    """
    return name if ownsItsName(settings, name) else None


def sameHolder(settings: ServerSettings, name: str, owner: str) -> bool:
    """
    Whether a data channel authenticated as C{name} may serve a mapping
    registered by C{owner}: a shared-token mapping is served by the shared
    token whatever the name (a Go client's data channel is matched by token
    alone); a listed client's token is not the shared one.
    """
    return holderOf(settings, owner) == holderOf(settings, name)


def mappingLimit(settings: ServerSettings, name: str) -> int:
    """How many mappings C{name} may hold at once."""
    client = settings.clients.get(name)
    if client is not None and client.max_mappings is not None:
        return client.max_mappings
    return settings.max_mappings_per_client


def checkMappingCount(settings: ServerSettings, name: str, held: int) -> None:
    """Refuse one more mapping for C{name}, which holds C{held} others."""
    limit = mappingLimit(settings, name)
    if held >= limit:
        raise RegistrationRefused(
            f"too many mappings for client {name!r}: it may hold {limit} at once")


def allowedPorts(settings: ServerSettings, name: str) -> tuple[range, ...]:
    """The ports C{name} may publish; empty: any."""
    client = settings.clients.get(name)
    if client is not None and client.allow_ports:
        return client.allow_ports
    return settings.allow_ports


def checkPort(settings: ServerSettings, name: str, remote_port: int) -> None:
    """Refuse a port outside what C{name} may publish."""
    client = settings.clients.get(name)
    allowed = allowedPorts(settings, name)
    if allowed and not any(remote_port in ports for ports in allowed):
        where = f"for client {name!r}" if client is not None and client.allow_ports \
            else "on this server"
        raise RegistrationRefused(f"remote port {remote_port} is not allowed {where}")


def isUdp(settings: ServerSettings, msg: messages.Register) -> bool:
    """
    Whether C{msg} (a register for a port, not a virtual host) is for a
    UDP mapping rather than a TCP one.

    @raise RegistrationRefused: a protocol this server does not serve, a
        port out of range, or what only TCP mappings do asked of UDP.
    """
    udp = msg.protocol == "udp" and settings.udp
    if not udp and msg.protocol not in ("tcp", ""):
        raise RegistrationRefused(f"protocol {msg.protocol!r} is not supported, only tcp")
    if not 0 <= msg.remote_port <= 65535:
        raise RegistrationRefused(f"remote port {msg.remote_port} is not from 0 to 65535")
    if udp and msg.remote_port == 0:
        raise RegistrationRefused("a UDP mapping needs a remote_port of its own (0 is for TCP)")
    if udp and msg.group:
        raise RegistrationRefused("groups are for TCP mappings, not UDP")
    return udp


def serverSources(settings: ServerSettings, name: str) -> tuple[SourcePolicy, ...]:
    """
    The server's source policies for the mappings of C{name}: a listed
    client's own allow list instead of server.allow_sources, its deny list
    as well as server.deny_sources.
    """
    allow, deny = settings.allow_sources, settings.deny_sources
    client = settings.clients.get(name)
    if client is not None:
        allow = client.allow_sources or allow
        deny = tuple(deny) + tuple(client.deny_sources)
    policy = SourcePolicy.of(allow, deny)
    return (policy,) if policy else ()


def askedSources(msg: messages.Register) -> tuple[SourcePolicy, ...]:
    """
    The source policy a client asks for in its C{register}, which can only
    narrow the server's.

    @raise RegistrationRefused: the client's lists are not networks.
    """
    if not (msg.allow_sources or msg.deny_sources):
        return ()
    try:
        asked = SourcePolicy.of(
            [parseNetwork(text, "register.allow_sources") for text in msg.allow_sources or ()],
            [parseNetwork(text, "register.deny_sources") for text in msg.deny_sources or ()])
    except ValueError as e:
        raise RegistrationRefused(str(e)) from None
    return (asked,)


class UserLimits(NamedTuple):
    """What a mapping holds its users to; 0 is no limit."""

    max_users: int
    connection_rate: float
    bandwidth: float


def userLimits(settings: ServerSettings, msg: messages.Register) -> UserLimits:
    """
    The limits on the users of the mapping C{msg} registers: the stricter
    of the server's (or a listed client's), and what the client asked for.
    """
    client = settings.clients.get(msg.name)
    return UserLimits(
        int(narrowest(settings.max_users_per_port, client and client.max_users_per_port,
                      msg.max_users)),
        narrowest(settings.max_connection_rate, client and client.max_connection_rate,
                  msg.max_connection_rate),
        narrowest(settings.bandwidth_limit, client and client.bandwidth_limit,
                  msg.bandwidth_limit))

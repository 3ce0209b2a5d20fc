"""
What a client publishes: L{Mapping}, read from --map, --http and --https
(L{parseMapping}, L{parseVirtualHost}) or from a config file's tunnels
entries (L{readTunnelEntry}); and the client's endpoint strings with an IPv6
host in brackets (L{clientEndpointString}).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from gotunnel.config.kinds import (
    BANDWIDTH, COUNT_OR_ZERO, DOMAINS, PORT, PROTOCOL, PROXY_PROTOCOL, RATE, REMOTE_PORT,
    REQUESTED_NETWORKS, SUBDOMAIN, TEXT, VHOST_TYPE, parsePort, quoteEndpointArgument,
)
from gotunnel.config.spec import readEntry


@dataclass(frozen=True)
class Mapping:
    """
    One published service: LOCAL_HOST:LOCAL_PORT reachable on REMOTE_PORT,
    or, with C{vhost}, on the server's HTTP or HTTPS virtual-host port
    under C{domains} or C{subdomain} (REMOTE_PORT 0).
    """

    local_host: str
    local_port: int
    remote_port: int
    protocol: str = "tcp"
    """"tcp", or "udp" (see gotunnel.udp.tunnels)."""
    vhost: str = ""
    """"http", "https", or empty for a port of its own."""
    domains: tuple[str, ...] = ()
    subdomain: str = ""
    http_auth: str = field(default="", repr=False)
    """USER:PASSWORD the server asks users for ("http" only)."""
    host_header_rewrite: str = ""
    proxy_protocol: Optional[str] = None
    """"v1" or "v2": the PROXY protocol header goes first on every local connection."""
    allow_sources: tuple[str, ...] = ()
    """Networks asked of the server as the only ones its users may come from."""
    deny_sources: tuple[str, ...] = ()
    """Networks asked of the server as ones its users may not come from."""
    max_users: int = 0
    """Users at once asked of the server (it keeps its own limit if stricter)."""
    max_connection_rate: float = 0.0
    """New connections a second per source asked of the server (likewise)."""
    bandwidth_limit: int = 0
    """Bytes a second each way asked of the server (likewise)."""
    group: str = ""
    """Serve remote_port together with other clients of this group (see groups.py)."""
    group_key: str = field(default="", repr=False)
    """The group's secret."""

    def __str__(self) -> str:
        host = f"[{self.local_host}]" if ":" in self.local_host else self.local_host
        if self.vhost:
            names = ",".join(self.domains + ((f"{self.subdomain}.*",) if self.subdomain else ()))
            return f"{host}:{self.local_port}->{self.vhost}://{names}"
        prefix = "udp:" if self.protocol == "udp" else ""
        return f"{prefix}{host}:{self.local_port}->{self.remote_port}"


def parseVirtualHost(text: str, vhost: str) -> Mapping:
    """
    Parse C{DOMAIN[,DOMAIN...]=[LOCALHOST:]LOCALPORT} (--http, --https); a
    DOMAIN without a dot is a subdomain of the server's subdomain_host.
    """
    names, equals, target = text.partition("=")
    option = f"--{vhost}"
    if not equals or not names:
        raise ValueError(f"bad {option} {text!r}: expected DOMAIN=[LOCALHOST:]LOCALPORT, "
                         f"e.g. www.example.com=8080")
    host, colon, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon:
        host = "127.0.0.1"
    if not host:
        raise ValueError(f"bad {option} {text!r}: the local host is empty")
    domains: list[str] = []
    subdomain = ""
    for name in names.split(","):
        name = name.strip().lower()
        if "." in name:
            domains.append(name)
        elif subdomain or not name:
            raise ValueError(f"bad {option} {text!r}: at most one subdomain (a name without "
                             f"a dot), and no empty name")
        else:
            subdomain = name
    return Mapping(host, parsePort(port, f"local port in {text!r}"), 0, vhost=vhost,
                   domains=tuple(domains), subdomain=subdomain)


_TUNNEL_KEYS = {"local_host": TEXT.read, "local_port": PORT.read,
                "remote_port": REMOTE_PORT.read, "protocol": PROTOCOL.read,
                "type": VHOST_TYPE.read, "domains": DOMAINS.read, "subdomain": SUBDOMAIN.read,
                "http_user": TEXT.read, "http_password": TEXT.read,
                "host_header_rewrite": TEXT.read, "proxy_protocol": PROXY_PROTOCOL.read,
                "allow_sources": REQUESTED_NETWORKS.read,
                "deny_sources": REQUESTED_NETWORKS.read, "max_users": COUNT_OR_ZERO.read,
                "max_connection_rate": RATE.read, "bandwidth_limit": BANDWIDTH.read,
                "group": TEXT.read, "group_key": TEXT.read}


def readTunnelEntry(value: Any, text: Any, name: str) -> Mapping:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping with local_port and remote_port, "
                         f"got {value!r}")
    fields = {"local_host": "127.0.0.1", **readEntry(value, text, _TUNNEL_KEYS, name)}
    kind = fields.pop("type", "tcp")
    user, password = fields.pop("http_user", None), fields.pop("http_password", None)
    if kind != "tcp":
        if "remote_port" in fields:
            raise ValueError(f"{name}.remote_port is not for type {kind}: it is published on "
                             f"the server's {kind.upper()} virtual-host port")
        if not fields.get("domains") and not fields.get("subdomain"):
            raise ValueError(f"{name} of type {kind} needs domains or a subdomain")
        if (user is None) != (password is None):
            raise ValueError(f"{name}: http_user and http_password go together")
        if user is not None:
            if kind != "http" or ":" in user:
                raise ValueError(f"{name}.http_user: basic auth is for type http, "
                                 f"with a user name without ':'")
            fields["http_auth"] = f"{user}:{password}"
        if "local_port" not in fields:
            raise ValueError(f"{name}.local_port is missing")
        if fields.get("group"):
            raise ValueError(f"{name}: a group needs a remote_port of its own, not a virtual host")
        return Mapping(remote_port=0, vhost=kind, **fields)
    for key in ("domains", "subdomain", "host_header_rewrite"):
        if key in fields or user is not None or password is not None:
            raise ValueError(f"{name}: {key if key in fields else 'http_user'} needs "
                             f"type: http or https")
    for key in ("local_port", "remote_port"):
        if key not in fields:
            raise ValueError(f"{name}.{key} is missing")
    if not fields["local_host"]:
        raise ValueError(f"{name}.local_host must not be empty")
    if bool(fields.get("group")) != bool(fields.get("group_key")):
        raise ValueError(f"{name}: group and group_key go together")
    if fields.get("group") and fields["remote_port"] == 0:
        raise ValueError(f"{name}: a group needs a remote_port of its own, not 0")
    if fields.get("protocol") == "udp" and fields.get("proxy_protocol"):
        raise ValueError(f"{name}.proxy_protocol is for TCP tunnels, not udp")
    if fields.get("protocol") == "udp" and fields["remote_port"] == 0:
        raise ValueError(f"{name}: a udp tunnel needs a remote_port of its own; only TCP "
                         f"ports can be chosen by the server (remote_port 0)")
    return Mapping(**fields)


def parseMapping(text: str) -> Mapping:
    """
    Parse C{[udp:|tcp:][LOCALHOST:]LOCALPORT:REMOTEPORT}; an IPv6 host goes
    in brackets (C{[::1]:22:10022}).  The local host defaults to 127.0.0.1.
    """
    for protocol in ("udp", "tcp"):
        if text.startswith(protocol + ":"):
            mapping = parseMapping(text[len(protocol) + 1:])
            if protocol == "udp" and mapping.remote_port == 0:
                raise ValueError(f"bad mapping {text!r}: a UDP mapping needs a remote port of "
                                 f"its own; only TCP ports can be chosen by the server (0)")
            return Mapping(mapping.local_host, mapping.local_port, mapping.remote_port,
                           protocol)
    host = "127.0.0.1"
    rest = text
    if text.startswith("["):
        end = text.find("]:")
        if end < 0:
            raise ValueError(f"bad mapping {text!r}: expected [HOST]:LOCALPORT:REMOTEPORT")
        host, rest = text[1:end], text[end + 2:]
    parts = rest.split(":")
    if len(parts) == 3 and not text.startswith("["):
        host, parts = parts[0], parts[1:]
    if len(parts) != 2 or not host:
        raise ValueError(
            f"bad mapping {text!r}: expected [LOCALHOST:]LOCALPORT:REMOTEPORT, e.g. 22:10022")
    if host.isdigit():
        # 8000:18000:1 is a port too many, not a host named "8000".
        raise ValueError(
            f"bad mapping {text!r}: the host {host!r} is a number; expected "
            f"[LOCALHOST:]LOCALPORT:REMOTEPORT, e.g. 22:10022 or 192.168.1.5:22:10022")
    return Mapping(host, parsePort(parts[0], f"local port in {text!r}"),
                   parsePort(parts[1], f"remote port in {text!r}", lowest=0))


def clientEndpointString(description: str) -> str:
    """
    C{description} with an IPv6 host in brackets after tcp: (C{tcp:[::1]:17000})
    written as Twisted's endpoint strings spell it (C{tcp:\\:\\:1:17000}); any
    other string unchanged, for Twisted's parser to take or refuse.
    """
    scheme, _, rest = description.partition(":")
    end = rest.find("]")
    if scheme != "tcp" or not rest.startswith("[") or rest[end + 1:end + 2] not in ("", ":"):
        return description
    return f"tcp:{quoteEndpointArgument(rest[1:end])}{rest[end + 1:]}"

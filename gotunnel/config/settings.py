"""
Settings of the server and the client: one typed object each, built at the
edge from config.yaml (the Go gotunnel's keys, plus a few of ours) and
command-line options.  Each setting is declared once, on its field (see
gotunnel.config.spec): the config file's keys and the command-line options
(gotunnel.cli.tap) are made from the declarations.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any, Callable, NoReturn, Optional

from twisted.python import usage

from gotunnel.config.kinds import (
    BANDWIDTH, BUSY_POLL, CONNECTION_LOG, COUNT, COUNT_OR_ZERO, DOMAIN, DOMAINS, FLAG,
    IPV6_PREFIX, LISTEN_ADDRESS, LOG_LANG, LOG_LEVEL, NETWORKS, PORT, PORT_RANGES,
    PROTOCOL, PROXY_PROTOCOL, RATE, REMOTE_PORT, REQUESTED_NETWORKS, SECONDS,
    SECONDS_OR_ZERO, SERVER_ADDRESS, SUBDOMAIN, TEXT, VHOST_TYPE, Kind, listOf, parsePort,
    quoteEndpointArgument,
)
from gotunnel.config.spec import setting, yamlKeys

DEFAULT_CONTROL_PORT = 17000
DEFAULT_REMOTE_PORT = 10022
CONFIG_FILE = "config.yaml"
DEFAULT_BUSY_POLL = 250
"""Microseconds the splice thread polls for a socket's answer: longer than a
service on the same machine, or a hop on a local network, takes to answer."""


# Settings both programs have, declared once for both.


def _zeroCopy() -> Any:
    return setting(True, FLAG, option="no-zero-copy",
                   help="Move relayed bytes through Python instead of with os.splice")


def _spliceThread() -> Any:
    return setting(True, FLAG, option="no-splice-thread",
                   help="Run the splices in the reactor's thread instead of a thread of their "
                        "own")


def _busyPoll() -> Any:
    return setting(DEFAULT_BUSY_POLL, BUSY_POLL, option="busy-poll",
                   help="Microseconds the splice thread polls for a socket's answer before it "
                        "sleeps, for sockets that answered that fast the last time; 0 never "
                        "polls")


def _udpSessionTimeout() -> Any:
    return setting(60.0, SECONDS, option="udp-session-timeout",
                   help="Seconds a UDP mapping keeps a remote peer's session after its last "
                        "datagram")


def _udpMaxSessions() -> Any:
    return setting(1024, COUNT, option="udp-max-sessions",
                   help="Remote peers one UDP mapping serves at once; new peers' datagrams "
                        "beyond are dropped")


def _connectionLog() -> Any:
    return setting("info", CONNECTION_LOG, option="connection-log",
                   help="The level of the line logged for each user connection that ends, "
                        "with its bytes, duration and how it ended, or off")


def _logLevel() -> Any:
    return setting("info", LOG_LEVEL, option="log-level",
                   help="Log events at this level and above")


def _logLang() -> Any:
    return setting("en", LOG_LANG, option="log-lang", help="Language of log messages")


@dataclass(frozen=True)
class ClientPolicy:
    """What one client listed in server.clients may do (its keys there: its fields)."""

    token: str = setting(kind=TEXT)
    allow_ports: tuple[range, ...] = setting((), PORT_RANGES)
    """Empty: server.allow_ports applies."""
    max_mappings: Optional[int] = setting(None, COUNT)
    """None: server.max_mappings_per_client applies."""
    domains: tuple[str, ...] = setting((), DOMAINS)
    """Domains (and *.DOMAIN patterns) it may claim on the virtual-host ports."""
    allow_sources: tuple = setting((), NETWORKS)
    """Empty: server.allow_sources applies to this client's ports."""
    deny_sources: tuple = setting((), NETWORKS)
    """Denied on this client's ports, as well as server.deny_sources."""
    max_users_per_port: int = setting(0, COUNT_OR_ZERO)
    """0: server.max_users_per_port applies; else the stricter of the two."""
    max_connection_rate: float = setting(0.0, RATE)
    """0: server.max_connection_rate applies; else the stricter of the two."""
    bandwidth_limit: int = setting(0, BANDWIDTH)
    """0: server.bandwidth_limit applies; else the stricter of the two."""


_CLIENT_POLICY_KEYS = yamlKeys(ClientPolicy)


def _clients(value: Any, text: Any, name: str) -> dict[str, ClientPolicy]:
    """server.clients: NAME -> {token, allow_ports, max_mappings}."""
    if not isinstance(value, dict):
        raise ValueError(f"{name} must map client names to {{token: ..., allow_ports: ..., "
                         f"max_mappings: ...}}, got {value!r}")
    texts = text if isinstance(text, dict) and len(text) == len(value) else {}
    clients = {}
    for (client, entry), clientText in zip(value.items(), list(texts) or [None] * len(value)):
        clientName = TEXT.read(client, clientText, f"a client name in {name}")
        where = f"{name}.{clientName}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping with a token, got {entry!r}")
        entryTexts = texts.get(clientText)
        entryTexts = entryTexts if isinstance(entryTexts, dict) else {}
        fields = {}
        for key, item in entry.items():
            if key not in _CLIENT_POLICY_KEYS:
                raise ValueError(f"{where}.{key} is not a known key "
                                 f"(expected {', '.join(_CLIENT_POLICY_KEYS)})")
            if item is not None:
                fields[key] = _CLIENT_POLICY_KEYS[key](item, entryTexts.get(key), f"{where}.{key}")
        if not fields.get("token"):
            raise ValueError(f"{where}.token is missing: every listed client needs its own token")
        clients[clientName] = ClientPolicy(**fields)
    return clients


@dataclass
class ServerSettings:
    listen: str = setting(f"tcp:{DEFAULT_CONTROL_PORT}", TEXT, option="listen", short="l",
                          aliases={"addr": LISTEN_ADDRESS},
                          help="Control endpoint clients connect to (a Twisted endpoint "
                               "string, e.g. tcp:17000 or "
                               "ssl:17000:privateKey=key.pem:certKey=cert.pem)")
    token: str = setting("", TEXT, option="token", short="t", shown="required",
                         help="Shared secret clients must present")
    public_interface: str = setting("0.0.0.0", TEXT, option="public-interface",
                                    help="Address the public ports listen on (:: for IPv6 "
                                         "and IPv4)")
    public_backlog: int = 1024
    control_backlog: int = 1024
    """The control listener's, unless C{listen} sets backlog=: data channels come in bursts."""
    data_channel_timeout: float = setting(60.0, SECONDS, option="data-timeout",
                                          help="Seconds a user waits for the client's data "
                                               "channel before being closed")
    heartbeat_timeout: float = setting(30.0, SECONDS, option="heartbeat-timeout",
                                       help="Seconds of silence after which a client is "
                                            "dropped")
    port_lease: float = setting(30.0, SECONDS_OR_ZERO, option="port-lease",
                                help="Seconds a client whose control channel went keeps its "
                                     "public ports reserved for it; 0 frees them at once")
    """Seconds a dropped client's public ports stay reserved for it (0: not at all)."""
    heartbeat_check_interval: float = 5.0
    first_frame_timeout: float = 10.0
    max_pending_per_source: int = 16
    max_pending_total: int = 1024
    ipv6_prefix: int = setting(64, IPV6_PREFIX, option="ipv6-prefix",
                               help="IPv6 clients in one network of this prefix length count "
                                    "as one address in the caps on connections waiting for "
                                    "their first frame")
    """IPv6 sources in one network of this prefix length count as one address in the caps."""
    max_waiting_users: int = 4096
    auth_failure_delay_max: float = 5.0
    shutdown_timeout: float = 10.0
    allow_ports: tuple[range, ...] = setting((), PORT_RANGES)
    """Remote ports clients may register; empty: any port."""
    clients: dict[str, ClientPolicy] = setting(default_factory=dict, kind=Kind(_clients))
    """Clients with a token and limits of their own, by name."""
    allow_sources: tuple = setting((), NETWORKS)
    """Networks users of a public port may come from; empty: any (see portpolicy.py)."""
    deny_sources: tuple = setting((), NETWORKS)
    """Networks users of a public port may not come from."""
    max_users_per_port: int = setting(0, COUNT_OR_ZERO, option="max-users-per-port",
                                      help="Users connected at once to one public port; more "
                                           "are refused at accept, 0 for no limit")
    """Users connected at once to one public port; more are refused (0: no limit)."""
    max_connection_rate: float = setting(0.0, RATE, option="max-connection-rate",
                                         help="New connections a second one source address "
                                              "may open to one public port; more are refused "
                                              "at accept, 0 for no limit")
    """New connections a second one source address may open to one public
    port; more are refused (0: no limit)."""
    bandwidth_limit: int = setting(0, BANDWIDTH, option="bandwidth-limit",
                                   help="Bytes a second each mapping may carry each way, e.g. "
                                        "10MB or 512KiB; 0 for no cap")
    """Bytes a second each mapping may carry each way (0: no cap)."""
    max_mappings_per_client: int = setting(16, COUNT, option="max-mappings-per-client",
                                           help="Mappings one client name may hold at once")
    """Mappings one client name may hold at once."""
    max_pool_count: int = setting(8, COUNT_OR_ZERO, option="max-pool-count",
                                  help="Data channels a client may open ahead of its users, "
                                       "per mapping; 0 turns pooling off")
    """Data channels a mapping's client may open ahead of its users (0: none)."""
    mux: bool = setting(True, FLAG, option="no-mux",
                        help="Refuse to carry a mapping's users as streams of one data "
                             "connection when a client offers it")
    """Agree to carry a mapping's users as streams of one connection when its client offers."""
    udp: bool = setting(True, FLAG, option="no-udp",
                        help="Publish no UDP mappings: a client's register of protocol udp is "
                             "refused")
    """Publish mappings registered with protocol "udp" as UDP ports (see gotunnel.udp.tunnels)."""
    udp_session_timeout: float = _udpSessionTimeout()
    """Seconds a remote UDP peer keeps its peer id after its last datagram."""
    udp_max_sessions: int = _udpMaxSessions()
    """Remote UDP peers one UDP mapping tracks at once; new peers beyond are dropped."""
    tls_cert: str = setting("", TEXT, option="tls-cert",
                            help="Speak TLS on the control address, with this PEM certificate "
                                 "(and its chain); needs --tls-key")
    tls_key: str = setting("", TEXT, option="tls-key", help="The PEM private key of --tls-cert")
    tls_client_ca: str = setting("", TEXT, option="tls-client-ca",
                                 help="Mutual TLS: require client certificates signed by the "
                                      "CA in this PEM file; a certificate's common name must "
                                      "be the client's name")
    """With it, clients must present a certificate signed by this CA (mutual TLS)."""
    zero_copy: bool = _zeroCopy()
    """Move spliced plain-TCP bytes with os.splice, where Linux has it."""
    splice_thread: bool = _spliceThread()
    """Run those splices on a thread of their own while connections are steady."""
    busy_poll: int = _busyPoll()
    """Microseconds that thread polls for a socket's answer before it sleeps
    (0: never)."""
    vhost_http: str = setting("", TEXT, option="http",
                              help="Endpoint of the HTTP virtual-host port, where clients' "
                                   "--http mappings are routed by Host, e.g. tcp:80")
    """Endpoint of the HTTP virtual-host port, routed by Host (empty: none)."""
    vhost_https: str = setting("", TEXT, option="https",
                               help="Endpoint of the HTTPS virtual-host port, where clients' "
                                    "--https mappings are routed by TLS server name (SNI), "
                                    "e.g. tcp:443")
    """Endpoint of the HTTPS virtual-host port, routed by TLS SNI (empty: none)."""
    subdomain_host: str = setting("", DOMAIN, option="subdomain-host",
                                  help="Clients may claim NAME.DOMAIN on the virtual-host "
                                       "ports, e.g. tunnel.example.com")
    """Clients may claim NAME.subdomain_host (empty: no subdomains)."""
    vhost_forwarded_headers: bool = setting(True, FLAG, option="no-forwarded-headers",
                                            help="Do not add X-Forwarded-For and "
                                                 "X-Forwarded-Proto to requests routed by the "
                                                 "HTTP virtual-host port")
    """Add X-Forwarded-For and X-Forwarded-Proto to the HTTP requests routed."""
    vhost_head_timeout: float = setting(10.0, SECONDS, option="vhost-head-timeout",
                                        help="Seconds a user of a virtual-host port has to "
                                             "send its request head or ClientHello")
    """Seconds a user has to send its request head (or ClientHello)."""
    connection_log: str = _connectionLog()
    """The level of the line logged for each user connection that ends, or "off"."""
    admin: str = setting("", TEXT, option="admin", shown="default: none",
                         help="Serve the admin API, /metrics and the dashboard on this "
                              "endpoint, e.g. tcp:7400:interface=127.0.0.1 or "
                              "ssl:7400:privateKey=key.pem:certKey=cert.pem")
    """The admin endpoint's server endpoint string (API, metrics, dashboard); empty: none."""
    admin_token: str = setting("", TEXT, option="admin-token", repr=False,
                               help="Bearer token for the admin endpoint")
    admin_user: str = setting("", TEXT, option="admin-user",
                              help="User name for the dashboard's login; needs "
                                   "--admin-password")
    admin_password: str = setting("", TEXT, option="admin-password", repr=False,
                                  help="Password for the dashboard's login")
    log_level: str = _logLevel()
    log_lang: str = _logLang()


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


def _tunnel(value: Any, text: Any, name: str) -> Mapping:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping with local_port and remote_port, "
                         f"got {value!r}")
    texts = text if isinstance(text, dict) else {}
    fields = {"local_host": "127.0.0.1"}
    for key, item in value.items():
        if key not in _TUNNEL_KEYS:
            raise ValueError(f"{name}.{key} is not a known key "
                             f"(expected {', '.join(_TUNNEL_KEYS)})")
        if item is not None:
            fields[key] = _TUNNEL_KEYS[key](item, texts.get(key), f"{name}.{key}")
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


@dataclass
class ClientSettings:
    server: str = setting(f"tcp:127.0.0.1:{DEFAULT_CONTROL_PORT}", TEXT, option="server",
                          short="s", aliases={"server_addr": SERVER_ADDRESS},
                          help="The server's control endpoint (a Twisted endpoint string, e.g. "
                               "tcp:tunnel.example.com:17000, tcp:[::1]:17000 or "
                               "tls:tunnel.example.com:17000)")
    token: str = setting("", TEXT, option="token", short="t", shown="required",
                         help="Shared secret of the server")
    name: str = setting(kind=TEXT, default_factory=socket.gethostname, option="name",
                        short="n", shown="default: the host name", help="This client's name")
    mappings: list[Mapping] = setting(
        default_factory=list, key=False,
        aliases={"local_ports": listOf(PORT), "remote_port": PORT,
                 "tunnels": listOf(Kind(_tunnel))})
    """From --map, --http and --https, or else from local_ports (with
    remote_port) and tunnels."""
    heartbeat_interval: float = setting(10.0, SECONDS, option="heartbeat-interval",
                                        help="Seconds between pings")
    health_check_interval: float = setting(30.0, SECONDS, option="health-check-interval",
                                           help="Seconds between probes of the local services")
    reconnect_max_delay: float = 16.0
    # A server that answers no ping for this long is taken for dead (the Go
    # server's own timeout for a silent client).
    server_timeout: float = 30.0
    register_timeout: float = setting(10.0, SECONDS, option="register-timeout",
                                      help="Seconds to wait for the server's answer to "
                                           "register, and to each data channel, before closing "
                                           "that connection (and, for register, connecting "
                                           "again)")
    """Seconds to wait for the server's answer to register (and to each
    data channel asked for by a user) before giving up on that connection."""
    max_pending_data_channels: int = setting(256, COUNT, option="max-pending-data-channels",
                                             help="Data channels per mapping being opened for "
                                                  "users at once; the server's further "
                                                  "requests wait their turn (up to a bound, "
                                                  "then they are dropped)")
    """Data channels per mapping opened for users and not yet answered by
    the server; the server's further requests wait (see client.py)."""
    exit_on_refusal: bool = setting(False, FLAG, option="exit-on-refusal",
                                    help="Exit when the server refuses a mapping for a reason "
                                         "that asking again will not change (wrong token 3, "
                                         "port not allowed 4, port taken by another client 5, "
                                         "port busy on the server 6) instead of asking again")
    """Exit (see refusals.py for the status) on a refusal that asking
    again will not change, instead of asking again."""
    shutdown_timeout: float = 10.0
    tls: bool = setting(False, FLAG, option="tls",
                        help="Connect with TLS and verify the server's certificate and name")
    tls_ca: str = setting("", TEXT, option="ca", shown="default: the system's trusted CAs",
                          help="With --tls: trust the CA certificates in this PEM file")
    """Empty: the system's trusted CAs."""
    tls_server_name: str = setting("", TEXT, option="server-name",
                                   shown="default: the host of --server",
                                   help="With --tls: the name the server's certificate must "
                                        "hold")
    """Empty: the host of C{server}."""
    tls_client_cert: str = setting("", TEXT, option="tls-client-cert",
                                   help="With --tls: present this PEM certificate to a server "
                                        "that asks for one (mutual TLS; needs "
                                        "--tls-client-key)")
    tls_client_key: str = setting("", TEXT, option="tls-client-key",
                                  help="The PEM private key of --tls-client-cert")
    zero_copy: bool = _zeroCopy()
    """Move spliced plain-TCP bytes with os.splice, where Linux has it."""
    splice_thread: bool = _spliceThread()
    """Run those splices on a thread of their own while connections are steady."""
    busy_poll: int = _busyPoll()
    """Microseconds that thread polls for a socket's answer before it sleeps
    (0: never)."""
    pool_count: int = setting(4, COUNT_OR_ZERO, option="pool-count",
                              help="Data channels per mapping kept open ahead of users, so "
                                   "that a new connection does not wait for one; at most what "
                                   "the server allows, 0 for none")
    """Data channels per mapping opened ahead of users, so that a user's
    connection need not wait for one (at most what the server allows)."""
    mux: bool = setting(False, FLAG, option="mux",
                        help="Carry each mapping's users as streams of one data connection, "
                             "where the server agrees; off by default, see bench/README.md")
    """Offer to carry each mapping's users as streams of one data connection."""
    connection_log: str = _connectionLog()
    """The level of the line logged for each user connection that ends, or "off"."""
    udp_session_timeout: float = _udpSessionTimeout()
    """Seconds a UDP mapping's session (one local socket per remote peer)
    lives after its last datagram."""
    udp_max_sessions: int = _udpMaxSessions()
    """Sessions one UDP mapping holds at once; new peers' datagrams beyond are dropped."""
    log_level: str = _logLevel()
    log_lang: str = _logLang()


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



# ---------------------------------------------------------------------------
# config.yaml


class ConfigError(usage.UsageError):
    """A config file that cannot be used: one sentence naming the file and the key."""


def findConfigFile(path: Optional[str]) -> Optional[str]:
    """
    The config file to read: C{path} (from --config) if given, else
    ./config.yaml if it exists, as the Go binaries do; else None.
    """
    if path is not None:
        return path
    return CONFIG_FILE if os.path.exists(CONFIG_FILE) else None


@dataclass
class ConfigFile:
    """A parsed config file: its path, its values, and the text of each scalar."""

    path: str
    data: dict
    texts: dict

    def serverValues(self) -> dict[str, Any]:
        """
        The server: section as L{ServerSettings} fields; only the keys the
        file sets.  L{ConfigError} for an unknown key or a bad value.
        """
        values = self._section("server", _SERVER_KEYS)
        if "listen" in values:
            values.pop("addr", None)
        elif "addr" in values:
            values["listen"] = values.pop("addr")
        if "allow_ports" in values:
            values["allow_ports"] = tuple(values["allow_ports"])
        return values

    def clientValues(self) -> dict[str, Any]:
        """
        The client: section as L{ClientSettings} fields; only the keys the
        file sets.  local_ports with remote_port, and tunnels, become
        C{mappings}.  L{ConfigError} for an unknown key or a bad value.
        """
        values = self._section("client", _CLIENT_KEYS)
        if "server" in values:
            values.pop("server_addr", None)
        elif "server_addr" in values:
            values["server"] = values.pop("server_addr")
        localPorts = values.pop("local_ports", [])
        remotePort = values.pop("remote_port", DEFAULT_REMOTE_PORT)
        mappings = [Mapping("127.0.0.1", port, remotePort + i)
                    for i, port in enumerate(localPorts)]
        if mappings and mappings[-1].remote_port > 65535:
            self._fail(f"client.local_ports has {len(mappings)} ports, published on "
                       f"client.remote_port {remotePort} and the ports after it; "
                       f"{mappings[-1].remote_port} is above 65535")
        mappings += values.pop("tunnels", [])
        # 0 (the server chooses) may be asked for more than once; a virtual host has no port;
        # a port number's UDP port is another port than its TCP one.
        remotePorts = [(m.protocol, m.remote_port) for m in mappings
                       if m.remote_port and not m.vhost]
        for key in remotePorts:
            if remotePorts.count(key) > 1:
                protocol, port = key
                what = "UDP remote port" if protocol == "udp" else "remote port"
                self._fail(f"{what} {port} is published twice "
                           f"(client.local_ports, client.remote_port, client.tunnels)")
        if mappings:
            values["mappings"] = mappings
        return values

    def _section(self, name: str, keys: dict[str, Callable]) -> dict[str, Any]:
        section = self.data.get(name)
        texts = self.texts.get(name) if isinstance(self.texts, dict) else None
        if section is None:
            return {}
        if not isinstance(section, dict):
            self._fail(f"{name} must be a mapping of keys, got {section!r}")
        values = {}
        for key, value in section.items():
            if key not in keys:
                close = get_close_matches(str(key), keys, 1)
                hint = f" (did you mean {name}.{close[0]}?)" if close else ""
                self._fail(f"{name}.{key} is not a known key{hint}")
            if value is None:
                continue
            text = texts.get(key) if isinstance(texts, dict) else None
            try:
                values[key] = keys[key](value, text, f"{name}.{key}")
            except ValueError as e:
                self._fail(str(e))
        return values

    def _fail(self, sentence: str) -> NoReturn:
        raise ConfigError(f"{self.path}: {sentence}")


def readConfigFile(path: str) -> ConfigFile:
    """
    Read and parse C{path}; L{ConfigError} if it cannot be read, is not
    YAML, or has a top-level section other than server: and client:.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}") from None
    # Here, not at the top: a run without a config file never loads YAML.
    import yaml

    try:
        data = yaml.safe_load(text)
        # The same document with every scalar as the text it was written
        # as: a token or name written 0123 or yes stays "0123" or "yes".
        texts = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        data, texts = {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected server: and/or client: sections, got {data!r}")
    for section in data:
        if section not in ("server", "client"):
            raise ConfigError(f"{path}: unknown section {section!r}; "
                              f"expected server: and/or client:")
    return ConfigFile(path, data, texts)


_SERVER_KEYS = yamlKeys(ServerSettings)
_CLIENT_KEYS = yamlKeys(ClientSettings)

"""
Settings of the server and the client: one typed object each, built at the
edge from config.yaml (read by gotunnel.config.yamlfile; the Go gotunnel's
keys, plus a few of ours) and command-line options.  Each setting is declared
once, on its field (see gotunnel.config.spec): the config file's keys and the
command-line options (gotunnel.cli.tap) are made from the declarations.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Optional

from gotunnel.config.kinds import (
    BANDWIDTH, BUSY_POLL, CONNECTION_LOG, COUNT, COUNT_OR_ZERO, DOMAIN, DOMAINS, FLAG,
    IPV6_PREFIX, LISTEN_ADDRESS, LOG_LANG, LOG_LEVEL, NETWORKS, POOL_COUNT, PORT, PORT_RANGES,
    RATE, SECONDS, SECONDS_OR_ZERO, SERVER_ADDRESS, TEXT, Kind, listOf,
)
from gotunnel.config.mappings import Mapping, readTunnelEntry
from gotunnel.config.spec import readEntry, setting, yamlKeys

DEFAULT_CONTROL_PORT = 17000
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
        fields = readEntry(entry, texts.get(clientText), _CLIENT_POLICY_KEYS, where)
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
    max_pool_count: int = setting(8, POOL_COUNT, option="max-pool-count",
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
                 "tunnels": listOf(Kind(readTunnelEntry))})
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
    pool_count: int = setting(4, POOL_COUNT, option="pool-count",
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

"""
Settings of the server and the client: one typed object each, built at the
edge from config.yaml (the Go gotunnel's keys, plus a few of ours) and
command-line options.
"""

from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any, Callable, NoReturn, Optional

from twisted.internet.endpoints import quoteStringArgument
from twisted.python import usage

from gotunnel.i18n import LANGUAGES
from gotunnel.portpolicy import MAX_REQUESTED_SOURCES, parseNetwork
from gotunnel.proxyprotocol import parseVersion
from gotunnel.ratelimit import parseRate

DEFAULT_CONTROL_PORT = 17000
DEFAULT_REMOTE_PORT = 10022
CONFIG_FILE = "config.yaml"
LOG_LEVELS = ("debug", "info", "warn", "error")
CONNECTION_LOG_LEVELS = ("info", "debug", "off")
"""Where the line about each ended user connection goes (connection_log)."""
DEFAULT_BUSY_POLL = 250
"""Microseconds the splice thread polls for a socket's answer: longer than a
service on the same machine, or a hop on a local network, takes to answer."""
MAX_BUSY_POLL = 10_000
MAX_CONNECTION_RATE = 1_000_000


@dataclass
class ServerSettings:
    listen: str = f"tcp:{DEFAULT_CONTROL_PORT}"
    token: str = ""
    public_interface: str = "0.0.0.0"
    public_backlog: int = 1024
    control_backlog: int = 1024
    """The control listener's, unless C{listen} sets backlog=: data channels come in bursts."""
    data_channel_timeout: float = 60.0
    heartbeat_timeout: float = 30.0
    port_lease: float = 30.0
    """Seconds a dropped client's public ports stay reserved for it (0: not at all)."""
    heartbeat_check_interval: float = 5.0
    first_frame_timeout: float = 10.0
    max_pending_per_source: int = 16
    max_pending_total: int = 1024
    ipv6_prefix: int = 64
    """IPv6 sources in one network of this prefix length count as one address in the caps."""
    max_waiting_users: int = 4096
    auth_failure_delay_max: float = 5.0
    shutdown_timeout: float = 10.0
    allow_ports: tuple[range, ...] = ()
    """Remote ports clients may register; empty: any port."""
    clients: dict[str, "ClientPolicy"] = field(default_factory=dict)
    """Clients with a token and limits of their own, by name."""
    allow_sources: tuple = ()
    """Networks users of a public port may come from; empty: any (see portpolicy.py)."""
    deny_sources: tuple = ()
    """Networks users of a public port may not come from."""
    max_users_per_port: int = 0
    """Users connected at once to one public port; more are refused (0: no limit)."""
    max_connection_rate: float = 0.0
    """New connections a second one source address may open to one public
    port; more are refused (0: no limit)."""
    bandwidth_limit: int = 0
    """Bytes a second each mapping may carry each way (0: no cap)."""
    max_mappings_per_client: int = 16
    """Mappings one client name may hold at once."""
    max_pool_count: int = 8
    """Data channels a mapping's client may open ahead of its users (0: none)."""
    mux: bool = True
    """Agree to carry a mapping's users as streams of one connection when its client offers."""
    udp: bool = True
    """Publish mappings registered with protocol "udp" as UDP ports (see gotunnel.udp)."""
    udp_session_timeout: float = 60.0
    """Seconds a remote UDP peer keeps its peer id after its last datagram."""
    udp_max_sessions: int = 1024
    """Remote UDP peers one UDP mapping tracks at once; new peers beyond are dropped."""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    """With it, clients must present a certificate signed by this CA (mutual TLS)."""
    zero_copy: bool = True
    """Move spliced plain-TCP bytes with os.splice, where Linux has it."""
    splice_thread: bool = True
    """Run those splices on a thread of their own while connections are steady."""
    busy_poll: int = DEFAULT_BUSY_POLL
    """Microseconds that thread polls for a socket's answer before it sleeps
    (0: never)."""
    vhost_http: str = ""
    """Endpoint of the HTTP virtual-host port, routed by Host (empty: none)."""
    vhost_https: str = ""
    """Endpoint of the HTTPS virtual-host port, routed by TLS SNI (empty: none)."""
    subdomain_host: str = ""
    """Clients may claim NAME.subdomain_host (empty: no subdomains)."""
    vhost_forwarded_headers: bool = True
    """Add X-Forwarded-For and X-Forwarded-Proto to the HTTP requests routed."""
    vhost_head_timeout: float = 10.0
    """Seconds a user has to send its request head (or ClientHello)."""
    connection_log: str = "info"
    """The level of the line logged for each user connection that ends, or "off"."""
    admin: str = ""
    """The admin endpoint's server endpoint string (API, metrics, dashboard); empty: none."""
    admin_token: str = field(default="", repr=False)
    admin_user: str = ""
    admin_password: str = field(default="", repr=False)
    log_level: str = "info"
    log_lang: str = "en"


@dataclass(frozen=True)
class ClientPolicy:
    """What one client listed in server.clients may do."""

    token: str
    allow_ports: tuple[range, ...] = ()
    """Empty: server.allow_ports applies."""
    max_mappings: Optional[int] = None
    """None: server.max_mappings_per_client applies."""
    domains: tuple[str, ...] = ()
    """Domains (and *.DOMAIN patterns) it may claim on the virtual-host ports."""
    allow_sources: tuple = ()
    """Empty: server.allow_sources applies to this client's ports."""
    deny_sources: tuple = ()
    """Denied on this client's ports, as well as server.deny_sources."""
    max_users_per_port: int = 0
    """0: server.max_users_per_port applies; else the stricter of the two."""
    max_connection_rate: float = 0.0
    """0: server.max_connection_rate applies; else the stricter of the two."""
    bandwidth_limit: int = 0
    """0: server.bandwidth_limit applies; else the stricter of the two."""


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
    """"tcp", or "udp" (see gotunnel.udp)."""
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


@dataclass
class ClientSettings:
    server: str = f"tcp:127.0.0.1:{DEFAULT_CONTROL_PORT}"
    token: str = ""
    name: str = field(default_factory=socket.gethostname)
    mappings: list[Mapping] = field(default_factory=list)
    heartbeat_interval: float = 10.0
    health_check_interval: float = 30.0
    reconnect_max_delay: float = 16.0
    # A server that answers no ping for this long is taken for dead (the Go
    # server's own timeout for a silent client).
    server_timeout: float = 30.0
    register_timeout: float = 10.0
    """Seconds to wait for the server's answer to register (and to each
    data channel asked for by a user) before giving up on that connection."""
    max_pending_data_channels: int = 256
    """Data channels per mapping opened for users and not yet answered by
    the server; the server's further requests wait (see client.py)."""
    exit_on_refusal: bool = False
    """Exit (see refusals.py for the status) on a refusal that asking
    again will not change, instead of asking again."""
    shutdown_timeout: float = 10.0
    tls: bool = False
    tls_ca: str = ""
    """Empty: the system's trusted CAs."""
    tls_server_name: str = ""
    """Empty: the host of C{server}."""
    tls_client_cert: str = ""
    tls_client_key: str = ""
    zero_copy: bool = True
    """Move spliced plain-TCP bytes with os.splice, where Linux has it."""
    splice_thread: bool = True
    """Run those splices on a thread of their own while connections are steady."""
    busy_poll: int = DEFAULT_BUSY_POLL
    """Microseconds that thread polls for a socket's answer before it sleeps
    (0: never)."""
    pool_count: int = 4
    """Data channels per mapping opened ahead of users, so that a user's
    connection need not wait for one (at most what the server allows)."""
    mux: bool = False
    """Offer to carry each mapping's users as streams of one data connection."""
    connection_log: str = "info"
    """The level of the line logged for each user connection that ends, or "off"."""
    udp_session_timeout: float = 60.0
    """Seconds a UDP mapping's session (one local socket per remote peer)
    lives after its last datagram."""
    udp_max_sessions: int = 1024
    """Sessions one UDP mapping holds at once; new peers' datagrams beyond are dropped."""
    log_level: str = "info"
    log_lang: str = "en"


def parsePort(text: str, what: str, lowest: int = 1) -> int:
    """
    A TCP port from C{lowest} (1; 0 for a remote port the server chooses)
    to 65535, or ValueError naming C{what}.
    """
    try:
        port = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a port number, got {text!r}") from None
    if not lowest <= port <= 65535:
        raise ValueError(f"{what} must be from {lowest} to 65535, got {port}")
    return port


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
    return f"tcp:{quoteStringArgument(rest[1:end])}{rest[end + 1:]}"


def parseLogLevel(text: str, what: str = "the log level") -> str:
    """
    One of L{LOG_LEVELS}, in any case; Go's "warning" means "warn".
    ValueError naming C{what} otherwise.
    """
    level = str(text).lower()
    level = "warn" if level == "warning" else level
    if level not in LOG_LEVELS:
        raise ValueError(f"{what} must be one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return level


def parseConnectionLog(text: str, what: str = "the connection log") -> str:
    """
    One of L{CONNECTION_LOG_LEVELS}, in any case; ValueError naming C{what}
    otherwise.
    """
    setting = str(text).lower()
    if setting not in CONNECTION_LOG_LEVELS:
        raise ValueError(f"{what} must be one of {', '.join(CONNECTION_LOG_LEVELS)}, "
                         f"got {text!r}")
    return setting


def parseLogLang(text: str, what: str = "the log language") -> str:
    """
    One of the languages we have log messages in ("en", "zh"), in any case;
    ValueError naming C{what} otherwise.
    """
    lang = str(text).lower()
    if lang not in LANGUAGES:
        raise ValueError(f"{what} must be one of {', '.join(LANGUAGES)}, got {text!r}")
    return lang


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


# Each key's reader takes (value, the text it was written as, key name) and
# returns the value for the settings, or raises ValueError naming the key.


def _text(value: Any, text: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, (list, dict)) and isinstance(text, str):
        return text
    raise ValueError(f"{name} must be text, got {value!r}")


def _number(value: Any) -> Any:
    """
    A number written in quotes ("10022", "2.5") as the number, as Go's viper
    reads it; any other value unchanged.
    """
    if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
        return float(value) if "." in value else int(value)
    return value


def _port(value: Any, text: Any, name: str) -> int:
    value = _number(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a port number from 1 to 65535, got {value!r}")
    return parsePort(value, name)


def _seconds(value: Any, text: Any, name: str) -> float:
    value = _number(value)
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a number of seconds greater than 0, got {value!r}")
    return float(value)


def _secondsOrZero(value: Any, text: Any, name: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be a number of seconds, 0 or more, got {value!r}")
    return float(value)


def _flag(value: Any, text: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _wholeNumber(minimum: int, maximum: Optional[int] = None) -> Callable[[Any, Any, str], int]:
    """A key's check: a whole number of at least C{minimum} (and at most C{maximum})."""
    bounds = f"of at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"

    def check(value: Any, text: Any, name: str) -> int:
        value = _number(value)
        if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
                or (maximum is not None and value > maximum)):
            raise ValueError(f"{name} must be a whole number {bounds}, got {value!r}")
        return value

    return check


_count = _wholeNumber(1)
_countOrZero = _wholeNumber(0)
_busyPoll = _wholeNumber(0, MAX_BUSY_POLL)
_ipv6Prefix = _wholeNumber(1, 128)


def _logLevel(value: Any, text: Any, name: str) -> str:
    return parseLogLevel(_text(value, text, name), name)


def _logLang(value: Any, text: Any, name: str) -> str:
    return parseLogLang(_text(value, text, name), name)


def _connectionLog(value: Any, text: Any, name: str) -> str:
    # YAML reads a bare off as false.
    if value is False:
        return "off"
    return parseConnectionLog(_text(value, text, name), name)


def _hostAndPort(value: Any, text: Any, name: str) -> tuple[str, int]:
    """HOST:PORT, [IPV6]:PORT or :PORT, as Go's net package writes addresses."""
    address = _text(value, text, name)
    host, colon, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        colon = ""
    if not colon or not port.isdigit():
        raise ValueError(f"{name} must be HOST:PORT (an IPv6 host in brackets, "
                         f"[::1]:17000), got {address!r}")
    return host, parsePort(port, f"the port in {name}")


def _listenAddress(value: Any, text: Any, name: str) -> str:
    host, port = _hostAndPort(value, text, name)
    return f"tcp:{port}:interface={quoteStringArgument(host)}" if host else f"tcp:{port}"


def _serverAddress(value: Any, text: Any, name: str) -> str:
    host, port = _hostAndPort(value, text, name)
    return f"tcp:{quoteStringArgument(host or '127.0.0.1')}:{port}"


def _listOf(read: Callable) -> Callable:
    """A reader of a list of items (or of one item alone) that C{read} reads."""

    def readList(value: Any, text: Any, name: str) -> list:
        if not isinstance(value, list):
            value, text = [value], [text]
        texts = text if isinstance(text, list) and len(text) == len(value) else [None] * len(value)
        return [read(item, itemText, f"{name}[{i}]")
                for i, (item, itemText) in enumerate(zip(value, texts))]

    return readList


def _portRange(value: Any, text: Any, name: str) -> range:
    if isinstance(value, str) and "-" in value:
        first, _, last = (part.strip() for part in value.partition("-"))
        if first.isdigit() and last.isdigit():
            low, high = parsePort(first, name), parsePort(last, name)
            if low > high:
                raise ValueError(f"{name} must be a range LOW-HIGH with LOW <= HIGH, "
                                 f"got {value!r}")
            return range(low, high + 1)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a port or a range like 10000-10100, got {value!r}")
    port = parsePort(value, name)
    return range(port, port + 1)


def _proxyProtocol(value: Any, text: Any, name: str) -> str:
    return parseVersion(_text(value, text, name), name)


def _network(value: Any, text: Any, name: str):
    return parseNetwork(_text(value, text, name), name)


def _networks(value: Any, text: Any, name: str) -> tuple:
    return tuple(_listOf(_network)(value, text, name))


def _requestedNetworks(value: Any, text: Any, name: str) -> tuple[str, ...]:
    networks = _networks(value, text, name)
    if len(networks) > MAX_REQUESTED_SOURCES:
        raise ValueError(f"{name} has {len(networks)} networks; a client may ask for at most "
                         f"{MAX_REQUESTED_SOURCES}")
    return tuple(str(network) for network in networks)


def _bandwidth(value: Any, text: Any, name: str) -> int:
    return parseRate(value, name)


def _rate(value: Any, text: Any, name: str) -> float:
    value = _number(value)
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value < 0 or value > MAX_CONNECTION_RATE):
        raise ValueError(f"{name} must be a number of connections a second from 0 to "
                         f"{MAX_CONNECTION_RATE}, got {value!r}")
    return float(value)


def _remotePort(value: Any, text: Any, name: str) -> int:
    value = _number(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a port number from 0 to 65535, got {value!r}")
    return parsePort(value, name, lowest=0)


def _vhostType(value: Any, text: Any, name: str) -> str:
    kind = _text(value, text, name).lower()
    if kind not in ("tcp", "http", "https"):
        raise ValueError(f"{name} must be tcp, http or https, got {value!r}")
    return kind


def _domain(value: Any, text: Any, name: str) -> str:
    from gotunnel.vhost import normalDomain

    return normalDomain(_text(value, text, name))


def _subdomain(value: Any, text: Any, name: str) -> str:
    label = _domain(value, text, name)
    if "." in label or "*" in label:
        raise ValueError(f"{name} must be one DNS label (NAME of NAME.subdomain_host), "
                         f"got {value!r}")
    return label


def _domains(value: Any, text: Any, name: str) -> tuple[str, ...]:
    return tuple(_listOf(_domain)(value, text, name))


def _protocol(value: Any, text: Any, name: str) -> str:
    protocol = _text(value, text, name).lower()
    if protocol not in ("tcp", "udp"):
        raise ValueError(f"{name} must be tcp or udp, got {value!r}")
    return protocol


_TUNNEL_KEYS = {"local_host": _text, "local_port": _port, "remote_port": _remotePort,
                "protocol": _protocol, "type": _vhostType, "domains": _domains, "subdomain": _subdomain,
                "http_user": _text, "http_password": _text, "host_header_rewrite": _text,
                "proxy_protocol": _proxyProtocol, "allow_sources": _requestedNetworks,
                "deny_sources": _requestedNetworks, "max_users": _countOrZero,
                "max_connection_rate": _rate, "bandwidth_limit": _bandwidth, "group": _text,
                "group_key": _text}



def _portRanges(value: Any, text: Any, name: str) -> tuple[range, ...]:
    return tuple(_listOf(_portRange)(value, text, name))


_CLIENT_POLICY_KEYS: dict[str, Callable] = {
    "token": _text, "allow_ports": _portRanges, "max_mappings": _count, "domains": _domains,
    "allow_sources": _networks, "deny_sources": _networks,
    "max_users_per_port": _countOrZero, "max_connection_rate": _rate,
    "bandwidth_limit": _bandwidth}


def _clients(value: Any, text: Any, name: str) -> dict[str, ClientPolicy]:
    """server.clients: NAME -> {token, allow_ports, max_mappings}."""
    if not isinstance(value, dict):
        raise ValueError(f"{name} must map client names to {{token: ..., allow_ports: ..., "
                         f"max_mappings: ...}}, got {value!r}")
    texts = text if isinstance(text, dict) and len(text) == len(value) else {}
    clients = {}
    for (client, entry), clientText in zip(value.items(), list(texts) or [None] * len(value)):
        clientName = _text(client, clientText, f"a client name in {name}")
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


_SERVER_KEYS: dict[str, Callable] = {
    # The Go gotunnel's keys.
    "addr": _listenAddress,
    "token": _text,
    "log_level": _logLevel,
    "log_lang": _logLang,
    # Ours.
    "listen": _text,
    "allow_ports": _listOf(_portRange),
    "public_interface": _text,
    "data_channel_timeout": _seconds,
    "heartbeat_timeout": _seconds,
    "port_lease": _secondsOrZero,
    "clients": _clients,
    "allow_sources": _networks,
    "deny_sources": _networks,
    "max_users_per_port": _countOrZero,
    "max_connection_rate": _rate,
    "bandwidth_limit": _bandwidth,
    "max_mappings_per_client": _count,
    "max_pool_count": _countOrZero,
    "mux": _flag,
    "ipv6_prefix": _ipv6Prefix,
    "udp": _flag,
    "udp_session_timeout": _seconds,
    "udp_max_sessions": _count,
    "tls_cert": _text,
    "tls_key": _text,
    "tls_client_ca": _text,
    "zero_copy": _flag,
    "splice_thread": _flag,
    "busy_poll": _busyPoll,
    "vhost_http": _text,
    "vhost_https": _text,
    "subdomain_host": _domain,
    "vhost_forwarded_headers": _flag,
    "vhost_head_timeout": _seconds,
    "connection_log": _connectionLog,
    "admin": _text,
    "admin_token": _text,
    "admin_user": _text,
    "admin_password": _text,
}

_CLIENT_KEYS: dict[str, Callable] = {
    # The Go gotunnel's keys.
    "name": _text,
    "token": _text,
    "server_addr": _serverAddress,
    "local_ports": _listOf(_port),
    "remote_port": _port,
    "heartbeat_interval": _seconds,
    "health_check_interval": _seconds,
    "log_level": _logLevel,
    "log_lang": _logLang,
    # Ours.
    "server": _text,
    "tunnels": _listOf(_tunnel),
    "tls": _flag,
    "tls_ca": _text,
    "tls_server_name": _text,
    "tls_client_cert": _text,
    "tls_client_key": _text,
    "zero_copy": _flag,
    "splice_thread": _flag,
    "busy_poll": _busyPoll,
    "pool_count": _countOrZero,
    "mux": _flag,
    "register_timeout": _seconds,
    "max_pending_data_channels": _count,
    "exit_on_refusal": _flag,
    "connection_log": _connectionLog,
    "udp_session_timeout": _seconds,
    "udp_max_sessions": _count,
}

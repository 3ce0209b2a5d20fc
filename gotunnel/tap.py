"""
Command-line options and makeService for both roles: the one code path
behind the twistd plugins, the console scripts and C{python -m gotunnel}.

Settings come from config.yaml (./config.yaml if it exists, or --config
FILE), and options given on the command line override the file's keys.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
import platform
import sys
import textwrap
from typing import Any, Callable, Optional

import twisted
from twisted.application.service import IService
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from gotunnel import __version__, logs, rlimits
from gotunnel.client import MAX_WAITING_DATA_CHANNEL_REQUESTS, TunnelClientService
from gotunnel.config import (
    CONNECTION_LOG_LEVELS, LOG_LEVELS, MAX_BUSY_POLL, MAX_CONNECTION_RATE, ClientSettings,
    ConfigError, ConfigFile, ServerSettings, clientEndpointString, findConfigFile,
    parseConnectionLog, parseLogLang, parseLogLevel, parseMapping, parseVirtualHost,
    readConfigFile,
)
from gotunnel.i18n import LANGUAGES
from gotunnel.proxyprotocol import parseVersion
from gotunnel.ratelimit import parseRate

log = Logger()


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


_positive.coerceDoc = "Seconds, greater than 0."  # type: ignore[attr-defined]


def _secondsOrZero(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a number of seconds, 0 or more")
    return value


_secondsOrZero.coerceDoc = "Seconds, 0 or more."  # type: ignore[attr-defined]


def _wholeNumber(minimum: int, maximum: Optional[int] = None) -> Callable[[str], int]:
    """An option's coerce function: a whole number from C{minimum} (to C{maximum})."""
    bounds = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"

    def coerce(text: str) -> int:
        value = int(text)
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError(f"must be {bounds}")
        return value

    coerce.coerceDoc = f"A whole number, {bounds}."  # type: ignore[attr-defined]
    return coerce


def _rate(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or not 0 <= value <= MAX_CONNECTION_RATE:
        raise ValueError(f"must be from 0 to {MAX_CONNECTION_RATE}")
    return value


_rate.coerceDoc = "Connections a second, 0 for no limit."  # type: ignore[attr-defined]

def _bandwidth(text: str) -> int:
    return parseRate(text, "--bandwidth-limit")


_bandwidth.coerceDoc = "Bytes a second: 10MB, 512KiB, 1GB."  # type: ignore[attr-defined]

_atLeastOne = _wholeNumber(1)
_atLeastZero = _wholeNumber(0)
_busyPoll = _wholeNumber(0, MAX_BUSY_POLL)
_ipv6Prefix = _wholeNumber(1, 128)


def _logLevel(text: str) -> str:
    return parseLogLevel(text, "--log-level")


_logLevel.coerceDoc = f"One of {', '.join(LOG_LEVELS)}."  # type: ignore[attr-defined]


def _logLang(text: str) -> str:
    return parseLogLang(text, "--log-lang")


_logLang.coerceDoc = f"One of {', '.join(LANGUAGES)}."  # type: ignore[attr-defined]


def _connectionLog(text: str) -> str:
    return parseConnectionLog(text, "--connection-log")


_connectionLog.coerceDoc = (  # type: ignore[attr-defined]
    f"One of {', '.join(CONNECTION_LOG_LEVELS)}.")


def _proxyProtocol(text: str) -> str:
    return parseVersion(text, "--proxy-protocol")


_proxyProtocol.coerceDoc = "v1 or v2."  # type: ignore[attr-defined]

_CONFIG_OPTION = [
    "config", "c", None,
    "Read settings from this YAML file (default: ./config.yaml, if it exists). "
    "Options given here override its keys."]

_NO_ZERO_COPY = [
    "no-zero-copy", None,
    "Move relayed bytes through Python instead of with os.splice "
    "(zero_copy: false in the config file)."]

_NO_SPLICE_THREAD = [
    "no-splice-thread", None,
    "Run the splices in the reactor's thread instead of a thread of their own "
    "(splice_thread: false in the config file)."]


def _udpOptions(role: str, settingsType: type) -> list[list[Any]]:
    return [
        ["udp-session-timeout", None, None,
         "Seconds a UDP mapping keeps a remote peer's session after its last datagram "
         f"(default: {settingsType.udp_session_timeout:g}; {role}.udp_session_timeout)",
         _positive],
        ["udp-max-sessions", None, None,
         "Remote peers one UDP mapping serves at once; new peers' datagrams beyond are "
         f"dropped (default: {settingsType.udp_max_sessions}; {role}.udp_max_sessions)",
         _atLeastOne],
    ]


_UDP_FIELDS = {"udp-session-timeout": "udp_session_timeout",
               "udp-max-sessions": "udp_max_sessions"}


def _busyPollOption(role: str, settingsType: type) -> list[Any]:
    return ["busy-poll", None, None,
            "Microseconds the splice thread polls for a socket's answer before it sleeps, "
            "for sockets that answered that fast the last time; 0 never polls "
            f"(default: {settingsType.busy_poll}; {role}.busy_poll)", _busyPoll]


def _logOptions(role: str) -> list[list[Any]]:
    return [
        ["log-level", None, None,
         f"Log events at this level and above (default: info; {role}.log_level)", _logLevel],
        ["log-lang", None, None,
         f"Language of log messages (default: en; {role}.log_lang)", _logLang],
        ["connection-log", None, None,
         "The level of the line logged for each user connection that ends, with its bytes, "
         f"duration and how it ended, or off (default: info; {role}.connection_log)",
         _connectionLog],
    ]


def _endpointPort(endpoint: object) -> Optional[int]:
    # Twisted's endpoints keep their port to themselves; look through
    # wrappers (tls:) for the one that has it.
    while endpoint is not None:
        port = getattr(endpoint, "_port", None)
        if isinstance(port, int):
            return port
        endpoint = getattr(endpoint, "_wrappedEndpoint", None)
    return None


def checkEndpoint(description: str, kind: str, where: str) -> None:
    """
    Refuse, as a usage error naming C{where}, an endpoint string that
    Twisted cannot parse or whose port is out of range, before anything
    starts.  C{kind} is "server" (listen) or "client" (connect).
    """
    from twisted.internet import reactor

    parse = serverFromString if kind == "server" else clientFromString
    try:
        endpoint = parse(reactor, description)
    except Exception as e:
        raise usage.UsageError(
            f"{where} {description!r} is not a usable endpoint: {e}") from None
    port = _endpointPort(endpoint)
    lowest = 0 if kind == "server" else 1
    if port is not None and not lowest <= port <= 65535:
        raise usage.UsageError(
            f"{where} {description!r}: the port must be from {lowest} to 65535, got {port}")


def versionText() -> str:
    """What --version prints: gotunnel's version, then Twisted's and Python's."""
    return (f"gotunnel {__version__}\nTwisted {twisted.__version__}\n"
            f"Python {platform.python_version()}")


class _SettingsOptions(usage.Options):
    """
    Options that, with the config file's section for C{role}, make one
    settings object: the file's values, then every option given here.
    """

    role: str
    settingsType: Callable[..., Any]
    fields: dict[str, str]
    """Option name -> settings field, for the options that override the file."""
    firstOptions: tuple[str, ...]
    """The options a person needs first, in the order --help lists them."""
    examples: tuple[str, ...]
    """Command lines --help ends with, after the program's name."""
    prog: Optional[str] = None
    """The console script's name, for the usage line; None: gotunnel-ROLE."""

    def getSynopsis(self) -> str:
        if self.parent is not None:
            # twistd's own line: "Usage: twistd [options] gotunnel-server [options]".
            return super().getSynopsis()
        return f"Usage: {self._program()} {self.synopsis}"

    def _program(self) -> str:
        if self.parent is not None:
            return f"twistd -n {self.parent.subCommand}"
        return self.prog or f"gotunnel-{self.role}"

    def getUsage(self, width: Optional[int] = None) -> str:
        """
        The options a person needs first, then the others, then examples;
        each option as Twisted's own usage text writes it.
        """
        width = width or int(os.environ.get("COLUMNS", "80"))
        shortNames = {long: short for short, long in self.synonyms.items()
                      if short != long and len(short) == 1}
        first: list[dict] = []
        others: list[dict] = []
        for opt in self.longOpt:
            name = opt.rstrip("=")
            entry = {"long": name, "short": shortNames.get(name), "doc": self.docs[name],
                     "optType": "parameter" if opt.endswith("=") else "flag",
                     "dispatch": self._dispatch.get(name)}
            (first if name in self.firstOptions else others).append(entry)
        # Twisted's layout sorts by short name, or else long name: one chunk
        # per option, put back in the order of firstOptions.
        chunks = dict(zip((entry["long"] for entry in sorted(
            first, key=lambda entry: entry["short"] or entry["long"])),
            usage.docMakeChunks(first, width)))
        firstText = "".join(chunks[name] for name in self.firstOptions if name in chunks)
        description = "\n".join(textwrap.wrap(self.longdesc, width))
        examples = "\n".join(f"  {self._program()} {example}" for example in self.examples)
        return (f"\n{description}\n\nOptions to start with:\n{firstText}\n"
                f"Other options:\n{''.join(usage.docMakeChunks(others, width))}\n"
                f"Examples:\n{examples}")

    def opt_version(self) -> None:
        """Display gotunnel's, Twisted's and Python's versions and exit."""
        print(versionText())
        sys.exit(0)

    def fileValues(self, configFile: ConfigFile) -> dict[str, Any]:
        raise NotImplementedError()

    tlsOptions: dict[str, str] = {}
    """Settings field -> option name, for the TLS settings."""

    def check(self, values: dict[str, Any], source: Optional[str]) -> None:
        """Raise L{usage.UsageError} if C{values} cannot make settings."""

    def tokenRequired(self, values: dict[str, Any]) -> bool:
        return True

    def checkTLS(self, settings: Any, names: dict[str, str], where: str) -> None:
        """Raise L{gotunnel.tls.TLSSettingsError} if the TLS settings cannot be used."""

    def _checkTLS(self, source: Optional[str]) -> None:
        # A TLS setting is named as it was given: --tls-cert, or
        # server.tls_cert in the file (then named at the start of the line).
        names = {field: f"--{option}" if self[option] or not source
                 else f"{self.role}.{field}" for field, option in self.tlsOptions.items()}
        fromFile = any(getattr(self._settings, field) and not name.startswith("--")
                       for field, name in names.items())
        option = self.endpointOption[0]
        where = f"--{option}" if self[option] is not None or not source \
            else f"{self.role}.{option}"
        if not any(getattr(self._settings, field) for field in self.tlsOptions):
            # No TLS setting: nothing to check, and no TLS code to import.
            return
        from gotunnel import tls

        try:
            self.checkTLS(self._settings, names, where)
        except tls.TLSSettingsError as e:
            raise ConfigError(f"{source}: {e}" if fromFile else str(e)) from None

    def postOptions(self) -> None:
        source = findConfigFile(self["config"])
        values = self.fileValues(readConfigFile(source)) if source else {}
        values.update((field, self[option]) for option, field in self.fields.items()
                      if self[option] is not None)
        if self["no-zero-copy"]:
            values["zero_copy"] = False
        if self["no-splice-thread"]:
            values["splice_thread"] = False
        if not values.get("token") and self.tokenRequired(values):
            if source:
                raise ConfigError(f"{source}: {self.role}.token is missing "
                                  f"(set it there or give --token TOKEN)")
            raise usage.UsageError("a token is required: --token TOKEN")
        self.check(values, source)
        self._settings = self.settingsType(**values)
        option, kind = self.endpointOption
        checkEndpoint(getattr(self._settings, option), kind,
                      f"--{option}" if self[option] is not None or not source
                      else f"{source}: {self.role}.{option}")
        self._checkTLS(source)
        logs.logThroughTwistd(self, self._settings.log_level, self._settings.log_lang)

    def settings(self) -> Any:
        """The L{ServerSettings} or L{ClientSettings} made from the file and the options."""
        return self._settings


class ServerOptions(_SettingsOptions):
    synopsis = "[options]"
    longdesc = ("Publish the services of gotunnel clients on this machine's ports. "
                "Clients connect to the control endpoint.")

    optParameters = [
        _CONFIG_OPTION,
        ["listen", "l", None,
         "Control endpoint clients connect to (a Twisted endpoint string, "
         "e.g. tcp:17000 or ssl:17000:privateKey=key.pem:certKey=cert.pem) "
         f"(default: {ServerSettings.listen}; server.listen or server.addr)."],
        ["token", "t", None, "Shared secret clients must present (required; server.token)."],
        ["public-interface", None, None,
         "Address the public ports listen on (:: for IPv6 and IPv4) "
         f"(default: {ServerSettings.public_interface}; server.public_interface)."],
        ["data-timeout", None, None,
         "Seconds a user waits for the client's data channel before being closed "
         f"(default: {ServerSettings.data_channel_timeout:g}; server.data_channel_timeout)",
         _positive],
        ["heartbeat-timeout", None, None,
         "Seconds of silence after which a client is dropped "
         f"(default: {ServerSettings.heartbeat_timeout:g}; server.heartbeat_timeout)",
         _positive],
        ["port-lease", None, None,
         "Seconds a client whose control channel went keeps its public ports reserved "
         "for it; 0 frees them at once "
         f"(default: {ServerSettings.port_lease:g}; server.port_lease)", _secondsOrZero],
        ["max-mappings-per-client", None, None,
         "Mappings one client name may hold at once "
         f"(default: {ServerSettings.max_mappings_per_client}; "
         "server.max_mappings_per_client)", _atLeastOne],
        ["max-pool-count", None, None,
         "Data channels a client may open ahead of its users, per mapping; 0 turns "
         f"pooling off (default: {ServerSettings.max_pool_count}; server.max_pool_count)",
         _atLeastZero],
        ["max-users-per-port", None, None,
         "Users connected at once to one public port; more are refused at accept, 0 for no "
         f"limit (default: {ServerSettings.max_users_per_port}; server.max_users_per_port)",
         _atLeastZero],
        ["max-connection-rate", None, None,
         "New connections a second one source address may open to one public port; more "
         "are refused at accept, 0 for no limit "
         f"(default: {ServerSettings.max_connection_rate:g}; server.max_connection_rate)",
         _rate],
        ["bandwidth-limit", None, None,
         "Bytes a second each mapping may carry each way, e.g. 10MB or 512KiB; 0 for no cap "
         "(server.bandwidth_limit)", _bandwidth],
        ["ipv6-prefix", None, None,
         "IPv6 clients in one network of this prefix length count as one address in the "
         "caps on connections waiting for their first frame "
         f"(default: {ServerSettings.ipv6_prefix}; server.ipv6_prefix)", _ipv6Prefix],
        ["tls-cert", None, None,
         "Speak TLS on the control address, with this PEM certificate (and its chain) "
         "(server.tls_cert; needs --tls-key)."],
        ["tls-key", None, None, "The PEM private key of --tls-cert (server.tls_key)."],
        ["tls-client-ca", None, None,
         "Mutual TLS: require client certificates signed by the CA in this PEM file; "
         "a certificate's common name must be the client's name (server.tls_client_ca)."],
        ["http", None, None,
         "Endpoint of the HTTP virtual-host port, where clients' --http mappings are routed "
         "by Host, e.g. tcp:80 (server.vhost_http)."],
        ["https", None, None,
         "Endpoint of the HTTPS virtual-host port, where clients' --https mappings are routed "
         "by TLS server name (SNI), e.g. tcp:443 (server.vhost_https)."],
        ["subdomain-host", None, None,
         "Clients may claim NAME.DOMAIN on the virtual-host ports, e.g. tunnel.example.com "
         "(server.subdomain_host)."],
        ["vhost-head-timeout", None, None,
         "Seconds a user of a virtual-host port has to send its request head or ClientHello "
         f"(default: {ServerSettings.vhost_head_timeout:g}; server.vhost_head_timeout)",
         _positive],
        _busyPollOption("server", ServerSettings),
        ["admin", None, None,
         "Serve the admin API, /metrics and the dashboard on this endpoint, e.g. "
         "tcp:7400:interface=127.0.0.1 or ssl:7400:privateKey=key.pem:certKey=cert.pem "
         "(default: none; server.admin)."],
        ["admin-token", None, None,
         "Bearer token for the admin endpoint (server.admin_token)."],
        ["admin-user", None, None,
         "User name for the dashboard's login (server.admin_user; needs --admin-password)."],
        ["admin-password", None, None,
         "Password for the dashboard's login (server.admin_password)."],
    ] + _udpOptions("server", ServerSettings) + _logOptions("server")
    optFlags = [_NO_ZERO_COPY, _NO_SPLICE_THREAD,
                ["no-mux", None,
                 "Refuse to carry a mapping's users as streams of one data connection when "
                 "a client offers it (server.mux: false)."],
                ["no-forwarded-headers", None,
                 "Do not add X-Forwarded-For and X-Forwarded-Proto to requests routed by the "
                 "HTTP virtual-host port (server.vhost_forwarded_headers: false)."],
                ["no-udp", None, "Publish no UDP mappings: a client's register of protocol "
                                 "udp is refused (udp: false in the config file)."]]

    role = "server"
    firstOptions = ("token", "listen", "config")
    examples = ("--token s3cret",
                "--listen tcp:17000 --token s3cret --tls-cert server.pem --tls-key server.key")
    endpointOption = ("listen", "server")
    settingsType = ServerSettings
    fields = {"listen": "listen", "token": "token", "public-interface": "public_interface",
              "data-timeout": "data_channel_timeout", "heartbeat-timeout": "heartbeat_timeout",
              "port-lease": "port_lease",
              "max-mappings-per-client": "max_mappings_per_client",
              "max-pool-count": "max_pool_count", "busy-poll": "busy_poll",
              "max-users-per-port": "max_users_per_port",
              "max-connection-rate": "max_connection_rate",
              "bandwidth-limit": "bandwidth_limit",
              "ipv6-prefix": "ipv6_prefix",
              "tls-cert": "tls_cert", "tls-key": "tls_key", "tls-client-ca": "tls_client_ca",
              "http": "vhost_http", "https": "vhost_https", "subdomain-host": "subdomain_host",
              "vhost-head-timeout": "vhost_head_timeout",
              "admin": "admin", "admin-token": "admin_token", "admin-user": "admin_user",
              "admin-password": "admin_password",
              "log-level": "log_level", "log-lang": "log_lang",
              "connection-log": "connection_log", **_UDP_FIELDS}
    tlsOptions = {"tls_cert": "tls-cert", "tls_key": "tls-key",
                  "tls_client_ca": "tls-client-ca"}

    def fileValues(self, configFile: ConfigFile) -> dict[str, Any]:
        return configFile.serverValues()

    def tokenRequired(self, values: dict[str, Any]) -> bool:
        # With server.clients, only listed clients may register unless a
        # shared token is set too.
        return not values.get("clients")

    def check(self, values: dict[str, Any], source: Optional[str]) -> None:
        if self["no-mux"]:
            values["mux"] = False
        if self["no-forwarded-headers"]:
            values["vhost_forwarded_headers"] = False
        for option, field in (("http", "vhost_http"), ("https", "vhost_https")):
            if values.get(field):
                checkEndpoint(values[field], "server", f"--{option}" if self[option]
                              else f"{source}: server.{field}")
        if values.get("subdomain_host"):
            from gotunnel.vhost import normalDomain

            try:
                values["subdomain_host"] = normalDomain(values["subdomain_host"])
            except ValueError as e:
                raise usage.UsageError(f"--subdomain-host: {e}") from None
        if self["no-udp"]:
            values["udp"] = False
        # A listed name is its own only if nobody else holds its token: not
        # every holder of the shared token, nor another listed client.
        owners: dict[str, str] = {}
        if values.get("token"):
            owners[values["token"]] = "the shared server.token"
        for name, policy in values.get("clients", {}).items():
            other = owners.setdefault(policy.token, f"server.clients.{name}.token")
            if other != f"server.clients.{name}.token":
                problem = (f"server.clients.{name}.token is the same as {other}: whoever "
                           f"holds that could register as {name!r}; give {name!r} a token "
                           "of its own")
                # server.clients is read from a file only.
                raise ConfigError(f"{source}: {problem}")
        admin = values.get("admin")
        if admin:
            checkEndpoint(admin, "server", "--admin" if self["admin"] is not None or not source
                          else f"{source}: server.admin")
        if bool(values.get("admin_user")) != bool(values.get("admin_password")):
            raise usage.UsageError("--admin-user and --admin-password go together "
                                   "(server.admin_user, server.admin_password)")

    def checkTLS(self, settings: Any, names: dict[str, str], where: str) -> None:
        from gotunnel import tls

        tls.checkServerSettings(settings, names, where)


class ClientOptions(_SettingsOptions):
    synopsis = "[options] --map [LOCALHOST:]LOCALPORT:REMOTEPORT ..."
    longdesc = ("Publish local services through a gotunnel server. Each --map "
                "makes LOCALHOST:LOCALPORT reachable on the server's REMOTEPORT.")

    optParameters = [
        _CONFIG_OPTION,
        ["server", "s", None,
         "The server's control endpoint (a Twisted endpoint string, e.g. "
         "tcp:tunnel.example.com:17000, tcp:[::1]:17000 or tls:tunnel.example.com:17000) "
         f"(default: {ClientSettings.server}; client.server or client.server_addr)."],
        ["token", "t", None, "Shared secret of the server (required; client.token)."],
        ["name", "n", None, "This client's name (default: the host name; client.name)."],
        ["heartbeat-interval", None, None,
         f"Seconds between pings (default: {ClientSettings.heartbeat_interval:g}; "
         "client.heartbeat_interval)", _positive],
        ["health-check-interval", None, None,
         "Seconds between probes of the local services "
         f"(default: {ClientSettings.health_check_interval:g}; "
         "client.health_check_interval)", _positive],
        ["pool-count", None, None,
         "Data channels per mapping kept open ahead of users, so that a new connection "
         "does not wait for one; at most what the server allows, 0 for none "
         f"(default: {ClientSettings.pool_count}; client.pool_count)", _atLeastZero],
        ["ca", None, None,
         "With --tls: trust the CA certificates in this PEM file "
         "(default: the system's trusted CAs; client.tls_ca)."],
        ["server-name", None, None,
         "With --tls: the name the server's certificate must hold "
         "(default: the host of --server; client.tls_server_name)."],
        ["tls-client-cert", None, None,
         "With --tls: present this PEM certificate to a server that asks for one "
         "(mutual TLS; client.tls_client_cert; needs --tls-client-key)."],
        ["tls-client-key", None, None,
         "The PEM private key of --tls-client-cert (client.tls_client_key)."],
        ["register-timeout", None, None,
         "Seconds to wait for the server's answer to register, and to each data channel, "
         "before closing that connection (and, for register, connecting again) "
         f"(default: {ClientSettings.register_timeout:g}; client.register_timeout)",
         _positive],
        ["max-pending-data-channels", None, None,
         "Data channels per mapping being opened for users at once; the server's further "
         f"requests wait their turn (up to {MAX_WAITING_DATA_CHANNEL_REQUESTS}, then they are "
         "dropped) "
         f"(default: {ClientSettings.max_pending_data_channels}; "
         "client.max_pending_data_channels)", _atLeastOne],
        ["proxy-protocol", None, None,
         "Write a PROXY protocol header (v1: text, v2: binary) with the user's address "
         "first on every local connection, for mappings that do not set their own "
         "(client.tunnels[].proxy_protocol)", _proxyProtocol],
        _busyPollOption("client", ClientSettings),
    ] + _udpOptions("client", ClientSettings) + _logOptions("client")
    optFlags = [
        ["tls", None, "Connect with TLS and verify the server's certificate and name "
                      "(client.tls)."],
        ["exit-on-refusal", None,
         "Exit when the server refuses a mapping for a reason that asking again will not "
         "change (wrong token 3, port not allowed 4, port taken by another client 5, port "
         "busy on the server 6) instead of asking again (client.exit_on_refusal)."],
        ["mux", None, "Carry each mapping's users as streams of one data connection, where "
                      "the server agrees (client.mux; off by default, see bench/README.md)."],
        _NO_ZERO_COPY,
        _NO_SPLICE_THREAD,
    ]

    role = "client"
    firstOptions = ("token", "server", "map", "config")
    examples = ("--server tcp:tunnel.example.com:17000 --token s3cret --map 22:10022",
                "--config /etc/gotunnel/config.yaml")
    endpointOption = ("server", "client")
    settingsType = ClientSettings
    fields = {"server": "server", "token": "token", "name": "name",
              "heartbeat-interval": "heartbeat_interval",
              "health-check-interval": "health_check_interval",
              "pool-count": "pool_count", "busy-poll": "busy_poll",
              "register-timeout": "register_timeout",
              "max-pending-data-channels": "max_pending_data_channels",
              "ca": "tls_ca", "server-name": "tls_server_name",
              "tls-client-cert": "tls_client_cert", "tls-client-key": "tls_client_key",
              "log-level": "log_level", "log-lang": "log_lang",
              "connection-log": "connection_log", **_UDP_FIELDS}
    tlsOptions = {"tls": "tls", "tls_ca": "ca", "tls_server_name": "server-name",
                  "tls_client_cert": "tls-client-cert", "tls_client_key": "tls-client-key"}

    def __init__(self) -> None:
        super().__init__()
        self["map"] = []
        self["vhosts"] = []

    def opt_http(self, value: str) -> None:
        """
        A local web service to publish on the server's HTTP virtual-host port:
        DOMAIN[,DOMAIN...]=[LOCALHOST:]LOCALPORT; a DOMAIN may be *.example.com, and
        a name without a dot is a subdomain of the server's subdomain_host (repeatable).
        """
        self._vhost(value, "http")

    def opt_https(self, value: str) -> None:
        """
        A local TLS service to publish on the server's HTTPS virtual-host port,
        routed by server name (SNI), its TLS untouched:
        DOMAIN[,DOMAIN...]=[LOCALHOST:]LOCALPORT (repeatable).
        """
        self._vhost(value, "https")

    def _vhost(self, value: str, kind: str) -> None:
        from gotunnel.vhost import normalDomain

        try:
            mapping = parseVirtualHost(value, kind)
            domains = tuple(normalDomain(domain) for domain in mapping.domains)
            if mapping.subdomain:
                normalDomain(mapping.subdomain)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self["vhosts"].append(dataclasses.replace(mapping, domains=domains))

    def opt_map(self, value: str) -> None:
        """
        A local service to publish: [udp:][LOCALHOST:]LOCALPORT:REMOTEPORT
        (repeatable; replaces the services of the config file; udp: publishes
        a UDP service).
        """
        try:
            self["map"].append(parseMapping(value))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    opt_m = opt_map

    def fileValues(self, configFile: ConfigFile) -> dict[str, Any]:
        return configFile.clientValues()

    def checkTLS(self, settings: Any, names: dict[str, str], where: str) -> None:
        from gotunnel import tls

        tls.checkClientSettings(settings, names, where, names["tls"])

    def check(self, values: dict[str, Any], source: Optional[str]) -> None:
        if self["tls"]:
            values["tls"] = True
        if values.get("server"):
            values["server"] = clientEndpointString(values["server"])
        if self["exit-on-refusal"]:
            values["exit_on_refusal"] = True
        if self["mux"]:
            values["mux"] = True
        if self["map"] or self["vhosts"]:
            values["mappings"] = list(self["map"]) + list(self["vhosts"])
        if self["proxy-protocol"] and values.get("mappings"):
            # Not for UDP: a PROXY header goes first on a TCP connection.
            values["mappings"] = [
                mapping if mapping.proxy_protocol or mapping.protocol == "udp" else
                dataclasses.replace(mapping, proxy_protocol=self["proxy-protocol"])
                for mapping in values["mappings"]]
        if not values.get("mappings"):
            if source:
                raise ConfigError(
                    f"{source}: nothing to publish: set client.local_ports (with "
                    f"client.remote_port) or client.tunnels, or give --map")
            raise usage.UsageError(
                "nothing to publish: give --map [LOCALHOST:]LOCALPORT:REMOTEPORT "
                "or --http DOMAIN=[LOCALHOST:]LOCALPORT")
        # 0 (the server chooses) may be asked for more than once; a virtual host has no port;
        # UDP 53 and TCP 53 are two ports.
        remotePorts = [(m.protocol, m.remote_port) for m in values["mappings"]
                       if m.remote_port and not m.vhost]
        if len(set(remotePorts)) != len(remotePorts):
            raise usage.UsageError("two --map options name the same remote port")
        if not values.get("name"):
            values.pop("name", None)
            if values.get("tls_client_cert"):
                # With mutual TLS the server knows us by the certificate's name.
                from gotunnel import tls

                values["name"] = tls.certificateFileName(values["tls_client_cert"])


def _raiseOpenFileLimit() -> None:
    # In makeService, not in the services: a program that embeds them owns
    # its process's limits.
    before, after = rlimits.raiseOpenFileLimit()
    if after > before:
        log.info("open-file limit raised from {before} to {after}", before=before, after=after)


def _cannotListenOnOneLine(options: usage.Options) -> None:
    """
    Under twistd, a control port that cannot be listened on (busy, or not
    ours to take) ends twistd with the 39-line traceback of its own start-up:
    say it in one line instead, as the console scripts do.  twistd has
    already removed its pidfile and told a waiting parent; the exit status
    stays 1.
    """
    if getattr(options, "parent", None) is None:
        return
    previous = sys.excepthook

    def excepthook(kind, value, traceback) -> None:
        if isinstance(value, CannotListenError):
            log.critical("cannot start: {why}", why=str(value))
        else:
            previous(kind, value, traceback)

    sys.excepthook = excepthook


def makeServerService(options: ServerOptions, reactor=None) -> IService:
    from gotunnel.server import TunnelServerService

    _raiseOpenFileLimit()
    _cannotListenOnOneLine(options)
    return TunnelServerService(options.settings(), reactor=reactor)


def _exitStatusAfterTwistd(status: int) -> None:
    """
    Make the process exit with C{status} once twistd is done: twistd
    returns 0 when its reactor stops, whatever stopped it.  At exit, it has
    removed its pidfile and written its last log line.
    """

    def exit() -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
        os._exit(status)

    atexit.register(exit)


def makeClientService(options: ClientOptions, reactor=None) -> IService:
    _raiseOpenFileLimit()
    service = TunnelClientService(options.settings(), reactor=reactor)
    if getattr(options, "parent", None) is not None:
        service.whenExiting = _exitStatusAfterTwistd
    return service

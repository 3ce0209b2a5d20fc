"""
Command-line options of both roles (L{ServerOptions}, L{ClientOptions}): the
one parser behind the twistd plugins, the console scripts and C{python -m
gotunnel} (L{gotunnel.cli.tap} makes the services from them).

Settings come from config.yaml (./config.yaml if it exists, or --config
FILE), and options given on the command line override the file's keys.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import textwrap
from typing import Any, Callable, Optional

import twisted
from twisted.python import usage

from gotunnel import __version__, logs
from gotunnel.cli import footprint
from gotunnel.config.mappings import clientEndpointString, parseMapping, parseVirtualHost
from gotunnel.config.settings import ClientSettings, ServerSettings
from gotunnel.config.yamlfile import ConfigError, ConfigFile, findConfigFile, readConfigFile
from gotunnel.config.kinds import PROXY_PROTOCOL
from gotunnel.config.spec import CommandLine, coercer, commandLine
from gotunnel.relay.tcpinternals import listeningPort

_CONFIG_OPTION = [
    "config", "c", None,
    "Read settings from this YAML file (default: ./config.yaml, if it exists). "
    "Options given here override its keys."]

_SERVER_OPTIONS = commandLine(ServerSettings, "server")
_CLIENT_OPTIONS = commandLine(ClientSettings, "client")


def _tlsOptions(options: CommandLine) -> dict[str, str]:
    """Settings field -> option name, for the TLS settings among C{options}."""
    byField = {field: option for option, field in options.fields.items()}
    byField.update((field, option) for option, (field, _) in options.flagValues.items())
    return {field: option for field, option in byField.items()
            if field == "tls" or field.startswith("tls_")}


def checkEndpoint(description: str, kind: str, where: str) -> None:
    """
    Refuse, as a usage error naming C{where}, an endpoint string that
    Twisted cannot parse or whose port is out of range, before anything
    starts.  C{kind} is "server" (listen) or "client" (connect).
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import clientFromString, serverFromString

    parse = serverFromString if kind == "server" else clientFromString
    try:
        endpoint = parse(reactor, description)
    except Exception as e:
        raise usage.UsageError(
            f"{where} {description!r} is not a usable endpoint: {e}") from None
    # Twisted's endpoints keep their port to themselves (see tcpinternals).
    port = listeningPort(endpoint)
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
    flagValues: dict[str, tuple[str, Any]]
    """Flag -> (settings field, the value it sets), for the flags that override the file."""
    firstOptions: tuple[str, ...]
    """The options a person needs first, in the order --help lists them."""
    examples: tuple[str, ...]
    """Command lines --help ends with, after the program's name."""
    prog: Optional[str] = None
    """The console script's name, for the usage line; None: gotunnel-ROLE."""
    ownsProcess = False
    """Whether these options start the process's one server or client (the
    console scripts set it; under twistd, options with a parent do), so that
    a plain run may leave pyOpenSSL out of it (L{gotunnel.cli.footprint})."""

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

    def needsOpenSSL(self, values: dict[str, Any]) -> bool:
        """Whether settings C{values} may need pyOpenSSL in this process."""
        return footprint.usesTLS(values, (self.endpointOption[0],))

    def startsProcess(self) -> bool:
        """Whether these options start the process's server or client (see L{ownsProcess})."""
        return self.ownsProcess or self.parent is not None

    def _leaveOutUnusedOpenSSL(self, values: dict[str, Any]) -> None:
        # Before anything imports the reactor or the endpoints: both load
        # pyOpenSSL if they can.
        if self.startsProcess() and not self.needsOpenSSL(values):
            footprint.leaveOutOpenSSL()

    def checkTLS(self, settings: Any, names: dict[str, str], where: str) -> None:
        """Raise L{gotunnel.tls.contexts.TLSSettingsError} if the TLS settings cannot be used."""

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
        from gotunnel.tls import contexts as tls

        try:
            self.checkTLS(self._settings, names, where)
        except tls.TLSSettingsError as e:
            raise ConfigError(f"{source}: {e}" if fromFile else str(e)) from None

    def postOptions(self) -> None:
        source = findConfigFile(self["config"])
        values = self.fileValues(readConfigFile(source)) if source else {}
        values.update((field, self[option]) for option, field in self.fields.items()
                      if self[option] is not None)
        values.update(setting for option, setting in self.flagValues.items() if self[option])
        if not values.get("token") and self.tokenRequired(values):
            if source:
                raise ConfigError(f"{source}: {self.role}.token is missing "
                                  f"(set it there or give --token TOKEN)")
            raise usage.UsageError("a token is required: --token TOKEN")
        self._leaveOutUnusedOpenSSL(values)
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

    optParameters = [_CONFIG_OPTION] + _SERVER_OPTIONS.parameters
    optFlags = _SERVER_OPTIONS.flags

    role = "server"
    firstOptions = ("token", "listen", "config")
    examples = ("--token s3cret",
                "--listen tcp:17000 --token s3cret --tls-cert server.pem --tls-key server.key")
    endpointOption = ("listen", "server")
    settingsType = ServerSettings
    fields = _SERVER_OPTIONS.fields
    flagValues = _SERVER_OPTIONS.flagValues
    tlsOptions = _tlsOptions(_SERVER_OPTIONS)

    def fileValues(self, configFile: ConfigFile) -> dict[str, Any]:
        return configFile.serverValues()

    def tokenRequired(self, values: dict[str, Any]) -> bool:
        # With server.clients, only listed clients may register unless a
        # shared token is set too.
        return not values.get("clients")

    def needsOpenSSL(self, values: dict[str, Any]) -> bool:
        # The admin API and virtual hosts read the certificate names of TLS
        # peers: their code imports the TLS code, a plain run's or not.
        return super().needsOpenSSL(values) or any(
            values.get(field) for field in ("admin", "vhost_http", "vhost_https", "subdomain_host"))

    def check(self, values: dict[str, Any], source: Optional[str]) -> None:
        for option, field in (("http", "vhost_http"), ("https", "vhost_https")):
            if values.get(field):
                checkEndpoint(values[field], "server", f"--{option}" if self[option]
                              else f"{source}: server.{field}")
        if values.get("subdomain_host"):
            from gotunnel.server.vhostroutes import normalDomain

            try:
                values["subdomain_host"] = normalDomain(values["subdomain_host"])
            except ValueError as e:
                raise usage.UsageError(f"--subdomain-host: {e}") from None
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
        from gotunnel.tls import contexts as tls

        tls.checkServerSettings(settings, names, where)


class ClientOptions(_SettingsOptions):
    synopsis = "[options] --map [LOCALHOST:]LOCALPORT:REMOTEPORT ..."
    longdesc = ("Publish local services through a gotunnel server. Each --map "
                "makes LOCALHOST:LOCALPORT reachable on the server's REMOTEPORT.")

    optParameters = [_CONFIG_OPTION] + _CLIENT_OPTIONS.parameters + [
        ["proxy-protocol", None, None,
         "Write a PROXY protocol header (v1: text, v2: binary) with the user's address "
         "first on every local connection, for mappings that do not set their own "
         "(client.tunnels[].proxy_protocol)",
         coercer(PROXY_PROTOCOL, "proxy-protocol")],
    ]
    optFlags = _CLIENT_OPTIONS.flags

    role = "client"
    firstOptions = ("token", "server", "map", "config")
    examples = ("--server tcp:tunnel.example.com:17000 --token s3cret --map 22:10022",
                "--config /etc/gotunnel/config.yaml")
    endpointOption = ("server", "client")
    settingsType = ClientSettings
    fields = _CLIENT_OPTIONS.fields
    flagValues = _CLIENT_OPTIONS.flagValues
    tlsOptions = _tlsOptions(_CLIENT_OPTIONS)

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
        from gotunnel.server.vhostroutes import normalDomain

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
        from gotunnel.tls import contexts as tls

        tls.checkClientSettings(settings, names, where, names["tls"])

    def needsOpenSSL(self, values: dict[str, Any]) -> bool:
        # A virtual host's mapping imports the server's vhost code (names).
        return (super().needsOpenSSL(values) or bool(self["vhosts"])
                or any(mapping.vhost for mapping in values.get("mappings", ())))

    def check(self, values: dict[str, Any], source: Optional[str]) -> None:
        if values.get("server"):
            values["server"] = clientEndpointString(values["server"])
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
                from gotunnel.tls import contexts as tls

                values["name"] = tls.certificateFileName(values["tls_client_cert"])

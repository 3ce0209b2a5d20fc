"""
The kinds of value a setting holds (seconds, a port, a flag, a log level
...): for each, how config.yaml's value is read and how a command-line
option's text is coerced, side by side, so that both check the same bounds.
See gotunnel.config.spec for how a setting names its kind.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional


from gotunnel.i18n import LANGUAGES
from gotunnel.server.portpolicy import MAX_REQUESTED_SOURCES, parseNetwork
from gotunnel.wire.messages import MAX_POOL
from gotunnel.wire.proxyprotocol import parseVersion
from gotunnel.relay.ratelimit import parseRate
from gotunnel.config.spec import Kind


def quoteEndpointArgument(argument: str) -> str:
    """
    C{argument} quoted for an endpoint string, as Twisted's
    C{twisted.internet.endpoints.quoteStringArgument} does: reading settings
    must not import that module, which loads pyOpenSSL before a plain run
    has decided to leave it out (L{gotunnel.cli.footprint}).
    """
    for special in "\\:":
        argument = argument.replace(special, "\\" + special)
    return argument


LOG_LEVELS = ("debug", "info", "warn", "error")
CONNECTION_LOG_LEVELS = ("info", "debug", "off")
"""Where the line about each ended user connection goes (connection_log)."""
MAX_BUSY_POLL = 10_000
MAX_CONNECTION_RATE = 1_000_000


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


# Each key's reader takes (value, the text it was written as, key name) and
# returns the value for the settings, or raises ValueError naming the key.
# An option's coerce takes (its text, --option) and raises ValueError with
# what usage.Options says after "Parameter type enforcement failed: ".


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


def _positive(text: str, option: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


SECONDS = Kind(_seconds, _positive, "Seconds, greater than 0.")


def _secondsOrZero(value: Any, text: Any, name: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be a number of seconds, 0 or more, got {value!r}")
    return float(value)


def _secondsOrZeroOption(text: str, option: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a number of seconds, 0 or more")
    return value


SECONDS_OR_ZERO = Kind(_secondsOrZero, _secondsOrZeroOption, "Seconds, 0 or more.")


def _flag(value: Any, text: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


FLAG = Kind(_flag, flag=True)


def wholeNumber(minimum: int, maximum: Optional[int] = None) -> Kind:
    """A whole number of at least C{minimum} (and at most C{maximum})."""
    bounds = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
    wanted = f"a whole number {'of ' if maximum is None else ''}{bounds}"

    def read(value: Any, text: Any, name: str) -> int:
        value = _number(value)
        if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
                or (maximum is not None and value > maximum)):
            raise ValueError(f"{name} must be {wanted}, got {value!r}")
        return value

    def coerce(text: str, option: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise ValueError(f"{option} must be {wanted}, got {text!r}")
        return value

    return Kind(read, coerce, f"A whole number, {bounds}.")


COUNT = wholeNumber(1)
COUNT_OR_ZERO = wholeNumber(0)
POOL_COUNT = wholeNumber(0, MAX_POOL)
"""Pooled data channels per mapping: a server offering more than a client
accepts in C{register_resp.pool} would have every registration refused."""
BUSY_POLL = wholeNumber(0, MAX_BUSY_POLL)
IPV6_PREFIX = wholeNumber(1, 128)


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
    return f"tcp:{port}:interface={quoteEndpointArgument(host)}" if host else f"tcp:{port}"


def _serverAddress(value: Any, text: Any, name: str) -> str:
    host, port = _hostAndPort(value, text, name)
    return f"tcp:{quoteEndpointArgument(host or '127.0.0.1')}:{port}"


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
    from gotunnel.server.vhostroutes import normalDomain

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



def _portRanges(value: Any, text: Any, name: str) -> tuple[range, ...]:
    return tuple(_listOf(_portRange)(value, text, name))


def _rateOption(text: str, option: str) -> float:
    value = float(text)
    if not math.isfinite(value) or not 0 <= value <= MAX_CONNECTION_RATE:
        raise ValueError(f"must be from 0 to {MAX_CONNECTION_RATE}")
    return value


def listOf(kind: Kind) -> Kind:
    """A list of values of C{kind}, or one alone (config.yaml only)."""
    return Kind(_listOf(kind.read))


TEXT = Kind(_text)
PORT = Kind(_port)
REMOTE_PORT = Kind(_remotePort)
LISTEN_ADDRESS = Kind(_listenAddress)
SERVER_ADDRESS = Kind(_serverAddress)
PORT_RANGES = Kind(_portRanges)
NETWORKS = Kind(_networks)
REQUESTED_NETWORKS = Kind(_requestedNetworks)
VHOST_TYPE = Kind(_vhostType)
PROTOCOL = Kind(_protocol)
DOMAIN = Kind(_domain)
"""On the command line, text: --subdomain-host is checked with the other settings."""
SUBDOMAIN = Kind(_subdomain)
DOMAINS = Kind(_domains)
LOG_LEVEL = Kind(_logLevel, parseLogLevel, f"One of {', '.join(LOG_LEVELS)}.")
LOG_LANG = Kind(_logLang, parseLogLang, f"One of {', '.join(LANGUAGES)}.")
CONNECTION_LOG = Kind(_connectionLog, parseConnectionLog,
                      f"One of {', '.join(CONNECTION_LOG_LEVELS)}.")
RATE = Kind(_rate, _rateOption, "Connections a second, 0 for no limit.")
BANDWIDTH = Kind(_bandwidth, parseRate, "Bytes a second: 10MB, 512KiB, 1GB.")
PROXY_PROTOCOL = Kind(_proxyProtocol, parseVersion, "v1 or v2.")

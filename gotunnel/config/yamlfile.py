"""
The config file (config.yaml, the Go gotunnel's keys plus a few of ours):
found, read, and turned into the fields of L{ServerSettings} and
L{ClientSettings}, with one sentence naming the file and the key for what
cannot be used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any, Callable, NoReturn, Optional

from twisted.python import usage

from gotunnel.config.mappings import Mapping
from gotunnel.config.settings import ClientSettings, ServerSettings
from gotunnel.config.spec import yamlKeys

DEFAULT_REMOTE_PORT = 10022
CONFIG_FILE = "config.yaml"


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

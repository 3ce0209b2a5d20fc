"""
Settings of the server and the client: one typed object each, built from
command-line options (and, in time, config.yaml) at the edge.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

DEFAULT_CONTROL_PORT = 17000


@dataclass
class ServerSettings:
    listen: str = f"tcp:{DEFAULT_CONTROL_PORT}"
    token: str = ""
    public_interface: str = "0.0.0.0"
    public_backlog: int = 1024
    data_channel_timeout: float = 60.0
    heartbeat_timeout: float = 30.0
    heartbeat_check_interval: float = 5.0
    first_frame_timeout: float = 10.0


@dataclass(frozen=True)
class Mapping:
    """One published service: LOCAL_HOST:LOCAL_PORT reachable on REMOTE_PORT."""

    local_host: str
    local_port: int
    remote_port: int

    def __str__(self) -> str:
        host = f"[{self.local_host}]" if ":" in self.local_host else self.local_host
        return f"{host}:{self.local_port}->{self.remote_port}"


@dataclass
class ClientSettings:
    server: str = f"tcp:127.0.0.1:{DEFAULT_CONTROL_PORT}"
    token: str = ""
    name: str = field(default_factory=socket.gethostname)
    mappings: list[Mapping] = field(default_factory=list)
    heartbeat_interval: float = 10.0
    health_check_interval: float = 30.0
    reconnect_max_delay: float = 16.0


def parsePort(text: str, what: str) -> int:
    """
    A TCP port from 1 to 65535, or ValueError naming C{what}.
    """
    try:
        port = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{what} must be from 1 to 65535, got {port}")
    return port


def parseMapping(text: str) -> Mapping:
    """
    Parse C{[LOCALHOST:]LOCALPORT:REMOTEPORT}; an IPv6 host goes in brackets
    (C{[::1]:22:10022}).  The local host defaults to 127.0.0.1.
    """
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
    return Mapping(host, parsePort(parts[0], f"local port in {text!r}"),
                   parsePort(parts[1], f"remote port in {text!r}"))

"""
Command-line options and makeService for both roles: the one code path
behind the twistd plugins, the console scripts and C{python -m gotunnel}.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from gotunnel.client import TunnelClientService
from gotunnel.config import ClientSettings, ServerSettings, parseMapping


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


_positive.coerceDoc = "Seconds, greater than 0."  # type: ignore[attr-defined]


class ServerOptions(usage.Options):
    synopsis = "[options]"
    longdesc = ("Publish the services of gotunnel clients on this machine's ports. "
                "Clients connect to the control endpoint.")

    optParameters = [
        ["listen", "l", "tcp:17000",
         "Control endpoint clients connect to (a Twisted endpoint string, "
         "e.g. tcp:17000 or ssl:17000:privateKey=key.pem:certKey=cert.pem)."],
        ["token", "t", None, "Shared secret clients must present (required)."],
        ["public-interface", None, "0.0.0.0",
         "Address the public ports listen on (:: for IPv6 and IPv4)."],
        ["data-timeout", None, 60.0,
         "Seconds a user waits for the client's data channel before being closed.",
         _positive],
        ["heartbeat-timeout", None, 30.0,
         "Seconds of silence after which a client is dropped.", _positive],
    ]

    def postOptions(self) -> None:
        if not self["token"]:
            raise usage.UsageError("a token is required: --token TOKEN")

    def settings(self) -> ServerSettings:
        return ServerSettings(
            listen=self["listen"], token=self["token"],
            public_interface=self["public-interface"],
            data_channel_timeout=self["data-timeout"],
            heartbeat_timeout=self["heartbeat-timeout"])


class ClientOptions(usage.Options):
    synopsis = "[options] --map [LOCALHOST:]LOCALPORT:REMOTEPORT ..."
    longdesc = ("Publish local services through a gotunnel server. Each --map "
                "makes LOCALHOST:LOCALPORT reachable on the server's REMOTEPORT.")

    optParameters = [
        ["server", "s", "tcp:127.0.0.1:17000",
         "The server's control endpoint (a Twisted endpoint string, e.g. "
         "tcp:tunnel.example.com:17000 or tls:tunnel.example.com:17000)."],
        ["token", "t", None, "Shared secret of the server (required)."],
        ["name", "n", None, "This client's name (default: the host name)."],
        ["heartbeat-interval", None, 10.0, "Seconds between pings.", _positive],
        ["health-check-interval", None, 30.0,
         "Seconds between probes of the local services.", _positive],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["map"] = []

    def opt_map(self, value: str) -> None:
        """
        A local service to publish: [LOCALHOST:]LOCALPORT:REMOTEPORT
        (repeatable).
        """
        try:
            self["map"].append(parseMapping(value))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    opt_m = opt_map

    def postOptions(self) -> None:
        if not self["token"]:
            raise usage.UsageError("a token is required: --token TOKEN")
        if not self["map"]:
            raise usage.UsageError(
                "nothing to publish: give --map [LOCALHOST:]LOCALPORT:REMOTEPORT")
        remotePorts = [m.remote_port for m in self["map"]]
        if len(set(remotePorts)) != len(remotePorts):
            raise usage.UsageError("two --map options name the same remote port")

    def settings(self) -> ClientSettings:
        settings = ClientSettings(
            server=self["server"], token=self["token"], mappings=list(self["map"]),
            heartbeat_interval=self["heartbeat-interval"],
            health_check_interval=self["health-check-interval"])
        if self["name"]:
            settings.name = self["name"]
        return settings


def makeServerService(options: ServerOptions, reactor=None) -> IService:
    from gotunnel.server import TunnelServerService

    return TunnelServerService(options.settings(), reactor=reactor)


def makeClientService(options: ClientOptions, reactor=None) -> IService:
    return TunnelClientService(options.settings(), reactor=reactor)

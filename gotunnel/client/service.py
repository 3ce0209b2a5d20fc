"""
The tunnel client: one L{gotunnel.client.mapping.ClientMappingService} per
mapping, sharing the client's splicer and the server's endpoints.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.application.service import MultiService
from twisted.internet import error

from gotunnel.client.endpoints import ServerEndpoints
from gotunnel.client.mapping import ClientMappingService
from gotunnel.config.settings import ClientSettings
from gotunnel.relay.splicer import Splicer


class TunnelClientService(MultiService):
    """The whole client: one L{ClientMappingService} per mapping."""

    exitStatus: Optional[int] = None
    """Set when the client gave up (C{exit_on_refusal}): the process's exit status."""
    whenExiting: Optional[Callable[[int], None]] = None
    """Told the exit status before the reactor is stopped (see tap.py, for twistd)."""

    def __init__(self, settings: ClientSettings, reactor=None,
                 splicer: Optional[Splicer] = None) -> None:
        """
        @param splicer: how every mapping's data channels are spliced; by
            default as C{settings} say.  Its splice thread becomes a child.
        """
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.settings = settings
        from gotunnel.udp.tunnels import UdpTunnelService

        self.splicer = splicer or Splicer.fromSettings(settings, reactor)
        if self.splicer.spliceThread is not None:
            self.splicer.spliceThread.setServiceParent(self)
        endpoints = ServerEndpoints(reactor, settings)
        self.tunnels = [
            (UdpTunnelService if mapping.protocol == "udp" else ClientMappingService)(
                settings, mapping, endpoints.control, reactor, endpoints.dataChannel,
                self.splicer)
            for mapping in settings.mappings]
        for tunnel in self.tunnels:
            tunnel.setServiceParent(self)

    def exit(self, status: int) -> None:
        """Stop the reactor, for the process to exit with C{status}."""
        if self.exitStatus is not None:
            return
        self.exitStatus = status
        if self.whenExiting is not None:
            self.whenExiting(status)
        try:
            self.reactor.stop()
        except error.ReactorNotRunning:
            pass

"""
The client facing a hostile server over loopback: a small server of the
test's own that accepts the registration and then asks for data channels
without end, answering none of them.
"""

from __future__ import annotations

import json

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.basic import Int32StringReceiver
from twisted.trial import unittest

from gotunnel.client.service import TunnelClientService
from gotunnel.config.mappings import Mapping
from gotunnel.config.settings import ClientSettings
from tests.support import (
    HOST, Collector, deferLater, freePort, listenTarget, waitUntil, within,
)

FLOOD = 3000
WAIT = 60


class HostileServerConnection(Int32StringReceiver):
    """Registers any control channel, floods it; holds data channels unanswered."""

    def connectionMade(self) -> None:
        self.factory.connections.add(self)

    def stringReceived(self, frame: bytes) -> None:
        kind = json.loads(frame).get("type")
        if kind == "register":
            self.sendString(b'{"type":"register_resp","status":"ok"}')
            self.transport.write(b"".join(
                self._frame({"type": "open_data_channel", "local_port": 1,
                             "conn_id": f"user-{n}"}) for n in range(FLOOD)))
        elif kind == "data_channel":
            self.factory.held.add(self)
            self.factory.most = max(self.factory.most, len(self.factory.held))
            self.factory.dataChannels.add(len(self.factory.held))

    def _frame(self, message: dict) -> bytes:
        body = json.dumps(message).encode()
        return len(body).to_bytes(4, "big") + body

    def connectionLost(self, reason=None) -> None:
        self.factory.connections.discard(self)
        self.factory.held.discard(self)


class HostileServer(Factory):
    protocol = HostileServerConnection

    def __init__(self) -> None:
        self.connections: set[HostileServerConnection] = set()
        self.held: set[HostileServerConnection] = set()
        self.most = 0
        self.dataChannels = Collector()
        """The number held, each time one more data channel says what it is."""


class HostileServerTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_openDataChannelFloodHeldToTheCap(self):
        """
        3,000 open_data_channel frames at once: the client connects
        max_pending_data_channels data channels (its default, 256), holds no
        more while none is answered, and keeps the rest of the requests
        waiting.
        """
        server = HostileServer()
        port = yield TCP4ServerEndpoint(reactor, 0, interface=HOST).listen(server)
        self.addCleanup(port.stopListening)

        def closeAll():
            for connection in list(server.connections):
                connection.transport.abortConnection()

        self.addCleanup(closeAll)
        settings = ClientSettings(
            server=f"tcp:{HOST}:{port.getHost().port}", token="t", name="victim",
            mappings=[Mapping(HOST, listenTarget(self), freePort())])
        cap = settings.max_pending_data_channels
        self.assertEqual(cap, 256)
        client = TunnelClientService(settings, reactor=reactor)
        client.startService()
        self.addCleanup(lambda: client.stopService() if client.running else None)
        [tunnel] = client.tunnels

        yield within(server.dataChannels.whenMatched(lambda held: held >= cap), WAIT,
                     f"{cap} data channels at the server")
        yield waitUntil(lambda: len(tunnel.opening) + len(tunnel.waitingRequests) == FLOOD,
                        WAIT, f"the client to read all {FLOOD} requests")
        # Every request has been read and none answered: any further data
        # channel would be on its way now.
        yield deferLater(0.5)
        self.assertEqual(server.most, cap)
        self.assertEqual(len(server.held), cap)
        self.assertEqual(len(server.connections), cap + 1)
        self.assertEqual(len(tunnel.opening), cap)
        self.assertEqual(len(tunnel.waitingRequests), FLOOD - cap)
        self.assertEqual(tunnel.droppedRequests, 0)

"""
The whole tunnel in memory: a server service and a client service on one
L{MemoryReactorClock}, every connection between them a L{twisted.test.iosim}
pump.  Register, a user, the data channel and the splice, bytes checked end
to end, with no socket and no wall-clock wait.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import ClientFactory, Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter, IOPump
from twisted.trial import unittest

from gotunnel.client.service import TunnelClientService
from gotunnel.config.mappings import Mapping
from gotunnel.config.settings import ClientSettings, ServerSettings
from gotunnel.server.service import TunnelServerService

from tests.support import TOKEN, ConnectionTracker, Echo, User

CONTROL_PORT = 7000
LOCAL_PORT = 7001
REMOTE_PORT = 7002
"""Port numbers in the memory reactor only: nothing is bound."""


class UserClientFactory(ClientFactory):
    protocol = User


class InMemoryTunnelTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.completer = ConnectionCompleter(self.reactor)
        self.pumps: list[IOPump] = []
        local = Factory.forProtocol(Echo)
        local.tracker = self.local = ConnectionTracker()
        self.reactor.listenTCP(LOCAL_PORT, local)
        self.server = TunnelServerService(
            ServerSettings(listen=f"tcp:{CONTROL_PORT}", token=TOKEN), reactor=self.reactor)
        self.client = TunnelClientService(
            ClientSettings(server=f"tcp:127.0.0.1:{CONTROL_PORT}", token=TOKEN, name="in-memory",
                           mappings=[Mapping("127.0.0.1", LOCAL_PORT, REMOTE_PORT)]),
            reactor=self.reactor)
        self.server.startService()
        self.client.startService()
        self.addCleanup(self.stop)

    def stop(self) -> None:
        """Stop both services; every connection closes inside the memory reactor."""
        for service in (self.client, self.server):
            stopped = service.stopService()
            self.settle()
            self.successResultOf(stopped)

    def settle(self) -> None:
        """Complete every connection asked for, and move bytes until none move."""
        moved = True
        while moved:
            moved = False
            pump = self.completer.succeedOnce()
            while pump is not None:
                self.pumps.append(pump)
                moved = True
                pump = self.completer.succeedOnce()
            for pump in self.pumps:
                moved = pump.flush() or moved
            listening = {port for port, *_ in self.reactor.tcpServers}
            for index, (host, port, factory, *_) in reversed(
                    list(enumerate(self.reactor.tcpClients))):
                if port not in listening:
                    del self.reactor.tcpClients[index]
                    connector = self.reactor.connectors.pop(index)
                    factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
                    moved = True

    def connectUser(self) -> User:
        """A user of the published port (connected at the next L{settle})."""
        user = User()
        factory = UserClientFactory()
        factory.buildProtocol = lambda addr: user
        self.reactor.connectTCP("127.0.0.1", REMOTE_PORT, factory)
        return user

    def test_userReachesTheLocalServiceThroughTheTunnel(self) -> None:
        """
        The client registers; a user of the public port gets a data channel
        spliced to the local service, and what the user sends comes back.
        """
        self.settle()
        registered = self.successResultOf(self.client.tunnels[0].whenRegistered())
        self.assertIsNotNone(registered)
        self.assertIn(REMOTE_PORT, [port for port, *_ in self.reactor.tcpServers])
        user = self.connectUser()
        payload = bytes(range(256)) * 64
        self.settle()
        user.transport.write(payload)
        self.settle()
        self.assertEqual(user.data, payload)
        user.transport.loseConnection()
        self.settle()
        self.assertTrue(self.local.lost[-1].called, "the user's close reached the local service")

    def test_serviceGoneClosesTheUserWithoutWaiting(self) -> None:
        """
        The local service stops after the client's probe found it up (so the
        port stays published): the data channel cannot reach it, and the
        user is closed, having received nothing, before any timer runs (the
        clock never moves).
        """
        self.settle()
        self.successResultOf(self.client.tunnels[0].whenRegistered())
        self.reactor.tcpServers[:] = [
            server for server in self.reactor.tcpServers if server[0] != LOCAL_PORT]
        user = self.connectUser()
        self.settle()
        user.transport.write(b"anyone there?")
        self.settle()
        self.assertEqual(self.successResultOf(user.closed), b"")
        self.assertEqual(self.reactor.seconds(), 0)

"""
IPv6 as a person writes it: the console scripts over ::1 with the bracketed
spellings docs/configuration.md gives, and a server name that has only an
IPv6 address.
"""

from __future__ import annotations

import re
import socket

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.protocol import Factory
from twisted.trial import unittest
from zope.interface import implementer

from gotunnel.client.endpoints import ServerEndpoints
from gotunnel.config.mappings import Mapping, clientEndpointString
from gotunnel.config.settings import ClientSettings
from tests.support import (
    ConnectionTracker, Echo, User, spawn, temporaryDirectory, venvScript, within,
)

START_TIMEOUT = 60
TOKEN = "v6-secret"
LISTENING = re.compile(r"control channel listening on ::1:(\d+)")


def ipv6Loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def freePort6() -> int:
    """A TCP port on ::1 that the OS says is free now."""
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


def listenTarget6(testCase) -> int:
    """An echo service on ::1, closed when the test ends; its port."""
    factory = Factory.forProtocol(Echo)
    factory.noisy = False
    factory.tracker = ConnectionTracker()
    port = reactor.listenTCP(0, factory, interface="::1")

    def cleanup():
        for p in factory.tracker.protocols:
            p.transport.loseConnection()
        return defer.DeferredList([defer.maybeDeferred(port.stopListening)] +
                                  factory.tracker.lost)

    testCase.addCleanup(cleanup)
    return port.getHost().port


class EndpointStringTests(unittest.TestCase):
    def test_bracketedHost(self):
        self.assertEqual(clientEndpointString("tcp:[::1]:17000"), r"tcp:\:\:1:17000")
        self.assertEqual(clientEndpointString("tcp:[2001:db8::5]:17000:timeout=5"),
                         r"tcp:2001\:db8\:\:5:17000:timeout=5")

    def test_othersUnchanged(self):
        for description in ("tcp:127.0.0.1:17000", "tcp:tunnel.example.com:17000",
                            r"tcp:\:\:1:17000", "tls:tunnel.example.com:17000",
                            "tcp:[::1", "tcp:[::1]x:1", "unix:/tmp/[x]"):
            self.assertEqual(clientEndpointString(description), description)


@implementer(IHostResolution)
class Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class OnlyIPv6Resolver:
    """Every name is ::1, and has no IPv4 address."""

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,
                        transportSemantics="TCP"):
        receiver.resolutionBegan(Resolution(hostName))
        if addressTypes is None or IPv6Address in addressTypes:
            receiver.addressResolved(IPv6Address("TCP", "::1", portNumber))
        receiver.resolutionComplete()
        return receiver


class ServerNameTests(unittest.TestCase):
    def setUp(self):
        if not ipv6Loopback():
            raise unittest.SkipTest("this machine has no IPv6 loopback")

    @defer.inlineCallbacks
    def test_nameWithOnlyAnIPv6Address(self):
        """
        A server named in a tcp: endpoint is looked up for IPv6 as well as
        IPv4, and a data channel goes to the IPv6 address the control
        channel reached.
        """
        target = listenTarget6(self)
        previous = reactor.nameResolver
        reactor.installNameResolver(OnlyIPv6Resolver())
        self.addCleanup(reactor.installNameResolver, previous)
        endpoints = ServerEndpoints(reactor, ClientSettings(
            server=f"tcp:server.v6.test:{target}", token="t",
            mappings=[Mapping("127.0.0.1", 22, 10022)]))
        user = yield within(connectProtocol(endpoints.control, User()), 30,
                            "a connection to server.v6.test")
        user.transport.write(b"hello")
        self.assertEqual((yield within(user.whenReceived(5), 30, "the echo")), b"hello")
        reached = user.transport.getPeer()
        self.assertEqual((reached.host, reached.port), ("::1", target))
        user.transport.loseConnection()
        yield user.closed
        self.assertIsInstance(endpoints.dataChannel(reached), TCP6ClientEndpoint)
        self.assertIsNone(endpoints.dataChannel(IPv4Address("UDP", "127.0.0.1", 1)))


class ConsoleScriptsOverIPv6Tests(unittest.TestCase):
    def setUp(self):
        if not ipv6Loopback():
            raise unittest.SkipTest("this machine has no IPv6 loopback")

    @defer.inlineCallbacks
    def test_tunnelOverLoopback(self):
        """
        docs/configuration.md's IPv6 spellings: the server listens with
        tcp6:PORT:interface=\\:\\:1 and --public-interface ::1, the client
        connects to tcp:[::1]:PORT and publishes --map [::1]:PORT:PORT; a user
        on ::1 reaches the service.
        """
        directory = temporaryDirectory(self)
        target, public = listenTarget6(self), freePort6()
        server = spawn(self, [venvScript("gotunnel-server"), "--token", TOKEN,
                              "--listen", r"tcp6:0:interface=\:\:1",
                              "--public-interface", "::1"], directory)
        found = yield within(server.whenOutput(LISTENING, (1,)), START_TIMEOUT,
                             "the server to listen on ::1")
        control = int(found.group(1))
        client = spawn(self, [venvScript("gotunnel-client"), "--token", TOKEN,
                              "--server", f"tcp:[::1]:{control}",
                              "--map", f"[::1]:{target}:{public}"], directory)
        yield within(client.whenOutput(f"registered [::1]:{target}->{public}", (1,)),
                     START_TIMEOUT, "the client to register")
        yield within(server.whenOutput(f"public port {public} listening", (1,)),
                     START_TIMEOUT, "the public port to open")

        user = yield within(connectProtocol(TCP6ClientEndpoint(reactor, "::1", public), User()),
                            30, "a user's connection to [::1]:public")
        payload = b"over IPv6" * 1000
        user.transport.write(payload)
        self.assertEqual((yield within(user.whenReceived(len(payload)), 30, "the echo")),
                         payload)
        user.transport.loseConnection()
        yield within(user.closed, 30, "the user's connection to close")

        for child in (client, server):
            child.sendSignal("TERM")
            yield within(child.ended, START_TIMEOUT, f"{child.argv[0]} to stop")
            self.assertEqual(child.exitCode, 0, child.describe())
            self.assertNotIn("Traceback", child.stdout + child.stderr)

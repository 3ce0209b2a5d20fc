"""
remote_port 0: the server chooses the public port (a free one of
allow_ports, or one the OS picks), tells our client which, and the client
registers again with that port.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

from gotunnel.wire import messages
from gotunnel.config.mappings import Mapping
from gotunnel.config.yamlfile import readConfigFile
from gotunnel.cli.tap import ClientOptions
from gotunnel.server.access import RegistrationRefused
from tests.support import (
    HOST, TOKEN, Tunnel, echoedThrough, freePort, listenTarget, waitUntil, within,
)


class FakeChannel:
    """A control channel as register sees it: a transport with no certificate."""

    transport = None

TIMEOUT = 30


class WireAndSettingsTests(unittest.TestCase):
    def test_answerField(self):
        answer = messages.parse(b'{"type":"register_resp","status":"ok","remote_port":40001}')
        self.assertEqual(answer.remote_port, 40001)
        self.assertEqual(messages.encode(messages.RegisterResp(status="ok")),
                         b'{"type":"register_resp","status":"ok"}')
        with self.assertRaises(messages.ProtocolError):
            messages.parse(b'{"type":"register_resp","status":"ok","remote_port":70000}')

    def test_mapOption(self):
        options = ClientOptions()
        options.parseOptions(["--token", "t", "--map", "80:0", "--map", "81:0",
                              "--config", os.devnull])
        self.assertEqual([m.remote_port for m in options.settings().mappings], [0, 0])

    def test_tunnelsKey(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("client:\n  tunnels:\n    - {local_port: 80, remote_port: 0}\n"
                    "    - {local_port: 81, remote_port: 0}\n")
        mappings = readConfigFile(path).clientValues()["mappings"]
        self.assertEqual([m.remote_port for m in mappings], [0, 0])

    def test_notForUdp(self):
        """Only TCP ports are chosen by the server: a UDP mapping of port 0 is refused."""
        with self.assertRaises(usage.UsageError) as raised:
            ClientOptions().parseOptions(["--token", "t", "--map", "udp:53:0",
                                          "--config", os.devnull])
        self.assertIn("a UDP mapping needs a remote port of its own", str(raised.exception))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("client:\n  tunnels:\n    - {local_port: 53, remote_port: 0, protocol: udp}\n")
        with self.assertRaises(Exception) as raised:
            readConfigFile(path).clientValues()
        self.assertIn("a udp tunnel needs a remote_port of its own", str(raised.exception))


class ServerChoosesTests(unittest.TestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @defer.inlineCallbacks
    def publishAny(self, tunnel, name="test-client"):
        target = listenTarget(self)
        client = tunnel.startClient(target, mappings=[Mapping(HOST, target, 0)], name=name)
        yield within(client.tunnels[0].whenRegistered(), TIMEOUT, "registration")
        return client

    @defer.inlineCallbacks
    def test_ephemeral(self):
        """No allow_ports: the OS's choice; the client logs where users connect."""
        tunnel = Tunnel(self)
        yield tunnel.startServer()
        client = yield self.publishAny(tunnel)
        port = client.tunnels[0].mapping.remote_port
        self.assertNotEqual(port, 0)
        registry = tunnel.server.registry
        self.assertIn(port, registry.tunnels)
        # Its listener is ordered as any port's, and its totals are the port's.
        self.assertIs(registry.publicPorts[port].owner, registry.tunnels[port])
        self.assertEqual(registry.tunnels[port].stats.remote_port, str(port))
        self.assertTrue((yield echoedThrough(self, port, b"hello", TIMEOUT)))
        chosen = [e for e in self.events if e.get("log_format", "").startswith("the server chose")]
        self.assertEqual(chosen[0]["address"], f"{HOST}:{port}")

    @defer.inlineCallbacks
    def test_allowPorts(self):
        """With allow_ports, a free one of them; none free: refused."""
        allowed = freePort()
        tunnel = Tunnel(self)
        yield tunnel.startServer(allow_ports=(range(allowed, allowed + 1),))
        client = yield self.publishAny(tunnel)
        self.assertEqual(client.tunnels[0].mapping.remote_port, allowed)
        self.assertTrue((yield echoedThrough(self, allowed, b"hello", TIMEOUT)))
        refusals = []
        target = listenTarget(self)
        other = tunnel.startClient(target, mappings=[Mapping(HOST, target, 0)], name="other")
        other.tunnels[0].registrationRefused = refusals.append
        yield waitUntil(lambda: refusals, TIMEOUT, "the refusal")
        self.assertIn("no free remote port for 'other'", refusals[0])

    @defer.inlineCallbacks
    def test_udpRefused(self):
        """The server refuses a UDP register of port 0, and a register with vhost is no ask."""
        tunnel = Tunnel(self)
        yield tunnel.startServer()
        registry = tunnel.server.registry
        channel = FakeChannel()
        for msg, reason in [
                (messages.Register(local_port=53, remote_port=0, protocol="udp",
                                   token=TOKEN, name="u"),
                 "a UDP mapping needs a remote_port of its own (0 is for TCP)"),
                (messages.Register(local_port=80, remote_port=0, token=TOKEN, name="v",
                                   vhost="http", subdomain="v"),
                 "this server has no virtual hosts")]:
            failure = yield self.assertFailure(registry.register(channel, msg),
                                               RegistrationRefused)
            self.assertIn(reason, str(failure))
        self.assertEqual(registry.tunnels, {})

    @defer.inlineCallbacks
    def test_registersAgainWithTheChosenPort(self):
        """A lost control channel: the client asks for the port it got, and gets it back."""
        tunnel = Tunnel(self)
        yield tunnel.startServer()
        client = yield self.publishAny(tunnel)
        service = client.tunnels[0]
        port = service.mapping.remote_port
        registers = []
        original = tunnel.server.registry.register

        def recording(channel, msg):
            registers.append(msg.remote_port)
            return original(channel, msg)

        tunnel.server.registry.register = recording
        first = service.channel
        first.transport.abortConnection()
        yield waitUntil(lambda: service.channel is not None and service.channel is not first,
                        TIMEOUT, "the client to register again")
        self.assertEqual(registers, [port])
        self.assertEqual(service.mapping.remote_port, port)
        self.assertIn(port, tunnel.server.registry.tunnels)
        self.assertTrue((yield echoedThrough(self, port, b"again", TIMEOUT)))

"""
Source-address policy on a public port: the lookup (against a brute-force
one), the refusal log, the settings, and the server refusing users at
accept over loopback, before its client hears of them.
"""

from __future__ import annotations

import ipaddress
import os
import random

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from gotunnel.wire import messages
from gotunnel.config.mappings import Mapping
from gotunnel.config.settings import ClientPolicy
from gotunnel.config.yamlfile import readConfigFile
from gotunnel.server.portpolicy import (
    RefusalLog, SourcePolicy, SourceRate, SourceSet, narrowest, parseNetwork, permitted,
    sourceAddress,
)
from gotunnel.cli.tap import ServerOptions
from tests.support import (
    HOST, TOKEN, Tunnel, connectUser, echoedThrough, freePort, listenTarget, waitUntil, within,
)

TIMEOUT = 30


def nets(*texts):
    return [ipaddress.ip_network(text) for text in texts]


class SourceSetTests(unittest.TestCase):
    def test_membership(self):
        sources = SourceSet(nets("10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32", "::1/128"))
        for inside in ("10.1.2.3", "192.0.2.7", "2001:db8:1::5", "::1"):
            self.assertIn(ipaddress.ip_address(inside), sources)
        for outside in ("11.0.0.1", "192.0.2.8", "2001:db9::1", "::2", "127.0.0.1"):
            self.assertNotIn(ipaddress.ip_address(outside), sources)

    def test_everything(self):
        self.assertIn(ipaddress.ip_address("203.0.113.9"), SourceSet(nets("0.0.0.0/0")))
        self.assertNotIn(ipaddress.ip_address("::9"), SourceSet(nets("0.0.0.0/0")))

    def test_agreesWithBruteForce(self):
        rng = random.Random(20)
        networks = []
        for _ in range(1000):
            if rng.random() < 0.7:
                length = rng.randint(8, 32)
                address = ipaddress.IPv4Address(rng.getrandbits(32))
            else:
                length = rng.randint(16, 128)
                address = ipaddress.IPv6Address(rng.getrandbits(128))
            networks.append(ipaddress.ip_network(f"{address}/{length}", strict=False))
        sources = SourceSet(networks)
        for _ in range(3000):
            if rng.random() < 0.5:
                network = rng.choice(networks)
                ip = network.network_address + rng.randrange(network.num_addresses)
            elif rng.random() < 0.5:
                ip = ipaddress.IPv4Address(rng.getrandbits(32))
            else:
                ip = ipaddress.IPv6Address(rng.getrandbits(128))
            expected = any(ip in network for network in networks if network.version == ip.version)
            self.assertEqual(ip in sources, expected, str(ip))


class SourcePolicyTests(unittest.TestCase):
    def test_denyWins(self):
        policy = SourcePolicy.of(nets("10.0.0.0/8"), nets("10.9.0.0/16"))
        self.assertTrue(policy.permits(ipaddress.ip_address("10.1.0.1")))
        self.assertFalse(policy.permits(ipaddress.ip_address("10.9.0.1")))
        self.assertFalse(policy.permits(ipaddress.ip_address("11.0.0.1")))

    def test_denyOnly(self):
        policy = SourcePolicy.of(deny=nets("2001:db8::/32"))
        self.assertTrue(policy.permits(ipaddress.ip_address("2001:db9::1")))
        self.assertFalse(policy.permits(ipaddress.ip_address("2001:db8::1")))

    def test_everyPolicyMustPermit(self):
        """A client's list can narrow the server's, never widen it."""
        server = SourcePolicy.of(nets("10.0.0.0/8"))
        client = SourcePolicy.of(nets("0.0.0.0/0"))
        self.assertFalse(permitted([server, client], "192.0.2.1"))
        self.assertTrue(permitted([server, client], "10.0.0.1"))
        self.assertFalse(permitted([server, SourcePolicy.of(nets("10.1.0.0/16"))], "10.2.0.1"))
        self.assertTrue(permitted([], "anything"))

    def test_mappedAddress(self):
        self.assertEqual(sourceAddress("::ffff:10.0.0.1"), ipaddress.ip_address("10.0.0.1"))
        self.assertTrue(permitted([SourcePolicy.of(nets("10.0.0.0/8"))], "::ffff:10.0.0.1"))

    def test_notAnAddress(self):
        self.assertFalse(permitted([SourcePolicy.of(nets("10.0.0.0/8"))], "?"))
        self.assertTrue(permitted([SourcePolicy.of(deny=nets("10.0.0.0/8"))], "?"))

    def test_parseNetwork(self):
        self.assertEqual(parseNetwork(" 192.0.2.0/24 ", "x"), ipaddress.ip_network("192.0.2.0/24"))
        self.assertEqual(parseNetwork("::1", "x"), ipaddress.ip_network("::1/128"))
        for bad in ("10.0.0.1/8", "bogus", "10.0.0.0/33"):
            with self.assertRaises(ValueError) as raised:
                parseNetwork(bad, "server.allow_sources[0]")
            self.assertIn("server.allow_sources[0] must be", str(raised.exception))


class RefusalLogTests(unittest.TestCase):
    def test_rateLimited(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        refusals = RefusalLog(clock, 10022, interval=10)

        def lines():
            return [e for e in events if "refused {count} users" in e.get("log_format", "")]

        refusals.refused("192.0.2.1", "source address not allowed")
        self.assertEqual([e["count"] for e in lines()], [1])
        for _ in range(500):
            refusals.refused("192.0.2.2", "source address not allowed")
        self.assertEqual(len(lines()), 1)
        clock.advance(10)
        self.assertEqual([(e["count"], e["total"], e["host"]) for e in lines()],
                         [(1, 1, "192.0.2.1"), (500, 501, "192.0.2.2")])
        clock.advance(10)
        self.assertEqual(len(lines()), 2)
        self.assertEqual(clock.getDelayedCalls(), [])
        refusals.refused("192.0.2.3", "x")
        self.assertEqual(len(lines()), 3)
        refusals.stop()
        self.assertEqual(clock.getDelayedCalls(), [])


class WritingTestCase(unittest.TestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path


class SettingsTests(WritingTestCase):
    def test_serverKeys(self):
        path = self.write("server:\n  token: t\n  allow_sources: [10.0.0.0/8, '2001:db8::/32']\n"
                          "  deny_sources: 10.9.0.0/16\n"
                          "  clients:\n    alice: {token: a, allow_sources: [192.0.2.0/24],"
                          " deny_sources: [192.0.2.9]}\n")
        values = readConfigFile(path).serverValues()
        self.assertEqual(values["allow_sources"], tuple(nets("10.0.0.0/8", "2001:db8::/32")))
        self.assertEqual(values["deny_sources"], tuple(nets("10.9.0.0/16")))
        alice = values["clients"]["alice"]
        self.assertEqual((alice.allow_sources, alice.deny_sources),
                         (tuple(nets("192.0.2.0/24")), tuple(nets("192.0.2.9/32"))))

    def test_badNetwork(self):
        path = self.write("server:\n  token: t\n  deny_sources: [10.0.0.1/8]\n")
        with self.assertRaises(Exception) as raised:
            readConfigFile(path).serverValues()
        self.assertIn("server.deny_sources[0] must be an address or a network",
                      str(raised.exception))

    def test_tunnelKeys(self):
        path = self.write("client:\n  tunnels:\n    - {local_port: 1, remote_port: 2, "
                          "allow_sources: [10.0.0.0/8], deny_sources: ['::1']}\n")
        mapping = readConfigFile(path).clientValues()["mappings"][0]
        self.assertEqual((mapping.allow_sources, mapping.deny_sources),
                         (("10.0.0.0/8",), ("::1/128",)))

    def test_registerFields(self):
        msg = messages.parse(b'{"type":"register","local_port":1,"remote_port":2,"token":"t",'
                             b'"name":"n","allow_sources":["10.0.0.0/8"]}')
        self.assertEqual(msg.allow_sources, ("10.0.0.0/8",))
        self.assertIsNone(msg.deny_sources)
        self.assertIn(b'"allow_sources":["10.0.0.0/8"]', messages.encode(msg))
        self.assertNotIn(b"sources", messages.encode(messages.Register(token="t")))
        for bad in (b'"allow_sources":"10.0.0.0/8"', b'"allow_sources":[1]',
                    b'"deny_sources":[' + b",".join([b'"::1"'] * 1025) + b"]"):
            with self.assertRaises(messages.ProtocolError):
                messages.parse(b'{"type":"register",' + bad + b"}")


class EnforcementTestCase(unittest.TestCase):
    """Over loopback: a mapping, its users from 127.0.0.1, and whether the client hears of them."""

    @defer.inlineCallbacks
    def publish(self, mapping: dict = {}, **server):
        tunnel = Tunnel(self)
        yield tunnel.startServer(**server)
        target = listenTarget(self)
        remote = freePort()
        client = tunnel.startClient(target, mappings=[Mapping(HOST, target, remote, **mapping)],
                                    name="alice", token=server.get("clients", {}).get(
                                        "alice", ClientPolicy(TOKEN)).token)
        yield within(client.tunnels[0].whenRegistered(), TIMEOUT, "registration")
        self.asked = 0
        original = client.tunnels[0].openDataChannel

        def counting(request):
            self.asked += 1
            return original(request)

        client.tunnels[0].openDataChannel = counting
        return tunnel, remote

    @defer.inlineCallbacks
    def assertRefused(self, tunnel, remote):
        before = tunnel.server.registry.refusedUsers
        user = yield connectUser(self, remote)
        user.transport.write(b"hello")
        data = yield within(user.closed, TIMEOUT, "the refused user to be closed")
        self.assertEqual(data, b"")
        self.assertEqual(tunnel.server.registry.refusedUsers, before + 1)
        self.assertEqual(self.asked, 0)
        self.assertEqual(tunnel.server.registry.tunnels[remote].refusals.total, before + 1)

    @defer.inlineCallbacks
    def assertServed(self, tunnel, remote):
        self.assertTrue((yield echoedThrough(self, remote, b"hello", TIMEOUT)))
        self.assertEqual(self.asked, 1)



class ServerEnforcementTests(EnforcementTestCase):
    """Users from 127.0.0.1 against lists that do or do not admit them."""

    @defer.inlineCallbacks
    def test_allowListServes(self):
        tunnel, remote = yield self.publish(allow_sources=tuple(nets("127.0.0.0/8")))
        yield self.assertServed(tunnel, remote)

    @defer.inlineCallbacks
    def test_notInAllowList(self):
        tunnel, remote = yield self.publish(allow_sources=tuple(nets("10.0.0.0/8", "::1")))
        yield self.assertRefused(tunnel, remote)

    @defer.inlineCallbacks
    def test_denied(self):
        tunnel, remote = yield self.publish(deny_sources=tuple(nets("127.0.0.1")))
        yield self.assertRefused(tunnel, remote)

    @defer.inlineCallbacks
    def test_listedClientsOwnLists(self):
        clients = {"alice": ClientPolicy("alice-token", deny_sources=tuple(nets("127.0.0.0/24")))}
        tunnel, remote = yield self.publish(clients=clients)
        yield self.assertRefused(tunnel, remote)

    @defer.inlineCallbacks
    def test_refusalsInAccounting(self):
        """A refusal at accept is counted by the port's accounting, with its reason."""
        tunnel, remote = yield self.publish(deny_sources=tuple(nets("127.0.0.1")))
        yield self.assertRefused(tunnel, remote)
        self.assertEqual(tunnel.server.registry.tunnels[remote].stats.refused,
                         {"source_address": 1})

    @defer.inlineCallbacks
    def test_clientNarrows(self):
        tunnel, remote = yield self.publish({"allow_sources": ("10.0.0.0/8",)})
        yield self.assertRefused(tunnel, remote)

    @defer.inlineCallbacks
    def test_clientDenies(self):
        tunnel, remote = yield self.publish({"deny_sources": ("127.0.0.1/32",)})
        yield self.assertRefused(tunnel, remote)

    @defer.inlineCallbacks
    def test_clientCannotWiden(self):
        tunnel, remote = yield self.publish({"allow_sources": ("127.0.0.0/8",)},
                                            allow_sources=tuple(nets("10.0.0.0/8")))
        yield self.assertRefused(tunnel, remote)

    @defer.inlineCallbacks
    def test_badRequestedNetworkRefusesTheRegistration(self):
        tunnel = Tunnel(self)
        yield tunnel.startServer()
        refused = []
        client = tunnel.startClient(listenTarget(self), mappings=[
            Mapping(HOST, 1, freePort(), allow_sources=("10.0.0.1/8",))])
        client.tunnels[0].registrationRefused = refused.append
        yield waitUntil(lambda: refused, TIMEOUT, "the refusal")
        self.assertIn("register.allow_sources must be an address or a network", refused[0])


class SourceRateTests(unittest.TestCase):
    def test_burstThenRate(self):
        clock = Clock()
        rate = SourceRate(clock, 2)
        self.assertEqual([rate.admit("a") for _ in range(3)], [True, True, False])
        self.assertTrue(rate.admit("b"))
        clock.advance(0.5)
        self.assertEqual([rate.admit("a"), rate.admit("a")], [True, False])
        clock.advance(10)
        self.assertEqual([rate.admit("a") for _ in range(3)], [True, True, False])

    def test_slowerThanOneASecond(self):
        clock = Clock()
        rate = SourceRate(clock, 0.1)
        self.assertEqual([rate.admit("a"), rate.admit("a")], [True, False])
        clock.advance(9)
        self.assertFalse(rate.admit("a"))
        clock.advance(10)
        self.assertTrue(rate.admit("a"))

    def test_tableBounded(self):
        """A flood from many addresses forgets the least recently seen."""
        clock = Clock()
        rate = SourceRate(clock, 1, maxSources=100)
        self.assertTrue(rate.admit("first"))
        for i in range(1000):
            rate.admit(f"10.0.{i // 256}.{i % 256}")
        self.assertEqual(len(rate), 100)
        self.assertTrue(rate.admit("first"))

    def test_narrowest(self):
        self.assertEqual(narrowest(0, None, 0), 0)
        self.assertEqual(narrowest(10, 0, 5), 5)
        self.assertEqual(narrowest(10, None, 50), 10)
        self.assertEqual(narrowest(0, 3, None), 3)


class LimitSettingsTests(WritingTestCase):
    def test_limitKeys(self):
        path = self.write("server:\n  token: t\n  max_users_per_port: 100\n"
                          "  max_connection_rate: 2.5\n  clients:\n"
                          "    alice: {token: a, max_users_per_port: 5, max_connection_rate: 1}\n"
                          "client:\n  tunnels:\n    - {local_port: 1, remote_port: 2,"
                          " max_users: 3, max_connection_rate: 0.5}\n")
        config = readConfigFile(path)
        values = config.serverValues()
        self.assertEqual((values["max_users_per_port"], values["max_connection_rate"]), (100, 2.5))
        alice = values["clients"]["alice"]
        self.assertEqual((alice.max_users_per_port, alice.max_connection_rate), (5, 1.0))
        mapping = config.clientValues()["mappings"][0]
        self.assertEqual((mapping.max_users, mapping.max_connection_rate), (3, 0.5))

    def test_options(self):
        options = ServerOptions()
        options.parseOptions(["--token", "t", "--max-users-per-port", "7",
                              "--max-connection-rate", "1.5", "--config", os.devnull])
        self.assertEqual((options.settings().max_users_per_port,
                          options.settings().max_connection_rate), (7, 1.5))


class LimitEnforcementTests(EnforcementTestCase):
    @defer.inlineCallbacks
    def assertUserLimit(self, tunnel, remote, limit):
        users = []
        for _ in range(limit):
            user = yield connectUser(self, remote)
            user.transport.write(b"x")
            yield within(user.whenReceived(1), TIMEOUT, "an echo")
            users.append(user)
        self.asked = 0
        yield self.assertRefused(tunnel, remote)
        users[0].transport.loseConnection()
        yield users[0].closed
        yield waitUntil(lambda: tunnel.server.registry.usersOf(remote) < limit, TIMEOUT,
                        "the server to see the user go")
        yield self.assertServed(tunnel, remote)

    @defer.inlineCallbacks
    def test_maxUsers(self):
        tunnel, remote = yield self.publish(max_users_per_port=2)
        yield self.assertUserLimit(tunnel, remote, 2)
        self.assertEqual(tunnel.server.registry.tunnels[remote].stats.refused, {"max_users": 1})

    @defer.inlineCallbacks
    def test_clientAsksFewerUsers(self):
        tunnel, remote = yield self.publish({"max_users": 1}, max_users_per_port=5)
        yield self.assertUserLimit(tunnel, remote, 1)

    @defer.inlineCallbacks
    def test_clientCannotAskMoreUsers(self):
        clients = {"alice": ClientPolicy("alice-token", max_users_per_port=1)}
        tunnel, remote = yield self.publish({"max_users": 50}, clients=clients)
        yield self.assertUserLimit(tunnel, remote, 1)

    @defer.inlineCallbacks
    def test_connectionRate(self):
        tunnel, remote = yield self.publish(max_connection_rate=0.01)
        yield self.assertServed(tunnel, remote)
        self.asked = 0
        yield self.assertRefused(tunnel, remote)
        self.assertEqual(len(tunnel.server.registry.tunnels[remote].sourceRate), 1)
        self.assertEqual(tunnel.server.registry.tunnels[remote].stats.refused,
                         {"connection_rate": 1})

    @defer.inlineCallbacks
    def test_clientAsksForARate(self):
        tunnel, remote = yield self.publish({"max_connection_rate": 0.01}, max_connection_rate=100)
        yield self.assertServed(tunnel, remote)
        self.asked = 0
        yield self.assertRefused(tunnel, remote)

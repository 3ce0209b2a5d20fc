"""
Groups: several clients serving one public port over loopback; users spread
across them, a member whose service is down skipped, the port kept open
while any member is connected.
"""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.trial import unittest

from gotunnel.wire import messages
from gotunnel.config.mappings import Mapping
from gotunnel.config.yamlfile import readConfigFile
from gotunnel.server.groups import Group
from tests.support import (
    HOST, Banner, Tunnel, connectUser, freePort, listenTarget, waitUntil, within,
)

TIMEOUT = 30


class BannerA(Banner):
    banner = b"A\n"


class BannerB(Banner):
    banner = b"B\n"


class GroupUnitTests(unittest.TestCase):
    def test_admits(self):
        group = Group(80, "web", "key")
        self.assertTrue(group.admits("web", "key"))
        self.assertFalse(group.admits("web", "other"))
        self.assertFalse(group.admits("api", "key"))

    def test_wire(self):
        msg = messages.parse(b'{"type":"register","remote_port":1,"group":"web","group_key":"k"}')
        self.assertEqual((msg.group, msg.group_key), ("web", "k"))
        self.assertNotIn("'k'", repr(msg))

    def test_config(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("client:\n  tunnels:\n    - {local_port: 1, remote_port: 2, group: web, "
                    "group_key: k}\n")
        mapping = readConfigFile(path).clientValues()["mappings"][0]
        self.assertEqual((mapping.group, mapping.group_key), ("web", "k"))
        with open(path, "w") as f:
            f.write("client:\n  tunnels:\n    - {local_port: 1, remote_port: 2, group: web}\n")
        with self.assertRaises(Exception) as raised:
            readConfigFile(path).clientValues()
        self.assertIn("group and group_key go together", str(raised.exception))


class GroupTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.tunnel = Tunnel(self)
        yield self.tunnel.startServer()
        self.remote = freePort()

    @defer.inlineCallbacks
    def member(self, name: str, banner: type, key: str = "k", group: str = "web"):
        target = listenTarget(self, banner)
        client = self.tunnel.startClient(
            target, name=name, health_check_interval=3600,
            mappings=[Mapping(HOST, target, self.remote, group=group, group_key=key)])
        yield within(client.tunnels[0].whenRegistered(), TIMEOUT, f"{name} to register")
        return client

    @defer.inlineCallbacks
    def banners(self, count: int):
        seen = []
        for _ in range(count):
            user = yield connectUser(self, self.remote)
            data = yield within(user.whenReceived(2), TIMEOUT, "a banner")
            seen.append(data[:2])
            user.transport.loseConnection()
            yield user.closed
        return seen

    @defer.inlineCallbacks
    def test_spreadAcrossMembers(self):
        yield self.member("a", BannerA)
        yield self.member("b", BannerB)
        seen = yield self.banners(4)
        self.assertEqual(sorted(seen), [b"A\n", b"A\n", b"B\n", b"B\n"])

    @defer.inlineCallbacks
    def test_wrongKeyOrNoGroupRefused(self):
        yield self.member("a", BannerA)
        for key, group, reason in [
                ("wrong", "web", "is served by another group, or the group key is wrong"),
                ("k", "", "is served by a group of clients")]:
            refusals = []
            target = listenTarget(self, BannerB)
            client = self.tunnel.startClient(target, name=f"b{len(key)}{group}", mappings=[
                Mapping(HOST, target, self.remote, group=group, group_key=key if group else "")])
            client.tunnels[0].registrationRefused = refusals.append
            yield waitUntil(lambda: refusals, TIMEOUT, "the refusal")
            self.assertIn(reason, refusals[0])
            yield client.stopService()
        self.assertEqual((yield self.banners(2)), [b"A\n", b"A\n"])

    @defer.inlineCallbacks
    def test_offlineMemberSkipped(self):
        a = yield self.member("a", BannerA)
        yield self.member("b", BannerB)
        a.tunnels[0].channel.sendPortState(False)
        group = self.tunnel.server.registry.groups[self.remote]
        yield waitUntil(lambda: not group.members["a"].serviceUp, TIMEOUT, "a to be offline")
        self.assertEqual((yield self.banners(3)), [b"B\n"] * 3)
        a.tunnels[0].channel.sendPortState(True)
        yield waitUntil(lambda: group.members["a"].serviceUp, TIMEOUT, "a to be back")
        self.assertIn(b"A\n", (yield self.banners(3)))

    @defer.inlineCallbacks
    def test_portOpenWhileAnyMemberIsConnected(self):
        a = yield self.member("a", BannerA)
        b = yield self.member("b", BannerB)
        registry = self.tunnel.server.registry
        port = registry.publicPorts[self.remote]
        listener = port.listener
        yield a.stopService()
        yield waitUntil(lambda: list(registry.groups[self.remote].members) == ["b"], TIMEOUT,
                        "a to leave")
        # The same socket, passed on through the port's PublicPort.
        self.assertIs(port.listener, listener)
        self.assertIs(port.owner, registry.tunnels[self.remote])
        self.assertEqual((yield self.banners(2)), [b"B\n", b"B\n"])
        self.assertIsNone(registry.leases.get(self.remote))
        yield b.stopService()
        yield waitUntil(lambda: self.remote not in registry.tunnels, TIMEOUT, "b to leave")
        self.assertNotIn(self.remote, registry.groups)
        yield self.assertFailure(connectUser(self, self.remote), error.ConnectionRefusedError)
        self.assertEqual(registry.leases.get(self.remote).name, "b")


class PooledGroupTests(unittest.TestCase):
    """Each member's pooled data channels serve the users sent to that member."""

    @defer.inlineCallbacks
    def test_spreadWithPools(self):
        tunnel = Tunnel(self, pool=2)
        yield tunnel.startServer()
        remote = freePort()
        for name, banner in (("a", BannerA), ("b", BannerB)):
            target = listenTarget(self, banner)
            yield within(tunnel.publish(target, name=name, remotePort=remote, mappings=[
                Mapping(HOST, target, remote, group="web", group_key="k")]), TIMEOUT, name)
        group = tunnel.server.registry.groups[remote]
        yield waitUntil(lambda: all(len(m.pool) == 2 for m in group.members.values()), TIMEOUT,
                        "both pools to fill")
        seen = []
        for _ in range(4):
            user = yield connectUser(self, remote)
            seen.append((yield within(user.whenReceived(2), TIMEOUT, "a banner"))[:2])
            user.transport.loseConnection()
            yield user.closed
        self.assertEqual(sorted(seen), [b"A\n", b"A\n", b"B\n", b"B\n"])

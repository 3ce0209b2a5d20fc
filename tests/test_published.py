"""
The tables of what the server publishes (gotunnel.server.published) on their own:
waiting users, one record each, found by conn_id or as the oldest of their
mapping; users per port; every mapping, group members included.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from gotunnel.server.access import RegistrationRefused
from gotunnel.server.groups import Group
from gotunnel.server.published import PublishedPorts, WaitingUsers


class FakeTunnel:
    protocol = None
    """TCP, as L{gotunnel.server.mapping.PublishedMapping}'s."""

    def __init__(self, name: str, remote_port: int) -> None:
        self.name = name
        self.remote_port = remote_port
        self.key = remote_port
        self.group = None
        self.online = False


class FakeUser:
    def __init__(self, tunnel: FakeTunnel, conn_id: str) -> None:
        self.tunnel = tunnel
        self.conn_id = conn_id


class WaitingUsersTests(unittest.TestCase):
    def setUp(self):
        self.waiting = WaitingUsers()
        self.a, self.b = FakeTunnel("a", 1), FakeTunnel("b", 2)

    def wait(self, tunnel: FakeTunnel, conn_id: str) -> FakeUser:
        user = FakeUser(tunnel, conn_id)
        self.waiting.add(user)
        return user

    def test_byIdAndByTunnel(self):
        a1, b1, a2 = self.wait(self.a, "a1"), self.wait(self.b, "b1"), self.wait(self.a, "a2")
        self.assertEqual(self.waiting, {"a1": a1, "b1": b1, "a2": a2})
        self.assertEqual(list(self.waiting.of(self.a)), ["a1", "a2"])
        self.assertEqual(list(self.waiting.of(self.b)), ["b1"])
        self.assertIs(self.waiting.oldestOf(self.a), a1)
        self.assertIs(self.waiting["b1"], b1)

    def test_removeFromBoth(self):
        """One removal and the user is gone by its id and from its mapping's line."""
        a1, a2 = self.wait(self.a, "a1"), self.wait(self.a, "a2")
        self.assertTrue(self.waiting.remove(a1))
        self.assertNotIn("a1", self.waiting)
        self.assertIs(self.waiting.oldestOf(self.a), a2)
        self.assertTrue(self.waiting.remove(a2))
        self.assertEqual(self.waiting, {})
        self.assertEqual(self.waiting.of(self.a), {})
        self.assertIsNone(self.waiting.oldestOf(self.a))

    def test_removeWhatDoesNotWait(self):
        """
        Removing twice, a user that never waited, or another user under a
        waiting one's conn_id leaves the table as it was.
        """
        a1 = self.wait(self.a, "a1")
        self.assertTrue(self.waiting.remove(a1))
        self.assertFalse(self.waiting.remove(a1))
        self.assertFalse(self.waiting.remove(FakeUser(self.a, None)))
        b1 = self.wait(self.b, "b1")
        self.assertFalse(self.waiting.remove(FakeUser(self.b, "b1")))
        self.assertEqual(self.waiting, {"b1": b1})
        self.assertEqual(list(self.waiting.of(self.b)), ["b1"])


class PublishedPortsTests(unittest.TestCase):
    def setUp(self):
        self.ports = PublishedPorts(Clock())

    def test_usersPerPort(self):
        # (arrivals, departures, users left)
        cases = [(0, 0, 0), (1, 0, 1), (3, 1, 2), (2, 2, 0), (1, 3, 0)]
        for arrived, left, expected in cases:
            with self.subTest(arrived=arrived, left=left):
                ports = PublishedPorts(Clock())
                for _ in range(arrived):
                    ports.userArrived(10022)
                for _ in range(left):
                    ports.userLeft(10022)
                self.assertEqual(ports.usersOf(10022), expected)
                self.assertEqual(ports.usersOf(10023), 0)
                # An idle port is forgotten, not kept at zero.
                self.assertEqual(10022 in ports._users, expected > 0)

    def test_allTunnels(self):
        """The holder of each port, and the other members of each group, once each."""
        solo, first, second = FakeTunnel("solo", 1), FakeTunnel("x", 2), FakeTunnel("y", 2)
        group = Group(2, "web", "key")
        group.add(first)
        group.add(second)
        self.ports.tunnels.update({1: solo, 2: first})
        self.ports.groups[2] = group
        self.assertEqual(self.ports.allTunnels(), [solo, first, second])

    def test_portIdle(self):
        """An idle socket is forgotten, unless another has taken its number since."""

        class Port:
            remote_port = 10022

        old, new = Port(), Port()
        self.ports.publicPorts[10022] = new
        self.ports.portIdle(old)
        self.assertIs(self.ports.publicPorts[10022], new)
        self.ports.portIdle(new)
        self.assertEqual(self.ports.publicPorts, {})

    def test_forgetOne(self):
        """A closed mapping is forgotten; one that a new registration replaced leaves it be."""
        old, new = FakeTunnel("a", 1), FakeTunnel("a", 1)
        self.ports.tunnels[1] = new
        self.ports.forget(old)
        self.assertEqual(self.ports.tunnels, {1: new})
        self.ports.forget(new)
        self.assertEqual(self.ports.tunnels, {})

    def test_groupGoesOn(self):
        """
        The holder of a group's port leaves: the next member holds the port,
        and the socket's factory serves it; the last member takes the group.
        """
        holder, member = FakeTunnel("x", 2), FakeTunnel("y", 2)
        group = Group(2, "web", "key")
        group.add(holder)
        group.add(member)
        self.ports.tunnels[2], self.ports.groups[2] = holder, group

        class Factory:
            tunnel = holder

        factory = Factory()

        class Port:
            def handOver(self, leaving, successor):
                self.handed = (leaving, successor)
                return factory

        port = self.ports.publicPorts[2] = Port()
        self.ports.forget(holder)
        self.assertEqual(port.handed, (holder, member))
        self.assertIs(self.ports.tunnels[2], member)
        self.assertIs(factory.tunnel, member)
        self.assertTrue(member.online)
        self.assertEqual(self.ports.allTunnels(), [member])
        self.ports.forget(member)
        self.assertEqual((self.ports.tunnels, self.ports.groups), ({}, {}))

    def test_memberLeaves(self):
        """A member that does not hold the port leaves the holder and the group be."""
        holder, member = FakeTunnel("x", 2), FakeTunnel("y", 2)
        group = Group(2, "web", "key")
        group.add(holder)
        group.add(member)
        self.ports.tunnels[2], self.ports.groups[2] = holder, group
        self.ports.forget(member)
        self.assertEqual(self.ports.tunnels, {2: holder})
        self.assertEqual(list(group.members.values()), [holder])

    def test_freePorts(self):
        """Every allowed port neither held nor leased, each once."""
        # (allowed ranges, published ports, leased ports, free ports)
        cases = [
            ((range(10, 13),), (), (), {10, 11, 12}),
            ((range(10, 13),), (11,), (), {10, 12}),
            ((range(10, 13), range(20, 22)), (10,), (21,), {11, 12, 20}),
            ((range(10, 12),), (10,), (11,), set()),
        ]
        for allowed, published, leased, free in cases:
            with self.subTest(allowed=allowed, published=published, leased=leased):
                ports = PublishedPorts(Clock())
                for number in published:
                    ports.tunnels[number] = FakeTunnel("a", number)
                for number in leased:
                    ports.leases.start("b", number, 60)
                found = list(ports.freePorts(allowed))
                self.assertEqual(sorted(found), sorted(free))

    def test_takeLease(self):
        """
        A client back on its leased port ends that lease, and its oldest
        leases elsewhere past its limit; another client's lease refuses.
        """
        # (leases as (name, port) oldest first, ports alice publishes, the port she
        #  registers, her limit, the leases left, or the refusal)
        cases = [
            ([], [], 10, 3, []),
            ([("alice", 10)], [], 10, 3, []),
            ([("alice", 10), ("alice", 11)], [], 10, 3, [("alice", 11)]),
            ([("alice", 11), ("alice", 12)], [], 10, 2, [("alice", 12)]),
            ([("alice", 11), ("alice", 12)], [13], 10, 2, []),
            ([("alice", 11), ("bob", 12)], [], 10, 1, [("bob", 12)]),
            ([("bob", 10)], [], 10, 3,
             "remote port 10 is reserved for the client that had it, for 60 s more"),
        ]
        for leases, published, port, limit, expected in cases:
            with self.subTest(leases=leases, published=published, limit=limit):
                ports = PublishedPorts(Clock())
                for name, number in leases:
                    ports.leases.start(name, number, 60)
                for number in published:
                    ports.tunnels[number] = FakeTunnel("alice", number)
                if isinstance(expected, str):
                    with self.assertRaises(RegistrationRefused) as caught:
                        ports.takeLease("alice", port, limit)
                    self.assertEqual(str(caught.exception), expected)
                else:
                    ports.takeLease("alice", port, limit)
                    self.assertEqual([(lease.name, lease.remote_port) for lease in ports.leases],
                                     expected)

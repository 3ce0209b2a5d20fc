"""
The server's access rules (gotunnel.server.access) on their own: pure functions of
the settings and a request, each checked over a table of cases.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from twisted.trial import unittest

from gotunnel.server import access
from gotunnel.server.access import RegistrationRefused
from gotunnel.config.settings import ClientPolicy, ServerSettings
from gotunnel.wire.messages import Register
from gotunnel.server.portpolicy import permitted

SHARED = "shared-token"
ALICE = "alice-token"

SETTINGS = ServerSettings(
    token=SHARED, allow_ports=(range(10000, 10100),), max_mappings_per_client=3,
    max_users_per_port=50, max_connection_rate=20.0, bandwidth_limit=1_000_000,
    clients={
        "alice": ClientPolicy(token=ALICE, allow_ports=(range(20000, 20010),), max_mappings=1,
                              max_users_per_port=10, bandwidth_limit=0,
                              allow_sources=(ipaddress.ip_network("192.0.2.0/24"),)),
        "bob": ClientPolicy(token="bob-token", deny_sources=(ipaddress.ip_network("10.0.0.0/8"),)),
    })


def register(**fields) -> Register:
    fields.setdefault("remote_port", 10001)
    return Register(local_port=22, token=SHARED, name=fields.pop("name", "anyone"), **fields)


class AuthenticateTests(unittest.TestCase):
    def test_table(self):
        # (name, token, certificate name, the name it is, or the refusal)
        cases = [
            ("anyone", SHARED, None, "anyone"),
            ("", SHARED, None, ""),
            ("anyone", "wrong", None, RegistrationRefused("authentication failed")),
            ("alice", ALICE, None, "alice"),
            ("alice", SHARED, None, RegistrationRefused("authentication failed")),
            ("anyone", ALICE, None, RegistrationRefused("authentication failed")),
            ("", ALICE, "alice", "alice"),
            ("alice", ALICE, "alice", "alice"),
            ("alice", ALICE, "mallory", RegistrationRefused(
                "client name 'alice' is not the name in the client's certificate ('mallory')")),
        ]
        for name, token, certificate, expected in cases:
            with self.subTest(name=name, token=token, certificate=certificate):
                if isinstance(expected, Exception):
                    with self.assertRaises(RegistrationRefused) as caught:
                        access.authenticate(SETTINGS, name, token, certificate)
                    self.assertEqual(str(caught.exception), str(expected))
                else:
                    self.assertEqual(access.authenticate(SETTINGS, name, token, certificate),
                                     expected)

    def test_noSharedToken(self):
        """A server without a token takes only its listed clients."""
        settings = dataclasses.replace(SETTINGS, token="")
        self.assertRaises(RegistrationRefused, access.authenticate, settings, "anyone", "", None)
        self.assertEqual(access.authenticate(settings, "alice", ALICE, None), "alice")


class HolderTests(unittest.TestCase):
    def test_sameHolder(self):
        mutualTLS = dataclasses.replace(SETTINGS, tls_client_ca="/ca.pem")
        # (settings, data channel's name, mapping's owner, may serve)
        cases = [
            (SETTINGS, "anyone", "anyone", True),
            (SETTINGS, "anyone", "someone-else", True),
            (SETTINGS, "", "anyone", True),
            (SETTINGS, "alice", "alice", True),
            (SETTINGS, "anyone", "alice", False),
            (SETTINGS, "alice", "anyone", False),
            (SETTINGS, "bob", "alice", False),
            (mutualTLS, "carol", "carol", True),
            (mutualTLS, "carol", "dave", False),
        ]
        for settings, name, owner, expected in cases:
            with self.subTest(name=name, owner=owner, tls=bool(settings.tls_client_ca)):
                self.assertEqual(access.sameHolder(settings, name, owner), expected)

    def test_holderOf(self):
        self.assertEqual(access.holderOf(SETTINGS, "alice"), "alice")
        self.assertIsNone(access.holderOf(SETTINGS, "anyone"))


class PortTests(unittest.TestCase):
    def test_checkPort(self):
        # (name, remote port, the refusal or None)
        cases = [
            ("anyone", 10000, None),
            ("anyone", 10099, None),
            ("anyone", 10100, "remote port 10100 is not allowed on this server"),
            ("alice", 20005, None),
            ("alice", 10001, "remote port 10001 is not allowed for client 'alice'"),
            ("bob", 10050, None),
            ("bob", 20005, "remote port 20005 is not allowed on this server"),
        ]
        for name, port, refusal in cases:
            with self.subTest(name=name, port=port):
                if refusal is None:
                    access.checkPort(SETTINGS, name, port)
                else:
                    with self.assertRaises(RegistrationRefused) as caught:
                        access.checkPort(SETTINGS, name, port)
                    self.assertEqual(str(caught.exception), refusal)

    def test_anyPortWithoutAllowList(self):
        settings = dataclasses.replace(SETTINGS, allow_ports=())
        access.checkPort(settings, "anyone", 1)
        self.assertEqual(access.allowedPorts(settings, "anyone"), ())

    def test_mappingCount(self):
        # (name, mappings it holds, refused)
        cases = [("anyone", 0, False), ("anyone", 2, False), ("anyone", 3, True),
                 ("alice", 0, False), ("alice", 1, True), ("bob", 2, False), ("bob", 3, True)]
        for name, held, refused in cases:
            with self.subTest(name=name, held=held):
                if refused:
                    self.assertRaises(RegistrationRefused,
                                      access.checkMappingCount, SETTINGS, name, held)
                else:
                    access.checkMappingCount(SETTINGS, name, held)

    def test_isUdp(self):
        udp, noUdp = SETTINGS, dataclasses.replace(SETTINGS, udp=False)
        # (settings, register fields, UDP, or the refusal)
        cases = [
            (SETTINGS, {}, False),
            (SETTINGS, {"protocol": ""}, False),
            (udp, {"protocol": "udp"}, True),
            (noUdp, {"protocol": "udp"}, "protocol 'udp' is not supported, only tcp"),
            (udp, {"protocol": "sctp"}, "protocol 'sctp' is not supported, only tcp"),
            (SETTINGS, {"remote_port": 65536}, "remote port 65536 is not from 0 to 65535"),
            (SETTINGS, {"remote_port": 0}, False),
            (udp, {"protocol": "udp", "remote_port": 0},
             "a UDP mapping needs a remote_port of its own (0 is for TCP)"),
            (udp, {"protocol": "udp", "group": "web"}, "groups are for TCP mappings, not UDP"),
            (udp, {"group": "web"}, False),
        ]
        for settings, fields, expected in cases:
            with self.subTest(udp=settings.udp, **fields):
                msg = register(**fields)
                if isinstance(expected, str):
                    with self.assertRaises(RegistrationRefused) as caught:
                        access.isUdp(settings, msg)
                    self.assertEqual(str(caught.exception), expected)
                else:
                    self.assertEqual(access.isUdp(settings, msg), expected)


class SourceTests(unittest.TestCase):
    def test_serverSources(self):
        # (name, address, let in)
        cases = [("anyone", "10.1.2.3", True), ("alice", "192.0.2.7", True),
                 ("alice", "198.51.100.1", False), ("bob", "10.1.2.3", False),
                 ("bob", "198.51.100.1", True)]
        for name, address, allowed in cases:
            with self.subTest(name=name, address=address):
                policies = access.serverSources(SETTINGS, name)
                self.assertEqual(permitted(policies, address), allowed)

    def test_askedSources(self):
        self.assertEqual(access.askedSources(register()), ())
        asked = access.askedSources(register(deny_sources=("203.0.113.0/24",)))
        self.assertEqual(len(asked), 1)
        self.assertFalse(permitted(asked, "203.0.113.9"))
        self.assertTrue(permitted(asked, "198.51.100.1"))
        with self.assertRaises(RegistrationRefused) as caught:
            access.askedSources(register(allow_sources=("not-a-network",)))
        self.assertIn("register.allow_sources", str(caught.exception))


class LimitTests(unittest.TestCase):
    def test_userLimits(self):
        # (register fields, limits): the strictest of server, listed client and request.
        cases = [
            ({}, (50, 20.0, 1_000_000)),
            ({"max_users": 5, "max_connection_rate": 100.0, "bandwidth_limit": 500},
             (5, 20.0, 500)),
            ({"name": "alice"}, (10, 20.0, 1_000_000)),
            ({"name": "alice", "max_users": 80}, (10, 20.0, 1_000_000)),
        ]
        for fields, expected in cases:
            with self.subTest(**fields):
                self.assertEqual(tuple(access.userLimits(SETTINGS, register(**fields))), expected)

    def test_noLimits(self):
        settings = ServerSettings(token=SHARED)
        self.assertEqual(tuple(access.userLimits(settings, register())), (0, 0, 0))

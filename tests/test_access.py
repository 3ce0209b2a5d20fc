"""
Who may register what, on a real server over loopback: clients listed in
server.clients with a token, allowed ports and a mapping limit of their own,
the shared token for every other name (or for none), data channels held to
the same tokens, and server.max_mappings_per_client.  Also the config keys
and options that set all this.
"""

from __future__ import annotations

import os
import textwrap
from typing import Optional

from twisted.internet import defer
from twisted.trial import unittest

from gotunnel.tls import certs
from gotunnel.config.settings import ClientPolicy, ServerSettings
from gotunnel.config.yamlfile import ConfigError, readConfigFile
from gotunnel.cli.tap import ClientOptions, ServerOptions
from tests.support import (
    HOST, TOKEN, LogWatcher, Tunnel, connectRaw, connectUser, dataChannelMessage, freePort,
    jsonFrame, listenTarget, registerMessage, temporaryDirectory, waitUntil, within,
)
from tests.test_tls import makeCertificates

ALICE_TOKEN = "alice-own-secret"
OK = {"type": "register_resp", "status": "ok"}
REGISTERED = dict(OK, pool=ServerSettings.max_pool_count)


def failed(reason: str) -> dict:
    return {"type": "register_resp", "status": "fail", "reason": reason}


class AccessTestCase(unittest.TestCase):
    """A server where alice has a token of her own; everyone else uses the shared one."""

    timeout = 60
    alice = ClientPolicy(token=ALICE_TOKEN)
    overrides: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.logs = LogWatcher(self)
        self.tunnel = Tunnel(self)
        self.server = yield self.tunnel.startServer(clients={"alice": self.alice},
                                                    **self.overrides)

    @defer.inlineCallbacks
    def register(self, name: str, token: str, remote_port: Optional[int] = None):
        """A raw control channel that sent C{register}; (raw, its answer, remote_port)."""
        remote_port = remote_port or freePort()
        raw = yield connectRaw(self, self.tunnel.controlPort,
                               jsonFrame(registerMessage(remote_port, name, token=token)))
        [answer] = yield within(raw.whenFrame(), 15, f"the answer to {name}'s register")
        return raw, answer, remote_port

    @defer.inlineCallbacks
    def assertRegisters(self, name: str, token: str, remote_port: Optional[int] = None):
        raw, answer, remote_port = yield self.register(name, token, remote_port)
        self.assertEqual(answer, REGISTERED)
        return raw, remote_port

    @defer.inlineCallbacks
    def assertRefused(self, name: str, token: str, reason: str,
                      remote_port: Optional[int] = None):
        """
        C{register} is answered fail with C{reason}, the connection closed, and
        the refusal logged with our address and without any token.
        """
        raw, answer, remote_port = yield self.register(name, token, remote_port)
        self.assertEqual(answer, failed(reason))
        yield within(raw.closed, 15, "the server to close the refused connection")
        [event] = yield within(self.logs.whenMatched(LogWatcher.formatted(
            "refused registration", peer=raw.peerName)), 5, "the refusal's log line")
        self.assertEqual(event["reason"], reason)
        for secret in (TOKEN, ALICE_TOKEN):
            self.assertNotIn(secret, self.logs.text())


class TokenTests(AccessTestCase):
    def test_ownTokenAccepted(self):
        return self.assertRegisters("alice", ALICE_TOKEN)

    def test_sharedTokenRefusedForListedName(self):
        return self.assertRefused("alice", TOKEN, "authentication failed")

    def test_wrongTokenRefused(self):
        return self.assertRefused("alice", "guess", "authentication failed")

    @defer.inlineCallbacks
    def test_sharedTokenForOtherNames(self):
        """A name not listed registers with the shared token, not with alice's."""
        yield self.assertRegisters("bob", TOKEN)
        yield self.assertRefused("carol", ALICE_TOKEN, "authentication failed")

    @defer.inlineCallbacks
    def test_clientWithOwnToken(self):
        """Our client, named alice with her token: registered, and its data channels attach."""
        target = listenTarget(self)
        client, public = yield within(self.tunnel.publish(
            target, name="alice", token=ALICE_TOKEN), 15, "alice's registration")
        user = yield connectUser(self, public)
        user.transport.write(b"through alice's data channel")
        received = yield within(user.whenReceived(28), 15, "the echo")
        self.assertEqual(received, b"through alice's data channel")


class NoSharedTokenTests(AccessTestCase):
    """server.token empty with server.clients: only listed clients may register."""

    overrides = {"token": ""}

    @defer.inlineCallbacks
    def test_onlyListedClients(self):
        yield self.assertRefused("bob", "", "authentication failed")
        yield self.assertRefused("bob", TOKEN, "authentication failed")
        yield self.assertRegisters("alice", ALICE_TOKEN)


class DataChannelTokenTests(AccessTestCase):
    @defer.inlineCallbacks
    def test_dataChannelNeedsTheMappingsOwnToken(self):
        """
        A user of alice's port waits for a data channel; one with the shared
        token, a wrong token, or bob's name cannot take the user; alice's own
        token can, and the user's bytes flow through it.
        """
        control, public = yield self.assertRegisters("alice", ALICE_TOKEN)
        user = yield connectUser(self, public)
        [request] = yield within(control.whenFrame(
            lambda f: f.get("type") == "open_data_channel"), 15, "open_data_channel")
        conn_id = request["conn_id"]

        attempts = [
            (dataChannelMessage(public, conn_id, token=TOKEN, name="alice"),
             "authentication failed"),
            (dataChannelMessage(public, conn_id, token="guess", name="alice"),
             "authentication failed"),
            (dataChannelMessage(public, conn_id, token=TOKEN, name="bob"),
             "no user is waiting for this data channel"),
            (dataChannelMessage(public, None, token=TOKEN, name="bob"),
             "no user is waiting for this data channel"),
        ]
        for message, reason in attempts:
            raw = yield connectRaw(self, self.tunnel.controlPort, jsonFrame(message))
            [answer] = yield within(raw.whenFrame(), 15, "the data channel's answer")
            self.assertEqual(answer, failed(reason), message)
            yield within(raw.closed, 15, "the refused data channel to close")
        self.assertIn(conn_id, self.server.registry.waitingUsers)

        data = yield connectRaw(self, self.tunnel.controlPort, jsonFrame(
            dataChannelMessage(public, conn_id, token=ALICE_TOKEN, name="alice")), rawAfter=1)
        [answer] = yield within(data.whenFrame(), 15, "the data channel's answer")
        self.assertEqual(answer, OK)
        user.transport.write(b"hello alice")
        received = yield within(data.whenRaw(11), 15, "the user's bytes")
        self.assertEqual(received, b"hello alice")


class DataChannelOwnershipTests(AccessTestCase):
    """
    A data channel serves only the mappings of whoever registered them: a
    listed client's own token for its mappings, the shared token for the
    others.  alice is listed; bob uses the shared token.
    """

    @defer.inlineCallbacks
    def bobWithUser(self):
        """bob's mapping and a user of it that waits; (bob's control, public port, user)."""
        control, public = yield self.assertRegisters("bob", TOKEN)
        user = yield connectUser(self, public)
        user.transport.write(b"bob's user's secret")
        yield within(control.whenFrame(lambda f: f.get("type") == "open_data_channel"),
                     15, "open_data_channel for bob's user")
        return control, public, user

    @defer.inlineCallbacks
    def assertDataChannelRefused(self, message: dict, reason: str):
        raw = yield connectRaw(self, self.tunnel.controlPort, jsonFrame(message), rawAfter=1)
        [answer] = yield within(raw.whenFrame(), 15, "the data channel's answer")
        self.assertEqual(answer, failed(reason))
        yield within(raw.closed, 15, "the refused data channel to close")
        self.assertEqual(bytes(raw.raw), b"")

    @defer.inlineCallbacks
    def assertServes(self, user, message: dict):
        """A data channel sent C{message} is handed C{user}, and bytes flow both ways."""
        data = yield connectRaw(self, self.tunnel.controlPort, jsonFrame(message), rawAfter=1)
        [answer] = yield within(data.whenFrame(), 15, "the data channel's answer")
        self.assertEqual(answer, OK)
        received = yield within(data.whenRaw(19), 15, "the user's bytes")
        self.assertEqual(received, b"bob's user's secret"[:len(received)])
        data.transport.write(b"answer")
        echoed = yield within(user.whenReceived(6), 15, "the answer at the user")
        self.assertEqual(echoed, b"answer")

    @defer.inlineCallbacks
    def test_listedClientCannotTakeSharedUserWithoutConnId(self):
        """
        alice's data channel without conn_id for bob's port is refused, and
        bob's user still waits; a Go-style data channel without conn_id with
        the shared token then gets that user.
        """
        _, public, user = yield self.bobWithUser()
        yield self.assertDataChannelRefused(
            dataChannelMessage(public, None, token=ALICE_TOKEN, name="alice"),
            "no user is waiting for this data channel")
        self.assertEqual(len(self.server.registry.tunnels[public].waiting), 1)
        yield self.assertServes(user, dataChannelMessage(public, None, token=TOKEN, name="bob"))

    @defer.inlineCallbacks
    def test_listedClientCannotTakeSharedUserByConnId(self):
        """Knowing a conn_id of bob's is not enough: alice's token does not serve bob's user."""
        control, public, user = yield self.bobWithUser()
        [request] = control.frames.matching(lambda f: f.get("type") == "open_data_channel")
        yield self.assertDataChannelRefused(
            dataChannelMessage(public, request["conn_id"], token=ALICE_TOKEN, name="alice"),
            "no user is waiting for this data channel")
        yield self.assertServes(user, dataChannelMessage(
            public, request["conn_id"], token=TOKEN, name="bob"))

    @defer.inlineCallbacks
    def test_listedClientCannotPoolForSharedMapping(self):
        """
        alice, without even registering, cannot put a pooled data channel in
        bob's pool: it is refused, and bob's next user is announced to bob.
        """
        control, public = yield self.assertRegisters("bob", TOKEN)
        message = dict(dataChannelMessage(public, None, token=ALICE_TOKEN, name="alice"),
                       pooled=True)
        alice = yield connectRaw(self, self.tunnel.controlPort, jsonFrame(message), rawAfter=1)
        # The server has read the frame: answered it, or taken the channel.
        yield waitUntil(lambda: alice.frames.items or self.server.registry.tunnels[public].pool,
                        15, "the server to read alice's pooled data channel")
        user = yield connectUser(self, public)
        user.transport.write(b"bob's user's secret")
        [answer] = yield within(alice.whenFrame(), 15, "the answer to alice's pooled channel")
        self.assertEqual(answer, failed(f"no mapping of port {public} to pool for"))
        yield within(alice.closed, 15, "alice's refused channel to close")
        self.assertEqual(bytes(alice.raw), b"")
        yield within(control.whenFrame(lambda f: f.get("type") == "open_data_channel"),
                     15, "open_data_channel for bob's user")

    @defer.inlineCallbacks
    def test_ownersPooledChannelServes(self):
        """bob's own pooled data channel, with the shared token, gets bob's next user."""
        control, public = yield self.assertRegisters("bob", TOKEN)
        message = dict(dataChannelMessage(public, None, token=TOKEN, name="bob"), pooled=True)
        data = yield connectRaw(self, self.tunnel.controlPort, jsonFrame(message), rawAfter=1)
        yield waitUntil(lambda: self.server.registry.tunnels[public].pool, 15,
                        "bob's pooled channel in the pool")
        user = yield connectUser(self, public)
        user.transport.write(b"to the pool")
        [answer] = yield within(data.whenFrame(), 15, "the pooled channel's answer")
        self.assertEqual(answer, OK)
        received = yield within(data.whenRaw(11), 15, "the user's bytes")
        self.assertEqual(received, b"to the pool")
        self.assertEqual(control.frames.matching(lambda f: f.get("type") == "open_data_channel"),
                         [])

    @defer.inlineCallbacks
    def test_listedOwnerWithoutConnId(self):
        """A Go-style data channel without conn_id, with alice's own token, serves alice's user."""
        control, public = yield self.assertRegisters("alice", ALICE_TOKEN)
        user = yield connectUser(self, public)
        user.transport.write(b"bob's user's secret")
        yield within(control.whenFrame(lambda f: f.get("type") == "open_data_channel"),
                     15, "open_data_channel for alice's user")
        yield self.assertDataChannelRefused(
            dataChannelMessage(public, None, token=TOKEN, name="bob"),
            "no user is waiting for this data channel")
        yield self.assertServes(user, dataChannelMessage(
            public, None, token=ALICE_TOKEN, name="alice"))



class NameTests(AccessTestCase):
    """
    A listed name is its client's: a holder of the shared token can take
    neither the name nor its ports, live or under lease.  Names under the
    shared token are anybody's who holds it.
    """

    @defer.inlineCallbacks
    def test_sharedTokenCannotTakeAListedClientsPort(self):
        alice, public = yield self.assertRegisters("alice", ALICE_TOKEN)
        yield self.assertRefused("bob", TOKEN,
                                 f"remote port {public} is already taken by another client",
                                 public)
        yield self.assertRefused("alice", TOKEN, "authentication failed", public)
        alice.transport.abortConnection()
        yield waitUntil(lambda: self.server.registry.leases.get(public), 15,
                        "alice's port to be leased")
        _, answer, _ = yield self.register("bob", TOKEN, public)
        self.assertEqual(answer["status"], "fail")
        self.assertTrue(answer["reason"].startswith(
            f"remote port {public} is reserved for the client that had it, for "), answer)
        yield self.assertRefused("alice", TOKEN, "authentication failed", public)
        yield self.assertRegisters("alice", ALICE_TOKEN, public)

    @defer.inlineCallbacks
    def test_sharedNameIsAnyHolders(self):
        """
        A name under the shared token is not owned: another holder of the
        shared token using it takes its port over, as a reconnect would.
        """
        first, public = yield self.assertRegisters("office", TOKEN)
        yield self.assertRegisters("office", TOKEN, public)
        yield within(first.closed, 15, "the first holder's control channel to close")

class PortTests(AccessTestCase):
    """alice may use one port of her own; everyone else the server's allow_ports."""

    def setUp(self):
        self.alicePort, self.serverPort = freePort(), freePort()
        self.alice = ClientPolicy(token=ALICE_TOKEN,
                                  allow_ports=(range(self.alicePort, self.alicePort + 1),))
        self.overrides = {"allow_ports": (range(self.serverPort, self.serverPort + 1),)}
        return super().setUp()

    @defer.inlineCallbacks
    def test_allowPortsPerClient(self):
        yield self.assertRefused(
            "alice", ALICE_TOKEN,
            f"remote port {self.serverPort} is not allowed for client 'alice'",
            self.serverPort)
        yield self.assertRefused(
            "bob", TOKEN, f"remote port {self.alicePort} is not allowed on this server",
            self.alicePort)
        yield self.assertRegisters("alice", ALICE_TOKEN, self.alicePort)
        yield self.assertRegisters("bob", TOKEN, self.serverPort)


class MappingLimitTests(AccessTestCase):
    """alice may hold 2 mappings; any other name 1 (server.max_mappings_per_client)."""

    alice = ClientPolicy(token=ALICE_TOKEN, max_mappings=2)
    overrides = {"max_mappings_per_client": 1}

    @defer.inlineCallbacks
    def test_perClientLimit(self):
        first, firstPort = yield self.assertRegisters("alice", ALICE_TOKEN)
        yield self.assertRegisters("alice", ALICE_TOKEN)
        yield self.assertRefused("alice", ALICE_TOKEN,
                                 "too many mappings for client 'alice': it may hold 2 at once")
        # Registering a port it holds again replaces that mapping.
        yield self.assertRegisters("alice", ALICE_TOKEN, firstPort)
        yield within(first.closed, 15, "the replaced control channel to close")
        replacement = self.server.registry.tunnels[firstPort].channel
        replacement.transport.loseConnection()
        yield waitUntil(lambda: firstPort not in self.server.registry.tunnels, 15,
                        "the mapping to go")
        yield self.assertRegisters("alice", ALICE_TOKEN)

    @defer.inlineCallbacks
    def test_serverWideLimit(self):
        yield self.assertRegisters("bob", TOKEN)
        yield self.assertRefused("bob", TOKEN,
                                 "too many mappings for client 'bob': it may hold 1 at once")
        yield self.assertRegisters("carol", TOKEN)


# ---------------------------------------------------------------------------
# Config keys and options


class ConfigFileTestCase(unittest.TestCase):
    def setUp(self):
        self.directory = temporaryDirectory(self)

    def write(self, text: str) -> str:
        path = os.path.join(self.directory, "config.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))
        return path


class AccessConfigTests(ConfigFileTestCase):

    def test_serverKeys(self):
        """server.clients, max_mappings_per_client and the TLS keys, read from a file."""
        makeCertificates(self.directory, "--ip", HOST)
        path = self.write(f"""\
            server:
              clients:
                alice: {{token: 0123, allow_ports: "20000-20010", max_mappings: 4}}
                bob: {{token: "b"}}
              max_mappings_per_client: 3
              tls_cert: {self.directory}/{certs.SERVER_CERT}
              tls_key: {self.directory}/{certs.SERVER_KEY}
              tls_client_ca: {self.directory}/{certs.CA_CERT}
            """)
        options = ServerOptions()
        options.parseOptions(["--config", path])
        settings = options.settings()
        self.assertEqual(settings.clients, {
            "alice": ClientPolicy(token="0123", allow_ports=(range(20000, 20011),),
                                  max_mappings=4),
            "bob": ClientPolicy(token="b")})
        self.assertEqual(settings.token, "")
        self.assertEqual(settings.max_mappings_per_client, 3)
        self.assertEqual(settings.tls_cert, f"{self.directory}/{certs.SERVER_CERT}")
        self.assertEqual(settings.tls_client_ca, f"{self.directory}/{certs.CA_CERT}")

    def test_maxMappingsOption(self):
        path = self.write("server:\n  token: t\n  max_mappings_per_client: 3\n")
        options = ServerOptions()
        options.parseOptions(["--config", path, "--max-mappings-per-client", "5"])
        self.assertEqual(options.settings().max_mappings_per_client, 5)

    def test_clientKeys(self):
        makeCertificates(self.directory, "--ip", HOST)
        path = self.write(f"""\
            client:
              token: t
              local_ports: 22
              tls: true
              tls_ca: {self.directory}/{certs.CA_CERT}
              tls_server_name: tunnel.example.com
            """)
        options = ClientOptions()
        options.parseOptions(["--config", path])
        settings = options.settings()
        self.assertTrue(settings.tls)
        self.assertEqual(settings.tls_ca, f"{self.directory}/{certs.CA_CERT}")
        self.assertEqual(settings.tls_server_name, "tunnel.example.com")

    def assertConfigError(self, role: str, text: str, line: str) -> None:
        path = self.write(text)
        options = ServerOptions() if role == "server" else ClientOptions()
        with self.assertRaises(ConfigError) as caught:
            options.parseOptions(["--config", path])
        self.assertEqual(str(caught.exception), f"{path}: {line}")

    def test_clientWithoutToken(self):
        self.assertConfigError(
            "server", "server:\n  clients:\n    alice: {allow_ports: 22}\n",
            "server.clients.alice.token is missing: every listed client needs its own token")

    def test_clientUnknownKey(self):
        self.assertConfigError(
            "server", "server:\n  clients:\n    alice: {token: a, ports: 22}\n",
            "server.clients.alice.ports is not a known key "
            "(expected token, allow_ports, max_mappings, domains, allow_sources, deny_sources, "
            "max_users_per_port, max_connection_rate, bandwidth_limit)")

    def test_maxMappingsAtLeastOne(self):
        self.assertConfigError(
            "server", "server:\n  token: t\n  max_mappings_per_client: 0\n",
            "server.max_mappings_per_client must be a whole number of at least 1, got 0")

    def test_tlsFlag(self):
        self.assertConfigError(
            "client", "client:\n  token: t\n  local_ports: 22\n  tls: maybe\n",
            "client.tls must be true or false, got 'maybe'")

    def test_noTokenAndNoClients(self):
        self.assertConfigError("server", "server:\n  max_mappings_per_client: 2\n",
                               "server.token is missing (set it there or give --token TOKEN)")


def documentedYAML(document: str, heading: str) -> str:
    """The first ```yaml block after C{heading} in docs/C{document}."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "docs", document)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return text.split(f"\n{heading}\n", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]


class DocumentedExamplesTests(ConfigFileTestCase):
    """The YAML examples of docs/configuration.md#clients and docs/tls.md read as they say."""

    def test_clientsExample(self):
        path = self.write(documentedYAML("configuration.md", "## Clients"))
        options = ServerOptions()
        options.parseOptions(["--config", path])
        settings = options.settings()
        self.assertEqual(settings.token, "shared-secret")
        self.assertEqual(settings.clients, {
            "alice": ClientPolicy(token="alice-secret", allow_ports=(range(20000, 20011),),
                                  max_mappings=4),
            "bob": ClientPolicy(token="bob-secret")})

    def test_tlsExample(self):
        configFile = readConfigFile(self.write(documentedYAML("tls.md", "## In config.yaml")))
        server, client = configFile.serverValues(), configFile.clientValues()
        self.assertEqual((server["tls_cert"], server["tls_key"], server["tls_client_ca"]),
                         ("/etc/gotunnel/server.pem", "/etc/gotunnel/server.key",
                          "/etc/gotunnel/ca.pem"))
        self.assertEqual((client["tls"], client["tls_ca"], client["tls_client_cert"],
                          client["tls_client_key"], client["name"]),
                         (True, "/etc/gotunnel/ca.pem", "/etc/gotunnel/client-alice.pem",
                          "/etc/gotunnel/client-alice.key", "alice"))


class SharedTokenNameTests(ConfigFileTestCase):
    """A listed client's token must be its own: not the shared token, not another's."""

    def assertRefused(self, text: str, message: str, *args: str) -> None:
        path = self.write(text)
        with self.assertRaises(ConfigError) as caught:
            ServerOptions().parseOptions(["--config", path, *args])
        self.assertEqual(str(caught.exception), f"{path}: {message}")

    def test_sharedTokenAsAClientsToken(self):
        self.assertRefused(
            """\
            server:
              token: "same-secret"
              clients:
                alice: {token: "same-secret"}
            """,
            "server.clients.alice.token is the same as the shared server.token: whoever "
            "holds that could register as 'alice'; give 'alice' a token of its own")

    def test_sharedTokenFromTheCommandLine(self):
        self.assertRefused(
            """\
            server:
              clients:
                alice: {token: "same-secret"}
            """,
            "server.clients.alice.token is the same as the shared server.token: whoever "
            "holds that could register as 'alice'; give 'alice' a token of its own",
            "--token", "same-secret")

    def test_twoClientsWithOneToken(self):
        self.assertRefused(
            """\
            server:
              token: "shared"
              clients:
                alice: {token: "one-secret"}
                bob: {token: "one-secret"}
            """,
            "server.clients.bob.token is the same as server.clients.alice.token: whoever "
            "holds that could register as 'bob'; give 'bob' a token of its own")

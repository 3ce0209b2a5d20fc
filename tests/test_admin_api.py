"""
The admin endpoint: its auth (tokens, sessions, back-off) on a Clock, every
route on a memory reactor with twisted.web's DummyRequest, and the whole
endpoint over real loopback sockets with a real server, client and users:
bytes that grow during a transfer on every relay path, and actions that
really drop a control channel, close and reopen a public port, and close a
user's connection.
"""

from __future__ import annotations

import json
from io import BytesIO

from twisted.internet import defer, error, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from gotunnel.admin import auth as authModule
from gotunnel.admin.api import MAX_BODY, AdminAPI, BoundedRequest
from gotunnel.admin.auth import AdminAuth
from gotunnel.admin.metrics import MetricsPage
from gotunnel.cli.tap import ServerOptions
from tests.support import (
    HOST, Tunnel, connectUser, connectionRefused, listenTarget, randomBytes, waitUntil, within,
)
from tests.test_server import ServerTestCase, dataChannel, register

ADMIN_TOKEN = "admin-Token-0xA11CE"
WAIT = 30


class AuthTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.failures = []
        self.auth = AdminAuth(ADMIN_TOKEN, "ops", "pw", self.clock,
                              counted=lambda: self.failures.append(1))

    def test_token(self):
        self.assertTrue(self.auth.bearerValid(ADMIN_TOKEN))
        self.assertFalse(self.auth.bearerValid(ADMIN_TOKEN + "x"))
        self.assertFalse(self.auth.bearerValid(""))

    def test_loginWithTokenOrUser(self):
        """A session comes for the token, or the user and password; it then is a bearer."""
        for body in ({"token": ADMIN_TOKEN}, {"user": "ops", "password": "pw"}):
            session = self.auth.login(body)
            self.assertIsNotNone(session)
            self.assertTrue(self.auth.bearerValid(session))
        for body in ({"token": "nope"}, {"user": "ops", "password": "no"},
                     {"user": "no", "password": "pw"}, {}, {"token": 5}):
            self.assertIsNone(self.auth.login(body))

    def test_sessionExpires(self):
        session = self.auth.login({"token": ADMIN_TOKEN})
        self.clock.advance(authModule.SESSION_LIFETIME - 1)
        self.assertTrue(self.auth.bearerValid(session))
        self.clock.advance(1)
        self.assertFalse(self.auth.bearerValid(session))
        self.assertEqual(len(self.auth.sessions), 0)

    def test_oldestSessionEvicted(self):
        self.patch(authModule, "MAX_SESSIONS", 3)
        sessions = [self.auth.login({"token": ADMIN_TOKEN}) for _ in range(4)]
        self.assertEqual(len(self.auth.sessions), 3)
        self.assertFalse(self.auth.bearerValid(sessions[0]))
        self.assertTrue(all(self.auth.bearerValid(s) for s in sessions[1:]))

    def test_backOffGrowsAndIsCapped(self):
        """The first failure costs nothing; each after it doubles the wait, up to a cap."""
        self.auth.failed("192.0.2.1")
        self.assertEqual(self.auth.waitFor("192.0.2.1"), 0)
        waits = []
        for _ in range(12):
            self.auth.failed("192.0.2.1")
            waits.append(self.auth.waitFor("192.0.2.1"))
        self.assertEqual(waits[:3], [0.25, 0.5, 1.0])
        self.assertEqual(waits[-1], authModule.MAX_BACKOFF)
        self.assertEqual(self.auth.waitFor("192.0.2.2"), 0)
        self.assertEqual(len(self.failures), 13)
        self.auth.succeeded("192.0.2.1")
        self.assertEqual(self.auth.waitFor("192.0.2.1"), 0)

    def test_failingAddressesBounded(self):
        self.patch(authModule, "MAX_FAILING_ADDRESSES", 5)
        for i in range(20):
            self.auth.failed(f"192.0.2.{i}")
        self.assertLessEqual(len(self.auth.failures), 5)

    def test_notConfigured(self):
        self.assertFalse(AdminAuth("", "", "", self.clock).configured)
        self.assertFalse(AdminAuth("", "ops", "", self.clock).configured)
        self.assertTrue(AdminAuth("", "ops", "pw", self.clock).configured)


def request(path: str, method: bytes = b"GET", bearer=None, body: bytes = b"",
            host: str = "127.0.0.1") -> DummyRequest:
    parts = [segment.encode() for segment in path.strip("/").split("/")]
    req = DummyRequest(parts[1:] if parts[0] == b"api" else parts)
    req.client = IPv4Address("TCP", host, 50000)
    req.method = method
    req.content = BytesIO(body)
    if bearer is not None:
        req.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {bearer}".encode()])
    return req


class RouteTests(ServerTestCase):
    """Every route, on a memory reactor."""

    def setUp(self):
        super().setUp()
        self.auth = AdminAuth(ADMIN_TOKEN, "ops", "pw", self.reactor,
                              counted=self._counted)
        self.api = AdminAPI(self.registry, self.auth)
        self.metrics = MetricsPage(self.registry, self.auth)

    def _counted(self):
        self.registry.stats.authFailures["admin"] += 1

    def call(self, path: str, method: bytes = b"GET", bearer=ADMIN_TOKEN, body: bytes = b"",
             host: str = "127.0.0.1"):
        req = request(path, method, bearer, body, host)
        resource = self.metrics if path == "/metrics" else self.api
        result = resource.render(req)
        if result is not NOT_DONE_YET:
            req.write(result)
            req.finish()
        self.assertTrue(req.finished, f"{path} did not answer")
        payload = b"".join(req.written)
        code = req.responseCode or 200
        if path == "/metrics" and code == 200:
            return code, payload.decode(), req
        return code, json.loads(payload), req

    def test_unauthorized(self):
        """
        Every read, action and /metrics without a credential, or with a
        wrong one, is 401 JSON with WWW-Authenticate: Bearer.
        """
        routes = [("/api/overview", b"GET"), ("/api/clients", b"GET"), ("/api/ports", b"GET"),
                  ("/api/connections", b"GET"), ("/api/clients/c1/disconnect", b"POST"),
                  ("/api/ports/10022/offline", b"POST"), ("/api/ports/10022/online", b"POST"),
                  ("/api/connections/u1/close", b"POST"), ("/metrics", b"GET")]
        for path, method in routes:
            for bearer in (None, "wrong"):
                code, body, req = self.call(path, method, bearer=bearer,
                                            host=f"192.0.2.{len(path)}")
                self.assertEqual((code, body), (401, {"error": "unauthorized"}), path)
                self.assertEqual(req.responseHeaders.getRawHeaders(b"www-authenticate"),
                                 [b"Bearer"])
                self.assertEqual(req.responseHeaders.getRawHeaders(b"content-type"),
                                 [b"application/json"])

    def test_noCredentialsConfigured(self):
        """With no admin credentials, everything (login too) is 401."""
        self.auth.token = ""
        self.auth.user = self.auth.password = ""
        for path, method, body in (("/api/overview", b"GET", b""),
                                   ("/api/login", b"POST", b'{"token": ""}'),
                                   ("/metrics", b"GET", b"")):
            code, answer, _ = self.call(path, method, bearer="", body=body)
            self.assertEqual((code, answer), (401, {"error": "unauthorized"}), path)

    def test_wrongBearerBacksOff(self):
        """
        After repeated wrong credentials an address gets 429 with
        Retry-After, even with the right token, until its wait is over.
        """
        self.call("/api/overview", bearer="guess-1")
        self.call("/api/overview", bearer="guess-2")
        code, body, req = self.call("/api/overview")
        self.assertEqual(code, 429)
        self.assertEqual(req.responseHeaders.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(self.call("/api/overview", host="192.0.2.9")[0], 200)
        self.reactor.advance(0.25)
        self.assertEqual(self.call("/api/overview")[0], 200)
        self.assertEqual(self.registry.stats.authFailures["admin"], 2)

    def test_login(self):
        """POST /api/login: a session for good credentials, 401 for bad, 400 for junk."""
        code, body, _ = self.call("/api/login", b"POST", bearer=None,
                                  body=b'{"user": "ops", "password": "pw"}')
        self.assertEqual(code, 200)
        self.assertEqual(self.call("/api/clients", bearer=body["session"])[0], 200)
        code, body, _ = self.call("/api/login", b"POST", bearer=None, body=b'{"token": "no"}',
                                  host="192.0.2.50")
        self.assertEqual((code, body), (401, {"error": "wrong credentials"}))
        code, _, _ = self.call("/api/login", b"POST", bearer=None, body=b"not json",
                               host="192.0.2.51")
        self.assertEqual(code, 400)
        self.assertEqual(self.call("/api/login", b"GET", bearer=None)[0], 405)

    def test_loginBackOff(self):
        for _ in range(2):
            self.call("/api/login", b"POST", bearer=None, body=b'{"token": "no"}')
        code, _, _ = self.call("/api/login", b"POST", bearer=None,
                               body=json.dumps({"token": ADMIN_TOKEN}).encode())
        self.assertEqual(code, 429)

    def test_bodyTooLarge(self):
        """A body over the limit is 413 and is not kept."""
        req = boundedRequest()
        req.gotLength(None)
        req.handleContentChunk(b"x" * MAX_BODY)
        self.assertFalse(req.bodyTooLarge)
        req.handleContentChunk(b"x")
        self.assertTrue(req.bodyTooLarge)
        req.content.seek(0)
        self.assertLessEqual(len(req.content.read()), MAX_BODY)
        declared = boundedRequest()
        declared.gotLength(10 * MAX_BODY)
        self.assertTrue(declared.bodyTooLarge)
        big = request("/api/login", b"POST", body=b"{}")
        big.bodyTooLarge = True
        result = self.api.render(big)
        self.assertEqual(big.responseCode, 413)
        self.assertIn(b"error", result)

    def test_notFoundAndMethod(self):
        self.assertEqual(self.call("/api/nothing")[0], 404)
        self.assertEqual(self.call("/api/clients/c1/explode", b"POST")[0], 404)
        self.assertEqual(self.call("/api/overview", b"POST")[0], 405)
        self.assertEqual(self.call("/api/clients/c1/disconnect", b"GET")[0], 405)

    def test_overview(self):
        """
        A registered client, its port, and a spliced user with bytes each
        way, as the contract says.
        """
        self.registered()
        self.reactor.advance(3)
        user = self.connectUser()
        data = self.connect()
        data.send(dataChannel("conn-1") + b"hello")
        user.protocol.dataReceived(b"GET /")
        self.reactor.advance(2)
        code, body, req = self.call("/api/overview")
        self.assertEqual(code, 200)
        self.assertEqual(req.responseHeaders.getRawHeaders(b"content-type"),
                         [b"application/json"])
        [client] = [dict(c) for c in body["clients"]]
        address = client.pop("address")
        self.assertRegex(address, r"^192\.0\.2\.10:\d+$")
        self.assertEqual(client, {
            "id": "c1", "name": "edge-1", "identity": "shared-token",
            "connected_since": float(self.reactor.seconds() - 5),
            "last_heartbeat": float(self.reactor.seconds() - 5),
            "mappings": [{"remote_port": 10022, "local_port": 22}]})
        self.assertEqual(body["ports"], [{
            "remote_port": 10022, "client": "edge-1", "client_id": "c1", "local_port": 22,
            "state": "online", "users_now": 1, "users_total": 1, "bytes_in": 5,
            "bytes_out": 5, "pool": 0}])
        [conn] = body["connections"]
        self.assertEqual(conn, {"id": "u1", "remote_port": 10022, "client": "edge-1",
                                "user": user.protocol.peerAddress, "bytes_in": 5,
                                "bytes_out": 5, "age": 2.0})
        self.assertEqual(body["time"], self.reactor.seconds())
        self.assertEqual(self.call("/api/clients")[1], {"clients": body["clients"]})
        self.assertEqual(self.call("/api/ports")[1], {"ports": body["ports"]})
        self.assertEqual(self.call("/api/connections")[1], {"connections": body["connections"]})

    def test_registeringIsNoClientYet(self):
        """A control channel whose public port is still being opened is not listed as a client."""
        pending = defer.Deferred()

        class SlowEndpoint:
            def listen(self, factory):
                return pending

        self.patch(self.registry, "publicEndpoint", lambda port: SlowEndpoint())
        control = self.connect()
        control.send(register())
        self.assertEqual(self.call("/api/clients")[1], {"clients": []})
        self.assertEqual([p["remote_port"] for p in self.call("/api/ports")[1]["ports"]], [10022])

    def test_identity(self):
        """A client listed in server.clients shows as token:NAME."""
        from gotunnel.config.settings import ClientPolicy

        self.settings.clients = {"edge-1": ClientPolicy(token=gotunnel_token())}
        self.registered()
        [client] = self.call("/api/clients")[1]["clients"]
        self.assertEqual(client["identity"], "token:edge-1")

    def test_disconnect(self):
        """Disconnect closes the client's control channel and its port; 404 for no such id."""
        control = self.registered()
        [listener] = self.listeners(10022)
        self.assertEqual(self.call("/api/clients/c1/disconnect", b"POST")[:2],
                         (200, {"ok": True}))
        self.assertTrue(control.transport.disconnecting)
        self.assertTrue(listener.stopped)
        self.assertEqual(self.registry.tunnels, {})
        code, body, _ = self.call("/api/clients/c1/disconnect", b"POST")
        self.assertEqual(code, 404)
        self.assertIn("error", body)

    def test_offlineOnline(self):
        """offline stops the public listener, online listens again; 404 for other ports."""
        self.registered()
        [first] = self.listeners(10022)
        self.assertEqual(self.call("/api/ports/10022/offline", b"POST")[:2], (200, {"ok": True}))
        self.assertTrue(first.stopped)
        self.assertEqual(self.call("/api/ports")[1]["ports"][0]["state"], "offline")
        self.assertEqual(self.call("/api/ports/10022/online", b"POST")[:2], (200, {"ok": True}))
        self.assertEqual(len(self.listening(10022)), 1)
        self.assertEqual(self.call("/api/ports")[1]["ports"][0]["state"], "online")
        self.assertEqual(self.call("/api/ports/10023/offline", b"POST")[0], 404)
        self.assertEqual(self.call("/api/ports/x/online", b"POST")[0], 404)

    def test_onlineCannotListen(self):
        self.registered()
        self.call("/api/ports/10022/offline", b"POST")
        self.reactor.portsInUse.add(10022)
        code, body, _ = self.call("/api/ports/10022/online", b"POST")
        self.assertEqual(code, 409)
        self.assertIn("cannot listen", body["error"])

    def test_closeConnection(self):
        """close aborts the user's connection; its line says closed by admin."""
        self.registered()
        user = self.connectUser()
        self.connect().send(dataChannel("conn-1"))
        self.assertEqual(self.call("/api/connections/u1/close", b"POST")[:2], (200, {"ok": True}))
        self.assertTrue(user.transport.disconnecting)
        self.assertEqual(user.protocol.endedBy, "closed by admin")
        user.protocol.connectionLost(Failure(error.ConnectionAborted()))
        self.assertEqual(self.registry.stats.ports[(10022, "edge-1")].ended,
                         {"closed by admin": 1})
        self.assertEqual(self.call("/api/connections/u1/close", b"POST")[0], 404)

    def test_leasedPort(self):
        """
        A port held for a client that went shows as leased, named for the
        lease holder, with no client id and its totals; gone once the lease ends.
        """
        control = self.registered()
        user = self.connectUser()
        self.connect().send(dataChannel("conn-1") + b"hello")
        user.protocol.dataReceived(b"abc")
        user.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.registered(remote_port=10023, name="edge-2")
        control.lose()
        self.assertIsNotNone(self.registry.leases.get(10022))
        ports = self.call("/api/ports")[1]["ports"]
        self.assertEqual([(p["remote_port"], p["state"]) for p in ports],
                         [(10022, "leased"), (10023, "online")])
        self.assertEqual(ports[0], {
            "remote_port": 10022, "client": "edge-1", "client_id": None, "local_port": None,
            "state": "leased", "users_now": 0, "users_total": 1, "bytes_in": 3,
            "bytes_out": 5, "pool": 0})
        self.assertEqual([c["name"] for c in self.call("/api/clients")[1]["clients"]],
                         ["edge-2"])
        self.assertEqual(self.call("/api/ports/10022/online", b"POST")[0], 404)
        self.reactor.advance(self.settings.port_lease)
        self.assertEqual([p["remote_port"] for p in self.call("/api/ports")[1]["ports"]],
                         [10023])


def gotunnel_token():
    from tests.test_server import TOKEN

    return TOKEN


def boundedRequest() -> BoundedRequest:
    channel = DummyChannel()
    channel.site = Site(Resource())
    return BoundedRequest(channel, False)


class AdminClient:
    """HTTP to the admin endpoint of a running server."""

    def __init__(self, testCase, port: int, token: str = ADMIN_TOKEN) -> None:
        self.base = f"http://{HOST}:{port}"
        self.token = token
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)
        testCase.addCleanup(self.pool.closeCachedConnections)

    @defer.inlineCallbacks
    def call(self, path: str, method: bytes = b"GET", token=None, body=None):
        headers = Headers()
        token = self.token if token is None else token
        if token:
            headers.addRawHeader(b"authorization", f"Bearer {token}".encode())
        producer = None
        if body is not None:
            from twisted.web.client import FileBodyProducer

            producer = FileBodyProducer(BytesIO(body))
        response = yield self.agent.request(method, (self.base + path).encode(), headers,
                                            producer)
        payload = yield readBody(response)
        return response.code, payload

    @defer.inlineCallbacks
    def json(self, path: str, method: bytes = b"GET", **kwargs):
        code, payload = yield self.call(path, method, **kwargs)
        return code, json.loads(payload)


class LoopbackMixin:
    """The admin endpoint of a real server, with a real client and users."""

    zeroCopy = True
    spliceThread = None

    @defer.inlineCallbacks
    def startAll(self, **overrides):
        self.tunnel = Tunnel(self, zeroCopy=self.zeroCopy, spliceThread=self.spliceThread)
        self.tunnel.handOffExpected = False
        overrides.setdefault("admin", f"tcp:0:interface={HOST}")
        overrides.setdefault("admin_token", ADMIN_TOKEN)
        server = yield self.tunnel.startServer(**overrides)
        port = yield server.admin.whenListening()
        self.admin = AdminClient(self, port.getHost().port)
        self.client, self.public = yield self.tunnel.publish(listenTarget(self))
        return server


class LoopbackTransferMixin(LoopbackMixin):
    @defer.inlineCallbacks
    def test_bytesGrowDuringTransfer(self):
        """
        While a user streams through the tunnel, the connection's and the
        port's bytes in /api/overview grow from one read to the next,
        before the transfer ends, on this relay path.
        """
        yield self.startAll()
        self.tunnel.handOffExpected = True
        user = yield connectUser(self, self.public)
        chunk = randomBytes(256 * 1024)
        sent = [0]
        seen = []

        def pump():
            if not user.closed.called and sent[0] < 400 * len(chunk):
                user.transport.write(chunk)
                sent[0] += len(chunk)

        from twisted.internet.task import LoopingCall

        writer = LoopingCall(pump)
        writer.start(0.005)
        self.addCleanup(lambda: writer.running and writer.stop())

        @defer.inlineCallbacks
        def grown():
            code, body = yield self.admin.json("/api/overview")
            self.assertEqual(code, 200)
            if body["connections"]:
                seen.append((body["connections"][0]["bytes_in"],
                             body["connections"][0]["bytes_out"],
                             body["ports"][0]["bytes_in"]))
            return len(seen) >= 3 and seen[-1][0] > seen[-2][0] > seen[0][0] > 0 \
                and seen[-1][1] > seen[0][1]

        for _ in range(200):
            done = yield grown()
            if done:
                break
            yield deferLater(0.05)
        writer.stop()
        self.assertTrue(done, f"bytes did not grow: {seen}")
        self.assertLess(seen[-1][0], 400 * len(chunk), "the transfer ended before")
        self.assertEqual(seen[-1][2], seen[-1][0])


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


class ZeroCopyTransferTests(LoopbackTransferMixin, unittest.TestCase):
    zeroCopy = True
    spliceThread = False


class SpliceThreadTransferTests(LoopbackTransferMixin, unittest.TestCase):
    zeroCopy = True
    spliceThread = True


class OrdinaryTransferTests(LoopbackTransferMixin, unittest.TestCase):
    zeroCopy = False


class LoopbackActionTests(LoopbackMixin, unittest.TestCase):
    zeroCopy = None

    @defer.inlineCallbacks
    def test_authOverHTTP(self):
        yield self.startAll()
        code, body = yield self.admin.json("/api/overview", token="")
        self.assertEqual((code, body), (401, {"error": "unauthorized"}))
        code, body = yield self.admin.json("/api/login", b"POST", token="",
                                           body=json.dumps({"token": ADMIN_TOKEN}).encode())
        self.assertEqual(code, 200)
        code, body = yield self.admin.json("/api/clients", token=body["session"])
        self.assertEqual(code, 200)
        self.assertEqual([c["name"] for c in body["clients"]], ["test-client"])
        code, _ = yield self.admin.call("/api/login", b"POST", token="",
                                        body=b"{" + b" " * 10000 + b"}")
        self.assertEqual(code, 413)
        code, page = yield self.admin.call("/", token="")
        self.assertEqual(code, 200)
        self.assertIn(b"<html", page.lower())

    @defer.inlineCallbacks
    def test_disconnectDropsControlChannel(self):
        """The client's control channel really goes: the client sees it lost."""
        yield self.startAll()
        mapping = self.client.tunnels[0]
        channel = mapping.channel
        self.assertIsNotNone(channel)
        [client] = (yield self.admin.json("/api/clients"))[1]["clients"]
        code, body = yield self.admin.json(f"/api/clients/{client['id']}/disconnect", b"POST")
        self.assertEqual((code, body), (200, {"ok": True}))
        yield waitUntil(lambda: mapping.channel is not channel, WAIT,
                        "the client to lose its control channel")
        yield waitUntil(lambda: client["id"] not in [
            t.clientId for t in self.tunnel.server.registry.tunnels.values()], WAIT,
            "the client gone from the registry")

    @defer.inlineCallbacks
    def test_offlineOnlineReallyClosesThePort(self):
        yield self.startAll()
        code, _ = yield self.admin.json(f"/api/ports/{self.public}/offline", b"POST")
        self.assertEqual(code, 200)
        refused = yield within(connectionRefused(self.public), WAIT, "a connect to be refused")
        self.assertTrue(refused)
        code, _ = yield self.admin.json(f"/api/ports/{self.public}/online", b"POST")
        self.assertEqual(code, 200)
        user = yield connectUser(self, self.public)
        user.transport.write(b"ping")
        got = yield within(user.whenReceived(4), WAIT, "the echo after online")
        self.assertEqual(got, b"ping")

    @defer.inlineCallbacks
    def test_closeConnection(self):
        yield self.startAll()
        user = yield connectUser(self, self.public)
        user.transport.write(b"hi")
        yield within(user.whenReceived(2), WAIT, "the echo")
        [conn] = (yield self.admin.json("/api/connections"))[1]["connections"]
        code, _ = yield self.admin.json(f"/api/connections/{conn['id']}/close", b"POST")
        self.assertEqual(code, 200)
        yield within(user.closed, WAIT, "the user's connection to close")

    @defer.inlineCallbacks
    def test_metricsOverHTTP(self):
        yield self.startAll()
        code, _ = yield self.admin.call("/metrics", token="")
        self.assertEqual(code, 401)
        code, text = yield self.admin.call("/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b"gotunnel_clients 1.0", text)

    @defer.inlineCallbacks
    def test_stopClosesTheEndpoint(self):
        """stopService closes the admin port and its open connections."""
        server = yield self.startAll()
        port = server.admin.factory
        code, _ = yield self.admin.call("/api/overview")
        self.assertEqual(code, 200)
        yield server.stopService()
        self.assertEqual(len(port.protocols), 0)
        refused = yield connectionRefused(int(self.admin.base.rsplit(":", 1)[1]))
        self.assertTrue(refused)


class OptionTests(unittest.TestCase):
    def test_options(self):
        options = ServerOptions()
        options.parseOptions(["--token", "t", "--admin", "tcp:7400:interface=127.0.0.1",
                              "--admin-token", "a", "--admin-user", "u",
                              "--admin-password", "p"])
        settings = options.settings()
        self.assertEqual((settings.admin, settings.admin_token, settings.admin_user,
                          settings.admin_password),
                         ("tcp:7400:interface=127.0.0.1", "a", "u", "p"))
        self.assertNotIn("'a'", repr(settings))

    def test_badOptions(self):
        from twisted.python import usage

        with self.assertRaises(usage.UsageError):
            ServerOptions().parseOptions(["--token", "t", "--admin", "nonsense:1"])
        with self.assertRaises(usage.UsageError):
            ServerOptions().parseOptions(["--token", "t", "--admin", "tcp:7400",
                                          "--admin-user", "u"])

    def test_offByDefault(self):
        from gotunnel.config.settings import ServerSettings
        from gotunnel.server.service import TunnelServerService

        self.assertIsNone(TunnelServerService(ServerSettings(token="t")).admin)


class ServiceTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_noCredentialsStartsAndWarns(self):
        """
        With no admin credentials the endpoint still listens, logs a
        warning, serves the page, and answers 401 to the API and metrics.
        """
        from tests.support import LogWatcher

        logs = LogWatcher(self)
        tunnel = Tunnel(self)
        server = yield tunnel.startServer(admin=f"tcp:0:interface={HOST}")
        port = yield server.admin.whenListening()
        self.assertTrue(logs.matching(LogWatcher.formatted("the admin endpoint has no credentials")))
        admin = AdminClient(self, port.getHost().port, token="")
        for path in ("/api/overview", "/metrics"):
            code, body = yield admin.json(path)
            self.assertEqual((code, body), (401, {"error": "unauthorized"}), path)
        code, _ = yield admin.json("/api/login", b"POST", body=b'{"token": ""}')
        self.assertEqual(code, 401)
        code, _ = yield admin.call("/")
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_cannotListen(self):
        """An admin port already taken stops the server from starting, as the control port does."""
        from twisted.internet.endpoints import TCP4ServerEndpoint
        from twisted.internet.protocol import Factory

        from gotunnel.config.settings import ServerSettings
        from gotunnel.server.service import TunnelServerService

        taken = yield TCP4ServerEndpoint(reactor, 0, interface=HOST).listen(Factory())
        self.addCleanup(taken.stopListening)
        settings = ServerSettings(listen=f"tcp:0:interface={HOST}", token="t",
                                  admin=f"tcp:{taken.getHost().port}:interface={HOST}",
                                  admin_token=ADMIN_TOKEN)
        server = TunnelServerService(settings, reactor=reactor)
        self.assertRaises(error.CannotListenError, server.startService)
        yield server.stopService()

    def test_connectionsCapped(self):
        """Past the caps per address and in all, new admin connections are refused."""
        from gotunnel.admin import api

        self.patch(api, "MAX_CONNECTIONS_PER_ADDRESS", 2)
        self.patch(api, "MAX_CONNECTIONS", 3)
        factory = api.AdmissionFactory(Site(Resource()))
        first = IPv4Address("TCP", "192.0.2.1", 1)
        other = IPv4Address("TCP", "192.0.2.2", 1)
        built = [factory.buildProtocol(first) for _ in range(3)]
        self.assertIsNone(built[2])
        for protocol in built[:2]:
            factory.registerProtocol(protocol)
        third = factory.buildProtocol(other)
        self.assertIsNotNone(third)
        factory.registerProtocol(third)
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "192.0.2.3", 1)))
        factory.unregisterProtocol(built[0])
        self.assertIsNotNone(factory.buildProtocol(first))


class VirtualHostTests(unittest.TestCase):
    """Virtual hosts in the admin API: each mapping its own entry, with its scheme and domains."""

    def setUp(self):
        from tests.test_vhost_units import Fixture

        self.fixture = Fixture()
        self.api = AdminAPI(self.fixture.registry,
                            AdminAuth(ADMIN_TOKEN, "", "", self.fixture.reactor))
        self.fixture.register(name="web", domains=("a.example.com",))
        self.fixture.register(name="web", domains=("b.example.com", "c.example.com"))
        self.fixture.register(name="web", vhost="https", domains=("a.example.com",))

    def call(self, path: str, method: bytes = b"GET"):
        req = request(path, method, ADMIN_TOKEN)
        result = self.api.render(req)
        if result is not NOT_DONE_YET:
            req.write(result)
            req.finish()
        return req.responseCode or 200, json.loads(b"".join(req.written))

    def test_eachMappingItsOwnEntry(self):
        """
        Three virtual hosts of one client are three ports, told apart by
        vhost and domains, each with its own users and totals.
        """
        user, _ = self.fixture.user()
        user.dataReceived(b"GET / HTTP/1.1\r\nHost: b.example.com\r\n\r\n")
        ports = self.call("/api/ports")[1]["ports"]
        self.assertEqual(
            [(p["remote_port"], p["vhost"], p["domains"], p["client_id"], p["users_now"],
              p["users_total"]) for p in ports],
            [(0, "http", ["a.example.com"], "c1", 0, 0),
             (0, "http", ["b.example.com", "c.example.com"], "c2", 1, 1),
             (0, "https", ["a.example.com"], "c3", 0, 0)])
        clients = self.call("/api/clients")[1]["clients"]
        self.assertEqual([c["mappings"] for c in clients], [
            [{"remote_port": 0, "local_port": 80, "vhost": "http", "domains": ["a.example.com"]}],
            [{"remote_port": 0, "local_port": 80, "vhost": "http",
              "domains": ["b.example.com", "c.example.com"]}],
            [{"remote_port": 0, "local_port": 80, "vhost": "https", "domains": ["a.example.com"]}]])
        [conn] = self.call("/api/connections")[1]["connections"]
        self.assertEqual((conn["remote_port"], conn["vhost"], conn["domains"]),
                         (0, "http", ["b.example.com", "c.example.com"]))

    def test_metricsLabelEachMapping(self):
        """The metrics keep a label set per virtual host, not one for port 0."""
        from prometheus_client.parser import text_string_to_metric_families

        page = MetricsPage(self.fixture.registry,
                           AdminAuth(ADMIN_TOKEN, "", "", self.fixture.reactor))
        req = request("/metrics", bearer=ADMIN_TOKEN)
        body = page.render_GET(req).decode()
        [opened] = [f for f in text_string_to_metric_families(body)
                    if f.name == "gotunnel_connections_opened"]
        self.assertEqual(sorted(s.labels["remote_port"] for s in opened.samples),
                         ["http:a.example.com", "http:b.example.com,c.example.com",
                          "https:a.example.com"])

    def test_offlineOnlineByClientId(self):
        """A virtual host has no port of its own: the actions name it by its client id."""
        self.assertEqual(self.call("/api/ports/c2/offline", b"POST"), (200, {"ok": True}))
        self.assertEqual([p["state"] for p in self.call("/api/ports")[1]["ports"]],
                         ["online", "offline", "online"])
        user, transport = self.fixture.user()
        user.dataReceived(b"GET / HTTP/1.1\r\nHost: c.example.com\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 503 "))
        self.assertEqual(self.call("/api/ports/c2/online", b"POST"), (200, {"ok": True}))
        self.assertEqual(self.call("/api/ports/c2/online", b"POST"), (200, {"ok": True}))
        self.assertEqual(self.call("/api/ports/c9/offline", b"POST")[0], 404)
        self.assertEqual(self.call("/api/ports/0/offline", b"POST")[0], 404)

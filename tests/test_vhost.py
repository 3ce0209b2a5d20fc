"""
Virtual hosts end to end over loopback: the server's HTTP port routed by
Host and its HTTPS port routed by SNI, with real HTTP clients (Agent and
curl) and real TLS services with certificates of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from datetime import datetime, timezone
from io import BytesIO

from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols.basic import Int32StringReceiver
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from gotunnel.tls import certmaking
from gotunnel.client.service import TunnelClientService
from gotunnel.config.mappings import Mapping
from gotunnel.config.settings import ClientSettings
from tests.support import (
    HOST, TOKEN, Tunnel, User, freePort, spawn, temporaryDirectory, venvScript, waitUntil,
    within,
)

TIMEOUT = 30
START = 60
BIG = 4 * 1024 * 1024


class Service(resource.Resource):
    """A web service that says who it is and what it was sent."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def render_GET(self, request) -> bytes:
        if request.path.startswith(b"/big/"):
            size = int(request.path[5:])
            return bigBody(size)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({
            "service": self.name,
            "host": (request.getHeader(b"host") or b"").decode(),
            "x-forwarded-for": (request.getHeader(b"x-forwarded-for") or b"").decode(),
            "x-forwarded-proto": (request.getHeader(b"x-forwarded-proto") or b"").decode(),
            "x-forwarded-host": (request.getHeader(b"x-forwarded-host") or b"").decode(),
            "authorization": (request.getHeader(b"authorization") or b"").decode(),
            "path": request.path.decode(),
            "peer_port": request.getClientAddress().port,
        }).encode()

    def render_POST(self, request) -> bytes:
        return hashlib.sha256(request.content.read()).hexdigest().encode()


def bigBody(size: int) -> bytes:
    block = hashlib.sha256(b"gotunnel").digest() * 32
    return (block * (size // len(block) + 1))[:size]


def listenWeb(testCase, name: str) -> int:
    site = server.Site(Service(name))
    site.noisy = False
    port = reactor.listenTCP(0, site, interface=HOST)
    testCase.addCleanup(port.stopListening)
    return port.getHost().port


class WebSocketService(Protocol):
    """Reads a request head, answers 101 Switching Protocols, then echoes."""

    upgraded = False

    def connectionMade(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        if self.upgraded:
            self.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            self.upgraded = b"upgrade: websocket" in head.lower()
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\n\r\n" + rest)


class VirtualHostFixture:
    """A server with virtual-host ports, and clients publishing domains on them."""

    def __init__(self, testCase, **tunnelOptions) -> None:
        self.testCase = testCase
        self.tunnel = Tunnel(testCase, **tunnelOptions)

    @defer.inlineCallbacks
    def start(self, **overrides):
        overrides.setdefault("vhost_http", f"tcp:0:interface={HOST}")
        self.server = yield self.tunnel.startServer(**overrides)
        ports = self.server.virtualHostService.ports
        self.httpPort = ports["http"].getHost().port if "http" in ports else None
        self.httpsPort = ports["https"].getHost().port if "https" in ports else None
        return self.server

    def startClient(self, mappings, name="web", token=TOKEN, **overrides) -> TunnelClientService:
        settings = ClientSettings(server=f"tcp:{HOST}:{self.tunnel.controlPort}", token=token,
                                  name=name, mappings=mappings, pool_count=0)
        for key, value in overrides.items():
            setattr(settings, key, value)
        client = TunnelClientService(settings, reactor=reactor)
        client.startService()
        self.testCase.addCleanup(lambda: client.stopService() if client.running else None)
        return client

    @defer.inlineCallbacks
    def publish(self, mappings, **kwargs):
        client = self.startClient(mappings, **kwargs)
        for tunnel in client.tunnels:
            yield within(tunnel.whenRegistered(), TIMEOUT, "the client to register")
        return client


def http(port: int, domains, **extra) -> Mapping:
    return Mapping(HOST, port, 0, vhost="http", domains=tuple(domains), **extra)


class HTTPRoutingTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.fixture = VirtualHostFixture(self)
        yield self.fixture.start()
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.retryAutomatically = False
        self.addCleanup(self.pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=self.pool)

    @defer.inlineCallbacks
    def get(self, host: str, path: str = "/", headers=None, agent=None):
        hdrs = Headers({b"host": [host.encode()], **(headers or {})})
        response = yield within((agent or self.agent).request(
            b"GET", f"http://{HOST}:{self.fixture.httpPort}{path}".encode(), hdrs),
            TIMEOUT, f"an answer from {host}")
        body = yield within(readBody(response), TIMEOUT, "the body")
        return response, body

    @defer.inlineCallbacks
    def test_twoClientsThreeDomainsOnePort(self):
        """
        Two clients publish three domains on one HTTP port; each request
        reaches the service of its Host (any case, with a port), with
        X-Forwarded-For and -Proto added, the rest passed on unchanged.
        A connection per request: one connection stays on the client its
        first request was routed to.
        """
        alpha, beta = listenWeb(self, "alpha"), listenWeb(self, "beta")
        yield self.fixture.publish([http(alpha, ["a.example.com", "*.wild.example.com"])],
                                   name="one")
        yield self.fixture.publish([http(beta, ["b.example.com"])], name="two")
        for host, service, seen in (("a.example.com", "alpha", "a.example.com"),
                                    ("B.Example.COM:8080", "beta", "B.Example.COM:8080"),
                                    ("x.wild.example.com", "alpha", "x.wild.example.com")):
            response, body = yield self.get(host, "/path?q=1", agent=Agent(reactor))
            self.assertEqual(response.code, 200)
            answer = json.loads(body)
            self.assertEqual((answer["service"], answer["host"], answer["path"]),
                             (service, seen, "/path"))
            self.assertEqual(answer["x-forwarded-for"], HOST)
            self.assertEqual(answer["x-forwarded-proto"], "http")

    @defer.inlineCallbacks
    def test_unknownHostIs404NamingNothing(self):
        """A Host nobody published gets a 404 page that names no host, port or client."""
        alpha = listenWeb(self, "alpha")
        yield self.fixture.publish([http(alpha, ["a.example.com"])], name="one")
        response, body = yield self.get("nobody.example.com")
        self.assertEqual(response.code, 404)
        for secret in (b"nobody", b"example", b"one", str(alpha).encode(),
                       str(self.fixture.tunnel.controlPort).encode()):
            self.assertNotIn(secret, body)

    @defer.inlineCallbacks
    def test_keepAliveStaysOnOneConnection(self):
        """Requests kept alive on one user connection reach the service on one connection."""
        alpha = listenWeb(self, "alpha")
        yield self.fixture.publish([http(alpha, ["a.example.com"])], name="one")
        ports = set()
        for i in range(3):
            response, body = yield self.get("a.example.com", f"/{i}")
            answer = json.loads(body)
            self.assertEqual(answer["path"], f"/{i}")
            ports.add(answer["peer_port"])
        self.assertEqual(len(ports), 1, "keep-alive requests came on several connections")

    @defer.inlineCallbacks
    def test_pipelinedRequests(self):
        """Two requests sent at once on one connection are both answered, in order."""
        alpha = listenWeb(self, "alpha")
        yield self.fixture.publish([http(alpha, ["a.example.com"])], name="one")
        user = User()
        yield connectProtocol(TCP4ClientEndpoint(reactor, HOST, self.fixture.httpPort), user)
        user.transport.write(b"GET /first HTTP/1.1\r\nHost: a.example.com\r\n\r\n"
                             b"GET /second HTTP/1.1\r\nHost: a.example.com\r\n"
                             b"Connection: close\r\n\r\n")
        data = yield within(user.closed, TIMEOUT, "both answers")
        self.assertEqual(data.count(b"HTTP/1.1 200"), 2)
        self.assertLess(data.index(b'"/first"'), data.index(b'"/second"'))

    @defer.inlineCallbacks
    def test_webSocketUpgradeCarriedThrough(self):
        """A 101 Switching Protocols answer, then raw bytes both ways on the same connection."""
        factory = Factory.forProtocol(WebSocketService)
        factory.noisy = False
        port = reactor.listenTCP(0, factory, interface=HOST)
        self.addCleanup(port.stopListening)
        yield self.fixture.publish([http(port.getHost().port, ["ws.example.com"])], name="ws")
        user = User()
        yield connectProtocol(TCP4ClientEndpoint(reactor, HOST, self.fixture.httpPort), user)
        self.addCleanup(user.transport.abortConnection)
        head = (b"GET /chat HTTP/1.1\r\nHost: ws.example.com\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n")
        user.transport.write(head)
        answer = yield within(user.whenReceived(len(b"HTTP/1.1 101")), TIMEOUT, "the 101")
        self.assertTrue(answer.startswith(b"HTTP/1.1 101"), answer)
        yield within(user.whenReceived(answer.index(b"\r\n\r\n") + 4), TIMEOUT, "the head")
        before = len(user.data)
        frame = bytes(range(256)) * 64
        user.transport.write(frame)
        data = yield within(user.whenReceived(before + len(frame)), TIMEOUT, "the echo")
        self.assertEqual(data[before:], frame)

    @defer.inlineCallbacks
    def test_largeUploadAndDownload(self):
        """A large POST and a large GET arrive whole (compared by SHA-256)."""
        alpha = listenWeb(self, "alpha")
        yield self.fixture.publish([http(alpha, ["a.example.com"])], name="one")
        upload = bigBody(BIG)[::-1]
        response = yield within(self.agent.request(
            b"POST", f"http://{HOST}:{self.fixture.httpPort}/up".encode(),
            Headers({b"host": [b"a.example.com"]}), FileBodyProducer(BytesIO(upload))),
            TIMEOUT, "the upload's answer")
        body = yield within(readBody(response), TIMEOUT, "the upload's body")
        self.assertEqual(body.decode(), hashlib.sha256(upload).hexdigest())
        response, body = yield self.get("a.example.com", f"/big/{BIG}")
        self.assertEqual(hashlib.sha256(body).hexdigest(),
                         hashlib.sha256(bigBody(BIG)).hexdigest())

    @defer.inlineCallbacks
    def test_curl(self):
        """curl, with the name resolved to loopback, reaches the right service."""
        curl = shutil.which("curl")
        if curl is None:
            raise unittest.SkipTest("curl is not installed")
        alpha, beta = listenWeb(self, "alpha"), listenWeb(self, "beta")
        yield self.fixture.publish([http(alpha, ["a.example.com"])], name="one")
        yield self.fixture.publish([http(beta, ["b.example.com"])], name="two")
        port = self.fixture.httpPort
        for host, service in (("a.example.com", "alpha"), ("b.example.com", "beta")):
            out, err, code = yield within(getProcessOutputAndValue(curl, [
                "-sS", "--max-time", str(TIMEOUT), "--resolve", f"{host}:{port}:{HOST}",
                f"http://{host}:{port}/x", f"http://{host}:{port}/y"]), TIMEOUT, "curl")
            self.assertEqual(code, 0, err)
            answers = [json.loads(line) for line in out.replace(b"}{", b"}\n{").splitlines()]
            self.assertEqual([a["service"] for a in answers], [service, service])
            self.assertEqual(answers[0]["peer_port"], answers[1]["peer_port"])
        out, err, code = yield within(getProcessOutputAndValue(curl, [
            "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", str(TIMEOUT),
            "--resolve", f"c.example.com:{port}:{HOST}", f"http://c.example.com:{port}/"]),
            TIMEOUT, "curl")
        self.assertEqual(out, b"404")

    @defer.inlineCallbacks
    def test_basicAuthAndHostRewrite(self):
        """
        With basic auth, a request without the right credentials gets 401
        and WWW-Authenticate; with them, it reaches the service without
        them, with the Host rewritten and the user's in X-Forwarded-Host.
        """
        alpha = listenWeb(self, "alpha")
        yield self.fixture.publish([http(alpha, ["a.example.com"], http_auth="ann:pw",
                                         host_header_rewrite="internal.local")], name="one")
        response, body = yield self.get("a.example.com")
        self.assertEqual(response.code, 401)
        self.assertTrue(response.headers.getRawHeaders(b"www-authenticate")[0].startswith(
            b"Basic realm="))
        response, body = yield self.get(
            "a.example.com", headers={b"authorization": [b"Basic YW5uOndyb25n"]})
        self.assertEqual(response.code, 401)
        response, body = yield self.get(
            "a.example.com", headers={b"authorization": [b"Basic YW5uOnB3"]})
        self.assertEqual(response.code, 200)
        answer = json.loads(body)
        self.assertEqual((answer["host"], answer["x-forwarded-host"], answer["authorization"]),
                         ("internal.local", "a.example.com", ""))


class PoolTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_usersServedByPooledDataChannels(self):
        """
        A virtual host's client keeps pooled data channels (naming the
        virtual host as its register did); users are handed them (the
        fixture fails unless some user was).
        """
        fixture = VirtualHostFixture(self, pool=2)
        yield fixture.start()
        client = yield fixture.publish(
            [http(listenWeb(self, "alpha"), ["*.example.com", "a.example.com"],
                  subdomain="")], pool_count=2)
        registry = fixture.server.registry
        yield waitUntil(lambda: sum(len(t.pool) for t in registry.tunnels.values()) >= 2,
                        TIMEOUT, "the pooled data channels to reach the server")
        for i in range(4):
            response = yield within(Agent(reactor).request(
                b"GET", f"http://{HOST}:{fixture.httpPort}/{i}".encode(),
                Headers({b"host": [b"b.example.com"]})), TIMEOUT, "an answer")
            body = yield within(readBody(response), TIMEOUT, "the body")
            self.assertEqual(json.loads(body)["path"], f"/{i}")
        self.assertEqual(client.tunnels[0].poolSize, 2)


class ZeroCopyTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_routedConnectionsTakeTheZeroCopyPath(self):
        """
        Once routed, a virtual host's connection is spliced like any other:
        with zero copy and the splice thread (the fixture checks both).
        """
        fixture = VirtualHostFixture(self, zeroCopy=True, spliceThread=True)
        yield fixture.start()
        yield fixture.publish([http(listenWeb(self, "alpha"), ["a.example.com"])],
                              zero_copy=True, splice_thread=True)
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool)
        for i in range(20):
            response = yield within(agent.request(
                b"GET", f"http://{HOST}:{fixture.httpPort}/{i}".encode(),
                Headers({b"host": [b"a.example.com"]})), TIMEOUT, "an answer")
            body = yield within(readBody(response), TIMEOUT, "the body")
            self.assertEqual(json.loads(body)["path"], f"/{i}")


class HTTPSRoutingTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_sniRoutesTwoTLSServices(self):
        """
        Two TLS services, each with its own certificate, are reached on one
        HTTPS port by server name; the TLS is theirs, end to end.  A name
        nobody published is closed.
        """
        now = datetime.now(timezone.utc)
        ca = certmaking.makeCA("test CA", now)
        trust = ssl.Certificate.loadPEM(certmaking.certificatePEM(ca.certificate))
        fixture = VirtualHostFixture(self)
        yield fixture.start(vhost_http="", vhost_https=f"tcp:0:interface={HOST}")
        for name in ("one.example.com", "two.example.com"):
            issued = certmaking.makeServer(ca, [name], [], now)
            options = ssl.PrivateCertificate.loadPEM(
                certmaking.certificatePEM(issued.certificate) + certmaking.keyPEM(issued.key)).options()
            factory = Factory.forProtocol(NamedEcho)
            factory.noisy = False
            factory.name = name.encode()
            port = reactor.listenSSL(0, factory, options, interface=HOST)
            self.addCleanup(port.stopListening)
            yield fixture.publish([Mapping(HOST, port.getHost().port, 0, vhost="https",
                                           domains=(name,))], name=name)
        for name in ("one.example.com", "two.example.com"):
            user = User()
            endpoint = wrapClientTLS(ssl.optionsForClientTLS(name, trust),
                                     TCP4ClientEndpoint(reactor, HOST, fixture.httpsPort))
            yield within(connectProtocol(endpoint, user), TIMEOUT, "the TLS connection")
            self.addCleanup(user.transport.abortConnection)
            user.transport.write(b"hello")
            data = yield within(user.whenReceived(len(name) + 7), TIMEOUT, "the echo")
            self.assertEqual(data, name.encode() + b": hello")
        user = User()
        endpoint = wrapClientTLS(ssl.optionsForClientTLS("three.example.com", trust),
                                 TCP4ClientEndpoint(reactor, HOST, fixture.httpsPort))
        connected = connectProtocol(endpoint, user)
        yield within(user.closed, TIMEOUT, "the unknown name to be closed")
        self.assertEqual(user.data, b"")
        yield connected


class NamedEcho(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.factory.name + b": " + data)


class BadHeadTests(unittest.TestCase):
    """Bad heads over real sockets: each is answered with its status, then closed."""

    @defer.inlineCallbacks
    def setUp(self):
        self.fixture = VirtualHostFixture(self)
        yield self.fixture.start(vhost_head_timeout=0.5)
        yield self.fixture.publish([http(listenWeb(self, "alpha"), ["a.example.com"])])

    @defer.inlineCallbacks
    def send(self, data: bytes) -> bytes:
        user = User()
        yield connectProtocol(TCP4ClientEndpoint(reactor, HOST, self.fixture.httpPort), user)
        self.addCleanup(lambda: user.closed.called or user.transport.abortConnection())
        if data:
            user.transport.write(data)
        answer = yield within(user.readClosed, TIMEOUT, "the answer and end of stream")
        return answer

    @defer.inlineCallbacks
    def test_statuses(self):
        for data, status in (
                (b"BREW /pot HTCPCP/1.0\r\n\r\n", b"400"),
                (b"GET / HTTP/1.1\r\nHost: a.example.com\r\nHost: evil.example.com\r\n\r\n",
                 b"400"),
                (b"GET / HTTP/1.1\r\nHost: a.example.com\r\nX-Big: " + b"x" * 20000, b"431"),
                (b"GET / HTTP/1.1\r\nHost: a.exam", b"408"),
                (b"GET / HTTP/1.1\r\nHost: z.example.com\r\n\r\n", b"404")):
            answer = yield self.send(data)
            self.assertTrue(answer.startswith(b"HTTP/1.1 " + status + b" "), (data[:40], answer))
            self.assertIn(b"Connection: close\r\n", answer)

    @defer.inlineCallbacks
    def test_silentConnectionClosed(self):
        """A connection that sends nothing is closed after vhost_head_timeout, unanswered."""
        answer = yield self.send(b"")
        self.assertEqual(answer, b"")

    @defer.inlineCallbacks
    def test_curlHugeHeader431(self):
        """curl sending a 20 KB header gets 431, not a reset."""
        curl = shutil.which("curl")
        if curl is None:
            raise unittest.SkipTest("curl is not installed")
        port = self.fixture.httpPort
        out, err, code = yield within(getProcessOutputAndValue(curl, [
            "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", str(TIMEOUT),
            "-H", "X-Big: " + "x" * 20000,
            "--resolve", f"a.example.com:{port}:{HOST}", f"http://a.example.com:{port}/"]),
            TIMEOUT, "curl")
        self.assertEqual((out, code), (b"431", 0), err)


class WalkThroughTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_docsTryIt(self):
        """
        docs/vhosts.md, "Try it on one machine", with ports the OS picks:
        gotunnel-server --http --https --subdomain-host, python3 -m
        http.server, gotunnel-client --http SUBDOMAIN=PORT, then curl with the
        name resolved to loopback, and with a Host header.
        """
        curl = shutil.which("curl")
        if curl is None:
            raise unittest.SkipTest("curl is not installed")
        directory = temporaryDirectory(self)
        with open(os.path.join(directory, "hello.txt"), "w") as f:
            f.write("hello by name\n")
        control, web, httpPort, httpsPort = freePort(), freePort(), freePort(), freePort()
        server = spawn(self, [venvScript("gotunnel-server"), "--token", "s3cret",
                              "--listen", f"tcp:{control}:interface={HOST}",
                              "--http", f"tcp:{httpPort}:interface={HOST}",
                              "--https", f"tcp:{httpsPort}:interface={HOST}",
                              "--subdomain-host", "tunnel.example.com"], directory)
        page = spawn(self, [sys.executable, "-m", "http.server", str(web), "--bind", HOST],
                     directory)
        yield within(server.whenOutput("HTTPS virtual-host port listening"), START,
                     "the server to listen")
        yield within(page.whenOutput("Serving HTTP"), START, "http.server to start")
        client = spawn(self, [venvScript("gotunnel-client"), "--token", "s3cret",
                              "--server", f"tcp:{HOST}:{control}",
                              "--http", f"blog={web}"], directory)
        yield within(client.whenOutput("registered"), START, "the client to register")
        for args in (["--resolve", f"blog.tunnel.example.com:{httpPort}:{HOST}",
                      f"http://blog.tunnel.example.com:{httpPort}/hello.txt"],
                     ["-H", "Host: blog.tunnel.example.com",
                      f"http://{HOST}:{httpPort}/hello.txt"]):
            out, err, code = yield within(getProcessOutputAndValue(
                curl, ["-sS", "--max-time", str(TIMEOUT)] + args), TIMEOUT, "curl")
            self.assertEqual((out, code), (b"hello by name\n", 0), err)
        for child in (client, server, page):
            child.sendSignal("TERM")
            yield within(child.ended, START, f"{child.argv[0]} to stop")
        for child in (client, server):
            self.assertEqual(child.exitCode, 0, child.describe())
            self.assertNotIn("Traceback", child.stdout + child.stderr)


class GoLikeServer(Int32StringReceiver):
    """Answers every register with a plain ok, as the Go server does."""

    register: dict = {}

    def connectionMade(self) -> None:
        self.factory.channels.append(self)
        self.lost: defer.Deferred = defer.Deferred()

    def stringReceived(self, body: bytes) -> None:
        message = json.loads(body)
        self.factory.registers.append(message)
        if message["type"] == "register":
            self.register = message
            self.sendString(b'{"type":"register_resp","status":"ok"}')

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


class GoServerTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_virtualHostWithdrawnOthersGoOn(self):
        """
        Before a server that answers a plain ok (Go's), the client withdraws
        its virtual host (its control channel closes, and is not opened
        again) while its plain mapping stays registered; the client then
        stops cleanly.
        """
        factory = Factory.forProtocol(GoLikeServer)
        factory.noisy = False
        factory.channels, factory.registers = [], []
        port = reactor.listenTCP(0, factory, interface=HOST)
        self.addCleanup(port.stopListening)
        settings = ClientSettings(
            server=f"tcp:{HOST}:{port.getHost().port}", token=TOKEN, name="web",
            mappings=[Mapping(HOST, 8080, 0, vhost="http", domains=("a.example.com",)),
                      Mapping(HOST, 8081, 10081)], pool_count=0)
        client = TunnelClientService(settings, reactor=reactor)
        client.startService()
        self.addCleanup(lambda: client.stopService() if client.running else None)
        yield within(client.tunnels[1].whenRegistered(), TIMEOUT, "the plain mapping")
        [vhostChannel] = yield waitUntil(
            lambda: [c for c in factory.channels if c.register.get("vhost") == "http"],
            TIMEOUT, "the virtual host's register")
        yield within(vhostChannel.lost, TIMEOUT, "the virtual host's channel to close")
        self.assertFalse(client.tunnels[0].running)
        self.assertIsNotNone(client.tunnels[1].channel)
        yield within(client.stopService(), TIMEOUT, "the client to stop")
        self.assertEqual(len([m for m in factory.registers if m.get("vhost")]), 1)

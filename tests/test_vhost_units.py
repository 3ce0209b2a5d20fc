"""
Virtual hosts without sockets: the request-head and ClientHello parsers,
a user's connection on a string transport and a memory clock (every bad
head answered, slow ones timed out), who may claim which domain, and the
client's register extension and its fallback before a Go server.
"""

from __future__ import annotations

import json

from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

from gotunnel.wire import messages
from gotunnel.config.mappings import Mapping, parseVirtualHost
from gotunnel.config.settings import ClientPolicy, ServerSettings
from gotunnel.server.httphead import MAX_HEAD, BadHead, checkBasicAuth, headEnd, parseHead
from gotunnel.server.access import RegistrationRefused
from gotunnel.server.channel import ServerChannelFactory
from gotunnel.server.registry import TunnelRegistry
from gotunnel.tls.sni import MAX_HELLO, BadHello, NeedMore, serverName
from gotunnel.cli.tap import ClientOptions, ServerOptions
from gotunnel.server.vhostports import LINGER, VirtualHostUser
from gotunnel.server.vhostroutes import MAX_READING_PER_SOURCE, VirtualHosts, normalDomain
from gotunnel.client.datachannel import DataChannelFactory
from tests.test_client import ClientTestCase, frame

TOKEN = "s3cret"


def clientHello(name: bytes = None) -> bytes:
    """A real ClientHello from OpenSSL, with C{name} as its SNI if given."""
    connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    if name is not None:
        connection.set_tlsext_host_name(name)
    connection.set_connect_state()
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    return connection.bio_read(65536)


def craftedHello(name: bytes) -> bytes:
    """A minimal ClientHello record naming C{name}, which OpenSSL would not send."""
    entry = b"\x00" + len(name).to_bytes(2, "big") + name
    extension = (b"\x00\x00" + (len(entry) + 2).to_bytes(2, "big") +
                 len(entry).to_bytes(2, "big") + entry)
    body = (b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" +
            len(extension).to_bytes(2, "big") + extension)
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake


class HeadParserTests(unittest.TestCase):
    def test_hostLowerCasePortStripped(self):
        head = parseHead(b"GET / HTTP/1.1\r\nHost: WWW.Example.COM.:8080\r\n\r\n")
        self.assertEqual(head.host, "www.example.com")

    def test_ipv6Host(self):
        self.assertEqual(parseHead(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n").host, "[::1]")

    def test_leadingEmptyLinesSkipped(self):
        data = b"\r\n\r\nGET / HTTP/1.1\r\nHost: a.b\r\n\r\n"
        self.assertEqual(headEnd(data), len(data) - 4)
        self.assertEqual(parseHead(data).host, "a.b")

    def test_bad(self):
        """Each head we cannot route safely is a 400, too many headers a 431."""
        for data, status in (
                (b"NOT HTTP\r\n\r\n", 400),
                (b"GET / HTTP/2.0\r\nHost: a.b\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nHost: a.b\r\nHost: c.d\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nHost: a.b\r\n folded\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nHost: a.b:x\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nHost: *.b\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nHost: \xff.b\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nBad Name: x\r\nHost: a.b\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nHost: a.b\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431)):
            with self.assertRaises(BadHead, msg=data) as caught:
                parseHead(data)
            self.assertEqual(caught.exception.status, status, data)

    def test_rewrite(self):
        head = parseHead(b"GET / HTTP/1.1\r\nHost: a.b\r\nX-Forwarded-For: 1.2.3.4\r\n"
                         b"Accept: */*\r\n\r\n")
        self.assertEqual(
            head.rewrite((b"x-forwarded-for",), ((b"X-Forwarded-For", b"1.2.3.4, 5.6.7.8"),),
                         host=b"inner"),
            b"GET / HTTP/1.1\r\nHost: inner\r\nAccept: */*\r\n"
            b"X-Forwarded-For: 1.2.3.4, 5.6.7.8\r\n\r\n")

    def test_basicAuth(self):
        def head(value):
            return parseHead(b"GET / HTTP/1.1\r\nHost: a.b\r\nAuthorization: " + value +
                             b"\r\n\r\n")
        self.assertTrue(checkBasicAuth(head(b"Basic YW5uOnB3"), "ann:pw"))
        self.assertFalse(checkBasicAuth(head(b"Basic YW5uOnB4"), "ann:pw"))
        self.assertFalse(checkBasicAuth(head(b"Basic !!!"), "ann:pw"))
        self.assertFalse(checkBasicAuth(head(b"Bearer YW5uOnB3"), "ann:pw"))


class ServerNameTests(unittest.TestCase):
    def test_name(self):
        self.assertEqual(serverName(clientHello(b"Www.Example.com")), "www.example.com")

    def test_craftedName(self):
        self.assertEqual(serverName(craftedHello(b"x." * 5000 + b"com")), "x." * 5000 + "com")

    def test_noName(self):
        self.assertIsNone(serverName(clientHello()))

    def test_splitAcrossReads(self):
        """Every prefix of a ClientHello asks for more; the whole names its server."""
        hello = clientHello(b"a.example.com")
        for size in range(len(hello)):
            self.assertRaises(NeedMore, serverName, hello[:size])

    def test_splitAcrossRecords(self):
        """A ClientHello in many small TLS records, then 0-RTT bytes, names its server."""
        hello = clientHello(b"a.example.com")
        body = hello[5:]
        records = b"".join(b"\x16\x03\x01" + len(body[i:i + 7]).to_bytes(2, "big") +
                           body[i:i + 7] for i in range(0, len(body), 7))
        self.assertEqual(serverName(records + b"\x17\x03\x03\x00\x01x"), "a.example.com")

    def test_malformed(self):
        hello = clientHello(b"a.example.com")
        for data in (b"GET / HTTP/1.1\r\n", b"\x16\x02\x00\x00\x05hello",
                     b"\x16\x03\x01\x00\x00",
                     hello[:5] + b"\x02" + hello[6:],
                     # The ClientHello says it is longer than we read.
                     b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",
                     # Its fields run past its end.
                     b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00",
                     b"\x16\x03\x01\x00\x01\x01" + b"\x16\x03\x01\x00\x01\x00" * MAX_HELLO):
            self.assertRaises(BadHello, serverName, data)


class Fixture:
    """A registry on a memory clock with an HTTP and an HTTPS virtual-host router."""

    def __init__(self, **settings) -> None:
        self.reactor = MemoryReactorClock()
        self.settings = ServerSettings(token=TOKEN, **settings)
        self.registry = TunnelRegistry(self.settings, self.reactor)
        self.hosts = VirtualHosts(self.registry, ("http", "https"))
        self.registry.virtualHosts = self.hosts

    def register(self, name: str = "web", token: str = TOKEN, vhost: str = "http", **fields):
        """A control channel registering a virtual host; (channel, transport)."""
        channel = ServerChannelFactory(self.registry).buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        channel.makeConnection(transport)
        body = messages.encode(messages.Register(local_port=80, remote_port=0, token=token,
                                                 name=name, vhost=vhost, **fields))
        channel.dataReceived(len(body).to_bytes(4, "big") + body)
        return channel, transport

    def answer(self, transport) -> dict:
        value = transport.value()
        return json.loads(value[4:4 + int.from_bytes(value[:4], "big")])

    def user(self, scheme: str = "http"):
        user = VirtualHostUser(self.hosts, scheme)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.9", 5555))
        user.makeConnection(transport)
        return user, transport


class UserTests(unittest.TestCase):
    """A user's connection to the HTTP port, head by head."""

    def setUp(self):
        self.fixture = Fixture(vhost_head_timeout=10.0)
        self.channel, self.control = self.fixture.register(domains=("a.example.com",))
        self.control.clear()

    def status(self, transport) -> bytes:
        return transport.value().split(b"\r\n", 1)[0]

    def test_routedHeadRewritten(self):
        """
        A whole head routes the user, asks the client for a data channel,
        and is held, rewritten, with what came behind it.
        """
        user, transport = self.fixture.user()
        user.dataReceived(b"GET / HTTP/1.1\r\nHost: A.example.com\r\n"
                          b"X-Forwarded-For: 10.0.0.1\r\n\r\nbody")
        self.assertEqual(user._held, [b"GET / HTTP/1.1\r\nHost: A.example.com\r\n"
                                      b"X-Forwarded-For: 10.0.0.1, 198.51.100.9\r\n"
                                      b"X-Forwarded-Proto: http\r\n\r\nbody"])
        self.assertIn(b"open_data_channel", self.control.value())
        self.assertEqual(transport.value(), b"")

    def test_forwardedHeadersOff(self):
        self.fixture.settings.vhost_forwarded_headers = False
        user, _ = self.fixture.user()
        user.dataReceived(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        self.assertEqual(user._held, [b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n"])

    def test_headInPieces(self):
        user, transport = self.fixture.user()
        for byte in b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n":
            user.dataReceived(bytes([byte]))
        self.assertEqual(user.tunnel, self.fixture.registry.tunnels[("http", ("a.example.com",))])

    def test_badHead400(self):
        user, transport = self.fixture.user()
        user.dataReceived(b"GET / HTTP/1.1\r\nHost: a.example.com\r\nHost: b.example.com\r\n\r\n")
        self.assertEqual(self.status(transport), b"HTTP/1.1 400 Bad Request")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.control.value(), b"")

    def test_hugeHead431(self):
        """A head past MAX_HEAD is answered 431 at once, without waiting for its end."""
        user, transport = self.fixture.user()
        user.dataReceived(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n")
        for _ in range(MAX_HEAD // 1000 + 1):
            user.dataReceived(b"X-Big: " + b"x" * 991 + b"\r\n")
        self.assertEqual(self.status(transport), b"HTTP/1.1 431 Request Header Fields Too Large")
        self.assertEqual(self.control.value(), b"")
        before = len(transport.value())
        user.dataReceived(b"more" * 1000)
        self.assertEqual(len(transport.value()), before)

    def test_slowHead408(self):
        """A head not whole within vhost_head_timeout is answered 408."""
        user, transport = self.fixture.user()
        user.dataReceived(b"GET / HTTP/1.1\r\nHost: a.exa")
        self.fixture.reactor.advance(9.9)
        self.assertEqual(transport.value(), b"")
        self.fixture.reactor.advance(0.1)
        self.assertEqual(self.status(transport), b"HTTP/1.1 408 Request Timeout")
        self.assertTrue(transport.disconnecting)

    def test_silentConnectionClosed(self):
        user, transport = self.fixture.user()
        self.fixture.reactor.advance(10)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_unknownHost404(self):
        user, transport = self.fixture.user()
        user.dataReceived(b"GET / HTTP/1.1\r\nHost: <script>.example.com\r\n\r\n")
        self.assertEqual(self.status(transport), b"HTTP/1.1 400 Bad Request")
        user, transport = self.fixture.user()
        user.dataReceived(b"GET / HTTP/1.1\r\nHost: b.example.com\r\n\r\n")
        self.assertEqual(self.status(transport), b"HTTP/1.1 404 Not Found")
        self.assertNotIn(b"b.example.com", transport.value())

    def test_offline503(self):
        """A domain whose client says its service is down is answered 503."""
        self.channel.dataReceived(frame(b'{"type":"offline_port","port":0}'))
        user, transport = self.fixture.user()
        user.dataReceived(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        self.assertEqual(self.status(transport), b"HTTP/1.1 503 Service Unavailable")

    def test_http10WithoutHost(self):
        user, transport = self.fixture.user()
        user.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual(self.status(transport), b"HTTP/1.1 400 Bad Request")

    def test_answeredConnectionClosedAfterLinger(self):
        """An error answer half-closes where it can, and closes after LINGER seconds."""
        user = VirtualHostUser(self.fixture.hosts, "http")
        transport = HalfCloseableTransport()
        user.makeConnection(transport)
        user.dataReceived(b"BAD\r\n\r\n")
        self.assertTrue(transport.writeClosed)
        self.assertFalse(transport.disconnecting)
        self.fixture.reactor.advance(LINGER)
        self.assertTrue(transport.disconnecting)

    def test_connectionsPerSourceBounded(self):
        """
        At most MAX_READING_PER_SOURCE connections of one address may be sending
        their head; one more is closed at once, and one ending makes room.
        """
        users = [self.fixture.user() for _ in range(MAX_READING_PER_SOURCE)]
        self.assertFalse(any(transport.disconnecting for _, transport in users))
        _, transport = self.fixture.user()
        self.assertTrue(transport.disconnecting)
        users[0][0].dataReceived(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        users[1][0].connectionLost(None)
        users[2][0].dataReceived(b"junk\r\n\r\n")
        for _ in range(3):
            _, transport = self.fixture.user()
            self.assertFalse(transport.disconnecting)
        _, transport = self.fixture.user()
        self.assertTrue(transport.disconnecting)

    def test_sniRouted(self):
        self.fixture.register(name="tls", vhost="https", domains=("s.example.com",))
        user, transport = self.fixture.user("https")
        hello = clientHello(b"s.example.com")
        user.dataReceived(hello[:10])
        self.assertIsNone(user.tunnel)
        user.dataReceived(hello[10:])
        self.assertEqual(user._held, [hello])
        self.assertEqual(user.tunnel.name, "tls")

    def test_sniUnknownOrMissingClosed(self):
        self.fixture.register(name="tls", vhost="https", domains=("s.example.com",))
        for data in (clientHello(b"a.example.com"), clientHello(), b"GET / HTTP/1.1\r\n",
                     craftedHello(b"s.example.com:443"), craftedHello(b"x." * 5000 + b"com")):
            user, transport = self.fixture.user("https")
            user.dataReceived(data)
            self.assertTrue(transport.disconnecting)
            self.assertEqual(transport.value(), b"")


class HalfCloseableTransport(StringTransport):
    writeClosed = False

    def loseWriteConnection(self):
        self.writeClosed = True


from zope.interface import directlyProvides  # noqa: E402
from twisted.internet.interfaces import IHalfCloseableDescriptor  # noqa: E402


def _halfCloseable(cls):
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        directlyProvides(self, IHalfCloseableDescriptor)

    cls.__init__ = __init__
    return cls


_halfCloseable(HalfCloseableTransport)


class OwnershipTests(unittest.TestCase):
    def test_confirmed(self):
        """Our server confirms a virtual host in register_resp, with its pool."""
        fixture = Fixture()
        _, transport = fixture.register(domains=("a.example.com",))
        self.assertEqual(fixture.answer(transport),
                         {"type": "register_resp", "status": "ok", "pool": 8, "vhost": "http"})

    def test_noVirtualHosts(self):
        fixture = Fixture()
        fixture.registry.virtualHosts = None
        _, transport = fixture.register(domains=("a.example.com",))
        self.assertEqual(fixture.answer(transport)["status"], "fail")
        fixture = Fixture()
        fixture.hosts.schemes = ("http",)
        _, transport = fixture.register(vhost="https", domains=("a.example.com",))
        self.assertEqual(fixture.answer(transport)["reason"],
                         "this server has no HTTPS virtual hosts")

    def test_takenByAnotherClient(self):
        """A domain held by one name, on either scheme, is refused to another."""
        fixture = Fixture()
        fixture.register(name="one", domains=("a.example.com",))
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for vhost in ("http", "https"):
            _, transport = fixture.register(name="two", vhost=vhost,
                                            domains=("A.example.com",))
            self.assertEqual(fixture.answer(transport)["reason"],
                             "domain a.example.com is already taken by another client")
        self.assertIn("refused https virtual host A.example.com of 'two' from 192.0.2.7:40000: "
                      "domain a.example.com is already taken by another client",
                      [formatEvent(e) for e in events])

    def test_sameNameReplaces(self):
        fixture = Fixture()
        first, firstTransport = fixture.register(name="one", domains=("a.example.com",))
        _, transport = fixture.register(name="one", domains=("a.example.com",))
        self.assertEqual(fixture.answer(transport)["status"], "ok")
        self.assertTrue(firstTransport.disconnecting)
        self.assertEqual(fixture.hosts.route("http", "a.example.com").channel, _)

    def test_replacedControlChannelClosing(self):
        """The replaced channel's close names the virtual host its successor serves."""
        fixture = Fixture()
        first, _ = fixture.register(name="one", domains=("a.example.com",))
        second, _ = fixture.register(name="one", domains=("a.example.com",))
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        first.connectionLost(None)
        self.assertIn("the old control channel of client one closed; its http virtual host "
                      "a.example.com is served by the new one", [formatEvent(e) for e in events])
        self.assertIs(fixture.hosts.route("http", "a.example.com").channel, second)

    def test_leaseHoldsDomainForItsClient(self):
        """
        A client whose control channel goes keeps its domains for
        port_lease seconds: another name is refused, the same name is back.
        """
        fixture = Fixture(port_lease=30.0)
        channel, _ = fixture.register(name="one", domains=("a.example.com",))
        channel.connectionLost(None)
        self.assertIsNone(fixture.hosts.route("http", "a.example.com"))
        _, transport = fixture.register(name="two", domains=("a.example.com",))
        self.assertIn("reserved for the client that had it", fixture.answer(transport)["reason"])
        _, transport = fixture.register(name="one", domains=("a.example.com",))
        self.assertEqual(fixture.answer(transport)["status"], "ok")
        self.assertEqual(fixture.hosts.leases, {})
        fixture.hosts.route("http", "a.example.com").channel.connectionLost(None)
        fixture.reactor.advance(30)
        _, transport = fixture.register(name="two", domains=("a.example.com",))
        self.assertEqual(fixture.answer(transport)["status"], "ok")

    def test_wildcardRouting(self):
        fixture = Fixture()
        fixture.register(name="wild", domains=("*.example.com",))
        fixture.register(name="deep", domains=("*.b.example.com",))
        fixture.register(name="own", domains=("a.b.example.com",))
        for host, name in (("x.example.com", "wild"), ("x.b.example.com", "deep"),
                           ("a.b.example.com", "own"), ("y.x.example.com", "wild")):
            self.assertEqual(fixture.hosts.route("http", host).name, name)
        self.assertIsNone(fixture.hosts.route("http", "example.com"))
        self.assertIsNone(fixture.hosts.route("https", "x.example.com"))

    def test_subdomainHost(self):
        """
        With subdomain_host, a shared-token client may claim NAME.subdomain_host
        only; a listed client its own domains too.
        """
        fixture = Fixture(subdomain_host="tunnel.example.com", clients={
            "ann": ClientPolicy(token="ann-token", domains=("ann.com", "*.ann.com"))})
        _, transport = fixture.register(subdomain="Blog")
        self.assertEqual(fixture.answer(transport)["status"], "ok")
        self.assertIsNotNone(fixture.hosts.route("http", "blog.tunnel.example.com"))
        for domains in (("other.com",), ("*.tunnel.example.com",), ("a.b.tunnel.example.com",)):
            _, transport = fixture.register(domains=domains)
            self.assertIn("is not allowed for client 'web'", fixture.answer(transport)["reason"])
        _, transport = fixture.register(name="ann", token="ann-token",
                                        domains=("ann.com", "www.ann.com"), subdomain="ann")
        self.assertEqual(fixture.answer(transport)["status"], "ok")
        _, transport = fixture.register(name="ann", token="ann-token", domains=("bob.com",))
        self.assertEqual(fixture.answer(transport)["reason"],
                         "domain bob.com is not allowed for client 'ann'")

    def test_listedDomainsRestrictSharedToken(self):
        """A per-client domains list alone leaves the shared token nothing to claim."""
        fixture = Fixture(clients={"ann": ClientPolicy(token="ann-token", domains=("ann.com",))})
        _, transport = fixture.register(domains=("free.com",))
        self.assertEqual(fixture.answer(transport)["status"], "fail")
        _, transport = fixture.register(subdomain="x")
        self.assertIn("no subdomain_host", fixture.answer(transport)["reason"])

    def test_badDomainsRefused(self):
        fixture = Fixture()
        for fields in ({"domains": ("bad_domain!",)}, {"domains": ("a.*.com",)}, {}):
            _, transport = fixture.register(**fields)
            self.assertEqual(fixture.answer(transport)["status"], "fail", fields)

    def test_dataChannelOfAnotherListedClientRefused(self):
        """A listed client's data channel cannot take a user of another's virtual host."""
        fixture = Fixture(clients={"ann": ClientPolicy(token="ann-token", domains=("ann.com",)),
                                   "bob": ClientPolicy(token="bob-token", domains=("bob.com",))})
        fixture.register(name="ann", token="ann-token", domains=("ann.com",))
        user, _ = fixture.user()
        user.dataReceived(b"GET / HTTP/1.1\r\nHost: ann.com\r\n\r\n")
        with self.assertRaises(RegistrationRefused):
            fixture.registry.attachDataChannel(messages.DataChannel(
                token="bob-token", name="bob", conn_id=user.conn_id))
        self.assertIs(fixture.registry.attachDataChannel(messages.DataChannel(
            token="ann-token", name="ann", conn_id=user.conn_id)), user)

    def test_dataChannelWithAllowPorts(self):
        """A virtual host has no port: allow_ports does not refuse its data channels."""
        fixture = Fixture(allow_ports=(range(10000, 10100),))
        fixture.register(domains=("a.example.com",))
        user, _ = fixture.user()
        user.dataReceived(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        self.assertIs(fixture.registry.attachDataChannel(messages.DataChannel(
            token=TOKEN, name="web", conn_id=user.conn_id)), user)

    def test_pooledDataChannels(self):
        """
        A pooled data channel names its virtual host as the register did; one
        naming other domains, or of another listed client, is refused.
        """
        fixture = Fixture(subdomain_host="t.example.com", clients={
            "ann": ClientPolicy(token="ann-token", domains=("ann.com",)),
            "bob": ClientPolicy(token="bob-token", domains=("bob.com",))})
        fixture.register(name="ann", token="ann-token", domains=("ann.com",), subdomain="ann")
        registry = fixture.registry

        def pooled(**fields):
            return messages.DataChannel(pooled=True, vhost="http", **fields)

        tunnel = registry.poolDataChannel(object(), pooled(
            token="ann-token", name="ann", domains=("ANN.com",), subdomain="ann"))
        self.assertEqual(tunnel.domains, ("ann.com", "ann.t.example.com"))
        self.assertEqual(len(tunnel.pool), 1)
        for msg in (pooled(token="ann-token", name="ann", domains=("ann.com",)),
                    pooled(token="ann-token", name="ann", subdomain="ann"),
                    pooled(token="ann-token", name="ann", domains=("bad!",)),
                    pooled(token="bob-token", name="bob", domains=("ann.com",),
                           subdomain="ann")):
            self.assertRaises(RegistrationRefused, registry.poolDataChannel, object(), msg)
        self.assertEqual(len(tunnel.pool), 1)

    def test_mappingLimit(self):
        fixture = Fixture(max_mappings_per_client=1)
        fixture.register(domains=("a.example.com",))
        _, transport = fixture.register(domains=("b.example.com",))
        self.assertIn("too many mappings", fixture.answer(transport)["reason"])


class ClientRegisterTests(ClientTestCase):
    mapping = Mapping("127.0.0.1", 8080, 0, vhost="http", domains=("a.example.com",),
                      subdomain="blog", http_auth="ann:pw", host_header_rewrite="inner")

    def test_registerExtension(self):
        """The register of a virtual host carries the extension, remote_port 0."""
        _, transport = self.control()
        value = transport.value()
        self.assertEqual(json.loads(value[4:]), {
            "type": "register", "local_port": 8080, "remote_port": 0, "protocol": "tcp",
            "token": self.token, "name": self.name, "vhost": "http",
            "domains": ["a.example.com"], "subdomain": "blog", "http_auth": "ann:pw",
            "host_header_rewrite": "inner"})

    def test_pooledDataChannelNamesItsVirtualHost(self):
        channel, _ = self.control()
        channel.dataReceived(frame(b'{"type":"register_resp","status":"ok","pool":2,'
                                   b'"vhost":"http"}'))
        self.assertEqual(self.service.poolSize, 2)
        index = self.serverAttempts(DataChannelFactory)[0]
        _, transport = self.complete(index)
        value = transport.value()
        self.assertEqual(json.loads(value[4:]), {
            "type": "data_channel", "local_port": 8080, "remote_port": 0, "protocol": "",
            "token": self.token, "name": self.name, "pooled": True, "vhost": "http",
            "domains": ["a.example.com"], "subdomain": "blog"})

    def test_confirmed(self):
        channel, _ = self.control()
        channel.dataReceived(frame(b'{"type":"register_resp","status":"ok","vhost":"http"}'))
        self.assertIs(self.service.channel, channel)

    def test_plainOkWithdraws(self):
        """
        A plain ok (a Go server) withdraws the mapping with one line: the
        control channel closes and the client does not connect again.
        """
        events = self.logged()
        self.service.startService()
        [index] = self.serverAttempts()
        channel, transport = self.complete(index)
        channel.dataReceived(frame(b'{"type":"register_resp","status":"ok"}'))
        self.assertIsNone(self.service.channel)
        self.assertFalse(self.service.running)
        self.assertTrue(transport.disconnecting)
        lines = [e for e in events if "virtual hosts" in e.get("log_format", "")]
        self.assertEqual(len(lines), 1)
        channel.connectionLost(None)
        self.reactor.advance(60)
        self.assertEqual(self.serverAttempts(), [index])


class OptionTests(unittest.TestCase):
    def test_parseVirtualHost(self):
        self.assertEqual(parseVirtualHost("a.example.com,blog=8080", "http"),
                         Mapping("127.0.0.1", 8080, 0, vhost="http", domains=("a.example.com",),
                                 subdomain="blog"))
        self.assertEqual(parseVirtualHost("a.b=[::1]:443", "https"),
                         Mapping("::1", 443, 0, vhost="https", domains=("a.b",)))
        for bad in ("a.b", "=80", "a.b=x", "x,y=80"):
            self.assertRaises(ValueError, parseVirtualHost, bad, "http")

    def test_clientHttpAloneIsEnough(self):
        options = ClientOptions()
        options.parseOptions(["--token", "t", "--http", "A.example.com=8080",
                              "--https", "s.example.com=10.0.0.2:8443"])
        mappings = options.settings().mappings
        self.assertEqual([(m.vhost, m.domains, m.local_host) for m in mappings],
                         [("http", ("a.example.com",), "127.0.0.1"),
                          ("https", ("s.example.com",), "10.0.0.2")])
        self.assertRaises(usage.UsageError, ClientOptions().parseOptions,
                          ["--token", "t", "--http", "bad!=80"])

    def test_serverOptions(self):
        options = ServerOptions()
        options.parseOptions(["--token", "t", "--http", "tcp:8080", "--https", "tcp:8443",
                              "--subdomain-host", "Tunnel.Example.com", "--no-forwarded-headers",
                              "--vhost-head-timeout", "3"])
        settings = options.settings()
        self.assertEqual((settings.vhost_http, settings.vhost_https, settings.subdomain_host,
                          settings.vhost_forwarded_headers, settings.vhost_head_timeout),
                         ("tcp:8080", "tcp:8443", "tunnel.example.com", False, 3.0))
        self.assertRaises(usage.UsageError, ServerOptions().parseOptions,
                          ["--token", "t", "--http", "nonsense:1"])

    def test_normalDomain(self):
        self.assertEqual(normalDomain("*.Example.COM."), "*.example.com")
        for bad in ("", "a..b", "-a.b", "a.*.b", "a b", "x" * 64 + ".com"):
            self.assertRaises(ValueError, normalDomain, bad)


class ConfigFileTests(unittest.TestCase):
    def read(self, text: str):
        import os
        import tempfile

        from gotunnel.config.yamlfile import readConfigFile

        fd, path = tempfile.mkstemp(suffix=".yaml")
        self.addCleanup(os.unlink, path)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return readConfigFile(path)

    def test_tunnelsOfTypeHttp(self):
        values = self.read(
            "client:\n  tunnels:\n"
            "    - {local_port: 22, remote_port: 10022}\n"
            "    - {type: http, local_port: 8080, domains: [A.example.com, '*.b.com'],\n"
            "       http_user: ann, http_password: pw, host_header_rewrite: inner}\n"
            "    - {type: https, local_port: 8443, subdomain: Blog}\n").clientValues()
        self.assertEqual(values["mappings"], [
            Mapping("127.0.0.1", 22, 10022),
            Mapping("127.0.0.1", 8080, 0, vhost="http", domains=("a.example.com", "*.b.com"),
                    http_auth="ann:pw", host_header_rewrite="inner"),
            Mapping("127.0.0.1", 8443, 0, vhost="https", subdomain="blog")])

    def test_badTunnels(self):
        from gotunnel.config.yamlfile import ConfigError

        for entry in ("{type: http, local_port: 80}",
                      "{type: http, local_port: 80, remote_port: 80, domains: [a.b]}",
                      "{type: ftp, local_port: 80, domains: [a.b]}",
                      "{type: https, local_port: 80, domains: [a.b], http_user: u, "
                      "http_password: p}",
                      "{type: http, local_port: 80, domains: [a.b], http_user: u}",
                      "{type: http, local_port: 80, subdomain: a.b}",
                      "{local_port: 80, remote_port: 81, domains: [a.b]}"):
            config = self.read(f"client:\n  tunnels:\n    - {entry}\n")
            self.assertRaises(ConfigError, config.clientValues)

    def test_serverKeys(self):
        values = self.read(
            "server:\n  vhost_http: tcp:80\n  vhost_https: tcp:443\n"
            "  subdomain_host: Tunnel.Example.com\n  vhost_forwarded_headers: false\n"
            "  vhost_head_timeout: 5\n"
            "  clients:\n    ann: {token: t, domains: [ann.com, '*.ann.com']}\n").serverValues()
        self.assertEqual(values["subdomain_host"], "tunnel.example.com")
        self.assertEqual(values["clients"]["ann"].domains, ("ann.com", "*.ann.com"))
        self.assertEqual((values["vhost_http"], values["vhost_https"],
                          values["vhost_forwarded_headers"], values["vhost_head_timeout"]),
                         ("tcp:80", "tcp:443", False, 5.0))

"""
The server's policy and its channels, run on a memory reactor and string
transports: registration, heartbeats, public users, data channels and
their splice, and the ways a connection is refused.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

import gotunnel.server.channel
from gotunnel.config.settings import ServerSettings
from gotunnel.wire.messages import RegisterResp
from gotunnel.server.channel import ServerChannelFactory
from gotunnel.server.publicusers import MAX_EARLY_BYTES, PublicUser
from gotunnel.server.registry import TunnelRegistry
from gotunnel.server.service import TunnelServerService, withBacklog

from tests.support import frame, jsonFrame as supportJsonFrame

TOKEN = "s3cret-Token-0xC0FFEE"
WRONG_TOKEN = "s3cret-Token-0xBADBAD"
PUBLIC_INTERFACE = "203.0.113.5"
NOW = 1795580625

OK = b'{"type":"register_resp","status":"ok"}'
REGISTERED = b'{"type":"register_resp","status":"ok","pool":8}'
"""The answer to register: ok, and the pool of data channels the server keeps."""


def jsonFrame(**fields) -> bytes:
    return supportJsonFrame(fields)


def fail(reason: str) -> bytes:
    return frame(b'{"type":"register_resp","status":"fail","reason":"' +
                 reason.encode("utf-8") + b'"}')


def register(remote_port: int = 10022, token: str = TOKEN, name: str = "edge-1",
             local_port: int = 22, protocol: str = "tcp") -> bytes:
    return jsonFrame(type="register", local_port=local_port, remote_port=remote_port,
                     protocol=protocol, token=token, name=name)


def dataChannel(conn_id=None, remote_port: int = 10022, token: str = TOKEN) -> bytes:
    fields = dict(type="data_channel", local_port=22, remote_port=remote_port, protocol="",
                  token=token, name="edge-1")
    if conn_id is not None:
        fields["conn_id"] = conn_id
    return jsonFrame(**fields)


def openDataChannel(conn_id: str, local_port: int = 22) -> bytes:
    return frame(b'{"type":"open_data_channel","local_port":%d,"remote_port":0,'
                 b'"protocol":"","token":"","name":"","conn_id":"%s"}'
                 % (local_port, conn_id.encode("ascii")))


@implementer(IListeningPort)
class FakePort:
    """A listening port that remembers whether it was stopped."""

    def __init__(self, port: int, factory) -> None:
        self.port = port
        self.factory = factory
        self.stopped = False

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        self.stopped = True

    def getHost(self):
        return IPv4Address("TCP", PUBLIC_INTERFACE, self.port)


class ServerReactor(MemoryReactorClock):
    """
    A memory reactor whose listeners record C{stopListening}, and that can
    be told a port is in use.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakePort] = []
        self.portsInUse: set[int] = set()

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if port in self.portsInUse:
            raise error.CannotListenError(interface, port,
                                          OSError(98, "Address already in use"))
        super().listenTCP(port, factory, backlog, interface)
        listener = FakePort(port, factory)
        self.ports.append(listener)
        return listener


class Connection:
    """One connection to the control port: the channel and its transport."""

    def __init__(self, channel, transport: StringTransport) -> None:
        self.channel = channel
        self.transport = transport

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def sent(self) -> bytes:
        """What the server wrote on this connection since the last call."""
        value = self.transport.value()
        self.transport.clear()
        return value

    def lose(self) -> None:
        self.channel.connectionLost(Failure(error.ConnectionDone()))


class User:
    """A user's connection to a public port."""

    def __init__(self, protocol: PublicUser, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport


class ServerTestCase(unittest.TestCase):
    """A registry on a memory reactor, with conn_ids conn-1, conn-2, ..."""

    def setUp(self):
        self.reactor = ServerReactor()
        self.reactor.advance(NOW)
        self.settings = ServerSettings(token=TOKEN, public_interface=PUBLIC_INTERFACE)
        self.registry = TunnelRegistry(self.settings, reactor=self.reactor)
        self.factory = ServerChannelFactory(self.registry)
        counter = itertools.count(1)
        self.patch(secrets, "token_hex", lambda n: f"conn-{next(counter)}")
        self.peerPorts = itertools.count(40000)

    def connect(self, host: str = "192.0.2.10") -> Connection:
        """A new connection to the control port from C{host}."""
        peer = IPv4Address("TCP", host, next(self.peerPorts))
        transport = StringTransport(peerAddress=peer)
        channel = self.factory.buildProtocol(peer)
        channel.makeConnection(transport)
        return Connection(channel, transport)

    def registered(self, remote_port: int = 10022, name: str = "edge-1") -> Connection:
        """A control channel the server has accepted for C{remote_port}."""
        control = self.connect()
        control.send(register(remote_port=remote_port, name=name))
        pool = self.settings.max_pool_count or None
        self.assertEqual(control.sent(), frame(RegisterResp(status="ok", pool=pool)))
        return control

    def listeners(self, port: int) -> list[FakePort]:
        return [p for p in self.reactor.ports if p.port == port]

    def listening(self, port: int) -> list[FakePort]:
        return [p for p in self.listeners(port) if not p.stopped]

    def connectUser(self, port: int = 10022) -> User:
        """A user connecting to the public port C{port}, through its listener."""
        [listener] = self.listening(port)
        peer = IPv4Address("TCP", "198.51.100.99", next(self.peerPorts))
        protocol = listener.factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        return User(protocol, transport)


class RegistrationTests(ServerTestCase):
    def test_goodToken(self):
        """
        register with the right token is answered register_resp ok, and the
        server listens on remote_port at the public interface.
        """
        control = self.connect()
        control.send(register(remote_port=10022))
        self.assertEqual(control.sent(), frame(REGISTERED))
        self.assertFalse(control.transport.disconnecting)
        [(port, factory, backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, backlog, interface), (10022, 1024, PUBLIC_INTERFACE))
        self.assertEqual(list(self.registry.tunnels), [10022])

    def test_goRegisterFrame(self):
        """The Go client's captured register frame is accepted."""
        settings = ServerSettings(token="demo-token", public_interface=PUBLIC_INTERFACE)
        self.registry = TunnelRegistry(settings, reactor=self.reactor)
        self.factory = ServerChannelFactory(self.registry)
        control = self.connect()
        control.send(bytes.fromhex(
            "000000757b2274797065223a227265676973746572222c226c6f63616c5f706f7274223a"
            "33313030332c2272656d6f74655f706f7274223a33313030342c2270726f746f636f6c22"
            "3a22746370222c22746f6b656e223a2264656d6f2d746f6b656e222c226e616d65223a22"
            "64656d6f2d636c69656e74227d"))
        self.assertEqual(control.sent(), frame(REGISTERED))
        self.assertEqual([p.port for p in self.listening(31004)], [31004])

    def test_badToken(self):
        """
        A wrong token is answered fail "authentication failed", the connection
        is closed, and nothing listens.
        """
        control = self.connect()
        control.send(register(token=WRONG_TOKEN))
        self.assertEqual(control.sent(), fail("authentication failed"))
        self.assertTrue(control.transport.disconnecting)
        self.assertEqual(self.reactor.tcpServers, [])
        self.assertEqual(self.registry.tunnels, {})

    def test_repeatedBadTokenAnsweredLater(self):
        """
        A second wrong token in a row from one address is answered only
        after a delay, so that guessing is slow.
        """
        self.connect().send(register(token=WRONG_TOKEN))
        control = self.connect()
        control.send(register(token=WRONG_TOKEN))
        self.assertEqual(control.sent(), b"")
        self.assertFalse(control.transport.disconnecting)
        self.reactor.advance(0.1)
        self.assertEqual(control.sent(), fail("authentication failed"))
        self.assertTrue(control.transport.disconnecting)

    def test_unsupportedProtocol(self):
        """A mapping for a protocol other than tcp or udp is refused and nothing listens."""
        control = self.connect()
        control.send(register(protocol="sctp"))
        self.assertEqual(control.sent(),
                         fail("protocol 'sctp' is not supported, only tcp"))
        self.assertTrue(control.transport.disconnecting)
        self.assertEqual(self.reactor.tcpServers, [])

    def test_portZeroChosenByTheServer(self):
        """
        remote_port 0: the server picks a free port of allow_ports, skipping
        one it cannot bind, and its answer says which.
        """
        self.registry.settings.allow_ports = (range(20000, 20002),)
        self.reactor.portsInUse.update({20000, 20001})
        control = self.connect()
        control.send(register(remote_port=0))
        self.assertEqual(control.sent(), fail("no free remote port for 'edge-1': every port it "
                                              "may publish is taken or reserved"))
        self.reactor.portsInUse.discard(20001)
        control = self.connect()
        control.send(register(remote_port=0))
        self.assertEqual(json.loads(control.sent()[4:]),
                         {"type": "register_resp", "status": "ok", "remote_port": 20001,
                          "pool": self.registry.settings.max_pool_count})
        self.assertEqual(list(self.registry.tunnels), [20001])

    def test_cannotListen(self):
        """
        A port the server cannot listen on is refused with the reason, and
        leaves no tunnel behind: another client may register it later.
        """
        self.reactor.portsInUse.add(10022)
        control = self.connect()
        control.send(register(name="a"))
        self.assertEqual(control.sent(), fail(
            "cannot listen on port 10022: [Errno 98] Address already in use"))
        self.assertTrue(control.transport.disconnecting)
        self.assertEqual(self.registry.tunnels, {})
        self.reactor.portsInUse.clear()
        self.registered(name="b")

    def test_portTakenByAnotherName(self):
        """
        A port held by another client is refused with a reason saying so; the
        first tunnel keeps its listener and its users.
        """
        first = self.registered(name="a")
        second = self.connect()
        second.send(register(name="b"))
        self.assertEqual(second.sent(),
                         fail("remote port 10022 is already taken by another client"))
        self.assertTrue(second.transport.disconnecting)
        self.assertFalse(first.transport.disconnecting)
        self.assertEqual(len(self.listeners(10022)), 1)
        self.assertEqual(len(self.listening(10022)), 1)
        self.connectUser()
        self.assertEqual(first.sent(), openDataChannel("conn-1"))

    def test_sameNameTakesOver(self):
        """
        The same name registering the port again replaces the old control
        channel: the old one is closed, its listener stopped, and a new
        listener serves the new channel, also after the old one is gone.
        """
        old = self.registered(name="edge-1")
        new = self.registered(name="edge-1")
        self.assertTrue(old.transport.disconnecting)
        self.assertFalse(new.transport.disconnecting)
        oldPort, newPort = self.listeners(10022)
        self.assertTrue(oldPort.stopped)
        self.assertFalse(newPort.stopped)
        old.lose()
        self.assertFalse(newPort.stopped)
        self.assertIs(self.registry.tunnels[10022].channel, new.channel)
        self.connectUser()
        self.assertEqual(new.sent(), openDataChannel("conn-1"))
        self.assertEqual(old.sent(), b"")

    def test_secondRegisterCloses(self):
        """A second register on a control channel aborts it; nothing new listens."""
        control = self.registered()
        control.send(register(remote_port=10023))
        self.assertTrue(control.transport.disconnected)
        self.assertEqual(control.sent(), b"")
        self.assertEqual([p.port for p in self.reactor.ports], [10022])

    def test_firstFramePingCloses(self):
        """A connection whose first frame is neither register nor data_channel is aborted."""
        control = self.connect()
        control.send(jsonFrame(type="ping", time=NOW))
        self.assertTrue(control.transport.disconnected)
        self.assertEqual(control.sent(), b"")

    def test_firstFrameTimeout(self):
        """A connection that sends no first frame within first_frame_timeout is aborted."""
        control = self.connect()
        self.reactor.advance(self.settings.first_frame_timeout - 0.5)
        self.assertFalse(control.transport.disconnecting)
        self.reactor.advance(0.5)
        self.assertTrue(control.transport.disconnected)

    def test_firstFrameTimeoutCancelled(self):
        """A registered control channel is not closed by the first-frame timer."""
        control = self.registered()
        self.reactor.advance(self.settings.first_frame_timeout + 1)
        self.assertFalse(control.transport.disconnecting)

    def test_pendingCapPerSource(self):
        """
        Connections from one address that have not sent a first frame are
        capped; one over the cap is aborted at once.
        """
        pending = [self.connect() for _ in range(self.settings.max_pending_per_source)]
        self.assertFalse(any(c.transport.disconnecting for c in pending))
        extra = self.connect()
        self.assertTrue(extra.transport.disconnected)
        self.assertFalse(self.connect(host="192.0.2.11").transport.disconnecting)


class HeartbeatTests(ServerTestCase):
    def test_pingAnsweredWithPong(self):
        """ping is answered with pong carrying the server's time, as Go's server does."""
        control = self.registered()
        control.send(bytes.fromhex(
            "000000217b2274797065223a2270696e67222c2274696d65223a313739353538303632357d"))
        self.assertEqual(control.sent(), bytes.fromhex(
            "000000217b2274797065223a22706f6e67222c2274696d65223a313739353538303632357d"))

    def test_silentChannelDropped(self):
        """
        A control channel with no ping for heartbeat_timeout is aborted by
        checkHeartbeats, and its public port stops listening.
        """
        control = self.registered()
        [listener] = self.listeners(10022)
        self.reactor.advance(self.settings.heartbeat_timeout)
        self.registry.checkHeartbeats()
        self.assertFalse(control.transport.disconnecting)
        self.reactor.advance(0.5)
        self.registry.checkHeartbeats()
        self.assertTrue(control.transport.disconnected)
        self.assertTrue(listener.stopped)
        self.assertEqual(self.registry.tunnels, {})

    def test_pingKeepsChannel(self):
        """A ping resets the heartbeat deadline."""
        control = self.registered()
        self.reactor.advance(20)
        control.send(jsonFrame(type="ping", time=NOW + 20))
        self.reactor.advance(self.settings.heartbeat_timeout - 1)
        self.registry.checkHeartbeats()
        self.assertFalse(control.transport.disconnecting)
        self.reactor.advance(1.5)
        self.registry.checkHeartbeats()
        self.assertTrue(control.transport.disconnected)

    def test_onlySilentChannelDropped(self):
        """checkHeartbeats drops the silent channel and leaves the live one alone."""
        silent = self.registered(remote_port=10022, name="a")
        live = self.registered(remote_port=10023, name="b")
        self.reactor.advance(25)
        live.send(jsonFrame(type="ping", time=NOW + 25))
        self.reactor.advance(10)
        self.registry.checkHeartbeats()
        self.assertTrue(silent.transport.disconnected)
        self.assertFalse(live.transport.disconnecting)
        self.assertEqual(list(self.registry.tunnels), [10023])


class PortStateTests(ServerTestCase):
    def test_offlineStopsListening(self):
        """offline_port for the channel's port stops its listener; nothing is answered."""
        control = self.registered()
        [listener] = self.listeners(10022)
        control.send(jsonFrame(type="offline_port", port=10022))
        self.assertTrue(listener.stopped)
        self.assertEqual(control.sent(), b"")
        self.assertFalse(control.transport.disconnecting)

    def test_onlineListensAgain(self):
        """online_port after offline_port listens on the port again, at the public interface."""
        control = self.registered()
        control.send(jsonFrame(type="offline_port", port=10022))
        control.send(jsonFrame(type="online_port", port=10022))
        self.assertEqual([(p, i) for p, _, _, i in self.reactor.tcpServers],
                         [(10022, PUBLIC_INTERFACE), (10022, PUBLIC_INTERFACE)])
        self.assertEqual(len(self.listening(10022)), 1)
        self.connectUser()
        self.assertEqual(control.sent(), openDataChannel("conn-1"))

    def test_onlineWhenOnlineIgnored(self):
        """online_port while already listening opens no second listener."""
        control = self.registered()
        control.send(jsonFrame(type="online_port", port=10022))
        self.assertEqual(len(self.reactor.tcpServers), 1)

    def test_otherPortIgnored(self):
        """offline_port for a port that is not the channel's changes nothing."""
        control = self.registered()
        control.send(jsonFrame(type="offline_port", port=10023))
        self.assertEqual(len(self.listening(10022)), 1)
        self.assertFalse(control.transport.disconnecting)

    def test_goOfflineOnline(self):
        """The Go client's coalesced ping + offline_port, then online_port."""
        control = self.registered(remote_port=31004)
        control.send(bytes.fromhex(
            "000000217b2274797065223a2270696e67222c2274696d65223a313739353538303632387d"
            "000000247b2274797065223a226f66666c696e655f706f7274222c22706f7274223a33313030347d"))
        self.assertEqual(control.sent(), jsonFrame(type="pong", time=NOW))
        self.assertEqual(self.listening(31004), [])
        control.send(bytes.fromhex(
            "000000237b2274797065223a226f6e6c696e655f706f7274222c22706f7274223a33313030347d"))
        self.assertEqual(len(self.listening(31004)), 1)


class DataChannelTests(ServerTestCase):
    def test_userAnnounced(self):
        """
        A user connecting to the public port is announced on the control
        channel with open_data_channel {local_port, conn_id}; it is read on
        while it waits, so that its close is noticed.
        """
        control = self.registered()
        user = self.connectUser()
        self.assertEqual(control.sent(), openDataChannel("conn-1"))
        self.assertEqual(user.transport.producerState, "producing")
        self.assertFalse(user.transport.disconnecting)

    def test_earlyBytesHeldUpToALimit(self):
        """
        What a waiting user sends is held up to MAX_EARLY_BYTES; then it is
        no longer read, and all it sent reaches the data channel in order.
        """
        self.registered()
        user = self.connectUser()
        chunk = b"x" * 1000
        sent = 0
        while user.transport.producerState == "producing":
            user.protocol.dataReceived(chunk)
            sent += len(chunk)
        self.assertEqual(sent, 5000)
        self.assertGreaterEqual(sent, MAX_EARLY_BYTES)
        data = self.connect()
        data.send(dataChannel("conn-1"))
        self.assertEqual(data.sent(), frame(OK) + b"x" * sent)
        self.assertEqual(user.transport.producerState, "producing")

    def test_smallReadsOnlyWhileWaiting(self):
        """
        A waiting user's transport reads MAX_EARLY_BYTES at a time; once its
        data channel takes it, as much as before (Twisted's bufferSize also
        sizes the write buffer of the splice).
        """
        self.registered()
        [listener] = self.listening(10022)
        peer = IPv4Address("TCP", "198.51.100.99", next(self.peerPorts))
        transport = StringTransport(peerAddress=peer)
        transport.bufferSize = 65536
        listener.factory.buildProtocol(peer).makeConnection(transport)
        self.assertEqual(transport.bufferSize, MAX_EARLY_BYTES)
        self.connect().send(dataChannel("conn-1"))
        self.assertEqual(transport.bufferSize, 65536)

    def test_userClosingWhileWaitingIsLetGo(self):
        """
        A waiting user that ends its side having sent nothing is closed at
        once and waits no more: its timeout is cancelled, and a data channel
        for it finds nobody.
        """
        self.registered()
        user = self.connectUser()
        user.protocol.readConnectionLost()
        self.assertTrue(user.transport.disconnecting)
        self.assertEqual(self.registry.waitingUsers, {})
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_userHalfClosingAfterARequestStillServed(self):
        """
        A waiting user that sends a request and then ends its side is still
        served: the request and the end-of-stream reach the data channel,
        and the answer reaches the user.
        """
        self.registered()
        user = self.connectUser()
        user.protocol.dataReceived(b"GET /")
        user.protocol.readConnectionLost()
        self.assertFalse(user.transport.disconnecting)
        peer = IPv4Address("TCP", "192.0.2.10", next(self.peerPorts))
        # Lenient: the end-of-stream closes a StringTransport (it cannot
        # half-close), and the splice then resumes it as it would a socket.
        data = Connection(self.factory.buildProtocol(peer),
                          StringTransport(peerAddress=peer, lenient=True))
        data.channel.makeConnection(data.transport)
        data.send(dataChannel("conn-1"))
        self.assertEqual(data.sent(), frame(OK) + b"GET /")
        self.assertTrue(data.transport.disconnecting)
        data.send(b"200 OK")
        self.assertEqual(user.transport.value(), b"200 OK")

    def test_splicedBothWays(self):
        """
        A data_channel with the user's conn_id is answered register_resp ok;
        raw bytes in the same read and later reads reach the user, and the
        user's bytes (also those sent early) follow the answer on the data
        channel.
        """
        self.registered()
        user = self.connectUser()
        user.protocol.dataReceived(b"early ")
        data = self.connect()
        data.send(dataChannel("conn-1") + b"\x00\x00\x00\x05hello")
        self.assertEqual(data.sent(), frame(OK) + b"early ")
        self.assertEqual(user.transport.value(), b"\x00\x00\x00\x05hello")
        data.send(b"GET / HTTP/1.1\r\n")
        user.protocol.dataReceived(b"HTTP/1.0 200 OK\r\n")
        self.assertEqual(user.transport.value(), b"\x00\x00\x00\x05helloGET / HTTP/1.1\r\n")
        self.assertEqual(data.sent(), b"HTTP/1.0 200 OK\r\n")
        self.assertFalse(data.transport.disconnecting)

    def test_flowControlRegistered(self):
        """
        Once spliced, each transport is the other's streaming producer and
        the user's reading is resumed.
        """
        self.registered()
        user = self.connectUser()
        data = self.connect()
        data.send(dataChannel("conn-1"))
        self.assertIs(user.transport.producer, data.transport)
        self.assertIs(data.transport.producer, user.transport)
        self.assertTrue(user.transport.streaming)
        self.assertTrue(data.transport.streaming)
        self.assertEqual(user.transport.producerState, "producing")

    def test_goDataChannelHandshakeAndRaw(self):
        """
        The Go client's captured data_channel (no conn_id), with the Go
        server's answer and raw HTTP behind it.
        """
        settings = ServerSettings(token="demo-token", public_interface=PUBLIC_INTERFACE)
        self.registry = TunnelRegistry(settings, reactor=self.reactor)
        self.factory = ServerChannelFactory(self.registry)
        control = self.connect()
        control.send(register(remote_port=31004, local_port=31003, token="demo-token",
                              name="demo-client"))
        user = self.connectUser(31004)
        request = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1:31004\r\n"
                   b"User-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n")
        user.protocol.dataReceived(request)
        data = self.connect()
        data.send(bytes.fromhex(
            "000000767b2274797065223a22646174615f6368616e6e656c222c226c6f63616c5f706f7274"
            "223a33313030332c2272656d6f74655f706f7274223a33313030342c2270726f746f636f6c22"
            "3a22222c22746f6b656e223a2264656d6f2d746f6b656e222c226e616d65223a2264656d6f2d"
            "636c69656e74227d"))
        self.assertEqual(data.sent(), bytes.fromhex(
            "000000267b2274797065223a2272656769737465725f72657370222c22737461747573223a"
            "226f6b227d") + request)

    def writesTo(self, connection: Connection) -> list[bytes]:
        """Each write() made to C{connection}'s transport from now on."""
        writes: list[bytes] = []
        write = connection.transport.write
        self.patch(connection.transport, "write", lambda data: (writes.append(data), write(data)))
        return writes

    def test_answerCarriesWhatTheUserSent(self):
        """
        To our client (a data_channel with conn_id), what the user's socket
        already holds goes in the same write as the answer, read from the
        socket whether or not the user's transport reads.
        """
        self.registered()
        user = self.connectUser()
        held = {user.transport: b"GET / HTTP/1.1\r\n"}
        self.patch(gotunnel.server.channel, "readWaiting", lambda transport: held.pop(transport, b""))
        data = self.connect()
        writes = self.writesTo(data)
        data.send(dataChannel("conn-1"))
        self.assertEqual(writes, [frame(OK) + b"GET / HTTP/1.1\r\n"])

    def test_answerAloneToGo(self):
        """
        To a Go client (no conn_id) the answer goes alone, as the Go server
        sends it, and the user's bytes follow it.
        """
        self.registered()
        user = self.connectUser()
        asked = []
        self.patch(gotunnel.server.channel, "readWaiting", lambda transport: (asked.append(transport), b"x")[1])
        data = self.connect()
        writes = self.writesTo(data)
        data.send(dataChannel())
        self.assertEqual(asked, [])
        self.assertEqual(writes, [frame(OK)])
        user.protocol.dataReceived(b"GET /")
        self.assertEqual(data.sent(), frame(OK) + b"GET /")

    def test_withoutConnIdOldestUserFirst(self):
        """A data_channel without conn_id (a Go client) takes the user who waited longest."""
        self.registered()
        first = self.connectUser()
        self.reactor.advance(1)
        second = self.connectUser()
        data = self.connect()
        data.send(dataChannel() + b"to-first")
        self.assertEqual(first.transport.value(), b"to-first")
        self.assertEqual(second.transport.value(), b"")
        again = self.connect()
        again.send(dataChannel() + b"to-second")
        self.assertEqual(second.transport.value(), b"to-second")

    def test_connIdPicksItsUser(self):
        """A data_channel with conn_id takes exactly that user, not the oldest."""
        self.registered()
        first = self.connectUser()
        second = self.connectUser()
        data = self.connect()
        data.send(dataChannel("conn-2") + b"x")
        self.assertEqual(second.transport.value(), b"x")
        self.assertEqual(first.transport.value(), b"")
        self.assertEqual(list(self.registry.waitingUsers), ["conn-1"])

    def test_wrongConnId(self):
        """A conn_id nobody waits under is refused and closed; the user still waits."""
        self.registered()
        user = self.connectUser()
        data = self.connect()
        data.send(dataChannel("conn-9") + b"x")
        self.assertEqual(data.sent(), fail("no user is waiting for this data channel"))
        self.assertTrue(data.transport.disconnecting)
        self.assertEqual(user.transport.value(), b"")
        self.assertEqual(list(self.registry.waitingUsers), ["conn-1"])

    def test_noWaitingUser(self):
        """A data_channel when no user waits is refused and closed."""
        self.registered()
        data = self.connect()
        data.send(dataChannel())
        self.assertEqual(data.sent(), fail("no user is waiting for this data channel"))
        self.assertTrue(data.transport.disconnecting)

    def test_sameConnIdTwice(self):
        """A second data_channel for a user already spliced is refused."""
        self.registered()
        self.connectUser()
        self.connect().send(dataChannel("conn-1"))
        data = self.connect()
        data.send(dataChannel("conn-1"))
        self.assertEqual(data.sent(), fail("no user is waiting for this data channel"))

    def test_badToken(self):
        """A data_channel with a wrong token is refused and closed; the user still waits."""
        self.registered()
        user = self.connectUser()
        data = self.connect()
        data.send(dataChannel("conn-1", token=WRONG_TOKEN) + b"x")
        self.assertEqual(data.sent(), fail("authentication failed"))
        self.assertTrue(data.transport.disconnecting)
        self.assertEqual(user.transport.value(), b"")
        self.assertEqual(list(self.registry.waitingUsers), ["conn-1"])

    def test_userTimesOut(self):
        """
        A user with no data channel within data_channel_timeout is closed
        and forgotten: a late data channel for it is refused.
        """
        self.registered()
        user = self.connectUser()
        self.reactor.advance(self.settings.data_channel_timeout - 0.5)
        self.assertFalse(user.transport.disconnecting)
        self.reactor.advance(0.5)
        self.assertTrue(user.transport.disconnecting)
        self.assertEqual(self.registry.waitingUsers, {})
        data = self.connect()
        data.send(dataChannel("conn-1"))
        self.assertEqual(data.sent(), fail("no user is waiting for this data channel"))

    def test_splicedUserDoesNotTimeOut(self):
        """A user whose data channel arrived is not closed by the waiting timer."""
        self.registered()
        user = self.connectUser()
        self.connect().send(dataChannel("conn-1"))
        self.reactor.advance(self.settings.data_channel_timeout + 1)
        self.assertFalse(user.transport.disconnecting)

    def test_userLeftBeforeDataChannel(self):
        """A user who hung up while waiting is forgotten; its data channel is refused."""
        self.registered()
        user = self.connectUser()
        user.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.registry.waitingUsers, {})
        data = self.connect()
        data.send(dataChannel("conn-1"))
        self.assertEqual(data.sent(), fail("no user is waiting for this data channel"))

    def test_closePropagates(self):
        """When a spliced user goes, its data channel is closed, and vice versa."""
        self.registered()
        first = self.connectUser()
        second = self.connectUser()
        firstData, secondData = self.connect(), self.connect()
        firstData.send(dataChannel("conn-1"))
        secondData.send(dataChannel("conn-2"))
        first.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(firstData.transport.disconnecting)
        secondData.lose()
        self.assertTrue(second.transport.disconnecting)


class ControlChannelLostTests(ServerTestCase):
    def test_closesWaitingUsersAndListener(self):
        """
        When a control channel goes, its waiting users are closed, its
        listener stops and the port is free once its lease ends; spliced
        users carry on.
        """
        control = self.registered()
        spliced = self.connectUser()
        waiting = [self.connectUser(), self.connectUser()]
        [listener] = self.listeners(10022)
        self.connect().send(dataChannel("conn-1"))
        control.lose()
        self.assertTrue(all(u.transport.disconnecting for u in waiting))
        self.assertFalse(spliced.transport.disconnecting)
        self.assertTrue(listener.stopped)
        self.assertEqual(self.registry.tunnels, {})
        self.assertEqual(self.registry.waitingUsers, {})
        self.reactor.advance(self.settings.port_lease)
        self.registered(name="someone-else")


class PortLeaseTests(ServerTestCase):
    """
    A client that drops without a word keeps its port reserved for
    port_lease seconds: refused to other names, back at once for its own.
    """

    def setUp(self):
        super().setUp()
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def infoLines(self) -> list[str]:
        """The lease's log lines, each checked to be at info."""
        lease = re.compile(r"public port \d+ reserved for |lease of |client \S+ is back: ")
        found = [e for e in self.events if lease.match(formatEvent(e))]
        self.assertEqual({e["log_level"] for e in found} - {LogLevel.info}, set())
        return [formatEvent(e) for e in found]

    def refused(self, name: str, remote_port: int = 10022) -> bytes:
        control = self.connect()
        control.send(register(remote_port=remote_port, name=name))
        return control.sent()

    def test_otherNameRefusedDuringLease(self):
        """
        The control channel lost, the listener is closed (users are refused
        by the kernel at once) and another name is refused the port until
        the lease ends, on the registry's clock.
        """
        control = self.registered()
        [listener] = self.listeners(10022)
        control.lose()
        self.assertTrue(listener.stopped)
        self.assertEqual(self.registry.tunnels, {})
        self.reactor.advance(self.settings.port_lease - 1)
        self.assertEqual(self.refused("edge-2"), fail(
            "remote port 10022 is reserved for the client that had it, for 1 s more"))
        self.assertEqual(self.listening(10022), [])
        self.reactor.advance(1)
        self.assertEqual(len(self.registry.leases), 0)
        self.registered(name="edge-2")
        self.assertEqual(self.infoLines(), [
            "public port 10022 reserved for edge-1 for 30 s",
            "lease of public port 10022 for edge-1 expired; the port is free"])

    def test_sameNameBackAtOnce(self):
        """The same name registering during the lease gets the port at once, listening."""
        self.registered().lose()
        self.reactor.advance(5)
        self.registered()
        self.assertEqual(len(self.listening(10022)), 1)
        self.assertEqual(len(self.registry.leases), 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.infoLines(), [
            "public port 10022 reserved for edge-1 for 30 s",
            "client edge-1 is back: public port 10022 is its again"])

    def test_heartbeatTimeoutLeavesALease(self):
        """A client dropped for silence leaves a lease, as one whose connection closed."""
        control = self.registered()
        self.reactor.advance(self.settings.heartbeat_timeout + 1)
        self.registry.checkHeartbeats()
        self.assertIsNotNone(self.registry.leases.get(10022))
        control.lose()
        self.assertIn(b"is reserved for the client that had it", self.refused("edge-2"))
        self.registered()

    def test_replacedMappingLeavesNoLease(self):
        """A mapping replaced by its own name registering again leaves no lease behind."""
        first = self.registered()
        self.registered()
        first.lose()
        self.assertEqual(len(self.registry.leases), 0)
        self.assertEqual(len(self.listening(10022)), 1)

    def test_replacedControlChannelClosingSaysSo(self):
        """
        The replaced control channel closing does not claim the port is
        closing: it says the new channel serves it (and it does).
        """
        first = self.registered()
        self.registered()
        del self.events[:]
        first.lose()
        lines = [(formatEvent(e), e["log_level"]) for e in self.events
                 if e.get("log_namespace") == "gotunnel.server"]
        self.assertEqual(lines, [("the old control channel of client edge-1 closed; its "
                                  "public port 10022 is served by the new one", LogLevel.info)])
        self.assertEqual(len(self.listening(10022)), 1)

    def test_droppedControlChannelSaysThePortCloses(self):
        """A control channel that goes with no successor still says its port is closing."""
        self.registered().lose()
        self.assertIn("client edge-1 gone; closing public port 10022",
                      [formatEvent(e) for e in self.events])

    def test_zeroTurnsLeasesOff(self):
        """port_lease 0: the port is free as soon as the client is gone."""
        self.settings.port_lease = 0
        self.registered().lose()
        self.registered(name="edge-2")

    def test_leasesBoundedByTheMappingLimit(self):
        """
        A name that connects and drops on port after port holds no more
        leases, with its mappings, than it may hold mappings: its oldest
        lease ends first.
        """
        self.settings.max_mappings_per_client = 2
        for port in range(10022, 10032):
            self.registered(remote_port=port).lose()
        self.assertEqual(sorted(lease.remote_port for lease in self.registry.leases.heldBy(
            "edge-1")), [10030, 10031])
        live = self.registered(remote_port=10040)
        self.assertEqual([lease.remote_port for lease in self.registry.leases.heldBy("edge-1")],
                         [10031])
        self.registered(name="edge-2", remote_port=10022)
        live.lose()
        self.assertEqual(len(self.registry.leases), 2)

    def test_onePerPort(self):
        """The same port dropped again and again holds one lease, with one timer."""
        for _ in range(5):
            self.registered().lose()
        self.assertEqual(len(self.registry.leases), 1)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)

    def test_shutdownEndsLeases(self):
        """Stopping the server ends every lease and its timer."""
        self.registered().lose()
        self.registry.closeAll()
        self.assertEqual(len(self.registry.leases), 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class SecretTests(ServerTestCase):
    def test_tokenNeverLogged(self):
        """
        Neither the server's token nor a wrong token a client sent appears
        in any log event, formatted or as a field, across registrations,
        refusals, data channels, protocol errors and timeouts.
        """
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        control = self.registered()
        self.connect().send(register(token=WRONG_TOKEN, name="intruder", remote_port=10030))
        self.connect().send(register(name="other"))
        self.connectUser()
        self.connectUser()
        self.connect().send(dataChannel("conn-1"))
        self.connect().send(dataChannel("conn-2", token=WRONG_TOKEN))
        self.reactor.advance(1)
        self.connect().send(dataChannel(token=WRONG_TOKEN))
        self.connect().send(jsonFrame(type="register", token=TOKEN, remote_port="x"))
        self.connect().send(jsonFrame(type="register", token=TOKEN * 100))
        self.connect().send(jsonFrame(type="data_channel", token=12345))
        control.send(register())
        self.reactor.advance(self.settings.data_channel_timeout)
        self.registry.checkHeartbeats()

        formats = [e.get("log_format", "") for e in events]
        for expected in ("client {name} registered", "refused registration",
                         "refused a data channel", "protocol error", "no data channel",
                         "heartbeat timeout"):
            self.assertTrue(any(f.startswith(expected) for f in formats),
                            f"no {expected!r} event among {formats}")
        for event in events:
            text = formatEvent(event) + repr(
                {k: v for k, v in event.items() if not k.startswith("log_")})
            self.assertNotIn(TOKEN, text)
            self.assertNotIn(WRONG_TOKEN, text)


class SetupPathTests(ServerTestCase):
    def test_readyLoggedAtDebug(self):
        """
        Each data channel's setup time is logged once, at debug level: a
        line per user connection must cost nothing at the default level.
        """
        self.registered()
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.connectUser()
        self.reactor.advance(0.0025)
        self.connect().send(dataChannel("conn-1"))
        [ready] = events
        self.assertEqual(ready["log_level"], LogLevel.debug)
        self.assertEqual(formatEvent(ready), "data channel for port 10022 ready in 2.5 ms")


class ControlBacklogTests(unittest.TestCase):
    """The control listener's accept queue holds a burst of data channels."""

    def listenWith(self, **settings) -> int:
        reactor = MemoryReactorClock()
        service = TunnelServerService(ServerSettings(token=TOKEN, **settings), reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        [(_, _, backlog, _)] = reactor.tcpServers
        return backlog

    def test_defaultBacklog(self):
        """Without backlog= in the endpoint string the control port gets 1024, not 50."""
        self.assertEqual(self.listenWith(listen="tcp:17000:interface=127.0.0.1"), 1024)
        self.assertEqual(self.listenWith(listen="tcp:0", control_backlog=4096), 4096)

    def test_ownBacklogKept(self):
        """A backlog= the endpoint string sets is kept."""
        self.assertEqual(self.listenWith(listen="tcp:0:backlog=64:interface=127.0.0.1"), 64)

    def test_withBacklog(self):
        """Only endpoint kinds that take a backlog get one; escaped colons are no separators."""
        self.assertEqual(withBacklog("tcp:17000", 1024), "tcp:17000:backlog=1024")
        self.assertEqual(withBacklog("tcp6:0:interface=\\:\\:1", 8),
                         "tcp6:0:interface=\\:\\:1:backlog=8")
        self.assertEqual(withBacklog("unix:/run/gotunnel.sock", 8),
                         "unix:/run/gotunnel.sock:backlog=8")
        self.assertEqual(withBacklog("ssl:17000:backlog=9:privateKey=k.pem", 8),
                         "ssl:17000:backlog=9:privateKey=k.pem")
        self.assertEqual(withBacklog("systemd:domain=INET:index=0", 8),
                         "systemd:domain=INET:index=0")

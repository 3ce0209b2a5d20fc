"""
The client on a memory reactor: what its control channel says and when,
how it backs off, its data channels and their local connections, the
health probe, and the Go-style error lines.
"""

from __future__ import annotations

import dataclasses
import io
import random
import re
import sys

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, formatTime, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import directlyProvides

from gotunnel import report
from gotunnel.client import datachannelrequests
from gotunnel.wire import messages
from gotunnel.client.control import ControlChannelFactory
from gotunnel.client.datachannel import DataChannelFactory, LocalServiceFactory
from gotunnel.client.datachannelrequests import EARLY_LOCAL_CONNECTS
from gotunnel.client.endpoints import serverAddress
from gotunnel.client.mapping import ClientMappingService, _ProbeFactory
from gotunnel.client.service import TunnelClientService
from gotunnel.config.mappings import Mapping
from gotunnel.config.settings import ClientSettings

from tests.support import frame, jsonFrame as supportJsonFrame

TOKEN = "s3cret-Token-0xC0FFEE"
SERVER = ("198.51.100.7", 17000)
START = 1795580615  # the first ping, 10 s later, has the Go capture's time
JITTER = 0.5

AUTH_FAILED = b'{"type":"register_resp","status":"fail","reason":"authentication failed"}'
OK = b'{"type":"register_resp","status":"ok"}'
AUTH_LINE = "[ERROR][1002] Authentication failed, please check token\n"
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} ", re.MULTILINE)

# From the Go capture (go-gotunnel-wire.json).
GO_REGISTER = bytes.fromhex(
    "000000757b2274797065223a227265676973746572222c226c6f63616c5f706f7274223a33313030"
    "332c2272656d6f74655f706f7274223a33313030342c2270726f746f636f6c223a22746370222c22"
    "746f6b656e223a2264656d6f2d746f6b656e222c226e616d65223a2264656d6f2d636c69656e7422"
    "7d")
GO_PING = bytes.fromhex(
    "000000217b2274797065223a2270696e67222c2274696d65223a313739353538303632357d")
GO_OPEN_DATA_CHANNEL = bytes.fromhex(
    "000000627b2274797065223a226f70656e5f646174615f6368616e6e656c222c226c6f63616c5f70"
    "6f7274223a33313030332c2272656d6f74655f706f7274223a302c2270726f746f636f6c223a2222"
    "2c22746f6b656e223a22222c226e616d65223a22227d")
GO_DATA_CHANNEL = bytes.fromhex(
    "000000767b2274797065223a22646174615f6368616e6e656c222c226c6f63616c5f706f7274223a"
    "33313030332c2272656d6f74655f706f7274223a33313030342c2270726f746f636f6c223a22222c"
    "22746f6b656e223a2264656d6f2d746f6b656e222c226e616d65223a2264656d6f2d636c69656e74"
    "227d")


def jsonFrame(**fields) -> bytes:
    return supportJsonFrame(fields)


def innermost(factory):
    """The application's factory inside the endpoint's and ClientService's wrappers."""
    while True:
        inner = getattr(factory, "_wrappedFactory", None) or \
            getattr(factory, "_protocolFactory", None)
        if inner is None:
            return factory
        factory = inner


class ClientTestCase(unittest.TestCase):
    """
    One mapping, 127.0.0.1:8022 published as 10022, on a memory reactor;
    reconnect jitter fixed at 0.5 s and standard error captured.
    """

    token = TOKEN
    name = "edge-1"
    mapping = Mapping("127.0.0.1", 8022, 10022)

    def setUp(self):
        self.stderr = io.StringIO()
        self.patch(sys, "__stderr__", self.stderr)
        self.patch(random, "random", lambda: JITTER)
        self.reactor = MemoryReactorClock()
        self.reactor.advance(START)
        self.settings = ClientSettings(server="unused", token=self.token, name=self.name,
                                       mappings=[self.mapping])
        self.service = ClientMappingService(
            self.settings, self.mapping, TCP4ClientEndpoint(self.reactor, *SERVER), self.reactor)

    def attempts(self, host: str, port: int, factoryType: type) -> list[int]:
        """Indices in reactor.tcpClients of connections to host:port for factoryType."""
        return [i for i, (h, p, factory, _, _) in enumerate(self.reactor.tcpClients)
                if (h, p) == (host, port) and isinstance(innermost(factory), factoryType)]

    def serverAttempts(self, factoryType: type = ControlChannelFactory) -> list[int]:
        return self.attempts(*SERVER, factoryType)

    def localAttempts(self, factoryType: type = LocalServiceFactory) -> list[int]:
        return self.attempts(self.mapping.local_host, self.mapping.local_port, factoryType)

    def complete(self, index: int):
        """
        Let connection attempt C{index} succeed; returns the protocol the
        reactor talks to and its transport.
        """
        host, port, factory, _, _ = self.reactor.tcpClients[index]
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol = factory.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        return protocol, transport

    def refuse(self, index: int) -> None:
        """Let connection attempt C{index} fail with connection refused."""
        _, _, factory, _, _ = self.reactor.tcpClients[index]
        factory.clientConnectionFailed(self.reactor.connectors[index],
                                       Failure(error.ConnectionRefusedError()))

    def control(self):
        """A control channel connected to the server (not via the reconnecting service)."""
        channel = ControlChannelFactory(self.service).buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def registered(self):
        """A control channel the server has accepted, its transport cleared."""
        channel, transport = self.control()
        channel.dataReceived(frame(OK))
        transport.clear()
        return channel, transport

    def dataChannel(self, openFrame: bytes):
        """
        A data channel opened because the server sent C{openFrame} on a
        registered control channel; its protocol and transport.
        """
        channel, _ = self.registered()
        channel.dataReceived(openFrame)
        [index] = self.serverAttempts(DataChannelFactory)
        return self.complete(index)

    def unstamped(self) -> str:
        """Standard error with each line's time taken off (every line must have one)."""
        text = self.stderr.getvalue()
        self.assertEqual(len(STAMP.findall(text)), text.count("\n"), text)
        return STAMP.sub("", text)

    def logged(self) -> list[dict]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events


class RegisterTests(ClientTestCase):
    def test_registerFields(self):
        """On connect the control channel sends register with exactly the Go fields."""
        _, transport = self.control()
        self.assertEqual(transport.value(), frame(
            b'{"type":"register","local_port":8022,"remote_port":10022,"protocol":"tcp",'
            b'"token":"s3cret-Token-0xC0FFEE","name":"edge-1"}'))

    def test_muxOfferedExceptWithProxyProtocol(self):
        """
        With mux on, register offers it, but not for a mapping that writes a
        PROXY protocol header: a stream carries no user address.
        """
        for proxy, offered in ((None, 1), ("v1", None), ("v2", None)):
            mapping = dataclasses.replace(self.mapping, proxy_protocol=proxy)
            self.settings = dataclasses.replace(self.settings, mux=True, mappings=[mapping])
            self.service = ClientMappingService(
                self.settings, mapping, TCP4ClientEndpoint(self.reactor, *SERVER), self.reactor)
            _, transport = self.control()
            self.assertEqual(messages.parse(transport.value()[4:]).mux, offered, proxy)

    def test_registeredFiresWaiters(self):
        """register_resp ok makes the channel the service's, and whenRegistered fires."""
        waiting = self.service.whenRegistered()
        channel, _ = self.registered()
        self.assertIs(self.successResultOf(waiting), channel)
        self.assertIs(self.service.channel, channel)

    def test_authenticationFailed(self):
        """
        register_resp fail "authentication failed" prints the Go client's
        [ERROR][1002] line on standard error and closes the channel.
        """
        channel, transport = self.control()
        channel.dataReceived(frame(AUTH_FAILED))
        self.assertEqual(self.stderr.getvalue(), f"{formatTime(START)} {AUTH_LINE}")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(self.service.channel)

    def test_otherRefusalLogged(self):
        """Another refusal is logged with its reason at once, and not printed as 1002."""
        events = self.logged()
        channel, transport = self.control()
        channel.dataReceived(frame(
            b'{"type":"register_resp","status":"fail",'
            b'"reason":"the server is restarting"}'))
        self.assertEqual(self.stderr.getvalue(), "")
        self.assertTrue(transport.disconnecting)
        reasons = [e.get("reason") for e in events
                   if e.get("log_format", "").startswith("the server refused")]
        self.assertEqual(reasons, ["the server is restarting"])

    def test_secondRegisterRespCloses(self):
        """A register_resp on a registered channel is a protocol error."""
        channel, transport = self.registered()
        channel.dataReceived(frame(OK))
        self.assertTrue(transport.disconnected)

    def test_openDataChannelBeforeRegistered(self):
        """open_data_channel before register_resp is a protocol error; nothing connects."""
        channel, transport = self.control()
        channel.dataReceived(GO_OPEN_DATA_CHANNEL)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.serverAttempts(DataChannelFactory), [])


class HeartbeatTests(ClientTestCase):
    def test_pingEveryInterval(self):
        """
        After register_resp ok the channel pings every heartbeat_interval,
        with the time in Unix seconds (byte for byte the Go client's ping).
        """
        _, transport = self.registered()
        self.reactor.advance(9.5)
        self.assertEqual(transport.value(), b"")
        self.reactor.advance(0.5)
        self.assertEqual(transport.value(), GO_PING)
        transport.clear()
        self.reactor.advance(10)
        self.assertEqual(transport.value(), jsonFrame(type="ping", time=START + 20))

    def test_noPingBeforeRegistered(self):
        """No ping goes out while register_resp is awaited."""
        self.settings.register_timeout = 120
        _, transport = self.control()
        transport.clear()
        self.reactor.advance(60)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)

    def test_missingPongsAbort(self):
        """
        With no pong, pings go out at 10, 20 and 30 s; at 40 s, three
        intervals of silence past, the connection is aborted instead.
        """
        _, transport = self.registered()
        self.reactor.pump([10, 10, 10])
        self.assertEqual(transport.value(), b"".join(
            jsonFrame(type="ping", time=START + t) for t in (10, 20, 30)))
        self.assertFalse(transport.disconnecting)
        transport.clear()
        self.reactor.advance(10)
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), b"")

    def test_pongKeepsAlive(self):
        """A pong restarts the count of silent intervals."""
        channel, transport = self.registered()
        self.reactor.pump([10, 10, 5])
        channel.dataReceived(jsonFrame(type="pong", time=START + 25))
        self.reactor.pump([5, 10, 10])
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(10)
        self.assertTrue(transport.disconnected)

    def test_lostChannelStopsPinging(self):
        """A lost control channel stops its heartbeat and is no longer the service's."""
        channel, transport = self.registered()
        channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertIsNone(self.service.channel)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(30)
        self.assertEqual(transport.value(), b"")


class ReconnectTests(ClientTestCase):
    """The reconnecting service, with jitter fixed at 0.5 s."""

    def assertNextAttemptAfter(self, delay: float) -> int:
        """
        No new control connection is attempted before C{delay} + jitter
        seconds, and one is attempted then; returns its index.
        """
        before = self.serverAttempts()
        self.reactor.advance(delay)
        self.assertEqual(self.serverAttempts(), before,
                         f"reconnected sooner than {delay} s + jitter")
        self.reactor.advance(JITTER)
        after = self.serverAttempts()
        self.assertEqual(len(after), len(before) + 1,
                         f"did not reconnect {delay} s + jitter later")
        return after[-1]

    def test_connectFailuresBackOff(self):
        """
        A server that cannot be reached is retried after 1, 2, 4, 8, 16,
        16 s (plus jitter), and each failure prints [ERROR][1001].
        """
        self.service.startService()
        [index] = self.serverAttempts()
        for delay in (1, 2, 4, 8, 16, 16):
            self.refuse(index)
            index = self.assertNextAttemptAfter(delay)
        self.assertEqual(self.unstamped().splitlines(),
                         ["[ERROR][1001] Failed to connect to server 198.51.100.7:17000: "
                          "Connection was refused by other side."] * 6)

    def test_authFailuresBackOff(self):
        """
        A refused registration does not retry in a loop: the delays grow
        1, 2, 4, 8, 16, 16 s (plus jitter), and each refusal prints
        [ERROR][1002].
        """
        self.service.startService()
        [index] = self.serverAttempts()
        for delay in (1, 2, 4, 8, 16, 16):
            protocol, transport = self.complete(index)
            protocol.dataReceived(frame(AUTH_FAILED))
            self.assertTrue(transport.disconnecting)
            protocol.connectionLost(Failure(error.ConnectionDone()))
            index = self.assertNextAttemptAfter(delay)
        self.assertEqual(self.unstamped(), AUTH_LINE * 6)

    def test_registeredResetsBackOff(self):
        """After a successful registration, a lost channel is retried after 1 s again."""
        self.service.startService()
        [index] = self.serverAttempts()
        for _ in range(3):
            protocol = self.complete(index)[0]
            protocol.dataReceived(frame(AUTH_FAILED))
            protocol.connectionLost(Failure(error.ConnectionDone()))
            self.reactor.advance(20)
            [*_, index] = self.serverAttempts()
        protocol = self.complete(index)[0]
        protocol.dataReceived(frame(OK))
        protocol.connectionLost(Failure(error.ConnectionLost()))
        self.assertNextAttemptAfter(1)

    def test_jitterBelowOneSecond(self):
        """The random part of each delay is from 0 to 1 s."""
        self.patch(random, "random", random.Random(1234).random)
        service = ClientMappingService(
            self.settings, self.mapping, TCP4ClientEndpoint(self.reactor, *SERVER), self.reactor)
        for attempt, base in ((1, 1), (2, 2), (3, 4), (4, 8), (5, 16), (9, 16)):
            jitter = service._retryDelay(attempt) - base
            self.assertTrue(0 <= jitter < 1, f"attempt {attempt}: jitter {jitter}")

    def test_closedBeforeAnswerBacksOff(self):
        """
        A server that closes the control channel before any register_resp
        (overloaded, or refusing the address) is retried with growing
        delays too, not every second.
        """
        self.service.startService()
        [index] = self.serverAttempts()
        for delay in (1, 2, 4, 8):
            protocol = self.complete(index)[0]
            protocol.connectionLost(Failure(error.ConnectionDone()))
            index = self.assertNextAttemptAfter(delay)

    def test_unansweredRegisterTimesOut(self):
        """
        A server that accepts the control channel and never answers
        register: after register_timeout (10 s) the channel is aborted with
        a warning, and connecting again backs off like any other failed
        registration.
        """
        events = self.logged()
        self.service.startService()
        [index] = self.serverAttempts()
        for delay in (1, 2, 4):
            protocol, transport = self.complete(index)
            self.reactor.advance(9.9)
            self.assertFalse(transport.disconnected)
            self.reactor.advance(0.1)
            self.assertTrue(transport.disconnected)
            protocol.connectionLost(Failure(error.ConnectionAborted()))
            index = self.assertNextAttemptAfter(delay)
        warnings = [formatEvent(e) for e in events
                    if e.get("log_format", "").startswith("the server did not answer")]
        self.assertEqual(warnings, ["the server did not answer the registration of "
                                    "127.0.0.1:8022->10022 within 10 s; closing the control "
                                    "channel"] * 3)

    def test_registerTimeoutInTLSHandshakeNotBlamedOnPlainServer(self):
        """
        A TLS handshake the server never finishes ends with the timeout's
        line only, not with 1001's hint that the server speaks plain TCP.
        """
        channel = ControlChannelFactory(self.service).buildProtocol(None)
        transport = StringTransport()
        directlyProvides(transport, ISSLTransport)
        channel.makeConnection(transport)
        self.reactor.advance(10)
        self.assertTrue(transport.disconnected)
        channel.connectionLost(Failure(error.ConnectionAborted()))
        self.assertEqual(self.stderr.getvalue(), "")

    def test_registerTimeoutSetting(self):
        """register_timeout sets the wait; an answer in time cancels it."""
        self.settings.register_timeout = 2.5
        self.service.startService()
        [index] = self.serverAttempts()
        protocol, transport = self.complete(index)
        self.reactor.advance(2.4)
        protocol.dataReceived(frame(OK))
        self.reactor.advance(30)
        self.assertFalse(transport.disconnected)
        self.assertIsNotNone(self.service.channel)


class LastingRefusalTests(ClientTestCase):
    """
    Refusals that asking again will not change: the retry line says so and
    names what must change; with exit_on_refusal the client stops the
    reactor with a status per kind of refusal.
    """

    TAKEN = (b'{"type":"register_resp","status":"fail",'
             b'"reason":"remote port 10022 is already taken by another client"}')

    def refusedLines(self, events: list[dict]) -> list[str]:
        return [formatEvent(e) for e in events
                if e.get("log_format", "").startswith("the server refused")]

    def refuseOnce(self, answer: bytes) -> None:
        [*_, index] = self.serverAttempts()
        protocol, _ = self.complete(index)
        protocol.dataReceived(frame(answer))
        protocol.connectionLost(Failure(error.ConnectionDone()))

    def test_retryLineSaysItWillNotChange(self):
        events = self.logged()
        self.service.startService()
        self.refuseOnce(self.TAKEN)
        self.assertEqual(self.refusedLines(events), [
            "the server refused 127.0.0.1:8022->10022: remote port 10022 is already taken by "
            "another client; will retry in 1.5 s; this will not change until the other client "
            "releases port 10022 or this one asks for another remote port"])
        self.reactor.advance(1.4)
        self.assertEqual(len(self.serverAttempts()), 1)
        self.reactor.advance(0.1)
        self.assertEqual(len(self.serverAttempts()), 2)
        self.refuseOnce(AUTH_FAILED)
        self.assertEqual(self.unstamped(), AUTH_LINE)
        self.assertEqual(self.refusedLines(events)[1:], [
            "the server refused 127.0.0.1:8022->10022: authentication failed; will retry in "
            "2.5 s; this will not change until the client's token is the server's "
            "(client.token, --token)"])
        self.reactor.advance(2.4)
        self.assertEqual(len(self.serverAttempts()), 2)
        self.reactor.advance(0.1)
        self.assertEqual(len(self.serverAttempts()), 3)

    def clientService(self, **settings) -> TunnelClientService:
        settings = ClientSettings(server="tcp:%s:%d" % SERVER, token=self.token, name=self.name,
                                  mappings=[self.mapping], **settings)
        service = TunnelClientService(settings, reactor=self.reactor)
        self.reactor.running = True
        service.startService()
        return service

    def test_exitOnRefusal(self):
        """
        With exit_on_refusal, each kind of lasting refusal stops the
        reactor with its own exit status; a wrong token still prints
        [ERROR][1002] first.
        """
        for reason, status in [
                (b"authentication failed", 3),
                (b"remote port 10022 is not allowed on this server", 4),
                (b"too many mappings for client 'edge-1': it may hold 1 at once", 4),
                (b"remote port 10022 is already taken by another client", 5),
                (b"cannot listen on port 10022: [Errno 98] Address already in use", 6)]:
            self.reactor = MemoryReactorClock()
            events = self.logged()
            service = self.clientService(exit_on_refusal=True)
            self.refuseOnce(b'{"type":"register_resp","status":"fail","reason":"%s"}' % reason)
            self.assertTrue(self.reactor.hasStopped, reason)
            self.assertEqual(service.exitStatus, status)
            [line] = self.refusedLines(events)
            self.assertIn(f"; exiting with status {status} (exit_on_refusal), as this will not "
                          "change until ", line)
        self.assertEqual(self.unstamped(), AUTH_LINE)

    def test_exitStatusToldFirst(self):
        """whenExiting (twistd's hook) hears the status before the reactor stops."""
        service = self.clientService(exit_on_refusal=True)
        heard = []
        service.whenExiting = lambda status: heard.append((status, self.reactor.hasStopped))
        self.refuseOnce(self.TAKEN)
        self.assertEqual(heard, [(5, False)])

    def test_noExitWithoutTheOption(self):
        service = self.clientService()
        self.refuseOnce(AUTH_FAILED)
        self.assertFalse(self.reactor.hasStopped)
        self.assertIsNone(service.exitStatus)

    def test_noExitOnARefusalThatMayPass(self):
        service = self.clientService(exit_on_refusal=True)
        self.refuseOnce(b'{"type":"register_resp","status":"fail",'
                        b'"reason":"the server is restarting"}')
        self.assertFalse(self.reactor.hasStopped)
        self.assertIsNone(service.exitStatus)


class DataChannelTests(ClientTestCase):
    def test_openDataChannelConnects(self):
        """
        open_data_channel makes a new connection to the server whose first
        frame is data_channel: the mapping's ports, protocol "", the token,
        the name, and the conn_id echoed.
        """
        _, transport = self.dataChannel(jsonFrame(
            type="open_data_channel", local_port=8022, remote_port=0, protocol="",
            token="", name="", conn_id="9f86d081884c7d65"))
        self.assertEqual(transport.value(), frame(
            b'{"type":"data_channel","local_port":8022,"remote_port":10022,"protocol":"",'
            b'"token":"s3cret-Token-0xC0FFEE","name":"edge-1","conn_id":"9f86d081884c7d65"}'))

    def test_eachRequestItsOwnConnection(self):
        """Two open_data_channel frames open two data channels, each with its conn_id."""
        channel, _ = self.registered()
        channel.dataReceived(jsonFrame(type="open_data_channel", local_port=8022, conn_id="a")
                             + jsonFrame(type="open_data_channel", local_port=8022,
                                         conn_id="b"))
        first, second = self.serverAttempts(DataChannelFactory)
        self.assertIn(b'"conn_id":"a"', self.complete(first)[1].value())
        self.assertIn(b'"conn_id":"b"', self.complete(second)[1].value())

    def test_openConnectsLocalAtOnce(self):
        """
        open_data_channel starts the data channel and, right behind it, the
        connection to the local service, without waiting for the server's
        answer; register_resp ok while the local connection is still
        being made holds the data channel's reading.
        """
        channel, _ = self.registered()
        channel.dataReceived(jsonFrame(type="open_data_channel", local_port=8022,
                                       conn_id="c1"))
        [server] = self.serverAttempts(DataChannelFactory)
        [local] = self.localAttempts()
        self.assertLess(server, local)
        protocol, transport = self.complete(server)
        protocol.dataReceived(frame(OK))
        self.assertEqual(transport.producerState, "paused")

    def test_localConnectedFirstWaitsForServer(self):
        """
        A local connection made before the server accepts the data channel
        reads nothing; register_resp ok splices the two, and bytes flow in
        order both ways.
        """
        protocol, transport = self.dataChannel(jsonFrame(
            type="open_data_channel", local_port=8022, conn_id="c1"))
        transport.clear()
        [index] = self.localAttempts()
        local, localTransport = self.complete(index)
        self.assertEqual(localTransport.producerState, "paused")
        self.assertIsNone(localTransport.producer)
        protocol.dataReceived(frame(OK) + b"first ")
        self.assertEqual(localTransport.producerState, "producing")
        self.assertIs(localTransport.producer, transport)
        self.assertIs(transport.producer, localTransport)
        protocol.dataReceived(b"second")
        self.assertEqual(localTransport.value(), b"first second")
        local.dataReceived(b"answer")
        self.assertEqual(transport.value(), b"answer")

    def test_rawBytesHeldUntilLocalConnected(self):
        """
        Raw bytes behind register_resp, in the same read and later, wait
        for the local connection and are delivered to it in order; then
        bytes flow both ways.
        """
        protocol, transport = self.dataChannel(jsonFrame(
            type="open_data_channel", local_port=8022, conn_id="c1"))
        transport.clear()
        protocol.dataReceived(frame(OK) + b"\x00\x00\x00\x02hi")
        protocol.dataReceived(b" GET /")
        [index] = self.localAttempts()
        local, localTransport = self.complete(index)
        self.assertEqual(localTransport.value(), b"\x00\x00\x00\x02hi GET /")
        self.assertIs(localTransport.producer, transport)
        self.assertIs(transport.producer, localTransport)
        self.assertEqual(transport.producerState, "producing")
        local.dataReceived(b"HTTP/1.0 200 OK\r\n")
        self.assertEqual(transport.value(), b"HTTP/1.0 200 OK\r\n")
        protocol.dataReceived(b"more")
        self.assertEqual(localTransport.value(), b"\x00\x00\x00\x02hi GET /more")

    def test_localConnectFails(self):
        """When the local service cannot be reached, the data channel is closed."""
        protocol, transport = self.dataChannel(jsonFrame(
            type="open_data_channel", local_port=8022, conn_id="c1"))
        transport.clear()
        protocol.dataReceived(frame(OK) + b"lost bytes")
        [index] = self.localAttempts()
        self.refuse(index)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_refusedDataChannel(self):
        """
        A data channel the server refuses is closed, and so is its local
        connection when the data channel is gone; still connecting, that is
        cancelled.
        """
        protocol, transport = self.dataChannel(jsonFrame(
            type="open_data_channel", local_port=8022, conn_id="c1"))
        protocol.dataReceived(frame(
            b'{"type":"register_resp","status":"fail",'
            b'"reason":"no user is waiting for this data channel"}'))
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        [index] = self.localAttempts()
        self.assertTrue(self.reactor.connectors[index].stoppedConnecting)

    def test_refusedDataChannelClosesLocal(self):
        """A refused data channel closes a local connection already made."""
        protocol, transport = self.dataChannel(jsonFrame(
            type="open_data_channel", local_port=8022, conn_id="c1"))
        [index] = self.localAttempts()
        local, localTransport = self.complete(index)
        protocol.dataReceived(frame(
            b'{"type":"register_resp","status":"fail","reason":"no"}'))
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(localTransport.disconnecting)
        self.assertEqual(localTransport.value(), b"")

    def test_serverUnreachableClosesLocal(self):
        """
        A data channel that cannot reach the server takes its local
        connection down: cancelled while connecting, closed once made.
        """
        channel, _ = self.registered()
        channel.dataReceived(jsonFrame(type="open_data_channel", local_port=8022, conn_id="a")
                             + jsonFrame(type="open_data_channel", local_port=8022,
                                         conn_id="b"))
        first, second = self.serverAttempts(DataChannelFactory)
        localFirst, localSecond = self.localAttempts()
        self.refuse(first)
        self.assertTrue(self.reactor.connectors[localFirst].stoppedConnecting)
        _, localTransport = self.complete(localSecond)
        self.refuse(second)
        self.assertTrue(localTransport.disconnecting)
        self.assertFalse(self.reactor.connectors[localSecond].stoppedConnecting)

    def test_localRefusedClosesDataChannelAtOnce(self):
        """
        A local service that refuses closes the data channel at once, even
        before the server has answered it: the server then closes the user.
        """
        protocol, transport = self.dataChannel(jsonFrame(
            type="open_data_channel", local_port=8022, conn_id="c1"))
        [index] = self.localAttempts()
        self.refuse(index)
        self.assertTrue(transport.disconnecting)

    def test_localRefusedBeforeDataChannelUp(self):
        """
        A local service that refuses before the data channel is connected:
        the data channel still says which user it is for, so that the server
        closes that user now rather than after its timeout, then closes.
        """
        channel, _ = self.registered()
        channel.dataReceived(jsonFrame(type="open_data_channel", local_port=8022,
                                       conn_id="c1"))
        [server] = self.serverAttempts(DataChannelFactory)
        [local] = self.localAttempts()
        self.refuse(local)
        _, transport = self.complete(server)
        self.assertIn(b'"conn_id":"c1"', transport.value())
        self.assertTrue(transport.disconnecting)

    def test_localClosedBeforeSplice(self):
        """A local connection lost before the splice closes its data channel."""
        protocol, transport = self.dataChannel(jsonFrame(
            type="open_data_channel", local_port=8022, conn_id="c1"))
        [index] = self.localAttempts()
        local, _ = self.complete(index)
        local.connectionLost(Failure(error.ConnectionLost()))
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(frame(OK) + b"nowhere")
        self.assertEqual(transport.value().count(b"data_channel"), 1)

    def test_lostClosesLocalConnected(self):
        """A data channel lost before the splice closes its local connection."""
        protocol, _ = self.dataChannel(jsonFrame(
            type="open_data_channel", local_port=8022, conn_id="c1"))
        [index] = self.localAttempts()
        _, localTransport = self.complete(index)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(localTransport.disconnecting)

    def test_earlyLocalConnectionsCapped(self):
        """
        Past EARLY_LOCAL_CONNECTS local connections ahead of the server's
        answer, a data channel's local connection waits for register_resp;
        a splice, or a failure, frees its place for the next one.
        """
        channel, _ = self.registered()
        burst = EARLY_LOCAL_CONNECTS + 2
        channel.dataReceived(b"".join(
            jsonFrame(type="open_data_channel", local_port=8022, conn_id=f"c{n}")
            for n in range(burst)))
        servers = self.serverAttempts(DataChannelFactory)
        self.assertEqual(len(servers), burst)
        self.assertEqual(len(self.localAttempts()), EARLY_LOCAL_CONNECTS)
        channels = [self.complete(index) for index in servers]

        late, lateTransport = channels[-1]
        late.dataReceived(frame(OK))
        [*early, lateLocal] = self.localAttempts()
        self.assertEqual(len(early), EARLY_LOCAL_CONNECTS)
        self.assertEqual(lateTransport.producerState, "paused")
        _, lateLocalTransport = self.complete(lateLocal)
        self.assertIs(lateLocalTransport.producer, lateTransport)

        first, _ = channels[0]
        self.complete(early[0])
        first.dataReceived(frame(OK))
        self.refuse(early[1])
        channel.dataReceived(jsonFrame(type="open_data_channel", local_port=8022, conn_id="d1")
                             + jsonFrame(type="open_data_channel", local_port=8022,
                                         conn_id="d2")
                             + jsonFrame(type="open_data_channel", local_port=8022,
                                         conn_id="d3"))
        self.assertEqual(len(self.localAttempts()), EARLY_LOCAL_CONNECTS + 1 + 2)

    def test_lostWhileConnectingLocal(self):
        """A data channel lost before the local connection is made cancels that connect."""
        protocol, _ = self.dataChannel(jsonFrame(
            type="open_data_channel", local_port=8022, conn_id="c1"))
        protocol.dataReceived(frame(OK))
        [index] = self.localAttempts()
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(self.reactor.connectors[index].stoppedConnecting)

    def test_serverUnreachableForDataChannel(self):
        """A data channel that cannot reach the server is logged; the control channel stays."""
        events = self.logged()
        channel, transport = self.registered()
        channel.dataReceived(jsonFrame(type="open_data_channel", local_port=8022,
                                       conn_id="c1"))
        [index] = self.serverAttempts(DataChannelFactory)
        self.refuse(index)
        self.assertTrue(any(e.get("log_format", "").startswith("cannot open a data channel")
                            for e in events))
        self.assertFalse(transport.disconnecting)


class PendingDataChannelTests(ClientTestCase):
    """
    A server that asks for data channels without end, or never answers
    them: max_pending_data_channels at once, the rest wait (to a limit,
    then are dropped), and each unanswered one times out.
    """

    def setUp(self):
        super().setUp()
        self.settings.max_pending_data_channels = 3
        self.channel, _ = self.registered()

    def ask(self, *connIds: str) -> None:
        self.channel.dataReceived(b"".join(
            jsonFrame(type="open_data_channel", local_port=8022, conn_id=c) for c in connIds))

    def asked(self) -> list[bytes]:
        """The conn_id of each data channel connect, in order, completing them."""
        found = []
        for index in self.serverAttempts(DataChannelFactory):
            _, _, factory, _, _ = self.reactor.tcpClients[index]
            found.append(innermost(factory).channel.request.conn_id)
        return found

    def test_capHoldsTheRestInOrder(self):
        """
        Past the cap no data channel connects; each answer, connect failure
        or close lets the next waiting request go, first come first served.
        """
        self.ask(*(f"c{n}" for n in range(6)))
        self.assertEqual(self.asked(), ["c0", "c1", "c2"])
        attempts = self.serverAttempts(DataChannelFactory)
        first, _ = self.complete(attempts[0])
        first.dataReceived(frame(OK))
        self.assertEqual(self.asked(), ["c0", "c1", "c2", "c3"])
        self.refuse(attempts[1])
        self.assertEqual(self.asked(), ["c0", "c1", "c2", "c3", "c4"])
        third, _ = self.complete(attempts[2])
        third.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.asked(), ["c0", "c1", "c2", "c3", "c4", "c5"])
        self.assertEqual(len(self.service.opening), 3)
        self.assertEqual(self.service.droppedRequests, 0)

    def test_unansweredDataChannelTimesOut(self):
        """
        A data channel the server accepts and never answers is aborted
        after register_timeout with a warning; its place goes to the next
        request.
        """
        events = self.logged()
        self.ask("c0", "c1", "c2", "c3")
        [index, *_] = self.serverAttempts(DataChannelFactory)
        protocol, transport = self.complete(index)
        self.reactor.advance(9.9)
        self.assertFalse(transport.disconnected)
        self.reactor.advance(0.1)
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(error.ConnectionAborted()))
        self.assertEqual(self.asked(), ["c0", "c1", "c2", "c3"])
        self.assertEqual(
            [formatEvent(e) for e in events
             if e.get("log_format", "").startswith("the server did not answer a data")],
            ["the server did not answer a data channel for 127.0.0.1:8022->10022 within 10 s; "
             "closing it"])

    def test_answeredInTimeStaysOpen(self):
        """register_resp ok cancels the timeout; the spliced channel stays open."""
        self.ask("c0")
        protocol, transport = self.complete(self.serverAttempts(DataChannelFactory)[0])
        protocol.dataReceived(frame(OK))
        self.reactor.advance(60)
        self.assertFalse(transport.disconnected)
        self.assertEqual(self.service.opening, set())

    def test_pooledChannelsWaitUntimed(self):
        """A pooled data channel waits for a user as long as the server likes."""
        self.channel.connectionLost(Failure(error.ConnectionDone()))
        channel, _ = self.control()
        channel.dataReceived(frame(b'{"type":"register_resp","status":"ok","pool":1}'))
        [index] = self.serverAttempts(DataChannelFactory)
        _, transport = self.complete(index)
        self.reactor.advance(60)
        self.assertFalse(transport.disconnected)

    def test_beyondTheWaitingLimitDropped(self):
        """
        Requests past the waiting limit are dropped and counted, with one
        line at once and then at most one per 10 s.
        """
        self.patch(datachannelrequests, "MAX_WAITING_DATA_CHANNEL_REQUESTS", 2)
        events = self.logged()

        def lines():
            return [formatEvent(e) for e in events
                    if e.get("log_format", "").startswith("dropped {count}")]

        self.ask(*(f"c{n}" for n in range(6)))
        self.assertEqual(self.service.droppedRequests, 1)
        self.assertEqual(lines(), [
            "dropped 1 requests for a data channel for 127.0.0.1:8022->10022 (1 in all): "
            "3 data channels are being opened and 2 requests wait; the server closes those "
            "users when it stops waiting for their data channels"])
        self.ask(*(f"d{n}" for n in range(500)))
        self.assertEqual(len(lines()), 1)
        self.reactor.advance(datachannelrequests.DROPPED_REQUESTS_LOG_INTERVAL)
        self.assertEqual(self.service.droppedRequests, 501)
        self.assertEqual(len(lines()), 2)
        self.assertIn("dropped 500 requests", lines()[1])
        self.assertIn("(501 in all)", lines()[1])
        self.reactor.advance(datachannelrequests.DROPPED_REQUESTS_LOG_INTERVAL)
        self.assertEqual(len(lines()), 2)
        self.assertEqual(len(self.service.waitingRequests), 2)
        self.assertEqual(len(self.serverAttempts(DataChannelFactory)), 3)

    def test_stopForgetsWaitingAndTheNextDropLine(self):
        """Stopping leaves no request waiting and no drop line to come."""
        self.patch(datachannelrequests, "MAX_WAITING_DATA_CHANNEL_REQUESTS", 1)
        self.ask(*(f"c{n}" for n in range(6)))
        call = self.service._droppedLogCall
        self.assertTrue(call.active())
        self.service.startService()
        self.service.stopService()
        self.assertFalse(call.active())
        self.assertEqual(len(self.service.waitingRequests), 0)

    def test_controlChannelLostForgetsWaiting(self):
        """The server forgets its users with the control channel; so do we."""
        self.ask(*(f"c{n}" for n in range(5)))
        self.channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(len(self.service.waitingRequests), 0)
        self.refuse(self.serverAttempts(DataChannelFactory)[0])
        self.assertEqual(self.asked(), ["c0", "c1", "c2"])


class GoPeerTests(ClientTestCase):
    """A client set up as in the Go capture says what the Go client said."""

    token = "demo-token"
    name = "demo-client"
    mapping = Mapping("127.0.0.1", 31003, 31004)

    def test_registerIsGoBytes(self):
        """Our register frame is the Go client's, byte for byte."""
        _, transport = self.control()
        self.assertEqual(transport.value(), GO_REGISTER)

    def test_dataChannelIsGoBytes(self):
        """
        Asked by the Go server's open_data_channel (no conn_id), our
        data_channel frame is the Go client's, byte for byte.
        """
        _, transport = self.dataChannel(GO_OPEN_DATA_CHANNEL)
        self.assertEqual(transport.value(), GO_DATA_CHANNEL)


class HealthProbeTests(ClientTestCase):
    def probe(self, up: bool) -> None:
        """Run one probe of the local service, which answers or not."""
        done = self.service.probeLocalService()
        [*_, index] = self.localAttempts(_ProbeFactory)
        if up:
            _, transport = self.complete(index)
            self.assertTrue(transport.disconnecting, "probe connection left open")
        else:
            self.refuse(index)
        self.successResultOf(done)

    def test_downThenUp(self):
        """
        A failing probe sends offline_port; a succeeding one after it sends
        online_port; an unchanged state sends nothing.
        """
        _, transport = self.registered()
        self.probe(up=True)
        self.assertEqual(transport.value(), b"")
        self.probe(up=False)
        self.assertEqual(transport.value(), frame(b'{"type":"offline_port","port":10022}'))
        transport.clear()
        self.probe(up=False)
        self.assertEqual(transport.value(), b"")
        self.probe(up=True)
        self.assertEqual(transport.value(), frame(b'{"type":"online_port","port":10022}'))
        transport.clear()
        self.probe(up=True)
        self.assertEqual(transport.value(), b"")

    def test_downBeforeRegistered(self):
        """A service found down before registration is reported offline right after it."""
        self.probe(up=False)
        channel, transport = self.control()
        transport.clear()
        channel.dataReceived(frame(OK))
        self.assertEqual(transport.value(), frame(b'{"type":"offline_port","port":10022}'))

    def test_probeEveryInterval(self):
        """The running service probes at once, then every health_check_interval."""
        self.service.startService()
        [first] = self.localAttempts(_ProbeFactory)
        self.complete(first)
        self.reactor.advance(self.settings.health_check_interval - 0.5)
        self.assertEqual(self.localAttempts(_ProbeFactory), [first])
        self.reactor.advance(0.5)
        self.assertEqual(len(self.localAttempts(_ProbeFactory)), 2)


class SecretTests(ClientTestCase):
    def test_tokenNeverLogged(self):
        """
        The token appears in no log event across reconnecting, refusal,
        registration, heartbeats, data channels and probes.
        """
        events = self.logged()
        self.service.startService()
        [index] = self.serverAttempts()
        self.refuse(index)
        self.reactor.advance(1.5)
        [*_, index] = self.serverAttempts()
        protocol, _ = self.complete(index)
        protocol.dataReceived(frame(AUTH_FAILED))
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.reactor.advance(20)
        [*_, index] = self.serverAttempts()
        protocol, _ = self.complete(index)
        protocol.dataReceived(frame(OK) + jsonFrame(type="open_data_channel",
                                                    local_port=8022, conn_id="c1"))
        [data] = self.serverAttempts(DataChannelFactory)
        dataProtocol, _ = self.complete(data)
        dataProtocol.dataReceived(frame(OK))
        self.refuse(self.localAttempts()[-1])
        self.refuse(self.localAttempts(_ProbeFactory)[-1])
        self.reactor.advance(40)

        formats = [e.get("log_format", "") for e in events]
        for expected in ("reconnecting", "Scheduling retry", "registered",
                         "no pong", "local service", "{line}"):
            self.assertTrue(any(f.startswith(expected) for f in formats),
                            f"no {expected!r} event among {formats}")
        for event in events:
            text = formatEvent(event) + repr(
                {k: v for k, v in event.items() if not k.startswith("log_")})
            self.assertNotIn(TOKEN, text)


class ReportTests(unittest.TestCase):
    def test_formatServerUnreachable(self):
        """
        Error 1001 reads as the Go client's line, with the server's address
        after the description and the detail after a colon.
        """
        self.assertEqual(report.formatError(1001, "Connection refused"),
                         "[ERROR][1001] Failed to connect to server: Connection refused")
        self.assertEqual(report.formatError(1001),
                         "[ERROR][1001] Failed to connect to server")
        self.assertEqual(report.formatError(1001, "Connection refused",
                                            address="127.0.0.1:17000"),
                         "[ERROR][1001] Failed to connect to server 127.0.0.1:17000: "
                         "Connection refused")

    def test_formatAuthenticationFailed(self):
        """Error 1002 reads as the Go client's line."""
        self.assertEqual(report.formatError(report.AUTHENTICATION_FAILED),
                         "[ERROR][1002] Authentication failed, please check token")

    def test_reportWritesRealStderr(self):
        """reportError writes one line on the process's real standard error."""
        stream = io.StringIO()
        self.patch(sys, "__stderr__", stream)
        report.reportError(report.SERVER_UNREACHABLE, "timeout", address="[::1]:17000",
                           when=START)
        self.assertEqual(stream.getvalue(), f"{formatTime(START)} [ERROR][1001] Failed to "
                         "connect to server [::1]:17000: timeout\n")

    def test_reportStampedNow(self):
        """Without a time given, the line has the current time, as the log has."""
        stream = io.StringIO()
        self.patch(sys, "__stderr__", stream)
        self.patch(report.time, "time", lambda: START + 0.75)
        report.reportError(report.AUTHENTICATION_FAILED)
        self.assertEqual(stream.getvalue(), f"{formatTime(START)} {AUTH_LINE}")

    def test_serverAddress(self):
        """The address in 1001: the endpoint's host and port, through a TLS wrapper."""
        from twisted.internet.endpoints import HostnameEndpoint, clientFromString

        reactor = MemoryReactorClock()
        self.assertEqual(serverAddress(clientFromString(reactor, "tcp:127.0.0.1:17000")),
                         "127.0.0.1:17000")
        self.assertEqual(serverAddress(clientFromString(reactor, "tls:tunnel.example:17001")),
                         "tunnel.example:17001")
        self.assertEqual(serverAddress(HostnameEndpoint(reactor, "::1", 17002)),
                         "[::1]:17002")
        self.assertIsNone(serverAddress(object()))

"""
Each role of a connection to the control port (gotunnel.server.channelstates), on
a memory reactor and string transports: the messages it refuses, with the
protocol error line and the connection closed, and the moves from one role
to the next.
"""

from __future__ import annotations

import itertools

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from gotunnel.server import channelstates
from gotunnel.wire import messages
from gotunnel.config.settings import ServerSettings
from gotunnel.server.channel import ServerChannel, ServerChannelFactory
from gotunnel.server.publicusers import PublicUser
from gotunnel.server.registry import TunnelRegistry

from tests.support import LogWatcher, frame
from tests.test_udp import UDPReactor

TOKEN = "s3cret-Token-0xC0FFEE"
REMOTE_PORT = 10022
UDP_PORT = 10053


def register(**fields) -> messages.Register:
    return messages.Register(**dict(dict(local_port=22, remote_port=REMOTE_PORT, token=TOKEN,
                                         name="edge-1"), **fields))


def dataChannel(**fields) -> messages.DataChannel:
    return messages.DataChannel(**dict(dict(local_port=22, remote_port=REMOTE_PORT, protocol="",
                                            token=TOKEN, name="edge-1"), **fields))


EVERY_MESSAGE = (
    register(), dataChannel(conn_id="conn-1"), messages.Ping(time=1),
    messages.OfflinePort(port=REMOTE_PORT), messages.OnlinePort(port=REMOTE_PORT),
    messages.Pong(time=1), messages.RegisterResp(status="ok"),
    messages.OpenDataChannel(local_port=22, conn_id="conn-1"),
)
"""One message of each type a peer can send."""

NOT_FROM_A_CLIENT = {
    "pong": "unexpected pong message",
    "register_resp": "unexpected register_resp message",
    "open_data_channel": "unexpected open_data_channel message",
}

BEFORE_REGISTER = {
    "ping": "ping before a successful register",
    "offline_port": "offline_port before a successful register",
    "online_port": "online_port before a successful register",
}


def alreadyA(role: str) -> dict[str, str]:
    return {kind: f"{kind} on a connection that is already a {role} channel"
            for kind in ("register", "data_channel")}


class ChannelStateTestCase(unittest.TestCase):
    """A registry on a memory reactor; connections to it on string transports."""

    def setUp(self):
        self.reactor = UDPReactor()
        self.reactor.advance(1000)
        self.settings = ServerSettings(token=TOKEN, public_interface="203.0.113.5",
                                       max_pool_count=2)
        self.registry = TunnelRegistry(self.settings, reactor=self.reactor)
        self.factory = ServerChannelFactory(self.registry)
        ids = itertools.count(1)
        self.patch(self.registry, "newConnectionId", lambda: f"conn-{next(ids)}")
        self.peerPorts = itertools.count(40000)
        self.logs = LogWatcher(self)

    def connect(self) -> tuple[ServerChannel, StringTransport]:
        peer = IPv4Address("TCP", "192.0.2.10", next(self.peerPorts))
        transport = StringTransport(peerAddress=peer)
        channel = self.factory.buildProtocol(peer)
        channel.makeConnection(transport)
        return channel, transport

    def lose(self, channel: ServerChannel) -> None:
        channel.connectionLost(Failure(error.ConnectionDone()))

    def protocolErrors(self, channel: ServerChannel) -> list[str]:
        return [event["why"] for event in self.logs.matching(LogWatcher.formatted(
            "protocol error from {peer}: {why}; closing the connection",
            peer=channel.peerDescription))]

    def control(self, **fields) -> tuple[ServerChannel, StringTransport]:
        channel, transport = self.connect()
        channel.dataReceived(frame(register(**fields)))
        self.assertIsInstance(channel.state, channelstates.Control)
        transport.clear()
        return channel, transport

    def user(self, remote_port: int = REMOTE_PORT) -> tuple[PublicUser, StringTransport]:
        [(port, factory, _, _)] = [s for s in self.reactor.tcpServers if s[0] == remote_port]
        peer = IPv4Address("TCP", "198.51.100.99", next(self.peerPorts))
        user = factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        user.makeConnection(transport)
        return user, transport

    def pooled(self) -> tuple[ServerChannel, StringTransport]:
        channel, transport = self.connect()
        channel.dataReceived(frame(dataChannel(pooled=True)))
        self.assertIsInstance(channel.state, channelstates.Pooled)
        return channel, transport

    def data(self) -> tuple[ServerChannel, StringTransport, StringTransport]:
        """A data channel spliced to a user: the channel, its transport, the user's."""
        self.user()
        [conn_id] = self.registry.waitingUsers
        user = self.registry.waitingUsers[conn_id]
        channel, transport = self.connect()
        channel.dataReceived(frame(dataChannel(conn_id=conn_id)))
        self.assertIsInstance(channel.state, channelstates.Data)
        return channel, transport, user.transport

    def refusals(self, inState, sending) -> dict[str, tuple[list[str], bool]]:
        """
        For each message of L{EVERY_MESSAGE}, on a new channel brought to
        its state by C{inState}: the protocol errors logged for it and
        whether its connection was closed, once C{sending} delivered it.
        """
        seen = {}
        for message in EVERY_MESSAGE:
            channel, transport = inState()
            sending(channel, message)
            seen[message.type] = (self.protocolErrors(channel), transport.disconnecting)
        return seen

    def assertRefusesAll(self, inState, expected: dict[str, str], sending=None) -> None:
        if sending is None:
            def sending(channel, message):
                channel.dataReceived(frame(message))
        self.assertEqual(self.refusals(inState, sending),
                         {kind: ([why], True) for kind, why in expected.items()})


class HandshakeTests(ChannelStateTestCase):
    def test_refusesAllButAFirstFrame(self):
        """
        A new connection's first frame is register or data_channel: each
        other message is a protocol error that closes it, as before.
        """
        seen = self.refusals(self.connect, lambda channel, message: channel.dataReceived(
            frame(message)) if message.type not in ("register", "data_channel") else None)
        del seen["register"], seen["data_channel"]
        self.assertEqual(seen, {kind: ([why], True) for kind, why
                                in dict(BEFORE_REGISTER, **NOT_FROM_A_CLIENT).items()})

    def test_registerMakesAControlChannel(self):
        channel, transport = self.connect()
        self.assertIsInstance(channel.state, channelstates.Handshake)
        self.assertEqual(channel.role, "new")
        channel.dataReceived(frame(register()))
        self.assertIsInstance(channel.state, channelstates.Control)
        self.assertEqual(channel.role, "control")
        self.assertEqual(transport.value(), frame(messages.RegisterResp(status="ok", pool=2)))

    def test_dataChannelForAWaitingUser(self):
        """data_channel naming a waiting user: a data channel, spliced to that user."""
        self.control()
        channel, transport, userTransport = self.data()
        channel.dataReceived(b"service says hi")
        self.assertEqual(userTransport.value(), b"service says hi")

    def test_pooledDataChannel(self):
        self.control()
        channel, transport = self.pooled()
        self.assertEqual(channel.role, "pooled")
        self.assertEqual(self.registry.tunnels[REMOTE_PORT].pool, {channel: None})

    def test_multiplexedDataChannel(self):
        self.control(mux=1)
        channel, transport = self.connect()
        channel.dataReceived(frame(dataChannel(mux=1)))
        self.assertIsInstance(channel.state, channelstates.Mux)
        self.assertIs(self.registry.tunnels[REMOTE_PORT].muxSession, channel.mux)

    def test_udpCarrier(self):
        control, transport = self.connect()
        control.dataReceived(frame(register(remote_port=UDP_PORT, protocol="udp")))
        [answer] = [m for m in _frames(transport.value())]
        carrier, carrierTransport = self.connect()
        carrier.dataReceived(frame(dataChannel(remote_port=UDP_PORT, protocol="udp",
                                               conn_id=answer.conn_id)))
        self.assertIsInstance(carrier.state, channelstates.Udp)
        self.assertEqual(carrierTransport.value(), frame(messages.RegisterResp(status="ok")))

    def test_refusedDataChannel(self):
        """A data channel the registry refuses: answered fail, the channel refused."""
        self.control()
        channel, transport = self.connect()
        channel.dataReceived(frame(dataChannel(conn_id="nobody")))
        self.assertIsInstance(channel.state, channelstates.Refused)
        self.assertEqual(messages.parse(transport.value()[4:]).status, "fail")
        self.assertTrue(transport.disconnecting)

    def test_lostMakesItClosed(self):
        channel, transport = self.connect()
        self.lose(channel)
        self.assertIsInstance(channel.state, channelstates.Closed)
        self.assertEqual(channel.role, "closed")
        self.assertEqual(self.registry.pending, {})


class RegisteringTests(ChannelStateTestCase):
    """A register whose port the registry has not yet opened."""

    def setUp(self):
        super().setUp()
        self.opening: list[defer.Deferred] = []
        self.later: list = []
        register = self.registry.register

        def slowly(channel, msg):
            opened = defer.Deferred()
            self.later.append(lambda: register(channel, msg).chainDeferred(opened))
            return opened

        self.patch(self.registry, "register", slowly)

    def registering(self, **fields) -> tuple[ServerChannel, StringTransport]:
        channel, transport = self.connect()
        channel.dataReceived(frame(register(**fields)))
        self.assertIsInstance(channel.state, channelstates.Registering)
        self.assertEqual(channel.role, "registering")
        return channel, transport

    def test_refusesEverything(self):
        """Until the answer, every message is a protocol error that closes the connection."""
        self.assertRefusesAll(self.registering, dict(
            alreadyA("registering"), **BEFORE_REGISTER, **NOT_FROM_A_CLIENT))

    def test_registeredMakesAControlChannel(self):
        channel, transport = self.registering()
        self.assertEqual(transport.value(), b"")
        self.later.pop()()
        self.assertIsInstance(channel.state, channelstates.Control)
        self.assertEqual(transport.value(), frame(messages.RegisterResp(status="ok", pool=2)))

    def test_refusedMakesARefusedChannel(self):
        channel, transport = self.registering(token="wrong")
        self.later.pop()()
        self.assertIsInstance(channel.state, channelstates.Refused)
        self.assertEqual(transport.value(), frame(messages.RegisterResp(
            status="fail", reason="authentication failed")))
        self.assertTrue(transport.disconnecting)

    def test_lostWhileRegistering(self):
        """
        Gone before its port opened: the port opened for it is closed again
        when it opens, and nothing is written or logged as registered.
        """
        channel, transport = self.registering()
        self.lose(channel)
        self.assertIsInstance(channel.state, channelstates.Closed)
        self.later.pop()()
        self.assertEqual(self.registry.tunnels, {})
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.logs.matching(LogWatcher.formatted("client {name} registered")), [])

    def test_refusedAfterLost(self):
        """Refused once gone: nobody is told, nothing is logged."""
        channel, transport = self.registering(token="wrong")
        self.lose(channel)
        self.later.pop()()
        self.assertIsInstance(channel.state, channelstates.Closed)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.logs.matching(LogWatcher.formatted("refused registration")), [])


class ControlTests(ChannelStateTestCase):
    def test_refusesFirstFramesAndServerMessages(self):
        seen = self.refusals(self.control, lambda channel, message: channel.dataReceived(
            frame(message)) if message.type not in BEFORE_REGISTER else None)
        for kind in BEFORE_REGISTER:
            del seen[kind]
        self.assertEqual(seen, {kind: ([why], True) for kind, why
                                in dict(alreadyA("control"), **NOT_FROM_A_CLIENT).items()})

    def test_pingAnswered(self):
        channel, transport = self.control()
        channel.dataReceived(frame(messages.Ping(time=1)))
        self.assertEqual(transport.value(), frame(messages.Pong(time=1000)))
        self.assertIsInstance(channel.state, channelstates.Control)

    def test_offlineAndOnline(self):
        channel, transport = self.control()
        tunnel = self.registry.tunnels[REMOTE_PORT]
        channel.dataReceived(frame(messages.OfflinePort(port=REMOTE_PORT)))
        self.assertFalse(tunnel.online)
        channel.dataReceived(frame(messages.OnlinePort(port=REMOTE_PORT)))
        self.assertTrue(tunnel.online)
        self.assertIsInstance(channel.state, channelstates.Control)

    def test_lostClosesThePort(self):
        channel, transport = self.control()
        self.lose(channel)
        self.assertIsInstance(channel.state, channelstates.Closed)
        self.assertEqual(self.registry.tunnels, {})


class RefusedTests(ChannelStateTestCase):
    """
    A refused connection reads no more frames (it is paused or closing);
    its state refuses every message all the same.
    """

    def refused(self) -> tuple[ServerChannel, StringTransport]:
        channel, transport = self.connect()
        channel.dataReceived(frame(register(token="wrong")))
        self.assertIsInstance(channel.state, channelstates.Refused)
        return channel, transport

    def test_readsNothingMore(self):
        channel, transport = self.refused()
        channel.dataReceived(frame(messages.Ping(time=1)))
        self.assertEqual(self.protocolErrors(channel), [])

    def test_refusesEverything(self):
        self.assertRefusesAll(
            self.refused, dict(alreadyA("refused"), **BEFORE_REGISTER, **NOT_FROM_A_CLIENT),
            sending=lambda channel, message: channel.state.messageReceived(message))

    def test_admissionRefusal(self):
        """A connection over the caps on pending connections is refused at once."""
        self.settings.max_pending_total = 1
        self.connect()
        channel, transport = self.connect()
        self.assertIsInstance(channel.state, channelstates.Refused)
        self.assertTrue(transport.disconnecting)


class PooledTests(ChannelStateTestCase):
    def setUp(self):
        super().setUp()
        self.settings.max_pool_count = 20
        self.control()

    def test_refusesEveryFrame(self):
        """Any frame at all on a pooled channel, even one that does not parse."""
        self.assertRefusesAll(self.pooled, {message.type: "a frame on a pooled data channel"
                                            for message in EVERY_MESSAGE})
        channel, transport = self.pooled()
        channel.dataReceived(frame(b"not json"))
        self.assertEqual(self.protocolErrors(channel), ["a frame on a pooled data channel"])
        self.assertTrue(transport.disconnecting)

    def test_userMakesItAData(self):
        channel, transport = self.pooled()
        user, userTransport = self.user()
        self.assertIsInstance(channel.state, channelstates.Data)
        self.assertEqual(self.registry.tunnels[REMOTE_PORT].pool, {})
        channel.dataReceived(frame(register()))
        self.assertEqual(userTransport.value(), frame(register()))

    def test_lostLeavesThePool(self):
        channel, transport = self.pooled()
        self.lose(channel)
        self.assertIsInstance(channel.state, channelstates.Closed)
        self.assertEqual(self.registry.tunnels[REMOTE_PORT].pool, {})


class RawStateTests(ChannelStateTestCase):
    """Data, multiplexed and UDP carrying channels read no frames: their states refuse all."""

    def setUp(self):
        super().setUp()
        self.control()

    def everyMessage(self, role: str) -> dict[str, str]:
        return dict(alreadyA(role), **BEFORE_REGISTER, **NOT_FROM_A_CLIENT)

    def test_data(self):
        self.assertRefusesAll(lambda: self.data()[:2], self.everyMessage("data"),
                              sending=lambda channel, message: channel.state.messageReceived(
                                  message))

    def test_dataReadsNoFrames(self):
        """A frame on a data channel is the service's bytes, for the user."""
        channel, transport, userTransport = self.data()
        channel.dataReceived(frame(register()))
        self.assertEqual(userTransport.value(), frame(register()))
        self.assertEqual(self.protocolErrors(channel), [])

    def test_dataLost(self):
        channel, transport, userTransport = self.data()
        self.lose(channel)
        self.assertIsInstance(channel.state, channelstates.Closed)
        self.assertTrue(userTransport.disconnecting)

    def muxed(self) -> tuple[ServerChannel, StringTransport]:
        channel, transport = self.connect()
        channel.dataReceived(frame(dataChannel(mux=1)))
        self.assertIsInstance(channel.state, channelstates.Mux)
        return channel, transport

    def test_mux(self):
        self.registry.tunnels[REMOTE_PORT].muxAgreed = True
        refused = {}
        for message in EVERY_MESSAGE:
            self.registry.tunnels[REMOTE_PORT].muxSession = None
            channel, transport = self.muxed()
            channel.state.messageReceived(message)
            refused[message.type] = (self.protocolErrors(channel), transport.disconnecting)
        self.assertEqual(refused, {kind: ([why], True)
                                   for kind, why in self.everyMessage("mux").items()})

    def test_muxLost(self):
        self.registry.tunnels[REMOTE_PORT].muxAgreed = True
        channel, transport = self.muxed()
        self.lose(channel)
        self.assertIsInstance(channel.state, channelstates.Closed)
        self.assertIsNone(self.registry.tunnels[REMOTE_PORT].muxSession)

    def carrier(self) -> tuple[ServerChannel, StringTransport]:
        control, transport = self.connect()
        control.dataReceived(frame(register(remote_port=UDP_PORT, protocol="udp")))
        [answer] = _frames(transport.value())
        carrier, carrierTransport = self.connect()
        carrier.dataReceived(frame(dataChannel(remote_port=UDP_PORT, protocol="udp",
                                               conn_id=answer.conn_id)))
        self.assertIsInstance(carrier.state, channelstates.Udp)
        return carrier, carrierTransport

    def test_udp(self):
        self.assertRefusesAll(self.carrier, self.everyMessage("udp"),
                              sending=lambda channel, message: channel.state.messageReceived(
                                  message))

    def test_udpLost(self):
        channel, transport = self.carrier()
        tunnel = channel.tunnel
        self.lose(channel)
        self.assertIsInstance(channel.state, channelstates.Closed)
        self.assertIsNone(tunnel.carrierChannel)


class ClosedTests(ChannelStateTestCase):
    def test_refusesEverything(self):
        def closed():
            channel, transport = self.connect()
            self.lose(channel)
            return channel, transport

        self.assertRefusesAll(closed, dict(alreadyA("closed"), **BEFORE_REGISTER,
                                           **NOT_FROM_A_CLIENT),
                              sending=lambda channel, message: channel.state.messageReceived(
                                  message))


def _frames(data: bytes) -> list[messages.Message]:
    found = []
    while data:
        length = int.from_bytes(data[:4], "big")
        found.append(messages.parse(data[4:4 + length]))
        data = data[4 + length:]
    return found

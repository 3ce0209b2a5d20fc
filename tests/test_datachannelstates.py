"""
Each state of the client's data channel (gotunnel.client.datachannelstates), on a
memory reactor and string transports: the messages it refuses, with the
protocol error line and the connection closed, and the moves from one state
to the next as the server answers and the local service connects or fails.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gotunnel.client import datachannelstates
from gotunnel.wire import messages
from gotunnel.client.datachannel import (
    DataChannelClient, DataChannelFactory, LocalServiceConnection,
)

from tests.support import LogWatcher, frame
from tests.test_client import OK, ClientTestCase, innermost

EVERY_MESSAGE = (
    messages.Register(remote_port=10022), messages.RegisterResp(status="ok"),
    messages.Ping(time=1), messages.Pong(time=1),
    messages.OpenDataChannel(local_port=8022, conn_id="c1"),
    messages.DataChannel(remote_port=10022, conn_id="c1"),
    messages.OfflinePort(port=10022), messages.OnlinePort(port=10022),
)
"""One message of each type a peer can send."""

REFUSED = frame(b'{"type":"register_resp","status":"fail","reason":"no user is waiting"}')


class DataChannelStateTestCase(ClientTestCase):
    """A registered mapping on a memory reactor; its data channels on string transports."""

    def setUp(self):
        super().setUp()
        self.logs = LogWatcher(self)
        self.control, _ = self.registered()

    def open(self, conn_id: str = "c1") -> DataChannelClient:
        """The data channel the server asks for with C{conn_id}, still connecting."""
        self.control.dataReceived(frame(messages.OpenDataChannel(local_port=8022,
                                                                 conn_id=conn_id)))
        index = self.serverAttempts(DataChannelFactory)[-1]
        return innermost(self.reactor.tcpClients[index][2]).channel

    def connected(self, channel: DataChannelClient):
        """Let C{channel}'s connection to the server succeed; its transport."""
        [index] = [i for i in self.serverAttempts(DataChannelFactory)
                   if innermost(self.reactor.tcpClients[i][2]).channel is channel]
        _, transport = self.complete(index)
        return transport

    def localUp(self) -> tuple[LocalServiceConnection, object]:
        """Let the latest connection to the local service succeed."""
        return self.complete(self.localAttempts()[-1])

    def localRefused(self) -> None:
        self.refuse(self.localAttempts()[-1])

    def protocolErrors(self) -> list[str]:
        """The protocol errors logged since the last call (every channel has the same peer)."""
        events, self.logs.items = self.logs.items, []
        return [event["why"] for event in events if LogWatcher.formatted(
            "protocol error from {peer}: {why}; closing the connection")(event)]

    def asking(self):
        channel = self.open()
        transport = self.connected(channel)
        self.assertIsInstance(channel.state, datachannelstates.Asking)
        return channel, transport

    def answered(self):
        channel, transport = self.asking()
        channel.dataReceived(frame(OK))
        self.assertIsInstance(channel.state, datachannelstates.Answered)
        return channel, transport

    def spliced(self):
        channel, transport = self.answered()
        local, localTransport = self.localUp()
        self.assertIsInstance(channel.state, datachannelstates.Spliced)
        return channel, transport, localTransport

    def assertRefusesAll(self, inState, sending) -> None:
        """
        On a new channel brought to its state by C{inState}, each message
        delivered by C{sending} is logged as unexpected and closes it.
        """
        seen = {}
        for message in EVERY_MESSAGE:
            channel, transport = inState()[:2]
            self.protocolErrors()
            sending(channel, message)
            seen[message.type] = (self.protocolErrors(), transport.disconnecting)
        self.assertEqual(seen, {message.type: ([f"unexpected {message.type} message"], True)
                                for message in EVERY_MESSAGE})


def onTheWire(channel: DataChannelClient, message: messages.Message) -> None:
    channel.dataReceived(frame(message))


def toTheState(channel: DataChannelClient, message: messages.Message) -> None:
    channel.state.messageReceived(message)


class ConnectingTests(DataChannelStateTestCase):
    def test_connectedAsks(self):
        """Once connected, the channel sends data_channel and awaits the answer."""
        channel = self.open("c9")
        self.assertIsInstance(channel.state, datachannelstates.Connecting)
        transport = self.connected(channel)
        self.assertIsInstance(channel.state, datachannelstates.Asking)
        self.assertEqual(messages.parse(transport.value()[4:]).conn_id, "c9")
        self.assertFalse(transport.disconnecting)

    def test_localFailsWhileConnecting(self):
        """
        The local service refuses before the data channel is up: the
        channel still tells the server which user it was for, then closes.
        """
        channel = self.open()
        self.localRefused()
        self.assertIsInstance(channel.state, datachannelstates.ConnectingWithoutLocal)
        transport = self.connected(channel)
        self.assertEqual(messages.parse(transport.value()[4:]).conn_id, "c1")
        self.assertTrue(transport.disconnecting)

    def test_cannotConnect(self):
        """No connection to the server: closed, and the local connection given up."""
        channel = self.open()
        [local] = self.localAttempts()
        self.refuse(self.serverAttempts(DataChannelFactory)[-1])
        self.assertIsInstance(channel.state, datachannelstates.Closed)
        self.assertTrue(self.reactor.connectors[local].stoppedConnecting)
        self.assertEqual(self.service.opening, set())


class AskingTests(DataChannelStateTestCase):
    def test_refusesAllButTheAnswer(self):
        """Every message but register_resp is unexpected: logged, and the channel closed."""
        seen = {}
        for message in EVERY_MESSAGE:
            if message.type == "register_resp":
                continue
            channel, transport = self.asking()
            self.protocolErrors()
            onTheWire(channel, message)
            seen[message.type] = (self.protocolErrors(), transport.disconnecting)
        self.assertEqual(seen, {message.type: ([f"unexpected {message.type} message"], True)
                                for message in EVERY_MESSAGE if message.type != "register_resp"})

    def test_okBeforeTheLocalService(self):
        """Accepted before the local service is up: reading waits for the splice."""
        channel, transport = self.answered()
        self.assertEqual(transport.producerState, "paused")

    def test_okAfterTheLocalService(self):
        """Accepted with the local connection already up: spliced at once."""
        channel, transport = self.asking()
        local, localTransport = self.localUp()
        self.assertIsInstance(channel.state, datachannelstates.Asking)
        channel.dataReceived(frame(OK) + b"user says hi")
        self.assertIsInstance(channel.state, datachannelstates.Spliced)
        self.assertEqual(localTransport.value(), b"user says hi")

    def test_refused(self):
        """Refused: closed, and the local connection made for the user abandoned."""
        channel, transport = self.asking()
        local, localTransport = self.localUp()
        channel.dataReceived(REFUSED)
        self.assertIsInstance(channel.state, datachannelstates.Refused)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(localTransport.disconnecting)

    def test_localFails(self):
        """The local service refuses while the server answers: the channel closes."""
        channel, transport = self.asking()
        self.localRefused()
        self.assertIsInstance(channel.state, datachannelstates.Asking)
        self.assertTrue(transport.disconnecting)


class AnsweredTests(DataChannelStateTestCase):
    def test_refusesEverything(self):
        self.assertRefusesAll(self.answered, toTheState)

    def test_readsNoFrames(self):
        """After the answer, a frame is the user's bytes, passed on once spliced."""
        channel, transport = self.answered()
        onTheWire(channel, messages.Ping(time=1))
        self.assertEqual(self.protocolErrors(), [])
        local, localTransport = self.localUp()
        self.assertIsInstance(channel.state, datachannelstates.Spliced)
        self.assertEqual(localTransport.value(), frame(messages.Ping(time=1)))

    def test_localFails(self):
        channel, transport = self.answered()
        self.localRefused()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(channel.endedBy, "refused")

    def test_lostReplacesAPooledChannel(self):
        """A pooled channel answered and lost before the splice is replaced in the pool."""
        self.service.poolSize = 1
        self.service.fillPool()
        [channel] = self.service.pool
        self.connected(channel)
        channel.dataReceived(frame(OK))
        self.assertIsInstance(channel.state, datachannelstates.Answered)
        attempts = len(self.serverAttempts(DataChannelFactory))
        channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertIsInstance(channel.state, datachannelstates.Closed)
        self.assertEqual(len(self.serverAttempts(DataChannelFactory)), attempts + 1)


class SplicedTests(DataChannelStateTestCase):
    def test_refusesEverything(self):
        self.assertRefusesAll(self.spliced, toTheState)

    def test_relays(self):
        channel, transport, localTransport = self.spliced()
        channel.dataReceived(frame(messages.Ping(time=1)))
        self.assertEqual(localTransport.value(), frame(messages.Ping(time=1)))
        self.assertEqual(self.protocolErrors(), [])

    def test_lostClosesTheLocalConnection(self):
        channel, transport, localTransport = self.spliced()
        channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertIsInstance(channel.state, datachannelstates.Closed)
        self.assertTrue(localTransport.disconnecting)
        self.assertEqual(channel.endedBy, "user closed")


class RefusedTests(DataChannelStateTestCase):
    def refused(self):
        channel, transport = self.asking()
        channel.dataReceived(REFUSED)
        self.assertIsInstance(channel.state, datachannelstates.Refused)
        return channel, transport

    def test_refusesEverything(self):
        self.assertRefusesAll(self.refused, toTheState)


class ClosedTests(DataChannelStateTestCase):
    def closed(self):
        channel, transport = self.asking()
        channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertIsInstance(channel.state, datachannelstates.Closed)
        return channel, transport

    def test_refusesEverything(self):
        self.assertRefusesAll(self.closed, toTheState)

    def test_lateLocalConnectionClosed(self):
        """A local connection that completes after the channel ended is closed."""
        channel, transport = self.closed()
        local = LocalServiceConnection(channel)
        local.transport = StringTransport()
        channel.localConnected(local)
        self.assertTrue(local.transport.disconnecting)
        self.assertIsNone(channel.local)

"""
Pooled data channels: the client opens them ahead of its users, the server
keeps them per mapping and hands each new user one at once.  The server
offers a pool in its answer to register; a Go server offers none and gets
none, and a Go client never sends one.

Unit tests on memory reactors for each side, then the whole path over
loopback sockets (bytes verified, with and without zero copy).
"""

from __future__ import annotations

import json
import socket

from twisted.internet import defer
from twisted.trial import unittest

import gotunnel.server.channel
from gotunnel.wire import messages
from gotunnel.client.datachannel import DataChannelClient, DataChannelFactory
from gotunnel.client.pool import (
    POOL_REFILL_DELAY, POOL_REFUSALS_IN_A_ROW, POOL_REPLACE_DELAY,
)
from gotunnel.config.settings import ClientPolicy
from gotunnel.relay.splice import IDLE_KEEPALIVE
from tests import test_client as client
from tests import test_server as server
from tests.support import (
    Tunnel, connectUser, echoedThrough, listenTarget, randomBytes, waitUntil, within,
)

WAIT = 30
"""Seconds any one step over real sockets may take, even on a loaded machine."""


def decoded(data: bytes) -> list[dict]:
    """The JSON bodies of the frames in C{data}."""
    bodies = []
    while data:
        length = int.from_bytes(data[:4], "big")
        bodies.append(json.loads(data[4:4 + length]))
        data = data[4 + length:]
    return bodies


def pooledDataChannel(remote_port: int = 10022, token: str = server.TOKEN) -> bytes:
    return server.jsonFrame(type="data_channel", local_port=22, remote_port=remote_port,
                            protocol="", token=token, name="edge-1", pooled=True)


class PoolMessageTests(unittest.TestCase):
    def test_fieldsOnTheWire(self):
        """
        pool goes at the end of register_resp and pooled at the end of
        data_channel, each left out when unset, as Go leaves out nothing it
        knows of.
        """
        self.assertEqual(messages.encode(messages.RegisterResp(status="ok", pool=8)),
                         b'{"type":"register_resp","status":"ok","pool":8}')
        self.assertEqual(messages.encode(messages.RegisterResp(status="ok")),
                         b'{"type":"register_resp","status":"ok"}')
        self.assertEqual(
            messages.encode(messages.DataChannel(local_port=22, remote_port=10022, token="t",
                                                 name="n", pooled=True)),
            b'{"type":"data_channel","local_port":22,"remote_port":10022,"protocol":"",'
            b'"token":"t","name":"n","pooled":true}')

    def test_absentOrNullIsUnset(self):
        """A Go peer's frames, without the fields or with null, parse as unset."""
        for body in (b'{"type":"register_resp","status":"ok"}',
                     b'{"type":"register_resp","status":"ok","pool":null}'):
            self.assertIsNone(messages.parse(body).pool)
        self.assertIsNone(messages.parse(b'{"type":"data_channel","pooled":null}').pooled)

    def test_wrongTypesRefused(self):
        """pool must be a whole number in range, pooled a boolean."""
        for body, why in (
                (b'{"type":"register_resp","pool":"8"}', "register_resp.pool must be an integer"),
                (b'{"type":"register_resp","pool":true}', "register_resp.pool must be an integer"),
                (b'{"type":"register_resp","pool":-1}', "register_resp.pool must be from 0"),
                (b'{"type":"register_resp","pool":1025}', "register_resp.pool must be from 0"),
                (b'{"type":"data_channel","pooled":1}', "data_channel.pooled must be true or false"),
                (b'{"type":"data_channel","pooled":"yes"}',
                 "data_channel.pooled must be true or false")):
            with self.assertRaises(messages.ProtocolError) as caught:
                messages.parse(body)
            self.assertTrue(str(caught.exception).startswith(why), (body, str(caught.exception)))


class ServerPoolTests(server.ServerTestCase):
    def pooled(self, remote_port: int = 10022) -> server.Connection:
        """A pooled data channel the server has taken into the pool."""
        data = self.connect()
        data.send(pooledDataChannel(remote_port))
        self.assertEqual(data.sent(), b"")
        self.assertFalse(data.transport.disconnecting)
        return data

    def test_registerOffersThePool(self):
        """The answer to register says how many data channels the server pools."""
        control = self.connect()
        control.send(server.register())
        self.assertEqual(decoded(control.sent()),
                         [{"type": "register_resp", "status": "ok", "pool": 8}])

    def test_noPoolAnswersAsGo(self):
        """With max_pool_count 0 the answer to register is the Go server's, byte for byte."""
        self.settings.max_pool_count = 0
        control = self.connect()
        control.send(server.register())
        self.assertEqual(control.sent(), server.frame(server.OK))

    def test_userTakesAPooledChannel(self):
        """
        A user arriving while a pooled channel waits gets it at once: the
        answer goes on the pooled channel, nothing on the control channel,
        and bytes flow both ways, the user's early ones first.
        """
        control = self.registered()
        data = self.pooled()
        user = self.connectUser()
        self.assertEqual(control.sent(), b"")
        user.protocol.dataReceived(b"early ")
        self.assertEqual(data.sent(), server.frame(server.OK) + b"early ")
        data.send(b"banner")
        self.assertEqual(user.transport.value(), b"banner")
        self.assertEqual(self.registry.tunnels[10022].pool, {})
        self.assertEqual(data.channel.role, "data")

    def test_answerCarriesWhatTheUserSent(self):
        """
        A user handed a pooled channel: what its socket already holds goes
        to the client in the same write as the answer.
        """
        self.registered()
        data = self.pooled()
        writes: list[bytes] = []
        write = data.transport.write
        self.patch(data.transport, "write", lambda b: (writes.append(b), write(b)))
        self.patch(gotunnel.server.channel, "readWaiting", lambda transport: b"SSH-2.0-OpenSSH_9.2\r\n")
        self.connectUser()
        self.assertEqual(writes, [server.frame(server.OK) + b"SSH-2.0-OpenSSH_9.2\r\n"])

    def test_firstInFirstOut(self):
        """Pooled channels are handed out in the order they came."""
        self.registered()
        first, second = self.pooled(), self.pooled()
        self.connectUser()
        self.assertEqual(first.sent(), server.frame(server.OK))
        self.assertEqual(second.sent(), b"")

    def test_emptyPoolFallsBackToAsking(self):
        """Once the pool is used up, the next user is announced with open_data_channel."""
        control = self.registered()
        self.pooled()
        self.connectUser()
        self.connectUser()
        self.assertEqual(control.sent(), server.openDataChannel("conn-1"))

    def test_poolIsBounded(self):
        """A pooled channel over max_pool_count is refused with a reason; the pool keeps its own."""
        self.settings.max_pool_count = 2
        self.registered()
        self.pooled()
        self.pooled()
        extra = self.connect()
        extra.send(pooledDataChannel())
        self.assertEqual(extra.sent(), server.fail(
            "the pool of port 10022 already holds 2 data channels"))
        self.assertTrue(extra.transport.disconnecting)
        self.assertEqual(len(self.registry.tunnels[10022].pool), 2)

    def test_serverWithoutPoolRefuses(self):
        """With max_pool_count 0 a pooled channel is refused, saying so."""
        self.settings.max_pool_count = 0
        self.registered()
        data = self.connect()
        data.send(pooledDataChannel())
        self.assertEqual(data.sent(), server.fail("this server keeps no pooled data channels"))

    def test_unknownPortRefused(self):
        """A pooled channel for a port nobody registered is refused."""
        self.registered()
        data = self.connect()
        data.send(pooledDataChannel(remote_port=10023))
        self.assertEqual(data.sent(), server.fail("no mapping of port 10023 to pool for"))

    def test_wrongTokenRefused(self):
        """A pooled channel with a wrong token is refused as any data channel is, and never pooled."""
        self.registered()
        data = self.connect()
        data.send(pooledDataChannel(token=server.WRONG_TOKEN))
        self.reactor.advance(self.settings.auth_failure_delay_max)
        self.assertEqual(data.sent(), server.fail("authentication failed"))
        self.assertEqual(self.registry.tunnels[10022].pool, {})

    def test_closedChannelLeavesThePool(self):
        """A pooled channel that closes leaves the pool: the next user is announced instead."""
        control = self.registered()
        data = self.pooled()
        data.lose()
        self.assertEqual(self.registry.tunnels[10022].pool, {})
        self.connectUser()
        self.assertEqual(control.sent(), server.openDataChannel("conn-1"))

    def test_frameOnAPooledChannel(self):
        """Any frame on a pooled channel is a protocol error: it is closed and leaves the pool."""
        self.registered()
        data = self.pooled()
        data.send(server.jsonFrame(type="ping", time=1))
        self.assertTrue(data.transport.disconnecting)
        data.lose()
        self.assertEqual(self.registry.tunnels[10022].pool, {})

    def test_partialFrameIsNotHandedAUser(self):
        """
        A pooled channel holding the start of a frame is closed when a user
        comes, and the user gets the next pooled channel.
        """
        self.registered()
        broken, good = self.pooled(), self.pooled()
        broken.send(b"\x00\x00\x00\x10{")
        self.connectUser()
        self.assertEqual(broken.sent(), b"")
        self.assertTrue(broken.transport.disconnecting)
        self.assertEqual(good.sent(), server.frame(server.OK))

    def test_controlLostClosesThePool(self):
        """When the control channel goes, so do its pooled channels."""
        control = self.registered()
        first, second = self.pooled(), self.pooled()
        control.lose()
        self.assertTrue(first.transport.disconnecting)
        self.assertTrue(second.transport.disconnecting)

    def test_otherClientsMappingRefused(self):
        """With listed clients, a pooled channel may only join its own client's pool."""
        self.settings.clients = {
            "alice": ClientPolicy(token="alice-token"),
            "bob": ClientPolicy(token="bob-token")}
        control = self.connect()
        control.send(server.register(token="alice-token", name="alice"))
        data = self.connect()
        data.send(server.jsonFrame(type="data_channel", local_port=22, remote_port=10022,
                                   protocol="", token="bob-token", name="bob", pooled=True))
        self.assertEqual(data.sent(), server.fail("no mapping of port 10022 to pool for"))

    def test_listedClientRefusedForSharedMapping(self):
        """
        A listed client's own token does not pool for a mapping registered
        with the shared token: that mapping's data channels carry the shared
        token.
        """
        self.settings.clients = {"alice": ClientPolicy(token="alice-token")}
        self.registered()
        data = self.connect()
        data.send(server.jsonFrame(type="data_channel", local_port=22, remote_port=10022,
                                   protocol="", token="alice-token", name="alice", pooled=True))
        self.assertEqual(data.sent(), server.fail("no mapping of port 10022 to pool for"))
        self.assertEqual(self.registry.tunnels[10022].pool, {})
        self.pooled()

    def test_allowPortsHoldForDataChannels(self):
        """
        A data channel, pooled or not, is held to the ports its client may
        publish, as register is (here the allowed ports changed since the
        mapping was registered).
        """
        control = self.registered()
        self.settings.allow_ports = (range(20000, 20001),)
        pooled = self.connect()
        pooled.send(pooledDataChannel())
        self.assertEqual(pooled.sent(), server.fail("no mapping of port 10022 to pool for"))
        self.connectUser()
        self.assertEqual(control.sent(), server.openDataChannel("conn-1"))
        for conn_id in (None, "conn-1"):
            data = self.connect()
            data.send(server.dataChannel(conn_id))
            self.assertEqual(data.sent(), server.fail("no user is waiting for this data channel"))


class ClientPoolTests(client.ClientTestCase):
    def registeredWithPool(self, pool: int = 8):
        """A control channel whose server offers C{pool}; its transport cleared."""
        channel, transport = self.control()
        channel.dataReceived(client.jsonFrame(type="register_resp", status="ok", pool=pool))
        transport.clear()
        return channel, transport

    def test_poolOpened(self):
        """
        A server offering a pool gets pool_count data channels at once, each
        saying pooled and naming no user; no local connection is made.
        """
        self.registeredWithPool()
        attempts = self.serverAttempts(DataChannelFactory)
        self.assertEqual(len(attempts), self.settings.pool_count)
        _, transport = self.complete(attempts[0])
        self.assertEqual(transport.value(), client.frame(
            b'{"type":"data_channel","local_port":8022,"remote_port":10022,"protocol":"",'
            b'"token":"s3cret-Token-0xC0FFEE","name":"edge-1","pooled":true}'))
        self.assertEqual(self.localAttempts(), [])

    def test_serverLimitHeld(self):
        """The client keeps no more than the server offers."""
        self.registeredWithPool(pool=2)
        self.assertEqual(len(self.serverAttempts(DataChannelFactory)), 2)

    def test_goServerGetsNone(self):
        """A server whose answer has no pool (the Go server) gets no pooled channels."""
        self.registered()
        self.assertEqual(self.serverAttempts(DataChannelFactory), [])

    def test_poolCountZero(self):
        """pool_count 0 turns pooling off."""
        self.settings.pool_count = 0
        self.registeredWithPool()
        self.assertEqual(self.serverAttempts(DataChannelFactory), [])

    def test_usedChannelIsReplaced(self):
        """
        The server's answer on a pooled channel hands it a user: the local
        service is connected to, the user's bytes wait for it, and once the
        two are spliced a new pooled channel takes the used one's place, at
        once where it was the pool's last.
        """
        self.registeredWithPool(pool=1)
        [index] = self.serverAttempts(DataChannelFactory)
        protocol, transport = self.complete(index)
        transport.clear()
        protocol.dataReceived(client.frame(client.OK) + b"GET /")
        self.assertEqual(transport.producerState, "paused")
        [local] = self.localAttempts()
        self.assertEqual(len(self.serverAttempts(DataChannelFactory)), 1)
        _, localTransport = self.complete(local)
        self.assertEqual(localTransport.value(), b"GET /")
        self.assertEqual(len(self.serverAttempts(DataChannelFactory)), 2)

    def pooledAttempts(self) -> list[int]:
        return self.serverAttempts(DataChannelFactory)

    def handUser(self, index: int) -> None:
        """Complete pooled channel C{index}, have the server hand it a user, splice it."""
        protocol, _ = self.complete(index)
        protocol.dataReceived(client.frame(client.OK) + b"GET /")
        self.complete(self.localAttempts()[-1])

    def test_usedChannelIsReplacedAfterItsFirstExchange(self):
        """
        While the pool holds other channels, the one in place of a channel
        handed a user is opened POOL_REPLACE_DELAY after that user's local
        connection, not in the same turn: its connect and TLS handshake
        would delay the user's first answer.
        """
        self.registeredWithPool(pool=2)
        first, _ = self.pooledAttempts()
        self.handUser(first)
        self.assertEqual(len(self.pooledAttempts()), 2)
        self.reactor.advance(POOL_REPLACE_DELAY / 2)
        self.assertEqual(len(self.pooledAttempts()), 2)
        self.reactor.advance(POOL_REPLACE_DELAY / 2)
        self.assertEqual(len(self.pooledAttempts()), 3)
        self.assertEqual(len(self.service.pool), 2)

    def test_oneReplacementPerChannelUsed(self):
        """
        Two channels handed users one after the other are replaced one by
        one, each its delay after its user, not both at the first's time.
        """
        self.registeredWithPool(pool=3)
        first, second, _ = self.pooledAttempts()
        self.handUser(first)
        self.reactor.advance(POOL_REPLACE_DELAY / 2)
        self.handUser(second)
        self.reactor.advance(POOL_REPLACE_DELAY / 2)
        self.assertEqual(len(self.pooledAttempts()), 4)
        self.reactor.advance(POOL_REPLACE_DELAY / 2)
        self.assertEqual(len(self.pooledAttempts()), 5)
        self.reactor.advance(POOL_REPLACE_DELAY * 10)
        self.assertEqual(len(self.pooledAttempts()), 5)
        self.assertEqual(len(self.service.pool), 3)

    def test_emptyPoolIsFilledAtOnce(self):
        """
        The pool's last channel handed a user while replacements wait: the
        next user would have no channel, so the pool is filled at once, and
        the waiting replacements open nothing more.
        """
        self.registeredWithPool(pool=2)
        first, second = self.pooledAttempts()
        self.handUser(first)
        self.handUser(second)
        self.assertEqual(len(self.pooledAttempts()), 4)
        self.reactor.advance(POOL_REPLACE_DELAY * 10)
        self.assertEqual(len(self.pooledAttempts()), 4)
        self.assertEqual(self.service.replaceCalls, set())

    def test_controlLostCancelsReplacements(self):
        """A replacement waiting when the control channel goes is not opened."""
        channel, _ = self.registeredWithPool(pool=2)
        first, _ = self.pooledAttempts()
        self.handUser(first)
        channel.connectionLost(None)
        self.reactor.advance(POOL_REPLACE_DELAY * 10)
        self.assertEqual(len(self.pooledAttempts()), 2)

    def test_stopCancelsReplacements(self):
        """A replacement waiting when the service stops is not opened."""
        self.service.startService()
        self.registeredWithPool(pool=2)
        first, _ = self.pooledAttempts()
        self.handUser(first)
        self.service.stopService()
        self.reactor.advance(POOL_REPLACE_DELAY * 10)
        self.assertEqual(len(self.pooledAttempts()), 2)


    def refusePooled(self, reason: str = "this server keeps no pooled data channels"):
        """Complete the latest pooled channel, and have the server refuse it."""
        protocol, _ = self.complete(self.pooledAttempts()[-1])
        protocol.dataReceived(client.jsonFrame(type="register_resp", status="fail", reason=reason))
        protocol.connectionLost(None)

    def test_oneRefusalKeepsThePool(self):
        """
        One refused pooled channel (a full pool, say) is replaced after
        POOL_REFILL_DELAY, as one lost unused: the pool is not given up.
        """
        self.registeredWithPool(pool=1)
        self.refusePooled("the pool of port 10022 already holds 8 data channels")
        self.assertEqual(len(self.pooledAttempts()), 1)
        self.reactor.advance(POOL_REFILL_DELAY)
        self.assertEqual(len(self.pooledAttempts()), 2)
        self.assertEqual(self.service.poolSize, 1)

    def test_refusalsInARowStopPooling(self):
        """
        POOL_REFUSALS_IN_A_ROW refusals with no pooled channel used between
        them: the server will go on refusing, so none is asked for again
        until the next register, which pools anew.
        """
        self.registeredWithPool(pool=1)
        for _ in range(POOL_REFUSALS_IN_A_ROW):
            self.refusePooled()
            self.reactor.advance(POOL_REFILL_DELAY)
        self.reactor.advance(POOL_REFILL_DELAY * 10)
        self.assertEqual(len(self.pooledAttempts()), POOL_REFUSALS_IN_A_ROW)
        self.assertEqual(self.service.poolSize, 0)
        self.registeredWithPool(pool=1)
        self.assertEqual(len(self.pooledAttempts()), POOL_REFUSALS_IN_A_ROW + 1)

    def test_usedChannelResetsTheCount(self):
        """Refusals with a pooled channel handed a user between them are not in a row."""
        self.registeredWithPool(pool=1)
        for _ in range(POOL_REFUSALS_IN_A_ROW):
            for _ in range(POOL_REFUSALS_IN_A_ROW - 1):
                self.refusePooled()
                self.reactor.advance(POOL_REFILL_DELAY)
            protocol, _ = self.complete(self.pooledAttempts()[-1])
            protocol.dataReceived(client.frame(client.OK))
            self.complete(self.localAttempts()[-1])
        self.assertEqual(self.service.poolSize, 1)
        self.assertEqual(len(self.pooledAttempts()), POOL_REFUSALS_IN_A_ROW ** 2 + 1)

    def test_idleChannelLostIsReplacedLater(self):
        """A pooled channel that closes unused is replaced after POOL_REFILL_DELAY, not at once."""
        self.registeredWithPool(pool=1)
        [index] = self.serverAttempts(DataChannelFactory)
        protocol, _ = self.complete(index)
        protocol.connectionLost(None)
        self.assertEqual(len(self.serverAttempts(DataChannelFactory)), 1)
        self.reactor.advance(POOL_REFILL_DELAY)
        self.assertEqual(len(self.serverAttempts(DataChannelFactory)), 2)

    def test_unreachableIsRetriedLater(self):
        """A pooled channel that cannot connect is tried again after POOL_REFILL_DELAY."""
        self.registeredWithPool(pool=1)
        [index] = self.serverAttempts(DataChannelFactory)
        self.refuse(index)
        self.assertEqual(len(self.serverAttempts(DataChannelFactory)), 1)
        self.reactor.advance(POOL_REFILL_DELAY)
        self.assertEqual(len(self.serverAttempts(DataChannelFactory)), 2)

    def test_controlLostClosesThePool(self):
        """
        The control channel lost, the pool is closed (the server closes its
        end too), a channel still connecting is closed once it connects,
        and nothing is reopened.
        """
        channel, _ = self.registeredWithPool(pool=2)
        first, connecting = self.serverAttempts(DataChannelFactory)
        _, transport = self.complete(first)
        channel.connectionLost(None)
        self.assertTrue(transport.disconnecting)
        _, late = self.complete(connecting)
        self.assertEqual(late.value(), b"")
        self.assertTrue(late.disconnecting)
        self.reactor.advance(POOL_REFILL_DELAY * 10)
        self.assertEqual(len(self.serverAttempts(DataChannelFactory)), 2)

    def test_takenChannelOutlivesTheControlChannel(self):
        """
        A pooled channel the server has handed a user is the user's: losing
        the control channel while its local connection is made does not
        close it, as it does not close any other user's connection.
        """
        channel, _ = self.registeredWithPool(pool=1)
        [index] = self.serverAttempts(DataChannelFactory)
        protocol, transport = self.complete(index)
        transport.clear()
        protocol.dataReceived(client.frame(client.OK) + b"hello")
        channel.connectionLost(None)
        self.assertFalse(transport.disconnecting)
        [local] = self.localAttempts()
        _, localTransport = self.complete(local)
        self.assertEqual(localTransport.value(), b"hello")
        self.assertEqual(len(self.serverAttempts(DataChannelFactory)), 1)

    def test_stopClosesThePool(self):
        """Stopping the service closes the idle pooled channels."""
        self.service.startService()
        self.registeredWithPool(pool=1)
        [index] = self.serverAttempts(DataChannelFactory)
        _, transport = self.complete(index)
        self.service.stopService()
        self.assertTrue(transport.disconnecting)


class PooledTunnelTests(unittest.TestCase):
    """Real server and client in this process, over loopback, with a pool."""

    timeout = 120
    zeroCopy = True
    spliceThread = True

    @defer.inlineCallbacks
    def setUp(self):
        self.tunnel = Tunnel(self, zeroCopy=self.zeroCopy, pool=2,
                             spliceThread=self.spliceThread)
        self.server = yield self.tunnel.startServer()
        self.client, self.public = yield within(
            self.tunnel.publish(listenTarget(self), health_check_interval=3600), WAIT,
            "the server to publish the mapping")
        self.serverTunnel = self.server.registry.tunnels[self.public]
        yield waitUntil(lambda: len(self.serverTunnel.pool) == 2, WAIT,
                        "the client's two pooled data channels to reach the server")

    @defer.inlineCallbacks
    def test_sequentialUsersServedFromThePool(self):
        """
        Users one after another each get a pooled channel (nothing is asked
        on the control channel), and each one's bytes come back intact; the
        pool is full again afterwards.
        """
        control = self.serverTunnel.channel
        announced = []
        original = control.sendMessage
        self.patch(control, "sendMessage", lambda m: (announced.append(m), original(m)))
        for size in (1, 1000, 256 * 1024):
            echoed = yield echoedThrough(self, self.public, randomBytes(size), WAIT)
            self.assertTrue(echoed, f"{size} bytes through a pooled channel")
            yield waitUntil(lambda: len(self.serverTunnel.pool) == 2, WAIT,
                            "the pool to be refilled")
        self.assertEqual([m for m in announced if isinstance(m, messages.OpenDataChannel)], [])
        self.assertEqual(self.tunnel.pooledUsers, 3)

    @defer.inlineCallbacks
    def test_keepAliveWhileIdle(self):
        """
        Both ends of an idle pooled channel probe the other after 30 s of
        silence: a NAT that dropped it is found out before a user is
        handed a dead connection.  The channels still serve users.
        """
        ends = [channel.transport.getHandle() for channel in self.serverTunnel.pool]
        ends += [channel.transport.getHandle() for channel in self.client.tunnels[0].pool]
        self.assertEqual(len(ends), 4)
        for end in ends:
            self.assertEqual(end.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
            self.assertEqual(end.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                             IDLE_KEEPALIVE)
            self.assertEqual(end.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT), 3)
        echoed = yield echoedThrough(self, self.public, randomBytes(100), WAIT)
        self.assertTrue(echoed)

    @defer.inlineCallbacks
    def test_burstBeyondThePool(self):
        """
        More users at once than the pool holds: the first get pooled
        channels, the rest are asked for, and every user's bytes come back
        intact.
        """
        payloads = [randomBytes(4096 + i) for i in range(12)]
        echoed = yield within(defer.gatherResults(
            [echoedThrough(self, self.public, p, WAIT) for p in payloads]), WAIT,
            "every user's echo")
        self.assertEqual(echoed, [True] * len(payloads))
        self.assertGreaterEqual(self.tunnel.pooledUsers, 2)

    @defer.inlineCallbacks
    def test_serverRestartEmptiesThePool(self):
        """
        Restarting the server closes the old pool; the client registers
        again, fills a new pool, and users are served from it.
        """
        yield self.server.stopService()
        self.server = yield self.tunnel.startServer()
        mapping = self.client.tunnels[0]
        yield waitUntil(lambda: self.public in self.server.registry.tunnels
                        and len(self.server.registry.tunnels[self.public].pool) == 2,
                        WAIT, "the client to register again and fill a new pool")
        self.assertLessEqual(len(mapping.pool), 2)
        before = self.tunnel.pooledUsers
        echoed = yield echoedThrough(self, self.public, randomBytes(10000), WAIT)
        self.assertTrue(echoed)
        self.assertEqual(self.tunnel.pooledUsers, before + 1)


class DataChannelKeepAliveTests(unittest.TestCase):
    """
    A data channel opened for one user (no pool) probes its peer too, on
    both ends: spliced to a user, it is what a client that vanished
    without a FIN would otherwise hold open forever (issue 15).
    """

    timeout = 120

    @defer.inlineCallbacks
    def test_dataChannelForAUser(self):
        tunnel = Tunnel(self, pool=0)
        server = yield tunnel.startServer()
        client, public = yield within(tunnel.publish(listenTarget(self)), WAIT,
                                      "the server to publish the mapping")
        user = yield within(connectUser(self, public), WAIT, "a user of the public port")
        user.transport.write(b"hello")
        yield within(user.whenReceived(5), WAIT, "the echo through a data channel")
        serverEnds = [c for c in server.registry.connections
                      if isinstance(c, gotunnel.server.channel.ServerChannel) and c.role == "data"]
        clientEnds = [c for c in client.tunnels[0].connections
                      if isinstance(c, DataChannelClient)]
        self.assertEqual((len(serverEnds), len(clientEnds)), (1, 1))
        self.assertFalse(clientEnds[0].pooled)
        for channel in serverEnds + clientEnds:
            end = channel.transport.getHandle()
            self.assertEqual(end.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1, channel)
            self.assertEqual(end.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                             IDLE_KEEPALIVE)
            self.assertEqual(end.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                             IDLE_KEEPALIVE // 3)
            self.assertEqual(end.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT), 3)


class PooledTunnelTestsWithoutZeroCopy(PooledTunnelTests):
    zeroCopy = False


class PooledTunnelTestsSplicedInReactor(PooledTunnelTests):
    spliceThread = False

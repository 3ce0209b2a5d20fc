"""
The client's multiplexed data connection on a memory reactor: how many
streams a server may make it open.
"""

from __future__ import annotations

import dataclasses

from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import formatEvent

from gotunnel.mux.frames import ACK, DATA, HEADER, RST, SYN, WINDOW_UPDATE
from gotunnel.client.mapping import ClientMappingService
from gotunnel.mux.client import MuxDataChannel, _LocalFactory

from tests.support import frame
from tests.test_client import OK, SERVER, ClientTestCase, innermost

MUX_OK = b'{"type":"register_resp","status":"ok","mux":1}'


def frames(wire: bytes) -> list[tuple[int, int, int]]:
    """(type, flags, stream id) of each yamux frame in C{wire}."""
    found = []
    while wire:
        _, kind, flags, streamId, length = HEADER.unpack_from(wire)
        found.append((kind, flags, streamId))
        wire = wire[HEADER.size + (length if kind == DATA else 0):]
    return found


class StreamCapTests(ClientTestCase):
    """
    A server (hostile or broken) that opens stream after stream: the client
    connects to its local service for at most max_pending_data_channels at
    once and holds at most maxStreams; it resets the rest, counts them, and
    says so at most once per interval.
    """

    def setUp(self):
        super().setUp()
        self.settings = dataclasses.replace(self.settings, mux=True,
                                            max_pending_data_channels=3)
        self.service = ClientMappingService(
            self.settings, self.mapping, TCP4ClientEndpoint(self.reactor, *SERVER), self.reactor)
        channel, _ = self.control()
        channel.dataReceived(frame(MUX_OK))
        [index] = [i for i, (h, p, factory, _, _) in enumerate(self.reactor.tcpClients)
                   if (h, p) == SERVER and isinstance(getattr(innermost(factory), "protocol",
                                                              None), MuxDataChannel)]
        self.channel, self.wire = self.complete(index)
        self.mux = innermost(self.reactor.tcpClients[index][2]).protocol
        self.channel.dataReceived(frame(OK))
        self.wire.clear()
        self.nextId = 1

    def open(self, count: int) -> list[tuple[int, int, int]]:
        """The server opens C{count} streams; what the client answered."""
        for _ in range(count):
            self.channel.dataReceived(HEADER.pack(0, WINDOW_UPDATE, SYN, self.nextId, 0))
            self.nextId += 2
        answered = frames(self.wire.value())
        self.wire.clear()
        return answered

    def test_connectingStreamsWaitTheirTurn(self):
        """
        Streams are accepted, but at most max_pending_data_channels local
        connections are made at once: the others wait, first come first
        served, and one reset meanwhile is skipped.
        """
        answered = self.open(6)
        self.assertEqual([flags for _, flags, _ in answered], [ACK] * 6)
        self.assertEqual(len(self.localAttempts(_LocalFactory)), 3)
        self.channel.dataReceived(HEADER.pack(0, WINDOW_UPDATE, RST, 7, 0))
        self.complete(self.localAttempts(_LocalFactory)[0])
        self.refuse(self.localAttempts(_LocalFactory)[1])
        attempts = self.localAttempts(_LocalFactory)
        self.assertEqual(len(attempts), 5)
        self.assertEqual([innermost(self.reactor.tcpClients[i][2]).end.transport.streamId
                          for i in attempts], [1, 3, 5, 9, 11])
        self.assertEqual(self.mux.refusedStreams, 0)

    def test_resetWhileWaitingHoldsNothing(self):
        """A server that opens and resets streams while connects hang holds no growing queue."""
        self.open(3)
        for _ in range(1000):
            streamId = self.nextId
            self.open(1)
            self.channel.dataReceived(HEADER.pack(0, WINDOW_UPDATE, RST, streamId, 0))
        self.assertLessEqual(len(self.mux.waiting), len(self.mux.session.streams) + 1)
        self.assertEqual(len(self.localAttempts(_LocalFactory)), 3)

    def test_openStreamsCapped(self):
        """Past maxStreams open, a new stream is reset; one ending makes room."""
        self.mux.maxStreams = 4
        for _ in range(4):
            self.open(1)
            self.complete(self.localAttempts(_LocalFactory)[-1])
        answered = self.open(3)
        self.assertEqual([flags for _, flags, _ in answered], [RST] * 3)
        self.assertEqual(len(self.localAttempts(_LocalFactory)), 4)
        self.channel.dataReceived(HEADER.pack(0, WINDOW_UPDATE, RST, 1, 0))
        self.assertEqual([flags for _, flags, _ in self.open(1)], [ACK])

    def test_refusalsLoggedOncePerInterval(self):
        """A flood of streams is one line, then one per interval with the count since."""
        events = self.logged()
        self.mux.maxStreams = 3
        self.open(3 + 500)
        self.reactor.advance(5)
        self.open(20)
        lines = [e for e in events if e.get("log_format", "").startswith("reset ")]
        self.assertEqual([e["count"] for e in lines], [1])
        self.reactor.advance(5)
        self.assertEqual([(e["count"], e["total"]) for e in events
                          if e.get("log_format", "").startswith("reset ")],
                         [(1, 1), (519, 520)])
        self.assertEqual(self.mux.refusedStreams, 520)
        self.assertEqual(
            formatEvent(lines[0]),
            "reset 1 streams the server opened for 127.0.0.1:8022->10022 (1 in all): 3 streams "
            "are open, the most a multiplexed connection takes")

"""
One end of a UDP mapping's carrying channel, the TCP (or TLS) connection its
datagrams travel in: frames out, written at once or a batch of reads in one
send, and dropped, never queued, while the connection is backed up; frames in.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from gotunnel.relay.eagerio import twistedBuffered, writeThrough
from gotunnel.udp.framing import HEADER, FrameDecoder

CARRIER_BUFFER = 512 * 1024
"""Bytes a carrying channel's transport buffers before it pauses us and
datagrams are dropped.  Twisted's default (64 KiB) is less than one read of
a busy UDP port (up to 256 KiB), which would drop most of every burst before
the kernel is even asked to take it."""


@implementer(IPushProducer)
class Carrier:
    """
    One end of a carrying channel once its handshake is done: frames out,
    frames in.  It is the streaming producer of its transport, so it knows
    when the transport's buffer is over L{CARRIER_BUFFER}: then C{send} drops.
    """

    paused = False
    corked: Optional[list[bytes]] = None
    """The frames of the batch being read (see L{cork}), or None between batches."""
    pump = None
    """The L{gotunnel.udp.threadpump.DatagramPump} that moves this channel's
    datagrams in the splice thread, if any."""
    room = 0
    """While corked: what the transport's buffer takes, less the frames held,
    before it is over its bound (see L{send})."""

    def __init__(self, transport, deliver: Callable[[int, bytes], None]) -> None:
        self.transport = transport
        self.decoder = FrameDecoder(deliver)
        # Under TLS the buffer that fills is the TCP transport's, below.
        self.tcp = None
        for layer in (transport, getattr(transport, "transport", None)):
            if hasattr(layer, "bufferSize"):
                layer.bufferSize = CARRIER_BUFFER
            if isinstance(layer, tcp.Connection):
                self.tcp = layer
        transport.registerProducer(self, True)

    def send(self, peer_id: int, payload: bytes) -> bool:
        """Write one datagram's frame; False (nothing written) while backed up."""
        pump = self.pump
        if pump is not None and pump.handedOff:
            taken = pump.send(HEADER.pack(len(payload), peer_id) + payload)
            if taken is not None:
                return taken
        if self.paused:
            # Dropped before any work: a flood meets this line once per datagram.
            return False
        frame = HEADER.pack(len(payload), peer_id) + payload
        if self.corked is None:
            self._write(frame)
            return True
        self.corked.append(frame)
        self.room -= len(frame)
        if self.room < 0:
            # Twisted pauses us only on a write: a batch held whole would
            # land on a buffer near its bound in one piece, as much as a
            # read takes (256 KiB) over it.  Written now, the frame that
            # crosses the bound is the last one taken.
            self._flush()
        return True

    def cork(self) -> None:
        """
        Hold the frames sent from now until L{uncork}, to write them in one
        send: a UDP socket's datagrams are read in batches
        (L{gotunnel.udp.sockets.readInBatches}), and a burst in one send
        costs a fraction of a send each.  A batch held is written as soon as
        it would cross the transport's bound (see L{send}).
        """
        if self.corked is None:
            self.corked = []
            self.room = self._room()

    def uncork(self) -> None:
        """Write the frames held since L{cork}, in one send."""
        frames, self.corked = self.corked, None
        if frames:
            self._write(frames[0] if len(frames) == 1 else b"".join(frames))

    def _flush(self) -> None:
        """Write the frames held so far, and go on holding the batch's next ones."""
        self.uncork()
        self.cork()

    def _room(self) -> int:
        """What the buffer that fills takes before it is over its bound."""
        connection = self.tcp
        if connection is None:
            return CARRIER_BUFFER
        return connection.bufferSize - twistedBuffered(connection)

    def _write(self, data: bytes) -> None:
        # To the kernel now, not at the reactor's next turn (a lone datagram,
        # a query or a ping, waits for nothing; see gotunnel.relay.eagerio).
        writeThrough(self.transport, data)
        connection = self.tcp
        if (connection is not None and connection is not self.transport
                and connection.connected and not connection.disconnecting
                and twistedBuffered(connection)):
            # TLS: its records wait in the TCP transport below.
            connection.doWrite()

    def stop(self) -> None:
        self.corked = None
        if self.pump is not None:
            # The reactor's again, before its transport closes.
            self.pump.stop()

    def close(self, abort: bool = False) -> None:
        """Stop, and close the carrying channel (once what it holds is written, unless C{abort})."""
        self.stop()
        # Twisted's TLS sends its close_notify, and so closes, only once no
        # producer is registered: the carrier is one for its whole life.
        self.transport.unregisterProducer()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def feed(self, data: bytes) -> Optional[str]:
        return self.decoder.feed(data)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True

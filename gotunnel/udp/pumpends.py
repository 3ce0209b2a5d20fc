"""
The two ends of a L{gotunnel.udp.threadpump.DatagramPump}: the server's,
which reads the public port and hands new peers to the reactor, and the
client's, which reads a socket per session and hands new sessions to it.
"""

from __future__ import annotations

from gotunnel.udp.sockets import READ_SIZE
from gotunnel.udp.threadpump import READ_BATCH, DatagramPump, PortSide



class ServerDatagramPump(DatagramPump):
    """The server's end: the public UDP port and the carrying channel (L{gotunnel.udp.server.UdpTunnel})."""

    def ports(self):
        listener = self.tunnel.listener
        if listener is None or not self.stillOpen(listener):
            return None
        return [(listener, None)]

    def brokenFrame(self, why: str) -> None:
        channel = self.tunnel.carrierChannel
        if channel is not None and channel.transport is self.carrier.transport:
            channel.protocolError(why)

    def fromCarrier(self, peer_id: int, payload: bytes) -> None:
        self.tunnel.fromClient(peer_id, payload)

    def portReadable(self, side: PortSide) -> bool:
        tunnel = self.tunnel
        peers = tunnel.peers
        recvfrom = side.socket.recvfrom
        now = tunnel.registry.clock.seconds()
        datagrams = []
        for _ in range(READ_BATCH):
            try:
                data, address = recvfrom(READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                # An ICMP error of an earlier send, or the socket is closing.
                break
            # As Twisted's datagramReceived: an IPv6 peer is (host, port).
            address = address[:2]
            peer = peers.get(address)
            if peer is None:
                if not self.handOver(tunnel.fromPeer, data, address):
                    self.counters.dropped_sessions += 1
                continue
            peer.lastSeen = now
            datagrams.append((peer.peer_id, data))
        self.frames(side, datagrams)
        return True

    def forwarded(self, count: int) -> None:
        self.counters.forwarded_in += count


class ClientDatagramPump(DatagramPump):
    """The client's end: the carrying channel and a socket per session (L{gotunnel.udp.client.UdpTunnelService})."""

    def ports(self):
        return [(session.transport, session) for session in self.tunnel.sessions.values()
                if session.transport is not None and self.stillOpen(session.transport)]

    def brokenFrame(self, why: str) -> None:
        channel = self.tunnel.carrierChannel
        if channel is not None and channel.carrier is self.carrier:
            channel.protocolError(why)

    def fromCarrier(self, peer_id: int, payload: bytes) -> None:
        tunnel = self.tunnel
        session = tunnel.sessions.get(peer_id)
        side = self.sides.get(session.transport) if session is not None else None
        if side is None:
            # A new peer: its session socket is the reactor's to open.
            if not self.handOver(tunnel.fromServer, peer_id, payload):
                self.counters.dropped_sessions += 1
            return
        self.carrierSide.outgoing.sink = side
        session.lastSeen = tunnel.reactor.seconds()
        try:
            side.socket.send(payload)
        except OSError:
            self.counters.dropped_unknown += 1
            return
        self.counters.forwarded_in += 1

    def portReadable(self, side: PortSide) -> bool:
        recv = side.socket.recv
        peer_id = side.session.peer_id
        datagrams = []
        for _ in range(READ_BATCH):
            try:
                datagrams.append((peer_id, recv(READ_SIZE)))
            except BlockingIOError:
                break
            except ConnectionRefusedError:
                # The local service is not listening: lost, as without the tunnel.
                self.counters.dropped_unknown += 1
            except OSError:
                break
        if datagrams:
            side.session.lastSeen = self.tunnel.reactor.seconds()
        self.frames(side, datagrams)
        return True

    def forwarded(self, count: int) -> None:
        self.counters.forwarded_out += count

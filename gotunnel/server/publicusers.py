"""
A user's connection to a public port (L{PublicUser}) and the factory that
admits it or refuses it at accept (L{PublicUserFactory}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from twisted.internet.protocol import Factory, Protocol

from gotunnel.server.accounting import REFUSED_NO_MEMBER, USER_CLOSED, noteEnding
from gotunnel.wire.framing import describePeer
from gotunnel.relay.splice import RelayEnd, setNoDelay

if TYPE_CHECKING:
    from gotunnel.server.channel import ServerChannel
    from gotunnel.server.mapping import PublishedMapping


MAX_EARLY_BYTES = 4 * 1024
"""
About what a user may send before its data channel comes and have us hold
it (the rest waits in the kernel): thousands of users may wait at once.
"""


class PublicUser(Protocol, RelayEnd):
    """
    A user's connection to a public port.  While it waits for its data
    channel it is read on, so that a user who gives up is let go at once,
    but in reads of L{MAX_EARLY_BYTES}, and only until it has sent that
    many: after that what it sends waits in the kernel.
    """

    conn_id: Optional[str] = None
    connectedAt: float = 0.0
    timeoutCall = None
    userId: Optional[str] = None
    """The admin API's name for this connection ("u17")."""
    peerAddress = "?"
    dataChannel: Optional["ServerChannel"] = None
    endedBy: Optional[str] = None
    """How the connection ended (L{gotunnel.server.accounting.ENDINGS}), once it has."""
    _heldBytes = 0
    _readSize: Optional[int] = None
    earlyBytes = 0
    """What it sent before its data channel's answer, sent with that answer."""

    def __init__(self, tunnel: "PublishedMapping") -> None:
        self.tunnel = tunnel
        self.remote_port = tunnel.remote_port

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        self.peerAddress = describePeer(self.transport)
        self.tunnel.registry.connections.add(self)
        self.tunnel.registry.userArrived(self.remote_port)
        self.tunnel.registry.stats.userOpened(self)
        self.tunnel.userConnected(self)

    def dataReceived(self, data: bytes) -> None:
        self.relayReceived(data)
        if self.peer is None:
            self._heldBytes += len(data)
            if self._heldBytes >= MAX_EARLY_BYTES:
                self.transport.pauseProducing()

    def waitForDataChannel(self) -> None:
        """Read in small pieces until L{doneWaiting}."""
        # FileDescriptor.bufferSize is the most one read takes (64 KiB).
        self._readSize = getattr(self.transport, "bufferSize", None)
        if self._readSize is not None:
            self.transport.bufferSize = MAX_EARLY_BYTES

    def doneWaiting(self) -> None:
        """Read as much at a time as any connection again (it is also the write buffer's size)."""
        if self._readSize is not None:
            self.transport.bufferSize, self._readSize = self._readSize, None

    def takeHeld(self) -> bytes:
        """What this user sent before its splice, taken from it to send now."""
        held, self._held = self._held, None
        self._heldBytes = 0
        return b"".join(held or ())

    def readConnectionLost(self) -> None:
        if self._readClosed:
            # Read while it waited, and read again once the splice resumed
            # the transport: the end was passed on the first time.
            return
        noteEnding(self, USER_CLOSED)
        if self.peer is None and not self._held and self.tunnel.userGaveUp(self):
            # It closed while it waited and sent nothing: there is nothing
            # to pass on, and a descriptor to give back now rather than at
            # the data channel timeout.
            self.transport.loseConnection()
            return
        RelayEnd.readConnectionLost(self)

    def connectionLost(self, reason=None) -> None:
        self.tunnel.registry.stats.userClosed(self, reason)
        self.tunnel.userLost(self)
        self.tunnel.registry.userLeft(self.remote_port)
        self.tunnel.registry.connections.discard(self)
        self.relayConnectionLost(reason)


class PublicUserFactory(Factory):
    noisy = False

    def __init__(self, tunnel: "PublishedMapping") -> None:
        self.tunnel = tunnel

    def buildProtocol(self, addr) -> Optional[PublicUser]:
        # Refused here, before a byte is read or the client hears of it:
        # Twisted closes the socket of a connection given no protocol.
        if not self.tunnel.admitUser(addr):
            return None
        tunnel = self.tunnel
        if tunnel.group is not None:
            # The port's listener serves its whole group: the next member up.
            tunnel = tunnel.group.pick()
            if tunnel is None:
                self.tunnel.refused(getattr(addr, "host", "?"), "no member of the group is up",
                                    REFUSED_NO_MEMBER)
                return None
        return PublicUser(tunnel)

"""
A mapping's data channels made ready before a user comes: a pool of them
waiting at the server, or, where the server and we agree, one multiplexed
connection instead (L{gotunnel.mux.client.MuxDataChannel}).
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from gotunnel.client.datachannel import DataChannelClient
from gotunnel.mux.client import MuxDataChannel

log = Logger(namespace="gotunnel.client")

POOL_REFILL_DELAY = 1.0
"""
Seconds before a pooled data channel that closed unused is replaced: the
server closed it or could not be reached, and asking again at once would
only repeat that.
"""

POOL_REPLACE_DELAY = 0.005
"""
Seconds between a pooled data channel being handed a user and the opening
of its replacement, while the pool still holds a channel: opened at once,
the replacement's connect and TLS handshake (about a millisecond of CPU in
each process) fall in the same turns of both reactors as that user's first
exchange, and delay it (see bench/README.md, "Connection setup").
"""

POOL_REFUSALS_IN_A_ROW = 3
"""
Pooled data channels the server refuses in a row (none handed a user in
between) before the client stops pooling until it registers again.  One
refusal may be of the moment (the pool full while the server has yet to see
a channel close, a mapping being replaced); the same refusal again and
again is one that will repeat (a server that keeps no pool, a token it
refuses), and asking on would only load it.
"""


class _Always(Factory):
    """A factory that gives one protocol, already made."""

    noisy = False

    def __init__(self, protocol) -> None:
        self.protocol = protocol

    def buildProtocol(self, addr):
        return self.protocol


class DataChannelPool:
    """
    The pool and the multiplexed connection of a mapping: a part of
    L{gotunnel.client.mapping.ClientMappingService}, using its C{pool} (the
    pooled data channels not yet handed a user), C{channel} (the registered
    control channel), C{stopping}, endpoints and C{_connectDataChannel}.
    """

    poolSize = 0
    """Pooled data channels to keep open: ours and the server's limit, the lesser."""
    refillCall = None
    poolRefusals = 0
    """Pooled data channels refused in a row since one was handed a user."""
    muxChannel: Optional[MuxDataChannel] = None
    """The multiplexed data connection, while the server and we agree on one."""
    serverPool = 0
    muxCall = None

    def openMuxChannel(self) -> None:
        """Connect the mapping's multiplexed data connection."""
        self.muxCall = None
        if self.channel is None or self.stopping or self.muxChannel is not None:
            return
        self.muxChannel = channel = MuxDataChannel(self)
        endpoint = self.dataChannelEndpoint(self.channel.transport.getPeer()) \
            if self.dataChannelEndpoint is not None else None
        if endpoint is None:
            endpoint = self.serverEndpoint

        def failed(failure):
            self.muxLost(channel)

        self._track(endpoint.connect(_Always(channel))).addErrback(failed)

    def closeMuxChannel(self) -> None:
        """No new users over it; it closes once its streams have ended."""
        if self.muxCall is not None and self.muxCall.active():
            self.muxCall.cancel()
        self.muxCall = None
        channel, self.muxChannel = self.muxChannel, None
        if channel is not None:
            channel.goAway()

    def muxLost(self, channel: MuxDataChannel) -> None:
        """The multiplexed connection went: another, a second later, while registered."""
        if self.muxChannel is channel:
            self.muxChannel = None
            if self.channel is not None and not self.stopping:
                self.muxCall = self.reactor.callLater(POOL_REFILL_DELAY, self.openMuxChannel)

    def muxRefused(self, channel: MuxDataChannel) -> None:
        """The server would not multiplex after all: keep a pool as without."""
        if self.muxChannel is channel:
            self.muxChannel = None
            self.poolSize = min(self.settings.pool_count, self.serverPool)
            self.fillPool()

    def _cancelRefill(self) -> None:
        if self.refillCall is not None and self.refillCall.active():
            self.refillCall.cancel()
        self.refillCall = None
        replacing, self.replaceCalls = self.replaceCalls, set()
        for call in replacing:
            call.cancel()

    def replacePooled(self) -> None:
        """
        A pooled channel was handed a user: open one in its place after
        L{POOL_REPLACE_DELAY}, once that user's first exchange is through;
        at once (with any other replacement waiting) if the pool is empty,
        where the next user would wait for a channel.
        """
        if not self.pool:
            self.fillPool()
            return
        call = self.reactor.callLater(POOL_REPLACE_DELAY, lambda: self._replaceOne(call))
        self.replaceCalls.add(call)

    def _replaceOne(self, call) -> None:
        self.replaceCalls.discard(call)
        if self.channel is not None and not self.stopping and len(self.pool) < self.poolSize:
            channel = DataChannelClient(self, None)
            self.pool.add(channel)
            self._connectDataChannel(channel)

    def fillPool(self) -> None:
        """Open pooled data channels until the pool holds L{poolSize}."""
        self._cancelRefill()
        while self.channel is not None and not self.stopping and len(self.pool) < self.poolSize:
            channel = DataChannelClient(self, None)
            self.pool.add(channel)
            self._connectDataChannel(channel)

    def emptyPool(self) -> None:
        """Close the pooled data channels not yet handed a user."""
        self.poolSize = 0
        self._cancelRefill()
        pool, self.pool = self.pool, set()
        for channel in pool:
            if channel.transport is not None:
                channel.transport.loseConnection()

    def pooledChannelTaken(self, channel: DataChannelClient) -> None:
        """
        The server handed C{channel} a user: it is the user's now, and stays
        open if the control channel goes.  L{fillPool} replaces it.
        """
        self.pool.discard(channel)
        self.poolRefusals = 0

    def pooledChannelLost(self, channel: DataChannelClient) -> None:
        """C{channel} closed, or could not connect, before the server used it."""
        if channel in self.pool:
            self.pool.discard(channel)
            if self.refillCall is None and self.channel is not None and not self.stopping:
                self.refillCall = self.reactor.callLater(POOL_REFILL_DELAY, self.fillPool)

    def poolRefused(self, channel: DataChannelClient) -> None:
        """
        The server refused C{channel}: replace it later, as a channel lost
        unused; after L{POOL_REFUSALS_IN_A_ROW} refusals in a row, stop
        pooling until we register again.
        """
        self.poolRefusals += 1
        if self.poolRefusals < POOL_REFUSALS_IN_A_ROW:
            self.pooledChannelLost(channel)
            return
        self.pool.discard(channel)
        if self.poolSize:
            log.warn("the server refused {count} pooled data channels in a row; {mapping} "
                     "opens data channels only when asked until it registers again",
                     count=self.poolRefusals, mapping=str(self.mapping))
        self.poolSize = 0
        self._cancelRefill()

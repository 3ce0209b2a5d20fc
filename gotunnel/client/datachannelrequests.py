"""
The server's requests for a data channel: each opens one, at most
C{max_pending_data_channels} at once, the rest wait in a bounded queue and
past it are dropped, counted and logged at a bounded rate.
"""

from __future__ import annotations

from twisted.logger import Logger

from gotunnel.client.datachannel import DataChannelClient
from gotunnel.wire import messages

log = Logger(namespace="gotunnel.client")

EARLY_LOCAL_CONNECTS = 8
"""
How many local connections a mapping makes at once ahead of the server's
answer to their data channels.  Early connections take a round trip off a
user's setup; past this many, a burst of users reaches the local service
paced by the server's answers, as the Go client does, so that a service
with a short accept queue is not flooded (Twisted's default is 50, Python's
socketserver's 5).
"""

MAX_WAITING_DATA_CHANNEL_REQUESTS = 4096
"""
The server's requests for a data channel a mapping keeps waiting while
C{max_pending_data_channels} are being opened; more are dropped.  A request
is a few dozen bytes: this many cost well under a megabyte, and serve a
burst of users as large as our server lets wait on one port.
"""

DROPPED_REQUESTS_LOG_INTERVAL = 10.0
"""Seconds between two lines about requests for a data channel dropped."""


class DataChannelRequests:
    """
    The server's requests for a mapping's data channels: a part of
    L{gotunnel.client.mapping.ClientMappingService}, using its C{opening}
    (the data channels not yet answered), C{waitingRequests}, C{stopping}
    and C{_connectDataChannel}.
    """

    earlyLocalConnections = 0
    """Local connections made ahead of the server's answer, not yet spliced."""
    droppedRequests = 0
    """Requests for a data channel dropped since the service started."""
    _droppedUnlogged = 0
    _droppedLogCall = None
    _openingWaiting = False

    def openDataChannel(self, request: messages.OpenDataChannel) -> None:
        """
        Connect a data channel to the server and, at the same time, a
        connection to the local service (see L{DataChannelClient}); or, with
        C{max_pending_data_channels} unanswered already, wait for one of
        them to end, so that a server sending requests without end (hostile
        or broken) holds a bounded number of our descriptors.
        """
        if self.stopping:
            return
        if len(self.opening) >= self.settings.max_pending_data_channels:
            if len(self.waitingRequests) < MAX_WAITING_DATA_CHANNEL_REQUESTS:
                self.waitingRequests.append(request)
            else:
                self._dropRequest()
            return
        self._open(request)

    def dataChannelAnswered(self, channel: DataChannelClient) -> None:
        """C{channel} was answered, or failed: a waiting request may go."""
        if channel not in self.opening:
            return
        self.opening.discard(channel)
        if self._openingWaiting:
            # A connect that failed at once, inside the loop below.
            return
        self._openingWaiting = True
        try:
            while (self.waitingRequests and not self.stopping
                   and len(self.opening) < self.settings.max_pending_data_channels):
                self._open(self.waitingRequests.popleft())
        finally:
            self._openingWaiting = False

    def _dropRequest(self) -> None:
        self.droppedRequests += 1
        self._droppedUnlogged += 1
        if self._droppedLogCall is None:
            self._logDropped()

    def _logDropped(self) -> None:
        # One line at the first drop, then at most one per interval: a flood
        # of requests must not become a flood of lines.
        count, self._droppedUnlogged = self._droppedUnlogged, 0
        if not count:
            self._droppedLogCall = None
            return
        log.warn("dropped {count} requests for a data channel for {mapping} ({total} in all): "
                 "{opening} data channels are being opened and {waiting} requests wait; the "
                 "server closes those users when it stops waiting for their data channels",
                 count=count, total=self.droppedRequests, mapping=str(self.mapping),
                 opening=len(self.opening), waiting=len(self.waitingRequests))
        self._droppedLogCall = self.reactor.callLater(DROPPED_REQUESTS_LOG_INTERVAL,
                                                      self._logDropped)

    def _open(self, request: messages.OpenDataChannel) -> None:
        channel = DataChannelClient(self, request)
        self.opening.add(channel)
        self._connectDataChannel(channel)
        if self.earlyLocalConnections < EARLY_LOCAL_CONNECTS:
            channel.connectEarly()

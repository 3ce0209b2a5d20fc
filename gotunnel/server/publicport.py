"""
The listening socket of one public port, shared by the tunnels that hold
the port one after another: a client that registers again, or says its
service is down and then back.

Starting and stopping the socket are done one at a time: a new socket is
bound only once the one before it has closed (else: "Address already in
use"), and whatever was asked last decides whether the port ends open, and
for which tunnel, however many requests came while a step was under way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel

from gotunnel.wire.printable import printable

if TYPE_CHECKING:
    from gotunnel.server.mapping import PublishedMapping

log = Logger("gotunnel.server")


class PublicPort:
    """
    The socket of public port C{remote_port}, open for at most one tunnel.

    C{track} is given the Deferred of each run of start/stop steps, so that
    the server's shutdown can wait for it; C{idle} is called when the port
    is closed and nobody asks for it, so that its owner can forget it.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, remote_port: int,
                 track: Callable[[defer.Deferred], object],
                 idle: Callable[["PublicPort"], None]) -> None:
        self.endpoint = endpoint
        self.remote_port = remote_port
        self._track = track
        self._idle = idle
        self.listener: Optional[IListeningPort] = None
        self.owner: Optional[PublishedMapping] = None
        # The last request: the tunnel the port should serve, or None.
        self._wanted: Optional[tuple[PublishedMapping, Factory]] = None
        self._waiters: list[tuple[PublishedMapping, defer.Deferred]] = []
        self._settling: Optional[defer.Deferred] = None

    def listen(self, tunnel: "PublishedMapping", factory: Factory) -> defer.Deferred:
        """
        Ask for the port to serve C{tunnel}'s users through C{factory}.

        @return: a Deferred that fires with True once it does, with False if
            a later request decided otherwise first, or fails with the
            reason the socket could not be bound
            (L{twisted.internet.error.CannotListenError}).
        """
        self._wanted = (tunnel, factory)
        answer: defer.Deferred = defer.Deferred()
        self._waiters.append((tunnel, answer))
        self._settle()
        return answer

    def stop(self, tunnel: "PublishedMapping") -> defer.Deferred:
        """
        Withdraw C{tunnel}'s request; the Deferred fires once the socket
        that served it is closed.
        """
        if self._wanted is not None and self._wanted[0] is tunnel:
            self._wanted = None
        self._settle()
        return self.whenSettled()

    def adopt(self, tunnel: "PublishedMapping", factory: Factory, listener: IListeningPort) -> None:
        """
        Take on C{listener}, bound elsewhere for C{tunnel} through C{factory}
        (on a port number the system chose), as if L{listen} had bound it.
        """
        self._wanted = (tunnel, factory)
        self.listener, self.owner = listener, tunnel
        log.info("public port {remote_port} listening for {name}",
                 remote_port=self.remote_port, name=printable(tunnel.name))

    def handOver(self, leaving: "PublishedMapping",
                 successor: "PublishedMapping") -> Optional[Factory]:
        """
        Pass C{leaving}'s request, and the socket if it serves it, on to
        C{successor} without closing it (a group's port stays open when its
        holder leaves, see L{gotunnel.server.groups}).

        @return: the factory the socket serves users through, for the
            caller to point at C{successor}; None if C{leaving} did not ask
            for this port.
        """
        if self._wanted is None or self._wanted[0] is not leaving:
            return None
        factory = self._wanted[1]
        self._wanted = (successor, factory)
        if self.owner is leaving:
            self.owner = successor
        return factory

    def whenSettled(self) -> defer.Deferred:
        """A Deferred that fires once no step is under way."""
        if self._settling is None:
            return defer.succeed(None)
        settled: defer.Deferred = defer.Deferred()

        def fire(result):
            settled.callback(None)
            return result

        self._settling.addBoth(fire)
        return settled

    def _settle(self) -> None:
        if self._settling is not None:
            # The steps under way read the last request when they finish.
            return
        self._settling = defer.Deferred()
        self._track(self._settling)
        self._step()

    def _step(self) -> None:
        wanted = self._wanted
        if self.listener is not None and (wanted is None or wanted[0] is not self.owner):
            listener, self.listener, self.owner = self.listener, None, None
            log.info("public port {remote_port} stopped", remote_port=self.remote_port)
            closing = defer.maybeDeferred(listener.stopListening)
            closing.addErrback(self._cannotStop)
            closing.addCallback(lambda _: self._step())
            return
        if wanted is not None and self.listener is None:
            tunnel, factory = wanted
            starting = defer.maybeDeferred(self.endpoint.listen, factory)
            starting.addCallbacks(self._listening, self._cannotListen,
                                  callbackArgs=(tunnel,), errbackArgs=(tunnel,))
            starting.addCallback(lambda _: self._step())
            return
        self._settled()

    def _listening(self, listener: IListeningPort, tunnel: "PublishedMapping") -> None:
        # Kept even if no longer wanted: the next step closes it.
        self.listener, self.owner = listener, tunnel
        log.info("public port {remote_port} listening for {name}",
                 remote_port=self.remote_port, name=printable(tunnel.name))

    def _cannotListen(self, failure, tunnel: "PublishedMapping") -> None:
        if self._wanted is not None and self._wanted[0] is tunnel:
            # Answered with the failure: whoever asked decides what next.
            self._wanted = None
        failed = [answer for owner, answer in self._waiters if owner is tunnel]
        self._waiters = [(owner, answer) for owner, answer in self._waiters
                         if owner is not tunnel]
        for answer in failed:
            answer.errback(failure)

    def _cannotStop(self, failure) -> None:
        log.failure("closing public port {remote_port} failed", failure, LogLevel.error,
                    remote_port=self.remote_port)

    def _settled(self) -> None:
        settling, self._settling = self._settling, None
        waiters, self._waiters = self._waiters, []
        for tunnel, answer in waiters:
            answer.callback(self.listener is not None and self.owner is tunnel)
        settling.callback(None)
        if self._settling is None and self.listener is None and self._wanted is None:
            self._idle(self)

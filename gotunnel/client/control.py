"""
The client's side of a control channel: it registers one mapping, keeps
the server's heartbeat, and passes on the server's requests for data
channels to its L{gotunnel.client.mapping.ClientMappingService}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from gotunnel.wire import messages
from gotunnel.wire.framing import CLIENT_TLS_HINTS, MessageReceiver, tlsFailure
from gotunnel.wire.printable import printable
from gotunnel.relay.splice import setNoDelay

if TYPE_CHECKING:
    from gotunnel.client.mapping import ClientMappingService

log = Logger(namespace="gotunnel.client")


@implementer(IHandshakeListener)
class ControlChannel(MessageReceiver):
    """
    The client's side of a control channel: registers its mapping, sends
    heartbeats, and asks for a data channel when the server says a user is
    waiting.
    """

    registered = False
    answer: Optional[messages.RegisterResp] = None
    """The server's register_resp, once it accepted the mapping."""
    lastPong = 0.0
    handshakeDone = False
    registerTimeout = None
    timedOut = False
    tlsMismatchHint = "the server speaks TLS? connect with --tls"

    def __init__(self, tunnel: "ClientMappingService") -> None:
        self.tunnel = tunnel
        self.heartbeat = LoopingCall(self._ping)
        self.heartbeat.clock = tunnel.reactor

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        mapping, settings = self.tunnel.mapping, self.tunnel.settings
        virtualHost = {}
        if mapping.vhost:
            virtualHost = dict(vhost=mapping.vhost, domains=mapping.domains or None,
                               subdomain=mapping.subdomain or None,
                               http_auth=mapping.http_auth or None,
                               host_header_rewrite=mapping.host_header_rewrite or None)
        # A virtual host is routed by the user's first bytes, and UDP has its
        # carrying channel: no streams for them.  A stream's opening carries
        # no user address, which a PROXY protocol header needs: such a
        # mapping keeps to data channels.
        mux = 1 if (settings.mux and not mapping.vhost and mapping.protocol == "tcp"
                    and mapping.proxy_protocol is None) else None
        self.sendMessage(messages.Register(
            local_port=mapping.local_port, remote_port=mapping.remote_port,
            protocol=mapping.protocol, token=settings.token, name=settings.name, mux=mux,
            allow_sources=mapping.allow_sources or None,
            deny_sources=mapping.deny_sources or None, max_users=mapping.max_users or None,
            max_connection_rate=mapping.max_connection_rate or None,
            bandwidth_limit=mapping.bandwidth_limit or None, group=mapping.group or None,
            group_key=mapping.group_key or None, **virtualHost))
        # A server that never answers (hung, or not a gotunnel server) would
        # otherwise hold this mapping unpublished, silently, for good.
        self.registerTimeout = self.tunnel.reactor.callLater(
            settings.register_timeout, self._registerTimedOut)

    def _registerTimedOut(self) -> None:
        self.registerTimeout = None
        self.timedOut = True
        log.warn("the server did not answer the registration of {mapping} within {seconds:g} s; "
                 "closing the control channel", mapping=str(self.tunnel.mapping),
                 seconds=self.tunnel.settings.register_timeout)
        self.transport.abortConnection()

    def _cancelRegisterTimeout(self) -> None:
        if self.registerTimeout is not None and self.registerTimeout.active():
            self.registerTimeout.cancel()
        self.registerTimeout = None

    def handshakeCompleted(self) -> None:
        self.handshakeDone = True

    def msg_register_resp(self, msg: messages.RegisterResp) -> None:
        self._cancelRegisterTimeout()
        if self.registered:
            self.protocolError("register_resp on a registered control channel")
            return
        if not msg.ok:
            self.tunnel.registrationRefused(printable(msg.reason))
            self.transport.loseConnection()
            return
        if self.tunnel.mapping.vhost and msg.vhost != self.tunnel.mapping.vhost:
            # A Go server answers ok to any register, and publishes port 0:
            # a port of its kernel's choosing, closed with this channel.
            self.tunnel.withdraw()
            return
        self.registered = True
        self.answer = msg
        if self.tunnel.mapping.remote_port == 0 and not self.tunnel.mapping.vhost:
            self.tunnel.portChosen(msg.remote_port, self.transport.getPeer())
        self.lastPong = self.tunnel.reactor.seconds()
        self.heartbeat.start(self.tunnel.settings.heartbeat_interval, now=False)
        # A Go server sends no pool: it gets no pooled data channels.
        self.tunnel.registered(self, serverPool=msg.pool or 0,
                               mux=msg.mux == 1 and self.tunnel.settings.mux)

    def _ping(self) -> None:
        now = self.tunnel.reactor.seconds()
        silence = now - self.lastPong
        if silence > self.tunnel.settings.server_timeout:
            log.warn("no pong from the server for {seconds:.0f} s; reconnecting", seconds=silence)
            self.transport.abortConnection()
            return
        self.sendMessage(messages.Ping(time=int(now)))

    def msg_pong(self, msg: messages.Pong) -> None:
        self.lastPong = self.tunnel.reactor.seconds()

    def msg_open_data_channel(self, msg: messages.OpenDataChannel) -> None:
        if not self.registered:
            self.protocolError("open_data_channel before register_resp")
            return
        self.tunnel.openDataChannel(msg)

    def sendPortState(self, online: bool) -> None:
        port = self.tunnel.mapping.remote_port
        self.sendMessage(messages.OnlinePort(port=port) if online else messages.OfflinePort(port=port))

    def connectionLost(self, reason=None) -> None:
        self._cancelRegisterTimeout()
        if self.heartbeat.running:
            self.heartbeat.stop()
        why = tlsFailure(reason, CLIENT_TLS_HINTS, self.transport,
                         self.tunnel.reactor.seconds())
        # A handshake we cut short on the timeout says nothing about the
        # server speaking plain TCP; the timeout's line has said why.
        if (why is None and ISSLTransport.providedBy(self.transport) and not self.handshakeDone
                and not self.timedOut):
            why = ("the connection closed during the TLS handshake "
                   "(is the server plain TCP? then connect without --tls)")
        if why is not None and not self.registered:
            self.tunnel.reportUnreachable(why)
        self.tunnel.channelLost(self)


class ControlChannelFactory(Factory):
    noisy = False

    def __init__(self, tunnel: "ClientMappingService") -> None:
        self.tunnel = tunnel

    def buildProtocol(self, addr) -> ControlChannel:
        return ControlChannel(self.tunnel)

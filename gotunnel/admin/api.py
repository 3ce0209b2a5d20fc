"""
The admin endpoint's JSON API (see docs/operations.md): what the server
holds now (clients, published ports, live user connections), and a few
actions on it, each through the same code path the protocol's own events
take.  The pages of the site: L{adminSite}.
"""

from __future__ import annotations

import json
from typing import Callable, Optional

from twisted.internet import defer, error
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web import server
from twisted.web.resource import Resource

from gotunnel.tls import contexts as tls
from gotunnel.server.accounting import BY_ADMIN, noteEnding, userBytes
from gotunnel.relay.splice import closeConnectionOf
from gotunnel.admin.auth import (
    AdminAuth, clientHost, jsonAnswer, refusal, tooManyFailures, unauthorized,
)
from gotunnel.server.channelstates import Control

log = Logger()

MAX_BODY = 4096
"""The largest request body the admin endpoint reads; a bigger one is answered 413."""

MAX_CONNECTIONS = 256
"""Connections to the admin endpoint at once; more are closed as they come."""

MAX_CONNECTIONS_PER_ADDRESS = 32
"""Connections to the admin endpoint from one address at once."""

IDLE_TIMEOUT = 60
"""Seconds an admin connection may stay silent."""


def identityOf(tunnel) -> str:
    """How the client of C{tunnel} proved who it is."""
    certificateName = tls.peerCommonName(tunnel.channel.transport)
    if certificateName is not None:
        return f"cert:{certificateName}"
    if tunnel.name in tunnel.registry.settings.clients:
        return f"token:{tunnel.name}"
    return "shared-token"


def vhostOf(tunnel) -> dict:
    """
    A virtual host's scheme and domains, the fields that tell its entries
    apart (its remote_port is 0); nothing for a mapping of a port.
    """
    domains = getattr(tunnel, "domains", None)
    if domains is None:
        return {}
    return {"vhost": tunnel.vhost, "domains": list(domains)}


def udpOf(tunnel) -> dict:
    """
    A UDP port's protocol, the field that tells it apart from the TCP port
    of its number, and its datagrams and sessions; nothing for TCP.
    """
    peers = getattr(tunnel, "peers", None)
    if peers is None:
        return {}
    return {"protocol": "udp", "udp": datagramsOf(tunnel.stats.datagrams, len(peers))}


def datagramsOf(counters, sessions: int) -> dict:
    """A UDP port's counts, as the API gives them (see L{gotunnel.server.accounting.DatagramCounters})."""
    return {"sessions": sessions,
            "datagrams_in": counters.forwarded_in if counters else 0,
            "datagrams_out": counters.forwarded_out if counters else 0,
            "dropped": {"backed_up": counters.dropped_backed_up if counters else 0,
                        "sessions": counters.dropped_sessions if counters else 0,
                        "unknown_peer": counters.dropped_unknown if counters else 0}}


def clientOf(tunnel) -> dict:
    return {
        "id": tunnel.clientId,
        "name": tunnel.name,
        "address": tunnel.channel.peerDescription,
        "identity": identityOf(tunnel),
        "connected_since": float(tunnel.connectedSince),
        "last_heartbeat": float(tunnel.lastSeen),
        "mappings": [{"remote_port": tunnel.remote_port, "local_port": tunnel.local_port,
                      **vhostOf(tunnel),
                      **({"protocol": "udp"} if tunnel.protocol == "udp" else {})}],
    }


class Snapshot:
    """The registry's clients, ports and live connections at one moment, in one pass."""

    def __init__(self, registry) -> None:
        self.registry = registry
        self.now = registry.clock.seconds()
        self.tunnels = sorted((t for t in registry.allTunnels() if not t.closed),
                              key=lambda t: t.remote_port)
        # Users now and their bytes so far, per mapping's totals: virtual
        # hosts share remote_port 0, each with totals of its own.
        self.live: dict[int, list[int]] = {}
        self.connections = []
        for user in list(registry.stats.users.values()):
            tunnel = user.tunnel
            bytesIn, bytesOut = userBytes(user)
            live = self.live.setdefault(id(tunnel.stats), [0, 0, 0])
            live[0] += 1
            live[1] += bytesIn
            live[2] += bytesOut
            self.connections.append({
                "id": user.userId, "remote_port": tunnel.remote_port, **vhostOf(tunnel),
                "client": tunnel.name, "user": user.peerAddress, "bytes_in": bytesIn,
                "bytes_out": bytesOut, "age": self.now - user.connectedAt,
            })

    def clients(self) -> list[dict]:
        # A control channel whose port is still being opened is not a client yet.
        return [clientOf(tunnel) for tunnel in self.tunnels
                if isinstance(tunnel.channel.state, Control)]

    def ports(self) -> list[dict]:
        ports = []
        for tunnel in self.tunnels:
            stats = tunnel.stats
            users, liveIn, liveOut = self.live.get(id(stats), (0, 0, 0))
            ports.append({
                "remote_port": tunnel.remote_port, **vhostOf(tunnel), "client": tunnel.name,
                "client_id": tunnel.clientId, "local_port": tunnel.local_port,
                "state": "online" if tunnel.online else "offline",
                "users_now": users, "users_total": stats.opened,
                "bytes_in": stats.bytesIn + liveIn, "bytes_out": stats.bytesOut + liveOut,
                "pool": len(tunnel.pool), **udpOf(tunnel),
            })
        ports.extend(self.leased())
        return sorted(ports, key=lambda port: port["remote_port"])

    def leased(self) -> list[dict]:
        """
        The ports held for a client that went (see L{gotunnel.server.leases}): no
        listener, no client id, counted under the lease holder's name.
        """
        leased = []
        for lease in self.registry.leases:
            stats = self.registry.stats.ports.get((lease.statsPort, lease.name))
            # Users spliced before the client went go on, counted live.
            users, liveIn, liveOut = self.live.get(id(stats), (0, 0, 0))
            udp = {} if lease.protocol == "tcp" else {
                "protocol": lease.protocol,
                "udp": datagramsOf(stats.datagrams if stats else None, 0)}
            leased.append({
                "remote_port": lease.remote_port, "client": lease.name, "client_id": None,
                "local_port": None, "state": "leased", "users_now": users,
                "users_total": stats.opened if stats else 0,
                "bytes_in": (stats.bytesIn if stats else 0) + liveIn,
                "bytes_out": (stats.bytesOut if stats else 0) + liveOut,
                "pool": 0, **udp,
            })
        return leased


def _answerLater(request, outcome: defer.Deferred) -> object:
    """Answer C{request} once C{outcome} fires with (code, body)."""

    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def answer(result) -> None:
        code, body = result
        if not gone:
            request.write(jsonAnswer(request, code, body))
            request.finish()

    outcome.addCallback(answer).addErrback(
        lambda failure: log.failure("admin endpoint: an action failed", failure))
    return server.NOT_DONE_YET


class AdminAPI(Resource):
    """Everything under /api/."""

    isLeaf = True

    def __init__(self, registry, auth: AdminAuth) -> None:
        super().__init__()
        self.registry = registry
        self.auth = auth
        self.reads: dict[bytes, Callable[[Snapshot], dict]] = {
            b"overview": lambda s: {"time": s.now, "clients": s.clients(), "ports": s.ports(),
                                    "connections": s.connections},
            b"clients": lambda s: {"clients": s.clients()},
            b"ports": lambda s: {"ports": s.ports()},
            b"connections": lambda s: {"connections": s.connections},
        }
        self.actions: dict[tuple[bytes, bytes], Callable[[str, object], object]] = {
            (b"clients", b"disconnect"): self.disconnectClient,
            (b"ports", b"offline"): self.portOffline,
            (b"ports", b"online"): self.portOnline,
            (b"connections", b"close"): self.closeConnection,
        }

    def render(self, request) -> object:
        if getattr(request, "bodyTooLarge", False):
            return jsonAnswer(request, 413, {"error": f"request body over {MAX_BODY} bytes"})
        path = request.postpath
        if path == [b"login"]:
            return self._method(request, b"POST") or self.login(request)
        refused = refusal(self.auth, request)
        if refused is not None:
            return refused
        if len(path) == 1 and path[0] in self.reads:
            return (self._method(request, b"GET")
                    or jsonAnswer(request, 200, self.reads[path[0]](Snapshot(self.registry))))
        if len(path) == 3 and (path[0], path[2]) in self.actions:
            action = self.actions[(path[0], path[2])]
            return self._method(request, b"POST") or action(path[1].decode("utf-8", "replace"),
                                                          request)
        return jsonAnswer(request, 404, {"error": "no such route"})

    def _method(self, request, allowed: bytes) -> Optional[bytes]:
        if request.method == allowed or (allowed == b"GET" and request.method == b"HEAD"):
            return None
        request.setHeader(b"allow", allowed)
        return jsonAnswer(request, 405, {"error": f"use {allowed.decode()}"})

    def login(self, request) -> bytes:
        if not self.auth.configured:
            return unauthorized(request)
        host = clientHost(request)
        wait = self.auth.waitFor(host)
        if wait > 0:
            return tooManyFailures(request, wait)
        try:
            body = json.loads(request.content.read().decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            return jsonAnswer(request, 400, {"error": 'expected {"token": ...} or '
                                                      '{"user": ..., "password": ...}'})
        session = self.auth.login(body)
        if session is None:
            self.auth.failed(host)
            log.warn("admin endpoint: a failed login from {host}", host=host)
            return jsonAnswer(request, 401, {"error": "wrong credentials"})
        self.auth.succeeded(host)
        log.info("admin endpoint: a login from {host}", host=host)
        return jsonAnswer(request, 200, {"session": session})

    def _tunnelOnPort(self, port: str):
        """
        The mapping of a public port (C{10053} for TCP, C{udp:10053}), or of
        a client id (a virtual host has no port).
        """
        if port.isdigit():
            return self.registry.tunnels.get(int(port))
        if port.startswith("udp:") and port[4:].isdigit():
            return self.registry.tunnels.get(("udp", int(port[4:])))
        for tunnel in list(self.registry.tunnels.values()):
            if tunnel.clientId == port and not tunnel.closed:
                return tunnel
        return None

    def disconnectClient(self, clientId: str, request) -> bytes:
        for tunnel in self.registry.allTunnels():
            if tunnel.clientId == clientId and not tunnel.closed:
                log.info("admin endpoint: disconnecting client {name} ({id}) at {peer}",
                         name=tunnel.name, id=clientId, peer=tunnel.channel.peerDescription)
                tunnel.close()
                tunnel.channel.transport.loseConnection()
                return jsonAnswer(request, 200, {"ok": True})
        return jsonAnswer(request, 404, {"error": f"no client {clientId}"})

    def portOffline(self, port: str, request) -> object:
        tunnel = self._tunnelOnPort(port)
        if tunnel is None:
            return jsonAnswer(request, 404, {"error": f"no published port {port}"})
        log.info("admin endpoint: port {remote_port} of {name} offline",
                 remote_port=tunnel.remote_port, name=tunnel.name)
        # As a client's offline_port does.
        return _answerLater(request, tunnel.stopListening().addCallback(
            lambda _: (200, {"ok": True})))

    def portOnline(self, port: str, request) -> object:
        tunnel = self._tunnelOnPort(port)
        if tunnel is None:
            return jsonAnswer(request, 404, {"error": f"no published port {port}"})
        if tunnel.online:
            return jsonAnswer(request, 200, {"ok": True})
        log.info("admin endpoint: port {remote_port} of {name} online",
                 remote_port=tunnel.remote_port, name=tunnel.name)

        def failed(failure):
            failure.trap(error.CannotListenError)
            log.error("cannot listen on port {remote_port} again: {reason}",
                      remote_port=tunnel.remote_port, reason=failure.value.socketError)
            return (409, {"error": f"cannot listen on port {tunnel.remote_port}: "
                                   f"{failure.value.socketError}"})

        # As a client's online_port does.
        return _answerLater(request, tunnel.listen().addCallbacks(
            lambda _: (200, {"ok": True}), failed))

    def closeConnection(self, connId: str, request) -> bytes:
        user = self.registry.stats.users.get(connId)
        if user is None:
            return jsonAnswer(request, 404, {"error": f"no connection {connId}"})
        log.info("admin endpoint: closing connection {conn} from {user}",
                 conn=connId, user=user.peerAddress)
        noteEnding(user, BY_ADMIN)
        # Through its relay end: a splice thread may hold its socket.
        closeConnectionOf(user, abort=True)
        return jsonAnswer(request, 200, {"ok": True})


class BoundedRequest(server.Request):
    """A request that keeps at most L{MAX_BODY} bytes of its body, and says if there were more."""

    bodyTooLarge = False
    _bodyLength = 0

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > MAX_BODY:
            self.bodyTooLarge = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._bodyLength += len(data)
        if self._bodyLength > MAX_BODY:
            self.bodyTooLarge = True
        if not self.bodyTooLarge:
            super().handleContentChunk(data)


class AdminSite(server.Site):
    """The admin site: bounded requests, short idle timeout, no access log."""

    requestFactory = BoundedRequest
    displayTracebacks = False
    noisy = False

    def log(self, request) -> None:
        # One line per request would drown the server's own lines (a
        # dashboard polls every second); what matters is logged by the API.
        pass


class AdmissionFactory(WrappingFactory):
    """
    Closes connections over L{MAX_CONNECTIONS} at once, or over
    L{MAX_CONNECTIONS_PER_ADDRESS} from one address, as they come.
    """

    noisy = False

    def __init__(self, wrappedFactory: Factory) -> None:
        super().__init__(wrappedFactory)
        self.perHost: dict[str, int] = {}
        self._gone: list[defer.Deferred] = []

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "?")
        if (len(self.protocols) >= MAX_CONNECTIONS
                or self.perHost.get(host, 0) >= MAX_CONNECTIONS_PER_ADDRESS):
            log.warn("admin endpoint: refusing a connection from {host}: too many at once",
                     host=host)
            return None
        protocol = super().buildProtocol(addr)
        protocol.admittedHost = host
        self.perHost[host] = self.perHost.get(host, 0) + 1
        return protocol

    def unregisterProtocol(self, protocol) -> None:
        super().unregisterProtocol(protocol)
        host = getattr(protocol, "admittedHost", None)
        left = self.perHost.get(host, 0) - 1
        if left > 0:
            self.perHost[host] = left
        else:
            self.perHost.pop(host, None)
        if not self.protocols:
            gone, self._gone = self._gone, []
            for waiter in gone:
                waiter.callback(None)

    def closeAll(self) -> defer.Deferred:
        """Close every connection; fires once all are gone."""
        if not self.protocols:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self._gone.append(waiter)
        for protocol in list(self.protocols):
            protocol.transport.abortConnection()
        return waiter


def adminSite(registry, auth: AdminAuth, metrics: Resource, reactor) -> AdminSite:
    """
    The admin site: the dashboard at /, the API under /api/, the metrics
    at /metrics.
    """
    from gotunnel.admin.dashboard import dashboardResource

    root = dashboardResource()
    root.putChild(b"api", AdminAPI(registry, auth))
    root.putChild(b"metrics", metrics)
    site = AdminSite(root, timeout=IDLE_TIMEOUT, reactor=reactor)
    return site

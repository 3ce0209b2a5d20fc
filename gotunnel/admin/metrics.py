"""
Prometheus metrics at /metrics on the admin endpoint: a collector that reads
the server's counts when scraped (nothing is counted twice, nothing on the
hot path), in a CollectorRegistry of the server's own, never the global one.

Every series is named gotunnel_...; per-port series are labelled with the
public port and the client's name, at most
L{gotunnel.server.accounting.MAX_PORT_STATS} label sets, the rest folded into
remote_port="other", client="other".
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
)
from twisted.web.resource import Resource

from gotunnel.server.accounting import ENDINGS, userBytes
from gotunnel.admin.auth import AdminAuth, refusal
from gotunnel.server.channelstates import Control

PORT_LABELS = ["remote_port", "client"]

DROP_REASONS = (("backed_up", "dropped_backed_up"), ("sessions", "dropped_sessions"),
                ("unknown_peer", "dropped_unknown"))
"""The reason label of a dropped datagram, and its L{DatagramCounters} field."""


def reasonLabel(how: str) -> str:
    """A connection's ending as a label value: user_closed, data_channel_timeout, ..."""
    return how.replace(" ", "_").replace("-", "_")


class TunnelCollector:
    """The server's counts as metric families, read at each scrape."""

    def __init__(self, registry) -> None:
        self.registry = registry

    def collect(self):
        opened, closed, refused, carried, active, setup, datagrams, dropped = self._perPort()
        clients, ports, pool, sessions = self._published()
        authFailures, admission = self._refusals()
        return [opened, closed, refused, carried, active, setup, clients, ports, pool,
                authFailures, admission, datagrams, dropped, sessions]

    def _liveUsers(self) -> dict[int, list[int]]:
        """Per port's stats (by id): users open now, and their bytes in and out so far."""
        live: dict[int, list[int]] = {}
        for user in list(self.registry.stats.users.values()):
            bytesIn, bytesOut = userBytes(user)
            counts = live.setdefault(id(user.tunnel.stats), [0, 0, 0])
            counts[0] += 1
            counts[1] += bytesIn
            counts[2] += bytesOut
        return live

    def _perPort(self) -> tuple:
        """The families labelled by public port and client, from their totals."""
        live = self._liveUsers()
        opened = CounterMetricFamily(
            "gotunnel_connections_opened", "User connections accepted on a public port",
            labels=PORT_LABELS)
        closed = CounterMetricFamily(
            "gotunnel_connections_closed", "User connections ended, by how they ended",
            labels=PORT_LABELS + ["reason"])
        refused = CounterMetricFamily(
            "gotunnel_connections_refused",
            "User connections closed before they reached the service, by why",
            labels=PORT_LABELS + ["reason"])
        carried = CounterMetricFamily(
            "gotunnel_bytes",
            "Bytes relayed: in = from users towards the service, out = from the service to users",
            labels=PORT_LABELS + ["direction"])
        active = GaugeMetricFamily(
            "gotunnel_active_users", "User connections open now", labels=PORT_LABELS)
        setup = HistogramMetricFamily(
            "gotunnel_data_channel_setup_seconds",
            "Seconds from a user's connect to its data channel's splice", labels=PORT_LABELS)
        datagrams = CounterMetricFamily(
            "gotunnel_udp_datagrams",
            "Datagrams a UDP port forwarded: in = from peers towards the service, out = back",
            labels=PORT_LABELS + ["direction"])
        dropped = CounterMetricFamily(
            "gotunnel_udp_dropped",
            "Datagrams a UDP port dropped, by why: backed_up, sessions, unknown_peer",
            labels=PORT_LABELS + ["reason"])
        for portStats in self.registry.stats.allPortStats():
            labels = [portStats.remote_port, portStats.client]
            counters = portStats.datagrams
            if counters is not None:
                datagrams.add_metric(labels + ["in"], counters.forwarded_in)
                datagrams.add_metric(labels + ["out"], counters.forwarded_out)
                for reason, field in DROP_REASONS:
                    dropped.add_metric(labels + [reason], getattr(counters, field))
            users, liveIn, liveOut = live.get(id(portStats), (0, 0, 0))
            opened.add_metric(labels, portStats.opened)
            for how in ENDINGS:
                closed.add_metric(labels + [reasonLabel(how)], portStats.ended.get(how, 0))
            for why, count in sorted(portStats.refused.items()):
                refused.add_metric(labels + [why], count)
            carried.add_metric(labels + ["in"], portStats.bytesIn + liveIn)
            carried.add_metric(labels + ["out"], portStats.bytesOut + liveOut)
            active.add_metric(labels, users)
            setup.add_metric(labels, portStats.setup.cumulative(), portStats.setup.sum)
        return opened, closed, refused, carried, active, setup, datagrams, dropped

    def _published(self) -> tuple:
        """The families of what is published now: clients, ports, pools, UDP peers."""
        registry = self.registry
        tunnels = [t for t in registry.allTunnels() if not t.closed]
        clients = GaugeMetricFamily(
            "gotunnel_clients", "Control channels registered now (one per client mapping)")
        clients.add_metric([], sum(1 for t in tunnels if isinstance(t.channel.state, Control)))
        ports = GaugeMetricFamily(
            "gotunnel_ports", "Published ports, by state", labels=["state"])
        ports.add_metric(["online"], sum(1 for t in tunnels if t.online))
        ports.add_metric(["offline"], sum(1 for t in tunnels if not t.online))
        ports.add_metric(["leased"], len(registry.leases))
        pool = GaugeMetricFamily(
            "gotunnel_pool_size", "Pooled data channels waiting for a user", labels=PORT_LABELS)
        sessions = GaugeMetricFamily(
            "gotunnel_udp_sessions", "Remote peers a UDP port serves now", labels=PORT_LABELS)
        for tunnel in tunnels:
            labels = [tunnel.stats.remote_port, tunnel.stats.client]
            pool.add_metric(labels, len(tunnel.pool))
            peers = getattr(tunnel, "peers", None)
            if peers is not None:
                sessions.add_metric(labels, len(peers))
        return clients, ports, pool, sessions

    def _refusals(self) -> tuple:
        """The families of connections refused before they were anyone's."""
        stats = self.registry.stats
        authFailures = CounterMetricFamily(
            "gotunnel_auth_failures",
            "Wrong credentials: endpoint=control (a client's token), admin (this endpoint)",
            labels=["endpoint"])
        for endpoint, count in sorted(stats.authFailures.items()):
            authFailures.add_metric([endpoint], count)
        admission = CounterMetricFamily(
            "gotunnel_admission_refusals",
            "Connections refused by a cap: pending (control-port connections yet to send "
            "a frame), waiting_users (users waiting for a data channel)", labels=["cap"])
        for cap, count in sorted(stats.admissionRefusals.items()):
            admission.add_metric([cap], count)
        return authFailures, admission


class MetricsPage(Resource):
    """/metrics: the text exposition format, behind the admin endpoint's auth."""

    isLeaf = True

    def __init__(self, registry, auth: AdminAuth) -> None:
        super().__init__()
        self.auth = auth
        self.collectors = CollectorRegistry(auto_describe=False)
        self.collectors.register(TunnelCollector(registry))

    def render_GET(self, request) -> bytes:
        refused = refusal(self.auth, request)
        if refused is not None:
            return refused
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self.collectors)

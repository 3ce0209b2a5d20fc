"""
/metrics on the admin endpoint, parsed with prometheus_client's own parser:
every series and its labels on a memory reactor, label sets bounded, byte
counters that never go down as connections end.
"""

from __future__ import annotations

from io import BytesIO

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from gotunnel.server import accounting
from gotunnel.admin.auth import AdminAuth
from gotunnel.admin.metrics import MetricsPage
from tests.test_server import ServerTestCase, dataChannel, register

ADMIN_TOKEN = "metrics-Token-0x9090"


class MetricsTestCase(ServerTestCase):
    """A registry on a memory reactor, and its /metrics page."""

    def setUp(self):
        super().setUp()
        self.page = MetricsPage(self.registry, AdminAuth(ADMIN_TOKEN, "", "", self.reactor))

    def scrape(self, token: str = ADMIN_TOKEN) -> dict:
        """{(sample name, frozenset of labels): value} of one scrape."""
        req = DummyRequest([])
        req.client = IPv4Address("TCP", "127.0.0.1", 50000)
        req.content = BytesIO()
        req.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])
        body = self.page.render_GET(req)
        self.assertIsNone(req.responseCode)
        [contentType] = req.responseHeaders.getRawHeaders(b"content-type")
        self.assertTrue(contentType.startswith(b"text/plain; version="), contentType)
        samples = {}
        for family in text_string_to_metric_families(body.decode("utf-8")):
            self.assertTrue(family.name.startswith("gotunnel_"), family.name)
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples


class MetricsTests(MetricsTestCase):
    def test_unauthorized(self):
        req = DummyRequest([])
        req.client = IPv4Address("TCP", "127.0.0.1", 50000)
        body = self.page.render_GET(req)
        self.assertEqual(req.responseCode, 401)
        self.assertEqual(body, b'{"error": "unauthorized"}')

    def test_everySeries(self):
        """
        Connections opened, closed and refused by reason, bytes each way,
        active users, clients, pool, setup latency, auth failures and
        admission refusals, per public port and client name.
        """
        self.registered()
        self.connect().send(register(token="wrong"))
        port = {("remote_port", "10022"), ("client", "edge-1")}
        first = self.connectUser()
        first.protocol.dataReceived(b"abc")
        self.reactor.advance(0.003)
        self.connect().send(dataChannel("conn-1") + b"hello")
        second = self.connectUser()
        self.reactor.advance(self.settings.data_channel_timeout)
        second.protocol.connectionLost(Failure(error.ConnectionDone()))
        samples = self.scrape()

        def value(name, **labels):
            key = (name, frozenset(labels.items()) | frozenset(port))
            return samples[key]

        self.assertEqual(value("gotunnel_connections_opened_total"), 2)
        self.assertEqual(value("gotunnel_connections_closed_total",
                               reason="data_channel_timeout"), 1)
        self.assertEqual(value("gotunnel_connections_closed_total", reason="user_closed"), 0)
        self.assertEqual(value("gotunnel_connections_refused_total",
                               reason="data_channel_timeout"), 1)
        self.assertEqual(value("gotunnel_bytes_total", direction="in"), 3)
        self.assertEqual(value("gotunnel_bytes_total", direction="out"), 5)
        self.assertEqual(value("gotunnel_active_users"), 1)
        self.assertEqual(value("gotunnel_pool_size"), 0)
        self.assertEqual(value("gotunnel_data_channel_setup_seconds_count"), 1)
        self.assertEqual(value("gotunnel_data_channel_setup_seconds_bucket", le="0.0025"), 0)
        self.assertEqual(value("gotunnel_data_channel_setup_seconds_bucket", le="0.005"), 1)
        self.assertEqual(value("gotunnel_data_channel_setup_seconds_bucket", le="+Inf"), 1)
        self.assertEqual(samples[("gotunnel_clients", frozenset())], 1)
        self.assertEqual(samples[("gotunnel_ports", frozenset({("state", "online")}))], 1)
        self.assertEqual(samples[("gotunnel_auth_failures_total",
                                  frozenset({("endpoint", "control")}))], 1)
        self.assertEqual(samples[("gotunnel_admission_refusals_total",
                                  frozenset({("cap", "pending")}))], 0)

    def test_bytesNeverGoDown(self):
        """A connection's bytes stay in the port's counter once it ends."""
        self.registered()
        user = self.connectUser()
        data = self.connect()
        data.send(dataChannel("conn-1") + b"0123456789")
        key = ("gotunnel_bytes_total", frozenset({("remote_port", "10022"),
                                                  ("client", "edge-1"), ("direction", "out")}))
        self.assertEqual(self.scrape()[key], 10)
        user.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.scrape()[key], 10)

    def test_leasedPortsCounted(self):
        """gotunnel_ports{state="leased"} counts the ports held for clients that went."""
        self.registered()
        self.registered(remote_port=10023, name="edge-2").lose()
        self.assertIsNotNone(self.registry.leases.get(10023))
        samples = self.scrape()
        self.assertEqual({state: samples[("gotunnel_ports", frozenset({("state", state)}))]
                          for state in ("online", "offline", "leased")},
                         {"online": 1, "offline": 0, "leased": 1})
        self.reactor.advance(self.settings.port_lease)
        self.assertEqual(self.scrape()[("gotunnel_ports", frozenset({("state", "leased")}))], 0)

    def test_labelSetsBounded(self):
        """
        Past the cap on label sets, ports no tunnel holds are folded into
        remote_port="other", client="other", and the series stay bounded.
        """
        self.patch(accounting, "MAX_PORT_STATS", 3)
        for i in range(10):
            control = self.registered(remote_port=11000 + i, name=f"client-{i}")
            user = self.connectUser(11000 + i)
            user.protocol.connectionLost(Failure(error.ConnectionDone()))
            control.lose()
        samples = self.scrape()
        opened = {dict(labels)["remote_port"]: value
                  for (name, labels), value in samples.items()
                  if name == "gotunnel_connections_opened_total"}
        self.assertEqual(len(opened), 4)
        self.assertEqual(opened["other"], 7)
        self.assertEqual(sum(opened.values()), 10)


class DocumentedTests(MetricsTestCase):
    def test_everyMetricDocumented(self):
        """docs/operations.md's table names exactly the series /metrics serves."""
        import os
        import re

        path = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "operations.md")
        with open(path, encoding="utf-8") as f:
            documented = set(re.findall(r"^\| `(gotunnel_[a-z_]+)` \|", f.read(), re.M))
        self.registered()
        user = self.connectUser()
        self.connect().send(dataChannel("conn-1"))
        user.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.connectUser()
        self.reactor.advance(self.settings.data_channel_timeout)
        # And a UDP mapping, for its own series.
        from tests.test_udp import FakeUDPPort

        self.reactor.listenUDP = (lambda port, protocol, interface="", maxPacketSize=0:
                                  FakeUDPPort(port, protocol, interface))
        self.connect().send(register(remote_port=10053, protocol="udp"))
        served = {re.sub(r"_(bucket|sum|count)$", "", name) for name, _ in self.scrape()}
        self.assertEqual(documented, served)

    def test_configExample(self):
        """The admin endpoint's YAML example in docs/operations.md reads as it says."""
        import os
        import re

        import yaml

        from gotunnel.config.yamlfile import ConfigFile

        path = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "operations.md")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        block = re.search(r"```yaml\n(server:\n  admin:.*?)```", text, re.S).group(1)
        values = ConfigFile(path, yaml.safe_load(block),
                            yaml.load(block, Loader=yaml.BaseLoader)).serverValues()
        self.assertEqual(values["admin"], "tcp:7400:interface=127.0.0.1")
        self.assertEqual((values["admin_user"], values["admin_password"]), ("ops", "a-password"))
        self.assertTrue(values["admin_token"])

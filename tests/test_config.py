"""
config.yaml and the command line, in this process: every key of the Go
gotunnel's config and of ours, the Go template shape for either role, the
options overriding the file, each kind of bad file, and the log level and
language in front of the observers of the console scripts and of twistd.
"""

from __future__ import annotations

import io
import os
import sys
import textwrap
import time

from twisted.logger import ILogObserver, LogLevel, formatEvent
from twisted.python import usage
from twisted.trial import unittest
from zope.interface import implementer

from gotunnel import logs
from gotunnel.config.mappings import Mapping
from gotunnel.config.settings import ClientSettings, ServerSettings
from gotunnel.config.yamlfile import ConfigError, readConfigFile
from gotunnel.cli.tap import ClientOptions, ServerOptions
from tests.support import temporaryDirectory

# The Go project's config_template.yaml, values filled in.
GO_TEMPLATE = """\
server:
  addr: "0.0.0.0:17000"     # listen address
  log_level: "info"
  log_lang: "zh"
  token: "your-secret-token"

client:
  name: "example-client"
  token: "your-secret-token"
  server_addr: "203.0.113.5:17000"
  local_ports: [8080]
  remote_port: 10086
  log_level: "info"
  log_lang: "zh"
  heartbeat_interval: 10
  health_check_interval: 30
"""


class ConfigTestCase(unittest.TestCase):
    def setUp(self):
        self.directory = temporaryDirectory(self)

    def write(self, text: str, name: str = "config.yaml") -> str:
        path = os.path.join(self.directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))
        return path

    def server(self, text: str, *argv: str) -> ServerSettings:
        options = ServerOptions()
        options.parseOptions(["--config", self.write(text), *argv])
        return options.settings()

    def client(self, text: str, *argv: str) -> ClientSettings:
        options = ClientOptions()
        options.parseOptions(["--config", self.write(text), *argv])
        return options.settings()

    def assertConfigError(self, role: str, text: str, *expected: str, argv=()) -> str:
        """Parsing C{text} for C{role} fails with one line naming the file and C{expected}."""
        options = ServerOptions() if role == "server" else ClientOptions()
        path = self.write(text)
        with self.assertRaises(ConfigError) as caught:
            options.parseOptions(["--config", path, *argv])
        message = str(caught.exception)
        self.assertTrue(message.startswith(f"{path}: "), message)
        self.assertNotIn("\n", message)
        for part in expected:
            self.assertIn(part, message)
        return message


class GoServerKeysTests(ConfigTestCase):
    def test_addr(self):
        """server.addr as Go writes it: all interfaces, one address, IPv6, or :PORT."""
        for addr, listen in [("0.0.0.0:17000", "tcp:17000:interface=0.0.0.0"),
                             ("127.0.0.1:17001", "tcp:17001:interface=127.0.0.1"),
                             ("localhost:17002", "tcp:17002:interface=localhost"),
                             ("[::]:17003", r"tcp:17003:interface=\:\:"),
                             (":17004", "tcp:17004")]:
            settings = self.server(f"server:\n  addr: '{addr}'\n  token: t\n")
            self.assertEqual(settings.listen, listen, addr)

    def test_token(self):
        self.assertEqual(self.server("server:\n  token: s3cret\n").token, "s3cret")

    def test_tokenAsWritten(self):
        """A token YAML would read as a number or a boolean is the text written."""
        for written in ["0123", "123456", "1e3", "yes", "12:30"]:
            settings = self.server(f"server:\n  token: {written}\n")
            self.assertEqual(settings.token, written)

    def test_logLevel(self):
        for written, level in [("debug", "debug"), ("info", "info"), ("warn", "warn"),
                               ("warning", "warn"), ("ERROR", "error")]:
            settings = self.server(f"server:\n  token: t\n  log_level: {written}\n")
            self.assertEqual(settings.log_level, level, written)

    def test_logLang(self):
        for lang in ["en", "zh"]:
            settings = self.server(f"server:\n  token: t\n  log_lang: {lang}\n")
            self.assertEqual(settings.log_lang, lang)

    def test_defaults(self):
        """Keys left out keep the defaults the Go server has (and ours)."""
        settings = self.server("server:\n  token: t\n")
        self.assertEqual(settings, ServerSettings(token="t"))
        self.assertEqual((settings.listen, settings.log_level, settings.log_lang),
                         ("tcp:17000", "info", "en"))

    def test_emptyValueMeansDefault(self):
        """A key with no value is left at its default, as Go leaves a zero value."""
        settings = self.server("server:\n  token: t\n  addr:\n  log_level:\n")
        self.assertEqual(settings, ServerSettings(token="t"))


class GoClientKeysTests(ConfigTestCase):
    BASE = "client:\n  token: t\n  local_ports: [22]\n"

    def test_name(self):
        self.assertEqual(self.client(self.BASE + "  name: office-pc\n").name, "office-pc")

    def test_nameDefaultsToHostName(self):
        self.assertEqual(self.client(self.BASE).name, ClientSettings().name)

    def test_token(self):
        self.assertEqual(self.client(self.BASE.replace("t\n", "s3cret\n", 1)).token, "s3cret")

    def test_serverAddr(self):
        for addr, endpoint in [("203.0.113.5:17000", "tcp:203.0.113.5:17000"),
                               ("tunnel.example.com:18000", "tcp:tunnel.example.com:18000"),
                               ("[::1]:17000", r"tcp:\:\:1:17000"),
                               (":17000", "tcp:127.0.0.1:17000")]:
            settings = self.client(self.BASE + f"  server_addr: '{addr}'\n")
            self.assertEqual(settings.server, endpoint, addr)

    def test_localPortsAndRemotePort(self):
        settings = self.client("client:\n  token: t\n  local_ports: [8080]\n"
                               "  remote_port: 10086\n")
        self.assertEqual(settings.mappings, [Mapping("127.0.0.1", 8080, 10086)])

    def test_remotePortDefault(self):
        """remote_port defaults to 10022, as in Go."""
        settings = self.client("client:\n  token: t\n  local_ports: [22]\n")
        self.assertEqual(settings.mappings, [Mapping("127.0.0.1", 22, 10022)])

    def test_localPortsOneNumber(self):
        settings = self.client("client:\n  token: t\n  local_ports: 5432\n  remote_port: 15432\n")
        self.assertEqual(settings.mappings, [Mapping("127.0.0.1", 5432, 15432)])

    def test_localPortsSeveral(self):
        """The first local port goes on remote_port, each next one on the port after."""
        settings = self.client("client:\n  token: t\n  local_ports: [22, 80, 443]\n"
                               "  remote_port: 10022\n")
        self.assertEqual(settings.mappings, [Mapping("127.0.0.1", 22, 10022),
                                             Mapping("127.0.0.1", 80, 10023),
                                             Mapping("127.0.0.1", 443, 10024)])

    def test_intervals(self):
        settings = self.client(self.BASE + "  heartbeat_interval: 5\n"
                               "  health_check_interval: 2.5\n")
        self.assertEqual((settings.heartbeat_interval, settings.health_check_interval),
                         (5.0, 2.5))

    def test_intervalDefaults(self):
        settings = self.client(self.BASE)
        self.assertEqual((settings.heartbeat_interval, settings.health_check_interval),
                         (10.0, 30.0))

    def test_logLevelAndLang(self):
        settings = self.client(self.BASE + "  log_level: warning\n  log_lang: zh\n")
        self.assertEqual((settings.log_level, settings.log_lang), ("warn", "zh"))

    def test_logDefaults(self):
        settings = self.client(self.BASE)
        self.assertEqual((settings.log_level, settings.log_lang), ("info", "en"))


class OurKeysTests(ConfigTestCase):
    def test_serverListenWinsOverAddr(self):
        settings = self.server("server:\n  token: t\n  addr: '0.0.0.0:17000'\n"
                               "  listen: 'tcp:17443:interface=127.0.0.1'\n")
        self.assertEqual(settings.listen, "tcp:17443:interface=127.0.0.1")

    def test_serverTimeoutsAndInterface(self):
        settings = self.server("server:\n  token: t\n  public_interface: '::'\n"
                               "  data_channel_timeout: 5\n  heartbeat_timeout: 90.5\n")
        self.assertEqual((settings.public_interface, settings.data_channel_timeout,
                          settings.heartbeat_timeout), ("::", 5.0, 90.5))

    def test_allowPorts(self):
        settings = self.server("server:\n  token: t\n"
                               "  allow_ports: [22, '10000-10100', '8080']\n")
        self.assertEqual(settings.allow_ports,
                         (range(22, 23), range(10000, 10101), range(8080, 8081)))
        self.assertIn(10100, settings.allow_ports[1])

    def test_allowPortsDefault(self):
        """No allow_ports: every port (an empty tuple)."""
        self.assertEqual(self.server("server:\n  token: t\n").allow_ports, ())

    def test_clientServerWinsOverServerAddr(self):
        settings = self.client("client:\n  token: t\n  local_ports: 22\n"
                               "  server_addr: '127.0.0.1:17000'\n"
                               "  server: 'tls:tunnel.example.com:17000'\n")
        self.assertEqual(settings.server, "tls:tunnel.example.com:17000")

    def test_tunnels(self):
        settings = self.client("""\
            client:
              token: t
              tunnels:
                - {local_port: 22, remote_port: 10022}
                - local_host: 192.168.1.10
                  local_port: 80
                  remote_port: 18080
            """)
        self.assertEqual(settings.mappings, [Mapping("127.0.0.1", 22, 10022),
                                             Mapping("192.168.1.10", 80, 18080)])

    def test_localPortsAndTunnelsTogether(self):
        settings = self.client("client:\n  token: t\n  local_ports: [22]\n"
                               "  tunnels: [{local_port: 80, remote_port: 18080}]\n")
        self.assertEqual(settings.mappings, [Mapping("127.0.0.1", 22, 10022),
                                             Mapping("127.0.0.1", 80, 18080)])


class GoTemplateTests(ConfigTestCase):
    def test_serverRole(self):
        """Both sections in one file: the server takes server: only."""
        settings = self.server(GO_TEMPLATE)
        self.assertEqual(settings, ServerSettings(listen="tcp:17000:interface=0.0.0.0",
                                                  token="your-secret-token", log_lang="zh"))

    def test_clientRole(self):
        settings = self.client(GO_TEMPLATE)
        self.assertEqual(settings, ClientSettings(
            server="tcp:203.0.113.5:17000", token="your-secret-token", name="example-client",
            mappings=[Mapping("127.0.0.1", 8080, 10086)], log_lang="zh"))

    def test_otherSectionIgnored(self):
        """Each role reads its own section only: the other's keys are not its business."""
        settings = self.server("server:\n  token: t\nclient:\n  surprise: 1\n  remote_port: x\n")
        self.assertEqual(settings.token, "t")
        settings = self.client("client:\n  token: t\n  local_ports: 22\nserver:\n  what: 1\n")
        self.assertEqual(settings.token, "t")

    def test_sectionMissing(self):
        """A file without the role's section leaves everything to the options."""
        settings = self.server("client:\n  token: c\n", "--token", "s")
        self.assertEqual(settings, ServerSettings(token="s"))

    def test_emptyFile(self):
        self.assertEqual(self.server("", "--token", "s"), ServerSettings(token="s"))


class DocumentedExampleTests(ConfigTestCase):
    def example(self) -> str:
        """The first YAML block of docs/configuration.md."""
        path = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "configuration.md")
        with open(path, encoding="utf-8") as f:
            return f.read().split("```yaml\n", 1)[1].split("```", 1)[0]

    def test_server(self):
        self.assertEqual(self.server(self.example()), ServerSettings(
            listen="tcp:17000:interface=0.0.0.0", token="a-long-random-secret",
            allow_ports=(range(22, 23), range(10000, 10101), range(15432, 15433))))

    def test_serverAllowsTheClient(self):
        """The example's server accepts every port the example's client asks for."""
        allowed = self.server(self.example()).allow_ports
        for mapping in self.client(self.example()).mappings:
            self.assertTrue(any(mapping.remote_port in ports for ports in allowed),
                            f"the example's server.allow_ports refuses {mapping}")

    def test_client(self):
        self.assertEqual(self.client(self.example()), ClientSettings(
            server="tcp:tunnel.example.com:17000", token="a-long-random-secret",
            name="office-pc", mappings=[Mapping("127.0.0.1", 22, 10022),
                                        Mapping("127.0.0.1", 80, 10023),
                                        Mapping("192.168.1.20", 5432, 15432)]))


class CommandLineOverridesFileTests(ConfigTestCase):
    SERVER = """\
        server:
          addr: "0.0.0.0:17000"
          token: from-file
          public_interface: 127.0.0.1
          data_channel_timeout: 5
          heartbeat_timeout: 6
          log_level: debug
          log_lang: zh
        """
    CLIENT = """\
        client:
          name: file-name
          token: from-file
          server_addr: "127.0.0.1:17000"
          local_ports: [22]
          heartbeat_interval: 3
          health_check_interval: 4
          log_level: debug
          log_lang: zh
        """

    def test_server(self):
        settings = self.server(
            self.SERVER, "--listen", "tcp:18000", "--token", "from-cli",
            "--public-interface", "::", "--data-timeout", "50", "--heartbeat-timeout", "60",
            "--log-level", "error", "--log-lang", "en")
        self.assertEqual(settings, ServerSettings(
            listen="tcp:18000", token="from-cli", public_interface="::",
            data_channel_timeout=50.0, heartbeat_timeout=60.0, log_level="error",
            log_lang="en"))

    def test_serverFileKeepsWhatIsNotGiven(self):
        settings = self.server(self.SERVER, "--token", "from-cli")
        self.assertEqual(settings, ServerSettings(
            listen="tcp:17000:interface=0.0.0.0", token="from-cli",
            public_interface="127.0.0.1", data_channel_timeout=5.0, heartbeat_timeout=6.0,
            log_level="debug", log_lang="zh"))

    def test_client(self):
        settings = self.client(
            self.CLIENT, "--server", "tcp:example.com:1", "--token", "from-cli",
            "--name", "cli-name", "--map", "80:18080", "--heartbeat-interval", "30",
            "--health-check-interval", "40", "--log-level", "warn", "--log-lang", "en")
        self.assertEqual(settings, ClientSettings(
            server="tcp:example.com:1", token="from-cli", name="cli-name",
            mappings=[Mapping("127.0.0.1", 80, 18080)], heartbeat_interval=30.0,
            health_check_interval=40.0, log_level="warn", log_lang="en"))

    def test_clientFileKeepsWhatIsNotGiven(self):
        settings = self.client(self.CLIENT, "--token", "from-cli")
        self.assertEqual(settings, ClientSettings(
            server="tcp:127.0.0.1:17000", token="from-cli", name="file-name",
            mappings=[Mapping("127.0.0.1", 22, 10022)], heartbeat_interval=3.0,
            health_check_interval=4.0, log_level="debug", log_lang="zh"))

    def test_noFileSameAsBefore(self):
        """Without a config file, the options and their defaults are what they were."""
        options = ServerOptions()
        cwd = os.getcwd()
        os.chdir(self.directory)
        self.addCleanup(os.chdir, cwd)
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--token", "T"])
        self.assertEqual(options.settings(),
                         ServerSettings(listen="tcp:0:interface=127.0.0.1", token="T"))
        options = ClientOptions()
        options.parseOptions(["--server", "tcp:127.0.0.1:1", "--token", "T",
                              "--map", "2:3", "--map", "4:5"])
        self.assertEqual(options.settings().mappings,
                         [Mapping("127.0.0.1", 2, 3), Mapping("127.0.0.1", 4, 5)])


class ConfigFileFoundTests(ConfigTestCase):
    def setUp(self):
        super().setUp()
        cwd = os.getcwd()
        os.chdir(self.directory)
        self.addCleanup(os.chdir, cwd)

    def test_configYamlInWorkingDirectory(self):
        """./config.yaml is read when it exists, as the Go binaries do."""
        self.write("server:\n  token: here\n")
        options = ServerOptions()
        options.parseOptions([])
        self.assertEqual(options.settings().token, "here")

    def test_configOptionWins(self):
        """--config names another file; ./config.yaml is then not read."""
        self.write("server:\n  token: here\n")
        other = self.write("server:\n  token: there\n", "other.yaml")
        options = ServerOptions()
        options.parseOptions(["-c", other])
        self.assertEqual(options.settings().token, "there")

    def test_errorNamesTheFileAsFound(self):
        self.write("server:\n  tokne: t\n")
        with self.assertRaises(ConfigError) as caught:
            ServerOptions().parseOptions([])
        self.assertEqual(str(caught.exception),
                         "config.yaml: server.tokne is not a known key "
                         "(did you mean server.token?)")


class BadConfigTests(ConfigTestCase):
    def test_unknownKey(self):
        self.assertConfigError("client", "client:\n  token: t\n  remote_prot: 1\n",
                               "client.remote_prot is not a known key",
                               "did you mean client.remote_port?")

    def test_unknownSection(self):
        self.assertConfigError("server", "server:\n  token: t\nlogging:\n  level: 1\n",
                               "unknown section 'logging'")

    def test_notSections(self):
        self.assertConfigError("server", "- server\n", "expected server: and/or client:")

    def test_sectionNotAMapping(self):
        self.assertConfigError("server", "server: [1, 2]\n", "server must be a mapping")

    def test_wrongTypes(self):
        for role, text, key in [
                ("client", "client:\n  token: t\n  remote_port: 'ssh'\n", "client.remote_port"),
                ("client", "client:\n  token: t\n  remote_port: '-1'\n", "client.remote_port"),
                ("client", "client:\n  token: t\n  local_ports: [ssh]\n", "client.local_ports[0]"),
                ("client", "client:\n  token: t\n  local_ports: 22\n  heartbeat_interval: fast\n",
                 "client.heartbeat_interval"),
                ("client", "client:\n  token: t\n  local_ports: 22\n"
                 "  health_check_interval: true\n", "client.health_check_interval"),
                ("client", "client:\n  token: [a, b]\n", "client.token"),
                ("client", "client:\n  token: t\n  tunnels: [22]\n", "client.tunnels[0]"),
                ("server", "server:\n  token: {a: 1}\n", "server.token"),
                ("server", "server:\n  token: t\n  addr: 17000\n", "server.addr"),
                ("server", "server:\n  token: t\n  addr: 'host'\n", "server.addr"),
                ("server", "server:\n  token: t\n  data_channel_timeout: 0\n",
                 "server.data_channel_timeout"),
                ("server", "server:\n  token: t\n  log_level: loud\n", "server.log_level"),
                ("server", "server:\n  token: t\n  log_lang: fr\n", "server.log_lang"),
                ("server", "server:\n  token: t\n  allow_ports: ['1-x']\n",
                 "server.allow_ports[0]"),
                ("server", "server:\n  token: t\n  allow_ports: ['200-100']\n",
                 "server.allow_ports[0]")]:
            self.assertConfigError(role, text, f"{key} must be")

    def test_portOutOfRange(self):
        message = self.assertConfigError(
            "client", "client:\n  token: t\n  local_ports: [22]\n  remote_port: 70000\n")
        self.assertTrue(message.endswith(
            ": client.remote_port must be from 1 to 65535, got 70000"), message)
        for role, text, key in [
                ("client", "client:\n  token: t\n  local_ports: [0]\n", "client.local_ports[0]"),
                ("client", "client:\n  token: t\n  server_addr: 'h:65536'\n",
                 "the port in client.server_addr"),
                ("server", "server:\n  token: t\n  addr: '0.0.0.0:0'\n",
                 "the port in server.addr"),
                ("server", "server:\n  token: t\n  allow_ports: [65536]\n",
                 "server.allow_ports[0]")]:
            self.assertConfigError(role, text, f"{key} must be from 1 to 65535")
        # 0 asks the server to choose.
        self.assertConfigError(
            "client", "client:\n  token: t\n  tunnels:\n    - {local_port: 22, remote_port: 99999}\n",
            "client.tunnels[0].remote_port must be from 0 to 65535")

    def test_localPortsRunPast65535(self):
        self.assertConfigError(
            "client", "client:\n  token: t\n  local_ports: [1, 2]\n  remote_port: 65535\n",
            "client.local_ports", "65536 is above 65535")

    def test_tcpAndUdpOfOneRemotePort(self):
        """TCP 10053 and UDP 10053 are two ports: a client may publish both."""
        path = self.write("client:\n  token: t\n  tunnels:\n"
                          "    - {local_port: 53, remote_port: 10053, protocol: udp}\n"
                          "    - {local_port: 53, remote_port: 10053}\n")
        options = ClientOptions()
        options.parseOptions(["--config", path])
        self.assertEqual([(m.protocol, m.remote_port) for m in options.settings().mappings],
                         [("udp", 10053), ("tcp", 10053)])
        options = ClientOptions()
        options.parseOptions(["--token", "t", "--map", "udp:53:10053", "--map", "53:10053"])
        self.assertEqual(len(options.settings().mappings), 2)

    def test_udpRemotePortTwice(self):
        self.assertConfigError(
            "client", "client:\n  token: t\n  tunnels:\n"
            "    - {local_port: 53, remote_port: 10053, protocol: udp}\n"
            "    - {local_port: 54, remote_port: 10053, protocol: udp}\n",
            "UDP remote port 10053 is published twice")
        with self.assertRaises(usage.UsageError) as caught:
            ClientOptions().parseOptions(["--token", "t", "--map", "udp:53:10053",
                                          "--map", "udp:54:10053"])
        self.assertIn("same remote port", str(caught.exception))

    def test_remotePortTwice(self):
        self.assertConfigError(
            "client", "client:\n  token: t\n  local_ports: [22]\n"
            "  tunnels: [{local_port: 80, remote_port: 10022}]\n",
            "remote port 10022 is published twice")

    def test_tunnelKeys(self):
        self.assertConfigError("client", "client:\n  token: t\n  tunnels: [{local_port: 1}]\n",
                               "client.tunnels[0].remote_port is missing")
        self.assertConfigError(
            "client", "client:\n  token: t\n  tunnels: [{local_port: 1, remote_port: 2, x: 3}]\n",
            "client.tunnels[0].x is not a known key")

    def test_missingToken(self):
        self.assertConfigError("server", "server:\n  addr: ':17000'\n",
                               "server.token is missing", "--token")
        self.assertConfigError("client", "client:\n  local_ports: 22\n",
                               "client.token is missing", "--token")
        self.assertConfigError("client", "client:\n  token: ''\n  local_ports: 22\n",
                               "client.token is missing")

    def test_nothingToPublish(self):
        self.assertConfigError("client", "client:\n  token: t\n",
                               "client.local_ports", "client.tunnels", "--map")

    def test_badFileEvenWhenOptionsOverrideIt(self):
        """The file is checked whole: an option that overrides a bad key does not hide it."""
        self.assertConfigError("client", "client:\n  token: t\n  remote_port: 0\n",
                               "client.remote_port", argv=["--map", "1:2"])

    def test_unreadable(self):
        path = os.path.join(self.directory, "missing.yaml")
        with self.assertRaises(ConfigError) as caught:
            ServerOptions().parseOptions(["--config", path])
        self.assertEqual(str(caught.exception),
                         f"{path}: cannot read it: No such file or directory")
        with self.assertRaises(ConfigError) as caught:
            ServerOptions().parseOptions(["--config", self.directory])
        self.assertEqual(str(caught.exception), f"{self.directory}: cannot read it: "
                         "Is a directory")

    def test_yamlSyntax(self):
        self.assertConfigError("server", "server:\n  token: [t\n  addr: x\n",
                               "not valid YAML at line 3, column 7")

    def test_notUtf8(self):
        path = os.path.join(self.directory, "latin1.yaml")
        with open(path, "wb") as f:
            f.write(b"server:\n  token: caf\xe9\n")
        with self.assertRaises(ConfigError) as caught:
            readConfigFile(path)
        self.assertIn(f"{path}: not UTF-8 text", str(caught.exception))

    def test_configErrorIsAUsageError(self):
        """twistd reports a bad file as it reports bad options."""
        self.assertTrue(issubclass(ConfigError, usage.UsageError))


def event(level: LogLevel, fmt: str = "message at {where}", namespace: str = "gotunnel.x",
          **fields) -> dict:
    return dict(log_level=level, log_format=fmt, log_namespace=namespace,
                log_time=time.time(), where=level.name, **fields)


class LeveledObserverTests(unittest.TestCase):
    def levelsPassed(self, level: str) -> list[str]:
        seen: list[dict] = []
        observer = logs.leveledObserver(seen.append, level)
        for eventLevel in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error,
                           LogLevel.critical):
            observer(event(eventLevel))
        return [e["log_level"].name for e in seen]

    def test_debug(self):
        self.assertEqual(self.levelsPassed("debug"),
                         ["debug", "info", "warn", "error", "critical"])

    def test_info(self):
        """At info (the default), debug events are dropped."""
        self.assertEqual(self.levelsPassed("info"), ["info", "warn", "error", "critical"])

    def test_warn(self):
        self.assertEqual(self.levelsPassed("warn"), ["warn", "error", "critical"])

    def test_error(self):
        self.assertEqual(self.levelsPassed("error"), ["error", "critical"])

    def test_otherNamespacesToo(self):
        """The level applies to Twisted's own events as well as gotunnel's."""
        seen: list[dict] = []
        observer = logs.leveledObserver(seen.append, "warn")
        observer(event(LogLevel.info, namespace="twisted.internet.base"))
        self.assertEqual(seen, [])

    def test_translated(self):
        seen: list[dict] = []
        observer = logs.leveledObserver(seen.append, "info", "zh")
        observer(event(LogLevel.info, "public port {remote_port} stopped", remote_port=10022))
        self.assertNotIn("public port", formatEvent(seen[0]))
        self.assertIn("10022", formatEvent(seen[0]))

    def test_english(self):
        seen: list[dict] = []
        observer = logs.leveledObserver(seen.append, "info", "en")
        observer(event(LogLevel.info, "public port {remote_port} stopped", remote_port=10022))
        self.assertEqual(formatEvent(seen[0]), "public port 10022 stopped")


class TwistdLoggingTests(unittest.TestCase):
    """
    Under twistd, the plugin's options point twistd's --logger at an
    observer that filters and translates in front of the one twistd would
    have chosen.
    """

    def setUp(self):
        self.patch(logs, "_underTwistd", dict(logs._underTwistd))
        self.directory = temporaryDirectory(self)
        cwd = os.getcwd()
        os.chdir(self.directory)
        self.addCleanup(os.chdir, cwd)

    def twistdOptions(self, *argv: str):
        from twisted.scripts.twistd import ServerOptions as TwistdOptions

        config = TwistdOptions()
        config.parseOptions(list(argv))
        return config

    def events(self, observer) -> None:
        for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error):
            observer(event(level))

    def test_stdout(self):
        """twistd -n: stdout, at the level asked for."""
        config = self.twistdOptions("-n", "--pidfile=", "gotunnel-server", "--token", "t",
                                    "--log-level", "warn")
        self.assertIs(config["logger"], logs.twistdObserver)
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.events(config["logger"]())
        self.assertEqual([line.split("] ", 1)[1] for line in stdout.getvalue().splitlines()],
                         ["message at warn", "message at error"])

    def test_ownLogger(self):
        """A person's own --logger still gets the events, filtered."""
        config = self.twistdOptions(
            "-n", "--pidfile=", "--logger", "tests.test_config.collectingObserver",
            "gotunnel-server", "--token", "t", "--log-level", "error")
        self.events(config["logger"]())
        self.assertEqual([e["where"] for e in collected], ["error"])

    def test_defaultLevelFromFile(self):
        """Without --log-level, the file's log_level applies under twistd too."""
        with open("config.yaml", "w") as f:
            f.write("server:\n  token: t\n  log_level: debug\n  log_lang: zh\n")
        config = self.twistdOptions("-n", "--pidfile=", "gotunnel-server")
        self.assertEqual((logs._underTwistd["level"], logs._underTwistd["lang"]),
                         ("debug", "zh"))
        self.assertIs(config["logger"], logs.twistdObserver)

    def test_consoleScriptsLeaveTwistdAlone(self):
        """Options parsed outside twistd record nothing for it."""
        before = dict(logs._underTwistd)
        ServerOptions().parseOptions(["--token", "t", "--log-level", "error"])
        self.assertEqual(logs._underTwistd, before)


collected: list[dict] = []


@implementer(ILogObserver)
class CollectingObserver:
    def __call__(self, event: dict) -> None:
        collected.append(event)


def collectingObserver() -> ILogObserver:
    """A --logger factory for L{TwistdLoggingTests.test_ownLogger}."""
    del collected[:]
    return CollectingObserver()


class EndpointCheckTests(ConfigTestCase):
    def test_unreadableCertificateNamed(self):
        """An ssl: endpoint whose key file is missing is refused while parsing, naming the key."""
        error = self.assertRaises(
            usage.UsageError, self.server,
            "server:\n  token: t\n  listen: 'ssl:17443:privateKey=/nonexistent/k.pem'\n")
        self.assertIn("server.listen", str(error))
        self.assertIn("/nonexistent/k.pem", str(error))


class QuotedNumberTests(ConfigTestCase):
    """A number in quotes is the number, for every key that takes one, as Go's viper reads it."""

    def test_client(self):
        settings = self.client("""\
            client:
              token: t
              local_ports: ["22", "80"]
              remote_port: "10022"
              heartbeat_interval: "10"
              health_check_interval: "2.5"
              pool_count: "0"
              busy_poll: "100"
              tunnels:
                - {local_port: "5432", remote_port: "15432"}
            """)
        self.assertEqual(settings.mappings, [Mapping("127.0.0.1", 22, 10022),
                                             Mapping("127.0.0.1", 80, 10023),
                                             Mapping("127.0.0.1", 5432, 15432)])
        self.assertEqual((settings.heartbeat_interval, settings.health_check_interval,
                          settings.pool_count, settings.busy_poll), (10.0, 2.5, 0, 100))

    def test_server(self):
        settings = self.server("""\
            server:
              token: t
              allow_ports: ["22", "10000-10100"]
              max_mappings_per_client: "4"
              max_pool_count: "2"
              busy_poll: "0"
              data_channel_timeout: "60"
              clients:
                alice: {token: a, max_mappings: "3"}
            """)
        self.assertEqual((settings.max_mappings_per_client, settings.max_pool_count,
                          settings.busy_poll, settings.data_channel_timeout,
                          settings.clients["alice"].max_mappings), (4, 2, 0, 60.0, 3))
        self.assertEqual(settings.allow_ports, (range(22, 23), range(10000, 10101)))

    def test_outOfRangeStillRefused(self):
        self.assertConfigError("client", "client:\n  token: t\n  local_ports: 22\n"
                               "  remote_port: '70000'\n",
                               "client.remote_port must be from 1 to 65535, got 70000")
        self.assertConfigError("server", "server:\n  token: t\n  max_pool_count: '1.5'\n",
                               "server.max_pool_count must be a whole number")


class MapOptionTests(unittest.TestCase):
    def test_hostMadeOfDigitsRefused(self):
        """A host made only of digits is a port too many: a usage error naming it."""
        with self.assertRaises(usage.UsageError) as caught:
            ClientOptions().parseOptions(["--token", "t", "--map", "8000:18000:1"])
        self.assertIn("the host '8000' is a number", str(caught.exception))

    def test_hostsAccepted(self):
        options = ClientOptions()
        options.parseOptions(["--token", "t", "--map", "10.0.0.5:22:10022",
                              "--map", "[::1]:80:10080", "--map", "db1:5432:15432"])
        self.assertEqual(options.settings().mappings, [
            Mapping("10.0.0.5", 22, 10022), Mapping("::1", 80, 10080),
            Mapping("db1", 5432, 15432)])


class ZeroCopyOptionTests(ConfigTestCase):
    """zero_copy in the file, --no-zero-copy on the command line; on by default."""

    key = "zero_copy"
    option = "--no-zero-copy"

    def setting(self, role: str, keys: str = "", *arguments: str) -> bool:
        text = {"server": "server:\n  token: t\n",
                "client": "client:\n  token: t\n  local_ports: [22]\n"}[role] + keys
        return getattr(getattr(self, role)(text, *arguments), self.key)

    def test_onByDefault(self):
        self.assertTrue(self.setting("server"))
        self.assertTrue(self.setting("client"))

    def test_offInTheFile(self):
        self.assertFalse(self.setting("server", f"  {self.key}: false\n"))
        self.assertFalse(self.setting("client", f"  {self.key}: false\n"))

    def test_offOnTheCommandLine(self):
        """The option overrides the file's true."""
        self.assertFalse(self.setting("server", f"  {self.key}: true\n", self.option))
        self.assertFalse(self.setting("client", f"  {self.key}: true\n", self.option))

    def test_notAFlag(self):
        self.assertConfigError("server", f"server:\n  token: t\n  {self.key}: 'maybe'\n",
                               f"server.{self.key} must be true or false")


class SpliceThreadOptionTests(ZeroCopyOptionTests):
    """splice_thread in the file, --no-splice-thread on the command line; on by default."""

    key = "splice_thread"
    option = "--no-splice-thread"


class Ipv6PrefixOptionTests(ConfigTestCase):
    """server.ipv6_prefix / --ipv6-prefix."""

    def test_default(self):
        self.assertEqual(self.server("server:\n  token: t\n").ipv6_prefix, 64)

    def test_fileAndCommandLine(self):
        self.assertEqual(self.server("server:\n  token: t\n  ipv6_prefix: 56\n").ipv6_prefix, 56)
        self.assertEqual(self.server("server:\n  token: t\n  ipv6_prefix: 56\n",
                                     "--ipv6-prefix", "128").ipv6_prefix, 128)

    def test_outOfRangeRefused(self):
        self.assertConfigError("server", "server:\n  token: t\n  ipv6_prefix: 0\n",
                               "server.ipv6_prefix must be a whole number from 1 to 128")
        with self.assertRaises(usage.UsageError) as caught:
            self.server("server:\n  token: t\n", "--ipv6-prefix", "129")
        self.assertIn("--ipv6-prefix must be a whole number from 1 to 128, got '129'",
                      str(caught.exception))


class PoolOptionTests(ConfigTestCase):
    """client.pool_count / --pool-count and server.max_pool_count / --max-pool-count."""

    def test_defaults(self):
        self.assertEqual(self.server("server:\n  token: t\n").max_pool_count, 8)
        self.assertEqual(self.client("client:\n  token: t\n  local_ports: [22]\n").pool_count, 4)

    def test_inTheFile(self):
        self.assertEqual(self.server("server:\n  token: t\n  max_pool_count: 0\n").max_pool_count, 0)
        self.assertEqual(self.client(
            "client:\n  token: t\n  local_ports: [22]\n  pool_count: 16\n").pool_count, 16)

    def test_commandLineWins(self):
        self.assertEqual(self.server("server:\n  token: t\n  max_pool_count: 2\n",
                                     "--max-pool-count", "5").max_pool_count, 5)
        self.assertEqual(self.client("client:\n  token: t\n  local_ports: [22]\n  pool_count: 2\n",
                                     "--pool-count", "0").pool_count, 0)

    def test_outOfRangeRefused(self):
        """
        From 0 to 1024, what a client accepts in register_resp.pool: a server
        allowed more would answer every registration with a pool its
        clients refuse.
        """
        for value in ("-1", "1025"):
            self.assertConfigError("server", f"server:\n  token: t\n  max_pool_count: {value}\n",
                                   "server.max_pool_count must be a whole number from 0 to 1024")
        self.assertConfigError("client", "client:\n  token: t\n  local_ports: [22]\n"
                               "  pool_count: 'four'\n",
                               "client.pool_count must be a whole number from 0 to 1024")
        for value in ("-1", "1025", "four"):
            with self.assertRaises(usage.UsageError) as caught:
                self.client("client:\n  token: t\n  local_ports: [22]\n", "--pool-count", value)
            self.assertIn(f"--pool-count must be a whole number from 0 to 1024, got '{value}'",
                          str(caught.exception))
        with self.assertRaises(usage.UsageError) as caught:
            self.server("server:\n  token: t\n", "--max-pool-count", "2000")
        self.assertIn("--max-pool-count must be a whole number from 0 to 1024",
                      str(caught.exception))
        self.assertEqual(self.server("server:\n  token: t\n",
                                     "--max-pool-count", "1024").max_pool_count, 1024)


class BusyPollOptionTests(ConfigTestCase):
    """server.busy_poll and client.busy_poll / --busy-poll: microseconds, 0 to 10000."""

    CLIENT = "client:\n  token: t\n  local_ports: [22]\n"

    def test_defaults(self):
        self.assertEqual(self.server("server:\n  token: t\n").busy_poll, 250)
        self.assertEqual(self.client(self.CLIENT).busy_poll, 250)

    def test_inTheFile(self):
        self.assertEqual(self.server("server:\n  token: t\n  busy_poll: 0\n").busy_poll, 0)
        self.assertEqual(self.client(self.CLIENT + "  busy_poll: 250\n").busy_poll, 250)

    def test_commandLineWins(self):
        self.assertEqual(self.server("server:\n  token: t\n  busy_poll: 50\n",
                                     "--busy-poll", "0").busy_poll, 0)
        self.assertEqual(self.client(self.CLIENT + "  busy_poll: 0\n",
                                     "--busy-poll", "10000").busy_poll, 10000)

    def test_outOfRangeRefused(self):
        for value in ("-1", "10001", "0.5", "'fast'"):
            self.assertConfigError("server", f"server:\n  token: t\n  busy_poll: {value}\n",
                                   "server.busy_poll must be a whole number from 0 to 10000")
        self.assertConfigError("client", self.CLIENT + "  busy_poll: true\n",
                               "client.busy_poll must be a whole number from 0 to 10000")
        for value in ("-1", "10001"):
            with self.assertRaises(usage.UsageError) as caught:
                self.client(self.CLIENT, "--busy-poll", value)
            self.assertIn(f"--busy-poll must be a whole number from 0 to 10000, got '{value}'",
                          str(caught.exception))


class RegisterTimeoutOptionTests(ConfigTestCase):
    """client.register_timeout / --register-timeout: seconds, 10 by default."""

    CLIENT = "client:\n  token: t\n  local_ports: [22]\n"

    def test_default(self):
        self.assertEqual(self.client(self.CLIENT).register_timeout, 10.0)

    def test_inTheFileAndCommandLine(self):
        self.assertEqual(self.client(self.CLIENT + "  register_timeout: 3\n").register_timeout,
                         3.0)
        self.assertEqual(self.client(self.CLIENT + "  register_timeout: 3\n",
                                     "--register-timeout", "0.5").register_timeout, 0.5)

    def test_notPositiveRefused(self):
        self.assertConfigError("client", self.CLIENT + "  register_timeout: 0\n",
                               "client.register_timeout must be a number of seconds greater "
                               "than 0")
        with self.assertRaises(usage.UsageError):
            self.client(self.CLIENT, "--register-timeout", "-1")


class PendingDataChannelsOptionTests(ConfigTestCase):
    """client.max_pending_data_channels / --max-pending-data-channels: 256 by default."""

    CLIENT = "client:\n  token: t\n  local_ports: [22]\n"

    def test_default(self):
        self.assertEqual(self.client(self.CLIENT).max_pending_data_channels, 256)

    def test_inTheFileAndCommandLine(self):
        self.assertEqual(self.client(self.CLIENT + "  max_pending_data_channels: 8\n")
                         .max_pending_data_channels, 8)
        self.assertEqual(self.client(self.CLIENT + "  max_pending_data_channels: 8\n",
                                     "--max-pending-data-channels", "1")
                         .max_pending_data_channels, 1)

    def test_zeroRefused(self):
        self.assertConfigError("client", self.CLIENT + "  max_pending_data_channels: 0\n",
                               "client.max_pending_data_channels must be a whole number of "
                               "at least 1")
        with self.assertRaises(usage.UsageError):
            self.client(self.CLIENT, "--max-pending-data-channels", "0")


class ExitOnRefusalOptionTests(ConfigTestCase):
    """client.exit_on_refusal / --exit-on-refusal: off by default."""

    CLIENT = "client:\n  token: t\n  local_ports: [22]\n"

    def test_offByDefault(self):
        self.assertFalse(self.client(self.CLIENT).exit_on_refusal)

    def test_inTheFileOrOnTheCommandLine(self):
        self.assertTrue(self.client(self.CLIENT + "  exit_on_refusal: true\n").exit_on_refusal)
        self.assertTrue(self.client(self.CLIENT, "--exit-on-refusal").exit_on_refusal)

    def test_notAFlag(self):
        self.assertConfigError("client", self.CLIENT + "  exit_on_refusal: 'yes please'\n",
                               "client.exit_on_refusal must be true or false")

class MuxOptionTests(ConfigTestCase):
    """client.mux / --mux: off by default; server.mux / --no-mux: on by default."""

    CLIENT = "client:\n  token: t\n  local_ports: [22]\n"

    def test_client(self):
        self.assertFalse(self.client(self.CLIENT).mux)
        self.assertTrue(self.client(self.CLIENT + "  mux: true\n").mux)
        self.assertTrue(self.client(self.CLIENT, "--mux").mux)

    def test_server(self):
        self.assertTrue(self.server("server:\n  token: t\n").mux)
        self.assertFalse(self.server("server:\n  token: t\n  mux: false\n").mux)
        self.assertFalse(self.server("server:\n  token: t\n", "--no-mux").mux)


class PortLeaseOptionTests(ConfigTestCase):
    """server.port_lease / --port-lease: seconds, 0 (off) or more; 30 by default."""

    def test_default(self):
        self.assertEqual(self.server("server:\n  token: t\n").port_lease, 30.0)

    def test_inTheFile(self):
        self.assertEqual(self.server("server:\n  token: t\n  port_lease: 0\n").port_lease, 0.0)
        self.assertEqual(self.server("server:\n  token: t\n  port_lease: 2.5\n").port_lease, 2.5)

    def test_commandLineWins(self):
        self.assertEqual(self.server("server:\n  token: t\n  port_lease: 60\n",
                                     "--port-lease", "0").port_lease, 0.0)

    def test_badValuesRefused(self):
        for value in ("-1", "'soon'", "true", ".inf"):
            self.assertConfigError("server", f"server:\n  token: t\n  port_lease: {value}\n",
                                   "server.port_lease must be a number of seconds, 0 or more")
        for value in ("-1", "nan", "inf"):
            with self.assertRaises(usage.UsageError) as caught:
                self.server("server:\n  token: t\n", "--port-lease", value)
            self.assertIn("must be a number of seconds, 0 or more", str(caught.exception))

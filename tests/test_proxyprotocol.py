"""
The PROXY protocol header toward the local service: the header itself,
read back by a strict parser written from HAProxy's proxy-protocol.txt; the
settings; and end to end over loopback, both versions, IPv4 and IPv6, the
zero-copy path and the ordinary one, against our server and against one
that tells no addresses (a Go server); and nginx, where it is installed.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import struct

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.trial import unittest

from gotunnel.wire import messages
from gotunnel.wire import proxyprotocol
from gotunnel.config.mappings import Mapping
from gotunnel.config.yamlfile import readConfigFile
from gotunnel.server.channel import ServerChannel
from gotunnel.cli.tap import ClientOptions
from tests.support import (
    HOST, Tunnel, User, freePort, listenTarget, retryUntil, spawn, temporaryDirectory,
    waitUntil, within,
)
from tests.test_ipv6 import freePort6, ipv6Loopback

TIMEOUT = 30


class ParseError(Exception):
    pass


def parseProxyHeader(data: bytes):
    """
    A strict reader of one PROXY header at the start of C{data}, per
    proxy-protocol.txt: returns (version, command, family, source,
    destination, the bytes after the header); source and destination are
    (ip, port) or None.  Raises L{ParseError} for anything the spec forbids.
    """
    if data.startswith(proxyprotocol.V2_SIGNATURE):
        if len(data) < 16:
            raise ParseError("v2 header cut short")
        versionCommand, family, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
        if versionCommand >> 4 != 2:
            raise ParseError("v2 version nibble is not 2")
        command = {0: "LOCAL", 1: "PROXY"}.get(versionCommand & 0xF)
        if command is None:
            raise ParseError("v2 command is neither LOCAL nor PROXY")
        body, rest = data[16:16 + length], data[16 + length:]
        if len(body) != length:
            raise ParseError("v2 body cut short")
        if command == "LOCAL":
            return 2, command, family, None, None, rest
        if family == 0x11:
            if length < 12:
                raise ParseError("v2 TCP4 body shorter than 12 bytes")
            size = 4
        elif family == 0x21:
            if length < 36:
                raise ParseError("v2 TCP6 body shorter than 36 bytes")
            size = 16
        else:
            raise ParseError(f"v2 family {family:#x} is not TCP over IPv4 or IPv6")
        src = ipaddress.ip_address(body[:size])
        dst = ipaddress.ip_address(body[size:2 * size])
        sport, dport = struct.unpack("!HH", body[2 * size:2 * size + 4])
        return 2, command, family, (str(src), sport), (str(dst), dport), rest
    if not data.startswith(b"PROXY "):
        raise ParseError("neither a v1 nor a v2 header")
    end = data.find(b"\r\n")
    if end < 0 or end + 2 > 107:
        raise ParseError("v1 line has no CRLF within 107 bytes")
    line, rest = data[:end].decode("ascii"), data[end + 2:]
    parts = line.split(" ")
    if parts[1] == "UNKNOWN":
        return 1, "UNKNOWN", None, None, None, rest
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ParseError(f"v1 line {line!r} is not PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    version = 4 if parts[1] == "TCP4" else 6
    src, dst = ipaddress.ip_address(parts[2]), ipaddress.ip_address(parts[3])
    if src.version != version or dst.version != version:
        raise ParseError(f"v1 addresses of {line!r} are not {parts[1]}")
    ports = []
    for text in parts[4:]:
        if not text.isdigit() or (text.startswith("0") and text != "0") or int(text) > 65535:
            raise ParseError(f"v1 port {text!r} is not a port")
        ports.append(int(text))
    return 1, "PROXY", parts[1], (parts[2], ports[0]), (parts[3], ports[1]), rest


class HeaderTests(unittest.TestCase):
    def test_v1IPv4(self):
        data = proxyprotocol.header("v1", ("192.0.2.7", 51234), ("198.51.100.1", 443))
        self.assertEqual(data, b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 443\r\n")
        self.assertEqual(parseProxyHeader(data + b"x")[3:],
                         (("192.0.2.7", 51234), ("198.51.100.1", 443), b"x"))

    def test_v1IPv6(self):
        data = proxyprotocol.header("v1", ("2001:db8::7", 1), ("2001:db8::1", 65535))
        self.assertEqual(data, b"PROXY TCP6 2001:db8::7 2001:db8::1 1 65535\r\n")
        self.assertEqual(parseProxyHeader(data)[2], "TCP6")

    def test_v2IPv4(self):
        data = proxyprotocol.header("v2", ("192.0.2.7", 51234), ("198.51.100.1", 443))
        self.assertEqual(len(data), 16 + 12)
        self.assertEqual(parseProxyHeader(data + b"x"),
                         (2, "PROXY", 0x11, ("192.0.2.7", 51234), ("198.51.100.1", 443), b"x"))

    def test_v2IPv6(self):
        data = proxyprotocol.header("v2", ("2001:db8::7", 1), ("2001:db8::1", 2))
        self.assertEqual(len(data), 16 + 36)
        self.assertEqual(parseProxyHeader(data),
                         (2, "PROXY", 0x21, ("2001:db8::7", 1), ("2001:db8::1", 2), b""))

    def test_unknown(self):
        """A server that tells no addresses (a Go server): UNKNOWN, and a v2 LOCAL header."""
        self.assertEqual(proxyprotocol.header("v1", None, None), b"PROXY UNKNOWN\r\n")
        local = proxyprotocol.header("v2", None, ("192.0.2.1", 1))
        self.assertEqual(local, proxyprotocol.V2_SIGNATURE + b"\x20\x00\x00\x00")
        self.assertEqual(parseProxyHeader(local)[1], "LOCAL")
        # Not an IP address: unknown, never written into the header.
        self.assertEqual(proxyprotocol.header("v1", ("x y", 1), ("192.0.2.1", 2)),
                         b"PROXY UNKNOWN\r\n")

    def test_mappedAndMixedFamilies(self):
        """An IPv4 user on a dual-stack port: IPv4-mapped addresses become IPv4."""
        data = proxyprotocol.header("v1", ("::ffff:192.0.2.7", 5), ("::ffff:192.0.2.1", 6))
        self.assertEqual(data, b"PROXY TCP4 192.0.2.7 192.0.2.1 5 6\r\n")
        mixed = parseProxyHeader(proxyprotocol.header("v1", ("192.0.2.7", 5), ("2001:db8::1", 6)))
        self.assertEqual(mixed[2:4], ("TCP6", ("::ffff:c000:207", 5)))


class SettingsTests(unittest.TestCase):
    def test_tunnelKey(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("client:\n  tunnels:\n"
                    "    - {local_port: 80, remote_port: 8080, proxy_protocol: v2}\n"
                    "    - {local_port: 81, remote_port: 8081}\n")
        mappings = readConfigFile(path).clientValues()["mappings"]
        self.assertEqual([m.proxy_protocol for m in mappings], ["v2", None])

    def test_badTunnelKey(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("client:\n  tunnels:\n"
                    "    - {local_port: 80, remote_port: 8080, proxy_protocol: v3}\n")
        with self.assertRaises(Exception) as raised:
            readConfigFile(path).clientValues()
        self.assertIn("proxy_protocol must be v1 or v2", str(raised.exception))

    def test_option(self):
        options = ClientOptions()
        options.parseOptions(["--token", "t", "--map", "80:8080", "--map", "81:8081",
                              "--proxy-protocol", "v1", "--config", os.devnull])
        self.assertEqual([m.proxy_protocol for m in options.settings().mappings], ["v1", "v1"])


class FakeGoServerAnswer:
    """Patch our server to answer data channels as the Go server does: no addresses."""

    @staticmethod
    def _answer(channel, user, ours, *args):
        # What the user sent while it waited stays held, for the splice to send.
        channel.sendMessage(messages.RegisterResp(status="ok"))
        return True


class EndToEndMixin:
    zeroCopy = False

    @defer.inlineCallbacks
    def roundTrip(self, version: str, family: int = 4, goServer: bool = False, pool: int = 0):
        """
        A user sends bytes through a mapping with the PROXY protocol to an
        echo service: the service reads the header first, then the bytes.
        """
        if family == 6 and not ipv6Loopback():
            raise unittest.SkipTest("no IPv6 loopback")
        if goServer:
            self.patch(ServerChannel, "_answer", FakeGoServerAnswer._answer)
        tunnel = Tunnel(self, zeroCopy=self.zeroCopy, pool=pool)
        publicHost = HOST if family == 4 else "::1"
        yield tunnel.startServer(public_interface=publicHost)
        target = listenTarget(self)
        remote = freePort() if family == 4 else freePort6()
        yield within(tunnel.publish(target, remotePort=remote, mappings=[
            Mapping(HOST, target, remote, proxy_protocol=version)]), TIMEOUT, "registration")
        endpointType = TCP4ClientEndpoint if family == 4 else TCP6ClientEndpoint
        user = User()
        yield connectProtocol(endpointType(reactor, publicHost, remote), user)

        def cleanup():
            if not user.closed.called:
                user.transport.abortConnection()
            return user.closed

        self.addCleanup(cleanup)
        payload = os.urandom(64 * 1024 if self.zeroCopy else 1000)
        user.transport.write(payload)

        def complete():
            try:
                parsed = parseProxyHeader(user.data)
            except ParseError:
                return None
            return parsed if len(parsed[-1]) >= len(payload) else None

        parsed = yield waitUntil(complete, TIMEOUT, "the header and the echo")
        self.assertEqual(parsed[-1], payload)
        return parsed, user

    @defer.inlineCallbacks
    def check(self, version: str, family: int):
        parsed, user = yield self.roundTrip(version, family)
        here, there = user.transport.getHost(), user.transport.getPeer()
        self.assertEqual(parsed[1], "PROXY")
        self.assertEqual(parsed[3], (here.host, here.port))
        self.assertEqual(parsed[4], (there.host, there.port))

    def test_v1IPv4(self):
        return self.check("v1", 4)

    def test_v2IPv4(self):
        return self.check("v2", 4)

    def test_v1IPv6(self):
        return self.check("v1", 6)

    def test_v2IPv6(self):
        return self.check("v2", 6)

    @defer.inlineCallbacks
    def test_pooledV2(self):
        """A pooled data channel asks for the addresses too."""
        parsed, user = yield self.roundTrip("v2", pool=2)
        self.assertEqual(parsed[3][1], user.transport.getHost().port)

    @defer.inlineCallbacks
    def test_goServerV1(self):
        parsed, _ = yield self.roundTrip("v1", goServer=True)
        self.assertEqual(parsed[1], "UNKNOWN")

    @defer.inlineCallbacks
    def test_goServerV2(self):
        parsed, _ = yield self.roundTrip("v2", goServer=True)
        self.assertEqual(parsed[1], "LOCAL")


class EndToEndTests(EndToEndMixin, unittest.TestCase):
    zeroCopy = False


class ZeroCopyEndToEndTests(EndToEndMixin, unittest.TestCase):
    zeroCopy = True
    if not hasattr(os, "splice"):
        skip = "no os.splice"


NGINX = os.environ.get("GOTUNNEL_TEST_NGINX") or shutil.which("nginx") or next(
    (path for path in ("/usr/sbin/nginx",) if os.path.exists(path)), None)
"""nginx, where installed (or named by GOTUNNEL_TEST_NGINX)."""


class NginxTests(unittest.TestCase):
    if NGINX is None:
        skip = "nginx is not installed"

    @defer.inlineCallbacks
    def _check(self, version: str):
        directory = temporaryDirectory(self)
        port = freePort()
        with open(os.path.join(directory, "nginx.conf"), "w") as f:
            # One process, no workers: nothing outlives the test.
            f.write(f"""daemon off; master_process off; pid {directory}/nginx.pid; error_log stderr;
events {{}}
http {{
  access_log off; client_body_temp_path {directory}; proxy_temp_path {directory};
  fastcgi_temp_path {directory}; uwsgi_temp_path {directory}; scgi_temp_path {directory};
  server {{ listen {HOST}:{port} proxy_protocol;
    location / {{ return 200 "real $proxy_protocol_addr:$proxy_protocol_port\\n"; }} }}
}}
""")
        nginx = spawn(self, [NGINX, "-e", "stderr", "-p", directory,
                             "-c", os.path.join(directory, "nginx.conf")], directory)

        @defer.inlineCallbacks
        def listening():
            try:
                direct = yield connectProtocol(TCP4ClientEndpoint(reactor, HOST, port), User())
            except Exception:
                return False
            direct.transport.abortConnection()
            yield direct.closed
            return True

        # Before the client starts: its first health probe must find nginx up.
        yield retryUntil(listening, TIMEOUT, "nginx to listen")
        tunnel = Tunnel(self)
        yield tunnel.startServer()
        remote = freePort()
        client = tunnel.startClient(
            port, mappings=[Mapping(HOST, port, remote, proxy_protocol=version)])
        yield within(client.tunnels[0].whenRegistered(), TIMEOUT, "registration")
        @defer.inlineCallbacks
        def get():
            user = User()
            try:
                yield connectProtocol(TCP4ClientEndpoint(reactor, HOST, remote), user)
            except Exception:
                return None
            port = user.transport.getHost().port
            user.transport.write(b"GET / HTTP/1.0\r\n\r\n")
            answer = yield within(user.closed, TIMEOUT, "nginx's answer")
            return (answer, port) if answer.startswith(b"HTTP/") else None

        answer, userPort = yield retryUntil(get, TIMEOUT, "nginx to answer")
        self.assertIn(f"real {HOST}:{userPort}".encode(), answer)
        nginx.sendSignal(signal.SIGQUIT)
        yield within(nginx.ended, TIMEOUT, "nginx to stop")

    def test_v1(self):
        return self._check("v1")

    def test_v2(self):
        return self._check("v2")


"""
C{python -m gotunnel demo}: a gotunnel server, a gotunnel client and a small
web page, all in this process on one machine, so that a person sees a
tunnel work with one command and nothing to configure.

L{Demo} runs the three pieces on any reactor (the tests start it in their
own process); L{main} parses the options and runs it until SIGINT or SIGTERM.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import sys
from typing import Optional, Sequence

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.logger import (
    FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Site

from gotunnel.client.service import TunnelClientService
from gotunnel.config.mappings import Mapping
from gotunnel.config.settings import ClientSettings, ServerSettings
from gotunnel.server.mapping import PublishedMapping
from gotunnel.server.service import TunnelServerService

PROG = "gotunnel demo"
LOOPBACK = "127.0.0.1"
DEFAULT_PUBLIC_PORT = 8080

PAGE = b"""<!DOCTYPE html>
<html>
<head><meta charset="utf-8"><title>gotunnel demo</title></head>
<body>
<h1>This page came through gotunnel.</h1>
<p>A small web server on 127.0.0.1 made it. A gotunnel client carried your
request to it from the gotunnel server's public port, and carried the page
back.</p>
</body>
</html>
"""


class DemoPage(Resource):
    """The one page of the demo's web server, at every path."""

    isLeaf = True

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return PAGE


class PublicPortUnavailable(Exception):
    """The public port cannot be listened on: busy, or not ours to take."""

    def __init__(self, interface: str, port: int, error: OSError) -> None:
        super().__init__(interface, port, error)
        self.interface = interface
        self.port = port
        self.error = error

    def __str__(self) -> str:
        if self.error.errno == errno.EADDRINUSE:
            return (f"port {self.port} is busy on {self.interface}; choose another with "
                    "--port N, or --port 0 for any free port")
        return (f"cannot listen on {hostForURL(self.interface)}:{self.port}: "
                f"{self.error.strerror or self.error}")


def hostForURL(interface: str) -> str:
    """
    The host a browser on this machine uses to reach a listener on
    C{interface}: loopback for the wildcard addresses, IPv6 in brackets.
    """
    if interface in ("", "0.0.0.0"):
        return LOOPBACK
    if interface == "::":
        return "[::1]"
    return f"[{interface}]" if ":" in interface else interface


def claimablePort(interface: str, port: int) -> int:
    """
    Check that C{interface}:C{port} can be listened on now, binding as
    Twisted's listeners do (C{SO_REUSEADDR} on POSIX); the port, chosen by
    the OS if C{port} is 0.  The server listens on it a moment later.

    @raise PublicPortUnavailable: it cannot.
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        if os.name == "posix":
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((interface, port))
            probe.listen(1)
        except OSError as e:
            raise PublicPortUnavailable(interface, port, e) from None
        return probe.getsockname()[1]


class Demo:
    """
    A web page on loopback, a tunnel server with a random token, and a
    client that publishes the page on the server's public port.
    """

    webPort: Optional[IListeningPort] = None
    server: Optional[TunnelServerService] = None
    client: Optional[TunnelClientService] = None
    published: Optional[PublishedMapping] = None
    # Registration fails only if another program takes the public port
    # between our check and the server's listen; then give up, not retry.
    registrationTimeout = 10.0

    def __init__(self, reactor, publicPort: int = DEFAULT_PUBLIC_PORT,
                 publicInterface: str = LOOPBACK) -> None:
        self.reactor = reactor
        self.publicPort = publicPort
        self.publicInterface = publicInterface

    @property
    def url(self) -> str:
        """The page's public address, as a browser on this machine opens it."""
        return f"http://{hostForURL(self.publicInterface)}:{self.publicPort}/"

    @property
    def webAddress(self) -> str:
        """Where the web page itself listens (only the client connects there)."""
        return f"{LOOPBACK}:{self.webPort.getHost().port}"

    @property
    def controlAddress(self) -> str:
        """Where the server's control port listens."""
        return f"{LOOPBACK}:{self.server.controlPort.getHost().port}"

    @defer.inlineCallbacks
    def start(self):
        """
        Start the page, the server and the client; fires with this L{Demo}
        once the server has published the page.  On failure, what started is
        stopped again.

        @raise PublicPortUnavailable: the public port is busy.
        @raise defer.TimeoutError: the server did not publish the page.
        """
        try:
            self.publicPort = claimablePort(self.publicInterface, self.publicPort)
            site = Site(DemoPage(), reactor=self.reactor)
            site.noisy = False
            self.webPort = yield TCP4ServerEndpoint(
                self.reactor, 0, interface=LOOPBACK).listen(site)

            token = secrets.token_urlsafe()
            self.server = TunnelServerService(
                ServerSettings(listen=f"tcp:0:interface={LOOPBACK}", token=token,
                               public_interface=self.publicInterface),
                reactor=self.reactor)
            self.server.startService()
            yield self.server.whenListening()

            mapping = Mapping(LOOPBACK, self.webPort.getHost().port, self.publicPort)
            self.client = TunnelClientService(
                ClientSettings(server=f"tcp:{self.controlAddress}", token=token, name="demo",
                               mappings=[mapping]),
                reactor=self.reactor)
            self.client.startService()
            registered = self.client.tunnels[0].whenRegistered()
            yield registered.addTimeout(self.registrationTimeout, self.reactor)
            self.published = self.server.registry.tunnels[self.publicPort]
        except Exception:
            yield self.stop()
            raise
        return self

    @defer.inlineCallbacks
    def stop(self):
        """
        Stop the client, then the server, then the page; fires once all
        their ports are closed.  Stopping twice is harmless.
        """
        client, self.client = self.client, None
        if client is not None and client.running:
            yield client.stopService()
        server, self.server = self.server, None
        if server is not None and server.running:
            yield server.stopService()
        published, self.published = self.published, None
        if published is not None:
            # The server closes a public port when the client's control
            # channel goes, and does not wait for it; wait here.
            yield published.close()
        webPort, self.webPort = self.webPort, None
        if webPort is not None:
            yield webPort.stopListening()


def startDemo(reactor, publicPort: int = DEFAULT_PUBLIC_PORT,
              publicInterface: str = LOOPBACK) -> defer.Deferred:
    """
    Start a L{Demo}; a Deferred that fires with it once the page is
    published on C{publicInterface}:C{publicPort} (0: a free port).
    """
    return Demo(reactor, publicPort, publicInterface).start()


class DemoOptions(usage.Options):
    synopsis = "Usage: python -m gotunnel demo [options]"
    longdesc = ("Run a gotunnel server, a gotunnel client and a small web page in this "
                "process, and publish the page on a public port. Ctrl-C stops it.")

    optParameters = [
        ["port", "p", str(DEFAULT_PUBLIC_PORT),
         "Public port to publish the page on (0: any free port)."],
        ["public-interface", None, LOOPBACK,
         "Address the public port listens on (0.0.0.0: show the page to your network)."],
    ]

    def postOptions(self) -> None:
        text = self["port"]
        try:
            port = int(text)
        except ValueError:
            port = -1
        if not 0 <= port <= 65535:
            raise usage.UsageError(f"--port must be a number from 0 to 65535, got {text!r}")
        self["port"] = port
        interface = self["public-interface"]
        if not (isIPAddress(interface) or isIPv6Address(interface)):
            raise usage.UsageError(
                f"--public-interface must be an IP address such as 127.0.0.1 or 0.0.0.0, "
                f"got {interface!r}")


def banner(demo: Demo) -> str:
    """What a person reads once the demo is up."""
    lines = [
        "",
        "gotunnel demo is running, all in this process:",
        f"  web page  {demo.webAddress}  (a local service only this machine can reach)",
        f"  server    control port {demo.controlAddress}, public port {demo.publicPort}",
        f"  client    publishes {demo.webAddress} on public port {demo.publicPort}",
        "",
        f"Public URL: {demo.url}",
    ]
    if demo.publicInterface in ("0.0.0.0", "::"):
        lines.append(f"From other machines: http://<this machine's address>:{demo.publicPort}/")
    lines += [
        f"Open it in a browser, or run: curl {demo.url}",
        "Press Ctrl-C to stop.",
        "",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    """
    Run the demo until SIGINT or SIGTERM; 0 after a clean stop, 2 for bad
    options or a busy public port, 1 if it cannot start otherwise.
    """
    options = DemoOptions()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n{PROG}: try '{PROG} --help'\n")
        return 2
    from twisted.internet import reactor

    # Log lines must show up at once even when stdout is a pipe (| tee).
    sys.stdout.reconfigure(line_buffering=True)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    # Each user connection's "data channel ... ready" line is at debug level
    # (cheap on a busy server); the demo shows it.
    predicate.setLogLevelForNamespace("gotunnel.server", LogLevel.debug)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stdout), [predicate])],
        redirectStandardIO=False)
    demo = Demo(reactor, options["port"], options["public-interface"])
    exitCode = 0

    def started(_) -> None:
        sys.stdout.write(banner(demo))

    def failed(failure) -> None:
        nonlocal exitCode
        if failure.check(PublicPortUnavailable):
            exitCode = 2
            sys.stderr.write(f"{PROG}: error: {failure.value}\n")
        elif failure.check(defer.TimeoutError):
            exitCode = 1
            sys.stderr.write(f"{PROG}: error: the server did not publish port "
                             f"{demo.publicPort} within {demo.registrationTimeout:.0f} s; "
                             "see the log above\n")
        else:
            exitCode = 1
            sys.stderr.write(f"{PROG}: error: cannot start: {failure.getErrorMessage()}\n")
        reactor.stop()

    def stopped(_) -> None:
        if exitCode == 0:
            sys.stdout.write("gotunnel demo stopped.\n")

    reactor.callWhenRunning(lambda: demo.start().addCallbacks(started, failed))
    reactor.addSystemEventTrigger("before", "shutdown",
                                  lambda: demo.stop().addCallback(stopped))
    reactor.run()
    return exitCode

"""
Loopback fixtures for integration tests: a server and client run in this
process on the real reactor, target services, and users that collect what
they receive.  Everything binds 127.0.0.1 on ports the OS chooses, and every
helper registers its own cleanup with the test case.
"""

from __future__ import annotations

import os
import socket
from typing import Optional, Union

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

import gotunnel.server.channel
import gotunnel.server.mapping
from gotunnel.wire import messages
from gotunnel.client.service import TunnelClientService
from gotunnel.config.mappings import Mapping
from gotunnel.config.settings import ClientSettings, ServerSettings
from gotunnel.server.service import TunnelServerService
from gotunnel.relay.splicer import Splicer
from gotunnel.relay.zerocopy import SplicePump

HOST = "127.0.0.1"
TOKEN = "test-token"


REGISTERED = {"type": "register_resp", "status": "ok", "pool": ServerSettings.max_pool_count}
"""Our server's answer to a register it accepts: ok, and the data channels it pools."""


def freePort() -> int:
    """A TCP port on 127.0.0.1 that the OS says is free now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def freeUdpPort(tries: int = 100) -> int:
    """A port free for both TCP and UDP on 127.0.0.1 now."""
    for _ in range(tries):
        port = freePort()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        return port
    raise AssertionError(f"no port free for both TCP and UDP in {tries} tries")


def randomBytes(size: int) -> bytes:
    return os.urandom(size)


def deferLater(seconds: float) -> defer.Deferred:
    """Let the reactor run for a while (for asserting that nothing happens)."""
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class ConnectionTracker:
    """Remembers the connections a test's listeners accept, to close them at cleanup."""

    def __init__(self) -> None:
        self.protocols: list[Protocol] = []
        self.lost: list[defer.Deferred] = []


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """Echoes what it reads; on end-of-stream, finishes writing and closes."""

    def connectionMade(self) -> None:
        self.factory.tracker.protocols.append(self)
        self.onLost: defer.Deferred = defer.Deferred()
        self.factory.tracker.lost.append(self.onLost)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.onLost.callback(None)


class Banner(Echo):
    """Speaks first, then echoes: like an SSH or SMTP server."""

    banner = b"SSH-2.0-gotunnel-test\r\n"

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(self.banner)


def listenTarget(testCase, protocol: type = Echo) -> int:
    """
    Start a local service on 127.0.0.1 that serves C{protocol}; it and its
    connections are closed when the test ends.  Returns the port.
    """
    factory = Factory.forProtocol(protocol)
    factory.noisy = False
    factory.tracker = ConnectionTracker()
    port = reactor.listenTCP(0, factory, interface=HOST)

    def cleanup():
        for p in factory.tracker.protocols:
            p.transport.loseConnection()
        return defer.DeferredList([defer.maybeDeferred(port.stopListening)] +
                                  factory.tracker.lost)

    testCase.addCleanup(cleanup)
    return port.getHost().port


@implementer(IHalfCloseableProtocol)
class User(Protocol):
    """
    A user of a public port: collects everything it receives; C{closed}
    fires with the bytes once the connection is gone.
    """

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.closed: defer.Deferred = defer.Deferred()
        self.readClosed: defer.Deferred = defer.Deferred()
        self._waiters: list[tuple[int, defer.Deferred]] = []
        self._count = 0

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        self._count += len(data)
        self._fireWaiters()

    def _fireWaiters(self) -> None:
        """Fire the L{whenReceived} waiters whose size has arrived."""
        still = []
        for size, waiter in self._waiters:
            if self._count >= size:
                waiter.callback(self.data)
            else:
                still.append((size, waiter))
        self._waiters = still

    @property
    def data(self) -> bytes:
        return b"".join(self.received)

    def whenReceived(self, size: int) -> defer.Deferred:
        """Fires with all received bytes once at least C{size} have arrived."""
        if self._count >= size:
            return defer.succeed(self.data)
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append((size, waiter))
        return waiter

    def readConnectionLost(self) -> None:
        self.readClosed.callback(self.data)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        if not self.readClosed.called:
            self.readClosed.callback(self.data)
        for _, waiter in self._waiters:
            waiter.errback(reason)
        self._waiters = []
        self.closed.callback(self.data)


class StreamReceived:
    """What a L{StreamUser} has received: how many bytes, and whether intact."""

    def __init__(self, count: int, intact: bool) -> None:
        self.count = count
        self.intact = intact

    def __len__(self) -> int:
        return self.count


class StreamUser(User):
    """
    A user of L{StreamOrEcho}'s endless stream: checks each piece as it
    arrives and keeps none.  A stream runs at hundreds of MB/s; kept, its
    bytes would take gigabytes, and joining them would stall the reactor for
    seconds, long enough for the server to time out every client in the test.
    """

    intact = True

    def dataReceived(self, data: bytes) -> None:
        if self.intact:
            start = self._count % len(STREAM_PERIOD)
            repeats = (start + len(data)) // len(STREAM_PERIOD) + 1
            self.intact = data == (STREAM_PERIOD * repeats)[start:start + len(data)]
        self._count += len(data)
        self._fireWaiters()

    @property
    def data(self) -> StreamReceived:  # type: ignore[override]
        return StreamReceived(self._count, self.intact)


class UserFactory(Factory):
    noisy = False
    protocol = User


def connectUser(testCase, port: int, protocol: type = User) -> defer.Deferred:
    """
    Connect a C{protocol} (a L{User}) to 127.0.0.1:C{port}; it is closed
    when the test ends.
    """

    def connected(user: User) -> User:
        def cleanup():
            if not user.closed.called:
                user.transport.abortConnection()
            return user.closed

        testCase.addCleanup(cleanup)
        return user

    endpoint = TCP4ClientEndpoint(reactor, HOST, port)
    factory = UserFactory()
    factory.protocol = protocol
    return endpoint.connect(factory).addCallback(connected)


class RecordingSplicer(Splicer):
    """A L{Splicer} that keeps a few of its pumps, to read their byte counts."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.firstPumps: list[object] = []
        """Not all: a test of leaks counts the objects left."""

    def splice(self, a, b, zeroCopy: bool = True) -> object:
        pump = super().splice(a, b, zeroCopy)
        if pump is not None and len(self.firstPumps) < 3:
            self.firstPumps.append(pump)
        return pump


class Tunnel:
    """
    A server and a client in this process, ready to map ports.

    With C{zeroCopy} True or False, both run with that C{zero_copy} setting,
    and the test fails at cleanup unless every splice took that path (and,
    zero copy on, the kernel moved bytes): so a test class run both ways
    proves that it tested each path.  Zero copy on, C{spliceThread} True or
    False sets C{splice_thread} the same way: on, the test fails unless
    some pump went to the splice thread; off, if any did.

    Clients keep C{pool} pooled data channels (none by default, so that a
    test sees the data channels its users ask for); with a pool, the test
    fails at cleanup unless some user was served by a pooled channel.
    """

    def __init__(self, testCase, zeroCopy: Optional[bool] = None, pool: int = 0,
                 spliceThread: Optional[bool] = None, mux: bool = False) -> None:
        self.testCase = testCase
        self.pool = pool
        self.pooledUsers = 0
        self.mux = mux
        self.streams = 0
        if mux:
            openStreamFor = gotunnel.server.mapping.PublishedMapping._openStreamFor

            def countingOpenStreamFor(tunnel, user):
                opened = openStreamFor(tunnel, user)
                self.streams += opened
                return opened

            testCase.patch(gotunnel.server.mapping.PublishedMapping, "_openStreamFor",
                           countingOpenStreamFor)
            testCase.addCleanup(self._checkStreams)
        if pool:
            attachUser = gotunnel.server.channel.ServerChannel.attachUser

            def countingAttachUser(channel, user):
                attached = attachUser(channel, user)
                self.pooledUsers += attached
                return attached

            testCase.patch(gotunnel.server.channel.ServerChannel, "attachUser", countingAttachUser)
            testCase.addCleanup(self._checkPooled)
        self.server: Optional[TunnelServerService] = None
        self.controlPort: Optional[int] = None
        self.zeroCopy = zeroCopy
        self.spliceThread = spliceThread
        self.handOffExpected = True
        """With the splice thread on, whether some pump must go to it: a test
        whose connections are never steady while spliced clears it."""
        self.splicers: list[RecordingSplicer] = []
        """The splicers given to the servers and clients this test started."""
        if zeroCopy is not None:
            testCase.addCleanup(self._checkSplices)
        if spliceThread is not None:
            testCase.addCleanup(self._checkHandOffs)

    def splicer(self, settings) -> "RecordingSplicer":
        """A splicer for a service with C{settings}, counted at cleanup."""
        splicer = RecordingSplicer.fromSettings(settings, reactor)
        if self.spliceThread:
            # Every pump to the thread at its first read: the tests run the
            # thread's path for short exchanges too.
            splicer.handOffAfter = 1
        self.splicers.append(splicer)
        return splicer

    @property
    def splices(self) -> int:
        return sum(splicer.splices for splicer in self.splicers)

    @property
    def pumped(self) -> int:
        """Splices with a pump: a zero-copy one, or a TLS one (see gotunnel.relay.tlspump)."""
        return sum(splicer.pumped + splicer.tlsPumped for splicer in self.splicers)

    @property
    def handOffs(self) -> int:
        return sum(splicer.handOffs for splicer in self.splicers)

    @property
    def busyPolls(self) -> set[float]:
        """The busy-poll budgets splices were given, in seconds."""
        return {splicer.busyPoll for splicer in self.splicers if splicer.splices}

    @property
    def firstPumps(self) -> list:
        return [pump for splicer in self.splicers for pump in splicer.firstPumps]

    def _checkSplices(self) -> None:
        if not self.zeroCopy:
            self.testCase.assertEqual(self.pumped, 0, "zero copy is off, yet splice pumps ran")
        elif self.splices:
            self.testCase.assertEqual(self.pumped, self.splices,
                                      "zero copy is on, yet a splice took the ordinary path")
            # A TLS pump's bytes go through Python until it goes to the
            # splice thread (which _checkHandOffs checks).
            zeroCopyPumps = [pump for pump in self.firstPumps if isinstance(pump, SplicePump)]
            if zeroCopyPumps:
                self.testCase.assertGreater(sum(pump.moved for pump in zeroCopyPumps), 0,
                                            "zero copy is on, yet os.splice moved no byte")

    def _checkHandOffs(self) -> None:
        if self.zeroCopy and self.spliceThread and self.pumped and self.handOffExpected:
            self.testCase.assertGreater(self.handOffs, 0,
                                        "the splice thread is on, yet no pump went to it")
        elif not self.spliceThread:
            self.testCase.assertEqual(self.handOffs, 0,
                                      "the splice thread is off, yet a pump went to it")

    def _checkStreams(self) -> None:
        self.testCase.assertGreater(self.streams, 0,
                                    "clients multiplex, yet no user was carried by a stream")

    def _checkPooled(self) -> None:
        self.testCase.assertGreater(self.pooledUsers, 0,
                                    "clients keep a pool, yet no user got a pooled data channel")

    def settingOverrides(self, overrides: dict) -> dict:
        if self.zeroCopy is not None:
            overrides.setdefault("zero_copy", self.zeroCopy)
        if self.spliceThread is not None:
            overrides.setdefault("splice_thread", self.spliceThread)
        return overrides

    @defer.inlineCallbacks
    def startServer(self, **overrides):
        settings = ServerSettings(listen=f"tcp:{self.controlPort or 0}:interface={HOST}",
                                  token=TOKEN, public_interface=HOST)
        for key, value in self.settingOverrides(overrides).items():
            setattr(settings, key, value)
        self.server = TunnelServerService(settings, reactor=reactor,
                                          splicer=self.splicer(settings))
        self.server.startService()
        self.testCase.addCleanup(self._stopServer, self.server)
        port = yield self.server.whenListening()
        self.controlPort = port.getHost().port
        return self.server

    def _stopServer(self, server):
        if server.running:
            return server.stopService()

    def startClient(self, targetPort: int, remotePort: Optional[int] = None,
                    token: str = TOKEN, name: str = "test-client",
                    **overrides) -> TunnelClientService:
        """Start a client that maps 127.0.0.1:targetPort to remotePort."""
        settings = ClientSettings(
            server=f"tcp:{HOST}:{self.controlPort}", token=token, name=name,
            mappings=[Mapping(HOST, targetPort, remotePort or freePort())],
            pool_count=self.pool, mux=self.mux)
        for key, value in self.settingOverrides(overrides).items():
            setattr(settings, key, value)
        client = TunnelClientService(settings, reactor=reactor, splicer=self.splicer(settings))
        client.startService()
        self.testCase.addCleanup(lambda: client.stopService() if client.running else None)
        return client

    @defer.inlineCallbacks
    def publish(self, targetPort: int, **kwargs):
        """
        Start a client for C{targetPort} and wait until the server publishes
        it.  Returns (client, public port).
        """
        client = self.startClient(targetPort, **kwargs)
        yield client.tunnels[0].whenRegistered()
        remotePort = client.tunnels[0].mapping.remote_port
        if self.mux and self.server is not None:
            yield waitUntil(
                lambda: getattr(self.server.registry.tunnels.get(remotePort), "muxSession", None),
                30, "the client's multiplexed connection to reach the server")
        if self.pool and self.server is not None:
            # Users of the test then find the pool full, as they would a
            # client that has been up for a moment.
            size = min(self.pool, self.server.settings.max_pool_count)
            yield waitUntil(
                lambda: len(getattr(self.server.registry.tunnels.get(remotePort), "pool", ()))
                >= size, 30, "the client's pooled data channels to reach the server")
        return client, remotePort


# ---------------------------------------------------------------------------
# Waiting on events with a bound, watching logs and standard error, local
# services that a test stops and starts again, and child processes.  Used by
# test_e2e_lifecycle.py and test_twistd.py.

import fcntl  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import termios  # noqa: E402
from typing import Callable, Iterable  # noqa: E402

from twisted.internet import error  # noqa: E402
from twisted.internet.protocol import ProcessProtocol  # noqa: E402
from twisted.logger import formatEvent, globalLogPublisher  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402


def within(d: defer.Deferred, seconds: float, what: str) -> defer.Deferred:
    """
    C{d}, failed with a L{defer.TimeoutError} naming C{what} if it has not
    fired within C{seconds}.
    """

    def timedOut(result, timeout):
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            raise defer.TimeoutError(f"{what}: nothing within {timeout} s")
        return result

    return d.addTimeout(seconds, reactor, onTimeoutCancel=timedOut)


@defer.inlineCallbacks
def retryUntil(attempt: Callable[[], object], timeout: float, what: str,
               interval: float = 0.05):
    """
    Call C{attempt} (which may return a Deferred) until its result is true,
    pausing C{interval} between tries; fails after C{timeout} seconds.
    Returns the true result.
    """
    deadline = reactor.seconds() + timeout
    while True:
        result = yield defer.maybeDeferred(attempt)
        if result:
            return result
        if reactor.seconds() >= deadline:
            raise defer.TimeoutError(f"{what}: not within {timeout} s")
        yield deferLater(interval)


def waitUntil(predicate: Callable[[], object], timeout: float, what: str,
              interval: float = 0.02) -> defer.Deferred:
    """Fires with C{predicate()} once it is true; fails after C{timeout} seconds."""
    return retryUntil(predicate, timeout, what, interval)


def waitingIn(fd: int) -> int:
    """Bytes received on socket C{fd} and not yet read."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


class Collector:
    """
    Items that arrive one by one (log events, lines), and Deferreds that
    fire once enough of them match.
    """

    def __init__(self) -> None:
        self.items: list = []
        self._waiters: list[tuple[Callable, int, defer.Deferred]] = []

    def matching(self, predicate: Callable[[object], bool]) -> list:
        return [item for item in self.items if predicate(item)]

    def add(self, item) -> None:
        self.items.append(item)
        still = []
        for predicate, count, waiter in self._waiters:
            if waiter.called:
                continue
            found = self.matching(predicate)
            if len(found) >= count:
                waiter.callback(found)
            else:
                still.append((predicate, count, waiter))
        self._waiters = still

    def whenMatched(self, predicate: Callable[[object], bool], count: int = 1) -> defer.Deferred:
        """Fires with the matching items once at least C{count} have arrived."""
        found = self.matching(predicate)
        if len(found) >= count:
            return defer.succeed(found)
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append((predicate, count, waiter))
        return waiter


class LogWatcher(Collector):
    """Every log event emitted while the test runs (the global publisher's)."""

    def __init__(self, testCase) -> None:
        super().__init__()
        globalLogPublisher.addObserver(self.add)
        testCase.addCleanup(globalLogPublisher.removeObserver, self.add)

    @staticmethod
    def formatted(prefix: str, **fields) -> Callable[[dict], bool]:
        """A predicate: events whose format starts with C{prefix}, with these field values."""

        def predicate(event: dict) -> bool:
            if not (event.get("log_format") or "").startswith(prefix):
                return False
            return all(event.get(key) == value for key, value in fields.items())

        return predicate

    def text(self) -> str:
        return "\n".join(formatEvent(event) for event in self.items)


STAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} (.*)$")
"""A line behind the time, as the log and reportError's lines have it."""


class StreamCapture(Collector):
    """
    A text stream (for patching C{sys.__stderr__}) that collects whole
    lines, each without the time in front of it; a line without one is a
    test failure at its L{write}.
    """

    def __init__(self) -> None:
        super().__init__()
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            stamped = STAMPED.match(line)
            assert stamped is not None, f"no time in front of {line!r}"
            self.add(stamped.group(1))
        return len(text)

    def flush(self) -> None:
        pass


def startsWith(prefix: str) -> Callable[[str], bool]:
    return lambda line: line.startswith(prefix)


class Target:
    """
    A local service a test can stop and start again on the same port, with
    its connections closed on stop.
    """

    def __init__(self, testCase, protocol: type = Echo, port: int = 0) -> None:
        self.factory = Factory.forProtocol(protocol)
        self.factory.noisy = False
        self.factory.tracker = ConnectionTracker()
        self.listener = None
        self.port = port
        testCase.addCleanup(self.stop)

    def start(self) -> "Target":
        self.listener = reactor.listenTCP(self.port, self.factory, interface=HOST)
        self.port = self.listener.getHost().port
        return self

    def stop(self) -> defer.Deferred:
        """Stop listening and close every connection; fires once all are gone."""
        listener, self.listener = self.listener, None
        tracker, self.factory.tracker = self.factory.tracker, ConnectionTracker()
        for p in tracker.protocols:
            p.transport.loseConnection()
        stopping = [defer.maybeDeferred(listener.stopListening)] if listener else []
        return defer.DeferredList(stopping + tracker.lost)


def startTarget(testCase, protocol: type = Echo, port: int = 0) -> Target:
    """A listening L{Target} on 127.0.0.1 (C{port} 0: one the OS picks)."""
    return Target(testCase, protocol, port).start()


def connectionRefused(port: int) -> defer.Deferred:
    """
    Fires with True if a connection to 127.0.0.1:C{port} is refused, False
    if it is accepted (it is then closed at once).
    """
    endpoint = TCP4ClientEndpoint(reactor, HOST, port, timeout=5)

    def accepted(user: User) -> defer.Deferred:
        user.transport.abortConnection()
        return user.closed.addCallback(lambda _: False)

    def failed(failure):
        failure.trap(error.ConnectionRefusedError)
        return True

    return endpoint.connect(UserFactory()).addCallbacks(accepted, failed)


def waitUntilRefused(port: int, timeout: float, what: str) -> defer.Deferred:
    """Connect to C{port} again and again until a connection is refused."""
    return retryUntil(lambda: connectionRefused(port), timeout, what)


@defer.inlineCallbacks
def echoedThrough(testCase, port: int, payload: bytes, timeout: float):
    """
    Connect a user to C{port}, send C{payload}, and return True if the same
    bytes come back within C{timeout}; False if the connection is refused or
    closed first.  The user is closed before returning.
    """
    try:
        user = yield connectUser(testCase, port)
    except error.ConnectionRefusedError:
        return False
    user.transport.write(payload)
    try:
        received = yield within(user.whenReceived(len(payload)), timeout,
                                f"echo of {len(payload)} bytes through port {port}")
    except (error.ConnectionDone, error.ConnectionLost):
        return False
    finally:
        if not user.closed.called:
            user.transport.abortConnection()
        yield user.closed
    return received == payload


def venvScript(name: str) -> str:
    """The path of a console script installed beside the running Python."""
    return os.path.join(os.path.dirname(sys.executable), name)


def temporaryDirectory(testCase) -> str:
    """A new directory outside the repository, removed when the test ends."""
    path = tempfile.mkdtemp(prefix="gotunnel-test-")
    testCase.addCleanup(shutil.rmtree, path, True)
    return path


class ChildProcess(ProcessProtocol):
    """
    A child process whose standard output and error are collected;
    L{whenOutput} fires when a text (or regular expression) appears, and
    C{ended} once the process has exited and its pipes are closed.
    """

    exitCode: Optional[int] = None
    signal: Optional[int] = None

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self._output = {1: bytearray(), 2: bytearray()}
        self._waiters: list[tuple[object, tuple[int, ...], defer.Deferred]] = []
        self.ended: defer.Deferred = defer.Deferred()

    @property
    def stdout(self) -> str:
        return self._output[1].decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self._output[2].decode("utf-8", "replace")

    @property
    def running(self) -> bool:
        return not self.ended.called

    def describe(self) -> str:
        return (f"{' '.join(self.argv)}\n--- stdout ---\n{self.stdout}"
                f"\n--- stderr ---\n{self.stderr}")

    def _search(self, pattern, fds: Iterable[int]):
        for fd in fds:
            text = self._output[fd].decode("utf-8", "replace")
            if isinstance(pattern, re.Pattern):
                found = pattern.search(text)
                if found:
                    return found
            elif pattern in text:
                return text
        return None

    def whenOutput(self, pattern, fds: tuple[int, ...] = (1, 2)) -> defer.Deferred:
        """
        Fires once C{pattern} (a string, or a compiled regular expression) is
        in the output on C{fds}: with the text, or the match.  Fails if the
        process ends first.
        """
        found = self._search(pattern, fds)
        if found is not None:
            return defer.succeed(found)
        if self.ended.called:
            return defer.fail(AssertionError(
                f"process ended without printing {pattern!r}:\n{self.describe()}"))
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append((pattern, fds, waiter))
        return waiter

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self._output.setdefault(fd, bytearray()).extend(data)
        still = []
        for pattern, fds, waiter in self._waiters:
            if waiter.called:
                continue
            found = self._search(pattern, fds) if fd in fds else None
            if found is not None:
                waiter.callback(found)
            else:
                still.append((pattern, fds, waiter))
        self._waiters = still

    def processEnded(self, reason) -> None:
        self.exitCode = getattr(reason.value, "exitCode", None)
        self.signal = getattr(reason.value, "signal", None)
        waiters, self._waiters = self._waiters, []
        for pattern, _, waiter in waiters:
            if not waiter.called:
                waiter.errback(AssertionError(
                    f"process ended without printing {pattern!r}:\n{self.describe()}"))
        self.ended.callback(self)

    def sendSignal(self, name: str) -> None:
        """Signal the process unless it has already exited."""
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass


def spawn(testCase, argv: list[str], cwd: str, env: Optional[dict] = None,
          endTimeout: float = 30.0) -> ChildProcess:
    """
    Start C{argv} in C{cwd} with unbuffered output and no standard input.
    At cleanup a process still running is killed, and the test waits for it
    to exit.
    """
    environment = dict(os.environ)
    environment["PYTHONUNBUFFERED"] = "1"
    environment.update(env or {})
    child = ChildProcess(list(argv))
    reactor.spawnProcess(child, argv[0], list(argv), env=environment, path=cwd)
    child.transport.closeStdin()

    def cleanup():
        if child.running:
            child.sendSignal("KILL")
        return within(child.ended, endTimeout, f"{argv[0]} to exit after SIGKILL")

    testCase.addCleanup(cleanup)
    return child



# ---------------------------------------------------------------------------
# Raw bytes on the control port, a local service that streams without end,
# and gotunnel's live objects counted.  Used by test_hostile.py,
# test_faults.py and test_load.py.

import gc  # noqa: E402
import json  # noqa: E402

from twisted.internet.interfaces import IPullProducer  # noqa: E402


def frame(message: Union[messages.Message, bytes]) -> bytes:
    """
    One control frame as on the wire: C{message} encoded as Go writes it
    (L{messages.encode}), or, given bytes, that body as it is (for frames no
    message makes), behind its 4-byte big-endian length.
    """
    body = message if isinstance(message, bytes) else messages.encode(message)
    return len(body).to_bytes(4, "big") + body


def jsonFrame(message: object) -> bytes:
    """One control frame holding C{message} (any JSON value) as compact JSON."""
    return frame(json.dumps(message, separators=(",", ":")).encode("utf-8"))


class RawConnection(Protocol):
    """
    A connection that writes whatever a test gives it and collects what comes
    back: the first C{rawAfter} complete frames (all, if None) decoded into
    C{frames} (JSON objects, or the raw body if it is not JSON), the rest
    into C{raw}.  C{closed} fires with the time the connection went away.
    """

    def __init__(self, rawAfter: Optional[int] = None) -> None:
        self.rawAfter = rawAfter
        self.frames = Collector()
        self.raw = bytearray()
        self._buffer = bytearray()
        self._rawWaiters: list[tuple[int, defer.Deferred]] = []
        self.closed: defer.Deferred = defer.Deferred()
        self.reason = None

    localPort = 0
    """Our end's port: the server logs us as 127.0.0.1:localPort."""

    def connectionMade(self) -> None:
        self.localPort = self.transport.getHost().port

    @property
    def peerName(self) -> str:
        """How the server names this connection in its log."""
        return f"{HOST}:{self.localPort}"

    def dataReceived(self, data: bytes) -> None:
        if self.rawAfter is not None and len(self.frames.items) >= self.rawAfter:
            self._rawReceived(data)
            return
        self._buffer.extend(data)
        while len(self._buffer) >= 4:
            if self.rawAfter is not None and len(self.frames.items) >= self.rawAfter:
                break
            length = int.from_bytes(self._buffer[:4], "big")
            if len(self._buffer) < 4 + length:
                break
            body = bytes(self._buffer[4:4 + length])
            del self._buffer[:4 + length]
            try:
                self.frames.add(json.loads(body))
            except ValueError:
                self.frames.add(body)
        if self.rawAfter is not None and len(self.frames.items) >= self.rawAfter and self._buffer:
            rest, self._buffer = bytes(self._buffer), bytearray()
            self._rawReceived(rest)

    def _rawReceived(self, data: bytes) -> None:
        self.raw.extend(data)
        still = []
        for size, waiter in self._rawWaiters:
            if len(self.raw) >= size:
                waiter.callback(bytes(self.raw))
            else:
                still.append((size, waiter))
        self._rawWaiters = still

    def whenRaw(self, size: int) -> defer.Deferred:
        """Fires with the raw bytes once at least C{size} have arrived."""
        if len(self.raw) >= size:
            return defer.succeed(bytes(self.raw))
        waiter: defer.Deferred = defer.Deferred()
        self._rawWaiters.append((size, waiter))
        return waiter

    def whenFrame(self, predicate: Callable[[object], bool] = lambda f: True,
                  count: int = 1) -> defer.Deferred:
        """Fires with the matching frames once C{count} have arrived."""
        return self.frames.whenMatched(predicate, count)

    def connectionLost(self, reason=None) -> None:
        self.reason = reason
        waiters, self._rawWaiters = self._rawWaiters, []
        for _, waiter in waiters:
            waiter.errback(reason)
        self.closed.callback(reactor.seconds())


@defer.inlineCallbacks
def connectRaw(testCase, port: int, send: bytes = b"", rawAfter: Optional[int] = None):
    """
    A L{RawConnection} to 127.0.0.1:C{port} that has written C{send}; it is
    aborted, if still open, when the test ends.
    """
    raw = RawConnection(rawAfter)
    endpoint = TCP4ClientEndpoint(reactor, HOST, port, timeout=10)
    yield within(endpoint.connect(Factory.forProtocol(lambda: raw)), 15,
                 f"a raw connection to port {port}")

    def cleanup():
        if not raw.closed.called:
            raw.transport.abortConnection()
        return raw.closed

    testCase.addCleanup(cleanup)
    if send:
        raw.transport.write(send)
    return raw


def registerMessage(remote_port: int, name: str, token: str = TOKEN,
                    local_port: int = 22, **fields) -> dict:
    """A C{register} message as a Go client sends it."""
    message = {"type": "register", "local_port": local_port, "remote_port": remote_port,
               "protocol": "tcp", "token": token, "name": name}
    message.update(fields)
    return message


def dataChannelMessage(remote_port: int, conn_id: Optional[str], token: str = TOKEN,
                       name: str = "raw", local_port: int = 22) -> dict:
    """A C{data_channel} message; C{conn_id} None leaves it out, as Go does."""
    message = {"type": "data_channel", "local_port": local_port, "remote_port": remote_port,
               "protocol": "", "token": token, "name": name}
    if conn_id is not None:
        message["conn_id"] = conn_id
    return message


STREAM_PERIOD = bytes(range(256))
"""L{StreamOrEcho}'s stream repeats these bytes."""


@implementer(IPullProducer)
class StreamOrEcho(Echo):
    """
    A local service that echoes, except on a connection whose first byte is
    C{b"S"}: that one gets an endless stream of bytes (written as fast as
    the connection drains, flow-controlled) until it closes.
    """

    chunk = STREAM_PERIOD * 256
    mode: Optional[bytes] = None

    def dataReceived(self, data: bytes) -> None:
        if self.mode is None and data:
            self.mode, data = data[:1], data[1:]
            if self.mode == b"S":
                self.transport.registerProducer(self, False)
            else:
                data = self.mode + data
        if self.mode != b"S" and data:
            self.transport.write(data)

    def resumeProducing(self) -> None:
        if self.transport.disconnecting:
            # A registered pull producer keeps loseConnection waiting.
            self.transport.unregisterProducer()
            return
        self.transport.write(self.chunk)

    def stopProducing(self) -> None:
        pass


def isStreamPrefix(data) -> bool:
    """
    C{data} (bytes, or what a L{StreamUser} received) is a prefix of
    L{StreamOrEcho}'s endless stream.
    """
    if isinstance(data, StreamReceived):
        return data.intact
    chunk = StreamOrEcho.chunk
    whole, rest = divmod(len(data), len(chunk))
    return data == chunk * whole + chunk[:rest]


def gotunnelObjects() -> dict[str, int]:
    """
    After a full garbage collection, how many instances of each gotunnel
    class (protocols, tunnels, relay ends) are alive.
    """
    gc.collect()
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        cls = type(obj)
        module = cls.__dict__.get("__module__")
        if isinstance(module, str) and module.startswith("gotunnel."):
            name = f"{cls.__module__}.{cls.__qualname__}"
            counts[name] = counts.get(name, 0) + 1
    return counts


def openFileDescriptors() -> int:
    """How many file descriptors this process has open (Linux)."""
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------
# Local services whose connections a test can reach (a sink, a source that
# writes under flow control, one that answers at end-of-stream), a web site
# whose connections are closed at cleanup, and writing until the kernel has
# the bytes.  Used by test_e2e_tunnel.py.

from twisted.web.http import HTTPChannel  # noqa: E402
from twisted.web.server import Site  # noqa: E402


class ServiceConnection(User):
    """
    One connection to a L{LocalService}: a sink that collects what it reads,
    like a L{User} (C{whenReceived}, C{readClosed} at end-of-stream, after
    which it closes, C{closed} once gone).
    """

    def connectionMade(self) -> None:
        self.factory.service._connected(self)


@implementer(IPullProducer)
class Source(ServiceConnection):
    """
    Sends its factory's C{payload} on connect, C{chunkSize} bytes each time
    the transport has drained, then closes.  L{whenFlushed} fires once a
    given number of bytes has gone to the kernel.
    """

    chunkSize = 64 * 1024
    sent = 0
    flushed = 0

    def __init__(self) -> None:
        super().__init__()
        self._flushWaiters: list[tuple[int, defer.Deferred]] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.registerProducer(self, False)

    def whenFlushed(self, size: int) -> defer.Deferred:
        """Fires with the count once at least C{size} bytes have gone to the kernel."""
        if self.flushed >= size:
            return defer.succeed(self.flushed)
        waiter: defer.Deferred = defer.Deferred()
        self._flushWaiters.append((size, waiter))
        return waiter

    def resumeProducing(self) -> None:
        # Called when the transport's buffer is empty: all written so far
        # is in the kernel.
        self.flushed = self.sent
        still = []
        for size, waiter in self._flushWaiters:
            if self.flushed >= size:
                waiter.callback(self.flushed)
            else:
                still.append((size, waiter))
        self._flushWaiters = still
        payload = self.factory.payload
        if self.transport.disconnecting or self.sent >= len(payload):
            # A registered pull producer keeps loseConnection waiting.
            self.transport.unregisterProducer()
            self.transport.loseConnection()
            return
        chunk = payload[self.sent:self.sent + self.chunkSize]
        self.sent += len(chunk)
        self.transport.write(chunk)

    def stopProducing(self) -> None:
        pass


class AnswerAtEnd(ServiceConnection):
    """
    Reads until end-of-stream, then writes its factory's C{answer(request)}
    and closes: like a service that needs the whole request first.
    """

    def readConnectionLost(self) -> None:
        self.readClosed.callback(self.data)
        self.transport.write(self.factory.answer(self.data))
        self.transport.loseConnection()


class LocalService:
    """
    A local service on 127.0.0.1 serving C{protocol} (a L{ServiceConnection});
    the test takes its connections in order of arrival with
    L{nextConnection}.  It is stopped, with its connections closed, when the
    test ends.  Keyword arguments become attributes of the factory.
    """

    def __init__(self, testCase, protocol: type = ServiceConnection, **attributes) -> None:
        self.factory = Factory.forProtocol(protocol)
        self.factory.noisy = False
        self.factory.service = self
        for name, value in attributes.items():
            setattr(self.factory, name, value)
        self.connections: list[ServiceConnection] = []
        self._taken = 0
        self._waiters: list[defer.Deferred] = []
        self.listener = reactor.listenTCP(0, self.factory, interface=HOST)
        self.port = self.listener.getHost().port
        testCase.addCleanup(self.stop)

    def _connected(self, connection: ServiceConnection) -> None:
        self.connections.append(connection)
        if self._waiters:
            self._taken += 1
            self._waiters.pop(0).callback(connection)

    def nextConnection(self) -> defer.Deferred:
        """Fires with the first connection not yet taken (once it arrives)."""
        if self._taken < len(self.connections):
            self._taken += 1
            return defer.succeed(self.connections[self._taken - 1])
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def stop(self) -> defer.Deferred:
        """Stop listening and close every connection; fires once all are gone."""
        listener, self.listener = self.listener, None
        stopping = [defer.maybeDeferred(listener.stopListening)] if listener else []
        for connection in self.connections:
            if not connection.closed.called:
                connection.transport.loseConnection()
        return defer.DeferredList(stopping + [c.closed for c in self.connections])


def listenService(testCase, protocol: type = ServiceConnection, **attributes) -> LocalService:
    """A L{LocalService} on a port the OS picks."""
    return LocalService(testCase, protocol, **attributes)


class _TrackedHTTPChannel(HTTPChannel):
    """An HTTP/1.1 channel that its site closes, and waits for, at cleanup."""

    def connectionMade(self) -> None:
        self.gone: defer.Deferred = defer.Deferred()
        self.factory.channels.append(self)
        super().connectionMade()

    def connectionLost(self, reason) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.gone.callback(None)


def listenWeb(testCase, resource) -> int:
    """
    Serve C{resource} with twisted.web (HTTP/1.x) on 127.0.0.1; the site
    stops, and its connections are closed, when the test ends.  Returns the
    port.
    """
    site = Site(resource)
    site.noisy = False
    site.protocol = _TrackedHTTPChannel
    site.channels = []
    port = reactor.listenTCP(0, site, interface=HOST)

    def cleanup():
        for channel in site.channels:
            if not channel.gone.called:
                channel.transport.loseConnection()
        return defer.DeferredList([defer.maybeDeferred(port.stopListening)] +
                                  [channel.gone for channel in site.channels])

    testCase.addCleanup(cleanup)
    return port.getHost().port


@implementer(IPullProducer)
class _WriteThenDrain:
    def __init__(self, transport, data: bytes) -> None:
        self.transport = transport
        self.data = data
        self.drained: defer.Deferred = defer.Deferred()

    def resumeProducing(self) -> None:
        if self.data is not None:
            # The first call, from registerProducer itself.
            data, self.data = self.data, None
            self.transport.write(data)
            return
        # The buffer is empty again: the kernel has every byte.
        self.transport.unregisterProducer()
        self.drained.callback(None)

    def stopProducing(self) -> None:
        if not self.drained.called:
            self.drained.errback(error.ConnectionLost("closed before the bytes were written"))


def writeAndDrain(transport, data: bytes) -> defer.Deferred:
    """
    Write C{data} to C{transport} (which must have no producer); fires once
    the transport has handed all of it to the kernel.
    """
    writer = _WriteThenDrain(transport, data)
    transport.registerProducer(writer, False)
    return writer.drained

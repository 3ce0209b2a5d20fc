"""
The soak: a gotunnel server and its clients in child processes, each client
reaching the server through a relay in this process, an echo service the
clients publish, and users echoing random bytes through every public port
while clients are killed (SIGKILL), restarted (SIGTERM, then started again),
cut (the relay resets every connection) and made to vanish (the relay goes
silent, the client starts again).  The server's memory and open descriptors
are read from /proc after a warm-up and at the end.

Shared by tests/test_soak.py (one minute, in CI) and bench/soak.py (as long
as you like).  Everything listens on 127.0.0.1, on ports the OS picks, and
every loop is bounded in time and in count.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import socket
import statistics
import struct
import sys
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import yaml
from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.protocols import portforward
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

HOST = "127.0.0.1"
LISTENING = re.compile(r"control channel listening on 127\.0\.0\.1:(\d+)")
REGISTERED = re.compile(r"registered 127\.0\.0\.1:\d+->(\d+) as ")
PROBLEM = re.compile(r"Traceback|Unhandled|\[ERROR\]")
REPLACED = re.compile(r"client \S+ registered port \d+ again; dropping its previous control "
                      r"channel")

ACTIONS = ("kill", "restart", "cut", "vanish")
OUTCOMES = ("ok", "refused", "dropped", "lost", "timeout", "corrupt")
"""What a user got: its bytes back; a refused connection; a connection closed
early; no echo within L{USER_TIMEOUT} while its client had vanished (nothing
can tell the server); no echo otherwise (a hang); bytes not its own."""

START_TIMEOUT = 60.0
"""Seconds a child process may take to start and register (a loaded machine)."""
EXIT_TIMEOUT = 30.0
BACK_TIMEOUT = 60.0
"""Seconds a disrupted client may take to have all its ports registered
again before the soak gives up on it."""
RETURN_BOUND = 15.0
"""Seconds within which a returning client must have its ports back (they
take about 2 s at most here): well under the server's heartbeat timeout and
port lease (30 s each by default), so that a returning client made to wait
for either fails the soak."""
USER_TIMEOUT = 15.0
"""Seconds one user may take to connect and have its bytes echoed."""
PROBE_ATTEMPTS = 40
PROBE_INTERVAL = 0.25
SETTLE_READS = 8
SETTLE_INTERVAL = 0.25
SETTLE_TIMEOUT = 30.0


def freePort() -> int:
    """A TCP port on 127.0.0.1 that the OS says is free now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def freePublicPort(rng: random.Random, tries: int = 200) -> int:
    """
    A TCP port on 127.0.0.1 that the OS says is free now, below the range it
    hands out to outgoing connections where it can: a public port is free
    while its client is away, and a port of that range may meanwhile become
    some connection's own port (the kernel gives them out in turn), which
    would keep the server from listening on it again.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    for _ in range(tries if low > 2048 else 0):
        port = rng.randrange(1024, low)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    return freePort()


def pause(reactor, seconds: float) -> defer.Deferred:
    """Let the reactor run for C{seconds} (pacing, never waiting for readiness)."""
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def within(reactor, d: defer.Deferred, seconds: float, what: str) -> defer.Deferred:
    """C{d}, failed with a L{defer.TimeoutError} naming C{what} after C{seconds}."""

    def timedOut(result, timeout):
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            raise defer.TimeoutError(f"{what}: nothing within {timeout} s")
        return result

    return d.addTimeout(seconds, reactor, onTimeoutCancel=timedOut)


def resetConnection(transport) -> None:
    """Close C{transport}'s socket with a reset (RST), as a cut network path does."""
    if transport.disconnected:
        return
    try:
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
    except OSError:
        pass
    transport.abortConnection()


def processStatus(pid: int) -> tuple[int, int]:
    """The resident memory (bytes) and open descriptors of process C{pid} (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss * 1024, len(os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------------------
# Child processes


class ChildProcess(protocol.ProcessProtocol):
    """
    A gotunnel process whose output is read line by line: each line is shown
    to C{onLine}, the last ones kept for a report, and the ones that look
    like a failure (a traceback, an unhandled error, an [ERROR]) collected.
    C{ended} fires once it has exited.
    """

    def __init__(self, label: str, onLine: Callable[[str], None] = lambda line: None) -> None:
        self.label = label
        self.onLine = onLine
        self.tail: deque[str] = deque(maxlen=60)
        self.problems: list[str] = []
        self.ended: defer.Deferred = defer.Deferred()
        """Fires once it has exited: never cancel it, wait on L{whenEnded}."""
        self.exited = False
        self.exitCode: Optional[int] = None
        self.signal: Optional[int] = None
        self._partial = {1: b"", 2: b""}
        self._listeners: list[tuple[re.Pattern, defer.Deferred]] = []

    @property
    def running(self) -> bool:
        return not self.exited

    def whenEnded(self) -> defer.Deferred:
        """A Deferred of its own that fires once the process has exited (cancelling it is safe)."""
        d: defer.Deferred = defer.Deferred()

        def ended(result):
            if not d.called:
                d.callback(None)
            return result

        self.ended.addBoth(ended)
        return d

    @property
    def pid(self) -> int:
        return self.transport.pid

    def whenLine(self, pattern: re.Pattern) -> defer.Deferred:
        """Fires with the match of the next line matching C{pattern}; fails if the process ends."""
        d: defer.Deferred = defer.Deferred()
        self._listeners.append((pattern, d))
        return d

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()
        for raw in lines:
            self._line(raw.decode("utf-8", "replace"))

    def _line(self, line: str) -> None:
        self.tail.append(line)
        if PROBLEM.search(line) and len(self.problems) < 100:
            self.problems.append(line)
        still = []
        for pattern, d in self._listeners:
            found = pattern.search(line)
            if found:
                d.callback(found)
            else:
                still.append((pattern, d))
        self._listeners = still
        self.onLine(line)

    def processEnded(self, reason) -> None:
        self.exited = True
        self.exitCode = getattr(reason.value, "exitCode", None)
        self.signal = getattr(reason.value, "signal", None)
        listeners, self._listeners = self._listeners, []
        for pattern, d in listeners:
            d.errback(AssertionError(f"{self.label} ended before a line matching "
                                     f"{pattern.pattern!r}:\n{self.describe()}"))
        self.ended.callback(self)

    def sendSignal(self, name: str) -> None:
        """Signal the process unless it has already exited."""
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def describe(self) -> str:
        return f"--- {self.label}, last lines ---\n" + "\n".join(self.tail)


# ---------------------------------------------------------------------------
# The relay a client reaches the server through, and the echo service


class Silenceable:
    """
    One end of a relayed connection that can go silent, as when the host at
    the far end vanishes: nothing more is read or written, and not even a
    close is passed on.
    """

    silent = False

    def silence(self) -> None:
        self.silent = True
        self.transport.unregisterProducer()
        self.transport.stopReading()
        self.transport.stopWriting()

    def dataReceived(self, data: bytes) -> None:
        if not self.silent:
            super().dataReceived(data)

    def connectionLost(self, reason=None) -> None:
        if self.silent:
            self.peer = None
        super().connectionLost(reason)


class RelayedConnection(Silenceable, portforward.ProxyServer):
    """The client's end of a connection through a L{Relay}; reset at once while the relay is cut."""

    def connectionMade(self) -> None:
        relay = self.factory.relay
        if relay.down:
            resetConnection(self.transport)
            return
        relay.connections.add(self)
        super().connectionMade()

    def silence(self) -> None:
        super().silence()
        if self.peer is not None:
            self.peer.silence()

    def reset(self) -> None:
        """Reset both ends."""
        peer = self.peer
        resetConnection(self.transport)
        if peer is not None:
            resetConnection(peer.transport)

    def connectionLost(self, reason=None) -> None:
        self.factory.relay.connections.discard(self)
        super().connectionLost(reason)


class RelayedServerConnection(Silenceable, portforward.ProxyClient):
    """The server's end; silent from the start if the client's end went silent while it connected."""

    def connectionMade(self) -> None:
        if self.peer.silent:
            self.peer.setPeer(self)
            self.silence()
            return
        super().connectionMade()


class QuietProxyClientFactory(portforward.ProxyClientFactory):
    protocol = RelayedServerConnection
    noisy = False


RelayedConnection.clientProtocolFactory = QuietProxyClientFactory


class Relay:
    """
    A TCP relay from a port of its own to the server's control port: the
    network path of one client.  L{cut} breaks it as a failing router does
    (every connection reset, both ways, and new ones reset for a while);
    L{vanish} as a host that disappears does (its connections stay open and
    carry nothing more, until L{release}).
    """

    def __init__(self, reactor, serverPort: int) -> None:
        self.reactor = reactor
        self.connections: set[RelayedConnection] = set()
        self.held: set[RelayedConnection] = set()
        self.down = False
        self.calls: list = []
        factory = portforward.ProxyFactory(HOST, serverPort)
        factory.protocol = RelayedConnection
        factory.noisy = False
        factory.relay = self
        self.port = reactor.listenTCP(0, factory, interface=HOST)

    @property
    def address(self) -> str:
        return f"tcp:{HOST}:{self.port.getHost().port}"

    def cut(self, outage: float) -> None:
        """Reset every connection, and the new ones for C{outage} seconds."""
        self.down = True
        connections, self.connections = self.connections, set()
        for connection in connections:
            connection.reset()
        self._later(outage, setattr, self, "down", False)

    def vanish(self, hold: float) -> None:
        """
        Silence every connection (new ones go through), and reset them after
        C{hold} seconds, as TCP keepalive or the network would in the end.
        (The kernel here still answers keepalive probes: they alone would
        never find these connections dead.)
        """
        connections, self.connections = self.connections, set()
        for connection in connections:
            connection.silence()
        self.held |= connections
        self._later(hold, self.release)

    def _later(self, seconds: float, f: Callable, *args) -> None:
        self.calls = [call for call in self.calls if call.active()]
        self.calls.append(self.reactor.callLater(seconds, f, *args))

    def release(self) -> None:
        """Reset the connections silenced by L{vanish}."""
        held, self.held = self.held, set()
        for connection in held:
            connection.reset()

    def close(self) -> defer.Deferred:
        for call in self.calls:
            if call.active():
                call.cancel()
        connections, self.connections = self.connections, set()
        for connection in connections:
            connection.reset()
        self.release()
        return defer.maybeDeferred(self.port.stopListening)


@implementer(IHalfCloseableProtocol)
class Echo(protocol.Protocol):
    """Echoes what it reads; on end-of-stream, finishes writing and closes."""

    def connectionMade(self) -> None:
        self.factory.connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.factory.connections.discard(self)


class EchoService:
    """The local service every client publishes."""

    def __init__(self, reactor) -> None:
        factory = protocol.Factory.forProtocol(Echo)
        factory.noisy = False
        factory.connections = set()
        self.factory = factory
        self.port = reactor.listenTCP(0, factory, interface=HOST)

    @property
    def portNumber(self) -> int:
        return self.port.getHost().port

    def close(self) -> defer.Deferred:
        for connection in list(self.factory.connections):
            connection.transport.abortConnection()
        return defer.maybeDeferred(self.port.stopListening)


# ---------------------------------------------------------------------------
# Users


class EchoUser(protocol.Protocol):
    """
    Sends C{payload} and expects it back; C{done} fires, once the connection
    is gone, with one of L{OUTCOMES}.  Bytes that are not a prefix of the
    payload are C{corrupt}: never acceptable, whatever happened to the client.
    """

    def __init__(self, reactor, payload: bytes, timeout: float) -> None:
        self.reactor = reactor
        self.payload = payload
        self.timeout = timeout
        self.received = bytearray()
        self.outcome: Optional[str] = None
        self.connected = False
        self.done: defer.Deferred = defer.Deferred()
        self._timer = None

    def connectionMade(self) -> None:
        self.connected = True
        self._timer = self.reactor.callLater(self.timeout, self._timedOut)
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.payload.startswith(self.received):
            self._finish("corrupt")
        elif len(self.received) == len(self.payload):
            self._finish("ok")

    def _finish(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.transport.loseConnection()

    def _timedOut(self) -> None:
        self._timer = None
        if self.outcome is None:
            self.outcome = "timeout"
        self.transport.abortConnection()

    def connectionLost(self, reason=None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.outcome is None:
            self.outcome = "dropped"
        self.done.callback(self.outcome)


@defer.inlineCallbacks
def echoOnce(reactor, port: int, payload: bytes, timeout: float = USER_TIMEOUT):
    """One user of public C{port}: returns the L{EchoUser}, its C{outcome} one of L{OUTCOMES}."""
    user = EchoUser(reactor, payload, timeout)
    factory = protocol.Factory.forProtocol(lambda: user)
    factory.noisy = False
    try:
        yield TCP4ClientEndpoint(reactor, HOST, port, timeout=timeout).connect(factory)
    except error.ConnectionRefusedError:
        user.outcome = "refused"
    except (error.TimeoutError, defer.TimeoutError):
        user.outcome = "timeout"
    except error.ConnectError:
        user.outcome = "dropped"
    else:
        yield user.done
    return user


# ---------------------------------------------------------------------------
# The cast


@dataclass
class ClientPlan:
    """A client of the soak: its name, whether it has a token of its own, how many ports."""

    name: str
    ownToken: bool
    portCount: int


DEFAULT_CLIENTS = (
    ClientPlan("alice", True, 2),
    ClientPlan("bob", True, 1),
    ClientPlan("carol", False, 2),
    ClientPlan("dave", False, 1),
)
"""Two clients listed in server.clients with tokens of their own, two with the shared token."""


class SoakClient:
    """
    One client process, started again as often as the soak kills or stops
    it, always with the same name, token and ports.  Counts, over all its
    processes, how many times each public port was registered.
    """

    def __init__(self, soak: "Soak", plan: ClientPlan, token: str, relay: Relay) -> None:
        self.soak = soak
        self.name = plan.name
        self.token = token
        self.relay = relay
        self.ports = [freePublicPort(soak.random) for _ in range(plan.portCount)]
        self.registrations: Counter[int] = Counter()
        self._waiters: list[tuple[dict[int, int], defer.Deferred]] = []
        self.process: Optional[ChildProcess] = None
        self.processes: list[ChildProcess] = []
        self.busy = False
        self.events: list[tuple[float, str]] = []
        """When each disruption began and ended."""
        self.vanished: list[list] = []
        """[from, to] of each vanish: until every port was registered again (to None: not yet)."""

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "gotunnel", "client", "--server", self.relay.address,
                "--token", self.token, "--name", self.name]
        for port in self.ports:
            argv += ["--map", f"{self.soak.echo.portNumber}:{port}"]
        return argv + list(self.soak.clientArgs)

    def start(self) -> None:
        self.process = self.soak.spawn(self.argv(), f"client {self.name}", self._line)
        self.processes.append(self.process)

    def _line(self, line: str) -> None:
        found = REGISTERED.search(line)
        if not found:
            return
        self.registrations[int(found.group(1))] += 1
        still = []
        for mark, d in self._waiters:
            if self.isBackSince(mark):
                d.callback(None)
            else:
                still.append((mark, d))
        self._waiters = still

    def mark(self) -> dict[int, int]:
        """The registrations so far, for L{whenBack}."""
        return {port: self.registrations[port] for port in self.ports}

    def isBackSince(self, mark: dict[int, int]) -> bool:
        return all(self.registrations[port] > count for port, count in mark.items())

    def whenBack(self, mark: dict[int, int]) -> defer.Deferred:
        """Fires once every port has been registered again since C{mark}."""
        if self.isBackSince(mark):
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((mark, d))
        return d

    def vanishedDuring(self, start: float, end: float) -> bool:
        """Whether this client had vanished at some time from C{start} to C{end}."""
        return any(since <= end and (until is None or until >= start)
                   for since, until in self.vanished)

    def problems(self) -> list[str]:
        return [f"{p.label}: {line}" for p in self.processes for line in p.problems]


@dataclass
class Recovery:
    """One disruption: what was done to whom, and how long its ports took to serve again."""

    client: str
    action: str
    ports: list[int]
    registeredAfter: float
    """Seconds from the disruption to every port registered again."""
    echoedAfter: float = 0.0
    """Seconds from the disruption to a user echoed through every port."""
    attempts: int = 0
    """Users tried, over all its ports, until each had one echo."""
    ok: bool = False


@dataclass
class Measure:
    rss: int
    fds: int


@dataclass
class SoakReport:
    seed: int = 0
    seconds: float = 0.0
    """Length of the disruption phase."""
    baseline: Optional[Measure] = None
    final: Optional[Measure] = None
    users: Counter = field(default_factory=Counter)
    """Outcomes of the users during the disruption phase."""
    perPort: dict[int, Counter] = field(default_factory=dict)
    recoveries: list[Recovery] = field(default_factory=list)
    online: dict[int, int] = field(default_factory=dict)
    """Per port, the users tried at the end until one was echoed (0: never)."""
    hangs: list[str] = field(default_factory=list)
    """Users with no echo within L{USER_TIMEOUT} while their client had not vanished."""
    replaced: int = 0
    """Registrations that took over a control channel the server still held."""
    problems: list[str] = field(default_factory=list)
    serverExit: Optional[tuple[Optional[int], Optional[int]]] = None

    def actions(self) -> Counter:
        return Counter(r.action for r in self.recoveries)

    def summary(self) -> str:
        mib = 1024 * 1024
        lines = [f"seed {self.seed}; disruption phase: {self.seconds:.1f} s"]
        if self.baseline is not None and self.final is not None:
            lines.append(
                f"server RSS {self.baseline.rss / mib:.1f} -> {self.final.rss / mib:.1f} MiB "
                f"({(self.final.rss - self.baseline.rss) / mib:+.2f} MiB); "
                f"fds {self.baseline.fds} -> {self.final.fds}")
        total = sum(self.users.values())
        lines.append(f"users: {total} " + ", ".join(f"{k} {self.users[k]}" for k in OUTCOMES))
        for port, outcomes in sorted(self.perPort.items()):
            lines.append(f"  port {port}: " + ", ".join(f"{k} {outcomes[k]}" for k in OUTCOMES))
        actions = self.actions()
        lines.append("disruptions: " + ", ".join(f"{a} {actions[a]}" for a in ACTIONS) +
                     f"; registrations that took over a control channel the server still "
                     f"held: {self.replaced}")
        done = [r for r in self.recoveries if r.ok]
        if done:
            registered = [r.registeredAfter for r in done]
            echoed = [r.echoedAfter for r in done]
            lines.append(f"back (registered): median {statistics.median(registered):.2f} s, "
                         f"max {max(registered):.2f} s; first echo: median "
                         f"{statistics.median(echoed):.2f} s, max {max(echoed):.2f} s")
            for action in ACTIONS:
                times = [r.echoedAfter for r in done if r.action == action]
                if times:
                    lines.append(f"  {action}: first echo median {statistics.median(times):.2f} s,"
                                 f" max {max(times):.2f} s")
            retried = [r for r in done if r.attempts > len(r.ports)]
            lines.append(f"recoveries whose first user after the return was not echoed: "
                         f"{len(retried)} of {len(done)}")
        failed = [r for r in self.recoveries if not r.ok]
        if failed:
            lines.append(f"recoveries that never echoed: {failed}")
        lines.append(f"online at the end (users tried per port): {self.online}")
        if self.hangs:
            lines.append("users with no echo:\n  " + "\n  ".join(self.hangs[:20]))
        if self.problems:
            lines.append("problems:\n  " + "\n  ".join(self.problems[:20]))
        return "\n".join(lines)


class Soak:
    """
    The whole soak.  L{start}, then L{run}; L{stop} (always, in a finally or
    a cleanup) ends every process and closes every socket.
    """

    def __init__(self, reactor, directory: str, seconds: float = 60.0, seed: Optional[int] = None,
                 clients: tuple[ClientPlan, ...] = DEFAULT_CLIENTS, users: int = 4,
                 disruptors: int = 2, warmUpSeconds: float = 5.0,
                 serverArgs: tuple[str, ...] = (), clientArgs: tuple[str, ...] = ()) -> None:
        self.reactor = reactor
        self.directory = directory
        self.seconds = seconds
        self.seed = seed if seed is not None else random.randrange(2**32)
        self.random = random.Random(self.seed)
        self.plans = clients
        self.userCount = users
        self.disruptorCount = disruptors
        self.warmUpSeconds = warmUpSeconds
        self.serverArgs = serverArgs
        self.clientArgs = ("--heartbeat-interval", "1") + tuple(clientArgs)
        self.report = SoakReport(seed=self.seed)
        self.children: list[ChildProcess] = []
        self.relays: list[Relay] = []
        self.clients: list[SoakClient] = []
        self.echo: Optional[EchoService] = None
        self.server: Optional[ChildProcess] = None
        self.sharedToken = secrets.token_hex(12)
        self.ownTokens = {plan.name: secrets.token_hex(12) for plan in clients if plan.ownToken}
        """Tokens of the clients listed in server.clients, by name."""
        self._usersStop = False
        self._users: defer.Deferred = defer.succeed(None)
        self._stopped = False
        self._recording: Optional[tuple[Counter, dict[int, Counter]]] = None

    @property
    def ports(self) -> list[int]:
        return [port for client in self.clients for port in client.ports]

    def spawn(self, argv: list[str], label: str,
              onLine: Callable[[str], None] = lambda line: None) -> ChildProcess:
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        child = ChildProcess(label, onLine)
        self.reactor.spawnProcess(child, argv[0], argv, env=environment, path=self.directory)
        child.transport.closeStdin()
        self.children.append(child)
        return child

    def _serverLine(self, line: str) -> None:
        if self.report.baseline is not None and REPLACED.search(line):
            self.report.replaced += 1

    def describeHang(self, client: SoakClient, port: int, started: float, user) -> str:
        """A user that got no echo: when, and what happened to its client around then."""
        now = self.reactor.seconds()
        events = ", ".join(f"{when - started:+.2f} s {what}" for when, what in client.events
                           if started - 10 <= when <= now)
        return (f"port {port} of {client.name}: connected {user.connected}, "
                f"{len(user.received)} of {len(user.payload)} bytes back; its client, from "
                f"the user's start: {events or 'nothing'}")

    def diagnostics(self) -> str:
        """The report so far and the last lines of every process, for a failure's message."""
        parts = [self.report.summary()]
        parts += [child.describe() for child in self.children[-12:]]
        return "\n".join(parts)

    # -- start and stop ------------------------------------------------------

    def writeServerConfig(self) -> str:
        config = {"server": {
            "token": self.sharedToken,
            "data_channel_timeout": 10,
            "clients": {name: {"token": token} for name, token in self.ownTokens.items()},
        }}
        path = os.path.join(self.directory, "server.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        return path

    @defer.inlineCallbacks
    def start(self):
        """Start the echo service, the server, a relay and a process per client; wait until all are registered."""
        self.echo = EchoService(self.reactor)
        config = self.writeServerConfig()
        self.server = self.spawn(
            [sys.executable, "-m", "gotunnel", "server", "--config", config,
             "--listen", f"tcp:0:interface={HOST}", "--public-interface", HOST,
             *self.serverArgs], "server", self._serverLine)
        found = yield within(self.reactor, self.server.whenLine(LISTENING), START_TIMEOUT,
                             "the server's 'listening' line")
        serverPort = int(found.group(1))
        for plan in self.plans:
            relay = Relay(self.reactor, serverPort)
            self.relays.append(relay)
            token = self.ownTokens.get(plan.name, self.sharedToken)
            self.clients.append(SoakClient(self, plan, token, relay))
        marks = []
        for client in self.clients:
            marks.append(client.mark())
            client.start()
        for client, mark in zip(self.clients, marks):
            yield within(self.reactor, client.whenBack(mark), START_TIMEOUT,
                         f"client {client.name} to register {client.ports}")

    @defer.inlineCallbacks
    def stop(self):
        """End every process (SIGTERM for the server, to see it exit cleanly) and close every socket."""
        if self._stopped:
            return
        self._stopped = True
        self._usersStop = True
        if self.server is not None and self.server.running:
            self.server.sendSignal("TERM")
            try:
                yield within(self.reactor, self.server.whenEnded(), EXIT_TIMEOUT,
                             "the server to exit after SIGTERM")
            except defer.TimeoutError:
                pass
            self.report.serverExit = (self.server.exitCode, self.server.signal)
        for child in self.children:
            if child.running:
                child.sendSignal("KILL")
        for child in self.children:
            if child.running:
                yield within(self.reactor, child.whenEnded(), EXIT_TIMEOUT,
                             f"{child.label} to exit after SIGKILL")
        for relay in self.relays:
            yield relay.close()
        # Users still going (after a failure) meet closed ports now.
        yield within(self.reactor, self._users, USER_TIMEOUT + EXIT_TIMEOUT, "the users to stop")
        if self.echo is not None:
            yield self.echo.close()

    # -- users ---------------------------------------------------------------

    def payload(self) -> bytes:
        return self.random.randbytes(self.random.choice((64, 1024, 16 * 1024, 64 * 1024)))

    @defer.inlineCallbacks
    def _user(self, maxUsers: int):
        for _ in range(maxUsers):
            if self._usersStop:
                return
            client = self.random.choice(self.clients)
            port = self.random.choice(client.ports)
            started = self.reactor.seconds()
            user = yield echoOnce(self.reactor, port, self.payload())
            outcome = user.outcome
            if outcome == "timeout":
                if client.vanishedDuring(started, self.reactor.seconds()):
                    outcome = "lost"
                elif self._recording is not None:
                    self.report.hangs.append(self.describeHang(client, port, started, user))
            if self._recording is not None:
                total, perPort = self._recording
                total[outcome] += 1
                perPort.setdefault(port, Counter())[outcome] += 1
            yield pause(self.reactor, self.random.uniform(0.005, 0.03))

    def startUsers(self, maxUsers: int) -> defer.Deferred:
        """Start L{userCount} users one after another each; fires once they have stopped."""
        self._usersStop = False
        self._users = defer.DeferredList([self._user(maxUsers) for _ in range(self.userCount)],
                                         fireOnOneErrback=True, consumeErrors=True)
        return self._users

    @defer.inlineCallbacks
    def probe(self, port: int, attempts: int = PROBE_ATTEMPTS):
        """Users for C{port} one after another until one is echoed: how many it took (0: none was)."""
        for attempt in range(1, attempts + 1):
            user = yield echoOnce(self.reactor, port, self.random.randbytes(4096))
            if user.outcome == "ok":
                return attempt
            if user.outcome == "corrupt":
                self.report.problems.append(f"a probe of port {port} got corrupt bytes")
            yield pause(self.reactor, PROBE_INTERVAL)
        return 0

    # -- disruptions ---------------------------------------------------------

    @defer.inlineCallbacks
    def disrupt(self, client: SoakClient, action: str):
        """Kill, restart, cut or vanish C{client}; wait until every port of it echoes again."""
        client.relay.release()
        mark = client.mark()
        started = self.reactor.seconds()
        client.events.append((started, action))
        if action == "cut":
            client.relay.cut(self.random.uniform(0.0, 1.0))
        else:
            if action == "vanish":
                window = [started, None]
                client.vanished.append(window)
                client.relay.vanish(self.random.uniform(2.0, 6.0))
            process = client.process
            process.sendSignal("TERM" if action == "restart" else "KILL")
            yield within(self.reactor, process.whenEnded(), EXIT_TIMEOUT,
                         f"{process.label} to exit after {action}")
            if action == "restart" and (process.exitCode, process.signal) != (0, None):
                self.report.problems.append(
                    f"{process.label} exited with {process.exitCode}/{process.signal} "
                    f"on SIGTERM:\n{process.describe()}")
            client.start()
        yield within(self.reactor, client.whenBack(mark), BACK_TIMEOUT,
                     f"client {client.name} to register again after {action}")
        recovery = Recovery(client.name, action, client.ports, self.reactor.seconds() - started)
        client.events.append((self.reactor.seconds(), f"back after {action}"))
        if action == "vanish":
            window[1] = self.reactor.seconds()
        attempts = yield defer.gatherResults([self.probe(port) for port in client.ports])
        recovery.echoedAfter = self.reactor.seconds() - started
        recovery.attempts = sum(attempts)
        recovery.ok = all(attempts)
        self.report.recoveries.append(recovery)
        return recovery

    @defer.inlineCallbacks
    def _disruptor(self, deadline: float, maxEvents: int):
        for _ in range(maxEvents):
            if self.reactor.seconds() >= deadline:
                return
            idle = [client for client in self.clients if not client.busy]
            if idle:
                client = self.random.choice(idle)
                client.busy = True
                try:
                    yield self.disrupt(client, self.random.choice(ACTIONS))
                finally:
                    client.busy = False
            yield pause(self.reactor, self.random.uniform(0.3, 1.5))

    def releaseAll(self) -> None:
        """Reset the connections of every vanished client now, not a few seconds from now."""
        for relay in self.relays:
            relay.release()

    # -- measures ------------------------------------------------------------

    @defer.inlineCallbacks
    def settle(self):
        """
        The server's RSS and descriptors once its descriptor count has held
        still for L{SETTLE_READS} reads in a row (pools refilled, closed
        connections gone), or after L{SETTLE_TIMEOUT} seconds.
        """
        deadline = self.reactor.seconds() + SETTLE_TIMEOUT
        last, same = None, 0
        while same < SETTLE_READS and self.reactor.seconds() < deadline:
            rss, fds = processStatus(self.server.pid)
            same = same + 1 if fds == last else 1
            last = fds
            yield pause(self.reactor, SETTLE_INTERVAL)
        rss, fds = processStatus(self.server.pid)
        return Measure(rss, fds)

    # -- the whole run -------------------------------------------------------

    @defer.inlineCallbacks
    def warmUp(self):
        """
        Users for a few seconds and each disruption once, so that what the
        server allocates once (and keeps) is in the baseline.
        """
        users = self.startUsers(maxUsers=100_000)
        yield pause(self.reactor, self.warmUpSeconds / 2)
        for n, action in enumerate(ACTIONS):
            yield self.disrupt(self.clients[n % len(self.clients)], action)
        yield pause(self.reactor, self.warmUpSeconds / 2)
        self._usersStop = True
        yield users

    @defer.inlineCallbacks
    def run(self):
        """Warm up, measure, disrupt for C{seconds} with users going through, measure, check every port."""
        report = self.report
        log.info("soak seed {seed}", seed=self.seed)
        yield self.warmUp()
        self.releaseAll()
        report.recoveries.clear()
        report.baseline = yield self.settle()

        self._recording = (report.users, report.perPort)
        started = self.reactor.seconds()
        deadline = started + self.seconds
        users = self.startUsers(maxUsers=1_000_000)
        maxEvents = int(self.seconds) + 10
        yield defer.gatherResults([self._disruptor(deadline, maxEvents)
                                   for _ in range(self.disruptorCount)])
        report.seconds = self.reactor.seconds() - started
        self._usersStop = True
        yield users
        self.releaseAll()
        self._recording = None

        report.final = yield self.settle()
        for port in self.ports:
            report.online[port] = yield self.probe(port)
        report.problems += [f"server: {line}" for line in self.server.problems]
        for client in self.clients:
            report.problems += client.problems()
        return report


MIB = 1024 * 1024


def verdict(report: SoakReport, maxRssGrowth: int = 10 * MIB, fdSlack: int = 0,
            minOkPerPort: int = 10) -> list[str]:
    """What is wrong with a finished soak, a sentence each; empty if it passed."""
    failures = []
    growth = report.final.rss - report.baseline.rss
    if growth >= maxRssGrowth:
        failures.append(f"the server's RSS grew by {growth / MIB:.2f} MiB "
                        f"(at most {maxRssGrowth / MIB:.0f} MiB allowed)")
    if report.final.fds > report.baseline.fds + fdSlack:
        failures.append(f"the server holds {report.final.fds} descriptors, "
                        f"{report.baseline.fds} after the warm-up")
    dark = [port for port, attempts in report.online.items() if not attempts]
    if dark:
        failures.append(f"ports {dark} did not echo at the end")
    if report.users["corrupt"]:
        failures.append(f"{report.users['corrupt']} users got bytes that were not theirs")
    if report.users["timeout"]:
        failures.append(f"{report.users['timeout']} users had no echo in {USER_TIMEOUT:g} s, "
                        f"their client not vanished")
    actions = report.actions()
    missing = [action for action in ACTIONS if not actions[action]]
    if missing:
        failures.append(f"no disruption of kind {missing} happened")
    for recovery in report.recoveries:
        if not recovery.ok:
            failures.append(f"after {recovery.action} of {recovery.client}, a port did not "
                            f"echo in {PROBE_ATTEMPTS} tries")
    quiet = [port for port, outcomes in report.perPort.items() if outcomes["ok"] < minOkPerPort]
    if quiet or len(report.perPort) < len(report.online):
        failures.append(f"fewer than {minOkPerPort} users went through some ports: "
                        f"{ {port: report.perPort.get(port, Counter())['ok'] for port in report.online} }")
    slow = [r for r in report.recoveries if r.registeredAfter > RETURN_BOUND]
    if slow:
        failures.append(f"returning clients waited more than {RETURN_BOUND:g} s for their "
                        f"ports: {slow}")
    if report.problems:
        failures.append(f"{len(report.problems)} problems in the processes' output")
    if report.serverExit != (0, None):
        failures.append(f"the server's exit on SIGTERM: (code, signal) = {report.serverExit}")
    return failures

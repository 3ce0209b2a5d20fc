#!/usr/bin/env python3
"""
gotunnelbench: gotunnel measured next to a direct connection, in one run.

A profile is a way for a user's connection to reach a target service on
127.0.0.1:

    direct     the user connects to the target itself (the machine's limit)
    socat      socat relays a port to the target, one process per connection
    gotunnel   twistd gotunnel-server and twistd gotunnel-client, the client
               mapping the target's port to a public port on the server

Each run of a workload starts the profile afresh, waits until an echo (or,
for iperf3, a tiny iperf3 test) passes through the public port, measures,
and stops it.  Profiles take turns within every repeat, so they share the
machine's state; the tables show medians over --repeat runs and each
profile's ratio to direct and to socat.

Run it with the Python of the virtualenv gotunnel is installed in; twistd is
taken from the same directory:

    .venv/bin/python bench/gotunnelbench.py
    .venv/bin/python bench/gotunnelbench.py --workloads throughput,rtt --repeat 3
    .venv/bin/python bench/gotunnelbench.py --client-args='--log-level warn' --json b.json

The target services and the load generators are this file re-run with a
hidden first argument (_target, _load), so none of them shares a process
with a relay.  Every connection is to 127.0.0.1 (the gotunnel server
binds the public port to its --public-interface, 0.0.0.0 unless
--server-args says otherwise).  Every process the bench starts runs
in its own process group and is stopped by that id when the bench ends,
also on Ctrl-C, SIGTERM or an error.  Linux only: it reads /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import resource
import select
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional

HOST = "127.0.0.1"
SELF = os.path.abspath(__file__)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROFILES = ("direct", "socat", "gotunnel")
WORKLOADS = ("throughput", "setup", "rtt", "setup-busy", "concurrency", "idle", "slow-reader")
READY_SECONDS = 30.0        # a profile must forward within this
TARGET_LIFETIME = 3 * 3600  # the target process gives up on its own after this
CHUNK = 256 * 1024
BLOCK = os.urandom(CHUNK)
STREAM_HEADER = struct.Struct("!cIQ")   # op (U or D), milliseconds, bytes
COUNT = struct.Struct("!Q")
CONCURRENCY_BYTES = 64 * 1024


class BenchError(Exception):
    """A profile or a workload could not run; the message says why."""


# ---------------------------------------------------------------------------
# /proc: CPU time and memory of the relay processes
# ---------------------------------------------------------------------------

def procStat(pid: int) -> tuple[int, int]:
    """(parent pid, utime+stime+cutime+cstime in ticks) of one process."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[1]), sum(int(x) for x in fields[11:15])


def processTree(root: int) -> list[int]:
    """C{root} and its live descendants: socat forks one per connection."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                parents[int(name)] = procStat(int(name))[0]
            except (OSError, ValueError, IndexError):
                pass
    tree = [root] if root in parents else []
    for pid in tree:            # grows as we go; every pid is added once
        tree.extend(p for p, parent in parents.items() if parent == pid)
    return tree


def statusKiB(pid: int, key: str) -> int:
    """A kB field (VmRSS, VmHWM) of /proc/PID/status; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def privateKiB(pid: int) -> int:
    """
    Private_Dirty: memory no other process shares.  Unlike RSS it does not
    count socat's forks' shared pages once per fork; unlike PSS it does not
    move when other processes map the same libraries.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Private_Dirty:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def resetPeak(pid: int) -> None:
    """Make VmHWM start again from the current RSS (Linux 4.0 and later)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# ---------------------------------------------------------------------------
# processes and ports
# ---------------------------------------------------------------------------

class Processes:
    """
    Starts every outside process in its own process group, with its output
    in a log file, and stops the group by its id.
    """

    def __init__(self, logDir: str) -> None:
        self.logDir = logDir
        self.running: list[subprocess.Popen] = []
        self.started = 0

    def start(self, name: str, argv: list[str], cwd: Optional[str] = None,
              pipes: bool = False) -> subprocess.Popen:
        self.started += 1
        log = os.path.join(self.logDir, f"{self.started:03d}-{name}.log")
        with open(log, "wb") as logFile:
            try:
                proc = subprocess.Popen(
                    argv, cwd=cwd, stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                    stdout=subprocess.PIPE if pipes else logFile, stderr=logFile,
                    start_new_session=True)
            except OSError as e:
                raise BenchError(f"cannot start {name} ({argv[0]}): {e.strerror}") from None
        proc.name, proc.log = name, log
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM to the group, SIGKILL after 5 s, and SIGKILL to what it left behind."""
        if proc.poll() is None:
            self._signalGroup(proc, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                self._signalGroup(proc, signal.SIGKILL)
                proc.wait(5)
        self._signalGroup(proc, signal.SIGKILL)
        for stream in (proc.stdin, proc.stdout):
            if stream:
                stream.close()
        if proc in self.running:
            self.running.remove(proc)

    @staticmethod
    def _signalGroup(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stopAll(self) -> None:
        for proc in reversed(list(self.running)):
            try:
                self.stop(proc)
            except (OSError, subprocess.TimeoutExpired):
                pass


def logTail(proc: subprocess.Popen, lines: int = 4) -> str:
    try:
        with open(proc.log, "rb") as f:
            text = f.read()[-4000:].decode("utf-8", "replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())


def readLine(proc: subprocess.Popen, timeout: float) -> str:
    """One line of a helper's stdout, waiting at most C{timeout} seconds."""
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"{proc.name} said nothing within {timeout:.0f} s: {logTail(proc)}")
        if select.select([proc.stdout], [], [], left)[0]:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise BenchError(f"{proc.name} exited: {logTail(proc)}")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def listeningPorts() -> set[int]:
    ports = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                for line in list(f)[1:]:
                    fields = line.split()
                    if fields[3] == "0A":           # TCP_LISTEN
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except (OSError, IndexError, ValueError):
            pass
    return ports


def freePort() -> int:
    """
    A free loopback port below the ephemeral range, so that none of the
    thousands of connections a run makes takes it as its source port first.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    busy = listeningPorts()
    for _ in range(200):
        port = random.randrange(10000, max(low, 10001))
        if port in busy:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        return port
    raise BenchError("no free port on 127.0.0.1 below the ephemeral range")


def raiseFileLimit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def percentile(values: list[float], q: float) -> Optional[float]:
    """The nearest-rank percentile of C{values}; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(q / 100 * len(ordered))) - 1)]


def recvExactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:         # each round gets at least one byte
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def echoes(port: int) -> bool:
    """True if 16 random bytes sent to C{port} come back."""
    payload = os.urandom(16)
    with socket.create_connection((HOST, port), timeout=2.0) as s:
        s.sendall(payload)
        return recvExactly(s, len(payload)) == payload


# ---------------------------------------------------------------------------
# relays
# ---------------------------------------------------------------------------

class Relay:
    """A running profile: the port users connect to and the processes behind it."""

    def __init__(self, profile: str, public: int) -> None:
        self.profile = profile
        self.public = public
        self.roles: dict[str, subprocess.Popen] = {}   # "server", "client" or "socat"
        self.startSeconds = 0.0

    def pids(self, role: str) -> list[int]:
        pid = self.roles[role].pid
        return processTree(pid) if self.profile == "socat" else [pid]

    def settle(self, seconds: float = 2.0) -> None:
        """
        Wait, a bounded while, until socat has reaped its per-connection
        processes: then their CPU time is in its cutime, counted once.
        """
        deadline = time.monotonic() + seconds
        while self.profile == "socat" and time.monotonic() < deadline:
            if len(self.pids("socat")) == 1:
                return
            time.sleep(0.02)

    def cpuSeconds(self) -> float:
        """CPU seconds the relay's processes have used so far."""
        self.settle()
        ticks = 0
        for role in self.roles:
            for pid in self.pids(role):
                try:
                    ticks += procStat(pid)[1]
                except (OSError, ValueError, IndexError):
                    pass
        return ticks / CLK_TCK

    def rssKiB(self, role: str) -> int:
        return sum(statusKiB(pid, "VmRSS") for pid in self.pids(role))

    def privateKiB(self) -> int:
        return sum(privateKiB(pid) for role in self.roles for pid in self.pids(role))

    def checkAlive(self) -> None:
        for role, proc in self.roles.items():
            if proc.poll() is not None:
                raise BenchError(f"{role} exited with status {proc.returncode}: {logTail(proc)}")


class GrowthSampler(threading.Thread):
    """
    How much each relay process grew: its highest RSS, sampled every 20 ms
    for at most C{limit} s, less the RSS it had when first seen.  A socat
    fork is first seen just after it was made, so what it shares with its
    parent is not counted as growth.
    """

    def __init__(self, relay: Relay, limit: float) -> None:
        super().__init__(daemon=True)
        self.relay, self.limit = relay, limit
        self.first: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self.role: dict[int, str] = {}
        self.done = threading.Event()
        self.sample()
        for proc in relay.roles.values():
            resetPeak(proc.pid)

    def sample(self) -> None:
        for role in self.relay.roles:
            for pid in self.relay.pids(role):
                rss = statusKiB(pid, "VmRSS")
                if rss:
                    self.first.setdefault(pid, rss)
                    self.peak[pid] = max(self.peak.get(pid, 0), rss)
                    self.role[pid] = role

    def run(self) -> None:
        end = time.monotonic() + self.limit
        while time.monotonic() < end and not self.done.wait(0.02):
            self.sample()

    def growth(self) -> dict[str, int]:
        """Per role, KiB; call after the thread ended."""
        self.sample()
        for proc in self.relay.roles.values():      # the exact peak of the long-lived ones
            if proc.pid in self.peak:
                self.peak[proc.pid] = max(self.peak[proc.pid], statusKiB(proc.pid, "VmHWM"))
        out = {role: 0 for role in self.relay.roles}
        for pid, role in self.role.items():
            out[role] += self.peak[pid] - self.first[pid]
        return out


# ---------------------------------------------------------------------------
# the bench: targets, profiles, workloads
# ---------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, workDir: str) -> None:
        self.args = args
        self.workDir = workDir
        self.procs = Processes(workDir)
        self.token = "bench-" + os.urandom(8).hex()
        self.twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.echoPort = self.streamPort = self.iperfPort = None
        self.iperf: Optional[subprocess.Popen] = None
        self.useIperf = bool(shutil.which("iperf3")) and not args.no_iperf3

    def unavailable(self, profile: str) -> Optional[str]:
        """Why C{profile} cannot run here, or None."""
        if profile == "socat" and not shutil.which("socat"):
            return "socat is not installed"
        if profile == "gotunnel" and not os.access(self.twistd, os.X_OK):
            return (f"no twistd next to {sys.executable}: run this with the Python of the "
                    "virtualenv gotunnel is installed in")
        return None

    # -- target services ------------------------------------------------------

    def startTargets(self) -> None:
        """The echo and stream targets (one process), and iperf3 -s if used."""
        self.echoPort, self.streamPort = freePort(), freePort()
        proc = self.procs.start("targets", [sys.executable, SELF, "_target",
                                            str(self.echoPort), str(self.streamPort)], pipes=True)
        if readLine(proc, 20) != "READY":
            raise BenchError(f"the target services did not start: {logTail(proc)}")
        if self.useIperf and "throughput" in self.args.workloads:
            self.iperfPort = freePort()
            self.startIperf()

    def startIperf(self) -> None:
        """Start iperf3 -s, or start it again."""
        if self.iperf is not None:
            self.procs.stop(self.iperf)
        self.iperf = self.procs.start("iperf3-server",
                                      ["iperf3", "-s", "-B", HOST, "-p", str(self.iperfPort)])
        deadline = time.monotonic() + 10
        while self.iperfPort not in listeningPorts():
            if self.iperf.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"iperf3 -s did not listen: {logTail(self.iperf)}")
            time.sleep(0.02)

    # -- profiles ---------------------------------------------------------------

    def startRelay(self, profile: str, target: int, probe: Callable[[int], bool]) -> Relay:
        """Start C{profile} in front of port C{target}; return once C{probe} passes through it."""
        started = time.monotonic()
        relay = Relay(profile, target if profile == "direct" else freePort())
        try:
            if profile == "socat":
                relay.roles["socat"] = self.procs.start("socat", [
                    "socat", f"TCP-LISTEN:{relay.public},bind={HOST},fork,reuseaddr,backlog=1024",
                    f"TCP:{HOST}:{target}"])
            elif profile == "gotunnel":
                self.startGotunnel(relay, target)
            self.waitForwarding(relay, probe)
        except BaseException:
            self.stopRelay(relay)
            raise
        relay.startSeconds = time.monotonic() - started
        return relay

    def startGotunnel(self, relay: Relay, target: int) -> None:
        control = freePort()
        a = self.args
        server = [self.twistd, "-n", "--pidfile=", "gotunnel-server",
                  "--listen", f"tcp:{control}:interface={HOST}", "--token", self.token]
        client = [self.twistd, "-n", "--pidfile=", "gotunnel-client",
                  "--server", f"tcp:{HOST}:{control}", "--token", self.token,
                  "--map", f"{target}:{relay.public}"]
        # A directory of their own: no ./config.yaml of the caller's is read.
        cwd = tempfile.mkdtemp(prefix="gotunnel-", dir=self.workDir)
        relay.roles["server"] = self.procs.start(
            "gotunnel-server", server + shlex.split(a.server_args), cwd=cwd)
        # The client backs off when the server is not up yet: wait for the control port.
        deadline = time.monotonic() + READY_SECONDS
        while control not in listeningPorts():
            relay.checkAlive()
            if time.monotonic() > deadline:
                raise BenchError(f"gotunnel-server did not listen on {control} "
                                 f"within {READY_SECONDS:.0f} s")
            time.sleep(0.02)
        relay.roles["client"] = self.procs.start(
            "gotunnel-client", client + shlex.split(a.client_args), cwd=cwd)

    def waitForwarding(self, relay: Relay, probe: Callable[[int], bool]) -> None:
        deadline = time.monotonic() + READY_SECONDS
        last = "no attempt"
        while time.monotonic() < deadline:
            relay.checkAlive()
            try:
                if probe(relay.public):
                    return
                last = "wrong answer"
            except (OSError, BenchError) as e:
                last = str(e) or type(e).__name__
            time.sleep(0.05)
        raise BenchError(f"{relay.profile}: 127.0.0.1:{relay.public} did not forward "
                         f"within {READY_SECONDS:.0f} s (last: {last})")

    def stopRelay(self, relay: Relay) -> None:
        for proc in reversed(list(relay.roles.values())):    # client before server
            self.procs.stop(proc)

    # -- load generators ----------------------------------------------------------

    def load(self, spec: dict, timeout: float) -> dict:
        """Run one load generator process to its end; return what it reports."""
        proc = self.procs.start("load-" + spec["mode"],
                                [sys.executable, SELF, "_load", json.dumps(spec)], pipes=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"load generator {spec['mode']} ran over {timeout:.0f} s") from None
        finally:
            self.procs.stop(proc)
        try:
            return json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BenchError(f"load generator {spec['mode']} failed: {logTail(proc)}") from None

    def iperf3(self, port: int, options: list[str], timeout: float) -> tuple[int, float]:
        """(bytes received, seconds) of one iperf3 test through C{port}."""
        proc = self.procs.start("iperf3-client", ["iperf3", "-c", HOST, "-p", str(port), "-J"]
                                + options, pipes=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            out = b"{}"
        finally:
            self.procs.stop(proc)
        try:
            report = json.loads(out)
        except ValueError:
            report = {}
        try:
            received = report["end"]["sum_received"]
            return received["bytes"], received["seconds"]
        except (KeyError, TypeError):
            if port in listeningPorts():
                self.startIperf()       # a test that failed half-way can leave it stuck
            raise BenchError(f"iperf3: {report.get('error') or logTail(proc)}") from None

    def iperfProbe(self, port: int) -> bool:
        """iperf3 does not echo: a 1 KB iperf3 test is its round trip."""
        return self.iperf3(port, ["-n", "1K", "--connect-timeout", "1000"], 5)[0] > 0

    # -- workloads: each returns its numbers for one profile ----------------------

    def target(self, workload: str) -> tuple[int, Callable[[int], bool]]:
        """The port a workload's relay forwards to, and how to see it forward."""
        if workload == "throughput" and self.useIperf:
            return self.iperfPort, self.iperfProbe
        if workload in ("throughput", "slow-reader"):
            return self.streamPort, streamAnswers
        return self.echoPort, echoes

    def throughput(self, relay: Relay) -> dict:
        out = {}
        seconds = self.args.seconds
        for direction in ("up", "down"):
            cpu = relay.cpuSeconds()
            if self.useIperf:
                options = ["-t", str(seconds), "--connect-timeout", "3000"]
                size, elapsed = self.iperf3(relay.public, options + ["-R"] * (direction == "down"),
                                            seconds + 20)
            else:
                got = self.load({"mode": direction, "port": relay.public, "seconds": seconds},
                                seconds + 30)
                size, elapsed = got["bytes"], got["seconds"]
            cpu = relay.cpuSeconds() - cpu
            out[f"{direction}_MBps"] = size / elapsed / 1e6 if elapsed else None
            out[f"{direction}_cpu_s_per_GB"] = cpu / (size / 1e9) if relay.roles and size else None
        return out

    def setup(self, relay: Relay) -> dict:
        n = self.args.setup_conns
        got = self.load({"mode": "setup", "port": relay.public, "n": n, "seconds": 60}, 90)
        return {"p50_ms": percentile(got["ms"], 50), "p99_ms": percentile(got["ms"], 99),
                "failures": n - len(got["ms"]), "errors": got["errors"]}

    def rtt(self, relay: Relay) -> dict:
        n = self.args.rtt_rounds
        got = self.load({"mode": "rtt", "port": relay.public, "n": n, "seconds": 60}, 90)
        return {"p50_us": percentile(got["us"], 50), "p99_us": percentile(got["us"], 99),
                "failures": n - len(got["us"]), "errors": got["errors"]}

    def setupBusy(self, relay: Relay) -> dict:
        """
        Setup latency while another connection ping-pongs through the same
        relay: what a connection that keeps the splice thread polling costs
        the reactor's new connections, and the ping-pong's own round trip.
        """
        pinger = self.procs.start("load-rtt", [sys.executable, SELF, "_load", json.dumps(
            {"mode": "rtt", "port": relay.public, "n": 10 ** 9, "seconds": 120,
             "untilStdinCloses": True})], pipes=True)
        try:
            readLine(pinger, 30)        # connected, and past its warm-up
            setup = self.setup(relay)
            out, _ = pinger.communicate(timeout=30)     # closes its stdin: it stops
            rtt = json.loads(out.decode().strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            raise BenchError(f"the ping-pong beside setup failed: {logTail(pinger)}") from None
        finally:
            self.procs.stop(pinger)
        setup["pingpong_p50_us"] = percentile(rtt["us"], 50)
        setup["failures"] += sum(rtt["errors"].values())
        return setup

    def concurrency(self, relay: Relay) -> dict:
        c = self.args.concurrency
        got = self.load({"mode": "concurrency", "port": relay.public, "n": c, "seconds": 60}, 90)
        return {"wall_s": got["wall_s"], "p99_ms": percentile(got["ms"], 99),
                "failures": c - len(got["ms"]), "errors": got["errors"]}

    def idle(self, relay: Relay) -> dict:
        k = self.args.idle_conns
        proc = self.procs.start("load-idle", [sys.executable, SELF, "_load", json.dumps(
            {"mode": "idle", "port": relay.public, "n": k, "seconds": 60})], pipes=True)
        try:
            # Measured with the load generator running, before it connects and
            # after: what it maps is in both numbers.
            if readLine(proc, 30) != "STARTED":
                raise BenchError(f"idle load generator did not start: {logTail(proc)}")
            before = sum(relay.rssKiB(role) for role in relay.roles)
            privateBefore = relay.privateKiB()
            proc.stdin.write(b"open\n")
            proc.stdin.flush()
            line = readLine(proc, 90)
            if not line.startswith("READY "):
                raise BenchError(f"idle load generator said {line[:200]!r}")
            opened = json.loads(line[len("READY "):])
            relay.checkAlive()
            held = sum(relay.rssKiB(role) for role in relay.roles)
            privateHeld = relay.privateKiB()
            proc.stdin.write(b"close\n")
            proc.stdin.flush()
            proc.communicate(timeout=30)
        except (OSError, ValueError, subprocess.TimeoutExpired) as e:
            raise BenchError(f"idle load generator failed: {e!r} {logTail(proc)}") from None
        finally:
            self.procs.stop(proc)
        n = max(1, opened["open"])
        has = bool(relay.roles)
        return {"none_KiB": before if has else None, "idle_KiB": held if has else None,
                "KiB_per_conn": (held - before) / n if has else None,
                "private_KiB_per_conn": (privateHeld - privateBefore) / n if has else None,
                "failures": k - opened["open"], "errors": opened["errors"]}

    def slowReader(self, relay: Relay) -> dict:
        a = self.args
        size = a.slow_mib * 2**20
        limit = size / (a.slow_rate * 1e6) * 3 + 30
        sampler = GrowthSampler(relay, limit + 10)
        sampler.start()
        try:
            got = self.load({"mode": "slow", "port": relay.public, "bytes": size,
                             "rate": a.slow_rate * 1e6, "seconds": limit}, limit + 10)
        finally:
            sampler.done.set()
            sampler.join()
        growth = sampler.growth()
        return {"server_KiB": growth.get("server"), "client_KiB": growth.get("client"),
                "total_KiB": sum(growth.values()) if growth else None,
                "read_MBps": got["bytes"] / got["seconds"] / 1e6 if got["seconds"] else None,
                "failures": 0 if got["bytes"] == size else 1, "errors": got["errors"]}


def streamAnswers(port: int) -> bool:
    """True if the stream target sends one byte when asked, through C{port}."""
    with socket.create_connection((HOST, port), timeout=2.0) as s:
        s.sendall(STREAM_HEADER.pack(b"D", 2000, 1))
        return len(recvExactly(s, 1)) == 1


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------

# Per workload: a title (from the arguments) and its rows: key, label, format,
# and whether a ratio means something for that row.
TABLES: dict[str, tuple[Callable[[argparse.Namespace, bool], str], list]] = {
    "throughput": (
        lambda a, iperf: f"throughput: one stream each way, {a.seconds} s each, "
                         f"{'iperf3' if iperf else 'built-in sender and sink'}",
        [("up_MBps", "up MB/s", "{:.0f}", True),
         ("down_MBps", "down MB/s", "{:.0f}", True),
         ("up_cpu_s_per_GB", "relay CPU s/GB up", "{:.2f}", True),
         ("down_cpu_s_per_GB", "relay CPU s/GB down", "{:.2f}", True)]),
    "setup": (
        lambda a, _: f"setup latency: {a.setup_conns} sequential connections, "
                     "connect to first echoed byte",
        [("p50_ms", "p50 ms", "{:.3f}", True), ("p99_ms", "p99 ms", "{:.3f}", True),
         ("failures", "failures", "{:.0f}", False)]),
    "rtt": (
        lambda a, _: f"round trip: {a.rtt_rounds} ping-pongs of 32 bytes on one connection",
        [("p50_us", "p50 us", "{:.0f}", True), ("p99_us", "p99 us", "{:.0f}", True),
         ("failures", "failures", "{:.0f}", False)]),
    "setup-busy": (
        lambda a, _: f"setup latency next to a ping-pong: {a.setup_conns} sequential "
                     "connections while another connection ping-pongs 32 bytes",
        [("p50_ms", "setup p50 ms", "{:.3f}", True), ("p99_ms", "setup p99 ms", "{:.3f}", True),
         ("pingpong_p50_us", "ping-pong p50 us", "{:.0f}", True),
         ("failures", "failures", "{:.0f}", False)]),
    "concurrency": (
        lambda a, _: f"concurrency: {a.concurrency} connections at once, each echoing 64 KiB",
        [("wall_s", "wall s", "{:.3f}", True), ("p99_ms", "connection p99 ms", "{:.1f}", True),
         ("failures", "failures", "{:.0f}", False)]),
    "idle": (
        lambda a, _: f"idle memory: relay RSS with {a.idle_conns} idle connections vs none",
        [("none_KiB", "RSS, none KiB", "{:.0f}", True),
         ("idle_KiB", "RSS, idle KiB", "{:.0f}", True),
         ("KiB_per_conn", "RSS KiB/conn", "{:.1f}", True),
         ("private_KiB_per_conn", "private KiB/conn", "{:.1f}", True),
         ("failures", "failures", "{:.0f}", False)]),
    "slow-reader": (
        lambda a, _: f"slow reader: {a.slow_mib} MiB from the target to a user "
                     f"reading {a.slow_rate:g} MB/s",
        [("server_KiB", "server peak RSS growth KiB", "{:.0f}", True),
         ("client_KiB", "client peak RSS growth KiB", "{:.0f}", True),
         ("total_KiB", "all relay processes KiB", "{:.0f}", True),
         ("read_MBps", "reader got MB/s", "{:.2f}", True),
         ("failures", "failures", "{:.0f}", False)]),
}


def summarize(runs: list[dict]) -> dict:
    """Medians of every number over the runs; failures are summed."""
    summary = {}
    for key in dict.fromkeys(k for run in runs for k in run):
        values = [run[key] for run in runs if isinstance(run.get(key), (int, float))]
        if values:
            summary[key] = sum(values) if key == "failures" else statistics.median(values)
    return summary


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ratio(value: float) -> str:
    return f"{value:.2f}x" if abs(value) >= 0.1 else f"{value:.2g}x"


def report(summaries: dict, notes: dict, profiles: list[str], args: argparse.Namespace,
           iperf: bool) -> str:
    refs = [p for p in ("direct", "socat") if p in profiles]
    pairs = [(p, ref) for ref in refs for p in profiles if p != ref and p != "direct"]
    out = []
    for workload in args.workloads:
        title, rows = TABLES[workload]
        per = summaries.get(workload, {})
        if not per and not notes.get(workload):
            continue                # interrupted before it ran
        cells = [[""] + profiles + [f"{p}/{ref}" for p, ref in pairs]]
        for key, label, fmt, hasRatio in rows:
            values = {p: per.get(p, {}).get(key) for p in profiles}
            row = [label] + ["-" if values[p] is None else fmt.format(values[p]) for p in profiles]
            for p, ref in pairs:
                ok = hasRatio and values[p] is not None and values[ref]
                row.append(ratio(values[p] / values[ref]) if ok else "-")
            cells.append(row)
        out.append(f"\n== {title(args, iperf)} (median of {args.repeat})")
        out.append(table(cells))
        out.extend(f"   {p}: {note}" for p, note in notes.get(workload, {}).items())
    out.append("\nratio = value / value of the reference profile. MB/s: higher is better; "
               "ms, us, s, KiB, CPU: lower is better.\n"
               "relay = the processes between user and target: gotunnel's server and client, "
               "or socat and its\nper-connection forks (direct has none: '-'). A fork's RSS "
               "counts what it shares with socat again:\ncompare socat's memory by private "
               "KiB (Private_Dirty), and its growth counts from each fork's start.")
    return "\n".join(out)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def parseArgs(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gotunnelbench",
        description="Measure gotunnel next to a direct connection and socat, in one run.")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, from {','.join(WORKLOADS)} (default: all)")
    p.add_argument("--profiles", default=",".join(PROFILES),
                   help=f"comma-separated, from {','.join(PROFILES)} (default: all installed)")
    p.add_argument("--seconds", type=int, default=3, help="throughput: seconds per direction")
    p.add_argument("--setup-conns", type=int, default=200, help="setup: sequential connections")
    p.add_argument("--rtt-rounds", type=int, default=2000, help="rtt: ping-pongs")
    p.add_argument("--concurrency", type=int, default=200, help="concurrency: connections")
    p.add_argument("--idle-conns", type=int, default=200, help="idle: connections held open")
    p.add_argument("--slow-mib", type=int, default=32, help="slow-reader: MiB sent")
    p.add_argument("--slow-rate", type=float, default=8.0, help="slow-reader: MB/s read")
    p.add_argument("--repeat", type=int, default=1, help="runs per profile, interleaved; "
                   "the tables show medians")
    p.add_argument("--server-args", default="", metavar="ARGS",
                   help="extra gotunnel-server arguments, e.g. --server-args='--log-level warn' "
                   "(write it with '=' when ARGS starts with '-')")
    p.add_argument("--client-args", default="", metavar="ARGS",
                   help="extra gotunnel-client arguments, as --server-args")
    p.add_argument("--no-iperf3", action="store_true",
                   help="measure throughput with the built-in sender and sink")
    p.add_argument("--json", metavar="FILE", help="also write every run and the medians here")
    p.add_argument("--max-minutes", type=float, default=20,
                   help="start no new run after this many minutes")
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.profiles = [w for w in args.profiles.split(",") if w]
    for name, known in (("workload", WORKLOADS), ("profile", PROFILES)):
        for item in getattr(args, name + "s"):
            if item not in known:
                p.error(f"unknown {name} {item!r}; choose from {', '.join(known)}")
    limits = {"--seconds": (args.seconds, 1, 600), "--setup-conns": (args.setup_conns, 1, 100000),
              "--rtt-rounds": (args.rtt_rounds, 1, 1000000),
              "--concurrency": (args.concurrency, 1, 10000),
              "--idle-conns": (args.idle_conns, 1, 10000), "--slow-mib": (args.slow_mib, 1, 4096),
              "--slow-rate": (args.slow_rate, 0.1, 10000), "--repeat": (args.repeat, 1, 100)}
    for flag, (value, low, high) in limits.items():
        if not low <= value <= high:
            p.error(f"{flag} must be from {low} to {high}")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def brief(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.0f}" if abs(v) >= 100 else f"{k} {v:.3g}"
                     for k, v in metrics.items() if isinstance(v, (int, float)))


def interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    args = parseArgs(argv)
    raiseFileLimit()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    workDir = tempfile.mkdtemp(prefix="gotunnelbench-")
    bench = Bench(args, workDir)
    started = time.monotonic()
    loadBefore = os.getloadavg()
    runs: dict[str, dict[str, list]] = {w: {} for w in args.workloads}
    notes: dict[str, dict[str, str]] = {w: {} for w in args.workloads}
    profiles = []
    for profile in args.profiles:
        why = bench.unavailable(profile)
        if why:
            log(f"[skip] {profile}: {why}")
            for w in args.workloads:
                notes[w][profile] = "skipped: " + why
        else:
            profiles.append(profile)
    if not profiles:
        log("[error] no profile can run here")
        return 2
    interrupted = False
    try:
        bench.startTargets()
        for rep in range(args.repeat):
            for workload in args.workloads:
                port, probe = bench.target(workload)
                measure = getattr(bench, {"slow-reader": "slowReader",
                                          "setup-busy": "setupBusy"}.get(workload, workload))
                shift = rep % len(profiles)
                for profile in profiles[shift:] + profiles[:shift]:
                    if time.monotonic() - started > 60 * args.max_minutes:
                        notes[workload][profile] = "some runs skipped: --max-minutes reached"
                        continue
                    relay = None
                    try:
                        relay = bench.startRelay(profile, port, probe)
                        metrics = measure(relay)
                        relay.checkAlive()
                        metrics["start_s"] = relay.startSeconds
                        runs[workload].setdefault(profile, []).append(metrics)
                        log(f"[{rep + 1}/{args.repeat} {workload}] {profile}: {brief(metrics)}")
                    except BenchError as e:
                        notes[workload][profile] = f"failed: {e}"
                        log(f"[{rep + 1}/{args.repeat} {workload}] {profile} FAILED: {e}")
                    finally:
                        if relay is not None:
                            bench.stopRelay(relay)
    except KeyboardInterrupt as e:
        interrupted = True
        log(f"[stop] interrupted ({e}); stopping everything this bench started")
    except BenchError as e:
        interrupted = True
        log(f"[error] {e}")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)      # let the cleanup finish
        bench.procs.stopAll()
        if args.keep_logs:
            log(f"[info] logs kept in {workDir}")
        else:
            shutil.rmtree(workDir, ignore_errors=True)

    summaries = {w: {p: summarize(r) for p, r in per.items()} for w, per in runs.items()}
    elapsed = time.monotonic() - started
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(),
            "kernel": platform.release(), "python": platform.python_version(),
            "load_before": loadBefore, "load_after": os.getloadavg(),
            "iperf3": bench.useIperf, "elapsed_s": round(elapsed, 1), "argv": argv}
    print(f"gotunnelbench: {meta['cpus']} CPUs, Linux {meta['kernel']}, Python {meta['python']}, "
          f"{elapsed:.0f} s; load average {loadBefore[0]:.2f} before, "
          f"{meta['load_after'][0]:.2f} after (the relays, targets and load generators "
          "share these CPUs)" + ("; INTERRUPTED, partial results" if interrupted else ""))
    print(report(summaries, notes, args.profiles, args, bench.useIperf))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "params": vars(args), "runs": runs, "medians": summaries,
                       "notes": notes}, f, indent=2)
        log(f"[info] wrote {args.json}")
    return 130 if interrupted else 0


# ---------------------------------------------------------------------------
# _target: the echo and stream services the relays forward to
# ---------------------------------------------------------------------------

class EchoTarget(asyncio.Protocol):
    """Sends back what it reads; stops reading while the peer does not read."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


class StreamTarget(asyncio.Protocol):
    """
    After a L{STREAM_HEADER}: op U counts what arrives until end-of-stream and
    answers the count; op D sends until it has sent the bytes or the
    milliseconds asked for are over, then ends the stream.
    """

    op = None
    paused = finished = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.head = b""
        self.received = 0

    def data_received(self, data: bytes) -> None:
        if self.op is None:
            self.head += data
            if len(self.head) < STREAM_HEADER.size:
                return
            self.op, ms, self.left = STREAM_HEADER.unpack_from(self.head)
            data = self.head[STREAM_HEADER.size:]
            self.until = time.monotonic() + ms / 1000
            if self.op == b"D":
                self.send()
        self.received += len(data)

    def send(self) -> None:
        while not self.paused and self.left > 0 and time.monotonic() < self.until:
            size = min(self.left, CHUNK)
            self.transport.write(BLOCK if size == CHUNK else BLOCK[:size])
            self.left -= size
        if not self.paused and not self.finished:
            self.finished = True
            self.transport.write_eof()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.op == b"D" and not self.finished:
            self.send()

    def eof_received(self) -> None:
        if self.op == b"U":
            self.transport.write(COUNT.pack(self.received))
        # Returning None closes the transport once its buffer is written.


async def serveTargets(echoPort: int, streamPort: int) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(EchoTarget, HOST, echoPort, backlog=4096),
               await loop.create_server(StreamTarget, HOST, streamPort, backlog=4096)]
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print("READY", flush=True)
    try:    # until the bench closes our stdin (or dies), and not for ever
        await asyncio.wait_for(stdin.read(), TARGET_LIFETIME)
    except asyncio.TimeoutError:
        pass
    for server in servers:
        server.close()


# ---------------------------------------------------------------------------
# _load: the load generators, one process per workload run
# ---------------------------------------------------------------------------

def connect(port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def countError(errors: dict, e: BaseException) -> None:
    name = type(e).__name__
    errors[name] = errors.get(name, 0) + 1


def loadSetup(spec: dict) -> dict:
    """N sequential connections: ms from connect() to the first echoed byte."""
    ms, errors = [], {}
    deadline = time.monotonic() + spec["seconds"]
    for i in range(5 + spec["n"]):          # 5 to warm up
        if time.monotonic() > deadline:
            errors["time limit"] = 5 + spec["n"] - i
            break
        try:
            start = time.perf_counter()
            with connect(spec["port"], 5.0) as s:
                s.sendall(b"x")
                if s.recv(1) != b"x":
                    raise ConnectionError("no echo")
                if i >= 5:
                    ms.append((time.perf_counter() - start) * 1e3)
        except OSError as e:
            countError(errors, e)
    return {"ms": ms, "errors": errors}


def loadRtt(spec: dict) -> dict:
    """
    N ping-pongs of 32 bytes on one connection: us per round trip.  With
    C{untilStdinCloses}, it says "ready" after its warm-up and goes on
    until its standard input closes (or its time is up).
    """
    us, errors = [], {}
    deadline = time.monotonic() + spec["seconds"]
    payload = os.urandom(32)
    untilStdinCloses = spec.get("untilStdinCloses", False)
    try:
        with connect(spec["port"], 5.0) as s:
            for i in range(100 + spec["n"]):    # 100 to warm up
                if time.monotonic() > deadline:
                    if not untilStdinCloses:
                        errors["time limit"] = 100 + spec["n"] - i
                    break
                if untilStdinCloses and i >= 100:
                    if i == 100:
                        print("ready", flush=True)
                    if select.select([sys.stdin], [], [], 0)[0]:
                        break
                start = time.perf_counter()
                s.sendall(payload)
                if recvExactly(s, 32) != payload:
                    raise ConnectionError("wrong echo")
                if i >= 100:
                    us.append((time.perf_counter() - start) * 1e6)
    except OSError as e:
        countError(errors, e)
    return {"us": us, "errors": errors}


def loadUp(spec: dict) -> dict:
    """Send for the seconds asked; the sink's count, over the time until it answered."""
    with connect(spec["port"]) as s:
        start = time.perf_counter()
        s.sendall(STREAM_HEADER.pack(b"U", 0, 0))
        end = start + spec["seconds"]
        while time.perf_counter() < end:
            s.sendall(BLOCK)
        s.shutdown(socket.SHUT_WR)
        received = COUNT.unpack(recvExactly(s, COUNT.size))[0]
        return {"bytes": received, "seconds": time.perf_counter() - start, "errors": {}}


def loadDown(spec: dict) -> dict:
    """Ask the target to send for the seconds asked; count until its end-of-stream."""
    with connect(spec["port"]) as s:
        start = time.perf_counter()
        s.sendall(STREAM_HEADER.pack(b"D", spec["seconds"] * 1000, 2**62))
        received = 0
        buf = bytearray(CHUNK)
        while True:             # bounded by the target's time limit and our socket timeout
            n = s.recv_into(buf)
            if not n:
                break
            received += n
        return {"bytes": received, "seconds": time.perf_counter() - start, "errors": {}}


def loadSlow(spec: dict) -> dict:
    """Read what the target sends at the rate asked, through a small receive buffer."""
    errors = {}
    received = 0
    start = time.perf_counter()
    s = socket.socket()
    # A fixed small buffer, as a slow network gives: the kernel cannot hide
    # a relay that keeps reading from the target.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.settimeout(10.0)
    try:
        s.connect((HOST, spec["port"]))
        s.sendall(STREAM_HEADER.pack(b"D", int(spec["seconds"] * 1000), spec["bytes"]))
        deadline = time.monotonic() + spec["seconds"]
        while received < spec["bytes"] and time.monotonic() < deadline:
            chunk = s.recv(min(16384, spec["bytes"] - received))
            if not chunk:
                break
            received += len(chunk)
            ahead = received / spec["rate"] - (time.perf_counter() - start)
            if ahead > 0:
                time.sleep(ahead)
    except OSError as e:
        countError(errors, e)
    finally:
        s.close()
    return {"bytes": received, "seconds": time.perf_counter() - start, "errors": errors}


async def loadConcurrency(spec: dict) -> dict:
    """N connections at once, each echoing 64 KiB: wall time and ms per connection."""
    data = os.urandom(CONCURRENCY_BYTES)

    async def one(i: int) -> float:
        mine = data[i:] + data[:i]              # different per connection: cross-talk shows
        start = time.perf_counter()
        reader, writer = await asyncio.open_connection(HOST, spec["port"])
        try:
            writer.write(mine)
            _, got = await asyncio.gather(writer.drain(), reader.readexactly(len(mine)))
        finally:
            writer.close()
        if got != mine:
            raise ConnectionError("wrong echo")
        return (time.perf_counter() - start) * 1e3

    async def guarded(i: int) -> Any:
        try:
            return await asyncio.wait_for(one(i), spec["seconds"])
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            return e

    start = time.perf_counter()
    outcomes = await asyncio.gather(*(guarded(i) for i in range(spec["n"])))
    wall = time.perf_counter() - start
    errors: dict = {}
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            countError(errors, outcome)
    return {"wall_s": wall, "ms": [o for o in outcomes if isinstance(o, float)], "errors": errors}


async def loadIdle(spec: dict) -> dict:
    """
    When told, open N connections and echo once on each; hold them until
    told again, then close them.
    """
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print("STARTED", flush=True)
    try:
        await asyncio.wait_for(stdin.readline(), spec["seconds"])
    except asyncio.TimeoutError:
        return {"closed": 0}
    gate = asyncio.Semaphore(64)

    async def openOne(i: int) -> Any:
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(HOST, spec["port"]), 10)
                writer.write(b"x")
                if await asyncio.wait_for(reader.readexactly(1), 10) != b"x":
                    raise ConnectionError("no echo")
                return writer
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                return e

    outcomes = await asyncio.gather(*(openOne(i) for i in range(spec["n"])))
    held = [o for o in outcomes if isinstance(o, asyncio.StreamWriter)]
    errors: dict = {}
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            countError(errors, outcome)
    print("READY " + json.dumps({"open": len(held), "errors": errors}), flush=True)
    try:
        await asyncio.wait_for(stdin.readline(), spec["seconds"])
    except asyncio.TimeoutError:
        pass
    for writer in held:
        writer.close()
    return {"closed": len(held)}


def helperMain(role: str, args: list[str]) -> int:
    """The hidden subcommands: C{_target ECHO STREAM} and C{_load SPEC}."""
    raiseFileLimit()
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # the bench stops us by our id
    if role == "_target":
        asyncio.run(serveTargets(int(args[0]), int(args[1])))
        return 0
    spec = json.loads(args[0])
    plain = {"setup": loadSetup, "rtt": loadRtt, "up": loadUp, "down": loadDown, "slow": loadSlow}
    if spec["mode"] in plain:
        result = plain[spec["mode"]](spec)
    else:
        result = asyncio.run({"concurrency": loadConcurrency, "idle": loadIdle}[spec["mode"]](spec))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_target", "_load"):
        sys.exit(helperMain(sys.argv[1], sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))

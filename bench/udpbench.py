#!/usr/bin/env python3
"""
udpbench: a gotunnel UDP mapping measured next to a direct path and socat's
UDP relay, in one run, over 127.0.0.1.

    direct     the sender sends to the target itself
    socat      socat UDP4-LISTEN:PUBLIC,fork UDP4:127.0.0.1:TARGET
    gotunnel   gotunnel-server and gotunnel-client (this virtualenv's), the
               client mapping udp:TARGET:PUBLIC

Workloads, for each datagram size (64, 512 and 1,400 bytes by default):

    max        the sender sends as fast as it can for --seconds; the target
               counts what arrives: packets per second delivered, loss, and
               the relay's CPU time per datagram
    sustained  the sender paces itself at rising rates (x1.4 from
               --start-rate, --step-seconds each) until more than 1% is
               lost: the highest rate with at most 1% lost
    at-socat   paced at the rate socat sustained in the same repeat: loss

and the round trip of a 64-byte echo (p50, p99), one at a time.

All three relays start once and stay up; the measurements take turns
(profile after profile, within every repeat), and the tables show medians
over --repeat.  The target is this file re-run (_target), in a process of
its own; the sender and the echo client are this process.  Every process it
starts is in its own process group and is stopped by that id at the end.

    .venv/bin/python bench/udpbench.py
    .venv/bin/python bench/udpbench.py --repeat 5 --seconds 2 --sizes 64,1400
    .venv/bin/python bench/udpbench.py --workloads rtt --repeat 5
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from typing import Optional

HOST = "127.0.0.1"
SELF = os.path.abspath(__file__)
PROFILES = ("direct", "socat", "gotunnel")
TOKEN = "udpbench"
READY_SECONDS = 30.0
COUNT = struct.Struct("!QQ")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def freePort() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    while True:
        with socket.socket() as tcp:
            tcp.bind((HOST, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as datagram:
                try:
                    datagram.bind((HOST, port))
                except OSError:
                    continue
        return port


# ---------------------------------------------------------------------------
# The target: counts datagrams; echoes those that start with E; answers C
# (sent to it directly) with its count and byte total since the last C.


def target(port: int, controlPort: int) -> None:
    data = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    data.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    data.bind((HOST, port))
    control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    control.bind((HOST, controlPort))
    control.setblocking(False)
    count = size = 0
    data.settimeout(0.05)
    deadline = time.monotonic() + 3 * 3600
    while time.monotonic() < deadline:
        try:
            datagram, peer = data.recvfrom(65536)
        except socket.timeout:
            datagram = None
        if datagram is not None:
            if datagram[:1] == b"E":
                data.sendto(datagram, peer)
            else:
                count += 1
                size += len(datagram)
        try:
            _, asker = control.recvfrom(16)
        except BlockingIOError:
            continue
        control.sendto(COUNT.pack(count, size), asker)
        count = size = 0


# ---------------------------------------------------------------------------
# Relays


class Relay:
    def __init__(self, name: str, public: int, processes: list[subprocess.Popen]) -> None:
        self.name = name
        self.public = public
        self.processes = processes
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sender.bind((HOST, 0))
        self.sender.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024 * 1024)

    def stop(self) -> None:
        self.sender.close()
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in self.processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def processTree(pid: int) -> list[int]:
    """C{pid} and its descendants (socat forks a child per peer)."""
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(child) for child in f.read().split()]
    except OSError:
        return pids
    for child in children:
        pids += processTree(child)
    return pids


def cpuSeconds(relay: "Relay") -> float:
    """User and system CPU time of the relay's processes so far."""
    total = 0
    for process in relay.processes:
        for pid in processTree(process.pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def spawn(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def startRelay(name: str, targetPort: int, args) -> Relay:
    if name == "direct":
        return Relay(name, targetPort, [])
    public = freePort()
    if name == "socat":
        return Relay(name, public, [spawn([
            "socat", f"UDP4-LISTEN:{public},bind={HOST},fork,reuseaddr",
            f"UDP4:{HOST}:{targetPort}"])])
    bindir = os.path.dirname(sys.executable)
    control = freePort()
    server = spawn([os.path.join(bindir, "gotunnel-server"), "--listen",
                    f"tcp:{control}:interface={HOST}", "--token", TOKEN,
                    "--public-interface", HOST, "--log-level", "warn",
                    *args.server_args.split()])
    client = spawn([os.path.join(bindir, "gotunnel-client"), "--server",
                    f"tcp:{HOST}:{control}", "--token", TOKEN, "--name", "udpbench",
                    "--map", f"udp:{HOST}:{targetPort}:{public}", "--log-level", "warn",
                    *args.client_args.split()])
    return Relay(name, public, [server, client])


def waitReady(relay: Relay) -> None:
    """Until a 64-byte echo comes back through the relay (bounded)."""
    deadline = time.monotonic() + READY_SECONDS
    relay.sender.settimeout(0.2)
    while time.monotonic() < deadline:
        relay.sender.sendto(b"E" + b"r" * 63, (HOST, relay.public))
        try:
            relay.sender.recvfrom(65536)
            return
        except socket.timeout:
            for process in relay.processes:
                if process.poll() is not None:
                    raise SystemExit(f"{relay.name} ended: {process.stderr.read().decode()}")
    raise SystemExit(f"{relay.name} forwarded nothing within {READY_SECONDS} s")


def drain(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        while True:
            sock.recv(65536)
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)


# ---------------------------------------------------------------------------
# Measurements


def askCount(controlPort: int) -> tuple[int, int]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as asker:
        asker.settimeout(2)
        asker.sendto(b"C", (HOST, controlPort))
        return COUNT.unpack(asker.recv(64))


def send(relay: Relay, size: int, seconds: float, rate: Optional[float],
         controlPort: int) -> tuple[float, float, float]:
    """
    Send datagrams of C{size} bytes for C{seconds}, at C{rate} per second (or
    as fast as possible); returns (delivered per second, loss, the relay's
    CPU microseconds per delivered datagram).
    """
    askCount(controlPort)
    cpuBefore = cpuSeconds(relay)
    payload = b"P" * size
    address = (HOST, relay.public)
    sendto = relay.sender.sendto
    sent = 0
    start = time.perf_counter()
    end = start + seconds
    batch = 32
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        if rate is None:
            due = batch
        else:
            due = min(int(rate * (now - start)) - sent, batch)
            if due <= 0:
                time.sleep(0.0001)
                continue
        for _ in range(due):
            try:
                sendto(payload, address)
            except (BlockingIOError, ConnectionRefusedError):
                pass
        sent += due
    elapsed = time.perf_counter() - start
    time.sleep(0.3)
    received, _ = askCount(controlPort)
    cpu = (cpuSeconds(relay) - cpuBefore) * 1e6 / max(received, 1)
    return received / elapsed, 1 - received / max(sent, 1), cpu


def sustained(relay: Relay, size: int, args, controlPort: int) -> float:
    """The highest paced rate, of --start-rate x1.4^n, at which at most 1% is lost."""
    rate, best = args.start_rate, 0.0
    for _ in range(12):
        _, loss, _ = send(relay, size, args.step_seconds, rate, controlPort)
        if loss > 0.01:
            break
        best, rate = rate, rate * 1.4
    return best


def roundTrips(relay: Relay, count: int) -> tuple[float, float, int]:
    """p50 and p99 of a 64-byte echo in microseconds, and how many were lost."""
    sock = relay.sender
    drain(sock)
    sock.settimeout(0.5)
    times = []
    lost = 0
    for i in range(count):
        payload = b"E" + struct.pack("!I", i) + b"e" * 59
        start = time.perf_counter()
        sock.sendto(payload, (HOST, relay.public))
        while True:
            try:
                answer = sock.recv(65536)
            except socket.timeout:
                lost += 1
                break
            if answer == payload:
                times.append((time.perf_counter() - start) * 1e6)
                break
    times.sort()
    if not times:
        return float("nan"), float("nan"), lost
    return times[len(times) // 2], times[min(len(times) - 1, len(times) * 99 // 100)], lost


# ---------------------------------------------------------------------------


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.5, help="per unpaced run")
    parser.add_argument("--sizes", default="64,512,1400")
    parser.add_argument("--rtt-count", type=int, default=500)
    parser.add_argument("--start-rate", type=float, default=25000)
    parser.add_argument("--step-seconds", type=float, default=0.3)
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--workloads", default="pps,rtt",
                        help="pps (max, sustained, at-socat), rtt, or both")
    parser.add_argument("--server-args", default="")
    parser.add_argument("--client-args", default="")
    args = parser.parse_args(argv)
    workloads = args.workloads.split(",")
    sizes = [int(s) for s in args.sizes.split(",")] if "pps" in workloads else []
    profiles = args.profiles.split(",")

    targetPort, controlPort = freePort(), freePort()
    targetProcess = spawn([sys.executable, SELF, "_target", str(targetPort), str(controlPort)])
    relays: dict[str, Relay] = {}
    results: dict[tuple, list] = {}
    try:
        for name in profiles:
            relays[name] = startRelay(name, targetPort, args)
        for relay in relays.values():
            waitReady(relay)
        for repeat in range(args.repeat):
            for size in sizes:
                for name in profiles:
                    pps, loss, cpu = send(relays[name], size, args.seconds, None, controlPort)
                    results.setdefault(("max", size, name), []).append((pps, loss))
                    results.setdefault(("cpu", size, name), []).append(cpu)
                for name in profiles:
                    results.setdefault(("sustained", size, name), []).append(
                        sustained(relays[name], size, args, controlPort))
                socatRate = results.get(("sustained", size, "socat"), [None])[-1]
                if not socatRate:
                    continue
                for name in profiles:
                    pps, loss, _ = send(relays[name], size, args.seconds, socatRate, controlPort)
                    results.setdefault(("paced", size, name), []).append((socatRate, loss))
            for name in profiles if "rtt" in workloads else ():
                results.setdefault(("rtt", name), []).append(
                    roundTrips(relays[name], args.rtt_count))
            # Each repeat's own figures, for the raw numbers behind the medians.
            raw = [f"{name} paced {size}: {results[('paced', size, name)][-1][1] * 100:.2f}%"
                   for size in sizes for name in profiles if ("paced", size, name) in results]
            raw += [f"{name} rtt p50 {results[('rtt', name)][-1][0]:.0f} us"
                    for name in profiles if ("rtt", name) in results]
            print(f"repeat {repeat + 1} of {args.repeat} done: " + "; ".join(raw),
                  file=sys.stderr)
    finally:
        for relay in relays.values():
            relay.stop()
        os.killpg(targetProcess.pid, signal.SIGTERM)
        targetProcess.wait(5)

    def median(values):
        return statistics.median(values)

    def ratio(value: float, reference: float) -> str:
        return f"{value / reference:.2f}" if reference else "-"

    rows = []
    for size in sizes:
        socatPps = median(p for p, _ in results.get(("max", size, "socat"), [(float("nan"), 0)]))
        for name in profiles:
            runs = results[("max", size, name)]
            pps = median(p for p, _ in runs)
            loss = median(l for _, l in runs)
            paced = results.get(("paced", size, name))
            pacedText = (f"{median(l for _, l in paced) * 100:.2f}% at "
                         f"{median(r for r, _ in paced):,.0f}/s") if paced else "-"
            cpu = median(results[("cpu", size, name)])
            held = median(results[("sustained", size, name)])
            socatHeld = median(results.get(("sustained", size, "socat"), [float("nan")]))
            rows.append([str(size), name, f"{pps:,.0f}", f"{loss * 100:.1f}%",
                         ratio(pps, socatPps), f"{cpu:.1f}" if name != "direct" else "-",
                         f"{held:,.0f}", ratio(held, socatHeld), pacedText])
    if rows:
        table(f"UDP packets per second: sender unpaced for {args.seconds:g} s; sustained with "
              f"<= 1% loss (median of {args.repeat})",
              ["bytes", "profile", "unpaced/s", "loss", "x socat", "relay CPU us/pkt",
               "sustained/s", "x socat", "loss at socat's sustained rate"], rows)
    if "rtt" not in workloads:
        return 0
    rows = []
    socatRtt = median(r[0] for r in results.get(("rtt", "socat"), [(float("nan"),)]))
    for name in profiles:
        runs = results[("rtt", name)]
        p50 = median(r[0] for r in runs)
        rows.append([name, f"{p50:.0f}", f"{median(r[1] for r in runs):.0f}",
                     str(sum(r[2] for r in runs)), ratio(p50, socatRtt)])
    table(f"64-byte echo round trip, {args.rtt_count} in a row (median of {args.repeat})",
          ["profile", "p50 us", "p99 us", "lost", "x socat"], rows)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_target":
        target(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(main(sys.argv[1:]))

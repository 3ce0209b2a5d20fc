"""
What the public-port policies cost a new connection: setup latency
(connect to the first echoed byte, sequential, as gotunnelbench's `setup`)
through gotunnel-server and gotunnel-client started from this virtualenv,
with no policy, with a PROXY protocol header (v1, v2) toward the service,
and with an allow list of 1,000 CIDRs on the server.  Profiles run in
interleaved rounds; the table gives the median over rounds of each round's
p50 and p99.

    .venv/bin/python bench/policycost.py --rounds 5 --conns 300
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import socket
import socketserver
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HOST = "127.0.0.1"
TOKEN = "bench-token"
BIN = os.path.dirname(sys.executable)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def freePort() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def readExactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class Echo(socketserver.BaseRequestHandler):
    """Echoes, after reading a PROXY header if the profile sends one."""

    def handle(self) -> None:
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proxy = self.server.proxy
        try:
            if proxy == "v1":
                # Peek, then take the line: no read past the header.
                peeked = b""
                while b"\r\n" not in peeked:
                    peeked = sock.recv(107, socket.MSG_PEEK)
                    if not peeked:
                        return
                line = readExactly(sock, peeked.index(b"\r\n") + 2)
                assert line.startswith(b"PROXY TCP4 "), line
            elif proxy == "v2":
                head = readExactly(sock, 16)
                assert head.startswith(V2_SIGNATURE), head
                readExactly(sock, struct.unpack("!H", head[14:16])[0])
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                sock.sendall(data)
        except (OSError, ConnectionError):
            return


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def allowList(path: str, count: int) -> None:
    """A server config with COUNT CIDRs of mixed lengths, 127.0.0.0/8 the last."""
    rng = random.Random(1000)
    lines = ["server:", f"  token: {TOKEN}", "  allow_sources:"]
    for _ in range(count - 1):
        if rng.random() < 0.8:
            network = ipaddress.ip_network(
                f"{ipaddress.IPv4Address(rng.getrandbits(32))}/{rng.randint(8, 32)}", strict=False)
            if network.overlaps(ipaddress.ip_network("127.0.0.0/8")):
                continue
        else:
            network = ipaddress.ip_network(
                f"{ipaddress.IPv6Address(rng.getrandbits(128))}/{rng.randint(16, 128)}",
                strict=False)
        lines.append(f"    - \"{network}\"")
    lines.append("    - \"127.0.0.0/8\"")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def measure(port: int, count: int) -> list[float]:
    ms = []
    for i in range(5 + count):
        start = time.perf_counter()
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise ConnectionError("no echo")
        if i >= 5:
            ms.append((time.perf_counter() - start) * 1e3)
    return ms


def run(profile: str, workDir: str, count: int) -> list[float]:
    proxy = {"proxy-v1": "v1", "proxy-v2": "v2"}.get(profile)
    echo = EchoServer((HOST, 0), Echo)
    echo.proxy = proxy
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    control, public = freePort(), freePort()
    server = [os.path.join(BIN, "gotunnel-server"), "--listen", f"tcp:{control}:interface={HOST}",
              "--public-interface", HOST, "--log-level", "warn"]
    if profile == "allow-1000":
        config = os.path.join(workDir, "allow.yaml")
        allowList(config, 1000)
        server += ["--config", config]
    else:
        server += ["--token", TOKEN]
    client = [os.path.join(BIN, "gotunnel-client"), "--server", f"tcp:{HOST}:{control}",
              "--token", TOKEN, "--map", f"{echo.server_address[1]}:{public}",
              "--log-level", "warn"]
    if proxy:
        client += ["--proxy-protocol", proxy]
    procs = [subprocess.Popen(server, cwd=workDir, stdout=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((HOST, control), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        procs.append(subprocess.Popen(client, cwd=workDir, stdout=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while True:
            try:
                measure(public, 1)
                break
            except (OSError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        return measure(public, count)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)
        echo.shutdown()
        echo.server_close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--conns", type=int, default=300)
    parser.add_argument("--profiles", default="none,proxy-v1,proxy-v2,allow-1000")
    args = parser.parse_args()
    profiles = args.profiles.split(",")
    results: dict[str, list[tuple[float, float]]] = {profile: [] for profile in profiles}
    with tempfile.TemporaryDirectory(prefix="gotunnel-policycost-") as workDir:
        for round_ in range(args.rounds):
            order = profiles[round_ % len(profiles):] + profiles[:round_ % len(profiles)]
            for profile in order:
                ms = run(profile, workDir, args.conns)
                results[profile].append((percentile(ms, 50), percentile(ms, 99)))
                print(f"round {round_ + 1} {profile:11} p50 {results[profile][-1][0]:.3f} ms  "
                      f"p99 {results[profile][-1][1]:.3f} ms", flush=True)
    base = statistics.median(p50 for p50, _ in results[profiles[0]])
    print(f"\nsetup latency, median over {args.rounds} interleaved rounds of {args.conns} "
          "sequential connections")
    print(f"{'profile':11} {'p50 ms':>8} {'p99 ms':>8} {'p50 vs ' + profiles[0]:>12}")
    for profile in profiles:
        p50 = statistics.median(p for p, _ in results[profile])
        p99 = statistics.median(p for _, p in results[profile])
        print(f"{profile:11} {p50:8.3f} {p99:8.3f} {p50 / base:11.2f}x")


if __name__ == "__main__":
    main()

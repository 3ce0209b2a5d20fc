#!/usr/bin/env python3
"""
vhostbench: one HTTP service reached three ways, in one run.

    direct   the user connects to the service itself
    tcp      through a plain gotunnel mapping (--map), on a public port of its own
    vhost    through the server's HTTP virtual-host port (--http), routed by Host

One gotunnel-server and one gotunnel-client (console scripts of the
virtualenv this runs in) serve both tunnelled profiles at once; the service
is a minimal keep-alive HTTP/1.1 server in a process of its own (this file
with the hidden first argument _service).  Workloads, each a median of
--repeat runs with the profiles taking turns within every repeat:

    setup    sequential new connections, each one GET answered: p50 and p99 ms
    rps      --conns keep-alive connections sending GETs for --seconds: requests/s

    .venv/bin/python bench/vhostbench.py
    .venv/bin/python bench/vhostbench.py --repeat 5 --seconds 3 --conns 16

Every connection is to 127.0.0.1; every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HOST = "127.0.0.1"
DOMAIN = "bench.example.com"
BIN = os.path.dirname(sys.executable)
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
PROFILES = ("direct", "tcp", "vhost")


def freePort() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def request(host: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   data: bytes) -> None:
    writer.write(data)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"answer {head[:40]!r}")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await reader.readexactly(length)


async def setup(port: int, host: str, count: int) -> list[float]:
    """Milliseconds from connect to a whole answer, one new connection at a time."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        reader, writer = await asyncio.open_connection(HOST, port)
        await exchange(reader, writer, request(host))
        times.append((time.perf_counter() - start) * 1000)
        writer.close()
        await writer.wait_closed()
    return times


async def rps(port: int, host: str, conns: int, seconds: float) -> float:
    """Requests answered per second over C{conns} keep-alive connections."""
    deadline = time.perf_counter() + seconds
    data = request(host)

    async def one() -> int:
        reader, writer = await asyncio.open_connection(HOST, port)
        done = 0
        while time.perf_counter() < deadline:
            await exchange(reader, writer, data)
            done += 1
        writer.close()
        return done

    start = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(conns)))
    return sum(counts) / (time.perf_counter() - start)


async def ready(port: int, host: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            await asyncio.wait_for(exchange(reader, writer, request(host)), 5)
            writer.close()
            return
        except (OSError, RuntimeError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answers on port {port} for {host}") from None
            await asyncio.sleep(0.1)


def serviceMain(port: int) -> None:
    """The HTTP service: answers every request on a connection, keep-alive."""

    async def serve(reader, writer):
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(ANSWER)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            writer.close()

    async def main():
        server = await asyncio.start_server(serve, HOST, port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def start(argv: list[str], logs: str, name: str) -> subprocess.Popen:
    log = open(os.path.join(logs, f"{name}.log"), "wb")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="runs per profile, interleaved")
    p.add_argument("--setup-conns", type=int, default=200, help="setup: sequential connections")
    p.add_argument("--conns", type=int, default=8, help="rps: keep-alive connections")
    p.add_argument("--seconds", type=float, default=2.0, help="rps: seconds per run")
    p.add_argument("--profiles", default=",".join(PROFILES))
    args = p.parse_args(argv)
    profiles = args.profiles.split(",")
    service, control, public, http = freePort(), freePort(), freePort(), freePort()
    logs = tempfile.mkdtemp(prefix="vhostbench-")
    processes = []
    try:
        processes.append(start([sys.executable, os.path.abspath(__file__), "_service",
                                str(service)], logs, "service"))
        processes.append(start([
            os.path.join(BIN, "gotunnel-server"), "--token", "bench",
            "--listen", f"tcp:{control}:interface={HOST}", "--public-interface", HOST,
            "--http", f"tcp:{http}:interface={HOST}", "--log-level", "warn"], logs, "server"))
        processes.append(start([
            os.path.join(BIN, "gotunnel-client"), "--token", "bench", "--name", "bench",
            "--server", f"tcp:{HOST}:{control}", "--map", f"{service}:{public}",
            "--http", f"{DOMAIN}={service}", "--log-level", "warn"], logs, "client"))
        targets = {"direct": (service, DOMAIN), "tcp": (public, DOMAIN), "vhost": (http, DOMAIN)}
        for profile in profiles:
            asyncio.run(ready(*targets[profile]))
        results: dict[str, dict[str, list[float]]] = {
            profile: {"p50": [], "p99": [], "rps": []} for profile in profiles}
        for run in range(args.repeat):
            for profile in profiles:
                times = sorted(asyncio.run(setup(*targets[profile], args.setup_conns)))
                rate = asyncio.run(rps(*targets[profile], args.conns, args.seconds))
                results[profile]["p50"].append(statistics.median(times))
                results[profile]["p99"].append(times[int(len(times) * 0.99) - 1])
                results[profile]["rps"].append(rate)
                print(f"run {run + 1}/{args.repeat} {profile}: setup p50 "
                      f"{results[profile]['p50'][-1]:.2f} ms, {rate:.0f} req/s",
                      file=sys.stderr)
        print(f"\nmedians of {args.repeat} interleaved runs; setup: {args.setup_conns} "
              f"sequential connections; rps: {args.conns} keep-alive connections for "
              f"{args.seconds:g} s\n")
        print("| profile | setup p50 ms | setup p99 ms | requests/s | rps vs tcp |")
        print("|---|---|---|---|---|")
        base = statistics.median(results["tcp"]["rps"]) if "tcp" in results else None
        for profile in profiles:
            r = {key: statistics.median(values) for key, values in results[profile].items()}
            versus = f"{r['rps'] / base:.2f}x" if base else "-"
            print(f"| {profile} | {r['p50']:.2f} | {r['p99']:.2f} | {r['rps']:.0f} | {versus} |")
    finally:
        for process in reversed(processes):
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_service"]:
        serviceMain(int(sys.argv[2]))
    else:
        sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""
spacedsetup: connection setup through the tunnel with users back to back
and with users a pause apart, plain and TLS.

tunnelbench's latency workload connects its users back to back, so each
one's setup shares both processes with the pool's replacement channel of
the one before (a TLS handshake).  Users a few milliseconds apart, as they
come to a real service, show what one user's setup costs on its own.

It starts `python -m gotunnel server` and `client` from the virtualenv it
runs in (plain, then TLS, with certificates made by `python -m gotunnel
certs`), an echo target in a process of its own (see bench/muxbench.py),
and from this process connects --conns users in a row for each pause,
each sending 32 bytes and reading their echo: p50 and p90 in ms.

    .venv/bin/python bench/spacedsetup.py --conns 300 --pauses 0,10 --repeat 3

Profiles are interleaved within each repeat; medians over the repeats.
Every connection is to 127.0.0.1; every process it starts is stopped.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from muxbench import HOST, Profile, makeCertificates  # noqa: E402

WARMUP = 5
ECHO_SIZE = 32
TIMEOUT = 5.0


def setupTimes(port: int, count: int, pause: float) -> list[float]:
    """Milliseconds from connect to echo for C{count} users C{pause} s apart."""
    times = []
    for index in range(WARMUP + count):
        payload = os.urandom(ECHO_SIZE)
        start = time.perf_counter()
        with socket.create_connection((HOST, port), timeout=TIMEOUT) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(payload)
            got = b""
            while len(got) < ECHO_SIZE:
                data = s.recv(ECHO_SIZE - len(got))
                if not data:
                    raise RuntimeError("the echo ended early")
                got += data
        if got != payload:
            raise RuntimeError("the echo differs")
        if index >= WARMUP:
            times.append((time.perf_counter() - start) * 1000)
        if pause:
            time.sleep(pause)
    return times


def percentile(values: list[float], p: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, len(ordered) * p // 100)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=300, help="users for each pause")
    parser.add_argument("--pauses", default="0,10", help="ms between users, comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    pauses = [float(p) for p in args.pauses.split(",")]
    certs = makeCertificates("spacedsetup-")
    python = sys.executable
    target = subprocess.Popen([python, os.path.join(os.path.dirname(__file__), "muxbench.py"),
                               "_target"], stdout=subprocess.PIPE, text=True)
    results: dict[tuple[str, float], list[tuple[float, float]]] = {}
    try:
        targetPort = int(target.stdout.readline())
        for _ in range(args.repeat):
            for tls in (False, True):
                name = "tls" if tls else "plain"
                profile = Profile(name, False, tls, certs, targetPort)
                try:
                    for pause in pauses:
                        times = setupTimes(profile.public, args.conns, pause / 1000)
                        row = (percentile(times, 50), percentile(times, 90))
                        results.setdefault((name, pause), []).append(row)
                        print(f"{name} pause {pause:g} ms: p50 {row[0]:.3f} p90 {row[1]:.3f}",
                              file=sys.stderr, flush=True)
                finally:
                    profile.stop()
    finally:
        target.terminate()
        target.wait(10)
    print("| profile | pause ms | setup p50 ms (each repeat) | p50 median | p90 median |")
    print("|---|---|---|---|---|")
    for (name, pause), rows in results.items():
        each = ", ".join(f"{r[0]:.2f}" for r in rows)
        print(f"| {name} | {pause:g} | {each} | {statistics.median(r[0] for r in rows):.2f} "
              f"| {statistics.median(r[1] for r in rows):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""
muxbench: users carried as streams of one multiplexed connection (client
--mux) next to a data channel per user with the pool (the default), plain
and TLS.

For each of the four profiles it starts `python -m gotunnel server` and
`python -m gotunnel client` from the virtualenv it runs in, an echo target
in a process of its own, and measures from this process:

    setup       connect to first echoed byte, sequential: p50
    one         one connection echoing --mib MiB: MB/s each way at once
    hundred     100 connections at once, each echoing --mib / 100 MiB: MB/s in all
    N streams   N connections open at once (each has echoed a byte): RSS and
                descriptors of the server and the client, per connection

    .venv/bin/python bench/muxbench.py
    .venv/bin/python bench/muxbench.py --conns 1,100,10000 --mib 64

Every connection is to 127.0.0.1.  Linux only: it reads /proc.  Every
process it starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HOST = "127.0.0.1"
SELF = os.path.abspath(__file__)
TOKEN = "muxbench"


def raiseFileLimit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def makeCertificates(prefix: str) -> str:
    """A CA and a server certificate for 127.0.0.1, made by this checkout, in a new directory."""
    certs = tempfile.mkdtemp(prefix=prefix)
    python = sys.executable
    subprocess.run([python, "-m", "gotunnel", "certs", "ca", "--out", certs], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([python, "-m", "gotunnel", "certs", "server", "--out", certs,
                    "--ip", HOST], check=True, stdout=subprocess.DEVNULL)
    return certs


def freePort() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rssKiB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- the echo target, in a process of its own --------------------------------

class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        return False


async def targetMain() -> None:
    raiseFileLimit()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, HOST, 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)


# -- profiles -----------------------------------------------------------------

class Profile:
    def __init__(self, name: str, mux: bool, tls: bool, certs: str, target: int) -> None:
        self.name = name
        self.public = freePort()
        control = freePort()
        python = sys.executable
        serverArgs = [python, "-m", "gotunnel", "server", "--token", TOKEN,
                      "--listen", f"tcp:{control}:interface={HOST}",
                      "--public-interface", HOST, "--log-level", "warn"]
        clientArgs = [python, "-m", "gotunnel", "client", "--token", TOKEN,
                      "--server", f"tcp:{HOST}:{control}", "--map", f"{target}:{self.public}",
                      "--log-level", "warn"]
        if tls:
            serverArgs += ["--tls-cert", os.path.join(certs, "server.pem"),
                           "--tls-key", os.path.join(certs, "server.key")]
            clientArgs += ["--tls", "--ca", os.path.join(certs, "ca.pem")]
        if mux:
            clientArgs.append("--mux")
        self.server = subprocess.Popen(serverArgs, stdout=subprocess.DEVNULL,
                                       preexec_fn=raiseFileLimit)
        time.sleep(1.0)
        self.client = subprocess.Popen(clientArgs, stdout=subprocess.DEVNULL,
                                       preexec_fn=raiseFileLimit)
        deadline = time.monotonic() + 30
        while not self.echoes():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no echo through port {self.public}")
            time.sleep(0.2)
        # The pool (or the multiplexed connection) is opened right after
        # registering: give it a moment before the first measure.
        time.sleep(1.0)

    def echoes(self) -> bool:
        try:
            with socket.create_connection((HOST, self.public), timeout=2) as s:
                s.sendall(b"x")
                return s.recv(1) == b"x"
        except OSError:
            return False

    def stop(self) -> None:
        for proc in (self.client, self.server):
            proc.terminate()
        for proc in (self.client, self.server):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def setupP50(port: int, count: int) -> float:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        with socket.create_connection((HOST, port)) as s:
            s.sendall(b"x")
            s.recv(1)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def echoThroughput(port: int, size: int) -> float:
    """MB/s of one connection that sends C{size} bytes and reads them back at once."""
    block = os.urandom(256 * 1024)
    with socket.create_connection((HOST, port)) as s:
        start = time.perf_counter()

        def send():
            sent = 0
            while sent < size:
                s.sendall(block[:min(len(block), size - sent)])
                sent += min(len(block), size - sent)

        sender = threading.Thread(target=send)
        sender.start()
        got = 0
        while got < size:
            data = s.recv(1 << 20)
            if not data:
                raise RuntimeError("closed early")
            got += len(data)
        sender.join()
        return size / (time.perf_counter() - start) / 1e6


async def manyEcho(port: int, count: int, size: int) -> float:
    block = os.urandom(size)

    async def one():
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(block)
        await reader.readexactly(size)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return count * size / (time.perf_counter() - start) / 1e6


async def settle(profile: Profile) -> None:
    """Wait, up to 15 s, until the last phase's connections are gone from both processes."""
    last = None
    for _ in range(50):
        now = (descriptors(profile.server.pid), descriptors(profile.client.pid))
        if now == last:
            return
        last = now
        await asyncio.sleep(0.3)


async def holdOpen(profile: Profile, count: int) -> dict:
    """Open C{count} connections, each echoing a byte; measure while all are open."""
    await settle(profile)
    base = {role: (rssKiB(p.pid), descriptors(p.pid))
            for role, p in (("server", profile.server), ("client", profile.client))}
    open_: list = []
    failures = 0
    gate = asyncio.Semaphore(500)

    async def one():
        nonlocal failures
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(HOST, profile.public), 10)
                writer.write(b"x")
                if await asyncio.wait_for(reader.readexactly(1), 10) != b"x":
                    raise RuntimeError("bad echo")
                open_.append(writer)
            except Exception:
                failures += 1

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    wall = time.perf_counter() - start
    await asyncio.sleep(0.5)
    result = {"failures": failures, "wall": wall}
    for role, p in (("server", profile.server), ("client", profile.client)):
        rss, fds = rssKiB(p.pid), descriptors(p.pid)
        held = count - failures or 1
        result[role] = ((rss - base[role][0]) / held, (fds - base[role][1]) / held)
    for writer in open_:
        writer.close()
    await asyncio.sleep(1.0)
    await settle(profile)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", default="1,100,10000",
                        help="how many connections to hold open at once, comma-separated")
    parser.add_argument("--mib", type=int, default=64, help="MiB echoed by one, and by 100")
    parser.add_argument("--setup", type=int, default=200, help="sequential connections for setup")
    args = parser.parse_args(argv)
    raiseFileLimit()
    counts = [int(c) for c in args.conns.split(",")]
    certs = makeCertificates("muxbench-")
    python = sys.executable
    target = subprocess.Popen([python, SELF, "_target"], stdout=subprocess.PIPE, text=True)
    targetPort = int(target.stdout.readline())
    rows = []
    try:
        for tls in (False, True):
            for mux in (False, True):
                name = f"{'mux' if mux else 'pool'} {'tls' if tls else 'plain'}"
                profile = Profile(name, mux, tls, certs, targetPort)
                try:
                    row = {"profile": name, "setup": setupP50(profile.public, args.setup),
                           "one": echoThroughput(profile.public, args.mib << 20),
                           "hundred": asyncio.run(manyEcho(profile.public, 100,
                                                           (args.mib << 20) // 100))}
                    for count in counts:
                        row[count] = asyncio.run(holdOpen(profile, count))
                    rows.append(row)
                    print(name, row, file=sys.stderr, flush=True)
                finally:
                    profile.stop()
    finally:
        target.terminate()
        target.wait(10)
    print("| profile | setup p50 ms | one stream MB/s | 100 streams MB/s | "
          + " | ".join(f"{c} open: failures, wall, server KiB/fds, client KiB/fds per conn"
                       for c in counts) + " |")
    print("|---" * (4 + len(counts)) + "|")
    for row in rows:
        cells = [row["profile"], f"{row['setup']:.2f}", f"{row['one']:.0f}",
                 f"{row['hundred']:.0f}"]
        for count in counts:
            r = row[count]
            cells.append(f"{r['failures']}, {r['wall']:.1f} s, "
                         f"{r['server'][0]:.1f}/{r['server'][1]:.2f}, "
                         f"{r['client'][0]:.1f}/{r['client'][1]:.2f}")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_target"]:
        asyncio.run(targetMain())
    else:
        sys.exit(main(sys.argv[1:]))

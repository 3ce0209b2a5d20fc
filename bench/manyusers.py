#!/usr/bin/env python3
"""
manyusers: N users at once through one tunnel, each echoing 16 KiB (issue
21's target: 10,000 users, 0 failures), next to socat forwarding the same
port in the same run.

Profiles, interleaved in each repeat: `socat` (`socat
TCP-LISTEN:P,fork,reuseaddr,backlog=1024 TCP:127.0.0.1:T`, a process per
connection: the reference), `mux plain`, `mux tls` (client --mux), and, with
--pool, `pool plain`, `pool tls` (a data channel per user: they hit the
descriptor ceiling).  The echo target is muxbench's, in a process of its
own.  For each run it reports:

    failures    users whose connect, echo or comparison failed, or that had
                not finished when the run's deadline came
    wall        from the first connect to the last user's echo, all users
                open at once (each holds its connection until all have echoed)
    RSS         server and client: growth of VmRSS from before the users to
                the moment all are open, per user; socat: its processes'
                Pss (shared pages counted once) per user
    fds         server and client: descriptors per user at that moment

    .venv/bin/python bench/manyusers.py                       # 10,000 users, 3 repeats
    .venv/bin/python bench/manyusers.py --users 500 --repeats 1 --pool

Every process it starts is stopped when it ends.  Linux only (/proc).  It
raises its own open-file limit to the hard limit (--nofile raises the hard
limit too, as root) and starts every process with the same.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from muxbench import (  # noqa: E402
    HOST, SELF as TARGET, Profile, descriptors, freePort, makeCertificates, rssKiB,
)

SIZE = 16 * 1024
CONNECTING_AT_ONCE = 1000
"""Connects in flight at once: more only overflow the listeners' backlogs."""


def raiseFileLimit(limit: int = 0) -> int:
    """Soft open-file limit up to the hard one (both to C{limit}, if given); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if limit:
        hard = limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def pssKiB(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Socat:
    """socat forwarding a port to the echo target, a process per connection."""

    name = "socat"

    def __init__(self, target: int) -> None:
        self.public = freePort()
        self.process = subprocess.Popen(
            ["socat", f"TCP-LISTEN:{self.public},fork,reuseaddr,backlog=1024,bind={HOST}",
             f"TCP:{HOST}:{target}"], preexec_fn=raiseFileLimit)
        deadline = time.monotonic() + 10
        while not _echoes(self.public):
            if time.monotonic() > deadline:
                raise RuntimeError("socat: no echo")
            time.sleep(0.1)

    def measure(self) -> dict:
        return {"pss": pssKiB([self.process.pid] + children(self.process.pid))}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Tunnel:
    """A gotunnel server and client (muxbench's Profile) for one run."""

    def __init__(self, name: str, mux: bool, tls: bool, certs: str, target: int) -> None:
        self.name = name
        self.profile = Profile(name, mux, tls, certs, target)
        self.public = self.profile.public

    def measure(self) -> dict:
        return {role: (rssKiB(p.pid), descriptors(p.pid))
                for role, p in (("server", self.profile.server),
                                ("client", self.profile.client))}

    def stop(self) -> None:
        self.profile.stop()


def _echoes(port: int) -> bool:
    import socket
    try:
        with socket.create_connection((HOST, port), timeout=2) as s:
            s.sendall(b"x")
            return s.recv(1) == b"x"
    except OSError:
        return False


async def users(port: int, count: int, deadline: float, measure) -> dict:
    """
    C{count} users at once, each echoing L{SIZE} bytes that carry its number;
    all hold their connection until every one has echoed (or failed), then
    C{measure} is called, then all close.
    """
    block = os.urandom(SIZE)
    gate = asyncio.Semaphore(CONNECTING_AT_ONCE)
    writers: list = []
    failures = {"connect": 0, "echo": 0, "mismatch": 0, "deadline": 0}
    last = 0.0

    async def one(n: int) -> None:
        nonlocal last
        payload = n.to_bytes(8, "big") + block[8:]
        try:
            async with gate:
                reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            failures["connect"] += 1
            return
        writers.append(writer)
        try:
            writer.write(payload)
            echoed = await reader.readexactly(SIZE)
        except (OSError, asyncio.IncompleteReadError):
            failures["echo"] += 1
            return
        if echoed != payload:
            failures["mismatch"] += 1
            return
        last = time.perf_counter()

    start = time.perf_counter()
    tasks = [asyncio.ensure_future(one(n)) for n in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 1))
    for task in pending:
        task.cancel()
    failures["deadline"] = len(pending)
    if pending:
        await asyncio.wait(pending)
    held = measure()
    for writer in writers:
        writer.close()
    return {"failures": sum(failures.values()), "why": failures,
            "wall": (last or time.perf_counter()) - start, "held": held}


def settle(subject) -> None:
    """Until the last run's connections are gone (descriptors steady), at most 20 s."""
    if not isinstance(subject, Tunnel):
        return
    last = None
    for _ in range(40):
        now = subject.measure()
        now = (now["server"][1], now["client"][1])
        if now == last:
            return
        last = now
        time.sleep(0.5)


def run(subject, count: int, timeout: float) -> dict:
    settle(subject)
    before = subject.measure()
    result = asyncio.run(users(subject.public, count, time.monotonic() + timeout,
                               subject.measure))
    held = result.pop("held")
    if isinstance(subject, Socat):
        result["socat KiB/user"] = (held["pss"] - before["pss"]) / count
    else:
        for role in ("server", "client"):
            result[f"{role} KiB/user"] = (held[role][0] - before[role][0]) / count
            result[f"{role} fds/user"] = (held[role][1] - before[role][1]) / count
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a run may take before its unfinished users count as failed")
    parser.add_argument("--pool", action="store_true", help="also the pool, plain and TLS")
    parser.add_argument("--nofile", type=int, default=0,
                        help="open-file limit for every process (default: the hard limit)")
    args = parser.parse_args(argv)
    limit = raiseFileLimit(args.nofile)
    print(f"open-file limit {limit}; load average {os.getloadavg()}", file=sys.stderr, flush=True)
    certs = makeCertificates("manyusers-")
    python = sys.executable
    target = subprocess.Popen([python, TARGET, "_target"], stdout=subprocess.PIPE, text=True,
                              preexec_fn=raiseFileLimit)
    targetPort = int(target.stdout.readline())
    makers = [("socat", lambda: Socat(targetPort)),
              ("mux plain", lambda: Tunnel("mux plain", True, False, certs, targetPort)),
              ("mux tls", lambda: Tunnel("mux tls", True, True, certs, targetPort))]
    if args.pool:
        makers += [("pool plain", lambda: Tunnel("pool plain", False, False, certs, targetPort)),
                   ("pool tls", lambda: Tunnel("pool tls", False, True, certs, targetPort))]
    results: dict[str, list[dict]] = {name: [] for name, _ in makers}
    try:
        for repeat in range(args.repeats):
            for name, make in makers:
                subject = make()
                try:
                    result = run(subject, args.users, args.timeout)
                finally:
                    subject.stop()
                results[name].append(result)
                print(f"repeat {repeat + 1} {name}: {result}; load {os.getloadavg()[0]:.2f}",
                      file=sys.stderr, flush=True)
    finally:
        target.terminate()
        target.wait(10)
    print(f"\n{args.users} users, each echoing {SIZE} bytes, all open at once; "
          f"medians of {args.repeats} (each run in brackets)\n")
    print("| profile | failures | wall s | server KiB / fds per user | "
          "client KiB / fds per user |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        walls = [r["wall"] for r in runs]
        cells = [name, ", ".join(str(r["failures"]) for r in runs),
                 f"{statistics.median(walls):.1f} ({', '.join(f'{w:.1f}' for w in walls)})"]
        if name == "socat":
            pss = statistics.median(r["socat KiB/user"] for r in runs)
            cells += [f"{pss:.1f} (Pss of all socat processes) / -", "-"]
        else:
            for role in ("server", "client"):
                kib = statistics.median(r[f"{role} KiB/user"] for r in runs)
                fds = statistics.median(r[f"{role} fds/user"] for r in runs)
                cells.append(f"{kib:.1f} / {fds:.2f}")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

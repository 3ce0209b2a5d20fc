"""
Where the idle memory of a plain gotunnel process goes: the RSS of a fresh
interpreter after each step of imports, in the order a plain server or
client makes them, each step in a process of its own, medians of
--repeat runs.  The heap's free pages are given back (malloc_trim) before
each reading, as a run's process does once it is running.

    .venv/bin/python bench/memfloor.py --repeat 5

tunnelbench's idle-memory "setup RSS" sums two such processes (a server
and a client): twice a row of this table, plus the few hundred KB of a
registered tunnel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

LEAVE_OUT = "import sys; sys.modules['OpenSSL'] = None"
"""What gotunnel.cli.footprint does for a plain run."""

STEPS = [
    ("python alone", "pass"),
    ("twisted.internet.defer (asyncio, logger, failure)", "import twisted.internet.defer"),
    ("+ the reactor, pyOpenSSL left out", f"{LEAVE_OUT}; from twisted.internet import reactor"),
    ("+ endpoints, application services, usage",
     f"{LEAVE_OUT}; from twisted.internet import reactor; import twisted.internet.endpoints, "
     "twisted.application.internet, twisted.python.usage"),
    ("+ gotunnel's server (what a plain server imports)",
     f"{LEAVE_OUT}; from twisted.internet import reactor; import gotunnel.__main__, "
     "gotunnel.server.service"),
    ("+ gotunnel's client (what a plain client imports)",
     f"{LEAVE_OUT}; from twisted.internet import reactor; import gotunnel.__main__, "
     "gotunnel.client.service, gotunnel.udp.tunnels"),
    ("+ twistd's own modules, server (twistd -n gotunnel-server)",
     f"{LEAVE_OUT}; from twisted.internet import reactor; import gotunnel.__main__, "
     "gotunnel.server.service, twisted.scripts.twistd, twisted.application.app"),
    ("for reference: the reactor with pyOpenSSL", "from twisted.internet import reactor"),
    ("for reference: gotunnel's server with pyOpenSSL",
     "from twisted.internet import reactor; import gotunnel.__main__, gotunnel.server.service"),
]

MEASURE = """
import ctypes, gc, json, sys
{code}
gc.collect()
ctypes.CDLL(None).malloc_trim(0)
with open("/proc/self/status") as status:
    fields = dict(line.split(":", 1) for line in status)
print(json.dumps({{"rss_kb": int(fields["VmRSS"].split()[0]),
                  "anon_kb": int(fields["RssAnon"].split()[0]),
                  "modules": len(sys.modules)}}))
"""


def measure(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE.format(code=code)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per step (interleaved)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {name: [] for name, _ in STEPS}
    for _ in range(args.repeat):
        for name, code in STEPS:
            runs[name].append(measure(code))
    print(f"{'step':60} {'RSS MB':>7} {'anon MB':>8} {'modules':>8}")
    for name, _ in STEPS:
        rss = statistics.median(run["rss_kb"] for run in runs[name]) / 1024
        anon = statistics.median(run["anon_kb"] for run in runs[name]) / 1024
        modules = statistics.median(run["modules"] for run in runs[name])
        print(f"{name:60} {rss:7.1f} {anon:8.1f} {modules:8.0f}")


if __name__ == "__main__":
    main()

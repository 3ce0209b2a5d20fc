"""
The soak of tests/test_soak.py for as long as you like: clients killed,
restarted and cut while users echo through every public port, then the
server's RSS and descriptors compared with a baseline taken after a warm-up.

    .venv/bin/python bench/soak.py --minutes 10

Prints a summary and exits 1 if the server grew by --max-rss-mib or more, has
more descriptors than at the baseline, a port did not come back, or a user
got bytes that were not its own.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from tests.soakrig import Soak, verdict  # noqa: E402


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="length of the disruption phase (default: 10)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the choices (clients, actions, payloads); printed if not given")
    parser.add_argument("--users", type=int, default=4, help="users at once (default: 4)")
    parser.add_argument("--disruptors", type=int, default=2,
                        help="clients disrupted at once, at most (default: 2)")
    parser.add_argument("--max-rss-mib", type=float, default=10.0,
                        help="the server's RSS growth that fails the run (default: 10)")
    parser.add_argument("--server-args", default="",
                        help="more options for the server, e.g. ' --no-zero-copy'")
    parser.add_argument("--client-args", default="",
                        help="more options for the clients, e.g. ' --pool-count 0'")
    return parser.parse_args(argv)


@defer.inlineCallbacks
def main(reactor, options: argparse.Namespace):
    directory = tempfile.mkdtemp(prefix="gotunnel-soak-")
    soak = Soak(reactor, directory, seconds=options.minutes * 60, seed=options.seed,
                users=options.users, disruptors=options.disruptors,
                serverArgs=tuple(options.server_args.split()),
                clientArgs=tuple(options.client_args.split()))
    print(f"seed {soak.seed}; processes run in {directory}", flush=True)
    try:
        yield soak.start()
        yield soak.run()
    finally:
        yield soak.stop()
        shutil.rmtree(directory, ignore_errors=True)
    print(soak.report.summary(), flush=True)
    failures = verdict(soak.report, maxRssGrowth=int(options.max_rss_mib * 1024 * 1024))
    for failure in failures:
        print(f"FAIL: {failure}", flush=True)
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    task.react(main, (parse(sys.argv[1:]),))

"""
The console scripts C{gotunnel-server} and C{gotunnel-client}, and
C{python -m gotunnel server|client ...}: the same services twistd runs, in
the foreground.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from twisted.logger import (
    FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage

from gotunnel import tap

ROLES: dict[str, tuple[type, Callable]] = {
    "server": (tap.ServerOptions, tap.makeServerService),
    "client": (tap.ClientOptions, tap.makeClientService),
}


def run(role: str, argv: Sequence[str], prog: str) -> int:
    """
    Parse C{argv} for C{role}, start its service and run the reactor until
    SIGINT or SIGTERM.  Bad options print one line and return 2.
    """
    optionsType, makeService = ROLES[role]
    options = optionsType()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        sys.stderr.write(f"{prog}: error: {e}\n{prog}: try '{prog} --help'\n")
        return 2
    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stdout),
                              [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)])],
        redirectStandardIO=False)
    service = makeService(options)
    try:
        service.startService()
    except Exception as e:
        sys.stderr.write(f"{prog}: error: cannot start: {e}\n")
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


def serverMain(argv: Optional[Sequence[str]] = None) -> int:
    return run("server", sys.argv[1:] if argv is None else argv, "gotunnel-server")


def clientMain(argv: Optional[Sequence[str]] = None) -> int:
    return run("client", sys.argv[1:] if argv is None else argv, "gotunnel-client")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "demo":
        from gotunnel.demo import main as demoMain

        return demoMain(args[1:])
    if not args or args[0] not in ROLES:
        sys.stderr.write("usage: python -m gotunnel {server|client|demo} [options]\n")
        return 2
    role = args.pop(0)
    return run(role, args, f"gotunnel {role}")


if __name__ == "__main__":
    sys.exit(main())

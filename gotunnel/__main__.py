"""
The console scripts C{gotunnel-server} and C{gotunnel-client}, and
C{python -m gotunnel server|client ...}: the same services twistd runs, in
the foreground.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from twisted.logger import (
    FilteringLogObserver, PredicateResult, globalLogBeginner, textFileLogObserver,
)
from twisted.python import usage

from gotunnel import logs
from gotunnel.cli import options, tap
from gotunnel.config.yamlfile import ConfigError

def _notOnStderr(event: dict) -> PredicateResult:
    if event.get("log_namespace") == "gotunnel.report":
        return PredicateResult.no
    return PredicateResult.maybe


ROLES: dict[str, tuple[type, Callable]] = {
    "server": (tap.ServerOptions, tap.makeServerService),
    "client": (tap.ClientOptions, tap.makeClientService),
}


def run(role: str, argv: Sequence[str], prog: str, usageName: Optional[str] = None) -> int:
    """
    Parse C{argv} (and config.yaml) for C{role}, start its service and run
    the reactor until SIGINT or SIGTERM.  Bad options print one line (and a
    hint to read --help), a bad config file one line; both return 2.
    C{usageName} is how --help spells the command (default: C{prog}).
    """
    optionsType, makeService = ROLES[role]
    options = optionsType()
    options.prog = usageName or prog
    options.ownsProcess = True
    try:
        options.parseOptions(list(argv))
    except ConfigError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        return 2
    except usage.UsageError as e:
        sys.stderr.write(f"{prog}: error: {e}\n{prog}: try '{options.prog} --help'\n")
        return 2
    from twisted.internet import reactor

    settings = options.settings()
    # Lines must reach a pipe (journald, tee) as they happen.
    sys.stdout.reconfigure(line_buffering=True)
    console = logs.leveledObserver(textFileLogObserver(sys.stdout), settings.log_level,
                                   settings.log_lang)
    globalLogBeginner.beginLoggingTo(
        # [ERROR] lines are already on stderr, in the Go format.
        [FilteringLogObserver(console, [_notOnStderr])], redirectStandardIO=False)
    try:
        service = makeService(options)
        service.startService()
    except Exception as e:
        sys.stderr.write(f"{prog}: error: cannot start: {e}\n")
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    # A client that gave up on a refusal says which (--exit-on-refusal).
    return getattr(service, "exitStatus", None) or 0


def serverMain(argv: Optional[Sequence[str]] = None) -> int:
    return run("server", sys.argv[1:] if argv is None else argv, "gotunnel-server")


def clientMain(argv: Optional[Sequence[str]] = None) -> int:
    return run("client", sys.argv[1:] if argv is None else argv, "gotunnel-client")


COMMANDS = "{server|client|status|demo|certs}"

HELP = """Usage: {prog} {commands} [options]

A reverse TCP tunnel, wire-compatible with the Go gotunnel.

Commands:
  server   publish the services of gotunnel clients on this machine's ports
           (the same as gotunnel-server)
  client   publish local services through a gotunnel server
           (the same as gotunnel-client)
  status   show a running server's clients, ports and connections (its --admin endpoint)
  demo     a server, a client and a small web page on this machine, to try it
  certs    make a CA, a server certificate and client certificates for TLS

'{prog} COMMAND --help' lists a command's options.

Examples:
  {prog} server --token s3cret
  {prog} client --server tcp:tunnel.example.com:17000 --token s3cret --map 22:10022
"""


def programName() -> str:
    """How the person ran us: C{python -m gotunnel}, or the console script C{gotunnel}."""
    return "python -m gotunnel" if sys.argv[0].endswith("__main__.py") else "gotunnel"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "certs":
        from gotunnel.tls.certs import main as certsMain

        return certsMain(args[1:])
    if args and args[0] == "status":
        from gotunnel.cli.status import main as statusMain

        return statusMain(args[1:])
    if args and args[0] == "demo":
        from gotunnel.cli.demo import main as demoMain

        return demoMain(args[1:])
    prog = programName()
    if args and args[0] in ("--help", "-h"):
        sys.stdout.write(HELP.format(prog=prog, commands=COMMANDS))
        return 0
    if args and args[0] == "--version":
        sys.stdout.write(options.versionText() + "\n")
        return 0
    if not args or args[0] not in ROLES:
        sys.stderr.write(f"Usage: {prog} {COMMANDS} [options]\ntry '{prog} --help'\n")
        return 2
    role = args.pop(0)
    return run(role, args, f"gotunnel {role}", f"{prog} {role}")


if __name__ == "__main__":
    sys.exit(main())

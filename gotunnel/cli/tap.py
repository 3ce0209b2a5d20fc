"""
makeService for both roles: the services that the twistd plugins, the
console scripts and C{python -m gotunnel} run, made from their options
(L{gotunnel.cli.options}), with what a process of our own needs around
them (the open-file limit, one line for a port that cannot be listened on,
the exit status under twistd).
"""

from __future__ import annotations

import atexit
import os
import sys

from twisted.application.service import IService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from gotunnel.cli import footprint, rlimits
# The options live beside; the plugins and the console scripts take them from here.
from gotunnel.cli.options import ClientOptions, ServerOptions, _SettingsOptions

__all__ = ["ClientOptions", "ServerOptions", "makeClientService", "makeServerService"]

log = Logger(namespace="gotunnel.tap")


def _raiseOpenFileLimit() -> None:
    # In makeService, not in the services: a program that embeds them owns
    # its process's limits.
    before, after = rlimits.raiseOpenFileLimit()
    if after > before:
        log.info("open-file limit raised from {before} to {after}", before=before, after=after)


def _giveBackStartUpHeap(options: _SettingsOptions, reactor) -> None:
    # Once the services have started (and imported what they use); the
    # process is ours, not a program's that embeds the service.
    if options.startsProcess():
        if reactor is None:
            from twisted.internet import reactor
        reactor.callWhenRunning(footprint.giveBackFreeHeap)


def _cannotListenOnOneLine(options: usage.Options) -> None:
    """
    Under twistd, a control port that cannot be listened on (busy, or not
    ours to take) ends twistd with the 39-line traceback of its own start-up:
    say it in one line instead, as the console scripts do.  twistd has
    already removed its pidfile and told a waiting parent; the exit status
    stays 1.
    """
    if getattr(options, "parent", None) is None:
        return
    previous = sys.excepthook

    def excepthook(kind, value, traceback) -> None:
        if isinstance(value, CannotListenError):
            log.critical("cannot start: {why}", why=str(value))
        else:
            previous(kind, value, traceback)

    sys.excepthook = excepthook


def makeServerService(options: ServerOptions, reactor=None) -> IService:
    from gotunnel.server.service import TunnelServerService

    _raiseOpenFileLimit()
    _cannotListenOnOneLine(options)
    _giveBackStartUpHeap(options, reactor)
    return TunnelServerService(options.settings(), reactor=reactor)


def _exitStatusAfterTwistd(status: int) -> None:
    """
    Make the process exit with C{status} once twistd is done: twistd
    returns 0 when its reactor stops, whatever stopped it.  At exit, it has
    removed its pidfile and written its last log line.
    """

    def exit() -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
        os._exit(status)

    atexit.register(exit)


def makeClientService(options: ClientOptions, reactor=None) -> IService:
    from gotunnel.client.service import TunnelClientService

    _raiseOpenFileLimit()
    _giveBackStartUpHeap(options, reactor)
    service = TunnelClientService(options.settings(), reactor=reactor)
    if getattr(options, "parent", None) is not None:
        service.whenExiting = _exitStatusAfterTwistd
    return service

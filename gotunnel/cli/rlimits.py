"""
Raising the open-file limit at start-up, as magic-wormhole's transit relay
does.  Each tunnelled connection costs the server two sockets and, with zero
copy, two pipes (six descriptors), and the client as many: under the usual
soft limit of 1,024 a process runs out at about 170 connections, long before
the hard limit the administrator allows.
"""

from __future__ import annotations

import resource

WANTED = 65536
"""Enough for ten thousand tunnelled connections with zero copy."""


def raiseOpenFileLimit(wanted: int = WANTED) -> tuple[int, int]:
    """
    Raise this process's soft limit on open files towards C{wanted}, as far
    as the hard limit allows; never lower it.  Returns the soft limit before
    and after.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        # Some sandboxes refuse even a raise within the hard limit: the
        # process goes on with what it has.
        return soft, soft
    return soft, target

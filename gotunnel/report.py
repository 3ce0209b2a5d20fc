"""
Errors shown to a person in the Go gotunnel's format, C{[ERROR][code] ...},
on standard error behind the time (as the Go client's log and the rest of
ours have it), and as log events.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from twisted.logger import Logger, formatTime

from gotunnel.i18n import translation

log = Logger()

SERVER_UNREACHABLE = 1001
AUTHENTICATION_FAILED = 1002

_DESCRIPTIONS = {
    SERVER_UNREACHABLE: "Failed to connect to server",
    AUTHENTICATION_FAILED: "Authentication failed, please check token",
}


def formatError(code: int, detail: Optional[str] = None, lang: str = "en",
                address: Optional[str] = None) -> str:
    """
    The Go client's line for error C{code}, in C{lang} ("en" or "zh"), with
    the server's C{address} (HOST:PORT) after the description if given.
    """
    line = f"[ERROR][{code}] {translation(lang).gettext(_DESCRIPTIONS[code])}"
    if address:
        line = f"{line} {address}"
    return f"{line}: {detail}" if detail else line


def reportError(code: int, detail: Optional[str] = None, lang: str = "en",
                address: Optional[str] = None, when: Optional[float] = None) -> None:
    """
    Print the Go-style line on the process's real standard error (twistd
    redirects C{sys.stderr} into the log), behind the time C{when} (now if
    None) written as in the log, and log it too.
    """
    line = formatError(code, detail, lang, address)
    stream = sys.__stderr__
    if stream is not None:
        stream.write(f"{formatTime(time.time() if when is None else when)} {line}\n")
        stream.flush()
    log.error("{line}", line=line)

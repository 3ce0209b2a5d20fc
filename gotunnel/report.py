"""
Errors shown to a person in the Go gotunnel's format, C{[ERROR][code] ...},
on standard error, and as log events.
"""

from __future__ import annotations

import sys
from typing import Optional

from twisted.logger import Logger

from gotunnel.i18n import translation

log = Logger()

SERVER_UNREACHABLE = 1001
AUTHENTICATION_FAILED = 1002

_DESCRIPTIONS = {
    SERVER_UNREACHABLE: "Failed to connect to server",
    AUTHENTICATION_FAILED: "Authentication failed, please check token",
}


def formatError(code: int, detail: Optional[str] = None, lang: str = "en") -> str:
    """The Go client's line for error C{code}, in C{lang} ("en" or "zh")."""
    line = f"[ERROR][{code}] {translation(lang).gettext(_DESCRIPTIONS[code])}"
    return f"{line}: {detail}" if detail else line


def reportError(code: int, detail: Optional[str] = None, lang: str = "en") -> None:
    """
    Print the Go-style line on the process's real standard error (twistd
    redirects C{sys.stderr} into the log) and log it too.
    """
    line = formatError(code, detail, lang)
    stream = sys.__stderr__
    if stream is not None:
        stream.write(line + "\n")
        stream.flush()
    log.error("{line}", line=line)

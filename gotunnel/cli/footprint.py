"""
What a server or client process started by the console scripts or by
twistd leaves out of its memory.

Twisted imports pyOpenSSL (and with it cryptography, about 13 MB of RSS) as
soon as the reactor or the endpoints module is imported, if it is
importable, whether or not anything uses TLS.  A plain run (no TLS setting,
every endpoint plain TCP or a UNIX socket) decides, once its options are
parsed and before anything imports the reactor, to make pyOpenSSL
unimportable for the rest of the process: Twisted then runs as it does
where pyOpenSSL is not installed, without TLS.

Only the process's own entry points decide (see
L{gotunnel.cli.options._SettingsOptions.ownsProcess}): a program that embeds
the services, or a test run, keeps pyOpenSSL.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Mapping

TLS_LIBRARY = "OpenSSL"
"""pyOpenSSL's top-level package: what Twisted's TLS support imports."""

PLAIN_ENDPOINT_TYPES = frozenset({"tcp", "tcp6", "unix"})
"""Endpoint types that use no TLS (their parsers import none of it)."""


def isPlainEndpoint(description: str) -> bool:
    """
    Whether the endpoint string C{description} is plain TCP or a UNIX
    socket (a bare port number is TCP); any other type (ssl:, tls:, a
    plugin's) may need pyOpenSSL.
    """
    kind = description.split(":", 1)[0].strip().lower()
    return kind.isdigit() or kind in PLAIN_ENDPOINT_TYPES


def usesTLS(values: Mapping[str, Any], endpointFields: Iterable[str]) -> bool:
    """
    Whether settings C{values} (settings field -> value, the fields not
    given taking their defaults, which use no TLS) ask for TLS anywhere: a
    true C{tls} or C{tls_*} field, or a field of C{endpointFields} that is
    not a plain endpoint.
    """
    if any(value for name, value in values.items() if name == "tls" or name.startswith("tls_")):
        return True
    return any(values.get(name) and not isPlainEndpoint(str(values[name]))
               for name in endpointFields)


def leaveOutOpenSSL() -> bool:
    """
    Make pyOpenSSL unimportable in this process, unless it is loaded
    already (then nothing is saved and nothing changes).  True if it was
    left out.
    """
    if TLS_LIBRARY in sys.modules:
        return sys.modules[TLS_LIBRARY] is None
    # None in sys.modules makes every later import of it raise ImportError,
    # which is how Twisted notices that TLS is not available.
    sys.modules[TLS_LIBRARY] = None
    return True


def openSSLLeftOut() -> bool:
    """Whether L{leaveOutOpenSSL} has left pyOpenSSL out of this process."""
    return TLS_LIBRARY in sys.modules and sys.modules[TLS_LIBRARY] is None


def giveBackFreeHeap() -> bool:
    """
    Ask the C library's malloc to give the free pages of its heap back to
    the system (glibc's C{malloc_trim}): the imports of start-up leave a
    few MB there, freed but resident.  False where there is no
    C{malloc_trim} (another C library); nothing is lost then.
    """
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (ImportError, OSError, AttributeError):
        return False
    trim(0)
    return True

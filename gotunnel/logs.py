"""
Which log events are written (log_level) and in which language (log_lang),
in front of the observer that writes lines: stdout for the console scripts,
and for twistd whatever it would write to (stdout, --logfile, --syslog or
--logger).
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.logger import (
    FilteringLogObserver, ILogObserver, LegacyLogObserverWrapper, LogLevel,
    LogLevelFilterPredicate,
)
from twisted.python import usage
from twisted.python.reflect import namedAny

from gotunnel.i18n import TranslatingObserver
from gotunnel.relay.tcpinternals import CLIENT_SERVICE_NAMESPACE, twistdLogObserver


def leveledObserver(observer: ILogObserver, level: str, lang: str = "en") -> ILogObserver:
    """
    C{observer} receiving only events at C{level} ("debug", "info", "warn",
    "error") or above, with their messages in C{lang}.
    """
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    # ClientService announces each retry with an object's repr; the client
    # logs its own line with the mapping and the delay instead.
    predicate.setLogLevelForNamespace(CLIENT_SERVICE_NAMESPACE,
                                      max(LogLevel.warn, LogLevel.levelWithName(level)))
    return FilteringLogObserver(TranslatingObserver(observer, lang), [predicate])


TWISTD_LOGGER = f"{__name__}.twistdObserver"

# twistd takes its observer from the factory named by its --logger option and
# calls it without arguments, so what the factory needs waits here.
_underTwistd: dict[str, Any] = {"options": None, "factory": None, "level": "info", "lang": "en"}


def logThroughTwistd(pluginOptions: usage.Options, level: str, lang: str) -> None:
    """
    When C{pluginOptions} are a twistd plugin's (their parent is twistd's
    options), point twistd's --logger at L{twistdObserver}: the observer
    twistd would have used, behind L{leveledObserver}.  The console scripts
    have no parent; they call L{leveledObserver} themselves.
    """
    twistdOptions = getattr(pluginOptions, "parent", None)
    if twistdOptions is None or "logger" not in twistdOptions:
        return
    chosen: Optional[str] = twistdOptions["logger"]
    factory = None
    if chosen and chosen != TWISTD_LOGGER:
        try:
            factory = namedAny(chosen)
        except Exception as e:
            raise usage.UsageError(f"Logger '{chosen}' could not be imported: {e}") from None
    _underTwistd.update(options=twistdOptions, factory=factory, level=level, lang=lang)
    twistdOptions["logger"] = TWISTD_LOGGER


def twistdObserver() -> ILogObserver:
    """
    twistd's --logger factory (see L{logThroughTwistd}): the observer named
    by the person's own --logger, or else the one twistd makes from its
    options, filtered by level and translated.
    """
    factory = _underTwistd["factory"]
    if factory is not None:
        observer = factory()
    else:
        # twistd's own choice of observer, by twistd's own code: the loggers
        # of twistd's runner know --logfile, --syslog, --nodaemon and the
        # platform's defaults.
        observer = twistdLogObserver(_underTwistd["options"] or {})
    if not ILogObserver.providedBy(observer):
        observer = LegacyLogObserverWrapper(observer)
    return leveledObserver(observer, _underTwistd["level"], _underTwistd["lang"])

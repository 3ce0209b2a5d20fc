"""
Log messages in the language a person chose (log_lang): English as written
in the code, or Chinese from the gettext catalogue in gotunnel/locale.

Translation happens at the edge, in the observer that writes log lines:
the code logs English format strings with named fields, and
L{TranslatingObserver} swaps the format for its translation.
"""

from __future__ import annotations

import gettext
from pathlib import Path

from twisted.logger import ILogObserver
from zope.interface import implementer

DOMAIN = "gotunnel"
LOCALE_DIR = Path(__file__).parent / "locale"
LANGUAGES = ("en", "zh")


def translation(lang: str) -> gettext.NullTranslations:
    """
    The catalogue for C{lang}; English (the messages as written) for "en".

    @raise ValueError: for a language we have no catalogue for.
    """
    if lang not in LANGUAGES:
        raise ValueError(f"log language must be one of {', '.join(LANGUAGES)}, got {lang!r}")
    if lang == "en":
        return gettext.NullTranslations()
    return gettext.translation(DOMAIN, str(LOCALE_DIR), languages=[lang])


@implementer(ILogObserver)
class TranslatingObserver:
    """
    Passes each event on to C{observer} with its C{log_format} translated.
    """

    def __init__(self, observer: ILogObserver, lang: str) -> None:
        self.observer = observer
        self.translation = translation(lang)

    def __call__(self, event: dict) -> None:
        fmt = event.get("log_format")
        if fmt:
            translated = self.translation.gettext(fmt)
            if translated is not fmt and translated != fmt:
                event = dict(event, log_format=translated)
        self.observer(event)

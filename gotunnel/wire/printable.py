"""
Text a peer chose (a client's name, a server's reason), made safe to put in
a log line.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """
    C{text} with each character that is not printable (ESC, newline, the
    other control characters, Unicode line separators) written as its
    Python escape, so that a peer cannot colour or clear a terminal, nor
    start a log line of its own.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)

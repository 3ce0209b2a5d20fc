"""gotunnel: a reverse TCP tunnel on Twisted, wire-compatible with the Go gotunnel."""

__version__ = "0.1.0"

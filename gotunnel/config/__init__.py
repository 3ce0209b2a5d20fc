"""
Settings of the server and the client, declared once (see L{gotunnel.config.spec}).
"""

import importlib

_API = {'ClientSettings': 'gotunnel.config.settings', 'Mapping': 'gotunnel.config.mappings', 'ServerSettings': 'gotunnel.config.settings'}
__all__ = sorted(_API)


def __getattr__(name: str) -> object:
    # Looked up on first use rather than imported here: the package's own
    # modules import each other through it, and an eager import would
    # make every one of them a cycle.
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""
The tunnel server: control port, published ports, admission and access.

C{TunnelServerService} is the embedding API (docs/deployment.md, "Inside your
own Twisted application").
"""

import importlib

_API = {'TunnelServerService': 'gotunnel.server.service'}
__all__ = sorted(_API)


def __getattr__(name: str) -> object:
    # Looked up on first use rather than imported here: the package's own
    # modules import each other through it, and an eager import would
    # make every one of them a cycle.
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

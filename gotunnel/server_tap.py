"""The twistd plugin module for gotunnel-server: Options and makeService."""

from gotunnel.tap import ServerOptions as Options
from gotunnel.tap import makeServerService as makeService

__all__ = ["Options", "makeService"]

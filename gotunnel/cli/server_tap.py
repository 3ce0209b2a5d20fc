"""The twistd plugin module for gotunnel-server: Options and makeService."""

from gotunnel.cli.tap import ServerOptions as Options
from gotunnel.cli.tap import makeServerService as makeService

__all__ = ["Options", "makeService"]

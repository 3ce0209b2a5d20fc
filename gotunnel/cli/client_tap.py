"""The twistd plugin module for gotunnel-client: Options and makeService."""

from gotunnel.cli.tap import ClientOptions as Options
from gotunnel.cli.tap import makeClientService as makeService

__all__ = ["Options", "makeService"]

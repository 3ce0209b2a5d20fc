"""The twistd plugin module for gotunnel-client: Options and makeService."""

from gotunnel.tap import ClientOptions as Options
from gotunnel.tap import makeClientService as makeService

__all__ = ["Options", "makeService"]

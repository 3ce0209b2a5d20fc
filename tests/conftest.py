"""Shared pytest configuration for the test suite."""

import importlib

# The suite runs TLS tests in this process, and parses options as twistd
# does (with a parent): loaded first, pyOpenSSL is never left out of it by
# a plain run's options (gotunnel.cli.footprint).
importlib.import_module("OpenSSL.SSL")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: a heavy test (load, many connections); CI runs it too")

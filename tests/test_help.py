"""
--help and --version as a person reads them: the console scripts, the
twistd plugins and python -m gotunnel, each in a child process.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from twisted.trial import unittest

import gotunnel
from gotunnel.cli.tap import ClientOptions, ServerOptions
from tests.support import venvScript

EXIT_TIMEOUT = 60


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=EXIT_TIMEOUT, env={**os.environ, "COLUMNS": "80"})


class HelpTests(unittest.TestCase):
    def assertHelp(self, argv: list[str], usageLine: str, first: list[str], example: str):
        """
        C{argv} prints help that starts with C{usageLine}, lists the options
        C{first} in that order before every other option, and ends with two
        examples that start with C{example}; exit status 0.
        """
        result = run(*argv)
        described = f"{argv}: exit status {result.returncode}\n{result.stdout}\n{result.stderr}"
        self.assertEqual(result.returncode, 0, described)
        self.assertEqual(result.stderr, "", described)
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0], usageLine, described)
        positions = [result.stdout.index(f"--{name}=") for name in first]
        self.assertEqual(positions, sorted(positions), described)
        self.assertLess(positions[-1], result.stdout.index("--busy-poll="), described)
        examples = result.stdout.split("\nExamples:\n", 1)[1].splitlines()
        self.assertEqual(len(examples), 2, described)
        for line in examples:
            self.assertTrue(line.startswith(f"  {example} --"), described)

    def test_serverScript(self):
        self.assertHelp([venvScript("gotunnel-server"), "--help"],
                        "Usage: gotunnel-server [options]",
                        ["token", "listen", "config"], "gotunnel-server")

    def test_clientScript(self):
        self.assertHelp([venvScript("gotunnel-client"), "--help"],
                        "Usage: gotunnel-client [options] --map "
                        "[LOCALHOST:]LOCALPORT:REMOTEPORT ...",
                        ["token", "server", "map", "config"], "gotunnel-client")

    def test_twistdServer(self):
        self.assertHelp([venvScript("twistd"), "gotunnel-server", "--help"],
                        "Usage: twistd [options] gotunnel-server [options]",
                        ["token", "listen", "config"], "twistd -n gotunnel-server")

    def test_twistdClient(self):
        self.assertHelp([venvScript("twistd"), "gotunnel-client", "--help"],
                        "Usage: twistd [options] gotunnel-client [options] --map "
                        "[LOCALHOST:]LOCALPORT:REMOTEPORT ...",
                        ["token", "server", "map", "config"], "twistd -n gotunnel-client")

    def assertCommands(self, argv: list[str], prog: str) -> None:
        """C{argv} lists every command with one line that says what it does, under C{prog}."""
        result = run(*argv)
        self.assertEqual((result.returncode, result.stderr), (0, ""), result.stdout)
        self.assertTrue(result.stdout.startswith(
            f"Usage: {prog} {{server|client|status|demo|certs}} [options]\n"), result.stdout)
        listed = result.stdout.split("\nCommands:\n", 1)[1].split("\n\n", 1)[0]
        commands = [line.split()[0] for line in listed.splitlines() if not line.startswith("    ")]
        self.assertEqual(commands, ["server", "client", "status", "demo", "certs"], listed)
        self.assertIn("\n  status   show a running server's clients, ports and connections",
                      listed)
        self.assertIn(f"'{prog} COMMAND --help'", result.stdout)
        self.assertIn(f"\n  {prog} server --token", result.stdout)

    def test_pythonDashM(self):
        """python -m gotunnel --help names its commands, and a command's help names it."""
        self.assertCommands([sys.executable, "-m", "gotunnel", "--help"], "python -m gotunnel")
        self.assertHelp([sys.executable, "-m", "gotunnel", "server", "--help"],
                        "Usage: python -m gotunnel server [options]",
                        ["token", "listen", "config"], "python -m gotunnel server")

    def test_gotunnelScript(self):
        """The console script gotunnel --help lists the same commands, under its own name."""
        self.assertCommands([venvScript("gotunnel"), "--help"], "gotunnel")
        self.assertHelp([venvScript("gotunnel"), "server", "--help"],
                        "Usage: gotunnel server [options]",
                        ["token", "listen", "config"], "gotunnel server")

    def test_examplesParse(self):
        """The examples that need no files are command lines the options take."""
        for optionsType in (ServerOptions, ClientOptions):
            options = optionsType()
            options.parseOptions(shlex.split(optionsType.examples[0]))


class VersionTests(unittest.TestCase):
    def test_everyEntryPoint(self):
        expected = f"gotunnel {gotunnel.__version__}"
        for argv in ([venvScript("gotunnel-server"), "--version"],
                     [venvScript("gotunnel-client"), "--version"],
                     [venvScript("twistd"), "gotunnel-server", "--version"],
                     [sys.executable, "-m", "gotunnel", "--version"]):
            result = run(*argv)
            self.assertEqual(result.returncode, 0, result.stderr)
            lines = result.stdout.splitlines()
            self.assertEqual(lines[0], expected, argv)
            self.assertTrue(lines[1].startswith("Twisted "), argv)
            self.assertTrue(lines[2].startswith("Python "), argv)

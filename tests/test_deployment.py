"""
docs/deployment.md as an operator uses it: both systemd units pass
systemd-analyze verify (with ExecStart pointed at this test's installed
scripts) and run with the config files the page gives; the Dockerfile
installs the checkout with pip and runs a console script.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess

from twisted.trial import unittest

from gotunnel.cli.tap import ClientOptions, ServerOptions
from tests.support import temporaryDirectory, venvScript

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOYMENT = os.path.join(REPO, "docs", "deployment.md")
INSTALLED = "/opt/gotunnel/bin/"


def blocks(kind: str) -> list[str]:
    """The ```C{kind} blocks of docs/deployment.md, in order."""
    with open(DEPLOYMENT, encoding="utf-8") as f:
        return re.findall(rf"^```{kind}\n(.*?)^```", f.read(), flags=re.M | re.S)


def consoleScripts() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, "setup.cfg"))
    return [line.split("=")[0].strip()
            for line in parser["options.entry_points"]["console_scripts"].splitlines()
            if line.strip()]


class SystemdUnitTests(unittest.TestCase):
    def units(self) -> dict[str, str]:
        """Each unit of the page, by the program its ExecStart runs."""
        units = {}
        for unit in blocks("ini"):
            execStart = re.search(r"^ExecStart=(\S+)", unit, re.M).group(1)
            units[os.path.basename(execStart)] = unit
        self.assertEqual(sorted(units), ["gotunnel-client", "gotunnel-server"])
        return units

    def test_verify(self):
        """systemd-analyze verify finds nothing to say about either unit."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise unittest.SkipTest("systemd-analyze is not installed")
        directory = temporaryDirectory(self)
        paths = []
        for program, unit in self.units().items():
            self.assertIn(f"ExecStart={INSTALLED}{program} ", unit)
            path = os.path.join(directory, f"{program}.service")
            with open(path, "w", encoding="utf-8") as f:
                f.write(unit.replace(INSTALLED, os.path.dirname(venvScript(program)) + "/"))
            paths.append(path)
        result = subprocess.run([analyze, "verify", *paths], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=120)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_commandLinesTakeThePagesConfigFiles(self):
        """Each ExecStart's options, with the config file the page gives for it, start."""
        yamls = {re.search(r"^(server|client):", text, re.M).group(1): text
                 for text in blocks("yaml")}
        directory = temporaryDirectory(self)
        for program, unit in self.units().items():
            argv = shlex.split(re.search(r"^ExecStart=(.*)$", unit, re.M).group(1))[1:]
            role = program.split("-")[1]
            path = os.path.join(directory, f"{role}.yaml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(yamls[role])
            self.assertEqual(argv[0], "--config")
            options = (ServerOptions if role == "server" else ClientOptions)()
            options.parseOptions([argv[0], path, *argv[2:]])


class DockerfileTests(unittest.TestCase):
    """The Dockerfile cannot be built here: its steps are the ones the tests run."""

    def test_steps(self):
        [dockerfile] = blocks("dockerfile")
        steps = [line.split(None, 1) for line in dockerfile.splitlines() if line.strip()]
        self.assertEqual(steps[0], ["FROM", "python:3.11-slim"])
        runs = [rest for step, rest in steps if step == "RUN"]
        self.assertEqual(len(runs), 1)
        commands = [command.strip() for command in runs[0].split("&&")]
        self.assertIn("pip install --no-cache-dir .", commands)
        [entrypoint] = [rest for step, rest in steps if step == "ENTRYPOINT"]
        [cmd] = [rest for step, rest in steps if step == "CMD"]
        program = re.fullmatch(r'\["([\w-]+)"\]', entrypoint).group(1)
        self.assertIn(program, consoleScripts())
        self.assertEqual(re.findall(r'"([^"]*)"', cmd), ["--config", "/etc/gotunnel/config.yaml"])

    def test_runCommandsNameConsoleScripts(self):
        [commands] = [block for block in blocks("sh") if "docker run" in block]
        for program in re.findall(r"--entrypoint (\S+)", commands):
            self.assertIn(program, consoleScripts())

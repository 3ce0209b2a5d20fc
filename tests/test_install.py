"""
gotunnel as a user installs it: C{pip install .} (not editable) into a fresh
virtualenv, from a copy of the source tree, and then run from there.  An
editable install puts the source tree on sys.path and so hides a subpackage,
a data file or a plugin that setup.cfg forgets to install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from twisted.internet import defer, utils
from twisted.trial import unittest

from tests.support import (
    echoedThrough, listenTarget, randomBytes, spawn, temporaryDirectory, within,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_TIMEOUT = 300
START_TIMEOUT = 60
LISTENING = re.compile(r"control channel listening on 127\.0\.0\.1:(\d+)")
CHOSEN = re.compile(r"the server chose public port (\d+)")
TOKEN = "install-check-token"


NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", "_trial_temp*",
    ".pytest_cache")
"""What a checkout without git holds beside its source (see L{copySource})."""


def copySource(destination: str) -> None:
    """
    A copy of the source tree as a commit would hold it (files not yet added
    too, ignored ones not): without build/ or *.egg-info left by an earlier
    build, whose stale files setuptools would put in the wheel.  A checkout
    that is not a git repository (an exported tree) is copied without what
    builds and test runs leave in it.
    """
    try:
        listed = subprocess.run(
            ["git", "-C", REPO, "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(REPO, destination, ignore=NOT_SOURCE, dirs_exist_ok=True)
        return
    for path in listed.split("\0"):
        if path and os.path.isfile(os.path.join(REPO, path)):
            target = os.path.join(destination, path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(os.path.join(REPO, path), target)


def packaged(root: str) -> set[str]:
    """What of gotunnel/ and twisted/plugins/ under C{root} an installation must hold."""
    found = set()
    for top in ("gotunnel", os.path.join("twisted", "plugins")):
        for directory, subdirectories, files in os.walk(os.path.join(root, top)):
            subdirectories[:] = [name for name in subdirectories if name != "__pycache__"]
            found.update(os.path.relpath(os.path.join(directory, name), root) for name in files
                         if not name.endswith((".pyc", ".po", ".cache")))
    return found


@defer.inlineCallbacks
def run(testCase, argv: list[str], cwd: str) -> defer.Deferred:
    """Run C{argv} to its end without blocking the reactor; its output, or a failed test."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    out, err, code = yield utils.getProcessOutputAndValue(argv[0], argv[1:], env=env, path=cwd)
    testCase.assertEqual(code, 0, f"{argv}: exit status {code}\n{out.decode()}\n{err.decode()}")
    return out.decode()


class NonEditableInstallTests(unittest.TestCase):
    timeout = INSTALL_TIMEOUT + 2 * START_TIMEOUT

    @defer.inlineCallbacks
    def test_installedPackageRunsATunnel(self):
        """
        pip install . into a fresh venv installs every module, the Chinese
        log catalogue, the dashboard's files and the twistd plugins; twistd
        from that venv lists both plugins, and a server and a client run by
        it carry bytes end to end.
        """
        work = temporaryDirectory(self)
        source, venv, cwd = (os.path.join(work, name) for name in ("source", "venv", "run"))
        os.mkdir(cwd)
        copySource(source)
        yield run(self, [sys.executable, "-m", "venv", venv], cwd)
        scripts = os.path.join(venv, "bin")
        yield within(run(self, [os.path.join(scripts, "pip"), "install", "--quiet", source], cwd),
                     INSTALL_TIMEOUT, "pip install .")

        where = yield run(self, [os.path.join(scripts, "python"), "-c",
                                 "import os, gotunnel, twisted.plugins.gotunnel_plugins as p; "
                                 "print(os.path.dirname(os.path.dirname(gotunnel.__file__))); "
                                 "print(p.__file__)"], cwd)
        sitePackages, plugins = where.split()
        self.assertTrue(sitePackages.startswith(venv + os.sep), sitePackages)
        self.assertTrue(plugins.startswith(sitePackages + os.sep), plugins)
        self.assertEqual(packaged(source) - packaged(sitePackages), set(),
                         "files of the source tree that pip install . left out")
        for path in ("gotunnel/locale/zh/LC_MESSAGES/gotunnel.mo",
                     "gotunnel/admin/static/index.html"):
            self.assertTrue(os.path.isfile(os.path.join(sitePackages, path)), path)

        twistd = os.path.join(scripts, "twistd")
        listed = yield run(self, [twistd, "--help"], cwd)
        self.assertIn("gotunnel-server", listed)
        self.assertIn("gotunnel-client", listed)

        env = {"PYTHONPATH": ""}
        server = spawn(self, [twistd, "-n", "--pidfile=", "gotunnel-server",
                              "--listen", "tcp:0:interface=127.0.0.1",
                              "--public-interface", "127.0.0.1", "--token", TOKEN], cwd, env)
        found = yield within(server.whenOutput(LISTENING), START_TIMEOUT, "the server to listen")
        target = listenTarget(self)
        client = spawn(self, [twistd, "-n", "--pidfile=", "gotunnel-client",
                              "--server", f"tcp:127.0.0.1:{found.group(1)}", "--token", TOKEN,
                              "--map", f"{target}:0"], cwd, env)
        chosen = yield within(client.whenOutput(CHOSEN), START_TIMEOUT, "the client to register")
        self.assertTrue((yield echoedThrough(self, int(chosen.group(1)), randomBytes(65536),
                                             START_TIMEOUT)))
        for child in (client, server):
            child.sendSignal("TERM")
            yield within(child.ended, START_TIMEOUT, "twistd to stop")
            self.assertIn("Server Shut Down.", child.stdout, child.describe())
            self.assertNotIn("Traceback", child.stdout + child.stderr, child.describe())

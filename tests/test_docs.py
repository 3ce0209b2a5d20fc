"""
The commands the README and docs/ show, run as written (with ports the OS
picks instead of fixed ones): the walk-through with the console scripts and
python3 -m http.server, and the embedding example under twistd -ny.
"""

import os
import re
import sys

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from tests.support import (
    HOST, Tunnel, User, echoedThrough, freePort, listenTarget, spawn, temporaryDirectory,
    venvScript, within,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 60
TOKEN = "s3cret"


@defer.inlineCallbacks
def httpGet(port: int, path: str = "/") -> defer.Deferred:
    """The whole answer to an HTTP/1.0 GET of C{path} on 127.0.0.1:C{port}."""
    user = User()
    yield connectProtocol(TCP4ClientEndpoint(reactor, HOST, port), user)
    user.transport.write(f"GET {path} HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
    answer = yield within(user.closed, START_TIMEOUT, "the HTTP answer")
    return answer


class ReadmeWalkThroughTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_httpServerThroughTheTunnel(self):
        """
        README: gotunnel-server, python3 -m http.server bound to localhost,
        gotunnel-client --map LOCAL:PUBLIC, then a GET on the public port.
        """
        directory = temporaryDirectory(self)
        with open(os.path.join(directory, "hello.txt"), "w") as f:
            f.write("hello through the tunnel\n")
        control, web, public = freePort(), freePort(), freePort()
        server = spawn(self, [venvScript("gotunnel-server"), "--token", TOKEN,
                              "--listen", f"tcp:{control}:interface={HOST}",
                              "--public-interface", HOST], directory)
        page = spawn(self, [sys.executable, "-m", "http.server", str(web), "--bind", HOST],
                     directory)
        yield within(server.whenOutput("control channel listening"), START_TIMEOUT,
                     "the server to listen")
        yield within(page.whenOutput("Serving HTTP"), START_TIMEOUT, "http.server to start")
        client = spawn(self, [venvScript("gotunnel-client"), "--server",
                              f"tcp:{HOST}:{control}", "--token", TOKEN,
                              "--map", f"{web}:{public}"], directory)
        yield within(client.whenOutput("registered"), START_TIMEOUT, "the client to register")

        answer = yield httpGet(public, "/hello.txt")
        self.assertTrue(answer.startswith(b"HTTP/1.0 200"), answer[:100])
        self.assertTrue(answer.endswith(b"\r\n\r\nhello through the tunnel\n"), answer[-100:])

        for child in (client, server, page):
            child.sendSignal("TERM")
            yield within(child.ended, START_TIMEOUT, f"{child.argv[0]} to stop")
        for child in (client, server):
            self.assertEqual(child.exitCode, 0, child.describe())
            self.assertNotIn("Traceback", child.stdout + child.stderr)
            self.assertNotIn(TOKEN, child.stdout + child.stderr)


class EmbeddingExampleTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_tacFileServesATunnel(self):
        """
        docs/deployment.md: twistd -ny docs/examples/gotunnel.tac runs a
        server that a client registers with and tunnels through.
        """
        directory = temporaryDirectory(self)
        tac = os.path.join(REPO, "docs", "examples", "gotunnel.tac")
        env = {"GOTUNNEL_TOKEN": TOKEN, "GOTUNNEL_LISTEN": f"tcp:0:interface={HOST}",
               "GOTUNNEL_PUBLIC_INTERFACE": HOST}
        twistd = spawn(self, [venvScript("twistd"), "-ny", tac, "--pidfile="], directory, env)
        found = yield within(
            twistd.whenOutput(re.compile(r"control channel listening on [\d.]+:(\d+)")),
            START_TIMEOUT, "the embedded server to listen")

        tunnel = Tunnel(self)
        tunnel.controlPort = int(found.group(1))
        target = listenTarget(self)
        client, public = yield within(tunnel.publish(target, token=TOKEN), START_TIMEOUT,
                                      "registration with the embedded server")
        self.assertTrue((yield echoedThrough(self, public, os.urandom(65536), START_TIMEOUT)))
        yield client.stopService()

        twistd.sendSignal("TERM")
        yield within(twistd.ended, START_TIMEOUT, "twistd to stop")
        self.assertIn("Server Shut Down.", twistd.stdout, twistd.describe())
        self.assertNotIn("Traceback", twistd.stdout + twistd.stderr)


def readmeTwistdCommands() -> list[str]:
    """The command lines of README's section on twistd."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        section = f.read().split("## Running under twistd", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


class ReadmeTwistdTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_serverAndClientInOneDirectory(self):
        """
        README: the twistd server and client, run as written from one
        directory (the server's address and the ports made local and
        free), both run, and the client's service is reached.
        """
        directory = temporaryDirectory(self)
        control, public = freePort(), freePort()
        target = listenTarget(self)
        children = []
        for line in readmeTwistdCommands():
            line = (line.replace("tcp:17000", f"tcp:{control}:interface={HOST}")
                    .replace("tunnel.example.com:17000", f"{HOST}:{control}")
                    .replace("22:10022", f"{target}:{public}"))
            argv = line.split()
            self.assertEqual(argv[0], ".venv/bin/twistd", line)
            argv[0] = venvScript("twistd")
            children.append(spawn(self, argv, directory))
            if len(children) == 1:
                yield within(children[0].whenOutput("control channel listening"),
                             START_TIMEOUT, "the server to listen")
        server, client = children
        yield within(client.whenOutput(f"registered {HOST}:{target}->{public}"), START_TIMEOUT,
                     "the client to register")
        self.assertTrue((yield echoedThrough(self, public, os.urandom(65536), START_TIMEOUT)))
        for child in children:
            child.sendSignal("TERM")
            yield within(child.ended, START_TIMEOUT, "twistd to stop")
            self.assertIn("Server Shut Down.", child.stdout, child.describe())
            self.assertNotIn("Traceback", child.stdout + child.stderr, child.describe())
        # Each removed its own pidfile.
        self.assertEqual(os.listdir(directory), [])


QUICKSTART = os.path.join(REPO, "docs", "quickstart.md")


def quickstartConfig(role: str) -> str:
    """The C{config.yaml} block docs/quickstart.md gives for C{role}."""
    with open(QUICKSTART) as f:
        text = f.read()
    blocks = re.findall(r"```yaml\n(# (\w+): config\.yaml\n.*?)```", text, re.S)
    found = [block for block, blockRole in blocks if blockRole == role]
    assert len(found) == 1, f"one {role} config.yaml in docs/quickstart.md, found {len(found)}"
    return found[0]


class QuickstartTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_configYamlOnBothMachines(self):
        """
        docs/quickstart.md: the server's and the client's config.yaml, each
        read from the directory the console script runs in, publish the
        local service; the log lines the page quotes appear.  Only the
        addresses and ports are changed, to loopback and free ports.
        """
        control, public = freePort(), freePort()
        target = listenTarget(self)
        serverConfig = quickstartConfig("server").replace(
            '"0.0.0.0:17000"', f'"{HOST}:{control}"')
        serverConfig += f'  public_interface: "{HOST}"\n'
        clientConfig = (quickstartConfig("client")
                        .replace('"tunnel.example.com:17000"', f'"{HOST}:{control}"')
                        .replace("[22]", f"[{target}]")
                        .replace("10022", str(public)))
        serverDirectory, clientDirectory = temporaryDirectory(self), temporaryDirectory(self)
        for directory, config in ((serverDirectory, serverConfig),
                                  (clientDirectory, clientConfig)):
            with open(os.path.join(directory, "config.yaml"), "w") as f:
                f.write(config)

        server = spawn(self, [venvScript("gotunnel-server")], serverDirectory)
        yield within(server.whenOutput(f"control channel listening on {HOST}:{control}"),
                     START_TIMEOUT, "the server to listen")
        client = spawn(self, [venvScript("gotunnel-client")], clientDirectory)
        yield within(client.whenOutput(f"registered {HOST}:{target}->{public} as office-pc"),
                     START_TIMEOUT, "the client to register")
        yield within(server.whenOutput("client office-pc registered from "), START_TIMEOUT,
                     "the server to log the registration")
        yield within(server.whenOutput(f"public port {public} listening for office-pc"),
                     START_TIMEOUT, "the server to log the public port")
        self.assertTrue((yield echoedThrough(self, public, os.urandom(65536), START_TIMEOUT)))

        for child in (client, server):
            child.sendSignal("TERM")
            yield within(child.ended, START_TIMEOUT, f"{child.argv[0]} to stop")
            self.assertEqual(child.exitCode, 0, child.describe())
            self.assertNotIn("Traceback", child.stdout + child.stderr)
            self.assertNotIn("a-long-random-secret", child.stdout + child.stderr)

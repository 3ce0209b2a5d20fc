"""
A capped mapping measured: SIZE bytes through a gotunnel server and client
(in this process, over loopback) under a bandwidth cap, upload (user to
service) and download (service to user); prints the rate each way against
the cap, and the CPU time the process used.

    .venv/bin/python bench/bandwidth.py --size 1GiB --cap 50MB
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402

from gotunnel.client.service import TunnelClientService  # noqa: E402
from gotunnel.config.mappings import Mapping  # noqa: E402
from gotunnel.config.settings import ClientSettings, ServerSettings  # noqa: E402
from gotunnel.relay.ratelimit import parseRate  # noqa: E402
from gotunnel.server.service import TunnelServerService  # noqa: E402

HOST = "127.0.0.1"
CHUNK = b"\0" * (1 << 20)


class Counter(Protocol):
    """Counts what it reads; fires C{done} at C{size} bytes."""

    def __init__(self, size: int, done: defer.Deferred) -> None:
        self.size, self.done, self.count = size, done, 0

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        if self.count >= self.size and not self.done.called:
            self.done.callback(time.monotonic())


class Sender(Protocol):
    """Sends C{size} bytes as fast as its transport takes them."""

    def __init__(self, size: int) -> None:
        self.left = size

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while self.left > 0 and not self.paused:
            chunk = CHUNK[:min(len(CHUNK), self.left)]
            self.left -= len(chunk)
            self.transport.write(chunk)
        if self.left <= 0:
            self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.left = 0


@defer.inlineCallbacks
def measure(size: int, cap: int, upload: bool) -> defer.Deferred:
    done: defer.Deferred = defer.Deferred()
    service = Factory.forProtocol(lambda: Counter(size, done) if upload else Sender(size))
    service.noisy = False
    target = reactor.listenTCP(0, service, interface=HOST)
    server = TunnelServerService(ServerSettings(
        listen=f"tcp:0:interface={HOST}", token="bench", public_interface=HOST,
        bandwidth_limit=cap), reactor=reactor)
    server.startService()
    control = yield server.whenListening()
    client = TunnelClientService(ClientSettings(
        server=f"tcp:{HOST}:{control.getHost().port}", token="bench", name="bench",
        mappings=[Mapping(HOST, target.getHost().port, 0)]), reactor=reactor)
    client.startService()
    yield client.tunnels[0].whenRegistered()
    remote = client.tunnels[0].mapping.remote_port
    user = Sender(size) if upload else Counter(size, done)
    before = os.times()
    started = time.monotonic()
    yield connectProtocol(TCP4ClientEndpoint(reactor, HOST, remote), user)
    finished = yield done
    after = os.times()
    user.transport.abortConnection()
    yield client.stopService()
    yield server.stopService()
    yield target.stopListening()
    elapsed = finished - started
    cpu = (after.user - before.user) + (after.system - before.system)
    return elapsed, cpu


@defer.inlineCallbacks
def main(argv) -> defer.Deferred:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--cap", default="50MB")
    args = parser.parse_args(argv)
    size, cap = parseRate(args.size, "--size"), parseRate(args.cap, "--cap")
    for upload in (True, False):
        elapsed, cpu = yield measure(size, cap, upload)
        rate = size / elapsed
        print(f"{'upload  ' if upload else 'download'} {size} bytes in {elapsed:.2f} s: "
              f"{rate / 1e6:.2f} MB/s against a cap of {cap / 1e6:.2f} MB/s "
              f"({(rate / cap - 1) * 100:+.1f}%); process CPU {cpu:.2f} s "
              f"({cpu / elapsed * 100:.0f}% of one core)", flush=True)


if __name__ == "__main__":
    task.react(lambda _reactor: main(sys.argv[1:]))

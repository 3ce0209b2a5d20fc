"""
Bounded resources against a peer with a valid token and bad intent, on the
real server in a process of its own: its memory, measured from outside.
"""

from __future__ import annotations

import json
import re
import socket
import time

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.support import (
    HOST, TOKEN, dataChannelMessage, freePort, freeUdpPort, jsonFrame, registerMessage, spawn,
    temporaryDirectory, venvScript, within,
)

SERVER_SCRIPT = venvScript("gotunnel-server")
LISTENING = re.compile(r"control channel listening on 127\.0\.0\.1:(\d+)")
UDP_DROPS = re.compile(r"UDP port (\d+): dropped (\d+) datagrams with the tunnel backed up")
MiB = 1024 * 1024


def residentBytes(pid: int) -> int:
    """The resident set size of process C{pid} (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def readFrame(sock: socket.socket) -> dict:
    """One frame from a blocking socket, decoded."""
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            more = sock.recv(size - len(data))
            if not more:
                raise AssertionError(f"connection closed after {len(data)} of {size} bytes")
            data += more
        return data

    return json.loads(exactly(int.from_bytes(exactly(4), "big")))


def registeredSocket(controlPort: int, name: str) -> socket.socket:
    """A blocking socket with a control channel registered on it, that reads little."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Small, so that the server's answers back up at once in its own buffers.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((HOST, controlPort))
    sock.sendall(jsonFrame(registerMessage(freePort(), name)))
    answer = readFrame(sock)
    if answer.get("status") != "ok":
        raise AssertionError(f"registration refused: {answer}")
    return sock


def stalledCarrier(controlPort: int, publicPort: int) -> tuple[socket.socket, socket.socket]:
    """
    A UDP mapping of C{publicPort} registered (its control channel) and its
    carrying channel opened, with a small receive buffer that nobody reads.
    """
    control = socket.create_connection((HOST, controlPort), timeout=10)
    control.sendall(jsonFrame(registerMessage(publicPort, "stalled", local_port=53,
                                              protocol="udp")))
    answer = readFrame(control)
    if answer.get("status") != "ok" or answer.get("protocol") != "udp":
        raise AssertionError(f"UDP registration refused: {answer}")
    carrier = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    carrier.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    carrier.settimeout(10)
    carrier.connect((HOST, controlPort))
    carrier.sendall(jsonFrame(dataChannelMessage(publicPort, answer["conn_id"], name="stalled",
                                                 local_port=53) | {"protocol": "udp"}))
    accepted = readFrame(carrier)
    if accepted.get("status") != "ok":
        raise AssertionError(f"carrying channel refused: {accepted}")
    return control, carrier


def udpFlood(port: int, total: int, seconds: float, size: int = 1400) -> int:
    """Send up to C{total} bytes of C{size}-byte datagrams to C{port}, for at most C{seconds}."""
    payload = b"u" * size
    sent = 0
    deadline = time.monotonic() + seconds
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.connect((HOST, port))
        while sent < total and time.monotonic() < deadline:
            try:
                sent += peer.send(payload)
            except (BlockingIOError, ConnectionRefusedError):
                pass
    return sent


def pingFlood(sock: socket.socket, total: int, seconds: float, stall: float) -> int:
    """
    Send up to C{total} bytes of pings on C{sock} and read none of the
    pongs, for at most C{seconds}; stop early once the server has read
    nothing for C{stall} seconds.  How many bytes were sent.
    """
    chunk = jsonFrame({"type": "ping", "time": 1}) * (64 * 1024 // 28)
    sock.settimeout(stall)
    sent = 0
    deadline = time.monotonic() + seconds
    while sent < total and time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
        except socket.timeout:
            break
    return sent


class PingFloodTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_pingsWithUnreadPongsKeepMemoryBounded(self):
        """
        64 MB of pings sent at full speed by a client that reads none of the
        pongs grow the server's resident memory by at most 16 MiB (they took
        it from 47 to 243 MB before the server stopped reading such a
        channel), and the server goes on registering other clients.
        """
        server = spawn(self, [SERVER_SCRIPT, "--listen", f"tcp:0:interface={HOST}",
                              "--public-interface", HOST, "--token", TOKEN],
                       temporaryDirectory(self))
        found = yield within(server.whenOutput(LISTENING, (1,)), 60,
                             "the server's 'listening' line")
        controlPort = int(found.group(1))
        pid = server.transport.pid
        flooder = yield threads.deferToThread(registeredSocket, controlPort, "flooder")
        self.addCleanup(flooder.close)
        before = residentBytes(pid)
        sent = yield threads.deferToThread(pingFlood, flooder, 64 * 1000 * 1000, 25, 2)
        grown = residentBytes(pid) - before
        self.assertLessEqual(grown, 16 * MiB,
                             f"{grown / MiB:.1f} MiB more after {sent / MiB:.1f} MiB of pings")
        other = yield threads.deferToThread(registeredSocket, controlPort, "other")
        other.close()


class UdpFloodTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_floodOnAStalledCarrierKeepsMemoryBounded(self):
        """
        A client with a valid token registers a UDP mapping, opens its
        carrying channel and reads nothing from it; 100 MB of datagrams
        flooded at the public port are dropped once that channel's bound is
        reached (and the server says so), its resident memory grows by at
        most 16 MiB, and it goes on registering other clients.
        """
        server = spawn(self, [SERVER_SCRIPT, "--listen", f"tcp:0:interface={HOST}",
                              "--public-interface", HOST, "--token", TOKEN,
                              # A drop report every second, not every 15.
                              "--udp-session-timeout", "4"],
                       temporaryDirectory(self))
        found = yield within(server.whenOutput(LISTENING, (1,)), 60,
                             "the server's 'listening' line")
        controlPort = int(found.group(1))
        pid = server.transport.pid
        publicPort = freeUdpPort()
        control, carrier = yield threads.deferToThread(stalledCarrier, controlPort, publicPort)
        self.addCleanup(control.close)
        self.addCleanup(carrier.close)
        before = residentBytes(pid)
        sent = yield threads.deferToThread(udpFlood, publicPort, 100 * 1000 * 1000, 20)
        grown = residentBytes(pid) - before
        self.assertLessEqual(grown, 16 * MiB,
                             f"{grown / MiB:.1f} MiB more after {sent / MiB:.1f} MiB of datagrams")
        dropped = yield within(server.whenOutput(UDP_DROPS, (1, 2)), 30,
                               "the server's report of datagrams dropped")
        self.assertEqual(int(dropped.group(1)), publicPort)
        self.assertGreater(int(dropped.group(2)), 0)
        other = yield threads.deferToThread(registeredSocket, controlPort, "other")
        other.close()

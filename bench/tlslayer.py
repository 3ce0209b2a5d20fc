"""
The CPU cost of Twisted's TLS layer alone, per GB: a client and a server
TLS protocol joined in memory (no sockets, no reactor), the relay's 64 KiB
writes one way, and how many calls the application and the transport below
see.  CPU time of this process only (time.process_time), so a loaded
machine changes it less than a tunnel's wall-clock figures.

"batching" is a candidate that was measured and not taken (see
bench/README.md, "TLS"): every record one socket read decrypts handed on in
one call, and what one write encrypts read out of the memory BIO in one
piece.  It cut the calls four times and the layer's CPU by about 4 %,
which the tunnel's own figures did not show.

    .venv/bin/python bench/tlslayer.py --mib 512 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from twisted.internet import ssl
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gotunnel.tls import certmaking  # noqa: E402

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError  # noqa: E402
from twisted.protocols.policies import ProtocolWrapper  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

RECORD = 2 ** 14
"""The most plaintext one TLS record carries."""

DELIVER_AT = 2 ** 18
"""Decrypted bytes handed on in one call at the most: one socket read
(Twisted's 64 KiB) decrypts to less, so this only bounds a backlog."""

RECORD_OVERHEAD = 256
"""More than the bytes a TLS record adds to its plaintext (header, tag,
padding): what a read of the memory BIO asks for beyond the plaintext."""


class BatchingTLSProtocol(TLSMemoryBIOProtocol):
    """
    The candidate: L{TLSMemoryBIOProtocol} that passes on what one read decrypts in one
    call, and writes what one write encrypts in one piece.
    """

    def _flushReceiveBIO(self) -> None:
        # Twisted's loop, except that records are gathered and handed on
        # together, before any end or error the loop then meets.
        pending: list[bytes] = []
        size = 0
        while not self._lostTLSConnection:
            try:
                data = self._tlsConnection.recv(RECORD)
            except WantReadError:
                break
            except ZeroReturnError:
                self._deliver(pending)
                pending, size = [], 0
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                failure = Failure()
                self._deliver(pending)
                pending, size = [], 0
                self._tlsShutdownFinished(failure)
            else:
                pending.append(data)
                size += len(data)
                if size >= DELIVER_AT:
                    self._deliver(pending)
                    pending, size = [], 0
        self._deliver(pending)
        self._flushSendBIO()

    def _deliver(self, pending: list[bytes]) -> None:
        if pending and not self._aborted:
            ProtocolWrapper.dataReceived(
                self, pending[0] if len(pending) == 1 else b"".join(pending))

    def _write(self, data: bytes) -> None:
        # Twisted's loop, without a copy of each record's plaintext, and
        # with the memory BIO read out once after all of them.
        if self._lostTLSConnection:
            return
        if not self._handshakeDone:
            # OpenSSL takes nothing before the handshake ends.  Twisted would
            # pause the registered producer, which stops the reading of the
            # handshake's answer where that producer is this connection.
            self._appSendBuffer.append(bytes(data))
            return
        view = memoryview(data)
        total = len(view)
        alreadySent = 0
        records = 0
        while alreadySent < total:
            try:
                sent = self._tlsConnection.send(view[alreadySent:alreadySent + RECORD])
            except WantReadError:
                self._bufferedWrite(bytes(view[alreadySent:]))
                break
            except Error:
                self._tlsShutdownFinished(Failure())
                break
            alreadySent += sent
            records += 1
        if records:
            self._flushSendBIO(alreadySent + RECORD_OVERHEAD * (records + 1))

    def _flushSendBIO(self, expected: int = 2 ** 15) -> None:
        chunks = []
        size = expected
        while True:
            try:
                data = self._tlsConnection.bio_read(size)
            except WantReadError:
                break
            chunks.append(data)
            if len(data) < size:
                break
            size = 2 ** 15
        if chunks:
            self.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))



CHUNK = 65536


class Sink(Protocol):
    calls = 0
    received = 0

    def dataReceived(self, data: bytes) -> None:
        self.calls += 1
        self.received += len(data)


class Pipe(StringTransport):
    """A transport whose writes are counted and kept for the other side."""

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


def pair(protocolClass: type, directory: str):
    from datetime import datetime, timezone
    now = datetime.now(timezone.utc)
    ca = certmaking.makeCA("bench CA", now)
    server = certmaking.makeServer(ca, ["bench.example"], [], now)
    serverOptions = ssl.CertificateOptions(certificate=server.certificate,
                                           privateKey=server.key)
    trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(
        certmaking.certificatePEM(ca.certificate))])
    clientOptions = ssl.optionsForClientTLS("bench.example", trustRoot=trust)
    clock = Clock()
    made = []
    for options, isClient in ((clientOptions, True), (serverOptions, False)):
        factory = TLSMemoryBIOFactory(options, isClient, Factory.forProtocol(Sink), clock=clock)
        factory.protocol = protocolClass
        proto = factory.buildProtocol(None)
        transport = Pipe()
        proto.makeConnection(transport)
        made.append((proto, transport))
    (client, ct), (server, st) = made
    for _ in range(10):
        for source, sink in ((ct, server), (st, client)):
            data = source.value()
            source.clear()
            if data:
                sink.dataReceived(data)
    return client, ct, server, st


def run(protocolClass: type, mib: int) -> dict:
    client, ct, server, st = pair(protocolClass, tempfile.gettempdir())
    payload = os.urandom(CHUNK)
    writesBefore = ct.writes
    start = time.process_time()
    for _ in range(mib * 1024 * 1024 // CHUNK):
        client.write(payload)
        data = ct.value()
        ct.clear()
        server.dataReceived(data)
    cpu = time.process_time() - start
    sink = server.wrappedProtocol
    assert sink.received == mib * 1024 * 1024, sink.received
    return {"cpu s/GB": cpu * 1024 / mib, "app calls/MiB": sink.calls / mib,
            "writes below/MiB": (ct.writes - writesBefore) / mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    kinds = {"twisted": TLSMemoryBIOProtocol, "batching": BatchingTLSProtocol}
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.repeat):
        for name, cls in kinds.items():
            results[name].append(run(cls, args.mib))
    print(f"{'layer':10} {'cpu s/GB':>9} {'app calls/MiB':>14} {'writes below/MiB':>17}")
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{name:10} {med['cpu s/GB']:9.3f} {med['app calls/MiB']:14.1f} "
              f"{med['writes below/MiB']:17.1f}")


if __name__ == "__main__":
    main()

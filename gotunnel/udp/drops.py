"""
What a UDP mapping's end dropped, logged once per sweep for idle peers or
sessions rather than once per datagram.
"""

from __future__ import annotations

from twisted.logger import Logger

from gotunnel.server.accounting import DatagramCounters

log = Logger(namespace="gotunnel.udp")

SWEEPS_PER_TIMEOUT = 4
"""How often, per idle timeout, idle peers and sessions are looked for."""


def reportDrops(counters: DatagramCounters, reported: dict[str, int], mapping: str,
                seconds: float) -> dict[str, int]:
    """Log what was dropped since C{reported}; returns the new snapshot."""
    now = counters.snapshot()
    grown = {key: now[key] - reported.get(key, 0) for key in now}
    if grown["dropped_backed_up"] + grown["dropped_sessions"] + grown["dropped_unknown"]:
        log.warn("UDP {mapping}: dropped {backed_up} datagrams with the tunnel backed up, "
                 "{sessions} of new peers over the session limit, {unknown} for expired "
                 "peers, in {seconds:.0f} s", mapping=mapping,
                 backed_up=grown["dropped_backed_up"], sessions=grown["dropped_sessions"],
                 unknown=grown["dropped_unknown"], seconds=seconds)
    return now

"""
The cost of one source-address check against 1,000 CIDRs (mixed IPv4 and
IPv6 prefix lengths): gotunnel's prefix-set lookup (portpolicy.permitted,
parsing the peer's address included) next to a linear scan of
ipaddress networks.

    .venv/bin/python bench/sourcelookup.py
"""

from __future__ import annotations

import ipaddress
import os
import random
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gotunnel.server.portpolicy import SourcePolicy, permitted  # noqa: E402


def main() -> None:
    rng = random.Random(1000)
    networks = []
    while len(networks) < 1000:
        if rng.random() < 0.8:
            text = f"{ipaddress.IPv4Address(rng.getrandbits(32))}/{rng.randint(8, 32)}"
        else:
            text = f"{ipaddress.IPv6Address(rng.getrandbits(128))}/{rng.randint(16, 128)}"
        networks.append(ipaddress.ip_network(text, strict=False))
    policy = (SourcePolicy.of(networks),)
    hosts = [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(1000)]
    lengths = len({(n.version, n.prefixlen) for n in networks})

    def prefixSets():
        for host in hosts:
            permitted(policy, host)

    def linear():
        for host in hosts:
            ip = ipaddress.ip_address(host)
            any(ip in network for network in networks)

    for name, function in (("prefix sets (gotunnel)", prefixSets), ("linear scan", linear)):
        best = min(timeit.repeat(function, number=1, repeat=7))
        print(f"{name:24} {best / len(hosts) * 1e6:8.2f} us per check "
              f"(1000 CIDRs, {lengths} prefix lengths)")


if __name__ == "__main__":
    main()

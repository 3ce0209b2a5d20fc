"""
UDP tunnels (issue 19; the wire extension is in docs/protocol.md): what the
server's and the client's services look up, lazily, for a mapping whose
protocol is "udp".  The package holds the rest:

 - L{gotunnel.udp.framing}: a carrying channel's frames;
 - L{gotunnel.udp.carrier}: one end of a carrying channel, which drops rather
   than queues while backed up;
 - L{gotunnel.udp.sockets}: the UDP sockets, read in batches;
 - L{gotunnel.udp.server}: the public UDP port and its peers;
 - L{gotunnel.udp.client}: the carrying channel's client end and the sessions;
 - L{gotunnel.udp.drops}: what was dropped, logged once per sweep.
"""

from gotunnel.udp.client import UdpTunnelService
from gotunnel.udp.server import UdpTunnel, attachCarrier

__all__ = ["UdpTunnel", "UdpTunnelService", "attachCarrier"]

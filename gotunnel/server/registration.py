"""
What the server does with a C{register}: check the client's credentials
and limits, then publish the port it asks for, one the server chooses (for
remote port 0), or the port of the group it joins.  L{MappingRegistration}
is a part of L{gotunnel.server.registry.TunnelRegistry}, and works on its
tables.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

from twisted.internet import defer, error
from twisted.internet.interfaces import IListeningPort, ISSLTransport
from twisted.logger import Logger

from gotunnel.server import access
from gotunnel.wire import messages
from gotunnel.server.access import RegistrationRefused
from gotunnel.server.groups import Group
from gotunnel.server.mapping import PublishedMapping
from gotunnel.server.portpolicy import SourcePolicy, SourceRate
from gotunnel.wire.printable import printable
from gotunnel.server.publicusers import PublicUserFactory
from gotunnel.relay.ratelimit import Throttle

if TYPE_CHECKING:
    from gotunnel.server.channel import ServerChannel

log = Logger(namespace="gotunnel.server")


ANY_PORT_ATTEMPTS = 16
"""Ports tried for a C{register} of remote port 0 before it is refused."""


def peerCommonName(transport: object) -> Optional[str]:
    """
    L{gotunnel.tls.contexts.peerCommonName}, imported only for a TLS connection: a
    plain server never loads the TLS code.
    """
    if not ISSLTransport.providedBy(transport):
        return None
    from gotunnel.tls import contexts as tls

    return tls.peerCommonName(transport)


class MappingRegistration:
    """
    Registering mappings: the part of L{gotunnel.server.registry.TunnelRegistry}
    that answers a C{register}, on the registry's settings, clock and tables
    (L{gotunnel.server.published.PublishedPorts}).
    """

    def applyLimits(self, tunnel: "PublishedMapping", msg: messages.Register) -> None:
        """
        C{tunnel}'s limits on users: the stricter of the server's (or a
        listed client's), and what the client asked for.
        """
        limits = access.userLimits(self.settings, msg)
        tunnel.maxUsers = limits.max_users
        rate, bandwidth = limits.connection_rate, limits.bandwidth
        tunnel.sourceRate = SourceRate(self.clock, rate) if rate else None
        tunnel.throttles = (Throttle(self.clock, bandwidth), Throttle(self.clock, bandwidth)) \
            if bandwidth else None

    def authenticate(self, name: str, token: str, certificateName: Optional[str]) -> str:
        """L{access.authenticate} under this server's settings."""
        return access.authenticate(self.settings, name, token, certificateName)

    def checkLimits(self, name: str, remote_port: int, protocol: Optional[str] = None) -> None:
        """
        Refuse a port outside what C{name} may publish, or one mapping too
        many for C{name}.  C{protocol}: None for TCP, "udp" (a mapping of
        the same port number and protocol is replaced, not added).
        """
        if remote_port:
            # 0: the server chooses one that name may publish.
            self.checkPort(name, remote_port)
        access.checkMappingCount(self.settings, name, sum(
            1 for tunnel in self.allTunnels() if tunnel.name == name
            and (tunnel.remote_port, tunnel.protocol) != (remote_port, protocol)))

    def mappingLimit(self, name: str) -> int:
        """How many mappings C{name} may hold at once."""
        return access.mappingLimit(self.settings, name)

    def checkPort(self, name: str, remote_port: int) -> None:
        """Refuse a port outside what C{name} may publish."""
        access.checkPort(self.settings, name, remote_port)

    def sourcePolicies(self, name: str, msg: messages.Register) -> tuple[SourcePolicy, ...]:
        """
        The source policies of a mapping C{name} registers: the server's,
        then what the client asks for (see L{access.serverSources}).

        @raise RegistrationRefused: the client's lists are not networks.
        """
        # Built once per listed client, once for all the others: 1,000
        # networks are not parsed again for every register.
        key = name if name in self.settings.clients else None
        policies = self._sourcePolicies.get(key)
        if policies is None:
            policies = self._sourcePolicies[key] = access.serverSources(self.settings, name)
        return policies + access.askedSources(msg)

    def register(self, channel: "ServerChannel", msg: messages.Register) -> defer.Deferred:
        """
        Publish C{msg.remote_port} for C{channel}.

        @return: a Deferred that fires with the L{PublishedMapping}, or fails with
            L{RegistrationRefused}.
        """
        if msg.vhost is not None:
            if self.virtualHosts is None:
                return defer.fail(RegistrationRefused(
                    "this server has no virtual hosts (--http, --https)"))
            return self.virtualHosts.register(channel, msg)
        try:
            name = self.authenticate(msg.name, msg.token, peerCommonName(channel.transport))
            if name != msg.name:
                msg = dataclasses.replace(msg, name=name)
            tunnelType = PublishedMapping
            if access.isUdp(self.settings, msg):
                from gotunnel.udp.tunnels import UdpTunnel
                tunnelType = UdpTunnel
            protocol = tunnelType.protocol
            self.checkLimits(msg.name, msg.remote_port, protocol)
            sources = self.sourcePolicies(msg.name, msg)
            if msg.remote_port == 0:
                return self._registerAnyPort(channel, msg, sources)
            self.published.takeLease(msg.name, msg.remote_port, self.mappingLimit(msg.name),
                                     protocol)
        except RegistrationRefused as e:
            return defer.fail(e)
        if tunnelType is PublishedMapping:
            # Groups are of TCP ports: UDP on the same number is another port.
            try:
                joined = self._joinGroup(channel, msg, sources)
            except RegistrationRefused as e:
                return defer.fail(e)
            if joined is not None:
                return joined
        return self._publish(channel, msg, tunnelType, sources)

    def _publish(self, channel: "ServerChannel", msg: messages.Register, tunnelType: type,
                 sources: tuple[SourcePolicy, ...]) -> defer.Deferred:
        """
        Publish C{msg}'s port, allowed to its client, for a new mapping of
        C{tunnelType}, taking it over from the same client's previous one.
        """
        key = tunnelType.portKey(msg.remote_port)
        previous = self.tunnels.get(key)
        if previous is not None:
            if previous.name != msg.name:
                return defer.fail(RegistrationRefused(
                    f"remote port {msg.remote_port} is already taken by another client"))
            log.info("client {name} registered port {remote_port} again; "
                     "dropping its previous control channel",
                     name=printable(msg.name), remote_port=msg.remote_port)
            previous.close()
            previous.channel.transport.loseConnection()
        tunnel = tunnelType(self, channel, msg)
        tunnel.sources = sources
        self.applyLimits(tunnel, msg)
        if msg.group:
            group = Group(msg.remote_port, msg.group, msg.group_key or "")
            group.add(tunnel)
            self.groups[msg.remote_port] = group
        self.tunnels[key] = tunnel

        def listening(listens: bool) -> PublishedMapping:
            if not listens:
                tunnel.close()
                raise RegistrationRefused(
                    f"port {msg.remote_port} was registered again or closed before it opened")
            return tunnel

        def refused(failure):
            failure.trap(error.CannotListenError)
            tunnel.close()
            reason = failure.value.socketError
            raise RegistrationRefused(
                f"cannot listen on port {msg.remote_port}: {reason}")

        return tunnel.listen().addCallbacks(listening, refused)

    def _registerAnyPort(self, channel: "ServerChannel", msg: messages.Register,
                         sources: tuple[SourcePolicy, ...]) -> defer.Deferred:
        """
        Publish a port the server chooses for C{msg} (whose C{remote_port}
        is 0): a free one of those C{msg.name} may publish, or, where any is
        allowed, one the OS chooses.  A port free of tunnels and leases that
        the OS will not bind is skipped, up to L{ANY_PORT_ATTEMPTS} times.
        """
        allowed = access.allowedPorts(self.settings, msg.name)
        candidates = self.published.freePorts(allowed) if allowed else None
        attempts = iter(range(ANY_PORT_ATTEMPTS))

        def attempt(_=None):
            if next(attempts, None) is None:
                raise RegistrationRefused(
                    f"no free remote port for {msg.name!r} after {ANY_PORT_ATTEMPTS} tries")
            if candidates is None:
                return self._listenEphemeral(channel, msg, sources).addCallback(
                    lambda tunnel: tunnel if tunnel is not None else attempt())
            port = next(candidates, None)
            if port is None:
                raise RegistrationRefused(f"no free remote port for {msg.name!r}: every port "
                                          "it may publish is taken or reserved")
            d = self.register(channel, dataclasses.replace(msg, remote_port=port))
            return d.addErrback(notBound)

        def notBound(failure):
            failure.trap(RegistrationRefused)
            if not str(failure.value).startswith("cannot listen on port"):
                return failure
            return attempt()

        return defer.maybeDeferred(attempt)

    def _listenEphemeral(self, channel: "ServerChannel", msg: messages.Register,
                         sources: tuple[SourcePolicy, ...]) -> defer.Deferred:
        """
        Publish C{msg} on a port the OS chooses; fires with the L{PublishedMapping},
        or None if the OS chose a port another client holds or has reserved.
        """
        tunnel = PublishedMapping(self, channel, msg)
        tunnel.sources = sources
        self.applyLimits(tunnel, msg)

        def listening(port: IListeningPort) -> Optional[PublishedMapping]:
            number = port.getHost().port
            lease = self.leases.get(number)
            if (number in self.tunnels or number in self.publicPorts
                    or (lease is not None and lease.name != msg.name)):
                self.trackStopping(defer.maybeDeferred(port.stopListening))
                return None
            if lease is not None:
                self.leases.end(number)
            tunnel.portChosen(number)
            self.tunnels[number] = tunnel
            # From now on the port's listener is ordered as any other's.
            self.publicPort(number).adopt(tunnel, factory, port)
            tunnel.online = True
            return tunnel

        def refused(failure):
            failure.trap(error.CannotListenError)
            raise RegistrationRefused(
                f"cannot listen on a port the system chooses: {failure.value.socketError}")

        factory = PublicUserFactory(tunnel)
        endpoint = self.publicEndpoint(0)
        return endpoint.listen(factory).addCallbacks(listening, refused)

    def _joinGroup(self, channel: "ServerChannel", msg: messages.Register,
                   sources: tuple[SourcePolicy, ...]) -> Optional[defer.Deferred]:
        """
        Add C{msg}'s mapping to the group of its port, if the port has one
        that C{msg} names with the right key; None if it is not a join.

        @raise RegistrationRefused: the port's group is another, or the key
            is wrong.
        """
        group = self.groups.get(msg.remote_port)
        if group is None:
            return None
        if not msg.group:
            if list(group.members) == [msg.name]:
                # Its only member, now without a group: it takes the port over.
                return None
            raise RegistrationRefused(
                f"remote port {msg.remote_port} is served by a group of clients")
        if not group.admits(msg.group, msg.group_key or ""):
            raise RegistrationRefused(
                f"remote port {msg.remote_port} is served by another group, or the group key "
                "is wrong")
        previous = group.members.get(msg.name)
        if previous is not None and len(group.members) == 1:
            # Its only member again (a reconnect): as for any mapping.
            return None
        tunnel = PublishedMapping(self, channel, msg)
        tunnel.sources = sources
        self.applyLimits(tunnel, msg)
        if previous is not None:
            log.info("client {name} registered port {remote_port} again; "
                     "dropping its previous control channel",
                     name=printable(msg.name), remote_port=msg.remote_port)
            previous.close()
            previous.channel.transport.loseConnection()
        group.add(tunnel)
        tunnel.online = True
        log.info("client {name} joined group {group} of public port {remote_port} "
                 "({count} members)", name=printable(msg.name), group=printable(group.name),
                 remote_port=msg.remote_port, count=len(group.members))
        return defer.succeed(tunnel)

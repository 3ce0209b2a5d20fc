from twisted.application.service import ServiceMaker

gotunnelServer = ServiceMaker(
    "gotunnel-server", "gotunnel.cli.server_tap",
    "gotunnel server: publish clients' local services on public ports", "gotunnel-server")

gotunnelClient = ServiceMaker(
    "gotunnel-client", "gotunnel.cli.client_tap",
    "gotunnel client: publish local services through a gotunnel server", "gotunnel-client")

# A Twisted application that runs a gotunnel server beside its own services.
# Run it with:  twistd -ny gotunnel.tac
import os

from twisted.application import service

from gotunnel.config import ServerSettings
from gotunnel.server import TunnelServerService

application = service.Application("tunnel-host")

settings = ServerSettings(
    listen=os.environ.get("GOTUNNEL_LISTEN", "tcp:17000"),
    token=os.environ["GOTUNNEL_TOKEN"],
    public_interface=os.environ.get("GOTUNNEL_PUBLIC_INTERFACE", "0.0.0.0"),
)
TunnelServerService(settings).setServiceParent(application)

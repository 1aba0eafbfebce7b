"""
Listening sockets for the receive connectors, as Twisted services.

One C{StreamServerEndpointService} per distinct binding (it binds in
privilegedStartService, so twistd can open port 25 before dropping
privileges); the connector for each connection is chosen when it arrives.
"""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, protocol

from .protocol import SMTPServer, ServerContext


class SMTPFactory(protocol.ServerFactory):
    def __init__(self, context: ServerContext):
        self.context = context

    def buildProtocol(self, addr):
        p = SMTPServer(self.context)
        p.factory = self
        return p


def listener_service(reactor, binding, backlog: int, factory) -> StreamServerEndpointService:
    """The listening service of one binding; it binds when started (privilegedStartService)."""
    if binding.version == 6:
        endpoint = endpoints.TCP6ServerEndpoint(reactor, binding.port, backlog=backlog, interface=binding.host)
    else:
        endpoint = endpoints.TCP4ServerEndpoint(reactor, binding.port, backlog=backlog, interface=binding.host)
    service = StreamServerEndpointService(endpoint, factory)
    service.setName(f"smtp {binding}")
    # a port that cannot be bound must stop the server, not be logged and ignored
    service._raiseSynchronously = True
    return service


def listener_services(reactor, context: ServerContext) -> list[StreamServerEndpointService]:
    # Twisted's default backlog of 50 drops the SYNs of a burst, and each
    # dropped SYN costs its client a retry a second later: the backlog is the connectors'
    factory = SMTPFactory(context)
    return [listener_service(reactor, b, context.connectors.listen_backlog(b), factory)
            for b in context.connectors.listen_bindings()]

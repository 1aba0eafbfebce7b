"""
The receive room: ESMTP sessions on receive connectors, connector choice by
binding and peer address, limits and the rights of each session.
"""

from .connectors import ConnectorTable
from .listener import SMTPFactory, listener_services
from .protocol import SMTPServer, ServerContext

__all__ = ["ConnectorTable", "SMTPFactory", "SMTPServer", "ServerContext", "listener_services"]

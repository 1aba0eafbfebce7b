"""
The configuration room: one TOML file parsed once into frozen models.
Nobody else parses files.
"""

from .loader import ConfigError, Problem, defaults, load, loads
from .models import (
    AcceptedDomain,
    AddressSpace,
    Config,
    LogsConfig,
    ManagementConfig,
    QueueConfig,
    ReceiveConnector,
    SendConnector,
    ServerConfig,
)

__all__ = [
    "AcceptedDomain", "AddressSpace", "Config", "ConfigError", "LogsConfig", "ManagementConfig", "Problem", "QueueConfig",
    "ReceiveConnector", "SendConnector", "ServerConfig", "defaults", "load", "loads",
]

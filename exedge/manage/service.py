"""
Where the management endpoint listens.

The UNIX socket is the default and needs no token: it is created mode
0600 in a directory of mode 0700, so the file system says who may steer
the server (its own user and root), as Postfix's public/ and private/
directories do. TCP needs the bearer token of [management] token_file on
every request, and is refused by the loader on a non-loopback address
unless allow_remote says so.

The socket is made in startService, after twistd dropped privileges, so
it belongs to the user the server runs as.
"""

from __future__ import annotations

import os
import stat

from twisted.application.service import Service
from twisted.internet import defer, endpoints
from twisted.logger import Logger

from exedge.config import ConfigError

from .api import ManagementSite

log = Logger()


def read_token(config) -> str | None:
    """The bearer token, checked now: a missing, empty or world-readable file stops start-up."""
    path = config.management.token_file
    if config.management.listen is None or not path:
        return None
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            token = f.read(4097).strip()
    except OSError as e:
        raise ConfigError([config.problem(("management", "token_file"), f"cannot read {path}: {e.strerror}")])
    if not token or len(token) > 4096 or not token.isascii() or any(c <= 32 for c in token):
        raise ConfigError([config.problem(("management", "token_file"),
                                          f"{path} must hold one token: printable ASCII, no spaces, at most 4096 characters")])
    if mode & stat.S_IROTH:
        raise ConfigError([config.problem(("management", "token_file"),
                                          f"{path} is readable by every user: chmod 600 it")])
    if len(token) < 16:
        raise ConfigError([config.problem(("management", "token_file"),
                                          f"the token in {path} is too short to be secret (16 characters at least)")])
    return token.decode("ascii")


class ManagementService(Service):
    """Serves C{api_for(token)} (a L{ManagementAPI}) on the configured socket and TCP address."""

    name = "management"

    def __init__(self, config, reactor, api_for):
        self.settings = config.management
        self.reactor = reactor
        self.token = read_token(config)
        self.api_for = api_for
        self.ports = []

    def startService(self) -> None:
        super().startService()
        m = self.settings
        if m.socket:
            directory = os.path.dirname(m.socket)
            if directory:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            site = ManagementSite(self.api_for(None), m.max_request_size)
            # wantPID: a socket left by a crashed run is replaced, one of a live server is not
            port = self.reactor.listenUNIX(m.socket, site, mode=0o600, wantPID=True)
            self.ports.append(port)
            log.info("management endpoint on unix:{path}", path=m.socket)
        if m.listen is not None:
            host, number = m.listen
            site = ManagementSite(self.api_for(self.token), m.max_request_size)
            endpoint = endpoints.serverFromString(self.reactor, f"tcp:{number}:interface={host.replace(':', chr(92) + ':')}")
            d = endpoint.listen(site)
            d.addCallback(self.ports.append)
            d.addErrback(lambda f: log.failure("management endpoint on {host}:{port}", f, host=host, port=number))
            log.info("management endpoint on http://{host}:{port}/ (bearer token)", host=host, port=number)

    def stopService(self):
        super().stopService()
        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])

"""The twistd plugin's options and service (loaded lazily by ServiceMaker)."""

from __future__ import annotations

import sys

from twisted.application.service import MultiService
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized

from exedge.config import ConfigError, load
from exedge.logs.text import twistd_observer


class Options(usage.Options):
    optParameters = [["config", "c", None, "the exedge configuration file (TOML)"]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config is required")


def makeService(options):
    from exedge.service import build_service

    try:
        config = load(options["config"])
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(1)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        server = build_service(config, config_path=options["config"])
    except ConfigError as e:      # what only files can tell: certificates
        for problem in e.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(1)
    _reload_on_hup(server)
    observer = twistd_observer(getattr(options, "parent", None))
    return server if observer is None else TwistdRoot(server, observer)


class TwistdRoot(MultiService):
    """
    The server under twistd's Application, bringing exedge's observer for
    twistd's text log (L{exedge.logs.text}). twistd takes the log observer
    from the Application's L{ILogObserver} component, and sets up logging
    only after the plugin's service has joined the Application: this is
    where a plugin meets the Application.
    """

    def __init__(self, server, observer) -> None:
        super().__init__()
        self.observer = observer
        server.setServiceParent(self)

    def setServiceParent(self, parent):
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, self.observer)
        return super().setServiceParent(parent)


def _reload_on_hup(server) -> None:
    """
    SIGHUP reloads the configuration (systemd's ExecReload, Postfix's
    habit) instead of killing the server. The handler only schedules the
    reload: it runs in the reactor's thread, between events.
    """
    import signal

    from twisted.internet import reactor

    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(server.reload))

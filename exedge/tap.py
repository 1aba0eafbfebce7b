"""The twistd plugin's options and service (loaded lazily by ServiceMaker)."""

from __future__ import annotations

import sys

from twisted.python import usage

from exedge.config import ConfigError, load


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
    return server


def _reload_on_hup(server) -> None:
    """
    SIGHUP reloads the configuration (systemd's ExecReload, Postfix's
    habit) instead of killing the server. The handler only schedules the
    reload: it runs in the reactor's thread, between events.
    """
    import signal

    from twisted.internet import reactor

    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(server.reload))

"""
The whole server as one C{MultiService} built from the configuration.

Children start in order: the spool (thread pools, partial files removed;
then what a previous run left is read back in the background and goes
back into its queues step by step), the queue manager, then the listeners.

Every object gets what it works with in its constructor, in the order of
the flow (docs/architecture.md): the spool; the queue's intake, where
cleanup and recovery announce committed messages; cleanup; the bouncer
(which queues its reports through cleanup); the queue manager (with the
bouncer, the pipeline as its route policy, and the intake it takes from);
the listeners (with cleanup).
"""

from __future__ import annotations

import ipaddress
import os
import time

import attrs

from twisted.application.service import MultiService, Service
from twisted.names import client
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from exedge import tls
from exedge.auth.credentials import CramMD5Checker, FileChecker, portal_for
from exedge.auth.secrets import load_secrets
from exedge import __version__
from exedge.config import Config, ConfigError, load
from exedge.dequeue import Triggers
from exedge.dequeue.client import EtrnClientService
from exedge.pipeline import build_pipeline
from exedge.cleanup import Cleanup
from exedge.queue import QueueManager, Spool
from exedge.queue.intake import Intake
from exedge.queue.recovery import RECOVERY_STEP, Recovery
from exedge.manage.api import ManagementAPI
from exedge.manage.service import ManagementService
from exedge.manage.viewer import viewer_page
from exedge.metrics import Metrics
from exedge.pressure import ResourceMonitor, rss_probe
from exedge.send.drop import remove_abandoned
from exedge.receive import ConnectorTable, SMTPFactory, ServerContext
from exedge.receive.listener import listener_service
from exedge.receive.workers import HandOffPort, ReceiveWorkers
from exedge.routing import Router
from exedge.dsn import Bouncer
from exedge.interfaces import NoTracking
from exedge.logs import CsvLog
from exedge.logs import protocol as protocol_log, tracking as message_tracking
from exedge.send import DropDirectoryAgent, RelayAgent
from exedge.queue.committer import ProcessCommitter
from exedge.send.mx import DNSCache, MXResolver

log = Logger()


class SpoolService(Service):
    """
    Owns the bounded thread pools that do all disk work (one for receiving,
    one for delivery), and recovery: at start only what must precede the
    first session (L{Recovery.start}: directories, partial files), then
    queue/ is read back in steps on the delivery pool (it gives way to
    receiving, and goes at the pace deliveries leave it) while the
    listeners already accept mail. C{recovery_step}: files per step.
    """

    def __init__(self, directory: str, threads: int, delivery_threads: int, reactor, on_recovered, *,
                 recovery_step: int = RECOVERY_STEP):
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=threads, name="exedge-spool")
        self.delivery_pool = ThreadPool(minthreads=1, maxthreads=delivery_threads, name="exedge-delivery")
        self.spool = Spool(directory, lambda f: deferToThreadPool(reactor, self.pool, f),
                           lambda f: deferToThreadPool(reactor, self.delivery_pool, f), clock=reactor,
                           committer=lambda spool: ProcessCommitter(spool, reactor), recycle=True)
        self.recovery = Recovery(self.spool, on_recovered, self.spool.run_delivery, reactor, step=recovery_step)

    def startService(self) -> None:
        super().startService()
        self.pool.start()
        self.delivery_pool.start()
        # partial files go before the commit worker writes new ones; the rest in the background
        self.recovery.start()
        self.spool.receiving.start()

    def recovery_status(self) -> dict:
        """For the management status: {"recovering": bool, "recovered": messages read back so far}."""
        return self.recovery.status()

    def stopService(self):
        super().stopService()
        self.recovery.stop()
        # what was delivered and waits to be removed, then the commit worker: what it answers
        # may still need the pools
        d = self.spool.flush_removals().addBoth(lambda _: self.spool.receiving.stop())

        def pools(result):
            self.pool.stop()
            self.delivery_pool.stop()
            return result

        return d.addBoth(pools)


class ThreadPoolService(Service):
    """A bounded thread pool that lives as long as the server (password checks)."""

    def __init__(self, name: str, size: int, reactor):
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=size, name=name)

    def run(self, f):
        return deferToThreadPool(self.reactor, self.pool, f)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        self.pool.stop()


def _dns_resolver(config: Config, reactor):
    """
    [server].dns_servers alone when set (client.Resolver with servers only:
    createResolver would mix resolv.conf in, research §4), else the
    system's configuration.
    """
    if config.server.dns_servers:
        return client.Resolver(servers=list(config.server.dns_servers), reactor=reactor)
    return client.createResolver()   # resolv.conf and /etc/hosts, on the global reactor


def pipeline_resolver(config: Config, reactor):
    """
    The stages' resolver (the connection filter's DNS lists): answers kept
    for their TTL, and "not listed" (NXDOMAIN) for its SOA's negative TTL,
    so a burst of connections from one address asks each list once.
    """
    return DNSCache(_dns_resolver(config, reactor), clock=reactor)


def mx_resolver(config: Config, reactor) -> MXResolver:
    """
    MX lookups on [server].dns_servers alone when set (client.Resolver with
    servers only: createResolver would mix resolv.conf in, research §4),
    else the system's resolver configuration. "Ourselves", for loop
    detection, is every name and bound address of this server; smart-host
    addresses are the loopback addresses a route may lead to. Answers are
    kept for their TTL (L{DNSCache}): many domains, few MX hosts.
    """
    resolver = DNSCache(_dns_resolver(config, reactor), clock=reactor)
    names = {config.server.fqdn} | {c.fqdn for c in config.receive_connectors if c.fqdn} \
        | {c.fqdn for c in config.send_connectors if c.fqdn}
    bound = {b.host for c in config.receive_connectors for b in c.bindings if not b.is_wildcard}
    allowed = set()
    for c in config.send_connectors:
        for host, _ in c.smart_hosts:
            try:
                ipaddress.ip_address(host)
                allowed.add(host)
            except ValueError:
                pass
    # a bound loopback address is ourselves, even if some connector names it
    return MXResolver(resolver, own_names=names, own_addresses=bound, allowed_addresses=allowed - bound)


def receive_portal(config: Config, secrets, auth_run):
    """The twisted.cred portal AUTH checks against ([directory]), or None: no AUTH anywhere (receive workers too)."""
    checker = None
    if config.directory.servers:
        from exedge.auth.directory import DirectoryChecker   # ldap3: ~80 ms of start-up, only for a directory
        checker = DirectoryChecker(config.directory, auth_run, secrets.directory_service)
    elif config.directory.credentials_file:
        checker = FileChecker(config.directory.credentials_file, auth_run)
    if checker is not None or secrets.cram_md5:
        return portal_for(checker, CramMD5Checker(secrets.cram_md5) if secrets.cram_md5 else None)
    return None


def log_files(config: Config, reactor):
    """
    The log files of [logs]: (receive protocol log, send protocol log,
    message tracking) as L{CsvLog}s; tracking None when disabled. The
    protocol logs are made whether or not a connector is Verbose now (a
    file appears only once a row is written): a reload may make one so.
    """
    logs = config.logs

    def csv_log(kind: str, path: str, prefix: str, log_type: str, fields):
        return CsvLog(path, prefix, log_type, fields, clock=reactor, **logs.limits(kind))

    receive = csv_log("receive_protocol_log", logs.receive_protocol_log_path, "RECV",
                      protocol_log.RECEIVE_LOG_TYPE, protocol_log.FIELDS)
    send = csv_log("send_protocol_log", logs.send_protocol_log_path, "SEND",
                   protocol_log.SEND_LOG_TYPE, protocol_log.FIELDS)
    tracking = None
    if logs.message_tracking_log_enabled:
        tracking = csv_log("message_tracking_log", logs.message_tracking_log_path, message_tracking.PREFIX,
                           message_tracking.LOG_TYPE, message_tracking.FIELDS)
    return receive, send, tracking


@attrs.frozen
class _Parts:
    """What a configuration builds that a reload replaces as one: all of it checked before any is used."""

    config: Config
    router: Router
    agents: dict
    pipeline: object
    context: ServerContext
    etrn: tuple


class ExedgeServer(MultiService):
    """
    The whole server. What lives as long as the process (the spool and its
    threads, cleanup, the queue manager, the management endpoint) is made
    once; what a configuration describes (routing, send connectors' agents,
    receive connectors, TLS, AUTH, the pipeline, ETRN clients) is built as
    L{_Parts}, and L{reload} swaps a new set in atomically: a file that
    does not load, a certificate that does not read or a port that cannot
    be bound leaves the running configuration as it was. Sessions in flight
    keep the context they started with (the protocol holds it); new
    sessions get the new one.
    """

    def __init__(self, config: Config, reactor=None, config_path: str | None = None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config_path = config_path
        self.started_at = reactor.seconds()
        self.loaded_at = self.started_at
        self.metrics = Metrics(clock=reactor)
        # the log files first: they start before anything writes to them and stop (flushed) after
        self.receive_log, self.send_log, tracking_log = log_files(config, reactor)
        for log_file in (self.receive_log, self.send_log, tracking_log):
            if log_file is not None:
                log_file.setServiceParent(self)
        self.tracking = tracking = self.metrics.counting(NoTracking() if tracking_log is None else message_tracking.MessageTrackingLog(
            tracking_log, subjects=config.logs.message_tracking_log_subject_logging_enabled))
        self.intake = Intake()
        self.spool_service = SpoolService(config.server.spool_directory, config.server.spool_threads,
                                          config.server.delivery_threads, reactor, self.intake.submit)
        spool = self.spool_service.spool
        self.cleanup = Cleanup(spool, self.intake, reactor, quarantine_mailbox=config.server.quarantine_mailbox,
                               tracking=tracking, commit_seconds=self.metrics.commit.observe)
        self.triggers = Triggers()
        # back pressure: sampled from start-up, read by every session at MAIL FROM (through ServerContext)
        self.back_pressure = ResourceMonitor(config.back_pressure, reactor,
                                             spool_directory=config.server.spool_directory,
                                             queue_length=lambda: self.manager.message_count(),
                                             rss=lambda: rss_probe() + (self.workers.rss() if self.workers else 0),
                                             metrics=self.metrics)
        # every thread that checks passwords, whichever directory a reload names
        self.auth_pool = ThreadPoolService("exedge-auth", config.directory.auth_threads, reactor)
        parts = self._build(config)
        self.manager = QueueManager(spool, parts.router, parts.agents, clock=reactor, policy=config.queue,
                                    bouncer=Bouncer(self.cleanup, config.server.fqdn, spool.run_delivery, reactor,
                                                    tracking=tracking),
                                    route_policy=parts.pipeline if parts.pipeline.routes else None,
                                    intake=self.intake, triggers=self.triggers, tracking=tracking)
        self.metrics.watch_queues(self.manager)
        self.spool_service.setServiceParent(self)
        self.manager.setServiceParent(self)
        self.back_pressure.setServiceParent(self)      # its first sample before the listeners open
        self.auth_pool.setServiceParent(self)
        self.factory = SMTPFactory(parts.context)
        self.workers = None
        if config.server.receive_workers and config_path is None:
            log.warn("[server] receive_workers needs the server started from a file; receiving in one process")
        elif config.server.receive_workers:
            # stopped before the queue manager (their last commits are still announced), after the listeners
            self.workers = ReceiveWorkers(reactor, config.server.receive_workers, config_path,
                                          context=lambda: self.factory.context, factory=lambda: self.factory,
                                          intake=self.intake,
                                          queue_dir=spool.queue_dir, tracking=tracking,
                                          protocol_log=self.receive_log, metrics=self.metrics,
                                          recent=spool.recent, note_begun=spool.note_begun,
                                          announced_by_recovery=spool.announced_by_recovery,
                                          back_pressure=self.back_pressure)
            self.workers.setServiceParent(self)
        self.listeners: dict = {}            # Binding -> its listening service
        for binding in parts.context.connectors.listen_bindings():
            self._listener(binding, parts.context).setServiceParent(self)
        for service in parts.etrn:
            service.setServiceParent(self)
        self.parts = parts
        self.management = None
        if config.management.socket or config.management.listen is not None:
            self.management = ManagementService(config, reactor, self._api)
            self.management.setServiceParent(self)

    def startService(self) -> None:
        # before anything delivers: what a crash left between a drop file's write and its rename
        for c in self.config.send_connectors:
            if c.drop_directory:
                remove_abandoned(c.drop_directory)
        super().startService()

    # -- building ------------------------------------------------------------

    def _build(self, config: Config) -> _Parts:
        """Everything a configuration describes; ConfigError for what only files can tell."""
        reactor = self.reactor
        spool = self.spool_service.spool
        router = Router(config.accepted_domains, config.send_connectors)
        agents = {}
        mx = None
        secrets = load_secrets(config)      # every password file read now: a bad one stops start-up
        client_certificates = tls.send_client_certificates(config)
        for c in config.send_connectors:
            if c.drop_directory:
                agents[c.name] = DropDirectoryAgent(c, spool.run_delivery, defer_to=spool.receiving, clock=reactor)
                continue
            if mx is None:
                mx = mx_resolver(config, reactor)
            # smart hosts given by name are looked up like MX hosts, through [server].dns_servers
            agents[c.name] = RelayAgent(c, helo=c.fqdn or config.server.fqdn, run=spool.run_delivery,
                                        reactor=reactor, mx=None if c.smart_hosts else mx, resolver=mx,
                                        credentials=secrets.smart_hosts.get(c.name),
                                        client_certificate=client_certificates.get(c.name),
                                        protocol_log=self.send_log, metrics=self.metrics)
        # stages checked before anything listens
        pipeline = build_pipeline(config, reactor, pipeline_resolver(config, reactor), dequeue=self.triggers,
                                  metrics=self.metrics)
        portal = receive_portal(config, secrets, self.auth_pool.run)
        context = ServerContext(
            server=config.server,
            connectors=ConnectorTable(config.receive_connectors),
            router=router,
            cleanup=self.cleanup,
            clock=reactor,
            tls=tls.receive_contexts(config),      # certificates checked before anything listens
            portal=portal,
            client_ca=tls.client_ca_stores(config),
            pipeline=pipeline,
            metrics=self.metrics,
            protocol_log=self.receive_log,
            back_pressure=self.back_pressure,
        )
        etrn = tuple(EtrnClientService(e, helo=config.server.fqdn, reactor=reactor,
                                       credentials=secrets.etrn_clients.get(e.name)) for e in config.etrn_clients)
        return _Parts(config, router, agents, pipeline, context, etrn)

    def _listener(self, binding, context: ServerContext):
        backlog = context.connectors.listen_backlog(binding)
        if self.workers is not None:
            service = HandOffPort(self.reactor, binding, backlog, self.workers)
        else:
            service = listener_service(self.reactor, binding, backlog, self.factory)
        self.listeners[binding] = service
        return service

    @property
    def config(self) -> Config:
        return self.parts.config

    # -- reload ----------------------------------------------------------------

    def reload(self) -> dict:
        """
        Read the configuration file again and swap it in, or keep the
        running one and say why. Returns the report the endpoint shows
        (also logged); never raises.
        """
        if self.config_path is None:
            return {"reloaded": False, "problems": ["this server was not started from a file"]}
        try:
            config = load(self.config_path)
            parts = self._build(config)
        except ConfigError as e:
            for problem in e.problems:
                log.error("reload refused: {problem}", problem=str(problem))
            log.error("reload refused: {count} problem(s) in {path}; still running on the configuration "
                      "loaded before", count=len(e.problems), path=self.config_path)
            return {"reloaded": False, "problems": [str(p) for p in e.problems]}
        except Exception as e:       # a stage's constructor, a plugin that fails to import: nothing changed yet
            log.failure("reload refused: building the new configuration failed")
            return {"reloaded": False, "problems": [f"building the new configuration failed: {e}"]}
        old = self.parts
        wanted = set(parts.context.connectors.listen_bindings())
        added = [b for b in parts.context.connectors.listen_bindings() if b not in self.listeners]
        started = []
        for binding in added:
            service = self._listener(binding, parts.context)
            try:
                service.setServiceParent(self)      # binds now, the server running
            except Exception as e:
                log.error("reload refused: cannot listen on {binding}: {error}", binding=str(binding), error=e)
                for s in [service] + started:
                    self._drop_listener(s)
                return {"reloaded": False, "problems": [f"cannot listen on {binding}: {e}"]}
            started.append(service)
        removed = [b for b in self.listeners if b not in wanted]
        for binding in removed:
            self._drop_listener(self.listeners[binding])
        # the swap: new sessions and new routing from here on, in one turn of the reactor
        self.factory.context = parts.context
        rerouted = self.manager.reconfigure(parts.router, parts.agents, config.queue,
                                            route_policy=parts.pipeline if parts.pipeline.routes else None)
        for service in old.etrn:
            service.disownServiceParent()
        for service in parts.etrn:
            service.setServiceParent(self)
        self.parts = parts
        self.loaded_at = self.reactor.seconds()
        workers_told = self.workers.reload() if self.workers is not None else 0
        later = _needs_restart(old.config, config)
        for key in later:
            log.warn("reload: {key} changed; it takes effect at the next restart", key=key)
        report = {"reloaded": True, "listening_added": [str(b) for b in added],
                  "listening_removed": [str(b) for b in removed], "restart_needed_for": later, **rerouted}
        if self.workers is not None:
            report["receive_workers_told"] = workers_told
        log.info("reload: {path} loaded ({receive} receive, {send} send connector(s)); listening added: {added}; "
                 "removed: {removed}; {moved} queued item(s) routed again",
                 path=self.config_path, receive=len(config.receive_connectors), send=len(config.send_connectors),
                 added=", ".join(report["listening_added"]) or "none",
                 removed=", ".join(report["listening_removed"]) or "none", moved=rerouted["items_rerouted"])
        return report

    def _drop_listener(self, service) -> None:
        for binding, s in list(self.listeners.items()):
            if s is service:
                del self.listeners[binding]
        if service.parent is not None:
            service.disownServiceParent()

    # -- the management endpoint's view ------------------------------------------

    def _api(self, token):
        return ManagementAPI(self.manager, server_name=self.config.server.fqdn.split(".")[0], status=self.status,
                             reload=self.reload, metrics=self.metrics.render, page=viewer_page(), token=token)

    def status(self) -> dict:
        now = self.reactor.seconds()
        config = self.config
        listening = {str(b): bool(s.running) for b, s in self.listeners.items()}
        return {
            "version": __version__,
            "server": config.server.fqdn,
            "pid": os.getpid(),
            "started": _iso(self.started_at),
            "uptime_seconds": round(now - self.started_at, 3),
            "configuration": {"file": self.config_path, "loaded": _iso(self.loaded_at)},
            "receive_connectors": [
                {"name": c.name, "enabled": c.enabled, "bindings": [str(b) for b in c.bindings],
                 "listening": c.enabled and all(listening.get(str(b), False) for b in c.bindings),
                 "sessions": self.metrics.sessions_now(c.name)}
                for c in config.receive_connectors],
            "sessions": self.metrics.sessions_now(),
            **({"receive_workers": self.workers.status()} if self.workers is not None else {}),
            "send_connectors": [{"name": c.name, "enabled": c.enabled} for c in config.send_connectors],
            "spool": {"directory": config.server.spool_directory, **self.manager.summary(),
                      **self.spool_service.recovery_status()},
            "back_pressure": self.back_pressure.status(),
        }


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# what a reload cannot change in a running process: the spool, its threads, the endpoint itself
_RESTART_KEYS = (("server", "spool_directory"), ("server", "spool_threads"), ("server", "delivery_threads"),
                 ("server", "receive_workers"),
                 ("server", "fqdn"), ("server", "quarantine_mailbox"), ("directory", "auth_threads"),
                 ("management", None), ("logs", None), ("back_pressure", None))


def _needs_restart(old: Config, new: Config) -> list[str]:
    changed = []
    for section, key in _RESTART_KEYS:
        a, b = getattr(old, section), getattr(new, section)
        if key is None:
            if a != b:
                changed.append(f"[{section}]")
        elif getattr(a, key) != getattr(b, key):
            changed.append(f"{section}.{key}")
    return changed


def build_service(config: Config, reactor=None, config_path: str | None = None) -> ExedgeServer:
    return ExedgeServer(config, reactor, config_path)

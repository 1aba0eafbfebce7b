"""
The whole server as one C{MultiService} built from the configuration.

Children start in order: the spool (thread pool, then recovery of what a
previous run left), the queue manager (recovered messages go back into
their queues), then the listeners.

Every object gets what it works with in its constructor, in the order of
the flow (docs/architecture.md): the spool; the queue's intake, where
cleanup and recovery announce committed messages; cleanup; the bouncer
(which queues its reports through cleanup); the queue manager (with the
bouncer, the pipeline as its route policy, and the intake it takes from);
the listeners (with cleanup).
"""

from __future__ import annotations

import ipaddress

from twisted.application.service import MultiService, Service
from twisted.names import client
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from exedge import tls
from exedge.auth.credentials import CramMD5Checker, FileChecker, portal_for
from exedge.auth.directory import DirectoryChecker
from exedge.auth.secrets import load_secrets
from exedge.config import Config
from exedge.dequeue import Triggers
from exedge.dequeue.client import EtrnClientService
from exedge.pipeline import build_pipeline
from exedge.cleanup import Cleanup
from exedge.queue import QueueManager, Spool
from exedge.queue.intake import Intake
from exedge.receive import ConnectorTable, ServerContext, listener_services
from exedge.routing import Router
from exedge.dsn import Bouncer
from exedge.interfaces import NoTracking
from exedge.logs import CsvLog
from exedge.logs import protocol as protocol_log, tracking as message_tracking
from exedge.send import DropDirectoryAgent, RelayAgent
from exedge.queue.committer import ProcessCommitter
from exedge.send.mx import MXResolver

log = Logger()


class SpoolService(Service):
    """
    Owns the bounded thread pools that do all disk work (one for receiving,
    one for delivery), and recovery.
    """

    def __init__(self, directory: str, threads: int, delivery_threads: int, reactor, on_recovered):
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=threads, name="exedge-spool")
        self.delivery_pool = ThreadPool(minthreads=1, maxthreads=delivery_threads, name="exedge-delivery")
        self.spool = Spool(directory, lambda f: deferToThreadPool(reactor, self.pool, f),
                           lambda f: deferToThreadPool(reactor, self.delivery_pool, f), clock=reactor,
                           committer=lambda spool: ProcessCommitter(spool, reactor))
        self.on_recovered = on_recovered

    def startService(self) -> None:
        super().startService()
        self.pool.start()
        self.delivery_pool.start()
        # blocking on purpose: start-up, before any session is served
        messages = self.spool.recover()
        self.spool.receiving.start()
        log.info("spool {dir}: {count} message(s) recovered", dir=self.spool.directory, count=len(messages))
        for message in messages:
            self.on_recovered(message)

    def stopService(self):
        super().stopService()
        # the commit worker first: what it answers may still need the pools
        d = self.spool.receiving.stop()

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


def mx_resolver(config: Config, reactor) -> MXResolver:
    """
    MX lookups on [server].dns_servers alone when set (client.Resolver with
    servers only: createResolver would mix resolv.conf in, research §4),
    else the system's resolver configuration. "Ourselves", for loop
    detection, is every name and bound address of this server; smart-host
    addresses are the loopback addresses a route may lead to.
    """
    resolver = _dns_resolver(config, reactor)
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


def log_files(config: Config, reactor):
    """
    The log files of [logs]: (receive protocol log, send protocol log,
    message tracking) as L{CsvLog}s, each None when nothing would write
    it (no Verbose connector on that side; tracking disabled).
    """
    logs = config.logs

    def csv_log(kind: str, path: str, prefix: str, log_type: str, fields):
        return CsvLog(path, prefix, log_type, fields, clock=reactor, **logs.limits(kind))

    receive = send = tracking = None
    if any(c.protocol_logging_level == "Verbose" for c in config.receive_connectors):
        receive = csv_log("receive_protocol_log", logs.receive_protocol_log_path, "RECV",
                          protocol_log.RECEIVE_LOG_TYPE, protocol_log.FIELDS)
    if any(c.protocol_logging_level == "Verbose" for c in config.send_connectors):
        send = csv_log("send_protocol_log", logs.send_protocol_log_path, "SEND",
                       protocol_log.SEND_LOG_TYPE, protocol_log.FIELDS)
    if logs.message_tracking_log_enabled:
        tracking = csv_log("message_tracking_log", logs.message_tracking_log_path, message_tracking.PREFIX,
                           message_tracking.LOG_TYPE, message_tracking.FIELDS)
    return receive, send, tracking


def build_service(config: Config, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    top = MultiService()
    # the log files first: they start before anything writes to them and stop (flushed) after
    receive_log, send_log, tracking_log = log_files(config, reactor)
    for log_file in (receive_log, send_log, tracking_log):
        if log_file is not None:
            log_file.setServiceParent(top)
    tracking = NoTracking() if tracking_log is None else message_tracking.MessageTrackingLog(
        tracking_log, subjects=config.logs.message_tracking_log_subject_logging_enabled)
    router = Router(config.accepted_domains, config.send_connectors)
    intake = Intake()
    spool_service = SpoolService(config.server.spool_directory, config.server.spool_threads,
                                 config.server.delivery_threads, reactor, intake.submit)
    spool = spool_service.spool
    cleanup = Cleanup(spool, intake, reactor, quarantine_mailbox=config.server.quarantine_mailbox,
                      tracking=tracking)
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
                                    client_certificate=client_certificates.get(c.name), protocol_log=send_log)
    triggers = Triggers()
    # stages checked before anything listens
    pipeline = build_pipeline(config, reactor, _dns_resolver(config, reactor), dequeue=triggers)
    manager = QueueManager(spool, router, agents, clock=reactor, policy=config.queue,
                           bouncer=Bouncer(cleanup, config.server.fqdn, spool.run_delivery, reactor,
                                           tracking=tracking),
                           route_policy=pipeline if pipeline.routes else None, intake=intake, triggers=triggers,
                           tracking=tracking)
    spool_service.setServiceParent(top)
    manager.setServiceParent(top)
    portal = None
    checker = None
    if config.directory.credentials_file or config.directory.servers:
        auth_pool = ThreadPoolService("exedge-auth", config.directory.auth_threads, reactor)
        auth_pool.setServiceParent(top)
        if config.directory.servers:
            checker = DirectoryChecker(config.directory, auth_pool.run, secrets.directory_service)
        else:
            checker = FileChecker(config.directory.credentials_file, auth_pool.run)
    if checker is not None or secrets.cram_md5:
        portal = portal_for(checker, CramMD5Checker(secrets.cram_md5) if secrets.cram_md5 else None)
    context = ServerContext(
        server=config.server,
        connectors=ConnectorTable(config.receive_connectors),
        router=router,
        cleanup=cleanup,
        clock=reactor,
        tls=tls.receive_contexts(config),      # certificates checked before anything listens
        portal=portal,
        client_ca=tls.client_ca_stores(config),
        pipeline=pipeline,
        protocol_log=receive_log,
    )
    for service in listener_services(reactor, context):
        service.setServiceParent(top)
    for etrn in config.etrn_clients:
        EtrnClientService(etrn, helo=config.server.fqdn, reactor=reactor,
                          credentials=secrets.etrn_clients.get(etrn.name)).setServiceParent(top)
    return top

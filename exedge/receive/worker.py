"""
A receive worker process: C{python -m exedge.receive.worker CONFIG NUMBER}.

Started by the main process (L{exedge.receive.workers}, which explains the
design); runs SMTP sessions on connections the main process accepted and
handed over, the pipeline's SMTP hooks and cleanup, and commits through a
commit worker of its own. What it says to the main process goes on stdout
as frames; what it is told comes on stdin; the connections come on fd 3
(a C{SOCK_SEQPACKET} socket: one record per connection, its socket
attached); its twistd log lines go to stderr, one per line, escaped.

It exits when the main process says STOP, and also when the main
process is gone (stdin or the hand-out socket at end of file), so that a
main process killed with SIGKILL leaves no workers behind.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

import attrs
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger, globalLogBeginner
from twisted.python.threadpool import ThreadPool
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from exedge.children import Channel, StderrLog, to_json
from exedge.pressure import HIGH, NORMAL, ResourceMonitor
from exedge.receive.protocol import SMTPServer
from exedge.receive.workers import (ABANDONED, ACK, ADMITTED, COMMITTING, ENDED, HANDOUT, HELLO, METRICS,
                                    METRICS_INTERVAL, PRESSURE, PROTOCOL_ROW, QUEUED, RELOAD, RELOADED, STOP, TRACK,
                                    encode_event, encode_queued)

log = Logger()

HANDOUT_FD = 3


@attrs.frozen
class _Decided:
    """
    The connector table as a handed-out session sees it: the connector
    chosen here as in one process, but whether the session is admitted is
    the main process's verdict (it holds the counts of every worker).
    """

    table: object
    admitted: bool

    def select(self, local_host, local_port, peer_host):
        return self.table.select(local_host, local_port, peer_host)

    def admit(self, connector, peer_host) -> bool:
        return self.admitted

    def release(self, connector, peer_host) -> None:
        pass          # the main process releases when told the connection ended

    # Sessions in DATA are counted here, in this worker's own table: the main
    # process hears nothing between a session's start and end, and a round
    # trip at every DATA would cost what workers exist to save. With N
    # workers a connector may therefore have up to N x max_inbound_data_sessions
    # sessions in DATA (and N x the per-source limit), each bounded per worker.

    def admit_data(self, connector, peer_host, session=None) -> str | None:
        return self.table.admit_data(connector, peer_host, session)

    def release_data(self, connector, peer_host, session=None, finished: bool = False) -> None:
        self.table.release_data(connector, peer_host, session, finished)


@attrs.define
class _ToldLevel:
    """
    Back pressure as the main process measures it (it watches the spool,
    the queue and every process's memory) and tells this worker: what
    sessions here read at MAIL FROM, as they read the ResourceMonitor in
    one process. Normal until the main process first says otherwise.
    L{room} (SIZE= against free space) is read here, from the spool's file
    system as the main process would read it: C{monitor} is a
    ResourceMonitor that is never started, for its probe alone.
    """

    monitor: object
    level: int = NORMAL

    def room(self) -> int | None:
        return self.monitor.room()


@implementer(IReadDescriptor)
class _HandOffReader:
    """The hand-out socket: one record (connection id, verdict) with one socket attached, per connection."""

    def __init__(self, sock: socket.socket, worker: "ReceiveWorker"):
        self.socket = sock
        self.worker = worker

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return "hand-out"

    def doRead(self):
        for _ in range(64):
            try:
                data, fds, flags, _ = socket.recv_fds(self.socket, 64, 4)
            except BlockingIOError:
                return None
            except OSError as e:
                log.error("hand-out socket: {error}", error=e.strerror)
                return self.worker.main_gone()
            if not data and not fds:
                return self.worker.main_gone()
            if len(data) != HANDOUT.size or len(fds) != 1 or flags & socket.MSG_CTRUNC:
                log.error("hand-out socket: malformed record ({n} bytes, {m} descriptors)", n=len(data), m=len(fds))
                for fd in fds:
                    os.close(fd)
                continue
            conn_id, verdict = HANDOUT.unpack(data)
            self.worker.adopt(fds[0], conn_id, verdict)
        return None

    def connectionLost(self, reason) -> None:
        pass


class ReceiveWorker:
    def __init__(self, config_path: str, number: int, reactor):
        from exedge.config import load
        from exedge.metrics import Metrics

        self.config_path = config_path
        self.number = number
        self.reactor = reactor
        self.config = load(config_path)
        # this worker's own, reported to the main process every METRICS_INTERVAL (which counts sessions itself)
        self.metrics = Metrics(clock=reactor)
        self._metrics_loop = None
        self._metrics_sent = b""
        self.channel = Channel(self)
        self._acks: dict[str, defer.Deferred] = {}
        self._ended_ids: list[int] = []
        self._stopping = False
        self.back_pressure = _ToldLevel(ResourceMonitor(self.config.back_pressure, reactor,
                                                        spool_directory=self.config.server.spool_directory,
                                                        queue_length=lambda: 0))
        self._build_store()
        self.context = self._receive_context(self.config)

    # -- built once: the spool side ------------------------------------------------

    def _build_store(self) -> None:
        from exedge.cleanup import Cleanup
        from exedge.queue.committer import ProcessCommitter
        from exedge.queue.spool import Spool

        server = self.config.server
        reactor = self.reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=server.spool_threads, name="exedge-spool")
        self.auth_pool = ThreadPool(minthreads=0, maxthreads=self.config.directory.auth_threads, name="exedge-auth")

        def run(f):
            return deferToThreadPool(reactor, self.pool, f)

        self.spool = Spool(server.spool_directory, run, run, clock=reactor,
                           committer=lambda spool: AnnouncingCommitter(ProcessCommitter(spool, reactor), self))
        self.cleanup = Cleanup(self.spool, _NoSink(), reactor, quarantine_mailbox=server.quarantine_mailbox,
                               tracking=_ForwardedTracking(self.channel), commit_seconds=self.metrics.commit.observe)

    # -- built from the configuration, again at a reload -----------------------------------

    def _receive_context(self, config):
        from exedge import tls
        from exedge.auth.secrets import load_secrets
        from exedge.dequeue import Triggers
        from exedge.pipeline import build_pipeline
        from exedge.receive import ConnectorTable, ServerContext
        from exedge.routing import Router
        from exedge.service import pipeline_resolver, receive_portal

        reactor = self.reactor
        secrets = load_secrets(config)
        # ETRN/ATRN need the queue, which is the main process's: sessions of connectors with such a
        # stage stay there (ReceiveWorkers._run_here), so this door, never served, is never asked
        pipeline = build_pipeline(config, reactor, pipeline_resolver(config, reactor), dequeue=Triggers(),
                                  metrics=self.metrics)
        return ServerContext(
            server=config.server,
            connectors=ConnectorTable(config.receive_connectors),
            router=Router(config.accepted_domains, config.send_connectors),
            cleanup=self.cleanup,
            clock=reactor,
            tls=tls.receive_contexts(config),
            portal=receive_portal(config, secrets, lambda f: deferToThreadPool(reactor, self.auth_pool, f)),
            client_ca=tls.client_ca_stores(config),
            pipeline=pipeline,
            metrics=self.metrics,
            protocol_log=_ForwardedRows(self.channel),
            back_pressure=self.back_pressure,
        )

    def reload(self) -> None:
        from exedge.config import ConfigError, load

        try:
            config = load(self.config_path)
            context = self._receive_context(config)
        except ConfigError as e:
            return self.channel.send(RELOADED, to_json({"reloaded": False, "problems": [str(p) for p in e.problems]}))
        except Exception as e:
            log.failure("reload: building the new configuration failed")
            return self.channel.send(RELOADED, to_json({"reloaded": False, "problems": [str(e)]}))
        self.config, self.context = config, context
        self.channel.send(RELOADED, to_json({"reloaded": True}))

    # -- running -------------------------------------------------------------------------

    def start(self) -> None:
        import signal

        from twisted.internet import stdio

        # a service manager's SIGTERM and Ctrl-C reach the whole process group (replacing the
        # reactor's handlers, which are needed for SIGCHLD): the main process says when to stop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

        self.pool.start()
        self.auth_pool.start()
        self.spool.receiving.start()
        stdio.StandardIO(self.channel, reactor=self.reactor)
        sock = socket.socket(fileno=HANDOUT_FD)
        sock.setblocking(False)
        self.reader = _HandOffReader(sock, self)
        self.reactor.addReader(self.reader)
        self.reactor.addSystemEventTrigger("before", "shutdown", self._stop)
        self.channel.send(HELLO, to_json({"pid": os.getpid()}))
        self._metrics_loop = task.LoopingCall(self._report_metrics)
        self._metrics_loop.clock = self.reactor
        self._metrics_loop.start(METRICS_INTERVAL, now=False)

    def _report_metrics(self) -> None:
        """What this worker counted (TLS, AUTH, refusals, pipeline, commits), when it changed: /metrics adds it up."""
        payload = to_json(self.metrics.snapshot())
        if payload != self._metrics_sent:
            self._metrics_sent = payload
            self.channel.send(METRICS, payload)

    def adopt(self, fd: int, conn_id: int, verdict: int) -> None:
        try:
            with socket.socket(fileno=os.dup(fd)) as probe:
                family = probe.family
            context = attrs.evolve(self.context, connectors=_Decided(self.context.connectors, verdict == ADMITTED))
            factory = _OneSession(context, conn_id, self.session_ended)
            self.reactor.adoptStreamConnection(fd, family, factory)
        except OSError as e:
            # gone before we could take it: the main process still counts it until told
            log.info("handed-out connection {id} gone before its session began: {error}", id=conn_id, error=e)
            self.session_ended(conn_id)
        finally:
            os.close(fd)      # adoptStreamConnection made its own copy

    def session_ended(self, conn_id: int) -> None:
        """Batched: every session that ended in this turn of the reactor in one frame."""
        if not self._ended_ids:
            self.reactor.callLater(0, self._send_ended)
        self._ended_ids.append(conn_id)

    def _send_ended(self) -> None:
        ids, self._ended_ids = self._ended_ids, []
        self.channel.send(ENDED, b"".join(struct.pack("!I", i) for i in ids))

    def announce(self, stored) -> defer.Deferred:
        """The main process queues it; fires once it says so (the 250 waits for this)."""
        d = self._acks[stored.queue_id] = defer.Deferred()
        self.channel.send(QUEUED, encode_queued(stored.queue_id, stored.data_length, stored.envelope,
                                                stored.in_memory()))
        self.spool.recent.release(stored.queue_id)     # delivered by the main process: not kept here
        return d

    def told(self, kind: int, payload: bytes) -> None:
        if kind == ACK:
            d = self._acks.pop(payload.decode("ascii", "replace"), None)
            if d is not None:
                d.callback(None)
        elif kind == PRESSURE:
            if len(payload) == 1 and payload[0] <= HIGH:
                self.back_pressure.level = payload[0]
            else:
                log.error("a back pressure level out of range from the main process")
        elif kind == RELOAD:
            self.reload()
        elif kind == STOP:
            self.shut_down()
        else:
            log.error("unknown frame {kind!r} from the main process", kind=bytes([kind]))

    def main_gone(self) -> None:
        if not self._stopping:
            log.warn("the main process is gone; stopping")
        self.shut_down()

    def shut_down(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if getattr(self, "reader", None) is not None:
            self.reactor.removeReader(self.reader)
        self.reactor.stop()

    def _stop(self):
        """Before the reactor stops: commits in flight are answered (and announced), then the threads go."""
        self._stopping = True
        if self._metrics_loop is not None and self._metrics_loop.running:
            self._metrics_loop.stop()
            self._report_metrics()          # the last counts, while the main process still reads
        d = self.spool.receiving.stop()

        def threads(result):
            self.pool.stop()
            self.auth_pool.stop()
            # announcements the main process will never answer: the messages are on disk
            acks, self._acks = self._acks, {}
            for ack in acks.values():
                ack.callback(None)
            return result

        return d.addBoth(threads)


class _HandedSession(SMTPServer):
    """A session on a handed-out connection: the main process hears when it ends."""

    def __init__(self, context, conn_id: int, ended):
        super().__init__(context)
        self.conn_id = conn_id
        self._ended = ended

    def connectionLost(self, reason=None) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self._ended(self.conn_id)


class _OneSession(protocol.ServerFactory):
    """The factory of one adopted connection: its context says what the main process decided."""

    def __init__(self, context, conn_id: int, ended):
        self.context = context
        self.conn_id = conn_id
        self.ended = ended

    def buildProtocol(self, addr):
        p = _HandedSession(self.context, self.conn_id, self.ended)
        p.factory = self
        return p


class AnnouncingCommitter:
    """
    The spool's committer in a worker: durable through the commit worker,
    then known to the main process's queue, and only then done (so the 250
    says both). Otherwise L{ProcessCommitter} as it is.
    """

    def __init__(self, inner, worker: ReceiveWorker):
        self.inner = inner
        self.worker = worker

    @property
    def busy(self) -> bool:
        return self.inner.busy

    def on_idle(self, listener) -> None:
        self.inner.on_idle(listener)

    def start(self) -> None:
        self.inner.start()

    def stop(self) -> defer.Deferred:
        return self.inner.stop()

    def submit(self, request) -> defer.Deferred:
        channel = self.worker.channel
        # named first: if this process dies before announcing it, the main process removes it
        channel.send(COMMITTING, request.queue_id.encode("ascii"))

        def failed(failure):
            channel.send(ABANDONED, request.queue_id.encode("ascii"))    # not committed: nothing to remove
            return failure

        return self.inner.submit(request).addCallbacks(
            lambda stored: self.worker.announce(stored).addCallback(lambda _: stored), failed)


class _NoSink:
    """Cleanup's sink in a worker: the committer has announced the message already."""

    def submit(self, message) -> None:
        pass


class _ForwardedTracking:
    """Message tracking events go to the main process, which writes the one log and counts them."""

    def __init__(self, channel: Channel):
        self.channel = channel

    def track(self, event) -> None:
        try:
            self.channel.send(TRACK, encode_event(event))
        except Exception:
            log.failure("message tracking: event {event_id} not sent", event_id=event.event_id)


class _ForwardedRows:
    """The receive protocol log's rows go to the main process, which writes the one file."""

    def __init__(self, channel: Channel):
        self.channel = channel

    def write(self, values) -> None:
        self.channel.send(PROTOCOL_ROW, to_json([("" if v is None else v if isinstance(v, (int, float)) else str(v))
                                               for v in values]))


def main(argv) -> int:
    import signal

    from twisted.internet import reactor

    from exedge.config import ConfigError

    signal.signal(signal.SIGINT, signal.SIG_IGN)     # until the reactor runs: see ReceiveWorker.start
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    observer = StderrLog(reactor)
    reactor.addSystemEventTrigger("after", "shutdown", observer.flush)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    sys.stdout = sys.stderr          # stdout carries frames: nothing else may print there
    config_path, number = argv[1], int(argv[2])
    from exedge.logs.protocol import reserve_session_ids
    reserve_session_ids(number + 1)
    try:
        worker = ReceiveWorker(config_path, number, reactor)
    except ConfigError as e:
        for problem in e.problems:
            log.error("{problem}", problem=str(problem))
        return 1
    reactor.callWhenRunning(worker.start)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

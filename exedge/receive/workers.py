"""
Receive worker processes: the main process's side ([server] receive_workers).

With C{receive_workers = N > 0} the SMTP sessions, the pipeline's SMTP
hooks and cleanup run in N child processes (L{exedge.receive.worker}),
Haraka's cluster mode and the usual Twisted pattern, so that receiving
uses more than one core. The main process keeps what must be one: the
listening sockets, the connection limits, the queue and delivery, bounces,
the management endpoint, the log files and reload.

How a connection travels. The main process binds every binding as before
(in C{privilegedStartService}), accepts each connection itself
(L{HandOffPort}), chooses its receive connector and counts it against the
connector's limits (L{ConnectorTable.admit}: the one table, so
C{max_inbound_connection} and C{max_inbound_connection_per_source} hold
across workers without shared counters; the sessions in DATA,
C{max_inbound_data_sessions} and its per-source twin, are counted in each
worker, per process), and passes the socket with its
verdict to the worker with the fewest sessions over a C{SOCK_SEQPACKET}
UNIX socket (C{SCM_RIGHTS}). The worker adopts it
(C{reactor.adoptStreamConnection}) and runs the session as it would have
in one process (except for connectors with a stage that asks the queue,
ETRN and ATRN: the main process runs their sessions itself, since the queue
is there): it greets, or answers the 421/554 of a refusal, so the
protocol log and the replies are the same in both modes. When the
connection closes the worker says so and the main process releases the
count. Why hand out sockets rather than let the workers accept from a
shared listening socket (C{adoptStreamPort}): the limits are then decided
where the counts are, at once, with no round trip before the banner and no
counters shared between processes; a reload changes bindings in the main
process alone; a worker started to replace a dead one needs no sockets;
and the main process can give each connection to the least busy worker
instead of whichever wins the race for C{accept}.

Why the accepting is written here rather than done by C{tcp.Port}: a
Twisted transport cannot let go of its socket without ending the TCP
connection (its close calls C{shutdown(2)}, its abort sets C{SO_LINGER}
to zero on the socket that the worker now shares), so the main process
accepts with the standard library in a small reader on the reactor and
never builds a transport for a handed-out connection. The hand-out is a
single non-blocking C{sendmsg} of one record; the main process closes its
copy as soon as the kernel holds the worker's.

Nothing acknowledged is lost. Each worker commits through its own commit
worker (L{exedge.queue.committer.ProcessCommitter}: durable before
anything is said), then announces the message to the main process (its
queue id, length and envelope, so nothing is read back from disk) and
answers 250 only once the main process has answered that it has queued
it. A worker killed at any moment therefore leaves no acknowledged message
that the queue does not know. Before each commit the worker names it to
the main process; a worker that dies between that and the announcement
had acknowledged none of those, and the main process removes their files
(as L{ProcessCommitter} does when its commit worker dies), so that they
are not delivered after the next restart beside the copy the client sends
again. (Left: a commit its commit worker finishes in the few milliseconds
after the worker's death, and a large message being spilled to
C{incoming/}: the next start delivers the one, removes the other.) A
worker that dies is started again (at most once per
C{restart_interval}); its sessions are released from the counts.

What the main process still learns from the workers, over the worker's
stdout (frames: a kind byte and a length, then the payload): the sessions
that ended, the messages committed, message tracking events (written to
the one tracking log, and counted by the metrics as before), protocol log
rows of Verbose connectors (written to the one protocol log), and the
answer to a reload. The worker's own twistd log lines come on its stderr
and are logged here. The session gauges, connection counts and received
messages in the metrics are counted here, so they stay the server's;
back pressure is sampled here (the memory watched is this process's and
the workers') and its level sent to every worker as it changes, so their
sessions refuse MAIL FROM as one process would. What only the sessions
see (pipeline verdicts and latencies, TLS and AUTH counts, refusals for
back pressure and DATA limits, commit latency) each worker counts in its
own registry and reports every METRICS_INTERVAL when it changed (its
cumulative samples, so a lost report costs nothing but freshness); the
main process's /metrics adds every worker's last report to its own
counts, and keeps what a worker that ended had reported (a counter never
goes back; a worker killed with SIGKILL loses at most its last interval).
Reload: the main process checks
and swaps its configuration as before and then tells every worker, which
reads the file again and rebuilds its receive side (the context of new
sessions). A worker started later reads the file as it is then.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import struct
import sys

import attrs
from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from zope.interface import implementer
from twisted.internet.interfaces import IReadDescriptor

from exedge.children import ChildLog, frame, take_control_frames
from exedge.interfaces import TrackingEvent
from exedge.queue.envelope import Envelope

log = Logger()

# -- the wire ---------------------------------------------------------------------

# a connection handed out: the main process's id for it and the verdict, with the socket (SCM_RIGHTS)
HANDOUT = struct.Struct("!IB")
ADMITTED, LIMIT_REACHED, NO_CONNECTOR = 0, 1, 2
# control frames (worker's stdout, worker's stdin): exedge.children's frames
HELLO, COMMITTING, ABANDONED, QUEUED, ENDED, TRACK, PROTOCOL_ROW, RELOADED, METRICS = b"HCFQETPrM"
ACK, RELOAD, STOP, PRESSURE = b"ARSL"

QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,64}")
RESTART_INTERVAL = 1.0
STOP_TIMEOUT = 15.0
ACCEPTS_PER_READ = 64
METRICS_INTERVAL = 2.0   # seconds between a worker's metrics reports (when they changed)


def remove_unannounced(queue_ids, incoming_dir: str, queue_dir: str) -> None:
    """
    Delete what a dead receive worker's commit worker was committing for
    C{queue_ids}. That commit worker outlives its parent and may still be
    publishing (renaming C{incoming/<id>} into C{queue/}): C{incoming/}
    goes first, so a rename still to come fails, and one already done
    is undone by the unlink in C{queue/}. The other order left a window
    between the two unlinks for a rename to publish what nobody
    acknowledged.
    """
    for queue_id in queue_ids:
        for directory in (incoming_dir, queue_dir):
            try:
                os.unlink(os.path.join(directory, queue_id))
            except FileNotFoundError:
                pass


# a message's data up to this size travels with its announcement, so that its first delivery
# need not read back from disk what was just written (the spool's RecentData, as in one process)
DATA_WITH_ANNOUNCEMENT = 64 * 1024


def encode_queued(queue_id: str, length: int, envelope: Envelope, data: bytes | None = None) -> bytes:
    """queue id, length, envelope length, then the envelope JSON and the data (or nothing)."""
    meta = envelope.to_json()
    data = data if data is not None and len(data) == length and length <= DATA_WITH_ANNOUNCEMENT else b""
    return b"%s %d %d\n%s%s" % (queue_id.encode("ascii"), length, len(meta), meta, data)


def decode_queued(payload: bytes) -> tuple[str, int, Envelope, bytes | None]:
    head, rest = payload.split(b"\n", 1)
    queue_id, length, meta_length = head.decode("ascii").split(" ")
    if not QUEUE_ID.fullmatch(queue_id):
        raise ValueError(f"not a queue id: {queue_id!r}")
    length, meta_length = int(length), int(meta_length)
    if length < 0 or not 0 <= meta_length <= len(rest):
        raise ValueError("lengths out of range")
    data = rest[meta_length:]
    if data and len(data) != length:
        raise ValueError("data of the wrong length")
    return queue_id, length, Envelope.from_json(rest[:meta_length]), data or None


_EVENT_FIELDS = {f.name for f in attrs.fields(TrackingEvent)}


def encode_event(event: TrackingEvent) -> bytes:
    return json.dumps(attrs.asdict(event, recurse=False), separators=(",", ":")).encode("utf-8")


def decode_event(payload: bytes) -> TrackingEvent:
    data = json.loads(payload)
    if not isinstance(data, dict) or not set(data) <= _EVENT_FIELDS:
        raise ValueError("not a tracking event")
    return TrackingEvent(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# -- accepting -----------------------------------------------------------------------

@implementer(IReadDescriptor)
class _Acceptor:
    """The listening socket on the reactor: accepts and hands out (see the module's docstring for why not tcp.Port)."""

    def __init__(self, sock: socket.socket, hand_out, name: str):
        self.socket = sock
        self.hand_out = hand_out
        self.name = name

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return self.name

    def doRead(self):
        for _ in range(ACCEPTS_PER_READ):
            try:
                conn, _ = self.socket.accept()
            except BlockingIOError:
                return None
            except OSError as e:
                if e.errno == errno.ECONNABORTED:
                    continue
                # EMFILE, ENFILE, ENOBUFS: the connection waits in the backlog for the next turn
                log.error("{name}: accept failed: {error}", name=self.name, error=e.strerror)
                return None
            try:
                self.hand_out(conn)
            except Exception:
                log.failure("{name}: handing out a connection failed", name=self.name)
            finally:
                conn.close()
        return None

    def connectionLost(self, reason) -> None:
        pass


class HandOffPort(Service):
    """
    One binding's listening socket in the main process: bound in
    C{privilegedStartService} (port 25 before twistd drops privileges; a
    port that cannot be bound raises, as the single-process listener
    does), accepting while at least one worker is ready; until then
    connections wait in the listen backlog rather than being refused.
    """

    def __init__(self, reactor, binding, backlog: int, workers: "ReceiveWorkers"):
        self.reactor = reactor
        self.binding = binding
        self.backlog = backlog
        self.workers = workers
        self.setName(f"smtp {binding}")
        self._socket: socket.socket | None = None
        self._acceptor: _Acceptor | None = None
        self._reading = False

    def privilegedStartService(self) -> None:
        family = socket.AF_INET6 if self.binding.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.binding.host, self.binding.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self._acceptor = _Acceptor(sock, self.workers.hand_out, f"smtp {self.binding}")
        super().privilegedStartService()

    def startService(self) -> None:
        if self._socket is None:
            self.privilegedStartService()
        super().startService()
        self.workers.watch_ready(self._ready_changed)

    def _ready_changed(self, ready: bool) -> None:
        if self._acceptor is None or not self.running:
            return
        if ready and not self._reading:
            self.reactor.addReader(self._acceptor)
        elif not ready and self._reading:
            self.reactor.removeReader(self._acceptor)
        self._reading = ready

    def stopService(self):
        super().stopService()
        self.workers.unwatch_ready(self._ready_changed)
        if self._reading:
            self.reactor.removeReader(self._acceptor)
            self._reading = False
        if self._socket is not None:
            self._socket.close()
            self._socket = None
            self._acceptor = None


# -- the workers ------------------------------------------------------------------

@attrs.define(eq=False)
class _Handed:
    """A connection given to a worker and counted against its connector's limits."""

    worker: "_Worker"
    table: object                 # the ConnectorTable that counted it (a reload makes a new one)
    connector: object
    peer: str


class _Worker(protocol.ProcessProtocol):
    """One receive worker process, as the main process sees it."""

    def __init__(self, owner: "ReceiveWorkers", number: int, channel: socket.socket):
        self.owner = owner
        self.number = number
        self.channel = channel              # our end of the hand-out socket
        self.buffer = bytearray()
        self.errors = ChildLog(f"receive worker {number}", n=number)
        self.ready = False
        self.sessions = 0
        self.committing: set[str] = set()   # queue ids sent to its commit worker and not yet announced
        self.pid = None
        self.started_at = 0.0
        self.ended = defer.Deferred()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 2:
            return self.errors.feed(data)      # its log lines
        self.buffer += data
        try:
            frames = take_control_frames(self.buffer)
        except ValueError as e:
            log.error("receive worker {n}: {error}; stopping it", n=self.number, error=e)
            self.buffer.clear()
            return self.kill()
        for kind, payload in frames:
            try:
                self.owner._frame(self, kind, payload)
            except Exception:
                log.failure("receive worker {n}: frame {kind!r} not understood", n=self.number, kind=bytes([kind]))

    def send(self, kind: int, payload: bytes = b"") -> None:
        if self.transport is not None:
            self.transport.write(frame(kind, payload))

    def hand_out(self, conn: socket.socket, conn_id: int, verdict: int) -> bool:
        """The socket to this worker; False if it cannot take it now (gone, or not reading)."""
        if self.channel is None:
            return False
        try:
            socket.send_fds(self.channel, [HANDOUT.pack(conn_id, verdict)], [conn.fileno()])
            return True
        except OSError as e:
            log.warn("receive worker {n} does not take connections: {error}", n=self.number, error=e.strerror)
            return False

    def kill(self) -> None:
        try:
            self.transport.signalProcess(signal.SIGKILL)
        except (error.ProcessExitedAlready, AttributeError):
            pass

    def processEnded(self, reason) -> None:
        self.errors.flush()
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.owner._ended(self, reason)
        self.ended.callback(None)


class ReceiveWorkers(Service):
    """
    N receive worker processes, kept running. C{context()} is the running
    receive side (L{ServerContext}) whose connector table chooses and
    counts each connection; C{intake} takes the messages the workers
    commit; C{tracking} and C{protocol_log} are the main process's
    (an L{IMessageTracking}, and the receive protocol log's L{CsvLog});
    C{metrics} counts sessions; C{factory()} is this process's
    SMTPFactory, for the sessions that stay here (ETRN, ATRN).
    """

    def __init__(self, reactor, count: int, config_path: str, *, context, factory, intake, queue_dir: str,
                 tracking, protocol_log, metrics, recent=None, note_begun=None, announced_by_recovery=None,
                 back_pressure=None, python: str = sys.executable,
                 module: str = "exedge.receive.worker", restart_interval: float = RESTART_INTERVAL):
        self.reactor = reactor
        self.count = count
        self.config_path = config_path
        self.context = context
        self.factory = factory      # this process's SMTPFactory, for sessions that stay here (_run_here)
        self.intake = intake
        self.queue_dir = queue_dir
        self.recent = recent        # the spool's RecentData: small messages' data, for their first delivery
        # the spool's Spool.note_begun: a worker's commit is announced by the worker, never by recovery too
        self.note_begun = note_begun or (lambda queue_id: None)
        # Spool.announced_by_recovery: recovery read a worker's file before its name arrived
        self.announced_by_recovery = announced_by_recovery or (lambda queue_id: False)
        self.incoming_dir = os.path.join(os.path.dirname(queue_dir), "incoming")
        self.tracking = tracking
        self.protocol_log = protocol_log
        self.metrics = metrics
        # the main process's ResourceMonitor: its level is sent to every worker, at its HELLO and on each change
        self.back_pressure = back_pressure
        if back_pressure is not None:
            back_pressure.subscribe(self._pressure_changed)
        self.python = python
        self.module = module
        self.restart_interval = restart_interval
        self.workers: list[_Worker | None] = [None] * count
        self._handed: dict[int, _Handed] = {}
        self._next_id = 0
        self._watchers: list = []
        self._restarts: dict[int, object] = {}
        self._stopping = False
        self._was_ready = False
        self._stored = None         # StoredMessage, imported lazily with the spool

    # -- the processes -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        for n in range(self.count):
            self._spawn(n)

    def _spawn(self, number: int) -> None:
        self._restarts.pop(number, None)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        worker = _Worker(self, number, ours)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        try:
            self.reactor.spawnProcess(worker, self.python,
                                      [self.python, "-m", self.module, self.config_path, str(number)],
                                      env=env, childFDs={0: "w", 1: "r", 2: "r", 3: theirs.fileno()})
        except Exception:
            ours.close()
            log.failure("receive worker {n} could not be started", n=number)
            self._restart_later(number)
            return
        finally:
            theirs.close()
        worker.started_at = self.reactor.seconds()
        self.workers[number] = worker

    def _restart_later(self, number: int, started_at: float | None = None) -> None:
        """Start it again, no sooner than restart_interval after its last start (a worker that cannot start)."""
        last = self.reactor.seconds() if started_at is None else started_at
        delay = max(0.0, last + self.restart_interval - self.reactor.seconds())
        self._restarts[number] = self.reactor.callLater(delay, self._spawn, number)

    def _ended(self, worker: _Worker, reason) -> None:
        if self.workers[worker.number] is worker:
            self.workers[worker.number] = None
        self.metrics.worker_gone(worker.pid)
        # Its commits that were never announced were never acknowledged: a copy
        # left in queue/ would be delivered after the next restart next to the
        # one the client sends again (as ProcessCommitter does for its worker).
        # Here and now, not on a thread: a few unlinks, on a path that means a crash.
        remove_unannounced(worker.committing, self.incoming_dir, self.queue_dir)
        if worker.committing:
            log.warn("receive worker {n}: {count} unacknowledged commit(s) removed", n=worker.number,
                     count=len(worker.committing))
        lost = [cid for cid, h in self._handed.items() if h.worker is worker]
        for cid in lost:
            self._release(cid)
        if self._stopping:
            return
        log.error("receive worker {n} (pid {pid}) exited ({reason}); {count} session(s) lost; starting it again",
                  n=worker.number, pid=worker.pid, reason=reason.getErrorMessage(), count=len(lost))
        self._notify_ready()
        self._restart_later(worker.number, worker.started_at)

    def stopService(self):
        super().stopService()
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        waits = []
        for worker in self.workers:
            if worker is None:
                continue
            worker.ready = False
            # STOP, not a closed stdin: the worker's last commits still want our answer
            worker.send(STOP)
            timer = self.reactor.callLater(STOP_TIMEOUT, worker.kill)
            waits.append(worker.ended.addBoth(lambda _, t=timer: t.active() and t.cancel()))
        self._notify_ready()
        return defer.gatherResults(waits)

    def status(self) -> list[dict]:
        return [{"number": n, "pid": w.pid if w else None, "ready": bool(w and w.ready),
                 "sessions": w.sessions if w else 0} for n, w in enumerate(self.workers)]

    # -- readiness: the listeners accept while some worker can take a connection ----------

    @property
    def ready(self) -> bool:
        return any(w is not None and w.ready for w in self.workers)

    def watch_ready(self, callback) -> None:
        self._watchers.append(callback)
        callback(self.ready)

    def unwatch_ready(self, callback) -> None:
        if callback in self._watchers:
            self._watchers.remove(callback)

    def _notify_ready(self) -> None:
        ready = self.ready and not self._stopping
        for callback in list(self._watchers):
            callback(ready)

    # -- connections --------------------------------------------------------------------

    def hand_out(self, conn: socket.socket) -> None:
        """
        A connection just accepted: choose its connector, count it, give it
        to the least busy worker with the verdict. The caller closes C{conn}.
        """
        conn.setblocking(False)      # the worker's copy too: Twisted adopts non-blocking sockets
        try:
            local, peer = conn.getsockname(), conn.getpeername()
        except OSError:
            return                   # already gone
        context = self.context()
        table = context.connectors
        connector = table.select(local[0], local[1], peer[0])
        if connector is not None and context.pipeline is not None and context.pipeline.needs_queue(connector.name):
            return self._run_here(conn, local)
        verdict = NO_CONNECTOR
        if connector is not None:
            verdict = ADMITTED if table.admit(connector, peer[0]) else LIMIT_REACHED
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        conn_id = self._next_id
        candidates = sorted((w for w in self.workers if w is not None and w.ready), key=lambda w: w.sessions)
        for worker in candidates:
            if worker.hand_out(conn, conn_id, verdict):
                if verdict == ADMITTED:
                    self._handed[conn_id] = _Handed(worker, table, connector, peer[0])
                    worker.sessions += 1
                    self.metrics.session_opened(connector.name)
                return
        # no worker took it: refused here, as a full server refuses
        if verdict == ADMITTED:
            table.release(connector, peer[0])
        try:
            conn.send(b"421 4.3.2 Service not available, no receive worker running; try again later\r\n")
        except OSError:
            pass

    def _run_here(self, conn: socket.socket, local) -> None:
        """
        A session of a connector whose stages ask the queue (ETRN, ATRN):
        run by this process's own factory, as with no workers, since the
        queue is here (an ATRN session even turns into a delivery from it).
        The factory counts the connection in the same connector table.
        """
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        try:
            self.reactor.adoptStreamConnection(conn.fileno(), family, self.factory())
        except OSError as e:
            log.info("a connection was gone before its session began: {error}", error=e)

    def _release(self, conn_id: int) -> None:
        handed = self._handed.pop(conn_id, None)
        if handed is None:
            return
        handed.table.release(handed.connector, handed.peer)
        handed.worker.sessions -= 1
        self.metrics.session_closed(handed.connector.name)

    # -- what the workers say ----------------------------------------------------------------

    def _frame(self, worker: _Worker, kind: int, payload: bytes) -> None:
        if kind == COMMITTING or kind == ABANDONED:
            queue_id = payload.decode("ascii")
            if not QUEUE_ID.fullmatch(queue_id):
                raise ValueError(f"not a queue id: {queue_id!r}")
            if kind == COMMITTING:
                self.note_begun(queue_id)
                worker.committing.add(queue_id)
            else:
                worker.committing.discard(queue_id)
        elif kind == QUEUED:
            self._queued(worker, payload)
        elif kind == ENDED:
            for (conn_id,) in struct.iter_unpack("!I", payload[:len(payload) - len(payload) % 4]):
                handed = self._handed.get(conn_id)
                if handed is not None and handed.worker is worker:
                    self._release(conn_id)
        elif kind == TRACK:
            self.tracking.track(decode_event(payload))
        elif kind == PROTOCOL_ROW:
            row = json.loads(payload)
            if isinstance(row, list):
                self.protocol_log.write(row)
        elif kind == METRICS:
            try:
                self.metrics.worker_reported(worker.pid, json.loads(payload))
            except (ValueError, TypeError) as e:
                log.error("receive worker {n}: unreadable metrics ({error})", n=worker.number, error=e)
        elif kind == HELLO:
            worker.ready = True
            log.info("receive worker {n} (pid {pid}) ready", n=worker.number, pid=worker.pid)
            if self.back_pressure is not None:
                worker.send(PRESSURE, bytes([self.back_pressure.level]))
            self._notify_ready()
        elif kind == RELOADED:
            report = json.loads(payload)
            if report.get("reloaded"):
                log.info("receive worker {n}: configuration reloaded", n=worker.number)
            else:
                log.error("receive worker {n}: reload refused: {problems}", n=worker.number,
                          problems="; ".join(map(str, report.get("problems", []))))
        else:
            log.error("receive worker {n}: unknown frame {kind!r}", n=worker.number, kind=bytes([kind]))

    def _queued(self, worker: _Worker, payload: bytes) -> None:
        """A message the worker has made durable: into the queue, then the worker's answer (its 250 waits for it)."""
        if self._stored is None:
            from exedge.queue.spool import StoredMessage
            self._stored = StoredMessage
        try:
            queue_id, length, envelope, data = decode_queued(payload)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            log.error("receive worker {n}: unreadable announcement ({error}); the message waits in the spool "
                      "for a restart", n=worker.number, error=e)
            return
        worker.committing.discard(queue_id)
        if self.announced_by_recovery(queue_id):
            worker.send(ACK, queue_id.encode("ascii"))     # queued already, by start-up recovery
            return
        try:
            held = self.recent.hold(queue_id, data) if data is not None and self.recent is not None else None
            self.intake.submit(self._stored(queue_id, envelope, os.path.join(self.queue_dir, queue_id), length,
                                            held=held))
        except Exception:
            # on disk, so acknowledged: start-up recovery queues it
            log.failure("queueing {queue_id} failed; it waits in the spool for a restart", queue_id=queue_id)
        worker.send(ACK, queue_id.encode("ascii"))

    # -- back pressure ----------------------------------------------------------------------

    def _pressure_changed(self, level: int) -> None:
        """The server level changed: every running worker's sessions answer MAIL FROM by it from now on."""
        for worker in self.workers:
            if worker is not None and worker.ready:
                worker.send(PRESSURE, bytes([level]))

    def rss(self) -> int:
        """The workers' resident memory in bytes (back pressure watches the server's processes, not only this one)."""
        from exedge.pressure import rss_of
        total = 0
        for worker in self.workers:
            if worker is not None and worker.pid is not None:
                try:
                    total += rss_of(worker.pid)
                except (OSError, ValueError, IndexError):
                    pass        # gone between the look and the read: it holds nothing now
        return total

    # -- reload ----------------------------------------------------------------------------

    def reload(self) -> int:
        """Tell every running worker to read the configuration again; how many were told."""
        told = 0
        for worker in self.workers:
            if worker is not None and worker.ready:
                worker.send(RELOAD)
                told += 1
        return told

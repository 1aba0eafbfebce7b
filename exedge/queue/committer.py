"""
Commits through the commit worker process (see L{exedge.queue.commit_worker}
for why a process).

L{ProcessCommitter} is what C{Spool.receiving} is in the server: C{submit}
takes a finished incoming message and fires with its L{StoredMessage} once
the worker has made it durable, or fails (and the session answers 451). A
message that spilled to disk while it arrived has its last chunks written
and its file closed on a spool thread first; the worker then adds only the
envelope footer.

If the worker dies, every commit it had not answered fails, and any of
their files it had already renamed into C{queue/} is removed: it was never
acknowledged, and a copy left there would be delivered after the next
restart next to the one the client sends again; the empty files it had
made ahead are deleted too (L{remove_spares}). The next commit starts a
new worker; if the last one died less than C{restart_interval} after it
started (a worker that cannot start at all), commits wait for the next
start instead, so a broken worker costs one start a second, not one per
message.
"""

from __future__ import annotations

import os
import signal
import sys

import attrs
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from exedge.queue import commit_worker as wire
from exedge.writethrough import write_through_to_child
from .spool import StoredMessage, envelope_footer

log = Logger()

RESTART_INTERVAL = 1.0   # seconds between starts of a worker that keeps dying
STOP_TIMEOUT = 10.0


class WorkerGone(OSError):
    """The commit worker exited before answering."""


@attrs.define
class _Pending:
    """A commit sent to a worker and not yet answered."""

    worker: "_WorkerProtocol"
    request: object             # the CommitRequest (its data kept for RecentData; None when spilled)
    done: defer.Deferred


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, committer: "ProcessCommitter"):
        self.committer = committer
        self.buffer = bytearray()
        self.errors = b""
        self.pid = None         # kept: the transport forgets it once the process is reaped
        self.ended = defer.Deferred()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 2:
            self._stderr(data)
            return
        self.buffer += data
        for (request_id, errno, _), (text,) in wire.take_frames(self.buffer, wire.REPLY, 1):
            self.committer._answered(self, request_id, errno, text.decode("utf-8", "replace"))

    def _stderr(self, data: bytes) -> None:
        """What the worker prints (a traceback, say) goes to the server's log, line by line."""
        self.errors += data
        *lines, self.errors = self.errors.split(b"\n")
        for line in lines:
            if line.strip():
                log.error("commit worker: {line}", line=line.decode("utf-8", "replace").rstrip())
        if len(self.errors) > 4096:
            self._stderr(b"\n")

    def processEnded(self, reason: Failure) -> None:
        if self.errors:
            self._stderr(b"\n")
        self.committer._worker_ended(self, reason)
        self.ended.callback(None)


class ProcessCommitter:
    def __init__(self, spool, reactor, *, python: str = sys.executable, module: str = "exedge.queue.commit_worker",
                 restart_interval: float = RESTART_INTERVAL, clock=None):
        """C{reactor} starts the worker process; C{clock} (by default the reactor) times restarts and stops."""
        self.spool = spool
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.python = python
        self.module = module
        self.restart_interval = restart_interval
        self._worker: _WorkerProtocol | None = None
        self._started_at = float("-inf")
        self._in_flight: dict[int, _Pending] = {}
        self._next_id = 0
        self._stopping = False
        self._restart_call = None
        self._restart_waiters: list[defer.Deferred] = []
        self._idle_listeners: list = []          # as Batcher: delivery work waits for commits

    @property
    def busy(self) -> bool:
        return bool(self._in_flight)

    def on_idle(self, listener) -> None:
        """Call C{listener()} whenever no commit is in flight any more (delivery work waits for that)."""
        self._idle_listeners.append(listener)

    # -- the worker --------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._spawn()

    def _spawn(self) -> _WorkerProtocol:
        worker = _WorkerProtocol(self)
        # the worker imports exedge the way this process did
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.reactor.spawnProcess(
            worker, self.python, [self.python, "-m", self.module, self.spool.directory, str(os.getpid())],
            env=env, childFDs={0: "w", 1: "r", 2: "r"})
        self._widen_pipe(worker)
        self._worker = worker
        self._started_at = self.clock.seconds()
        return worker

    @staticmethod
    def _widen_pipe(worker: _WorkerProtocol) -> None:
        """
        A 1 MiB pipe to the worker where Linux allows it (the default is
        64 KiB): a 100 KiB message then goes in one write, not two or three
        with a trip round the reactor between them (+10% relay rate at
        100 KiB and 10 connections).
        """
        try:
            import fcntl
            fcntl.fcntl(worker.transport.pipes[0].fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        except (ImportError, AttributeError, KeyError, OSError):
            pass

    def _current(self) -> _WorkerProtocol | None:
        if self._worker is None and not self._stopping \
                and self.clock.seconds() - self._started_at >= self.restart_interval:
            self._spawn()
        return self._worker

    def _restarted(self) -> defer.Deferred:
        """Fires once a worker has been started again, at most restart_interval after the last start."""
        d = defer.Deferred()
        self._restart_waiters.append(d)
        if self._restart_call is None:
            delay = max(0.0, self._started_at + self.restart_interval - self.clock.seconds())
            self._restart_call = self.clock.callLater(delay, self._restart)
        return d

    def _restart(self) -> None:
        self._restart_call = None
        waiters, self._restart_waiters = self._restart_waiters, []
        if self._worker is None and not self._stopping:
            self._spawn()
        for d in waiters:
            if self._stopping:
                d.errback(Failure(WorkerGone(5, "the commit worker is not running")))
            else:
                d.callback(None)

    def stop(self) -> defer.Deferred:
        """Let the worker answer what it has, then end it (killed after STOP_TIMEOUT)."""
        self._stopping = True
        if self._restart_call is not None:
            self._restart_call.cancel()
            self._restart()
        worker, self._worker = self._worker, None
        if worker is None or worker.transport is None:
            return defer.succeed(None)
        worker.transport.closeStdin()
        timer = self.clock.callLater(STOP_TIMEOUT, self._kill, worker)
        return worker.ended.addBoth(lambda _: timer.active() and timer.cancel())

    @staticmethod
    def _kill(worker: _WorkerProtocol) -> None:
        try:
            worker.transport.signalProcess(signal.SIGKILL)
        except error.ProcessExitedAlready:
            pass

    # -- commits -----------------------------------------------------------

    def submit(self, request) -> defer.Deferred:
        """Commit a L{exedge.queue.incoming.CommitRequest}; fires with its L{StoredMessage}."""
        footer = envelope_footer(request.envelope)
        payload = [footer] if request.data is None else [request.data, footer]
        return self._send(request, payload)

    def _send(self, request, payload: list[bytes]) -> defer.Deferred:
        worker = self._current()
        if worker is None:
            if self._stopping:
                return defer.fail(WorkerGone(5, "the commit worker is not running"))
            # the last one died less than restart_interval after it started:
            # wait for the next start rather than refuse
            return self._restarted().addCallback(lambda _: self._send(request, payload))
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        request_id = self._next_id
        done = defer.Deferred()
        self._in_flight[request_id] = _Pending(worker, request, done)
        write_through_to_child(worker.transport, wire.encode_request(request_id, request.queue_id, payload,
                                                                     append=request.data is None))
        return done

    def _answered(self, worker, request_id: int, errno: int, text: str) -> None:
        pending = self._in_flight.get(request_id)
        if pending is None or pending.worker is not worker:
            log.error("commit worker answered unknown request {id}", id=request_id)
            return
        del self._in_flight[request_id]
        if errno:
            pending.done.errback(Failure(OSError(errno, text)))
        else:
            r = pending.request
            held = self.spool.recent.hold(r.queue_id, r.data) if r.data is not None else None
            pending.done.callback(StoredMessage(r.queue_id, r.envelope, os.path.join(self.spool.queue_dir, r.queue_id),
                                                r.length, held=held))
        self._maybe_idle()

    def _worker_ended(self, worker, reason: Failure) -> None:
        if self._worker is worker:
            self._worker = None
        lost = [(rid, p) for rid, p in self._in_flight.items() if p.worker is worker]
        if lost or not self._stopping:
            log.error("commit worker exited ({reason}); {n} commit(s) unanswered",
                      reason=reason.getErrorMessage(), n=len(lost))
        for rid, pending in lost:
            del self._in_flight[rid]
            # Not acknowledged: a copy the worker renamed into queue/ must not
            # be delivered after a restart next to the client's new attempt.
            # Removed here and now, not on a spool thread: this also runs
            # while the server shuts down, after its thread pools have gone;
            # one unlink per lost commit, on a path that means a crash.
            _unlink_quietly(os.path.join(self.spool.queue_dir, pending.request.queue_id))
            pending.done.errback(Failure(WorkerGone(5, "the commit worker exited")))
        if worker.pid is not None:
            # the empty files it made ahead, which it deletes itself only when it ends by its stdin
            remove_spares(self.spool.incoming_dir, worker.pid)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self._in_flight:
            for listener in list(self._idle_listeners):
                listener()


def remove_spares(incoming_dir: str, pid: int) -> int:
    """
    Delete the files made ahead (L{exedge.queue.commit_worker.Spares}) by
    the commit worker C{pid}, which has ended: none is a message (a spare
    takes its message's name before it is written), and without this a
    worker killed by a signal left them until the next start. Blocking, a
    scan of incoming/: only when a worker has ended. How many it deleted.
    """
    removed = 0
    for name in wire.names_starting(incoming_dir, f"{wire.SPARE_PREFIX}{pid}-"):
        try:
            os.unlink(os.path.join(incoming_dir, name))
            removed += 1
        except OSError:
            pass
    return removed


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

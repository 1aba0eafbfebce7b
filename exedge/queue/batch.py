"""
Group commit: disk work that arrives while a batch is on the disk goes
together in the next batch.

Each batch is one job on a spool thread, so fifty sessions finishing DATA
at once cost one thread hand-off and one directory fsync instead of fifty,
and their file fsyncs follow each other inside one journal commit (on ext4
the first fsync writes the data of every file in the transaction, so the
others find little left to do). At one message at a time a batch is one
item and nothing waits longer than it would alone.

Twisted has thread pools but nothing that coalesces work; this is the small
piece that does.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.python.failure import Failure


class Batcher:
    def __init__(self, run: Callable[[Callable], defer.Deferred],
                 process: Callable[[list], list], max_batch: int = 64,
                 *, defer_to: "Batcher | None" = None, max_wait: float = 0.25, clock=None,
                 gather: int = 1, gather_wait: float = 0.0):
        """
        C{process(items)} runs on a spool thread and returns one result per
        item, in order; an item's result may be an exception instance, which
        fails only that item's Deferred.

        With C{defer_to}, this is background work (delivery): a batch does
        not start while that batcher (receiving) has work on the disk, but
        waits at most C{max_wait} seconds, so it is delayed, never starved.

        With C{gather} > 1 (and a C{clock}), a batch also waits until that
        many items are there, or at most C{gather_wait} seconds after it
        could have started: for work nobody waits on (removing delivered
        messages), where each batch's thread hand-off costs more than the
        work (see L{exedge.queue.spool.Spool}). L{flush} ends any wait.
        """
        self.run = run
        self.process = process
        self.max_batch = max_batch
        self.defer_to = defer_to
        self.max_wait = max_wait
        self.clock = clock
        self.gather = gather if clock is not None and gather_wait > 0 else 1
        self.gather_wait = gather_wait
        self._pending: list[tuple[object, defer.Deferred]] = []
        self._busy = False
        self._timer = None
        self._gathering = False       # the timer is gather_wait's, not max_wait's
        self._flushes: list[defer.Deferred] = []
        self._idle_listeners: list[Callable[[], None]] = []
        if defer_to is not None:
            defer_to.on_idle(self._priority_idle)

    @property
    def busy(self) -> bool:
        return self._busy or bool(self._pending)

    def on_idle(self, listener: Callable[[], None]) -> None:
        """Call C{listener()} whenever this batcher has nothing left to do."""
        self._idle_listeners.append(listener)

    def submit(self, item) -> defer.Deferred:
        d = defer.Deferred()
        self._pending.append((item, d))
        if not self._busy:
            self._next()
        return d

    def _priority_idle(self) -> None:
        # receiving is done: what waited for it goes now (a wait for more items keeps its time)
        if self._timer is not None and not self._gathering:
            self._timer.cancel()
            self._timer = None
            self._next()

    def _waited_enough(self) -> None:
        self._timer = None
        self._next(force=True)

    def flush(self) -> defer.Deferred:
        """Start what waits now, whatever it waits for; fires once nothing is pending or on the disk."""
        if not self.busy:
            return defer.succeed(None)
        d = defer.Deferred()
        self._flushes.append(d)
        self._next(force=True)
        return d

    def _next(self, force: bool = False) -> None:
        force = force or bool(self._flushes)
        if self._busy or not self._pending:
            return
        if not force:
            if self.defer_to is not None and self.defer_to.busy:
                wait, gathering = self.max_wait, False          # receiving first
            elif len(self._pending) < self.gather:
                wait, gathering = self.gather_wait, True        # more may come: one hand-off for them all
            else:
                wait = None
            if wait is not None:
                if self._timer is None:
                    self._timer = self.clock.callLater(wait, self._waited_enough)
                    self._gathering = gathering
                return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending and not self._busy:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            self._busy = True
            items = [item for item, _ in batch]
            self.run(lambda: self.process(items)).addBoth(self._finished, batch)

    def _finished(self, results, batch) -> None:
        self._busy = False
        if isinstance(results, Failure):
            for _, d in batch:
                d.errback(results)
        else:
            for (_, d), result in zip(batch, results):
                if isinstance(result, BaseException):
                    d.errback(Failure(result))
                else:
                    d.callback(result)
        self._next()
        if not self.busy:
            flushes, self._flushes = self._flushes, []
            for d in flushes:
                d.callback(None)
            for listener in list(self._idle_listeners):
                listener()

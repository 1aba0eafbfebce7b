"""
Reading the spool back after a restart, in the background.

A previous run may leave a million messages in queue/. Reading them all
before listening made a restart cost seconds per hundred thousand; instead
only what must precede the first session is done at start-up
(L{Spool.start_recovery}: directories, partial files), and queue/ is read
back afterwards on a spool thread, C{step} files at a time, each step's
messages announced to the queue as soon as they are read, so delivery of
old mail starts at once while new mail is accepted. Postfix's qmgr scans
its incoming and deferred queues the same way, a bounded number of files
at a time, while smtpd keeps accepting.

What keeps it exact, with the spool's files as the only truth:

 - a message committed during recovery has an id the spool noted when it
   was begun, before its file could exist, and recovery skips those ids:
   it is announced once, by its commit;
 - a message delivered and removed before its step is read is simply not
   found (FileNotFoundError), so it does not come back;
 - each file that stays in queue/ is listed once by the one C{os.scandir}
   walk, so no old message is announced twice; and one step is in flight at
   a time, so the queue is never handed more than C{step} messages ahead of
   the reactor;
 - a kill at any point leaves the files as they are: the next start
   recovers again, from the top.

Only when queue/ has been read are state files without a message swept.

Each step's envelopes are parsed to route the messages and then let go:
the queue keeps a compact record per message (L{exedge.queue.spool.StoredMessage})
and reads an envelope back when the message becomes active, so memory
after recovery grows with the record, not with the envelope.
"""

from __future__ import annotations

import itertools

from twisted.internet import defer
from twisted.logger import Logger

log = Logger()

RECOVERY_STEP = 256     # files read per trip to a spool thread


class Recovery:
    """
    Reads C{spool} back: C{submit(message)} takes each message (the
    queue's intake), C{run(f)} runs blocking reads on a spool thread,
    C{clock} tells the time for the log. L{recovering} and L{recovered}
    are what the management status shows.
    """

    def __init__(self, spool, submit, run, clock, *, step: int = RECOVERY_STEP):
        if step < 1:
            raise ValueError("a recovery step reads at least one file")
        self.spool = spool
        self.submit = submit
        self.run = run
        self.clock = clock
        self.step = step
        self.recovering = False
        self.recovered = 0          # messages announced so far
        self.done = defer.Deferred()   # fires when queue/ and state/ have been read
        self._names = None
        self._started_at = 0.0
        self._stopped = False

    def start(self) -> None:
        """
        The part that must precede the first session, now (blocking, but
        O(partial files)); the rest begins in the background.
        """
        partials = self.spool.start_recovery()
        self.recovering = True
        self._started_at = self.clock.seconds()
        self._names = self.spool.queue_names()
        log.info("spool {dir}: recovery started in the background ({partials} partial file(s) removed)",
                 dir=self.spool.directory, partials=partials)
        self._next()

    def stop(self) -> None:
        """No further step: what is not yet read stays on disk for the next start."""
        self._stopped = True

    def status(self) -> dict:
        return {"recovering": self.recovering, "recovered": self.recovered}

    # -- the steps ---------------------------------------------------------

    def _next(self) -> None:
        if self._stopped:
            return
        self.run(self._read).addCallback(self._take).addErrback(self._failed)

    def _read(self) -> tuple[bool, list]:
        """One step, on a spool thread: (whether queue/ is exhausted, what was read)."""
        names = list(itertools.islice(self._names, self.step))
        return len(names) < self.step, self.spool.read_back(names)

    def _take(self, result) -> None:
        exhausted, loaded = result
        if self._stopped:
            return          # the server is stopping: these stay on disk for the next start
        for message, stateful in loaded:
            if not self.spool.claim_recovered(message.queue_id):
                continue        # named by its committer since it was read: announced by it
            self.spool.adopt(message, stateful)
            self.recovered += 1
            try:
                self.submit(message)
            except Exception:
                # one message the queue cannot take must not hold back the rest; it stays on disk
                log.failure("spool: recovering {queue_id}", queue_id=message.queue_id)
        if not exhausted:
            self._next()
            return
        self.spool.end_recovery()
        self._names = self.spool.state_names()
        self._sweep()

    def _sweep(self) -> None:
        if self._stopped:
            return
        self.run(self._sweep_step).addCallback(self._swept).addErrback(self._failed)

    def _sweep_step(self) -> bool:
        names = list(itertools.islice(self._names, self.step))
        self.spool.sweep_state(names)
        return len(names) < self.step

    def _swept(self, exhausted: bool) -> None:
        if not exhausted:
            self._sweep()
            return
        self.recovering = False
        log.info("spool {dir}: recovery finished: {count} message(s) recovered in {seconds:.3f} s",
                 dir=self.spool.directory, count=self.recovered, seconds=self.clock.seconds() - self._started_at)
        self.done.callback(self.recovered)

    def _failed(self, failure) -> None:
        """
        The directory itself could not be read (not one bad file: those go
        to corrupt/), or a file could not be moved aside. Going on from the top would announce again what was
        announced, so stop, say so loudly, and leave the rest to the next
        start; the status keeps showing recovery as unfinished.
        """
        log.failure("spool {dir}: recovery stopped after {count} message(s); the rest waits on disk "
                    "for the next start", failure, dir=self.spool.directory, count=self.recovered)
        self.done.errback(failure)

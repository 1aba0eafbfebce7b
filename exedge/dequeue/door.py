"""
The door through which remote triggers reach the queue.

The ETRN stage is built with the pipeline, before the queue manager (which
takes the pipeline as its route policy); the manager serves this door when
it is built, as it serves the intake. What asks through it (the ETRN stage
today; ATRN and the management endpoint next) never holds the queue
manager itself.
"""

from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from exedge.interfaces import IRemoteTriggers


@implementer(IRemoteTriggers)
class Triggers:
    def __init__(self):
        self._queue = None
        self.run = None

    def serve(self, queue, run) -> None:
        """
        C{queue} (the queue manager) answers from now on; C{run(f)} is where
        a run over the site's own connection (ATRN) reads messages from the
        spool.
        """
        self._queue = queue
        self.run = run

    def preload(self, match):
        """
        A Deferred of C{release()}: the envelopes of the held mail C{match}
        selects read back off the reactor's thread and kept until C{release()}
        (L{exedge.queue.manager.QueueManager.preload}), for an ATRN run.
        """
        if self._queue is None:
            return defer.succeed(lambda: None)
        return self._queue.preload(match)

    def trigger(self, match, agent=None):
        """The queue's L{exedge.queue.manager.Triggered}, or None while no queue serves the door."""
        if self._queue is None:
            return None
        return self._queue.trigger(match, agent)

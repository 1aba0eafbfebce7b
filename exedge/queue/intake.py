"""
The queue's door: where committed messages are announced to whoever runs
the queue.

Cleanup (received messages and the ones exedge makes) and start-up
recovery announce each committed message here; the queue manager takes
them. Postfix's cleanup tells qmgr the same way, through a trigger on the
incoming queue, and for the same reasons: the two are built without
knowing each other (the queue manager's bouncer goes through cleanup,
which must not need the queue manager first), and a receive process that
is not the queue's process can later announce through the same door.
Messages announced before anyone takes them wait, in order.
"""

from __future__ import annotations

from zope.interface import implementer

from exedge.interfaces import IQueueSink


@implementer(IQueueSink)
class Intake:
    def __init__(self):
        self._taker = None
        self._waiting: list = []

    def submit(self, message) -> None:
        if self._taker is None:
            self._waiting.append(message)
        else:
            self._taker(message)

    def serve(self, taker) -> None:
        """From now on C{taker(message)} takes every message announced, those waiting first."""
        self._taker = taker
        waiting, self._waiting = self._waiting, []
        for message in waiting:
            taker(message)

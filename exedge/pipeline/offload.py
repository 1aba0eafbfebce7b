"""
A stage's own bounded thread pool, for work that must not run on the
reactor: a blocking library (pyspf's DNS lookups) or a CPU-bound parse of
hostile input (the attachment filter's MIME parse, which Python's email
package does in time that grows with lines times nesting depth).

Twisted's reactor thread pool is shared with everything else and sized
for short jobs; a stage that can be handed slow work by any client gets
its own few threads, started on first use and stopped with the reactor,
so it can delay only its own messages. (CPU-bound Python still takes
turns at the GIL with the reactor, every few milliseconds: the reactor
slows down, it does not stop.)
"""

from __future__ import annotations

import threading

from twisted.internet import threads
from twisted.python.threadpool import ThreadPool


class StageThreads:
    def __init__(self, name: str, size: int, reactor=None):
        self.name = name
        self.size = size
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        self._lock = threading.Lock()

    def __call__(self, f, *args):
        """C{f(*args)} on one of the threads: a Deferred of its result."""
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPool(minthreads=0, maxthreads=self.size, name=self.name)
                self._pool.start()
                reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)
        return threads.deferToThreadPool(reactor, self._pool, f, *args)

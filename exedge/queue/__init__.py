"""
The queue room: the durable spool, the commit worker that writes it,
start-up recovery and the per-next-hop delivery queues.

The names below are imported when first used (PEP 562), not when the
package is: the commit worker (C{python -m exedge.queue.commit_worker})
is a process of its own that must start without Twisted, and importing
this package's Twisted modules would cost it that.
"""

import importlib

_WHERE = {
    "Envelope": ".envelope", "Recipient": ".envelope",
    "DeliveryQueue": ".manager", "QueueManager": ".manager", "QueueStatus": ".manager",
    "IncomingMessage": ".incoming", "Spool": ".spool", "StoredMessage": ".spool",
    "Outcome": "exedge.interfaces",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(where, __name__), name)

"""
Delivery queues, one per next hop, and the manager that feeds them.

Written here because Twisted's relay manager is not usable (research §3:
it bounces on 4xx, does not run on Python 3, has no per-hop state). Each
queue has Exchange's states: Ready (work waiting), Active (delivering),
Retry (waiting for the next attempt after a transient failure), Suspended
(by an admin) and Held (waiting for something outside: a closed schedule,
a remote trigger such as ETRN, or a route that does not exist yet).
"""

from __future__ import annotations

import collections
import enum

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from exedge.interfaces import IQueueSink
from exedge.routing import UNREACHABLE, NextHop

log = Logger()


class QueueStatus(enum.Enum):
    Ready = "Ready"
    Active = "Active"
    Retry = "Retry"
    Suspended = "Suspended"
    Held = "Held"


@attrs.frozen
class Outcome:
    """One recipient's result: status is delivered, failed or deferred."""

    index: int
    status: str
    detail: str = ""


@attrs.define
class DeliveryQueue:
    hop: NextHop
    status: QueueStatus = QueueStatus.Ready
    items: collections.deque = attrs.field(factory=collections.deque)  # (StoredMessage, [indexes])
    last_error: str = ""
    next_retry: float | None = None
    hold_reason: str = ""
    _retry_call: object = None

    @property
    def message_count(self) -> int:
        return len(self.items)


@implementer(IQueueSink)
class QueueManager(Service):
    """
    Routes committed messages into per-hop queues and runs each queue with
    its connector's delivery agent, one attempt at a time per queue.
    """

    def __init__(self, spool, router, agents: dict, clock, retry_interval: float = 60.0):
        self.spool = spool
        self.router = router
        self.agents = agents
        self.clock = clock
        self.retry_interval = retry_interval
        self.queues: dict[NextHop, DeliveryQueue] = {}
        # recipients with a final outcome, per message still in the spool:
        # a message split over several hops is removed when the last is done
        self._done: dict[str, set[int]] = {}

    # -- intake ------------------------------------------------------------

    def submit(self, message) -> None:
        pending = message.pending()
        if not pending:
            # recovered after a crash between the last outcome and the unlink
            self.spool.remove(message).addErrback(
                lambda f: log.failure("removing {queue_id}", f, queue_id=message.queue_id))
            return
        recipients = [(i, message.envelope.recipients[i].address) for i in pending]
        for hop, indexes in self.router.group_by_hop(recipients, message.envelope.size).items():
            queue = self.queue_for(hop)
            queue.items.append((message, indexes))
            log.info("queue {hop}: {queue_id} for {count} recipient(s)", hop=str(hop),
                     queue_id=message.queue_id, count=len(indexes))
            self._kick(queue)

    def queue_for(self, hop: NextHop) -> DeliveryQueue:
        queue = self.queues.get(hop)
        if queue is None:
            queue = self.queues[hop] = DeliveryQueue(hop)
            if hop == UNREACHABLE:
                queue.status = QueueStatus.Held
                queue.hold_reason = "no send connector serves these recipients"
        return queue

    # -- admin actions (the hooks schedules and ETRN will use) -------------

    def hold(self, hop: NextHop, reason: str) -> None:
        queue = self.queue_for(hop)
        if queue.status is not QueueStatus.Active:
            queue.status = QueueStatus.Held
        queue.hold_reason = reason

    def suspend(self, hop: NextHop) -> None:
        queue = self.queue_for(hop)
        if queue.status is not QueueStatus.Active:
            queue.status = QueueStatus.Suspended

    def release(self, hop: NextHop) -> None:
        """Resume a held or suspended queue, or retry a waiting one now."""
        queue = self.queue_for(hop)
        if hop == UNREACHABLE:
            return
        if queue.status in (QueueStatus.Held, QueueStatus.Suspended, QueueStatus.Retry):
            self._cancel_retry(queue)
            queue.status = QueueStatus.Ready
            queue.hold_reason = ""
        self._kick(queue)

    # -- running -----------------------------------------------------------

    def _kick(self, queue: DeliveryQueue) -> None:
        if queue.status is QueueStatus.Ready and queue.items and self.running:
            self._attempt(queue)

    def startService(self) -> None:
        super().startService()
        for queue in list(self.queues.values()):
            self._kick(queue)

    def stopService(self):
        super().stopService()
        for queue in self.queues.values():
            self._cancel_retry(queue)

    def _cancel_retry(self, queue: DeliveryQueue) -> None:
        if queue._retry_call is not None and queue._retry_call.active():
            queue._retry_call.cancel()
        queue._retry_call = None
        queue.next_retry = None

    @defer.inlineCallbacks
    def _attempt(self, queue: DeliveryQueue):
        queue.status = QueueStatus.Active
        agent = self.agents[queue.hop.connector]
        while queue.items and self.running:
            message, indexes = queue.items[0]
            try:
                outcomes = yield agent.deliver(message, indexes)
            except Exception as e:
                queue.last_error = str(e) or e.__class__.__name__
                log.warn("queue {hop}: transient failure for {queue_id}: {error}; retry in {delay}s",
                         hop=str(queue.hop), queue_id=message.queue_id, error=queue.last_error,
                         delay=self.retry_interval)
                self._schedule_retry(queue)
                return
            try:
                yield self._record(message, outcomes)
            except Exception:
                # delivered but not noted: retrying may deliver twice, never zero times
                log.failure("queue {hop}: recording outcomes of {queue_id} failed",
                            hop=str(queue.hop), queue_id=message.queue_id)
                queue.last_error = "could not record delivery outcome"
                self._schedule_retry(queue)
                return
            queue.items.popleft()
        if queue.status is QueueStatus.Active:
            queue.status = QueueStatus.Ready
            queue.last_error = ""

    def _schedule_retry(self, queue: DeliveryQueue) -> None:
        queue.status = QueueStatus.Retry
        queue.next_retry = self.clock.seconds() + self.retry_interval

        def retry():
            queue._retry_call = None
            queue.next_retry = None
            if queue.status is QueueStatus.Retry:
                queue.status = QueueStatus.Ready
                self._kick(queue)

        queue._retry_call = self.clock.callLater(self.retry_interval, retry)

    @defer.inlineCallbacks
    def _record(self, message, outcomes):
        final = [o for o in outcomes if o.status in ("delivered", "failed")]
        by_status: dict[tuple, list[int]] = {}
        for o in final:
            by_status.setdefault((o.status, o.detail), []).append(o.index)
            log.info("{queue_id} -> {rcpt}: {status} {detail}", queue_id=message.queue_id,
                     rcpt=message.envelope.recipients[o.index].address, status=o.status, detail=o.detail)
        for (status, detail), indexes in by_status.items():
            yield self.spool.record(message, indexes, status, detail)
        done = set(message.done)
        for o in final:
            done.add(o.index)
        # other hops may still hold recipients of this message
        self._done.setdefault(message.queue_id, set()).update(done)
        if len(self._done[message.queue_id]) >= len(message.envelope.recipients):
            del self._done[message.queue_id]
            yield self.spool.remove(message)
            log.info("{queue_id}: all recipients done, removed from the spool", queue_id=message.queue_id)

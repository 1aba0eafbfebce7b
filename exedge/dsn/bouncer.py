"""
Turning failed recipients into an NDR in the queue.

The NDR enters the queue the way every message does, through cleanup
(L{exedge.cleanup.Cleanup.inject}): committed to the spool, fsync'ed like
any received message, before the original's failure is recorded, so a
crash in between can only send the report twice, never lose it. A message
from the null sender is never bounced (that is how bounce loops start):
its failures are logged.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from exedge.interfaces import NoTracking, TrackingEvent
from exedge.queue.envelope import Recipient

from .ndr import FailedRecipient, build_ndr, wants_delay_notice, wants_ndr

log = Logger()


class Bouncer:
    """
    C{cleanup} queues the reports; C{run(f)} runs C{f} where reading a
    message back from the spool may block (the spool's delivery threads);
    C{tracking} (L{exedge.interfaces.IMessageTracking}) records a DSN
    event on the original message for each report queued.
    """

    def __init__(self, cleanup, reporting_mta: str, run, clock, *, tracking=None):
        self.tracking = tracking if tracking is not None else NoTracking()
        self.cleanup = cleanup
        self.reporting_mta = reporting_mta
        self.run = run
        self.clock = clock

    def bounce(self, message, outcomes) -> defer.Deferred:
        env = message.envelope
        failed = [o for o in outcomes if o.status == "failed"
                  and wants_ndr(env.recipients[o.index].notify)]
        if not failed:
            return defer.succeed(None)
        if env.sender == "":
            log.warn("{queue_id}: not bouncing a bounce; failed: {rcpts}", queue_id=message.queue_id,
                     rcpts=", ".join(env.recipients[o.index].address for o in failed))
            return defer.succeed(None)
        reports = [FailedRecipient(env.recipients[o.index].address, env.recipients[o.index].orcpt,
                                   o.enhanced or "5.0.0", o.detail, o.remote) for o in failed]
        return self._report(message, reports, None)

    def success(self, message, outcomes) -> defer.Deferred:
        """RFC 3461 NOTIFY=SUCCESS: say the message was delivered, or relayed to a hop without DSN."""
        env = message.envelope
        done = [o for o in outcomes if o.status == "delivered" and o.action
                and "SUCCESS" in env.recipients[o.index].notify]
        if not done or env.sender == "":
            return defer.succeed(None)
        reports = [FailedRecipient(env.recipients[o.index].address, env.recipients[o.index].orcpt,
                                   o.enhanced or "2.0.0", o.detail, o.remote, action=o.action) for o in done]
        return self._report(message, reports, None)

    def delay(self, message, indexes, reason: str, retry_until: float) -> defer.Deferred:
        """Tell the sender these recipients are late (RFC 3464 Action: delayed)."""
        env = message.envelope
        wanted = [i for i in indexes if wants_delay_notice(env.recipients[i].notify)]
        if not wanted or env.sender == "":
            return defer.succeed(None)
        reports = [FailedRecipient(env.recipients[i].address, env.recipients[i].orcpt, "4.4.7",
                                   reason, action="delayed") for i in wanted]
        return self._report(message, reports, retry_until)

    def _report(self, message, reports, retry_until) -> defer.Deferred:
        env = message.envelope
        now = self.clock.seconds()

        def build() -> bytes:
            return build_ndr(reporting_mta=self.reporting_mta, original_sender=env.sender, envid=env.envid,
                             ret=env.ret, arrival=env.received_at, failed=reports,
                             original=message.read_data(), now=now, retry_until=retry_until)

        def queued(stored):
            log.info("{queue_id}: report {ndr} queued for {sender}",
                     queue_id=message.queue_id, ndr=stored.queue_id, sender=env.sender)
            self.tracking.track(TrackingEvent(
                event_id="DSN", source="DSN", internal_message_id=message.queue_id, message_id=env.message_id,
                sender=env.sender, return_path=env.sender, recipients=tuple(r.address for r in reports),
                recipient_status=tuple(r.diagnostic for r in reports),
                total_bytes=env.size, recipient_count=len(env.recipients), subject=env.subject,
                reference=stored.queue_id, related_recipient_address=env.sender,
                message_info=",".join(sorted({r.action for r in reports})), directionality="Originating"))

        d = self.run(build)
        d.addCallback(self.cleanup.inject, "", (Recipient(env.sender),), "(non-delivery report)")
        d.addCallback(queued)
        return d

"""
Cleanup: everything between a message's last byte and its 250.

Postfix's cleanup(8) stands between smtpd and the queue: one program turns
what a session received into a queue file (the headers it adds, the
rewrites, the envelope, the durable write) and tells the queue manager;
mail the system makes itself (bounces) goes through it too. This is that
room. A receive session speaks SMTP and nothing else: at DATA it asks for
a L{Draft} (the spool file, begun with our Received field), streams the
client's bytes into it, runs the pipeline's SMTP hooks, and at the final
dot hands the transaction, the stages' L{exedge.pipeline.Message} and the
draft to L{Cleanup.commit}, which answers with the L{Receipt} the client is
told. Messages exedge makes (NDRs, delay and success notices; later
ETRN/ATRN and management re-submissions) enter through L{Cleanup.inject}:
the same envelope, the same commit, the same hand-off to the queue.
"""

from __future__ import annotations

import email.utils
import errno
import functools
import re

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from exedge.interfaces import NoTracking, TrackingEvent, is_wire_form
from exedge.logs.csvlog import escape
from exedge.logs.literal import literal
from exedge.queue.envelope import Envelope, Recipient

log = Logger()


@attrs.define
class Transaction:
    """One SMTP mail transaction as the session collected it (MAIL, RCPT...)."""

    sender: object | None                     # a Mailbox, or None for the null sender
    declared_size: int | None = None
    body: str | None = None
    ret: str | None = None
    envid: str | None = None
    auth: str | None = None
    recipients: list[Recipient] = attrs.field(factory=list)


@attrs.frozen
class Trace:
    """Who handed us the message: for our Received field and the envelope."""

    helo: str
    peer_host: str
    peer_port: int
    by: str                                   # our name on this connector
    connector: str                            # the receive connector's name
    session: str = ""                         # the session's id, as its protocol log names it
    protocol: str = "ESMTP"                   # RFC 3848: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA
    tls: str | None = None                    # the TLS session, described (exedge.tls.describe)


@attrs.frozen
class Receipt:
    """What the client is told: SMTP's reply, and whether the message is queued."""

    code: int
    status: str
    text: str
    queue_id: str | None = None               # set when the message is on disk and queued
    tarpit: bool = False                      # a refusal that unauthenticated peers wait for

    @property
    def queued(self) -> bool:
        return self.queue_id is not None


def with_protocol(esmtp: bool, tls: bool, authenticated: bool) -> str:
    """RFC 3848: ESMTP with S for TLS and A for an authenticated client; plain SMTP after HELO."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


@functools.lru_cache(maxsize=4)
def _rfc5322_date(second: int) -> str:
    """Formatted once per second, not once per message."""
    return email.utils.formatdate(second, localtime=False)


def received_field(trace: Trace, queue_id: str, when: float) -> bytes:
    """Our Received field (RFC 5321 §4.4), naming the receive connector and the queue id."""
    using = f"\t({trace.tls})\r\n" if trace.tls else ""
    return (
        f"Received: from {trace.helo} ([{trace.peer_host}])\r\n"
        f"\tby {trace.by} (exedge, receive connector \"{trace.connector}\")\r\n"
        f"{using}"
        f"\twith {trace.protocol} id {queue_id};\r\n"
        f"\t{_rfc5322_date(int(when))}\r\n"
    ).encode("ascii", "replace")


class Draft:
    """
    A message being received: the spool's incoming message, begun with our
    Received field. The session writes the client's bytes into it and
    hands it back to cleanup at the final dot (or aborts it).
    """

    def __init__(self, incoming, trace: Trace, prefix: bytes, note=None):
        self.incoming = incoming
        self.trace = trace
        self.note = note or (lambda text: log.info("{queue_id}: {text}", queue_id=incoming.queue_id, text=text))
        self.prefix_length = len(prefix)
        self.prefix_in_wire_form = is_wire_form(prefix)     # for WireForm (see Cleanup.commit)
        self.size = 0                      # octets in the spool so far, our Received field included
        self.write(prefix)

    @property
    def queue_id(self) -> str:
        return self.incoming.queue_id

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self.incoming.write(data)

    @property
    def backlogged(self) -> bool:
        return self.incoming.backlogged

    def when_drained(self, callback) -> None:
        self.incoming.when_drained(callback)

    def client_bytes(self) -> defer.Deferred:
        """What the client sent, as stages see it: the spooled bytes after our Received field."""
        skip = self.prefix_length
        return self.incoming.read_back().addCallback(lambda data: data[skip:])

    def abort(self) -> None:
        self.incoming.abort()


def _redirected(recipients, redirects) -> list:
    """The recipients after the pipeline's redirects; ORCPT keeps who it was addressed to."""
    out, seen = [], set()
    for r in recipients:
        targets = redirects.get(r.address.lower())
        if targets is None:
            if r.address.lower() not in seen:
                seen.add(r.address.lower())
                out.append(r)
            continue
        for target in targets:
            if target.lower() not in seen:
                seen.add(target.lower())
                out.append(Recipient(target, r.notify, r.orcpt or f"rfc822;{r.address}"))
    return out


_FOLD = re.compile(rb"\r?\n(?=[ \t])")


@functools.lru_cache(maxsize=16)
def _field_pattern(name: str) -> re.Pattern:
    """Compiled once per field name (the re module's own cache costs a lookup of the joined pattern each time)."""
    return re.compile(rb"(?im)^" + re.escape(name.encode("ascii")) + rb"[ \t]*:(.*(?:\r?\n[ \t].*)*)")


def header_field(header: bytes, name: str, limit: int = 256) -> str:
    """
    The first C{name} field of a header section, unfolded, as a log may
    show it (control characters escaped, at most C{limit} characters):
    a cheap look, not a parse, because it runs for every message.
    """
    m = _field_pattern(name).search(header)
    if m is None:
        return ""
    value = _FOLD.sub(b"", m.group(1)).strip()
    return escape(value[:limit * 4].decode("utf-8", "replace"))[:limit]


QUEUE_FAILED = Receipt(451, "4.3.0", "Could not write the message to the queue; try again later")
# the spool's file system is full (or its quota spent): Postfix's answer, and an expected condition
NO_STORAGE = Receipt(452, "4.3.1", "Insufficient system storage")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class Cleanup:
    """
    The one way into the queue. C{store} is the spool
    (L{exedge.interfaces.IMessageStore}), C{sink} who learns of committed
    messages (L{exedge.interfaces.IQueueSink}); C{quarantine_mailbox} is
    where quarantined messages go ([server] quarantine_mailbox; None:
    they are refused).
    """

    def __init__(self, store, sink, clock, *, quarantine_mailbox: str | None = None, tracking=None,
                 commit_seconds=None):
        self.store = store
        self.commit_seconds = commit_seconds or (lambda seconds: None)   # from the final dot to durable (metrics)
        self.sink = sink
        self.clock = clock
        self.quarantine_mailbox = quarantine_mailbox
        self.tracking = tracking if tracking is not None else NoTracking()   # IMessageTracking

    # -- received messages ---------------------------------------------------

    def open(self, trace: Trace, note=None) -> Draft:
        """
        Begin a message received from a client (at DATA): our Received
        field comes first. C{note(text)} records what cleanup does to it
        (the session's protocol log).
        """
        incoming = self.store.begin()
        return Draft(incoming, trace, received_field(trace, incoming.queue_id, self.clock.seconds()), note)

    def commit(self, txn: Transaction, message, draft: Draft, header: bytes = b"", wire_form: bool = False):
        """
        The message is complete and the stages agree to it: apply their
        actions (C{message}, an L{exedge.pipeline.Message}, or None without
        a pipeline), make it durable, queue it. The L{Receipt}, at once or
        as a Deferred; a failure to write it is a 451, never an exception.
        C{header}: the client's header section (its Message-ID and Subject
        go into the envelope, for the logs). C{wire_form}: the session
        vouches that the client's data is in wire form (L{WireForm}: read
        by a DataReader, no line began with "."); with our Received field
        in wire form too and no edit, the data goes on as a L{WireForm}.
        """
        recipients = list(txn.recipients)
        notes: dict = {}
        trace = draft.trace
        message_id, subject = header_field(header, "Message-ID"), header_field(header, "Subject")
        sender = str(txn.sender) if txn.sender else ""

        def track(event_id: str, rcpts, info: str, **more) -> None:
            self.tracking.track(TrackingEvent(
                event_id=event_id, source="AGENT", internal_message_id=draft.queue_id, message_id=message_id,
                sender=sender, recipients=tuple(rcpts), subject=subject, message_info=info,
                client_ip=trace.peer_host, client_hostname=trace.helo, server_hostname=trace.by,
                connector_id=trace.connector, source_context=trace.session, **more))

        if message is not None:
            if message.deleted is not None:
                # the stage's "delete": the client is told 250, nobody gets it (Exchange's SilentDelete)
                draft.abort()
                draft.note(f"message deleted by the pipeline: {message.deleted}")
                track("DROP", (r.address for r in recipients), message.deleted)
                return Receipt(250, "2.6.0", f"<{draft.queue_id}> Queued mail for delivery")
            if message.quarantined is not None:
                if self.quarantine_mailbox is None:
                    draft.abort()
                    draft.note(f"quarantine without a quarantine_mailbox, refused: {message.quarantined}")
                    return Receipt(550, "5.7.1", "Message rejected as spam by content filtering", tarpit=True)
                message.add_header("X-Exedge-Quarantine-Reason", message.quarantined[:200])
                message.add_header("X-Exedge-Original-Recipients", ", ".join(r.address for r in recipients))
                recipients = [Recipient(self.quarantine_mailbox)]
                draft.note(f"message quarantined to {self.quarantine_mailbox}: {message.quarantined}")
            elif message.redirects:
                recipients = _redirected(recipients, message.redirects)
                draft.note("recipients redirected by the pipeline: " +
                           ", ".join(f"{k} -> {', '.join(v)}" for k, v in message.redirects.items()))
                for original, targets in message.redirects.items():
                    track("REDIRECT", targets, "redirected by a pipeline stage", related_recipient_address=original)
            notes = message.notes

        def envelope(size: int) -> Envelope:
            return Envelope(
                sender=str(txn.sender) if txn.sender else "",
                recipients=tuple(recipients),
                ret=txn.ret, envid=txn.envid, auth=txn.auth, body=txn.body,
                size=size, receive_connector=trace.connector, peer=f"{trace.peer_host}:{trace.peer_port}",
                helo=trace.helo, received_at=self.clock.seconds(), notes=notes,
                message_id=message_id, subject=subject, session=trace.session,
            )

        started = self.clock.seconds()

        def committed(size: int, wire_form: bool = False) -> defer.Deferred:
            env = envelope(size)
            return self._commit(draft.incoming, env, wire_form).addCallback(self._received, env, trace, started)

        if message is not None and message.edited:
            d = draft.incoming.rewrite(message.edit(draft.prefix_length)).addCallback(committed)
        else:
            d = committed(draft.size, wire_form and draft.prefix_in_wire_form)
        return d.addCallbacks(self._receipt, self._failed, errbackArgs=(draft.incoming,))

    def _received(self, stored, env: Envelope, trace: Trace, started: float):
        """
        The message is on disk and queued: one line at the default level
        that ties the session to the queue id (formatted once, as the
        protocol log's), and its RECEIVE event. From C{env}, the envelope
        just committed, not C{stored.envelope}: the queue may already have
        let it go (a held message is compact at once), and reading it back
        here would block the reactor on the file.
        """
        self.commit_seconds(max(0.0, self.clock.seconds() - started))
        log.info(literal(f"{stored.queue_id}: received in session {trace.session or '-'} on "
                         f"{trace.connector} from <{env.sender}>, {len(env.recipients)} recipient(s), "
                         f"{env.size} bytes, message-id {env.message_id or '(none)'}"),
                 queue_id=stored.queue_id, session=trace.session, sender=env.sender,
                 recipients=len(env.recipients), size=env.size, message_id=env.message_id)
        self.tracking.track(TrackingEvent(
            event_id="RECEIVE", source="SMTP", internal_message_id=stored.queue_id, message_id=env.message_id,
            sender=env.sender, return_path=env.sender, recipients=tuple(r.address for r in env.recipients),
            total_bytes=env.size, recipient_count=len(env.recipients), subject=env.subject,
            client_ip=trace.peer_host, client_hostname=trace.helo, server_hostname=trace.by,
            connector_id=trace.connector, source_context=trace.session, directionality="Incoming"))
        return stored

    @staticmethod
    def _receipt(stored) -> Receipt:
        return Receipt(250, "2.6.0", f"<{stored.queue_id}> Queued mail for delivery", queue_id=stored.queue_id)

    # -- messages exedge makes ---------------------------------------------------

    def inject(self, data: bytes, sender: str, recipients, origin: str, source: str = "DSN") -> defer.Deferred:
        """
        Queue a message made here (C{origin} names what made it, as the
        envelope's receive connector: "(non-delivery report)"; C{source},
        as the tracking log's RECEIVE event names it). Fires with
        the L{exedge.interfaces.IStoredMessage} once it is durable and
        queued; fails if it could not be written.
        """
        incoming = self.store.begin()
        incoming.write(data)
        head = data.split(b"\r\n\r\n", 1)[0]
        envelope = Envelope(sender=sender, recipients=tuple(recipients), size=len(data),
                            receive_connector=origin, received_at=self.clock.seconds(),
                            message_id=header_field(head, "Message-ID"), subject=header_field(head, "Subject"))

        def queued(stored):
            self.tracking.track(TrackingEvent(
                event_id="RECEIVE", source=source, internal_message_id=stored.queue_id,
                message_id=envelope.message_id, sender=sender, return_path=sender,
                recipients=tuple(r.address for r in envelope.recipients), total_bytes=envelope.size,
                recipient_count=len(envelope.recipients), subject=envelope.subject, connector_id=origin,
                directionality="Originating"))
            return stored
        return self._commit(incoming, envelope).addCallback(queued)

    # -- the one way in ------------------------------------------------------------

    def _commit(self, incoming, envelope: Envelope, wire_form: bool = False) -> defer.Deferred:
        """Durable, then announced to the queue: fires with the stored message, or fails."""
        return incoming.commit(envelope, wire_form=wire_form).addCallback(self._queue)

    def _queue(self, stored):
        try:
            self.sink.submit(stored)
        except Exception:
            # the message is on disk: it is acknowledged, and start-up recovery queues it
            log.failure("queueing {queue_id} failed; it waits in the spool for a restart",
                        queue_id=stored.queue_id)
        return stored

    @staticmethod
    def _failed(failure, incoming) -> Receipt:
        """
        An edit or the commit failed: nothing was acknowledged, the client
        may try again, and what was written is removed (the incoming
        message's own clean-up). A full file system is expected (back
        pressure says no earlier, but a burst can beat its sample): one
        line and 452 4.3.1; anything else is a bug or a broken disk, with
        its traceback.
        """
        incoming.abort()
        error = failure.value
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            log.warn("{queue_id}: not queued, the spool's file system is full ({error}); 452 4.3.1",
                     queue_id=incoming.queue_id, error=error.strerror or errno.errorcode.get(error.errno, ""))
            return NO_STORAGE
        log.failure("queue write failed for {queue_id}", failure, queue_id=incoming.queue_id)
        return QUEUE_FAILED

"""
The extension points of exedge, and the values that cross between rooms.
Rooms meet at these interfaces and at nothing else.

The flow (docs/architecture.md): a receive session hands what it received
to cleanup, which writes it to the spool through L{IMessageStore} and
L{IIncomingMessage} and announces it to the queue through L{IQueueSink};
the queue routes each recipient (L{Route}, or a L{Deferral} or L{Refusal}
from an L{IRoutePolicy}) into per-hop queues, and an L{IDeliveryAgent}
carries it, answering one L{Outcome} per recipient.

The values live here, not in the room that makes them, because more than
one room reads them: the queue and every delivery agent speak L{Outcome};
the router, the queue and the pipeline's routing stages speak L{Route}.
"""

from __future__ import annotations

import attrs
from zope.interface import Attribute, Interface, implementer


# -- the spool ---------------------------------------------------------------

class IStoredMessage(Interface):
    """A committed message: on disk, its envelope known."""

    queue_id = Attribute("the id it is queued under")
    envelope = Attribute("its L{exedge.queue.envelope.Envelope}")

    def in_memory():
        """The data if it is still held in memory after its commit, else None (never blocks)."""

    def read_data():
        """The message bytes (blocking: call on a spool thread)."""


class WireForm(bytes):
    """
    Message data known to be in SMTP's wire form but for the end marker:
    CRLF line ends only, no line beginning with ".", ending with CRLF. Made
    where that is known without a scan (a client's data as a DataReader took
    it, with no dot-stuffed line, behind exedge's own Received field, not
    edited: L{exedge.cleanup.Cleanup.commit}); a client sending it
    (L{exedge.send.client.dot_stuff}) then need not scan it again, which
    cost a 100 KiB message about 250 µs. Anything made from it (a slice, a
    concatenation, a copy read back from disk) is plain bytes again.
    """

    __slots__ = ()


def crlf_only(data: bytes) -> bool:
    """
    Whether every CR and LF in C{data} is part of a CRLF: no bare CR or LF
    (the SMTP smuggling vector). Three counts: measured cheaper than any
    other exact test in Python (bench/README.md, "Wire form").
    """
    crlf = data.count(b"\r\n")
    return data.count(b"\r") == crlf and data.count(b"\n") == crlf


def is_wire_form(data: bytes) -> bool:
    """Whether C{data} is what L{WireForm} promises (a scan: for short data such as a header field)."""
    return (data.endswith(b"\r\n") and crlf_only(data)
            and not data.startswith(b".") and b"\r\n." not in data)


class IMessageEdit(Interface):
    """
    What cleanup asks the spool to do to a message's bytes before the
    commit (the pipeline's header edits, a replaced content). A value, so
    that the spool can apply it where the bytes are (in memory, or in a
    file on a spool thread) without knowing what the stages did.
    """

    prefix_length = Attribute("octets at the start that are ours (our Received field), kept as they are")
    head_only = Attribute(
        "True when only the header section changes: apply(head) + rest == apply(head + rest) for a head "
        "that ends with the header section's empty line, so a large message can be streamed")

    def apply(data):
        """The edited bytes of C{data} (the whole message, or its head when C{head_only})."""


class IIncomingMessage(Interface):
    """A message being written to the spool; nothing is acknowledged until C{commit} fires."""

    queue_id = Attribute("the id it will be queued under (set at once)")
    backlogged = Attribute("True while more waits for the disk than a session may hold in memory")

    def write(data):
        """Append bytes (kept in memory, streamed to disk past a threshold)."""

    def when_drained(callback):
        """Call C{callback()} once the message is no longer backlogged (at once if it is not)."""

    def read_back():
        """A Deferred firing with everything written so far (for stages that read the body)."""

    def rewrite(edit):
        """Apply an L{IMessageEdit} to what was written; a Deferred firing with the new length."""

    def commit(envelope, wire_form=False):
        """
        Make the message and its envelope durable: a Deferred firing with
        an L{IStoredMessage} only once it is fsync'ed under its final name.
        C{wire_form}: the caller vouches that what was written is what
        L{WireForm} promises; the data kept in memory for the first
        delivery is then a L{WireForm}.
        """

    def abort():
        """Forget the message (nobody was told 250); its partial file goes."""


class IMessageStore(Interface):
    """Where cleanup puts messages (the spool)."""

    def begin():
        """Start a message: a new L{IIncomingMessage}."""


class IQueueSink(Interface):
    """Who learns of committed messages (the queue manager, through its intake)."""

    def submit(message):
        """Route and enqueue a committed L{IStoredMessage}."""


class IRemoteTriggers(Interface):
    """How a site's request for its mail (ETRN, ATRN) reaches the queue."""

    run = Attribute("run(f): a Deferred of f() on the spool's delivery threads, for reading messages")

    def preload(match):
        """
        A Deferred of C{release()}: the held mail C{match} selects made ready
        (envelopes read back off the reactor's thread) for a L{trigger} with
        an agent; call C{release()} once that trigger is done.
        """

    def trigger(match, agent=None):
        """
        Run once every held remote-triggered queue whose L{NextHop}
        C{match(hop)} accepts, through C{agent} (an L{IDeliveryAgent}) when
        given, else the connector's; what was found and done (None: the
        queue is not there to ask).
        """


# -- routing -------------------------------------------------------------------

OVERSIZE = "oversize"


@attrs.frozen
class NextHop:
    """
    The key of a delivery queue: a connector and the destination it serves.
    Drop and smart-host connectors have one destination (the directory, the
    smart-host set); DNS-routed connectors have one per domain. Messages
    above a connector's oversize_threshold queue apart (C{lane} "oversize"),
    to wait for their own schedule.
    """

    connector: str
    destination: str
    lane: str = ""

    @classmethod
    def of(cls, connector, domain: str, size: int = 0) -> "NextHop":
        """The queue that C{connector} (a send connector) uses for C{domain} and a message of C{size} octets."""
        # one queue per domain where each domain is delivered (or asked for) on its own
        dns_routed = (not connector.drop_directory and not connector.smart_hosts) or \
            getattr(connector, "remote_triggered_delivery", False)
        threshold = getattr(connector, "oversize_threshold", None)
        lane = OVERSIZE if threshold is not None and size > threshold else ""
        return cls(connector.name, domain.lower() if dns_routed else "", lane)

    def __str__(self) -> str:
        name = f"{self.connector}/{self.destination}" if self.destination else self.connector
        return f"{name} ({self.lane})" if self.lane else name


@attrs.frozen
class Route:
    """
    Where one recipient goes: the chosen connector's next hop, and the
    other candidates, best first (pipeline stages may pick one of them in
    on_route, as content restrictions do).
    """

    hop: NextHop
    domain: str
    connector: object = None          # the chosen L{exedge.config.SendConnector}; None: no connector serves it
    alternatives: tuple = ()
    size: int = 0                     # the message's (Envelope.size), for the oversize lane

    def via(self, connector) -> "Route":
        """This recipient through C{connector} instead."""
        rest = tuple(c for c in self.alternatives if c is not connector)
        return Route(NextHop.of(connector, self.domain, self.size), self.domain, connector, rest, self.size)


@attrs.frozen
class Deferral:
    """Not now: ask again after the retry interval (a routing stage's 4xx)."""

    text: str
    status: str = "4.7.1"


@attrs.frozen
class Refusal:
    """Never: the recipient fails and its sender gets an NDR (a routing stage's 5xx)."""

    text: str
    status: str = "5.7.1"


class IRoutePolicy(Interface):
    """Has a say in routing after the router chose (the pipeline's on_route stages)."""

    def route(envelope, recipient, route):
        """
        The L{Route} for C{recipient} (C{route}, or another), a L{Deferral}
        or a L{Refusal}. Synchronous: it runs for every recipient.
        """


# -- delivery ------------------------------------------------------------------

@attrs.frozen
class Outcome:
    """One recipient's result: status is delivered, failed or deferred."""

    index: int
    status: str
    detail: str = ""        # the reply or our reason, "550 5.1.1 User unknown"
    enhanced: str = ""      # its enhanced status code, for the NDR
    remote: str = ""        # the host that answered, if any
    # for delivered recipients, what a NOTIFY=SUCCESS sender is told:
    # "delivered" (final delivery), "relayed" (to a hop without DSN), or ""
    # (the next hop offered DSN and took the parameters over)
    action: str = ""


class NextHopUnreachable(Exception):
    """
    How a delivery agent fails an attempt when every host of the next hop
    failed at the connection level (refused, timed out, a 4xx greeting):
    the queue may then move the recipients to a dearer connector for the
    same address space. Any other failure of an attempt is retried where
    it is; a permanent (5xx) answer never moves mail.
    """


class IDeliveryAgent(Interface):
    """
    Carries messages for one send connector to their next hop (a drop
    directory, or SMTP to smart hosts or MX hosts).
    """

    connector = Attribute("the L{exedge.config.SendConnector} served")
    concurrency = Attribute("how many deliveries of one queue may be in flight at once")

    def deliver(message, recipients):
        """
        Deliver C{message} (an L{IStoredMessage}) to the recipients with
        these indexes. Returns a Deferred firing with a list of L{Outcome},
        one per recipient; a failed Deferred is a transient failure of the
        whole attempt (L{NextHopUnreachable} when no host could be reached).
        """


# -- administration --------------------------------------------------------------

@attrs.frozen
class QueueInfo:
    """One delivery queue as an admin sees it (Exchange's Get-Queue)."""

    identity: str            # "3", or "Unreachable": stable while the server runs
    hop: NextHop
    status: str              # Ready | Active | Retry | Suspended | Held
    message_count: int       # messages waiting or in flight in this queue
    hold_reason: str = ""
    last_error: str = ""
    next_retry: float | None = None   # epoch seconds
    oldest: float | None = None       # arrival time of the oldest message waiting (epoch seconds)


@attrs.frozen
class RecipientInfo:
    address: str
    status: str              # Complete | Ready | Active | Retry | Held | Suspended
    queue: str = ""          # the identity of the queue it waits in
    last_error: str = ""


@attrs.frozen
class MessageInfo:
    """One message in the queues (Exchange's Get-Message)."""

    identity: str            # the spool's queue id
    status: str              # Active | Ready | Retry | Held | Suspended
    sender: str
    recipients: tuple        # of RecipientInfo
    size: int
    received_at: float
    queues: tuple            # identities of the queues it sits in
    last_error: str = ""
    receive_connector: str = ""
    peer: str = ""
    subject: str = ""
    message_id: str = ""


class QueueActionRefused(Exception):
    """An admin action that cannot be done as asked (the reason says why and what to do)."""


class IQueueAdmin(Interface):
    """What the management endpoint may see of the queues and do to them (the queue manager)."""

    def queue_infos():
        """Every queue now, as L{QueueInfo} values."""

    def message_page(queue=None, limit=None):
        """
        (the messages (in the queue with identity C{queue}), oldest first, at
        most C{limit}, as L{MessageInfo} values; how many there are in all):
        one look at the queues for both.
        """

    def message_info(identity):
        """One message's L{MessageInfo}, or None when it is not in the queues."""

    def retry_queue(identity, resubmit=False):
        """Try a queue now (C{resubmit}: route its messages again, as after a configuration change)."""

    def suspend_queue(identity):
        """Start nothing new from this queue until resumed."""

    def resume_queue(identity):
        """Undo L{suspend_queue}."""

    def redirect_queue(identity, connector):
        """Move what waits in this queue to the next hop of the send connector named C{connector}."""

    def suspend_message(identity):
        """Start no delivery of this message, in any queue, until resumed."""

    def resume_message(identity):
        """Undo L{suspend_message}."""

    def remove_message(identity, ndr):
        """Give up on the message's pending recipients: a Deferred (C{ndr}: tell the sender)."""

    def export_message(identity):
        """A Deferred firing with the message's bytes, as stored."""


# -- message tracking ------------------------------------------------------------

@attrs.frozen(kw_only=True)
class TrackingEvent:
    """
    One event of a message's life, as Exchange's message tracking log
    records it (exedge.logs.tracking writes it; the field names are
    Exchange's). C{recipients} and C{recipient_status} are parallel (one
    status per recipient, or one for all); the log joins them with ";".
    """

    event_id: str                      # RECEIVE, DSN, SEND, DELIVER, FAIL, DEFER, REDIRECT, DROP, RESUBMIT, ...
    source: str                        # SMTP, DSN, AGENT, QUEUE, ADMIN, ...
    internal_message_id: str           # the queue id
    message_id: str = ""               # the Message-ID header field's value
    sender: str = ""                   # the envelope sender ("" for <>)
    recipients: tuple = ()
    recipient_status: tuple = ()       # the reply or reason per recipient, or one for all
    total_bytes: int | None = None
    recipient_count: int | None = None
    related_recipient_address: str = ""
    reference: str = ""                # a related message (the report's queue id for DSN)
    subject: str = ""
    return_path: str = ""
    message_info: str = ""
    client_ip: str = ""
    client_hostname: str = ""
    server_ip: str = ""
    server_hostname: str = ""
    source_context: str = ""
    connector_id: str = ""
    directionality: str = ""


class IMessageTracking(Interface):
    """Who records the life of messages (the message tracking log): cleanup, the queue and the bouncer tell it."""

    def track(event):
        """Record a L{TrackingEvent}; never raises, never blocks."""


@implementer(IMessageTracking)
class NoTracking:
    """The tracking log turned off ([logs] message_tracking_log_enabled = false), and the default of every room."""

    def track(self, event) -> None:
        pass

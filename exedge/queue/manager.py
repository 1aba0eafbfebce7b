"""
Delivery queues, one per next hop, and the manager that feeds them.

Written here because Twisted's relay manager is not usable (research §3:
it bounces on 4xx, does not run on Python 3, has no per-hop state). Each
queue has Exchange's states: Ready (work waiting), Active (delivering),
Retry (waiting for the next attempt after a transient failure), Suspended
(by an admin) and Held (waiting for something outside: a closed schedule,
a remote trigger such as ETRN, or a route that does not exist yet).

Connection schedules: a send connector's queues follow its `schedule`
(and their oversize lane its `oversize_schedule`). Outside a window a
queue is Held with the reason "schedule" and the next window's start as
its next retry; at the window's start it runs again. What is in flight
when a window closes finishes, nothing new starts. Expiry and delay
notices count on while a queue is held, as in Exchange.

Memory: what waits holds the compact record (L{exedge.queue.spool.StoredMessage}),
not the parsed envelope; Postfix's qmgr keeps at most
qmgr_message_active_limit messages in memory and reads the rest from
disk when it activates them, and this manager does the same per use:
routing, an attempt, a report (NDR, delay notice) or a tracking event
pins the envelope (L{_using}, L{_with_envelopes}: read back on a delivery
thread, 256 files a trip, when it is not in memory) and unpins it when
done, so a million held messages cost their records (about 0.3 KiB
each, measured: bench/README.md, "Memory: the compact index"), not their
envelopes. New mail keeps its envelope while its data is in
L{exedge.queue.spool.RecentData}, so its first attempt reads nothing
back; a message that goes to wait (a held queue, a retry interval) lets
both go at once. Expiry, the oversize lane and the queue counts need no
envelope (arrival time, size and recipient count are in the record); the
admins' listings (message_page, message_info) read the envelopes of compact messages
as they list them.
"""

from __future__ import annotations

import collections
import datetime
import enum
import heapq
import itertools

import attrs
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from exedge.config import QueueConfig
from exedge.interfaces import (
    OVERSIZE, Deferral, IQueueAdmin, IQueueSink, MessageInfo, NextHop, NextHopUnreachable, NoTracking, Outcome,
    QueueActionRefused, QueueInfo, RecipientInfo, Refusal, Route, TrackingEvent,
)
from exedge.logs.literal import literal
from exedge.routing import ROUTE_DEFERRED, TOO_LARGE, UNREACHABLE, reroute

log = Logger()

SWEEP_INTERVAL = 60.0   # seconds between looks for expired messages in waiting queues
LOAD_STEP = 256         # compact messages whose envelopes are read back per trip to a delivery thread
SCHEDULE = "schedule"   # the hold reason of a queue outside its connector's connection schedule
TRIGGER = "remote triggered delivery"   # ... of a queue that runs when its site asks (ETRN, ATRN)
_SPECIAL = {UNREACHABLE: "Unreachable", ROUTE_DEFERRED: "Deferred"}   # Exchange names its special queues
_ADMIN_REMOVED = "5.3.2 QUEUE.Admin; message deleted by administrative action"
_HOLD_TEXT = {SCHEDULE: "held until the send connector's connection schedule opens",
              TRIGGER: "held for remote triggered delivery; the site did not ask for its mail (ETRN)"}


# the recipients of most items: all of a message's, from the first; shared, not a list per item
_ALL = tuple(tuple(range(n)) for n in range(33))


def _shared(indexes: list[int]) -> tuple[int, ...]:
    """C{indexes} (ascending) as a tuple, the shared one when they are 0..n-1."""
    n = len(indexes)
    if n < len(_ALL) and n and indexes[0] == 0 and indexes[-1] == n - 1:
        return _ALL[n]
    return tuple(indexes)


class _Outcomes:
    """
    Queue id -> the recipients of a live message with a final outcome, as
    a mapping over the live messages (C{done} of each record): a million
    queued messages need one dict, not two (one entry is about 40 bytes).
    """

    __slots__ = ("_messages",)

    def __init__(self, messages: dict):
        self._messages = messages

    def get(self, queue_id: str, default=None):
        message = self._messages.get(queue_id)
        return message.done if message is not None else default

    def __getitem__(self, queue_id: str) -> frozenset:
        return self._messages[queue_id].done

    def __setitem__(self, queue_id: str, done: frozenset) -> None:
        self._messages[queue_id].done = done

    def __delitem__(self, queue_id: str) -> None:
        del self._messages[queue_id]

    def __contains__(self, queue_id: str) -> bool:
        return queue_id in self._messages

    def __len__(self) -> int:
        return len(self._messages)


@attrs.frozen
class Triggered:
    """What a remote trigger (ETRN) found and did."""

    queues: int = 0            # held queues that match
    messages: int = 0          # messages waiting in them
    started: bool = False      # a run began now
    running: bool = False      # a run was already under way
    suspended: bool = False    # an admin suspended one of them: nothing runs


class QueueStatus(enum.Enum):
    Ready = "Ready"
    Active = "Active"
    Retry = "Retry"
    Suspended = "Suspended"
    Held = "Held"


@attrs.define
class DeliveryQueue:
    hop: NextHop
    status: QueueStatus = QueueStatus.Ready
    items: collections.deque = attrs.field(factory=collections.deque)  # (StoredMessage, [indexes])
    last_error: str = ""
    next_retry: float | None = None
    hold_reason: str = ""
    in_flight: int = 0
    failures: int = 0          # transient failures in a row, for the retry schedule
    waiting: list = attrs.field(factory=list)   # deferred recipients waiting out message_retry_interval
    triggered: bool = False    # a run asked for by the site (ETRN, ATRN) is under way
    agent: object = None       # who delivers that run when it is not the connector's agent (ATRN's session)
    identity: str = ""         # what admins call it (Get-Queue): a number, or the special queue's name
    active: dict = attrs.field(factory=dict)    # items in flight, by id(item): taken out in O(1) when done
    parked: list = attrs.field(factory=list)    # items of messages an admin suspended
    _retry_call: object = None

    @property
    def message_count(self) -> int:
        return len(self.items)


@attrs.define
class _Down:
    """A next hop whose hosts all failed at the connection level: new mail avoids it until C{until}."""

    until: float = 0.0
    failures: int = 0                  # in a row, for the retry schedule
    error: str = ""
    switched: set = attrs.field(factory=set)   # fallbacks logged as taking its mail


@implementer(IQueueSink, IQueueAdmin)
class QueueManager(Service):
    """
    Routes committed messages into per-hop queues and runs each queue with
    its connector's delivery agent, with as many attempts in flight per
    queue as the agent's concurrency allows.

    C{bouncer} turns failed recipients into NDRs (L{exedge.dsn.Bouncer});
    C{route_policy} has a say after the router chose
    (L{exedge.interfaces.IRoutePolicy}: the pipeline's on_route stages);
    C{intake} is where committed messages are announced
    (L{exedge.queue.intake.Intake}): this manager takes them from there;
    C{triggers} (L{exedge.dequeue.Triggers}) is where sites ask for their
    held mail (ETRN): this manager answers there. C{tracking}
    (L{exedge.interfaces.IMessageTracking}) records SEND, DELIVER, FAIL
    and DEFER events.
    """

    def __init__(self, spool, router, agents: dict, clock, policy: QueueConfig = QueueConfig(),
                 concurrency: int = 4, *, bouncer=None, route_policy=None, intake=None, triggers=None,
                 tracking=None):
        self.tracking = tracking if tracking is not None else NoTracking()
        self.spool = spool
        self.router = router
        self.agents = agents
        self.clock = clock
        self.policy = policy
        self.concurrency = concurrency   # attempts in flight per queue
        self.bouncer = bouncer
        self.route_policy = route_policy
        self.queues: dict[NextHop, DeliveryQueue] = {}
        # every message in the spool, with its recipients that have a final
        # outcome: a message split over several hops is removed when the
        # last is done, and an item of a removed message is dropped
        # (frozensets: most messages have none done, and the empty frozenset is shared;
        # a message with outcomes gets a new one per outcome, not a set of its own for life);
        # kept in each message's record (_Outcomes), not in a dict of their own
        self._messages: dict[str, object] = {}           # queue id -> the live StoredMessage (admins ask by id)
        self._live = _Outcomes(self._messages)
        self._delay_notified: dict[str, set[int]] = {}   # per live message, recipients told of a delay
        self._connectors = {c.name: c for c in getattr(router, "send_connectors", ())}
        self._schedule_calls: dict[tuple[str, str], object] = {}   # (connector, lane) -> its next change
        self._down: dict[tuple[str, str], _Down] = {}    # (connector, destination) whose hosts are all down
        self._suspended: set[str] = set()                # messages an admin suspended
        self._identities = itertools.count(1)
        if intake is not None:
            intake.serve(self.submit)
        if triggers is not None:
            triggers.serve(self, spool.run_delivery)

    # -- intake ------------------------------------------------------------

    def submit(self, message) -> None:
        """Take a message just committed or read back (its envelope in memory): route it, then let it go compact."""
        pending = message.pending()
        if not pending:
            # recovered after a crash between the last outcome and the unlink
            self.spool.remove(message).addErrback(
                lambda f: log.failure("removing {queue_id}", f, queue_id=message.queue_id))
            return
        self._messages.setdefault(message.queue_id, message)
        if message.delay_notified:       # made on demand otherwise (_notify_delays)
            self._delay_notified.setdefault(message.queue_id, set(message.delay_notified))
        wait = message.retry_at - self.clock.seconds()
        if wait > 0:
            # recovered in the middle of a retry interval: keep the schedule
            self._rest(message)
            self.clock.callLater(wait, self._route, message, pending)
            return
        self._route(message, pending)

    def _route(self, message, pending) -> None:
        """Route these recipients: now when the envelope is in memory, else once it is read back."""
        if message.loaded_envelope() is None:
            self._with_envelopes([(message, pending)], self._route)
            return
        message.pin()
        try:
            self._route_pinned(message, message.envelope, pending)
        finally:
            message.unpin()

    def _route_pinned(self, message, envelope, pending) -> None:
        hops: dict[NextHop, list[int]] = {}
        refused: list[Outcome] = []
        deferred: dict[str, list[int]] = {}
        for i in pending:
            address = envelope.recipients[i].address
            route = self.router.route(address.rpartition("@")[2], envelope.size)
            if route.hop == TOO_LARGE:
                refused.append(Outcome(i, "failed", "5.3.4 Message too large for every send connector "
                                       f"that serves this domain ({envelope.size} bytes)", "5.3.4"))
                continue
            route = self._choose(envelope, address, route)
            if isinstance(route, Refusal):
                refused.append(Outcome(i, "failed", f"{route.status} {route.text}", route.status))
                continue
            if isinstance(route, Deferral):
                deferred.setdefault(f"{route.status} {route.text}", []).append(i)
                continue
            hops.setdefault(route.hop, []).append(i)
        if refused:
            self._settle(message, refused)
        for reason, indexes in deferred.items():
            self._route_later(message, indexes, reason)
        unreachable = hops.get(UNREACHABLE)
        if unreachable:
            domains = ", ".join(sorted({envelope.recipients[i].address.rpartition("@")[2].lower()
                                        for i in unreachable}))
            rcpts = ", ".join(envelope.recipients[i].address for i in unreachable)
            # formatted once, here: every message held so logs it (exedge.logs.literal)
            log.warn(literal(f"{message.queue_id}: held in the Unreachable queue: no send connector serves "
                             f"{domains} ({rcpts})"), queue_id=message.queue_id, domains=domains, rcpts=rcpts)
        runnable = False
        for hop, indexes in hops.items():
            queue = self.queue_for(hop)
            queue.items.append((message, _shared(indexes)))
            runnable = runnable or queue.status in (QueueStatus.Ready, QueueStatus.Active)
            self._kick(queue)
        if not runnable:
            self._rest(message)

    def _rest(self, message) -> None:
        """
        C{message} waits where no attempt takes it soon (a held queue, a
        retry interval): its data and envelope leave memory (RecentData's
        too); an attempt or a report reads them back.
        """
        self.spool.recent.release(message.queue_id)
        message.compact()

    # -- envelopes read back ----------------------------------------------------

    def _using(self, message, f, *args) -> defer.Deferred:
        """
        C{f(*args)} with C{message}'s envelope pinned in memory (read back
        on a delivery thread if it is compact) until what C{f} returns has
        fired. Fails if the envelope cannot be read.
        """
        def pinned(envelope):
            message.pin(envelope)
            return defer.maybeDeferred(f, *args).addBoth(lambda result: (message.unpin(), result)[1])

        if message.loaded_envelope() is not None:
            return pinned(None)
        return self.spool.run_delivery(message.read_envelope).addCallback(pinned)

    def _with_envelopes(self, items, f) -> defer.Deferred:
        """
        C{f(message, left)} for each (message, indexes) item whose message
        is still live with recipients left (C{left}: those not done), with
        its envelope pinned until what C{f} returns has fired. Envelopes in
        memory now; compact ones read back L{LOAD_STEP} at a time, one trip
        after the other, so a reload that routes a million held messages
        again never has more than one step in flight. One that cannot be
        read is tried again after the glitch retry interval: nothing waiting
        is dropped.
        """
        later = []
        for message, indexes in items:
            if message.loaded_envelope() is None:
                later.append((message, indexes))
            else:
                self._call_pinned(message, None, f, indexes)
        if not later:
            return defer.succeed(None)
        return self._load_step(later, 0, f)

    def _load_step(self, items, start: int, f) -> defer.Deferred:
        step = items[start:start + LOAD_STEP]

        def read():
            envelopes = []
            for message, _ in step:
                try:
                    envelopes.append(message.read_envelope())
                except (OSError, ValueError, KeyError, TypeError) as e:
                    envelopes.append(e)
            return envelopes

        def loaded(envelopes):
            for (message, indexes), envelope in zip(step, envelopes):
                if not isinstance(envelope, Exception):
                    self._call_pinned(message, envelope, f, indexes)
                elif message.queue_id in self._live:
                    log.error("{queue_id}: its envelope could not be read back ({error}); trying again in "
                              "{seconds:g} s", queue_id=message.queue_id, error=envelope,
                              seconds=self.policy.queue_glitch_retry_interval)
                    self.clock.callLater(self.policy.queue_glitch_retry_interval, self._with_envelopes,
                                         [(message, indexes)], f)
            if start + LOAD_STEP < len(items):
                return self._load_step(items, start + LOAD_STEP, f)

        d = self.spool.run_delivery(read).addCallback(loaded)
        d.addErrback(lambda fail: log.failure("reading envelopes back", fail))
        return d

    def _call_pinned(self, message, envelope, f, indexes) -> None:
        done = self._live.get(message.queue_id)
        left = [i for i in indexes if done is not None and i not in done]
        if not left:
            return          # completed or removed meanwhile
        message.pin(envelope)
        try:
            result = f(message, left)
        except Exception:
            message.unpin()
            log.failure("{queue_id}: handling a message read back", queue_id=message.queue_id)
            return
        if isinstance(result, defer.Deferred):
            result.addBoth(lambda r: (message.unpin(), r)[1])
        else:
            message.unpin()

    def _choose(self, envelope, address: str, route):
        """
        After the router: the connectors' delivery restrictions (the next
        candidate by cost, else a Refusal), the route policy (the pipeline's
        on_route), then failover: while the chosen connector is down (or
        closed while another is open), a fallback that the restrictions and
        the policy let carry this message; with none, the route stays and
        the recipient waits for its connector.
        """
        if route.connector is None:
            return route

        def refuses(connector):
            return connector.refuses_sender(envelope.sender)

        route = reroute(route, refuses)
        if self.route_policy is not None and isinstance(route, Route):
            route = self.route_policy.route(envelope, address, route)
        if not isinstance(route, Route) or route.connector is None:
            return route
        alternative = self._avoid_down(route, refuses)
        if alternative is not route and self.route_policy is not None:
            # the policy must agree to the fallback as it is (content restrictions, a
            # stage's choice); moved elsewhere or refused, the recipient waits instead
            checked = self.route_policy.route(envelope, address, alternative)
            if not isinstance(checked, Route) or checked.connector is not alternative.connector:
                return route
        return alternative

    def _settle(self, message, outcomes) -> None:
        """
        Final outcomes decided here (a refusal at routing): recorded, and
        their NDR queued. While the NDR cannot be written, try again at the
        glitch retry interval with the same outcomes, reason and all.
        """
        def again(retry):
            if retry:
                waiting = set(retry)
                left = [o for o in outcomes if o.index in waiting]
                self.clock.callLater(self.policy.queue_glitch_retry_interval, self._settle, message, left)

        self._record(message, outcomes).addCallback(again)

    def _route_later(self, message, indexes: list[int], reason: str) -> None:
        """
        A routing stage said "not now" (a 4xx from on_route): these
        recipients wait out message_retry_interval in the held queue of
        deferred routes, where delay notices and expiry see them, and are
        routed again then (the stages are asked again); the message's
        other recipients go on meanwhile.
        """
        queue = self.queue_for(ROUTE_DEFERRED)
        queue.last_error = reason
        item = (message, indexes)

        def again():
            if item not in queue.waiting:
                return            # taken along meanwhile (an admin's retry, a reload)
            queue.waiting.remove(item)
            done = self._live.get(message.queue_id)
            left = [i for i in indexes if done is not None and i not in done]
            if not left:
                return
            if self._expired(message):
                d = self._expire(queue, (message, left), reason)
                d.addCallback(lambda retry: self._route_later(message, retry, reason) if retry else None)
                return
            self._route(message, left)

        queue.waiting.append(item)
        log.info("{queue_id}: routing deferred for {rcpts}: {reason}", queue_id=message.queue_id,
                 rcpts=", ".join(message.envelope.recipients[i].address for i in indexes), reason=reason)
        self.clock.callLater(self.policy.message_retry_interval, again)
        self._note_retry(message, indexes, self.clock.seconds() + self.policy.message_retry_interval)

    def queue_for(self, hop: NextHop) -> DeliveryQueue:
        queue = self.queues.get(hop)
        if queue is None:
            queue = self.queues[hop] = DeliveryQueue(hop)
            queue.identity = _SPECIAL.get(hop) or str(next(self._identities))
            if hop == UNREACHABLE:
                queue.status = QueueStatus.Held
                queue.hold_reason = "no send connector serves these recipients"
            elif hop == ROUTE_DEFERRED:
                queue.status = QueueStatus.Held
                queue.hold_reason = "a routing stage deferred these recipients"
            elif self._remote_triggered(hop):
                queue.status, queue.hold_reason = QueueStatus.Held, TRIGGER
            else:
                self._follow_schedule(queue)
        return queue

    # -- remote triggered delivery (ETRN) ------------------------------------

    def _remote_triggered(self, hop: NextHop) -> bool:
        connector = self._connectors.get(hop.connector)
        return connector is not None and connector.remote_triggered_delivery

    def trigger(self, match, agent=None) -> Triggered:
        """
        The site asks for its mail (ETRN): every held remote-triggered queue
        whose next hop C{match(hop)} accepts runs once, with the
        recipients it had deferred too; it is held again when the run is
        over (delivered, deferred or failed: a remote-triggered queue never
        opens a connection by itself). With C{agent} (an
        L{exedge.interfaces.IDeliveryAgent}), that run is delivered by it
        (ATRN: over the connection the site opened) and nothing starts
        while another run of these queues is under way.
        """
        queues = [q for q in self.queues.values() if self._remote_triggered(q.hop) and match(q.hop)]
        waiting = {m.queue_id for q in queues for m, _ in list(q.items) + q.waiting}
        result = Triggered(len(queues), len(waiting), running=any(q.triggered for q in queues),
                           suspended=any(q.status is QueueStatus.Suspended for q in queues))
        if result.suspended or not waiting or (agent is not None and result.running):
            return result
        started = False
        pinned = []
        for queue in queues:
            if queue.status is QueueStatus.Held and queue.hold_reason == TRIGGER and (queue.items or queue.waiting):
                queue.items.extend(queue.waiting)      # deferred recipients go now too
                queue.waiting.clear()
                queue.status, queue.hold_reason, queue.triggered = QueueStatus.Ready, "", True
                queue.agent = agent
                started = True
                log.info("queue {hop}: run asked for by the site", hop=str(queue.hop))
                if agent is not None:
                    pinned += self._pin_now(queue.items)
                self._kick(queue)
        for message in pinned:
            message.unpin()             # the attempts hold their own pins now
        return attrs.evolve(result, started=started)

    def preload(self, match) -> defer.Deferred:
        """
        Before an ATRN run: the envelopes of what waits in the held
        remote-triggered queues C{match(hop)} accepts, read back on delivery
        threads (L{LOAD_STEP} at a time, as recovery reads) and pinned.
        Fires with C{release()}, to call once L{trigger} has taken its own
        pins: L{trigger} then reads nothing on the reactor's thread but what
        came in since (L{_pin_now}).
        """
        queues = [q for q in self.queues.values() if self._remote_triggered(q.hop) and match(q.hop)]
        items = [item for q in queues for item in list(q.items) + q.waiting]
        gate = defer.Deferred()

        def release() -> None:
            if not gate.called:
                gate.callback(None)

        return self._with_envelopes(items, lambda message, left: gate).addCallback(lambda _: release)

    def _pin_now(self, items) -> list:
        """
        The envelopes of these items' compact messages read now, on the
        reactor's thread, and pinned; the messages pinned. Only for an ATRN
        run: its agent (the site's one session) must be handed every message
        before the connection turns round, as it asks for them once; a
        read on a delivery thread would come too late. L{preload} has read
        what waited before the site asked; only mail that came in since is
        read here.
        """
        pinned = []
        for message, _ in items:
            if message.loaded_envelope() is None:
                try:
                    envelope = message.read_envelope()
                except (OSError, ValueError, KeyError, TypeError) as e:
                    log.error("{queue_id}: envelope unreadable ({error}); its attempt will try again",
                              queue_id=message.queue_id, error=e)
                    continue
                message.pin(envelope)
            else:
                message.pin()
            pinned.append(message)
        return pinned

    def _end_of_run(self, queue: DeliveryQueue) -> None:
        """A remote-triggered queue whose run is over (nothing left, nothing in flight) is held again."""
        if self._remote_triggered(queue.hop) and not queue.in_flight and \
                (not queue.items or queue.status is not QueueStatus.Active) and \
                queue.status in (QueueStatus.Ready, QueueStatus.Active, QueueStatus.Retry):
            self._cancel_retry(queue)
            queue.status, queue.hold_reason, queue.triggered, queue.agent = QueueStatus.Held, TRIGGER, False, None

    # -- failover between connectors by cost ----------------------------------

    def _is_down(self, hop: NextHop) -> bool:
        down = self._down.get((hop.connector, hop.destination))
        return down is not None and self.clock.seconds() < down.until

    def _closed_now(self, hop: NextHop) -> bool:
        found = self._schedule_of(hop)
        return found is not None and not found[0].is_open(self.clock.seconds(), found[1])

    def _avoid_down(self, route, refuses):
        """
        C{route}, or the same recipient through a fallback connector (same
        address space, same or higher cost: L{Router.fallbacks}) while
        C{route}'s connector is down, or outside its schedule when a
        fallback is open now. A fallback must be up, open, carry mail by
        itself (not a remote-triggered one) and not refuse the sender
        (C{refuses}). With none the route stays: its queue retries, or
        waits for its window.
        """
        down = self._is_down(route.hop)
        if (not down and not self._closed_now(route.hop)) or self._remote_triggered(route.hop):
            return route
        for other in self.router.fallbacks(route):
            alternative = route.via(other)
            if self._is_down(alternative.hop) or self._closed_now(alternative.hop) or \
                    self._remote_triggered(alternative.hop) or refuses(other) is not None:
                continue
            state = self._down.get((route.hop.connector, route.hop.destination))
            if state is not None and other.name not in state.switched:
                state.switched.add(other.name)
                log.warn("failover: send connector {down} is down ({error}); mail for {space} goes through "
                         "{fallback} until it answers again", down=route.connector.name, error=state.error,
                         space=route.domain, fallback=other.name)
            return alternative
        return route

    def _fail_over(self, queue: DeliveryQueue) -> None:
        """
        Every host of C{queue}'s next hop failed at the connection level:
        it counts as down until its retry (new mail avoids it meanwhile),
        and what waits in its queue is routed again at once, so recipients
        that a dearer connector for the same address space serves move
        there; the others stay and wait for the retry as before.
        """
        key = (queue.hop.connector, queue.hop.destination)
        state = self._down.get(key) or _Down()
        now = self.clock.seconds()
        if now >= state.until:
            # one step of the retry schedule per down period, however many
            # attempts were in flight when the hosts went away
            state.failures += 1
            p = self.policy
            state.until = now + (p.queue_glitch_retry_interval if state.failures <= p.queue_glitch_retry_count
                                 else p.outbound_connection_failure_retry_interval)
        state.error = queue.last_error
        self._down[key] = state
        items, queue.items = list(queue.items), collections.deque()
        self._with_envelopes(items, self._route)      # back here, where no fallback serves them

    def _answered(self, hop: NextHop) -> None:
        """An attempt through C{hop} reached a host: if its connector was down, it is up again."""
        state = self._down.pop((hop.connector, hop.destination), None)
        if state is not None and state.switched:
            log.info("failover: send connector {up} answers again; mail for its address space goes through it "
                     "again, not {fallback}", up=hop.connector, fallback=", ".join(sorted(state.switched)))

    # -- connection schedules ----------------------------------------------

    def _schedule_of(self, hop: NextHop):
        """(Schedule, zone) that C{hop}'s queue follows, or None when it may always run."""
        connector = self._connectors.get(hop.connector)
        if connector is None:
            return None
        schedule = connector.oversize_schedule if hop.lane == OVERSIZE else connector.schedule
        if schedule is None or schedule.always:
            return None
        return schedule, connector.schedule_time_zone

    def _follow_schedule(self, queue: DeliveryQueue) -> None:
        """Hold or open C{queue} as its schedule says now; come back at the schedule's next change."""
        found = self._schedule_of(queue.hop)
        if found is None:
            return
        schedule, zone = found
        now = self.clock.seconds()
        if schedule.is_open(now, zone):
            if queue.status is QueueStatus.Held and queue.hold_reason == SCHEDULE:
                queue.status, queue.hold_reason, queue.next_retry = QueueStatus.Ready, "", None
                log.info("queue {hop}: its connection schedule opens", hop=str(queue.hop))
                self._kick(queue)
        elif queue.status in (QueueStatus.Ready, QueueStatus.Active, QueueStatus.Retry) or \
                (queue.status is QueueStatus.Held and queue.hold_reason == SCHEDULE):
            # what is in flight finishes; nothing new starts until the window opens
            self._cancel_retry(queue)
            queue.status, queue.hold_reason = QueueStatus.Held, SCHEDULE
            queue.next_retry = schedule.next_opening(now, zone)
            if queue.next_retry is not None:
                log.info("queue {hop}: held by its connection schedule until {when}", hop=str(queue.hop),
                         when=datetime.datetime.fromtimestamp(queue.next_retry, zone).isoformat(timespec="minutes"))
        key = (queue.hop.connector, queue.hop.lane)
        call = self._schedule_calls.get(key)
        if call is None or not call.active():
            at = schedule.next_change(now, zone)
            if at is not None:
                self._schedule_calls[key] = self.clock.callLater(max(0.0, at - now), self._schedule_changed, key)

    def _schedule_changed(self, key: tuple[str, str]) -> None:
        """A window of this connector (and lane) opens or closes: every queue of it follows."""
        self._schedule_calls.pop(key, None)
        for queue in list(self.queues.values()):
            if (queue.hop.connector, queue.hop.lane) == key:
                self._follow_schedule(queue)

    # -- admin actions (the hooks schedules and ETRN will use) -------------

    def hold(self, hop: NextHop, reason: str) -> None:
        """Start no new attempts (those in flight finish) until released."""
        queue = self.queue_for(hop)
        self._cancel_retry(queue)
        queue.status = QueueStatus.Held
        queue.hold_reason = reason

    def suspend(self, hop: NextHop) -> None:
        queue = self.queue_for(hop)
        self._cancel_retry(queue)
        queue.status = QueueStatus.Suspended

    def release(self, hop: NextHop) -> None:
        """Resume a held or suspended queue, or retry a waiting one now."""
        queue = self.queue_for(hop)
        if hop in (UNREACHABLE, ROUTE_DEFERRED):
            return
        if queue.status in (QueueStatus.Held, QueueStatus.Suspended, QueueStatus.Retry):
            self._cancel_retry(queue)
            queue.status = QueueStatus.Ready
            queue.hold_reason = ""
        self._kick(queue)

    # -- a new configuration (reload) -----------------------------------------

    def reconfigure(self, router, agents: dict, policy: QueueConfig, route_policy=None) -> dict:
        """
        Swap in the routing of a reloaded configuration. Queues of send
        connectors that changed or went away give their waiting mail back
        to routing (what is in flight finishes where it is, and an attempt
        whose connector is gone routes again); their retry and failover
        state starts afresh. The Unreachable and Deferred queues are
        routed again too: held mail that now has a route goes out.
        Returns what was moved, for the reload's report.
        """
        old = self._connectors
        self.router, self.agents, self.policy, self.route_policy = router, agents, policy, route_policy
        self._connectors = {c.name: c for c in router.send_connectors}
        changed = {name for name in set(old) | set(self._connectors) if old.get(name) != self._connectors.get(name)}
        for call in self._schedule_calls.values():
            if call.active():
                call.cancel()
        self._schedule_calls.clear()
        self._down = {k: v for k, v in self._down.items() if k[0] not in changed}
        moved = 0
        for queue in list(self.queues.values()):
            if queue.hop in (UNREACHABLE, ROUTE_DEFERRED) or queue.hop.connector in changed:
                moved += len(queue.items) + len(queue.waiting) + len(queue.parked)
                if queue.hop.connector in changed:
                    self._cancel_retry(queue)
                    queue.status, queue.hold_reason, queue.failures, queue.last_error = QueueStatus.Ready, "", 0, ""
                    queue.triggered, queue.agent = False, None
                    if not queue.in_flight and queue.hop.connector not in self._connectors:
                        del self.queues[queue.hop]
                self._resubmit(queue)
        for queue in list(self.queues.values()):
            if queue.hop in (UNREACHABLE, ROUTE_DEFERRED):
                continue
            if self._remote_triggered(queue.hop) and queue.status is QueueStatus.Ready and not queue.in_flight:
                queue.status, queue.hold_reason = QueueStatus.Held, TRIGGER
            elif queue.status is QueueStatus.Held and queue.hold_reason == TRIGGER and \
                    not self._remote_triggered(queue.hop):
                queue.status, queue.hold_reason = QueueStatus.Ready, ""
            self._follow_schedule(queue)
            self._kick(queue)
        return {"send_connectors_changed": sorted(changed), "items_rerouted": moved}

    # -- what admins see and do (IQueueAdmin: the management endpoint) ------

    def message_count(self) -> int:
        """Messages not yet done: what back pressure samples every 2 s, so O(1) (L{summary} adds up sizes)."""
        return len(self._live)

    def summary(self) -> dict:
        """The spool as the queues know it: messages not yet done, and their size."""
        return {"messages": len(self._live),
                "bytes": sum(m.size for m in self._messages.values())}

    def _queue(self, identity: str) -> DeliveryQueue:
        for queue in self.queues.values():
            if queue.identity.lower() == identity.lower():
                return queue
        raise KeyError(identity)

    def _items(self, queue: DeliveryQueue) -> list:
        """What a queue holds, whatever its state: (state, item) pairs."""
        return [("Active", i) for i in queue.active.values()] + [("Ready", i) for i in queue.items] + \
            [("Retry", i) for i in queue.waiting] + [("Suspended", i) for i in queue.parked]

    def queue_infos(self) -> list[QueueInfo]:
        out = []
        for queue in self.queues.values():
            if queue.hop == TOO_LARGE:
                continue
            held = self._items(queue)
            ids = {item[0].queue_id for _, item in held}
            arrivals = [item[0].received_at for _, item in held]
            out.append(QueueInfo(queue.identity, queue.hop, queue.status.value, len(ids),
                                 _HOLD_TEXT.get(queue.hold_reason, queue.hold_reason), queue.last_error,
                                 queue.next_retry, min(arrivals) if arrivals else None))
        return out

    def message_page(self, queue: str | None = None, limit: int | None = None) -> tuple[list[MessageInfo], int]:
        """
        The oldest C{limit} messages (of one queue) and how many there are
        in all. Where each sits is found from the queues alone; only the
        messages listed have their envelope read (a compact one's from its
        file, not kept), so a page of the first thousand costs a thousand
        small reads whatever the queue holds (Exchange's Get-Message shows
        1,000 by default, -ResultSize for more).
        """
        where = self._places(queue)

        def age(queue_id):
            return self._messages[queue_id].received_at, queue_id

        ids = sorted(where, key=age) if limit is None else heapq.nsmallest(limit, where, key=age)
        return [self._info(i, where[i]) for i in ids], len(where)

    def message_info(self, identity: str) -> MessageInfo | None:
        """One message by its queue id (None: not in the queues); only its own envelope is read."""
        if identity not in self._messages or identity not in self._live:
            return None
        places = self._places(None, only=identity).get(identity)
        return self._info(identity, places) if places else None

    def _places(self, queue: str | None, only: str | None = None) -> dict[str, list]:
        """Queue id -> [(state, DeliveryQueue, indexes)] of the live messages (of one queue; or one message)."""
        queues = [self._queue(queue)] if queue is not None else list(self.queues.values())
        where: dict[str, list] = {}
        for q in queues:
            for state, (message, indexes) in self._items(q):
                if only is not None and message.queue_id != only:
                    continue
                if state == "Ready" and q.status in (QueueStatus.Held, QueueStatus.Suspended, QueueStatus.Retry):
                    state = q.status.value
                where.setdefault(message.queue_id, []).append((state, q, indexes))
        return {i: p for i, p in where.items() if i in self._messages and self._live.get(i) is not None}

    def _info(self, queue_id: str, places: list) -> MessageInfo:
        message = self._messages[queue_id]
        done = self._live[queue_id]
        env = message.envelope         # read from its file if it is compact (not kept)
        status = {i: ("Complete", None) for i in done}
        for state, q, indexes in places:
            for i in indexes:
                if i not in done:
                    status[i] = (state, q)
        rcpts = tuple(RecipientInfo(r.address, status.get(i, ("Ready", None))[0],
                                    status[i][1].identity if status.get(i, (0, None))[1] else "",
                                    status[i][1].last_error if status.get(i, (0, None))[1] else "")
                      for i, r in enumerate(env.recipients))
        states = {s for s, _, _ in places}
        overall = next((s for s in ("Active", "Suspended", "Retry", "Held", "Ready") if s in states), "Ready")
        if queue_id in self._suspended:
            overall = "Suspended"
        errors = [q.last_error for _, q, _ in places if q.last_error]
        return MessageInfo(queue_id, overall, env.sender, rcpts, env.size, env.received_at,
                           tuple(dict.fromkeys(q.identity for _, q, _ in places)),
                           errors[0] if errors else "", env.receive_connector, env.peer, env.subject,
                           env.message_id)

    def _message(self, identity: str):
        message = self._messages.get(identity)
        if message is None or identity not in self._live:
            raise KeyError(identity)
        return message

    def retry_queue(self, identity: str, resubmit: bool = False) -> None:
        """
        Exchange's Retry-Queue: a queue in Retry tries now, with the
        recipients that wait out their retry interval. With C{resubmit}
        (and always for Unreachable and Deferred) its messages are routed
        again from scratch, as after a change of send connectors.
        """
        queue = self._queue(identity)
        if resubmit or queue.hop in (UNREACHABLE, ROUTE_DEFERRED):
            self._resubmit(queue)
            return
        if queue.status is QueueStatus.Suspended:
            raise QueueActionRefused(f"queue {identity} is suspended: resume it (Resume-Queue)")
        if queue.status is QueueStatus.Held:
            reason = _HOLD_TEXT.get(queue.hold_reason, queue.hold_reason)
            raise QueueActionRefused(f"queue {identity} is held ({reason}); it is not retried by an admin")
        self._cancel_retry(queue)
        queue.items.extend(queue.waiting)
        queue.waiting.clear()
        if queue.status is QueueStatus.Retry:
            queue.status = QueueStatus.Ready
        log.info("queue {hop}: retried now by an admin", hop=str(queue.hop))
        self._kick(queue)

    def _resubmit(self, queue: DeliveryQueue) -> None:
        """Route everything that waits in C{queue} again (what is in flight finishes where it is)."""
        items = list(queue.items) + queue.waiting + queue.parked
        queue.items.clear()
        queue.waiting.clear()
        queue.parked.clear()
        log.info("queue {hop}: {count} item(s) resubmitted", hop=str(queue.hop), count=len(items))

        def again(message, left):
            self._track(message, "RESUBMIT", [Outcome(i, "resubmitted", "routed again") for i in left], queue.hop)
            self._route(message, left)

        self._with_envelopes(items, again)

    def suspend_queue(self, identity: str) -> None:
        queue = self._queue(identity)
        if queue.hop in (UNREACHABLE, ROUTE_DEFERRED):
            raise QueueActionRefused(f"queue {queue.identity} never delivers by itself; nothing to suspend")
        self.suspend(queue.hop)
        log.info("queue {hop}: suspended by an admin", hop=str(queue.hop))

    def resume_queue(self, identity: str) -> None:
        queue = self._queue(identity)
        if queue.status is not QueueStatus.Suspended:
            raise QueueActionRefused(f"queue {queue.identity} is {queue.status.value}, not suspended")
        queue.status = QueueStatus.Ready
        if self._remote_triggered(queue.hop):
            queue.status, queue.hold_reason = QueueStatus.Held, TRIGGER
        else:
            self._follow_schedule(queue)
        log.info("queue {hop}: resumed by an admin", hop=str(queue.hop))
        self._kick(queue)

    def redirect_queue(self, identity: str, connector: str) -> None:
        """Move what waits in the queue to C{connector}'s next hop for each recipient's domain."""
        queue = self._queue(identity)
        target = next((c for c in self._connectors.values() if c.name.lower() == connector.lower()), None)
        if target is None:
            raise QueueActionRefused(f"no send connector named {connector!r}; there are: "
                                     + ", ".join(sorted(self._connectors)))
        if not target.enabled:
            raise QueueActionRefused(f"send connector {target.name!r} is disabled")
        items = list(queue.items) + queue.waiting
        queue.items.clear()
        queue.waiting.clear()

        def move(message, indexes):
            envelope = message.envelope
            hops: dict[NextHop, list[int]] = {}
            for i in indexes:
                domain = envelope.recipients[i].address.rpartition("@")[2]
                hops.setdefault(NextHop.of(target, domain, envelope.size), []).append(i)
            for hop, moved in hops.items():
                other = self.queue_for(hop)
                other.items.append((message, _shared(moved)))
                self._kick(other)

        log.info("queue {hop}: {count} item(s) redirected to send connector {to}", hop=str(queue.hop),
                 count=len(items), to=target.name)
        self._with_envelopes(items, move)

    def suspend_message(self, identity: str) -> None:
        self._message(identity)
        self._suspended.add(identity)
        for queue in self.queues.values():
            keep = collections.deque()
            for item in queue.items:
                (queue.parked if item[0].queue_id == identity else keep).append(item)
            queue.items = keep
        log.info("{queue_id}: suspended by an admin", queue_id=identity)

    def resume_message(self, identity: str) -> None:
        self._message(identity)
        if identity not in self._suspended:
            raise QueueActionRefused(f"message {identity} is not suspended")
        self._suspended.discard(identity)
        for queue in self.queues.values():
            mine = [item for item in queue.parked if item[0].queue_id == identity]
            if mine:
                queue.parked = [item for item in queue.parked if item[0].queue_id != identity]
                queue.items.extend(mine)
                self._kick(queue)
        log.info("{queue_id}: resumed by an admin", queue_id=identity)

    def remove_message(self, identity: str, ndr: bool):
        """
        Exchange's Remove-Message: every pending recipient fails with
        "deleted by administrative action" (the sender gets an NDR only
        with C{ndr}). Refused while a delivery of it is in flight: its
        outcome could be a delivery; suspend the message first.
        """
        message = self._message(identity)
        if any(item[0].queue_id == identity for q in self.queues.values() for item in q.active.values()):
            raise QueueActionRefused(f"message {identity} is being delivered now; suspend it "
                                     "(Suspend-Message) and remove it then")
        for queue in self.queues.values():
            queue.items = collections.deque(i for i in queue.items if i[0].queue_id != identity)
            queue.waiting = [i for i in queue.waiting if i[0].queue_id != identity]
            queue.parked = [i for i in queue.parked if i[0].queue_id != identity]
        done = self._live[identity]
        # Exchange says 4.3.2 here; a failed DSN must carry a class 5 code (RFC 3464 §2.3.4)
        outcomes = [Outcome(i, "failed", _ADMIN_REMOVED, "5.3.2") for i in message.pending() if i not in done]
        log.info("{queue_id}: removed by an admin ({ndr})", queue_id=identity,
                 ndr="the sender gets an NDR" if ndr else "without NDR")
        return self._record(message, outcomes, bounce=ndr)

    def export_message(self, identity: str):
        message = self._message(identity)
        return self.spool.run_delivery(message.read_data)

    # -- running -----------------------------------------------------------

    def _kick(self, queue: DeliveryQueue) -> None:
        """Start attempts while the queue may run, has work and has room."""
        if not self.running:
            return
        limit = getattr(queue.agent or self.agents.get(queue.hop.connector), "concurrency", self.concurrency)
        while queue.status in (QueueStatus.Ready, QueueStatus.Active) and queue.items \
                and queue.in_flight < limit:
            item = queue.items.popleft()
            if item[0].queue_id in self._suspended:
                queue.parked.append(item)      # until an admin resumes the message
                continue
            queue.status = QueueStatus.Active
            queue.in_flight += 1
            queue.active[id(item)] = item
            self._attempt(queue, item)

    def startService(self) -> None:
        super().startService()
        self._sweeper = task.LoopingCall(self._sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(SWEEP_INTERVAL, now=False)
        for queue in list(self.queues.values()):
            self._kick(queue)

    def stopService(self):
        super().stopService()
        if self._sweeper.running:
            self._sweeper.stop()
        for queue in self.queues.values():
            self._cancel_retry(queue)
        for call in self._schedule_calls.values():
            if call.active():
                call.cancel()
        self._schedule_calls.clear()

    # -- expiry ------------------------------------------------------------

    def _expired(self, message) -> bool:
        return self.clock.seconds() - message.received_at >= self.policy.message_expiration_timeout

    def _expire(self, queue: DeliveryQueue, item, reason: str = ""):
        """
        Give up on these recipients: NDR 4.4.7 with the last reason we had.
        Fires with the recipients whose NDR could not be queued (to try again).
        """
        message, indexes = item
        done = self._live.get(message.queue_id)
        indexes = [i for i in indexes if done is not None and i not in done]
        if not indexes:
            return defer.succeed([])
        reason = reason or queue.last_error or _HOLD_TEXT.get(queue.hold_reason, queue.hold_reason) \
            or "not delivered in time"
        hours = self.policy.message_expiration_timeout / 3600
        detail = f"Message expired after {hours:g} hours; last error: {reason}"
        outcomes = [Outcome(i, "failed", f"4.4.7 {detail}", "4.4.7") for i in indexes]
        return self._record(message, outcomes)

    def _notify_delays(self, queue: DeliveryQueue) -> None:
        if self.bouncer is None:
            return
        now = self.clock.seconds()
        reason = queue.last_error or _HOLD_TEXT.get(queue.hold_reason, queue.hold_reason) or "not delivered yet"
        due = []
        for message, indexes in list(queue.items) + list(queue.waiting):
            age = now - message.received_at
            if age < self.policy.delay_notification_timeout or self._expired(message):
                continue
            told = self._delay_notified.setdefault(message.queue_id, set())
            late = [i for i in indexes if i not in told]
            if not late:
                continue
            told.update(late)     # at once: the next sweep must not send it again
            due.append((message, late))

        def notify(message, late):
            told = self._delay_notified.setdefault(message.queue_id, set())
            retry_until = message.received_at + self.policy.message_expiration_timeout
            d = self.bouncer.delay(message, late, f"4.4.7 {reason}", retry_until)
            d.addCallback(lambda _: self.spool.record(message, late, "delay-notified"))
            d.addErrback(lambda f: (log.failure("delay notice for {queue_id}", f, queue_id=message.queue_id),
                                    told.difference_update(late)))
            return d

        if due:
            self._with_envelopes(due, notify)

    def _sweep(self) -> None:
        """
        Expire what waits in queues that are not trying (held, suspended,
        retrying), and send one delay notice per recipient once a message
        has waited delay_notification_timeout.
        """
        for queue in list(self.queues.values()):
            try:
                self._notify_delays(queue)
            except Exception:
                # a LoopingCall stops for good on an exception: expiry must go on
                log.failure("queue {hop}: delay notices failed", hop=str(queue.hop))
            if not any(self._expired(item[0]) for item in queue.items):
                continue
            keep, expired = collections.deque(), []
            for item in queue.items:      # one pass: a million expiring together cost no more than one
                (expired if self._expired(item[0]) else keep).append(item)
            queue.items = keep
            self._with_envelopes(expired, lambda message, left, queue=queue: self._expire_again(queue, message, left))

    def _expire_again(self, queue: DeliveryQueue, message, indexes):
        """Expire these recipients; those whose NDR could not be queued wait in the queue for the next sweep."""
        d = self._expire(queue, (message, indexes))
        d.addCallback(lambda retry: queue.items.append((message, retry)) if retry else None)
        d.addErrback(lambda f: log.failure("expiring {queue_id}", f, queue_id=message.queue_id))
        return d

    def _cancel_retry(self, queue: DeliveryQueue) -> None:
        if queue._retry_call is not None and queue._retry_call.active():
            queue._retry_call.cancel()
        queue._retry_call = None
        queue.next_retry = None


    @defer.inlineCallbacks
    def _attempt(self, queue: DeliveryQueue, item):
        message, indexes = item
        done = self._live.get(message.queue_id)
        indexes = [i for i in indexes if done is not None and i not in done]
        pinned = False
        try:
            if indexes and self._expired(message):
                retry = yield self._expire(queue, (message, indexes))
                if retry:
                    self._later(queue, (message, retry))
            elif indexes and queue.agent is None and queue.hop.connector not in self.agents:
                # its send connector went away in a reload while it waited here
                self._route(message, indexes)
            elif indexes:
                # the message becomes active: its envelope in memory until the attempt is over
                if message.loaded_envelope() is None:
                    envelope = yield self.spool.run_delivery(message.read_envelope)
                    message.pin(envelope)
                    pinned = True
                    # read back on a thread: another hop's outcomes may have come meanwhile
                    done = self._live.get(message.queue_id)
                    indexes = [i for i in indexes if done is not None and i not in done]
                else:
                    message.pin()
                    pinned = True
                if indexes:
                    outcomes = yield (queue.agent or self.agents[queue.hop.connector]).deliver(message, indexes)
                    self._answered(queue.hop)          # a host answered: if the hop was down, it is up again
                    left = set(indexes) - {o.index for o in outcomes if o.status in ("delivered", "failed")}
                    # never raises: delivered recipients count whatever happens to the reports
                    retry = yield self._record(message, outcomes, queue.hop)
                    self._track_deferred(message, [o for o in outcomes if o.index in left], queue.hop)
                    left |= set(retry)
                    if left:
                        self._later(queue, (message, sorted(left)))
        except Exception as e:
            # nothing is lost: the item goes back to the head of its queue
            queue.items.appendleft(item)
            queue.last_error = str(e) or e.__class__.__name__
            log.warn("queue {hop}: transient failure for {queue_id}: {error}",
                     hop=str(queue.hop), queue_id=message.queue_id, error=queue.last_error)
            self._track_deferred(message, [Outcome(i, "deferred", queue.last_error) for i in indexes], queue.hop)
            if self._remote_triggered(queue.hop):
                # the site cannot be reached now: held until it asks again
                queue.status, queue.hold_reason, queue.triggered, queue.agent = QueueStatus.Held, TRIGGER, False, None
            elif queue.status is QueueStatus.Active:
                self._schedule_retry(queue)
            self._note_retry(message, indexes, queue.next_retry)
            if isinstance(e, NextHopUnreachable) and not self._remote_triggered(queue.hop):
                self._fail_over(queue)
        else:
            queue.failures = 0
            if queue.status is QueueStatus.Active:
                queue.last_error = ""
        finally:
            if pinned:
                message.unpin()
            queue.in_flight -= 1
            del queue.active[id(item)]
        if queue.status is QueueStatus.Active:
            if queue.in_flight == 0:
                queue.status = QueueStatus.Ready
            self._kick(queue)
        self._end_of_run(queue)

    def _later(self, queue: DeliveryQueue, item) -> None:
        """Recipients the next hop deferred try again after the retry interval."""
        def again():
            if item not in queue.waiting:
                return                # taken along by a run the site asked for meanwhile
            queue.waiting.remove(item)
            queue.items.append(item)
            self._kick(queue)

        queue.waiting.append(item)   # visible to the sweep (delay notices) meanwhile
        self._rest(item[0])
        self.clock.callLater(self.policy.message_retry_interval, again)
        self._note_retry(item[0], item[1], self.clock.seconds() + self.policy.message_retry_interval)

    def _note_retry(self, message, indexes, at) -> None:
        if at is None or not indexes:
            return
        self.spool.record(message, indexes, "retry", at=at, durable=False).addErrback(
            lambda f: log.failure("noting the retry time of {queue_id}", f, queue_id=message.queue_id))

    def _schedule_retry(self, queue: DeliveryQueue) -> None:
        """Exchange's schedule: a few quick glitch retries, then the long interval."""
        queue.failures += 1
        p = self.policy
        delay = (p.queue_glitch_retry_interval if queue.failures <= p.queue_glitch_retry_count
                 else p.outbound_connection_failure_retry_interval)
        queue.status = QueueStatus.Retry
        queue.next_retry = self.clock.seconds() + delay

        def retry():
            queue._retry_call = None
            queue.next_retry = None
            if queue.status is QueueStatus.Retry:
                queue.status = QueueStatus.Ready
                self._kick(queue)

        queue._retry_call = self.clock.callLater(delay, retry)

    def _track(self, message, event_id: str, outcomes, hop: NextHop | None = None) -> None:
        """One tracking event for these recipients of C{message} (L{exedge.interfaces.IMessageTracking})."""
        if not outcomes:
            return
        try:
            env = message.envelope      # pinned by the caller, except after a failure to read it back
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("{queue_id}: no {event} tracking event: its envelope cannot be read ({error})",
                      queue_id=message.queue_id, event=event_id, error=e)
            return
        connector = self._connectors.get(hop.connector) if hop is not None else None
        if event_id == "SEND" and connector is not None and connector.drop_directory:
            event_id = "DELIVER"
        remotes = sorted({o.remote for o in outcomes if o.remote})
        self.tracking.track(TrackingEvent(
            event_id=event_id, source="SMTP" if event_id in ("SEND", "DEFER") else "QUEUE",
            internal_message_id=message.queue_id, message_id=env.message_id, sender=env.sender,
            return_path=env.sender, recipients=tuple(env.recipients[o.index].address for o in outcomes),
            recipient_status=tuple(o.detail for o in outcomes), total_bytes=env.size,
            recipient_count=len(env.recipients), subject=env.subject, server_hostname=", ".join(remotes),
            connector_id=hop.connector if hop is not None else "", source_context=str(hop) if hop is not None else "",
            directionality="Incoming"))

    def _track_deferred(self, message, outcomes, hop: NextHop) -> None:
        self._track(message, "DEFER", [o for o in outcomes if o.status not in ("delivered", "failed")], hop)

    def _record(self, message, outcomes, hop: NextHop | None = None, bounce: bool = True) -> defer.Deferred:
        """
        Take final outcomes into account. Delivered recipients count at once,
        whatever happens next; a failed recipient counts only once its NDR
        is in the spool. Never raises: fires with the failed recipients whose
        NDR could not be queued, for the caller to try again. The envelope
        is pinned meanwhile (the log, the reports, the tracking events); a
        compact message's is read back first, and if it cannot be, its
        failures wait (an attempt's delivered recipients always have theirs
        pinned already).
        """
        if message.queue_id not in self._live:
            return defer.succeed([])

        def unreadable(failure):
            log.failure("{queue_id}: reading its envelope to record outcomes; will try again", failure,
                        queue_id=message.queue_id)
            return [o.index for o in outcomes if o.status == "failed"]

        return self._using(message, self._record_pinned, message, outcomes, hop, bounce).addErrback(unreadable)

    @defer.inlineCallbacks
    def _record_pinned(self, message, outcomes, hop: NextHop | None, bounce: bool):
        done = self._live.get(message.queue_id)
        if done is None:
            return []     # another hop completed the message meanwhile
        final = [o for o in outcomes if o.status in ("delivered", "failed") and o.index not in done]
        by_status: dict[tuple, list[int]] = {}
        for o in final:
            by_status.setdefault((o.status, o.detail), []).append(o.index)
        for (status, detail), indexes in by_status.items():
            rcpts = ", ".join(message.envelope.recipients[i].address for i in indexes)
            # formatted here once (as the protocol log does); the fields stay for observers
            log.info(literal(f"{message.queue_id} -> {rcpts}: {status} {detail}"),
                     queue_id=message.queue_id, status=status, rcpts=rcpts, detail=detail)
        delivered = [o for o in final if o.status == "delivered"]
        failed = [o for o in final if o.status == "failed"]
        retry: list[int] = []
        if self.bouncer is not None and failed and bounce:
            try:
                # the NDR is safe in the spool before the failure is noted
                yield self.bouncer.bounce(message, failed)
            except Exception:
                log.failure("NDR for {queue_id}; will try again", queue_id=message.queue_id)
                retry = [o.index for o in failed]
                failed = []
        if self.bouncer is not None and any(o.action for o in delivered):
            try:
                yield self.bouncer.success(message, delivered)
            except Exception:
                # a lost success notice must never turn a delivery into a retry
                log.failure("success notice for {queue_id}", queue_id=message.queue_id)
        taken = delivered + failed
        self._track(message, "SEND", delivered, hop)
        self._track(message, "FAIL" if bounce else "DROP", failed, hop)   # DROP: removed by an admin without NDR
        done = self._live.get(message.queue_id)
        if done is None:
            return retry          # another hop completed the message while the reports were queued
        done = self._live[message.queue_id] = done | {o.index for o in taken}
        if len(done) >= message.recipient_count:
            # complete: no need to note outcomes first, nor to wait for the
            # unlink; a crash before it means a second delivery, never none
            del self._live[message.queue_id]
            self._messages.pop(message.queue_id, None)
            self._suspended.discard(message.queue_id)
            self._delay_notified.pop(message.queue_id, None)
            self.spool.remove(message).addErrback(
                lambda f: log.failure("removing {queue_id}", f, queue_id=message.queue_id))
            return retry
        try:
            noted: dict[tuple, list[int]] = {}
            for o in taken:
                noted.setdefault((o.status, o.detail), []).append(o.index)
            for (status, detail), indexes in noted.items():
                yield self.spool.record(message, indexes, status, detail)
        except Exception:
            # known in memory; only a crash now could repeat these recipients
            log.failure("recording outcomes of {queue_id}", queue_id=message.queue_id)
        return retry

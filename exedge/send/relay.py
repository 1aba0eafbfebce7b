"""
Relaying over SMTP: through smart hosts (smart_hosts, dns_routing_enabled =
false) or to the MX hosts of each destination domain (DNS routing).

Deliveries are coalesced into sessions of up to
smtp_max_messages_per_connection messages, per destination: one for a
smart-host set, one per domain for DNS routing. Each session tries its
targets in order (smart hosts as configured, MX hosts by preference) and
fails over to the next on a connection failure or a greeting or EHLO that
is not accepted (a 4xx greeting, say); once a transaction has started on a
host, the outcomes are that host's. A 5xx to a recipient fails that
recipient only. A permanent answer from DNS (null MX, no such domain,
routing loop) fails the recipients with its status; when no target can be
reached, or DNS cannot answer now, the attempt fails and the queue retries.
When a STARTTLS handshake fails and TLS is not required for the hop, the
same host is tried again at once in plain text (Postfix at level "may").

A session that has sent what it was given stays open for a while (2 s, as
Postfix's smtp_connection_cache_time_limit) and takes later messages for
the same destination, until smtp_max_messages_per_connection: under a
steady load each message then costs one transaction, not a TCP connection,
a greeting and an EHLO as well. A new message goes to such an idle session
before a new one is opened; an idle session gives way when another
destination needs its connection slot.

With DNS routing an idle session also takes mail for another domain whose
first MX target is the same host, address and port, under the same TLS
policy (Postfix's connection cache by IP address, which
smtp_connection_cache_on_demand uses): a thousand domains hosted at one
provider then cost a transaction each, not a connection each. Such reuse
stays within one agent, i.e. one send connector, so its credentials,
HELO name, limits and protocol log are the same by construction; the TLS
policy is keyed by what it depends on (the host's name, and the domain
itself for a domain-secure one, which never shares), and a session that
fell back to plain text after a failed handshake is not offered to other
domains. The host's name is part of the key because outcomes and
DomainValidation name it. A domain waiting while every connection slot
is taken still has its MX looked up (up to max_connections more sessions
in their lookup), so that it can find such a session; when it must open
a connection of its own, an idle one at another host gives way.
"""

from __future__ import annotations

import collections
import ipaddress
import itertools

from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from exedge import tls
from exedge.interfaces import IDeliveryAgent
from exedge.interfaces import NextHopUnreachable, Outcome
from exedge.logs import ProtocolLog
from exedge.logs.protocol import new_session_id

from .client import OutboundMessage, OutboundRecipient, SMTPClient, Status, Timeouts
from .mx import RoutingFailure, TransientDNSFailure

log = Logger()


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class NoTargetReachable(Exception):
    """Every smart host or MX host refused or could not be reached: a transient failure."""


class AllHostsDown(NoTargetReachable, NextHopUnreachable):
    """
    Every host failed at the connection level (refused, timed out, lost or
    4xx before or at the greeting): the queue may fail over to a dearer
    connector. A host that answered, even to refuse (5xx, TLS or AUTH
    trouble), is not down.
    """


class _IdleSession:
    """A session with nothing to send, waiting for a message to its destination (or to its host: C{key})."""

    def __init__(self, room, entries, destination, key):
        self.room = room          # messages it may still take (None: no limit)
        self.entries = entries    # the session's key -> entry map
        self.destination = destination
        self.key = key            # (host, address, port, TLS policy) it is connected to; None: not shared
        self.timer = None
        self.d = None
        self.loading = None       # the read of what it was given


@implementer(IDeliveryAgent)
class RelayAgent:
    concurrency = 256          # items in flight per queue; sessions take them in groups
    max_connections = 20       # concurrent sessions per destination (Exchange: MaxPerDomainOutboundConnections)
    idle_time = 2.0            # seconds an open session waits for more (Postfix: smtp_connection_cache_time_limit)

    def __init__(self, connector, *, helo: str, run, reactor, mx=None, resolver=None,
                 connect_timeout: float = 30.0, credentials=None, client_certificate=None, clock=None,
                 protocol_log=None, metrics=None):
        """
        C{mx}: an L{exedge.send.mx.MXResolver} for DNS routing; None for
        smart hosts. C{resolver}: the same, to find the addresses of smart
        hosts given by name through [server].dns_servers (None: the
        system's resolver). C{reactor} opens connections; C{clock} (by
        default the reactor) times sessions and idle connections.
        C{protocol_log}: the send protocol log files (an
        L{exedge.logs.CsvLog}) its sessions are written to when the
        connector's protocol_logging_level is Verbose. C{metrics}: an
        L{exedge.metrics.Metrics} that counts the STARTTLS handshakes.
        """
        self.metrics = metrics
        self.protocol_log = protocol_log if getattr(connector, "protocol_logging_level", "None") == "Verbose" else None
        self.clock = clock if clock is not None else reactor
        self.resolver = resolver
        self.credentials = credentials      # (user, password) for smart-host AUTH, or None
        self.client_certificate = client_certificate   # presented to next hops that ask
        self._tls: dict[tuple, tuple] = {}  # (host, domain) -> (client TLS options, required)
        self.connector = connector
        self.helo = helo
        self.run = run
        self.reactor = reactor
        self.mx = mx
        self.connect_timeout = connect_timeout
        self._pending: dict[str, collections.deque] = {}   # destination -> (message, indexes, Deferred)
        self._idle: dict[str, list[_IdleSession]] = {}
        self._idle_at: dict[tuple, list[_IdleSession]] = {}    # the same sessions by what they are connected to
        self._active = 0          # sessions running: looking up, connected or idle
        self._open = 0            # of those, sessions holding a connection
        self._keys = itertools.count()
        self._pump_call = None

    def deliver(self, message, recipients):
        d = defer.Deferred()
        recipients = list(recipients)
        self._pending.setdefault(self._destination(message, recipients), collections.deque()).append(
            (message, recipients, d))
        self._pump_soon()
        return d

    def _destination(self, message, indexes) -> str:
        """The session key: the domain for DNS routing (one queue per next hop shares it), else one line."""
        return message.envelope.recipients[indexes[0]].address.rpartition("@")[2] if self.mx else ""

    def _pump_soon(self) -> None:
        """
        Hand out new work once the current callbacks are done: a session
        that has just finished a message (and told its caller, who may have
        queued the next one at once) is then waiting for it, and gets it
        instead of a new connection. It also hands out a burst in one go.
        """
        if self._pump_call is None:
            self._pump_call = self.reactor.callLater(0, self._pump)

    def _claim(self, destination: str, room) -> list:
        waiting = self._pending.get(destination)
        batch = []
        while waiting and (room is None or len(batch) < room):
            batch.append(waiting.popleft())
        if not waiting:
            self._pending.pop(destination, None)
        return batch

    def _pump(self) -> None:
        self._pump_call = None
        per_session = self.connector.smtp_max_messages_per_connection
        for destination in list(self._pending):
            # an open connection first
            while self._pending.get(destination) and self._idle.get(destination):
                self._wake(destination, self._idle[destination][0])
            while self._pending.get(destination) and self._room():
                batch = self._claim(destination, per_session)
                self._active += 1
                self._session(destination, batch).addBoth(self._session_over)

    def _room(self) -> bool:
        """
        May another session start? Below max_connections, yes; above, while
        idle sessions exist, up to as many again: such a session looks up
        its MX and either finds an idle session at its host or, needing a
        connection, makes an idle one give way (L{_make_room}).
        """
        if self._active < self.max_connections:
            return True
        return bool(self._idle) and self._active < 2 * self.max_connections

    def _make_room(self) -> bool:
        """
        Before a connection is opened: at max_connections open, an idle
        session gives way (its QUIT is on the wire as the new one
        connects); False when every open session is busy.
        """
        if self._open < self.max_connections:
            return True
        for idle in self._idle.values():
            self._wake(idle[0].destination, idle[0])
            return True
        return False

    def _unidle(self, waiter: _IdleSession) -> None:
        """C{waiter} leaves the idle sessions (woken, handed work, or its connection gone)."""
        for index, key in ((self._idle, waiter.destination), (self._idle_at, waiter.key)):
            waiting = index.get(key)
            if waiting and waiter in waiting:
                waiting.remove(waiter)
                if not waiting:
                    del index[key]
        if waiter.timer.active():
            waiter.timer.cancel()

    def _wake(self, destination: str, waiter: _IdleSession) -> None:
        """Give an idle session what waits for its destination (nothing: it ends)."""
        self._hand(waiter, self._claim(destination, waiter.room))

    def _hand(self, waiter: _IdleSession, batch) -> None:
        """An idle session takes C{batch} (its own destination's, or another's at its host)."""
        self._unidle(waiter)
        waiter.loading = self._load(batch, waiter.entries)
        waiter.loading.chainDeferred(waiter.d)

    def _source(self, destination: str, entries: dict, key=None):
        """
        What an open session asks for more: queued messages now, or wait a
        while for some; C{key}: what it is connected to, under which other
        destinations may find it (None: not shared).
        """
        def source(room):
            batch = self._claim(destination, room)
            if batch:
                return self._load(batch, entries)
            waiter = _IdleSession(room, entries, destination, key)

            def cancel(_):
                # the connection went away while idle, or while reading what it was given
                if waiter.loading is not None:
                    waiter.loading.cancel()
                self._unidle(waiter)

            waiter.d = defer.Deferred(cancel)
            idle = min(self.idle_time, self.connector.connection_inactivity_timeout)
            waiter.timer = self.clock.callLater(idle, lambda: self._wake(destination, waiter))
            self._idle.setdefault(destination, []).append(waiter)
            if key is not None:
                self._idle_at.setdefault(key, []).append(waiter)
            if self._pending:
                self._pump_soon()      # work for another destination may be for this host
            return waiter.d
        return source

    def _load(self, batch, entries: dict):
        """
        Read the messages of C{batch} (L{load}) into outbound messages keyed
        in C{entries}. Cancelled meanwhile (the connection was lost), the
        batch goes back to the head of the line.
        """
        if not batch:
            return defer.succeed([])
        cancelled = []

        def cancel(_):
            cancelled.append(True)
            self._requeue(batch)

        d = defer.Deferred(cancel)

        def loaded(outbound):
            if not cancelled:
                d.callback(outbound)

        load(batch, self.run, entries, self._keys, cancelled=lambda: bool(cancelled)).addCallback(loaded)
        return d

    def _requeue(self, batch) -> None:
        """Entries no session took go back to the head of their line."""
        for entry in reversed(batch):
            message, indexes, _ = entry
            self._pending.setdefault(self._destination(message, indexes), collections.deque()).appendleft(entry)
        self._pump_soon()

    @defer.inlineCallbacks
    def _targets(self, destination: str, errors: list):
        """[(host, address, port)] in the order to try; names that do not resolve noted in C{errors}."""
        port = self.connector.port
        if self.mx is not None:
            found = yield self.mx.targets(destination)
            return [(host, address, port) for host, address in found]
        targets = []
        for host, p in self.connector.smart_hosts:
            if _is_address(host) or self.resolver is None:
                targets.append((host, host, p or port))
                continue
            try:
                addresses = yield self.resolver.addresses(host)
            except TransientDNSFailure as e:
                errors.append(f"{host}: {e}")
                continue
            if not addresses:
                errors.append(f"{host}: no A or AAAA record")
            targets += [(host, address, p or port) for address in addresses]
        return targets

    def _count_tls(self, result) -> None:
        if self.metrics is not None and (result.tls or result.tls_failed):
            self.metrics.tls.labels(self.connector.name, "send", "ok" if result.tls else "failed").inc()

    def _tls_key(self, host: str, domain: str) -> tuple:
        """
        What the STARTTLS policy towards C{host} for mail to C{domain}
        depends on (L{tls.client_policy}): the host, and the domain only
        when it is domain-secure. Mail to two domains with the same key may
        share a session.
        """
        domain = domain.lower()
        return (host, domain if domain in self.connector.tls_send_domain_secure_list else "")

    def _tls_for(self, host: str, domain: str) -> tuple:
        """The STARTTLS policy towards C{host} for mail to C{domain}, built once per L{_tls_key}."""
        key = self._tls_key(host, domain)
        if key not in self._tls:
            self._tls[key] = tls.client_policy(self.connector, host, domain, self.client_certificate)
        return self._tls[key]

    def _idle_for(self, destination: str, targets) -> _IdleSession | None:
        """An idle session connected to the first of C{targets} under C{destination}'s TLS policy, if any."""
        if self.mx is None or not targets or not self._idle_at:
            return None
        host, address, port = targets[0]
        waiting = self._idle_at.get((host, address, port, self._tls_key(host, destination)))
        return waiting[0] if waiting else None

    def _endpoint(self, address: str, port: int):
        # an address needs no name lookup (HostnameEndpoint would still
        # send it through getaddrinfo on a thread)
        if _is_address(address):
            kind = endpoints.TCP6ClientEndpoint if ":" in address else endpoints.TCP4ClientEndpoint
            return kind(self.reactor, address, port, timeout=self.connect_timeout)
        return endpoints.HostnameEndpoint(self.reactor, address, port, timeout=self.connect_timeout)

    def _session_over(self, _) -> None:
        self._active -= 1
        self._pump()

    @defer.inlineCallbacks
    def _session(self, destination: str, batch):
        entries: dict = {}
        holds = []        # [True] once the session holds a connection slot
        try:
            yield self._converse(destination, batch, entries, holds)
        except Exception:
            # a transient failure for every message this session was given
            failure = Failure()
            for _, _, d in batch + list(entries.values()):
                if not d.called:
                    d.errback(failure)
        finally:
            if holds:
                self._open -= 1

    @defer.inlineCallbacks
    def _converse(self, destination: str, batch, entries: dict, holds: list):
        errors: list[str] = []
        try:
            targets = yield self._targets(destination, errors)
        except RoutingFailure as e:
            for message, indexes, d in batch:
                d.callback([Outcome(i, "failed", f"{e.status} {e.text}", e.status) for i in indexes])
            return
        waiter = self._idle_for(destination, targets)
        if waiter is not None:
            # an open session at the same host takes it (and gives back what exceeds its room)
            room = len(batch) if waiter.room is None else waiter.room
            if batch[room:]:
                self._requeue(batch[room:])
            self._hand(waiter, batch[:room])
            return
        if not self._make_room():
            self._requeue(batch)      # every connection is busy: it waits for the next to end
            return
        holds.append(True)
        self._open += 1
        outbound = yield self._load(batch, entries)
        if not outbound:
            return
        down = True       # every host failed at the connection level so far
        for host, address, port in targets:
            remote = f"{host}:{port}" if port != 25 else host
            tls_options, tls_required = self._tls_for(host, destination)
            key = (host, address, port, self._tls_key(host, destination)) if self.mx is not None else None
            try:
                client = yield self._connect(address, port, remote, outbound, destination, entries,
                                             tls_options, tls_required, key)
            except Exception as e:
                errors.append(f"{host}:{port}: {e.__class__.__name__}: {e}")
                continue
            result = yield client.result
            self._count_tls(result)
            if result.tls_failed and client.tls_optional:
                # opportunistic TLS: a failed handshake must not stop the
                # mail (Postfix at level "may", Exim's tls_tempfail_tryclear)
                log.warn("{remote}: STARTTLS failed ({error}); TLS is not required for this hop, "
                         "falling back to plain text", remote=remote, error=result.error)
                try:
                    client = yield self._connect(address, port, remote, outbound, destination, entries, None, False,
                                                 None)
                except Exception as e:
                    errors.append(f"{host}:{port}: STARTTLS failed ({result.error}), "
                                  f"then in plain text: {e.__class__.__name__}: {e}")
                    continue
                result = yield client.result
                self._count_tls(result)
            if not result.started:
                errors.append(f"{host}:{port}: {result.error}")
                # no greeting at all, or a 4xx one: the host is down; anything later is an answer
                down = down and (not result.greeting or 400 <= result.error_code < 500 and
                                 not result.greeting.startswith("220"))
                continue
            # messages past the per-connection limit, or not begun when the
            # connection failed, wait for the next session
            untried = [entries.pop(m.key) for m in result.untried]
            if untried:
                self._requeue(untried)
            return
        raise (AllHostsDown if down and targets else NoTargetReachable)("; ".join(errors) or "no smart hosts")

    def _connect(self, address: str, port: int, remote: str, outbound, destination: str, entries: dict,
                 tls_options, tls_required: bool, key):
        """
        A session with C{outbound} to one host: fires with its client once
        connected. C{key}: what other destinations may find it under when
        idle (None: only its own).
        """
        client = SMTPClient(outbound, helo=self.helo, clock=self.clock,
                            timeouts=Timeouts().capped(self.connector.connection_inactivity_timeout),
                            max_messages=self.connector.smtp_max_messages_per_connection,
                            source=self._source(destination, entries, key),
                            tls=tls_options, tls_required=tls_required, credentials=self.credentials,
                            auth_requires_tls=self.connector.smart_host_auth_mechanism != "BasicAuth",
                            peer=remote, protocol_log=self._session_log())
        client.on_settled = lambda result: self._settled(entries, result, client.session.extensions, remote)
        factory = protocol.Factory.forProtocol(lambda: client)
        factory.noisy = False     # "Starting factory" per outbound connection says nothing the log needs
        return self._endpoint(address, port).connect(factory).addCallback(lambda _: client)

    def _session_log(self):
        """What makes a session's protocol log once it is connected (None: not Verbose)."""
        if self.protocol_log is None:
            return None
        session, name, file = new_session_id(), self.connector.name, self.protocol_log
        return lambda local, remote: ProtocolLog(name, session, True, local, remote, file=file)

    def _settled(self, entries: dict, message_result, extensions: dict, remote: str) -> None:
        message, indexes, d = entries.pop(message_result.message.key)
        d.callback(outcomes_of(message_result, extensions, remote))


def load(batch, run, entries: dict, keys, cancelled=lambda: False) -> defer.Deferred:
    """
    The outbound messages of C{batch} ((stored message, recipient indexes,
    Deferred of its outcomes) each), read from memory if they were just
    committed, else by C{run} on the delivery thread; each is keyed in
    C{entries} by a key from C{keys}. A message that cannot be read fails
    alone, its Deferred failing (transiently: the queue retries it). When
    C{cancelled()} is true by the time the reading is done, the batch
    belongs to its caller again: nothing is keyed and nothing fires.
    """
    def read_all():
        datas = []
        for message, _, _ in batch:
            try:
                datas.append(message.read_data())
            except Exception:
                datas.append(Failure())
        return datas

    def loaded(datas):
        if cancelled():
            return []
        outbound = []
        for entry, data in zip(batch, datas):
            message, indexes, done = entry
            if isinstance(data, Failure):
                log.failure("reading {queue_id} from the spool", data, queue_id=message.queue_id)
                done.errback(data)
                continue
            key = next(keys)
            entries[key] = entry
            env = message.envelope
            rcpts = tuple(OutboundRecipient(env.recipients[i].address, env.recipients[i].notify,
                                            env.recipients[i].orcpt, key=i) for i in indexes)
            outbound.append(OutboundMessage(env.sender, rcpts, data, env.ret, env.envid, key=key, auth=env.auth))
        return outbound

    def thread_failed(f):
        if not cancelled():
            for _, _, done in batch:
                done.errback(f)
        return []

    held = [message.in_memory() for message, _, _ in batch]
    if all(data is not None for data in held):
        return defer.succeed(loaded(held))      # just committed: no trip to the disk (see RecentData)
    return run(read_all).addCallbacks(loaded, thread_failed)


def outcomes_of(message_result, extensions: dict, remote: str) -> list:
    """One L{Outcome} per recipient of a message a session settled."""
    # each result names its recipient's index: the same address twice
    # (with different NOTIFY or ORCPT, say) cannot swap outcomes
    outcomes = []
    for r in message_result.recipients:
        status = {Status.delivered: "delivered", Status.failed: "failed", Status.deferred: "deferred"}[r.status]
        action = "" if status != "delivered" or "DSN" in extensions else "relayed"
        # the next hop's reply as it was sent (the NDR quotes it in
        # Diagnostic-Code); the enhanced code, its or our default, goes apart
        detail = r.reply or f"{r.code} {r.enhanced} {r.text}".strip()
        outcomes.append(Outcome(r.key, status, detail, r.enhanced, remote, action))
    return outcomes

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
"""

from __future__ import annotations

from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger
from zope.interface import implementer

from exedge.interfaces import IDeliveryAgent
from exedge.queue.manager import Outcome

from .client import OutboundMessage, OutboundRecipient, SMTPClient, Status, Timeouts
from .mx import RoutingFailure

log = Logger()


class NoTargetReachable(Exception):
    """Every smart host or MX host refused or could not be reached: a transient failure."""


@implementer(IDeliveryAgent)
class RelayAgent:
    concurrency = 256          # items in flight per queue; sessions take them in groups
    max_connections = 20       # concurrent sessions per destination (Exchange: MaxPerDomainOutboundConnections)

    def __init__(self, connector, *, helo: str, run, reactor, mx=None, connect_timeout: float = 30.0):
        """C{mx}: an L{exedge.send.mx.MXResolver} for DNS routing; None for smart hosts."""
        self.connector = connector
        self.helo = helo
        self.run = run
        self.reactor = reactor
        self.mx = mx
        self.connect_timeout = connect_timeout
        self._pending: dict[str, list] = {}   # destination -> [(message, indexes, Deferred)]
        self._active = 0

    def deliver(self, message, recipients):
        d = defer.Deferred()
        recipients = list(recipients)
        # one queue per next hop: for DNS routing, every recipient shares a domain
        destination = message.envelope.recipients[recipients[0]].address.rpartition("@")[2] if self.mx else ""
        self._pending.setdefault(destination, []).append((message, recipients, d))
        self._pump()
        return d

    def _pump(self) -> None:
        per_session = self.connector.smtp_max_messages_per_connection
        for destination in list(self._pending):
            while self._pending.get(destination) and self._active < self.max_connections:
                waiting = self._pending[destination]
                batch, self._pending[destination] = waiting[:per_session], waiting[per_session:]
                if not self._pending[destination]:
                    del self._pending[destination]
                self._active += 1
                d = self._session(destination, batch)
                d.addErrback(lambda f, batch=batch: self._fail(batch, f))
                d.addBoth(self._session_over)

    @defer.inlineCallbacks
    def _targets(self, destination: str):
        port = self.connector.port
        if self.mx is None:
            return [(host, host, p or port) for host, p in self.connector.smart_hosts]
        found = yield self.mx.targets(destination)
        return [(host, address, port) for host, address in found]

    def _session_over(self, _) -> None:
        self._active -= 1
        self._pump()

    def _fail(self, batch, failure) -> None:
        for _, _, d in batch:
            if not d.called:
                d.errback(failure)

    @defer.inlineCallbacks
    def _session(self, destination: str, batch):
        try:
            targets = yield self._targets(destination)
        except RoutingFailure as e:
            for message, indexes, d in batch:
                d.callback([Outcome(i, "failed", f"{e.status} {e.text}", e.status) for i in indexes])
            return
        datas = yield self.run(lambda: [message.read_data() for message, _, _ in batch])
        outbound = []
        for n, ((message, indexes, _), data) in enumerate(zip(batch, datas)):
            env = message.envelope
            rcpts = tuple(OutboundRecipient(env.recipients[i].address, env.recipients[i].notify,
                                            env.recipients[i].orcpt) for i in indexes)
            outbound.append(OutboundMessage(env.sender, rcpts, data, env.ret, env.envid, key=n))
        errors = []
        for host, address, port in targets:
            client = SMTPClient(outbound, helo=self.helo, clock=self.reactor,
                                timeouts=Timeouts().capped(self.connector.connection_inactivity_timeout),
                                max_messages=self.connector.smtp_max_messages_per_connection)
            endpoint = endpoints.HostnameEndpoint(self.reactor, address, port, timeout=self.connect_timeout)
            try:
                yield endpoint.connect(protocol.Factory.forProtocol(lambda: client))
            except Exception as e:
                errors.append(f"{host}:{port}: {e.__class__.__name__}: {e}")
                continue
            result = yield client.result
            if not result.started:
                errors.append(f"{host}:{port}: {result.error}")
                continue
            self._deliver_results(destination, batch, result, f"{host}:{port}" if port != 25 else host)
            return
        raise NoTargetReachable("; ".join(errors) or "no smart hosts")

    def _deliver_results(self, destination: str, batch, result, remote: str) -> None:
        for message_result in result.messages:
            message, indexes, d = batch[message_result.message.key]
            by_address: dict[str, list[int]] = {}
            for i in indexes:
                by_address.setdefault(message.envelope.recipients[i].address, []).append(i)
            outcomes = []
            for r in message_result.recipients:
                slots = by_address.get(r.address)
                if not slots:
                    continue
                status = {Status.delivered: "delivered", Status.failed: "failed",
                          Status.deferred: "deferred"}[r.status]
                action = "" if status != "delivered" or "DSN" in result.extensions else "relayed"
                outcomes.append(Outcome(slots.pop(0), status, f"{r.code} {r.enhanced} {r.text}".strip(),
                                        r.enhanced, remote, action))
            d.callback(outcomes)
        # messages past the per-connection limit wait for the next session
        untried = [batch[m.key] for m in result.untried]
        if untried:
            self._pending[destination] = untried + self._pending.get(destination, [])

"""
Relaying through smart hosts (a send connector with smart_hosts and
dns_routing_enabled = false).

Deliveries of one queue are coalesced into sessions of up to
smtp_max_messages_per_connection messages. Each session tries the smart
hosts in order and fails over to the next on a connection failure or a
greeting or EHLO that is not accepted (a 4xx greeting, say); once a
transaction has started on a host, the outcomes are that host's. A 5xx to a
recipient fails that recipient only. When no host can be reached the whole
attempt fails and the queue retries later.
"""

from __future__ import annotations

from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger
from zope.interface import implementer

from exedge.interfaces import IDeliveryAgent
from exedge.queue.manager import Outcome

from .client import OutboundMessage, OutboundRecipient, SMTPClient, Status, Timeouts

log = Logger()


class NoSmartHostReachable(Exception):
    """Every smart host refused or could not be reached: a transient failure."""


@implementer(IDeliveryAgent)
class SmartHostAgent:
    concurrency = 256          # items in flight per queue; sessions take them in groups
    max_connections = 4        # concurrent sessions per connector

    def __init__(self, connector, *, helo: str, run, reactor, connect_timeout: float = 30.0):
        self.connector = connector
        self.hosts = connector.smart_hosts
        self.helo = helo
        self.run = run
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self._pending: list = []   # (message, indexes, Deferred)
        self._active = 0

    def deliver(self, message, recipients):
        d = defer.Deferred()
        self._pending.append((message, list(recipients), d))
        self._pump()
        return d

    def _pump(self) -> None:
        per_session = self.connector.smtp_max_messages_per_connection
        while self._pending and self._active < self.max_connections:
            batch, self._pending = self._pending[:per_session], self._pending[per_session:]
            self._active += 1
            d = self._session(batch)
            d.addErrback(lambda f, batch=batch: self._fail(batch, f))
            d.addBoth(self._session_over)

    def _session_over(self, _) -> None:
        self._active -= 1
        self._pump()

    def _fail(self, batch, failure) -> None:
        for _, _, d in batch:
            if not d.called:
                d.errback(failure)

    @defer.inlineCallbacks
    def _session(self, batch):
        datas = yield self.run(lambda: [message.read_data() for message, _, _ in batch])
        outbound = []
        for n, ((message, indexes, _), data) in enumerate(zip(batch, datas)):
            env = message.envelope
            rcpts = tuple(OutboundRecipient(env.recipients[i].address, env.recipients[i].notify,
                                            env.recipients[i].orcpt) for i in indexes)
            outbound.append(OutboundMessage(env.sender, rcpts, data, env.ret, env.envid, key=n))
        errors = []
        for host, port in self.hosts:
            client = SMTPClient(outbound, helo=self.helo, clock=self.reactor,
                                timeouts=Timeouts().capped(self.connector.connection_inactivity_timeout),
                                max_messages=self.connector.smtp_max_messages_per_connection)
            endpoint = endpoints.HostnameEndpoint(self.reactor, host, port, timeout=self.connect_timeout)
            try:
                yield endpoint.connect(protocol.Factory.forProtocol(lambda: client))
            except Exception as e:
                errors.append(f"{host}:{port}: {e.__class__.__name__}: {e}")
                continue
            result = yield client.result
            if not result.started:
                errors.append(f"{host}:{port}: {result.error}")
                continue
            self._deliver_results(batch, result, f"{host}:{port}" if port != 25 else host)
            return
        raise NoSmartHostReachable("; ".join(errors) or "no smart hosts")

    def _deliver_results(self, batch, result, remote: str) -> None:
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
                outcomes.append(Outcome(slots.pop(0), status, f"{r.code} {r.enhanced} {r.text}".strip(),
                                        r.enhanced, remote))
            d.callback(outcomes)
        # messages past the per-connection limit wait for the next session
        untried = [batch[m.key] for m in result.untried]
        self._pending[:0] = untried

"""
The server's metrics, for Prometheus (GET /metrics on the management
endpoint), with the official client library.

Every metric is named exedge_...; labels are bounded: connector names,
stage names, outcomes, never addresses or domains. Queue metrics are
summed per send connector (a DNS-routed connector has one queue per
recipient domain, and recipient domains are chosen by senders), read from
the queue manager when scraped rather than kept up to date on every
change.
"""

from __future__ import annotations

import collections

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from zope.interface import implementer

from exedge.interfaces import IMessageTracking


class Metrics:
    def __init__(self, clock=None):
        self.clock = clock
        self.registry = CollectorRegistry()
        # what receive workers count too (their sessions' TLS, AUTH, refusals,
        # pipeline and commits) lives in a registry of its own; the exposed
        # one shows it with the workers' counts added (_Merged)
        own = self._own = CollectorRegistry()
        r = self.registry
        self.connections = Counter("exedge_connections", "connections accepted, per receive connector",
                                   ["connector"], registry=r)
        self.sessions = Gauge("exedge_sessions", "SMTP sessions open now, per receive connector",
                              ["connector"], registry=r)
        self.received = Counter("exedge_messages_received", "messages accepted (250 after DATA), per receive connector",
                                ["connector"], registry=r)
        self.delivered = Counter("exedge_recipients_delivered", "recipients delivered, per send connector",
                                 ["connector"], registry=r)
        self.deferred = Counter("exedge_recipients_deferred", "recipients deferred for a retry, per send connector",
                                ["connector"], registry=r)
        self.bounced = Counter("exedge_recipients_failed", "recipients failed (an NDR), per send connector",
                               ["connector"], registry=r)
        self.commit = Histogram("exedge_spool_commit_seconds", "from the final dot to the message fsync'ed in the spool",
                                registry=own, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.verdicts = Counter("exedge_pipeline_verdicts", "pipeline stage verdicts that ended an SMTP event",
                                ["stage", "hook", "verdict"], registry=own)
        self.stage_latency = Histogram("exedge_pipeline_stage_seconds", "time a pipeline stage took to answer",
                                       ["stage"], registry=own,
                                       buckets=(.0005, .001, .005, .01, .05, .1, .5, 1, 5, 30))
        self.tls = Counter("exedge_tls_handshakes", "TLS handshakes, per connector, direction and outcome",
                           ["connector", "direction", "outcome"], registry=own)
        self.auth = Counter("exedge_auth_attempts", "AUTH attempts, per receive connector and outcome",
                            ["connector", "outcome"], registry=own)
        self.pressure_level = Gauge("exedge_back_pressure_level",
                                    "back pressure level per resource: 0 Normal, 1 Medium, 2 High",
                                    ["resource"], registry=r)
        self.pressure_value = Gauge("exedge_back_pressure_value",
                                    "last sample per resource: free_space and memory in bytes, inodes free, "
                                    "queue_length in messages", ["resource"], registry=r)
        self.pressure_transitions = Counter("exedge_back_pressure_transitions",
                                            "changes of a resource's back pressure level, per resource and new level",
                                            ["resource", "level"], registry=r)
        self.pressure_refused = Counter("exedge_back_pressure_refused",
                                        "MAIL FROM refused with 452 4.3.1 for back pressure (its level, or a SIZE= more than the "
                                        "spool can take above its High threshold), per receive connector",
                                        ["connector"], registry=own)
        self.data_refused = Counter("exedge_data_sessions_refused",
                                    "DATA refused with 451 4.3.2 (reason connector_limit: max_inbound_data_sessions; "
                                    "source_limit: max_inbound_data_sessions_per_source) and sessions in DATA evicted "
                                    "with 421 4.4.2 for a data rate below min_inbound_data_rate (evicted_slow), "
                                    "per receive connector and reason", ["connector", "reason"], registry=own)
        self._open: collections.Counter = collections.Counter()
        self._workers: dict = {}                     # a worker (its pid) -> its last snapshot, as samples
        self._retired: collections.Counter = collections.Counter()   # what workers now gone had counted
        self._worker_families = tuple(family.name for family in own.collect())   # what a worker's rows may name
        r.register(_Merged(self))

    # -- sessions ----------------------------------------------------------------

    def session_opened(self, connector: str) -> None:
        self.connections.labels(connector).inc()
        self.sessions.labels(connector).inc()
        self._open[connector] += 1

    def session_closed(self, connector: str) -> None:
        self.sessions.labels(connector).dec()
        self._open[connector] -= 1

    def sessions_now(self, connector: str | None = None) -> int:
        return self._open[connector] if connector is not None else sum(self._open.values())

    # -- back pressure (exedge.pressure) ------------------------------------------

    def back_pressure_sampled(self, resource: str, level: int, value: float) -> None:
        self.pressure_level.labels(resource).set(level)
        self.pressure_value.labels(resource).set(value)

    def back_pressure_changed(self, resource: str, level: str) -> None:
        self.pressure_transitions.labels(resource, level).inc()

    # -- messages ----------------------------------------------------------------

    def counting(self, tracking):
        """
        An L{IMessageTracking} that counts each event here and passes it
        on to C{tracking}: the messages received, delivered, deferred and
        failed are what the tracking log records, told once by the rooms.
        """
        return _Counting(self, tracking)

    # -- receive workers ---------------------------------------------------------

    def snapshot(self) -> list:
        """
        In a receive worker: what it has counted in C{_own} since it
        started, as JSON-able [sample name, labels, value] rows (cumulative,
        so a lost or repeated report changes nothing).
        """
        return [[sample.name, sample.labels, sample.value]
                for family in self._own.collect() for sample in family.samples
                if not sample.name.endswith("_created")]

    def worker_reported(self, worker: int, rows) -> None:
        """In the main process: the latest L{snapshot} of the worker with pid C{worker}, replacing its previous one."""
        if not isinstance(rows, list):
            raise ValueError("a metrics snapshot is a list")
        names = self._worker_families
        samples = {}
        for row in rows:
            name, labels, value = row
            if (not isinstance(name, str) or not isinstance(labels, dict)
                    or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
                    or isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf")
                    or not any(name == n or name.startswith(n + "_") for n in names)):
                raise ValueError(f"not a sample of a worker's metric: {row!r}"[:200])
            samples[(name, tuple(sorted(labels.items())))] = float(value)
        self._workers[worker] = samples

    def worker_gone(self, worker: int) -> None:
        """Worker C{worker} ended: what it counted stays in the sums (a counter never goes back)."""
        self._retired.update(self._workers.pop(worker, {}))

    def _from_workers(self) -> collections.Counter:
        total = collections.Counter(self._retired)
        for samples in self._workers.values():
            total.update(samples)
        return total

    # -- queues ------------------------------------------------------------------

    def watch_queues(self, admin) -> None:
        """Report C{admin}'s queues (an L{exedge.interfaces.IQueueAdmin}) at every scrape."""
        self.registry.register(_QueueCollector(admin, self.clock))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Merged:
    """
    The metrics in C{Metrics._own} as exposed: this process's own counts
    plus every receive worker's (and those of workers gone), sample by
    sample. Counters and histograms add up; a C{_created} sample is this
    process's own.
    """

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []            # collected at every scrape, like _QueueCollector

    def collect(self):
        extra = self.metrics._from_workers()
        for family in self.metrics._own.collect():
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            seen = set()
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                seen.add(key)
                merged.add_sample(sample.name, sample.labels, sample.value + extra.get(key, 0.0))
            for (name, labels), value in sorted(extra.items()):
                if (name, labels) not in seen and (name == family.name or name.startswith(family.name + "_")):
                    merged.add_sample(name, dict(labels), value)
            yield merged


class _QueueCollector:
    def __init__(self, admin, clock):
        self.admin = admin
        self.clock = clock

    def describe(self):
        return []     # read at scrape time only: nothing to check at registration

    def collect(self):
        length = GaugeMetricFamily("exedge_queue_messages", "messages waiting or in flight, per send connector's queues",
                                   labels=["connector"])
        oldest = GaugeMetricFamily("exedge_queue_oldest_message_age_seconds",
                                   "age of the oldest message waiting, per send connector's queues", labels=["connector"])
        queues = GaugeMetricFamily("exedge_queues", "delivery queues, per send connector and state",
                                   labels=["connector", "status"])
        counts, ages, states = collections.Counter(), {}, collections.Counter()
        now = self.clock.seconds()
        for q in self.admin.queue_infos():
            counts[q.hop.connector] += q.message_count
            states[(q.hop.connector, q.status)] += 1
            if q.oldest is not None:
                ages[q.hop.connector] = max(ages.get(q.hop.connector, 0.0), now - q.oldest)
        for connector, n in sorted(counts.items()):
            length.add_metric([connector], n)
            oldest.add_metric([connector], ages.get(connector, 0.0))
        for (connector, status), n in sorted(states.items()):
            queues.add_metric([connector, status], n)
        yield length
        yield oldest
        yield queues


@implementer(IMessageTracking)
class _Counting:
    def __init__(self, metrics: Metrics, tracking):
        self.metrics = metrics
        self.tracking = tracking

    def track(self, event) -> None:
        m, kind, connector = self.metrics, event.event_id, event.connector_id
        if kind == "RECEIVE" and event.source == "SMTP":
            m.received.labels(connector).inc()
        elif kind in ("SEND", "DELIVER"):
            m.delivered.labels(connector).inc(len(event.recipients))
        elif kind == "DEFER":
            m.deferred.labels(connector).inc(len(event.recipients))
        elif kind == "FAIL":
            m.bounced.labels(connector).inc(len(event.recipients))
        self.tracking.track(event)

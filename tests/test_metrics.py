"""
/metrics against a running server, parsed with the Prometheus client's own
text parser: sessions, TLS, pipeline verdicts, queue lengths, all under
bounded labels.
"""

import os
import smtplib
import ssl

from prometheus_client.parser import text_string_to_metric_families

from harness import FROM_INTERNAL_ORG, FROM_INTERNET, LOCAL_DROP, server_config

from exedge.manage.client import ManagementClient


def scrape(server) -> dict:
    """{(sample name, frozenset of labels): value}."""
    old = os.getcwd()
    os.chdir(server.workdir)
    try:
        text = ManagementClient(server.config_path).request("GET", "/metrics", raw=True).decode()
    finally:
        os.chdir(old)
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_what_happened(start_server):
    internet = dict(FROM_INTERNET, tarpit_interval=0)
    internal = dict(FROM_INTERNAL_ORG, remote_ip_ranges=["127.0.0.2"], tarpit_interval=0)
    server = start_server(server_config(
        receive_connectors=(internet, internal), send_connectors=(LOCAL_DROP,),
        pipeline=[{"stage": "sender_filter", "blocked_domains": ["spam.test"]}]))

    before = value(scrape(server), "exedge_connections_total", connector="From Internet")   # the harness's probe
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.starttls(context=ssl._create_unverified_context())
        c.sendmail("alice@sender.test", ["bob@example.com"], b"Subject: one\r\n\r\nhi\r\n")
        code, _ = c.mail("mallory@spam.test")
        assert code == 554
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10, source_address=("127.0.0.2", 0)) as c:
        c.sendmail("alice@example.com", ["carol@nowhere.test"], b"Subject: held\r\n\r\nhi\r\n")
    server.wait_for(server.drop_files, what="the delivered message")

    # the drop file is there before the queue records the delivery: wait for both counts
    samples = server.wait_for(lambda: (s := scrape(server)) and
                              value(s, "exedge_sessions", connector="From Internet") == 0 and
                              value(s, "exedge_recipients_delivered_total", connector="Local drop") == 1 and s,
                              what="the sessions to end and the delivery to be counted")
    assert value(samples, "exedge_connections_total", connector="From Internet") == before + 1
    assert value(samples, "exedge_connections_total", connector="From Internal Org") == 1
    assert value(samples, "exedge_tls_handshakes_total", connector="From Internet", direction="receive",
                 outcome="ok") == 1
    assert value(samples, "exedge_pipeline_verdicts_total", stage="sender_filter", hook="on_mail",
                 verdict="reject") == 1
    assert value(samples, "exedge_pipeline_verdicts_total", stage="sender_filter", hook="on_mail",
                 verdict="continue") == 1      # alice passed; the internal session bypasses anti-spam
    assert value(samples, "exedge_pipeline_stage_seconds_count", stage="sender_filter") == 2
    assert value(samples, "exedge_messages_received_total", connector="From Internet") == 1
    assert value(samples, "exedge_messages_received_total", connector="From Internal Org") == 1
    assert value(samples, "exedge_recipients_delivered_total", connector="Local drop") == 1
    assert value(samples, "exedge_spool_commit_seconds_count") == 2
    assert value(samples, "exedge_queue_messages", connector="Unreachable") == 1
    assert value(samples, "exedge_queue_oldest_message_age_seconds", connector="Unreachable") >= 0
    assert value(samples, "exedge_queues", connector="Unreachable", status="Held") == 1
    # bounded labels: connector, stage, hook and outcome names, never an address or a domain
    for name, labels in samples:
        assert name.startswith("exedge_"), name
        for label, text in labels:
            assert "@" not in text and "nowhere.test" not in text, (name, label, text)


def test_a_workers_report_adds_to_the_main_process_counts_and_bad_rows_are_refused():
    import pytest

    from exedge.metrics import Metrics
    main, worker = Metrics(), Metrics()
    main.tls.labels("From Internet", "receive", "ok").inc()
    worker.tls.labels("From Internet", "receive", "ok").inc(2)
    worker.tls.labels("From Internet", "receive", "failed").inc()
    worker.commit.observe(0.003)
    main.worker_reported(101, worker.snapshot())
    main.worker_reported(101, worker.snapshot())              # cumulative: a repeated report changes nothing
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(main.render().decode()) for s in family.samples}
    ok = frozenset({"connector": "From Internet", "direction": "receive", "outcome": "ok"}.items())
    assert samples[("exedge_tls_handshakes_total", ok)] == 3
    assert samples[("exedge_tls_handshakes_total", ok - {("outcome", "ok")} | {("outcome", "failed")})] == 1
    assert samples[("exedge_spool_commit_seconds_count", frozenset())] == 1
    for bad in ([["exedge_connections_total", {"connector": "x"}, 1]],    # counted here, not by workers
                [["exedge_tls_handshakes_total", {}, -1]], [["exedge_tls_handshakes_total", {"a": 1}, 1]],
                [["exedge_tls_handshakes_total", {}, float("nan")]], {"not": "a list"}):
        with pytest.raises(ValueError):
            main.worker_reported(102, bad)
    main.worker_gone(101)
    assert "exedge_spool_commit_seconds_count 1.0" in main.render().decode()

"""
ETRN (RFC 1985): a site asks for the mail held for it by a send connector
with remote_triggered_delivery. On a StringTransport session with a real
queue manager (task.Clock) every reply code is reached; then end to end
over real SMTP: a held message reaches the site's sink after ETRN, and
hostile arguments get 501 and leave no trace.
"""

import os
import smtplib
import time

import pytest
from twisted.internet import defer, task

from exedge.config import ConfigError, loads
from exedge.dequeue import Triggers
from exedge.dequeue.etrn import Etrn
from exedge.interfaces import NextHop, Outcome
from exedge.pipeline import Entry, Pipeline
from exedge.queue import Envelope, QueueManager, QueueStatus, Recipient
from exedge.receive import SMTPServer
from exedge.routing import Router
from exedge.testing import StringSession
from harness import config_text

HELD = """
[[send_connectors]]
name = "To Branch"
address_spaces = ["branch.fabrikam.com", "*.branch.fabrikam.com"]
smart_hosts = ["192.0.2.10"]
dns_routing_enabled = false
remote_triggered_delivery = true

[[accepted_domains]]
domain_name = "branch.fabrikam.com"
domain_type = "InternalRelay"

[[accepted_domains]]
domain_name = "*.branch.fabrikam.com"
domain_type = "InternalRelay"
"""


class Agent:
    def __init__(self, name, hold=False):
        self.connector = type("C", (), {"name": name})()
        self.calls, self.pending, self.hold = [], [], hold

    def deliver(self, message, recipients):
        self.calls.append([message.envelope.recipients[i].address for i in recipients])
        d = defer.Deferred()
        outcomes = [Outcome(i, "delivered", "250 ok") for i in recipients]
        if self.hold:
            self.pending.append((d, outcomes))
        else:
            d.callback(outcomes)
        return d


class Site:
    """A session on a receive connector with the etrn stage, and the queue it asks."""

    def __init__(self, tmp_path, hold=False, **options):
        config = loads(config_text(2525, extra=HELD))
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.triggers = Triggers()
        self.config, self.tmp_path = config, tmp_path
        self.pipeline = Pipeline([Entry(Etrn(self.triggers, config.send_connectors, self.clock, **options))],
                                 self.clock)
        self.session = StringSession(config, str(tmp_path / "spool"), clock=self.clock, pipeline=self.pipeline)
        self.spool = self.session.spool
        self.agent = Agent("To Branch", hold)
        self.manager = QueueManager(self.spool, Router(config.accepted_domains, config.send_connectors),
                                    {"To Branch": self.agent, "Local drop": Agent("Local drop")}, clock=self.clock,
                                    triggers=self.triggers)
        self.manager.startService()

    def hold_message(self, *rcpts):
        incoming = self.spool.begin()
        incoming.write(b"Subject: for the branch\r\n\r\nhi\r\n")
        stored = []
        incoming.commit(Envelope(sender="a@partner.test", recipients=tuple(Recipient(r) for r in rcpts), size=40,
                                 received_at=self.clock.seconds())).addCallback(stored.append)
        self.manager.submit(stored[0])
        return stored[0]

    def connect(self):
        """A new session (after the clock has moved on past the last one's timeouts)."""
        self.session = StringSession(self.config, "", clock=self.clock, pipeline=self.pipeline, spool=self.spool)

    def ask(self, line: str):
        out = self.session.send(line.encode() + b"\r\n").decode()
        return out.strip()


def test_mail_for_the_site_is_held_until_it_asks_and_then_goes_out(tmp_path):
    site = Site(tmp_path)
    site.hold_message("bob@branch.fabrikam.com")
    site.hold_message("carol@branch.fabrikam.com")
    queue = site.manager.queues[NextHop("To Branch", "branch.fabrikam.com")]
    assert (queue.status, queue.hold_reason) == (QueueStatus.Held, "remote triggered delivery")
    site.clock.advance(3 * 3600)
    assert site.agent.calls == []                                # never a connection by itself
    site.connect()
    assert "250 ETRN\r\n" in site.session.send(b"EHLO branch.fabrikam.com\r\n").decode()
    assert site.ask("ETRN branch.fabrikam.com") == \
        "253 2.0.0 OK, 2 pending messages for node branch.fabrikam.com started"
    assert site.agent.calls == [["bob@branch.fabrikam.com"], ["carol@branch.fabrikam.com"]]
    assert os.listdir(site.spool.queue_dir) == []
    assert (queue.status, queue.hold_reason) == (QueueStatus.Held, "remote triggered delivery")   # held again
    assert site.ask("ETRN branch.fabrikam.com") == "251 2.0.0 OK, no messages waiting for node branch.fabrikam.com"


def test_every_rfc_1985_reply(tmp_path):
    site = Site(tmp_path, hold=True)
    assert site.ask("ETRN branch.fabrikam.com").startswith("503 5.5.1 ")      # before EHLO
    site.ask("EHLO branch.fabrikam.com")
    site.hold_message("bob@branch.fabrikam.com")
    site.hold_message("dave@sales.branch.fabrikam.com")
    assert site.ask("ETRN branch.fabrikam.com").startswith("253 2.0.0 OK, 1 pending messages")
    # a second ETRN while the run is under way starts nothing
    assert site.ask("ETRN branch.fabrikam.com") == "250 2.0.0 OK, queuing for node branch.fabrikam.com started"
    assert site.agent.calls == [["bob@branch.fabrikam.com"]]
    assert site.ask("ETRN @branch.fabrikam.com") == \
        "252 2.0.0 OK, pending messages for node @branch.fabrikam.com started"   # the subdomain's queue
    assert site.agent.calls[-1] == ["dave@sales.branch.fabrikam.com"]
    assert site.ask("ETRN").startswith("500 5.5.2 ")
    assert site.ask("ETRN branch..fabrikam.com").startswith("501 5.5.4 ")
    assert site.ask("ETRN elsewhere.test") == "459 4.7.1 Node elsewhere.test not allowed: not held here for you"
    assert site.ask("ETRN #To-Nowhere").startswith("459 ")
    site.manager.suspend(NextHop("To Branch", "branch.fabrikam.com"))
    assert site.ask("ETRN branch.fabrikam.com").startswith("458 4.3.0 Unable to queue messages")
    site.ask("MAIL FROM:<a@partner.test>")
    assert site.ask("ETRN branch.fabrikam.com").startswith("503 5.5.1 ")      # inside a transaction


def test_queue_names_authentication_and_the_rate_limit(tmp_path):
    site = Site(tmp_path, require_authentication=True, rate_limit=2)
    site.ask("EHLO branch.fabrikam.com")
    assert site.ask("ETRN branch.fabrikam.com") == "530 5.7.0 Authentication required"
    site.session.proto.identity = type("Identity", (), {"name": "branch@fabrikam.com"})()
    site.hold_message("bob@branch.fabrikam.com")
    site.agent.hold = False
    assert site.ask("ETRN #To-Branch").startswith("459 ")                    # names are matched exactly
    assert site.ask("ETRN branch.fabrikam.com").startswith("253 ")
    assert site.ask("ETRN branch.fabrikam.com").startswith("251 ")
    assert site.ask("ETRN branch.fabrikam.com").startswith("458 4.7.0 ")      # the third within a minute
    site.clock.advance(61)
    site.connect()
    site.ask("EHLO branch.fabrikam.com")
    site.session.proto.identity = type("Identity", (), {"name": "branch@fabrikam.com"})()
    assert site.ask("ETRN branch.fabrikam.com").startswith("251 ")


def test_a_queue_name(tmp_path):
    config = loads(config_text(2525, extra=HELD.replace('name = "To Branch"', 'name = "ToBranch"')))
    clock, triggers = task.Clock(), Triggers()
    session = StringSession(config, str(tmp_path / "spool"), clock=clock,
                            pipeline=Pipeline([Entry(Etrn(triggers, config.send_connectors, clock))], clock))
    agent = Agent("ToBranch")
    manager = QueueManager(session.spool, Router(config.accepted_domains, config.send_connectors),
                           {"ToBranch": agent}, clock=clock, triggers=triggers)
    manager.startService()
    incoming = session.spool.begin()
    incoming.write(b"Subject: x\r\n\r\nx\r\n")
    stored = []
    incoming.commit(Envelope(sender="", recipients=(Recipient("bob@branch.fabrikam.com"),), size=10)) \
        .addCallback(stored.append)
    manager.submit(stored[0])
    session.send(b"EHLO branch.fabrikam.com\r\n")
    assert session.send(b"ETRN #tobranch\r\n") == b"250 2.0.0 OK, queuing for node #tobranch started\r\n"
    assert agent.calls == [["bob@branch.fabrikam.com"]]


@pytest.mark.parametrize("argument", [
    "branch.fabrikam.com;touch /tmp/etrn-pwned", "$(touch /tmp/etrn-pwned)", "%s%s%n", "a" * 300 + ".test",
    "brånch.fabrikam.com", "-branch.fabrikam.com", "@", "#", "#../../etc/passwd", "[127.0.0.1]",
])
def test_hostile_arguments_get_501(tmp_path, argument):
    site = Site(tmp_path)
    site.ask("EHLO branch.fabrikam.com")
    out = site.session.send(b"ETRN " + argument.encode("utf-8") + b"\r\n")
    assert out.startswith(b"501 5.5.4 ") and (len(argument) < 2 or argument.encode() not in out)


def test_the_stage_needs_a_connector_that_holds_mail():
    from exedge.pipeline import build_pipeline
    config = loads(config_text(2525, extra='[[pipeline]]\nstage = "etrn"\n'))
    with pytest.raises(ConfigError) as e:
        build_pipeline(config, task.Clock())
    assert "remote_triggered_delivery" in str(e.value)
    with pytest.raises(ConfigError) as e:
        loads(config_text(2525, extra=HELD.replace("remote_triggered_delivery = true",
                                                   'remote_triggered_delivery = true\nschedule = "Never"')))
    assert "send_connectors[1].remote_triggered_delivery: its queues run when the site asks" in str(e.value)


ETRN_SERVER = """
[[pipeline]]
stage = "etrn"
receive_connectors = ["From Internet"]

[[send_connectors]]
name = "To Branch"
address_spaces = ["branch.fabrikam.com"]
smart_hosts = ["127.0.0.1:{sink}"]
dns_routing_enabled = false
remote_triggered_delivery = true

[[accepted_domains]]
domain_name = "branch.fabrikam.com"
domain_type = "InternalRelay"
"""


def wait_until(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_over_real_smtp_the_held_message_reaches_the_site_after_etrn(start_server, tmp_path):
    import subprocess
    import sys
    from harness import free_port
    sink_port = free_port()
    sink_dir = tmp_path / "sink"
    sink = subprocess.Popen([sys.executable, "-m", "exedge.testing", "--port", str(sink_port),
                             "--out", str(sink_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        server = start_server(extra=ETRN_SERVER.format(sink=sink_port))
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
            c.sendmail("alice@partner.test", ["bob@branch.fabrikam.com"], b"Subject: held\r\n\r\nfor the branch\r\n")
        assert len(os.listdir(server.path("var", "spool", "queue"))) == 1
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
            c.ehlo("branch.fabrikam.com")
            assert c.has_extn("etrn")
            c.command_encoding = "utf-8"
            for hostile in ("$(touch pwned)", "x;rm -rf /", "%n%n", "\u00e9t\u00e9.test"):
                code, text = c.docmd("ETRN", hostile)
                assert code == 501
            assert c.docmd("ETRN", "branch.fabrikam.com") == (
                253, b"2.0.0 OK, 1 pending messages for node branch.fabrikam.com started")
        assert wait_until(lambda: sink_dir.exists() and os.listdir(sink_dir))
        assert server.wait_for(lambda: not os.listdir(server.path("var", "spool", "queue")), what="an empty queue")
        log = server.log
        for trace in ("pwned", "rm -rf", "%n", "\u00e9t\u00e9"):
            assert trace not in log
        assert not os.path.exists(server.path("pwned"))
    finally:
        sink.terminate()
        sink.wait(timeout=15)


def _turned_site(tmp_path, hold_messages=1):
    """A session that said ATRN and got 250: the test is now the site, the SMTP server."""
    config = loads(config_text(2525, extra=HELD.replace(
        "remote_triggered_delivery = true", 'remote_triggered_delivery = true\nremote_trigger_accounts = ["branch"]')))
    clock, triggers = task.Clock(), Triggers()
    clock.advance(1_800_000_000)
    pipeline = Pipeline([Entry(Etrn(triggers, config.send_connectors, clock, atrn=True))], clock)
    session = StringSession(config, str(tmp_path / "spool"), clock=clock, pipeline=pipeline)
    manager = QueueManager(session.spool, Router(config.accepted_domains, config.send_connectors),
                           {"To Branch": Agent("To Branch")}, clock=clock, triggers=triggers)
    manager.startService()
    for n in range(hold_messages):
        incoming = session.spool.begin()
        incoming.write(b"Subject: %d\r\n\r\nheld\r\n" % n)
        stored = []
        incoming.commit(Envelope(sender="a@partner.test", recipients=(Recipient(f"u{n}@branch.fabrikam.com"),),
                                 size=30, received_at=clock.seconds())).addCallback(stored.append)
        manager.submit(stored[0])
    session.send(b"EHLO branch.fabrikam.com\r\n")
    session.proto.identity = type("Identity", (), {"name": "branch"})()
    assert session.send(b"ATRN\r\n") == b"250 2.0.0 OK now reversing the connection\r\n"
    return session, manager


def test_a_turned_connection_is_closed_after_its_session_and_aborted_if_the_site_keeps_it(tmp_path):
    """Review finding: after the turned session nothing bounded the connection, so a site kept its slot."""
    session, _ = _turned_site(tmp_path, hold_messages=0 + 1)
    assert session.send(b"220 branch ESMTP\r\n").startswith(b"EHLO ")
    out = session.send(b"250 branch\r\n")
    assert out.startswith(b"MAIL FROM:")
    session.send(b"250 ok\r\n")                                # MAIL
    session.send(b"250 ok\r\n")                                # RCPT
    assert session.send(b"354 go\r\n").endswith(b"\r\n.\r\n")  # DATA, then the message
    assert session.send(b"250 got it\r\n") == b"QUIT\r\n"
    assert session.transport.disconnecting and not session.transport.disconnected
    session.clock.advance(SMTPServer.CLOSE_GRACE)              # the site neither closes nor answers close_notify
    assert session.transport.disconnected


def test_a_half_close_by_the_turned_site_ends_the_run_at_once(tmp_path):
    """Review finding: the half-close went nowhere and the run hung until the client's timeouts."""
    session, manager = _turned_site(tmp_path)
    session.send(b"220 branch ESMTP\r\n")
    session.proto.readConnectionLost()
    assert session.transport.disconnected
    session.proto.connectionLost(None)
    queue = manager.queues[NextHop("To Branch", "branch.fabrikam.com")]
    assert (queue.status, queue.hold_reason, queue.message_count) == (QueueStatus.Held, "remote triggered delivery", 1)


def test_a_turned_session_reads_held_mail_a_few_messages_at_a_time(tmp_path):
    """Review finding: every held message was read into memory at once."""
    from exedge.dequeue.atrn import Collection
    reads = []

    def run(f):
        reads.append(f)
        return defer.maybeDeferred(f)

    collection = Collection(run, helo="edge", clock=task.Clock(), peer="site")

    class Held:
        def __init__(self, n):
            self.queue_id, self.n = f"Q{n}", n
            self.envelope = Envelope(sender="a@b.test", recipients=(Recipient(f"u{n}@branch.test"),))

        def in_memory(self):
            return None

        def read_data(self):
            return b"Subject: x\r\n\r\nx\r\n"

    for n in range(25):
        collection.deliver(Held(n), [0])
    got = []
    collection._source(None).addCallback(got.append)
    assert len(got[0]) == Collection.batch and len(reads) == 1

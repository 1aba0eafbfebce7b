"""
The plugin pipeline: verdicts on a StringTransport session with the
clock, and drop-in plugins copied into a real server's plugins/ directory.
"""

import os
import re
import shutil
import smtplib
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import defer, task

from exedge.config import ConfigError, loads
from exedge.pipeline import ACCEPT, Entry, Pipeline, Stage, build_pipeline, defer_, disconnect, reject
from exedge.pipeline.builtin import ConnectionFilter, SenderFilter
from harness import TWISTD, config_text, free_port
from test_protocol import Session

HERE = os.path.dirname(os.path.abspath(__file__))
EXEDGE = os.path.join(os.path.dirname(sys.executable), "exedge")


def session_with(tmp_path, *stages, peer="127.0.0.1", timeout=30.0, connectors=None):
    clock = task.Clock()
    pipeline = Pipeline([Entry(st, i, connectors, timeout) for i, st in enumerate(stages)], clock)
    return Session(tmp_path, peer=peer, pipeline=pipeline, clock=clock)


class Says(Stage):
    """A stage that answers each hook with the verdict given for it."""

    name = "says"

    def __init__(self, **verdicts):
        self.verdicts = verdicts
        self.calls = []

    def __getattribute__(self, attr):
        if attr.startswith("on_"):
            def hook(session, *args):
                self.calls.append((attr, args))
                return self.verdicts.get(attr)
            return hook
        return object.__getattribute__(self, attr)


def test_each_verdict_becomes_its_reply(tmp_path):
    s = session_with(tmp_path, Says(on_mail=reject("no", "5.7.1", 550), on_rcpt=defer_("later", "4.7.1", 451)))
    assert s.transport.value().startswith(b"220 ")
    s.send(b"EHLO client.test\r\n")
    assert s.codes(b"MAIL FROM:<a@partner.test>\r\n") == ["550 5.7.1"]
    assert s.proto.txn is None                                       # the refused MAIL left nothing
    (tmp_path / "x").mkdir()
    s2 = session_with(tmp_path / "x", Says(on_rcpt=defer_("later", "4.7.1", 451)))
    s2.send(b"EHLO client.test\r\n")
    assert s2.codes(b"MAIL FROM:<a@partner.test>\r\n") == ["250 2.1.0"]
    assert s2.codes(b"RCPT TO:<bob@example.com>\r\n") == ["451 4.7.1"]
    assert s2.proto.txn.recipients == []


def test_disconnect_and_accept(tmp_path):
    s = session_with(tmp_path, Says(on_helo=disconnect("go away")))
    assert s.codes(b"EHLO client.test\r\n") == ["421 4.7.0"] and s.transport.disconnecting
    (tmp_path / "y").mkdir()
    second = Says(on_mail=reject("never asked"))
    s = session_with(tmp_path / "y", Says(on_mail=ACCEPT), second)
    s.send(b"EHLO client.test\r\n")
    assert s.codes(b"MAIL FROM:<a@partner.test>\r\n") == ["250 2.1.0"]     # accept skips the rest
    assert [c for c, _ in second.calls if c == "on_mail"] == []


def test_a_stage_that_raises_costs_the_event_a_451_and_the_session_goes_on(tmp_path):
    class Boom(Stage):
        name = "boom"

        def on_rcpt(self, session, recipient):
            raise RuntimeError("bug")

    s = session_with(tmp_path, Boom())
    s.send(b"EHLO client.test\r\n")
    s.send(b"MAIL FROM:<a@partner.test>\r\n")
    assert s.codes(b"RCPT TO:<bob@example.com>\r\n") == ["451 4.3.0"]
    assert s.codes(b"NOOP\r\n") == ["250 2.0.0"]


def test_a_stage_that_never_answers_hits_its_timeout_on_the_clock(tmp_path):
    class Silent(Stage):
        name = "silent"

        async def on_mail(self, session, sender):
            await defer.Deferred()

    s = session_with(tmp_path, Silent(), timeout=10)
    s.send(b"EHLO client.test\r\n")
    assert s.send(b"MAIL FROM:<a@partner.test>\r\nNOOP\r\n") == b""       # held, in order
    s.clock.advance(9)
    assert s.transport.value() == b""
    s.clock.advance(2)
    assert s.transport.value() == b"451 4.3.0 Temporary server error; please try again later\r\n250 2.0.0 OK\r\n"


def test_the_message_hook_sees_lazily_parsed_headers_and_can_refuse(tmp_path):
    class NoSpamSubjects(Stage):
        name = "subjects"

        def on_message(self, session, message):
            if "spam" in (message.headers["Subject"] or "").lower():
                return reject("Spam subject", "5.7.1", 550)

    s = session_with(tmp_path, NoSpamSubjects())
    s.send(b"EHLO client.test\r\nMAIL FROM:<a@partner.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert s.codes(b"Subject: SPAM offer\r\n\r\nbuy\r\n.\r\n") == ["550 5.7.1"]
    assert s.sink.messages == []
    s.send(b"MAIL FROM:<a@partner.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert s.codes(b"Subject: hello\r\n\r\nhi\r\n.\r\n") == ["250 2.6.0"]
    assert len(s.sink.messages) == 1


def test_sender_filter(tmp_path):
    f = SenderFilter(blocked_senders=("bad@partner.test",), blocked_domains=("*.spam.test", "junk.test"),
                     block_blank_senders=True)
    s = session_with(tmp_path, f)
    s.send(b"EHLO client.test\r\n")
    for sender, code in ((b"bad@partner.test", "554 5.1.0"), (b"x@mail.spam.test", "554 5.1.0"),
                         (b"x@spam.test", "554 5.1.0"), (b"x@junk.test", "554 5.1.0"), (b"", "554 5.1.0"),
                         (b"good@partner.test", "250 2.1.0")):
        assert s.codes(b"MAIL FROM:<" + sender + b">\r\n") == [code], sender
        s.send(b"RSET\r\n")


def test_anti_spam_stages_are_skipped_for_sessions_that_bypass_anti_spam(tmp_path):
    # 127.0.0.2 is an externally secured server in the test configuration
    f = SenderFilter(blocked_senders=("bad@partner.test",))
    s = session_with(tmp_path, f, peer="127.0.0.2")
    s.send(b"EHLO client.test\r\n")
    assert s.codes(b"MAIL FROM:<bad@partner.test>\r\n") == ["250 2.1.0"]


def test_connection_filter_blocks_at_rcpt_and_allow_list_skips_the_rest(tmp_path):
    import ipaddress
    block = ConnectionFilter(ip_block_list=(ipaddress.ip_network("127.0.0.0/24"),))
    s = session_with(tmp_path, block)
    s.send(b"EHLO client.test\r\nMAIL FROM:<a@partner.test>\r\n")
    assert s.codes(b"RCPT TO:<bob@example.com>\r\n") == ["550 5.7.1"]
    assert s.codes(b"RCPT TO:<carol@example.com>\r\n") == ["550 5.7.1"]      # each recipient is refused (and logged)
    (tmp_path / "z").mkdir()
    allow = ConnectionFilter(ip_allow_list=(ipaddress.ip_network("127.0.0.1/32"),))
    s = session_with(tmp_path / "z", allow, SenderFilter(blocked_senders=("a@partner.test",)))
    s.send(b"EHLO client.test\r\n")
    assert s.codes(b"MAIL FROM:<a@partner.test>\r\n") == ["250 2.1.0"]       # allowed: anti-spam skipped


def test_unknown_stage_and_option_are_config_errors_naming_the_entry():
    cfg = loads(config_text(25) + '''
[[pipeline]]
stage = "sender_filter"
blocked_senders = ["x@y.test"]
colour = "blue"

[[pipeline]]
stage = "no_such_stage"
''')
    with pytest.raises(ConfigError) as e:
        build_pipeline(cfg, None)
    text = "\n".join(map(str, e.value.problems))
    assert "pipeline[0].colour: stage sender_filter has no option 'colour'" in text
    assert "pipeline[1].stage: no stage 'no_such_stage'" in text


def test_drop_in_plugins_are_discovered_and_run(start_server, tmp_path):
    config = config_text(0).replace("127.0.0.1:0", "127.0.0.1:{port}").replace("{", "{{").replace("}", "}}") \
        .replace("{{port}}", "{port}") + '''
[[pipeline]]
stage = "deny_spammers"
words = ["spammer"]

[[pipeline]]
stage = "raises"

[[pipeline]]
stage = "hangs"
timeout = "1s"
'''
    from harness import Server
    port = free_port()
    workdir = tmp_path / "edge"
    (workdir / "plugins").mkdir(parents=True)
    open(workdir / "plugins" / "__init__.py", "w").close()
    for name in ("deny_spammers.py", "misbehaving.py"):
        shutil.copy(os.path.join(HERE, "plugin_files", name), workdir / "plugins" / name)
    server = Server(workdir, config.format(port=port), port).start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.ehlo("client.test")
            code, text = c.mail("big.spammer@partner.test")
            assert (code, text) == (550, b"5.7.1 Sender big.spammer@partner.test is not welcome here")
            c.rset()
            assert c.mail("slow@partner.test")[0] == 451                       # the hanging stage timed out
            c.rset()
            assert c.mail("alice@partner.test")[0] == 250
            assert c.rcpt("boom@example.com")[0] == 451                        # the raising stage
            assert c.rcpt("bob@example.com")[0] == 250                         # and the session goes on
            c.data(b"Subject: ok\r\n\r\nfine\r\n")
        assert server.wait_for(server.drop_files, what="the message that passed")
        assert "stage raises failed in on_rcpt" in server.log and "this plugin has a bug" in server.log
        check = subprocess.run([EXEDGE, "check-config", server.config_path], capture_output=True, text=True,
                               timeout=60, cwd=workdir)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "stage deny_spammers: " in check.stdout and "deny_spammers.py; hooks: on_mail" in check.stdout
        assert "stage attachment_filter (reads the body): built-in; hooks: on_message" in check.stdout
        assert "stage content_restrictions: built-in; hooks: on_mail, on_headers, on_message, on_route" \
            in check.stdout
    finally:
        server.stop()


def test_a_broken_plugin_stops_start_up_with_its_file(tmp_path):
    workdir = tmp_path / "edge"
    (workdir / "plugins").mkdir(parents=True)
    open(workdir / "plugins" / "__init__.py", "w").close()
    shutil.copy(os.path.join(HERE, "plugin_files", "broken.py"), workdir / "plugins" / "broken.py")
    path = workdir / "c.toml"
    path.write_text(config_text(free_port()))
    r = subprocess.run([TWISTD, "-n", "--pidfile=", "exedge", "--config", str(path)],
                       capture_output=True, text=True, timeout=60, cwd=workdir)
    assert r.returncode == 1
    assert "broken plugin" in r.stderr and "broken.py: ModuleNotFoundError" in r.stderr


def test_recipient_filter_knows_our_users_and_blocked_recipients(tmp_path):
    from exedge.pipeline.builtin import RecipientFilter
    users = tmp_path / "recipients.txt"
    users.write_text("# our mailboxes\nBob@example.com\ncarol@example.com\n")
    s = session_with(tmp_path, RecipientFilter(blocked_recipients=("carol@example.com",),
                                               recipients_file=str(users)))
    s.send(b"EHLO client.test\r\nMAIL FROM:<a@partner.test>\r\n")
    assert s.codes(b"RCPT TO:<bob@example.com>\r\n") == ["250 2.1.5"]           # case-insensitive
    assert s.codes(b"RCPT TO:<nobody@example.com>\r\n") == ["550 5.1.1"]
    assert s.codes(b"RCPT TO:<carol@example.com>\r\n") == ["550 5.7.1"]
    assert s.proto.txn.recipients[0].address == "bob@example.com" and len(s.proto.txn.recipients) == 1


@pytest_twisted.inlineCallbacks
def test_recipients_file_is_read_again_when_it_changes(tmp_path):
    from twisted.internet import reactor, task
    from exedge.pipeline.builtin import RecipientsFile
    path = tmp_path / "r.txt"
    path.write_text("a@example.com\n")
    known = RecipientsFile(str(path), interval=0)
    assert "a@example.com" in known and "b@example.com" not in known
    path.write_text("a@example.com\nb@example.com\n")
    for _ in range(50):                        # the reload runs on a thread: bounded wait
        if "b@example.com" in known:
            break
        yield task.deferLater(reactor, 0.02, lambda: None)
    assert "b@example.com" in known


def test_unknown_recipient_refused_through_real_smtp(start_server, tmp_path):
    users = tmp_path / "recipients.txt"
    users.write_text("bob@example.com\n")
    server = start_server(extra=f'''
[[pipeline]]
stage = "recipient_filter"
recipients_file = "{users}"
''')
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.ehlo("client.test")
        c.mail("alice@partner.test")
        code, text = c.rcpt("nobody@example.com")
        assert (code, text) == (550, b"5.1.1 User unknown")
        assert c.rcpt("bob@example.com")[0] == 250


def test_dns_block_list_rejects_at_rcpt_with_the_providers_text_and_allow_lists_win(start_server, dns_zones):
    # 127.0.0.1 is listed by bl.test (code 127.0.0.2) and by strict.test with another code;
    # 127.0.0.5 (an ordinary Internet peer) is on bl.test and on the allow list wl.test
    dns_port = dns_zones({
        "bl.test": {"1.0.0.127.bl.test": [["A", "127.0.0.2"]], "5.0.0.127.bl.test": [["A", "127.0.0.2"]]},
        "strict.test": {"1.0.0.127.strict.test": [["A", "127.0.0.10"]]},
        "wl.test": {"5.0.0.127.wl.test": [["A", "127.0.0.2"]]},
    })
    server = start_server(extra='''
[[pipeline]]
stage = "connection_filter"
block_list_providers = [
  { zone = "strict.test", ip_address_match = ["127.0.0.4"] },
  { zone = "bl.test", bitmask = 2, rejection_response = "Listed by {zone}: see https://bl.test/{ip}" },
]
allow_list_providers = [{ zone = "wl.test" }]

[[pipeline]]
stage = "sender_filter"
blocked_senders = ["alice@partner.test"]
''')
    text = open(server.config_path).read().replace('dns_servers = []', f'dns_servers = ["127.0.0.1:{dns_port}"]')
    open(server.config_path, "w").write(text)
    server.stop()
    server.start()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.ehlo("client.test")
        c.mail("bob@partner.test")
        code, msg = c.rcpt("carol@example.com")
        assert (code, msg) == (550, b"5.7.1 Listed by bl.test: see https://bl.test/127.0.0.1")
        assert c.rcpt("dave@example.com")[0] == 550                      # every recipient, each logged
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10, source_address=("127.0.0.5", 0)) as c:
        c.ehlo("client.test")
        assert c.mail("alice@partner.test")[0] == 250                  # allow-listed: anti-spam skipped
        assert c.rcpt("carol@example.com")[0] == 250


def test_dns_list_answers_are_kept_for_their_ttl(start_server, dns_zones):
    """A burst of connections from one address asks each list once: with the DNS server gone, it still refuses."""
    dns_port = dns_zones({"bl.test": {"1.0.0.127.bl.test": [["A", "127.0.0.2"]]}})
    server = start_server(extra='''
[[pipeline]]
stage = "connection_filter"
block_list_providers = [{ zone = "bl.test" }]
''')
    text = open(server.config_path).read().replace('dns_servers = []', f'dns_servers = ["127.0.0.1:{dns_port}"]')
    open(server.config_path, "w").write(text)
    server.stop()
    server.start()

    def rcpt(source: str) -> int:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30, source_address=(source, 0)) as c:
            c.ehlo("client.test")
            c.mail("bob@partner.test")
            return c.rcpt("carol@example.com")[0]

    assert (rcpt("127.0.0.1"), rcpt("127.0.0.5")) == (550, 250)      # listed; not listed (NXDOMAIN)
    dns_zones.stop(dns_port)
    assert rcpt("127.0.0.1") == 550          # the record's 60 s are not over: no question asked


def test_ip_list_entries_expire_on_the_clock(tmp_path):
    from twisted.internet import task
    cfg = loads(config_text(25) + '''
[[pipeline]]
stage = "connection_filter"
ip_block_list = [
  { address = "127.0.0.0/24", expires = 1970-01-01T01:00:00Z, comment = "an hour's block" },
  { address = "127.0.0.9", expires = "1970-01-02T00:00:00+00:00" },
]
''')
    clock = task.Clock()
    stage = build_pipeline(cfg, clock).entries[0].stage
    s = session_with(tmp_path, stage)
    s.clock = stage.clock = clock
    s.send(b"EHLO client.test\r\nMAIL FROM:<a@partner.test>\r\n")
    assert s.codes(b"RCPT TO:<bob@example.com>\r\n") == ["550 5.7.1"]
    clock.advance(3600)
    assert s.codes(b"RCPT TO:<bob@example.com>\r\n") == ["250 2.1.5"]          # expired on the hour


@pytest.mark.parametrize("entry, error", [
    ('{ address = "127.0.0.1", expires = 2026-01-01T00:00:00 }', "give a time zone"),
    ('{ address = "127.0.0.1", expires = "soon" }', "not a date-time"),
    ('{ adress = "127.0.0.1" }', "expected { address"),
    ('"300.1.1.1"', "address or CIDR"),
])
def test_bad_ip_list_entries_are_config_errors(entry, error):
    cfg = loads(config_text(25) + f'''
[[pipeline]]
stage = "connection_filter"
ip_block_list = [{entry}]
''')
    with pytest.raises(ConfigError, match=r"pipeline\[0\]\.ip_block_list.*" + re.escape(error)):
        build_pipeline(cfg, None)

"""
The sender_id stage (SPF, RFC 7208): pyspf's verdicts on a StringTransport
session with a DNS table in memory, then a real server asking a real DNS
server (exedge.testing's zone server) through [server].dns_servers.
"""

import smtplib
import threading

import pytest
import spf
from twisted.internet import defer

from exedge.config import ConfigError, loads
from exedge.pipeline import build_pipeline
from exedge.pipeline import sender_id
from exedge.pipeline.sender_id import SenderId
from harness import config_text, free_port
from test_pipeline import session_with

RECORDS = {
    "pass.test": "v=spf1 ip4:127.0.0.1 -all",
    "fail.test": "v=spf1 -all",
    "soft.test": "v=spf1 ~all",
    "neutral.test": "v=spf1 ?all",
    "broken.test": "v=spf1 ip4:127.0.0.1 frobnicate -all",
    "helo.test": "v=spf1 a -all",
}


def table_lookup(records=RECORDS, asked=None):
    """A spf.DNSLookup-like function over C{records}; "down.test" does not answer."""
    def lookup(name, qtype, strict=True, timeout=20):
        if asked is not None:
            asked.append((name, qtype))
        if name == "down.test":
            raise spf.TempError("DNS timed out")
        if qtype == "A" and name == "helo.test":
            return [((name, "A"), "127.0.0.1")]
        if qtype == "TXT" and name in records:
            return [((name, "TXT"), (records[name].encode(),))]
        return []
    return lookup


def stage(**options):
    return SenderId(**options, fqdn="edge01.example.com", lookup=table_lookup(),
                    run=lambda f, *args: defer.maybeDeferred(f, *args))


@pytest.mark.parametrize("domain, result", [
    ("pass.test", "pass"), ("fail.test", "fail"), ("soft.test", "softfail"), ("neutral.test", "neutral"),
    ("broken.test", "permerror"), ("nothing.test", "none"), ("down.test", "temperror"),
])
def test_each_spf_result_from_peer_127_0_0_1(domain, result):
    found = sender_id.check(table_lookup(), "127.0.0.1", f"alice@{domain}", "mx.client.test",
                            "edge01.example.com", 5)
    assert (found.result, found.identity, found.domain) == (result, "mailfrom", domain)
    assert found.header.lower().startswith(result + " (edge01.example.com: ")
    assert "client-ip=127.0.0.1;" in found.header and f'envelope-from="alice@{domain}";' in found.header
    assert "helo=mx.client.test;" in found.header and "receiver=edge01.example.com;" in found.header


def test_another_address_is_not_the_one_the_record_names():
    assert sender_id.check(table_lookup(), "127.0.0.9", "a@pass.test", "h.test", "edge", 5).result == "fail"


def test_the_null_sender_is_checked_with_the_helo_identity():
    asked = []
    found = sender_id.check(table_lookup(asked=asked), "127.0.0.1", "", "helo.test", "edge", 5)
    assert (found.result, found.identity, found.domain) == ("pass", "helo", "helo.test")
    assert ("helo.test", "TXT") in asked
    # an address literal is no domain to check (RFC 7208 §2.3): none, and no DNS asked
    asked.clear()
    found = sender_id.check(table_lookup(asked=asked), "127.0.0.1", "", "[127.0.0.1]", "edge", 5)
    assert (found.result, asked) == ("none", [])


def test_each_query_asks_its_own_resolver_and_plain_pyspf_is_left_alone():
    # two checks at once on two threads, each with its own DNS: neither sees the other's
    one, two = {"same.test": "v=spf1 ip4:127.0.0.1 -all"}, {"same.test": "v=spf1 -all"}
    results = {}
    start = threading.Barrier(2)

    def run(name, records):
        start.wait()
        for _ in range(50):
            results.setdefault(name, set()).add(
                sender_id.check(table_lookup(records), "127.0.0.1", "a@same.test", "h.test", "edge", 5).result)

    workers = [threading.Thread(target=run, args=("one", one)), threading.Thread(target=run, args=("two", two))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert results == {"one": {"pass"}, "two": {"fail"}}
    assert spf.DNSLookup is sender_id._dispatch
    assert getattr(sender_id._current, "lookup", None) is None         # nothing left behind on this thread


def test_reject_refuses_a_fail_at_mail_with_5_7_23(tmp_path):
    s = session_with(tmp_path, stage(fail_action="Reject"))
    s.send(b"EHLO mx.client.test\r\n")
    out = s.send(b"MAIL FROM:<alice@fail.test>\r\n")
    assert out == (b"550 5.7.23 SPF validation failed: fail.test does not designate 127.0.0.1 "
                   b"as a permitted sender\r\n")
    assert s.proto.txn is None
    assert s.codes(b"MAIL FROM:<alice@soft.test>\r\n") == ["250 2.1.0"]          # softfail is not fail
    assert s.proto.session.notes["spf"] == "softfail"
    s.send(b"RSET\r\n")
    assert s.codes(b"MAIL FROM:<alice@pass.test>\r\n") == ["250 2.1.0"]
    assert s.proto.session.notes["spf"] == "pass"
    assert "designates 127.0.0.1 as permitted sender" in s.proto.session.notes["spf_reason"]


def deliver(s, sender: bytes, body=b"Subject: hi\r\n\r\nhello\r\n") -> list[str]:
    s.send(b"EHLO mx.client.test\r\nMAIL FROM:<" + sender + b">\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    return s.codes(body + b".\r\n")


def test_stamp_status_accepts_and_stamps_received_spf_and_authentication_results(tmp_path):
    s = session_with(tmp_path, stage())
    assert deliver(s, b"alice@fail.test",
                   b"Authentication-Results: edge01.example.com; spf=pass smtp.mailfrom=fail.test\r\n"
                   b"Subject: hi\r\n\r\nhello\r\n") == ["250 2.6.0"]
    data = s.sink.messages[0].read_data()
    header = data.split(b"\r\n\r\n")[0].decode()
    assert header.startswith(
        "Authentication-Results: edge01.example.com; spf=fail smtp.mailfrom=fail.test\r\n"
        "Received-SPF: Fail (edge01.example.com: domain of fail.test does not designate 127.0.0.1 as "
        "permitted sender) client-ip=127.0.0.1; envelope-from=\"alice@fail.test\"; helo=mx.client.test; "
        "receiver=edge01.example.com; mechanism=-all; identity=mailfrom\r\nReceived: from mx.client.test")
    assert header.count("Authentication-Results:") == 1                 # the forged one claiming us is gone
    assert s.sink.messages[0].envelope.notes["spf"] == "fail"


def test_the_null_sender_is_stamped_with_smtp_helo(tmp_path):
    s = session_with(tmp_path, stage())
    s.send(b"EHLO helo.test\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert s.codes(b"Subject: bounce\r\n\r\nx\r\n.\r\n") == ["250 2.6.0"]
    data = s.sink.messages[0].read_data()
    assert data.startswith(b"Authentication-Results: edge01.example.com; spf=pass smtp.helo=helo.test\r\n"
                           b"Received-SPF: Pass (")


def test_delete_answers_250_and_keeps_nothing(tmp_path):
    s = session_with(tmp_path, stage(fail_action="Delete"))
    assert deliver(s, b"alice@fail.test") == ["250 2.6.0"]
    assert s.sink.messages == []
    assert deliver(s, b"alice@pass.test") == ["250 2.6.0"]
    assert len(s.sink.messages) == 1 and b"Received-SPF: Pass" in s.sink.messages[0].read_data()


def test_temperror_defers_with_4_7_24_only_when_told_to(tmp_path):
    s = session_with(tmp_path, stage(temp_error_action="Reject"))
    s.send(b"EHLO mx.client.test\r\n")
    assert s.send(b"MAIL FROM:<alice@down.test>\r\n") == (
        b"451 4.7.24 SPF validation error: temporary DNS error checking down.test\r\n")
    (tmp_path / "stamp").mkdir()
    s = session_with(tmp_path / "stamp", stage())
    assert deliver(s, b"alice@down.test") == ["250 2.6.0"]
    assert b"Received-SPF: TempError (" in s.sink.messages[0].read_data()


def test_authenticated_and_anti_spam_bypassing_sessions_are_not_checked(tmp_path):
    asked = []
    quiet = SenderId(fail_action="Reject", fqdn="edge01.example.com", lookup=table_lookup(asked=asked),
                     run=lambda f, *args: defer.maybeDeferred(f, *args))
    # 127.0.0.2 is an externally secured Exchange server in the test configuration
    s = session_with(tmp_path, quiet, peer="127.0.0.2")
    s.send(b"EHLO mx.client.test\r\n")
    assert s.codes(b"MAIL FROM:<alice@fail.test>\r\n") == ["250 2.1.0"]
    assert asked == [] and "spf" not in s.proto.session.notes

    class Someone:
        name = "alice"

    (tmp_path / "auth").mkdir()
    s = session_with(tmp_path / "auth", quiet)
    s.proto.identity = Someone()
    s.send(b"EHLO mx.client.test\r\n")
    assert s.codes(b"MAIL FROM:<alice@fail.test>\r\n") == ["250 2.1.0"]
    assert asked == []


def test_bypassed_sender_domains_are_neither_checked_nor_stamped(tmp_path):
    asked = []
    bypassing = SenderId(fail_action="Reject", bypassed_sender_domains=("*.fail.test",), fqdn="edge01.example.com",
                         lookup=table_lookup(asked=asked), run=lambda f, *args: defer.maybeDeferred(f, *args))
    s = session_with(tmp_path, bypassing)
    assert deliver(s, b"alice@fail.test") == ["250 2.6.0"]        # "*.fail.test" covers fail.test itself
    assert deliver(s, b"alice@mx.fail.test") == ["250 2.6.0"]
    assert asked == [] and all(b"Received-SPF" not in m.read_data() for m in s.sink.messages)
    s.send(b"RSET\r\n")
    assert s.codes(b"MAIL FROM:<alice@notfail.test>\r\n") == ["250 2.1.0"]   # not a subdomain: checked
    assert asked


def test_with_bypassed_recipients_a_fail_is_refused_per_recipient(tmp_path):
    s = session_with(tmp_path, stage(fail_action="Reject", bypassed_recipients=("Postmaster@example.com",)))
    s.send(b"EHLO mx.client.test\r\n")
    assert s.codes(b"MAIL FROM:<alice@fail.test>\r\n") == ["250 2.1.0"]      # the recipients decide
    assert s.send(b"RCPT TO:<bob@example.com>\r\n") == (
        b"550 5.7.23 SPF validation failed: fail.test does not designate 127.0.0.1 as a permitted sender\r\n")
    assert s.codes(b"RCPT TO:<postmaster@example.com>\r\n") == ["250 2.1.5"]
    s.send(b"DATA\r\n")
    assert s.codes(b"Subject: hi\r\n\r\nhello\r\n.\r\n") == ["250 2.6.0"]
    [message] = s.sink.messages
    assert [r.address for r in message.envelope.recipients] == ["postmaster@example.com"]
    assert b"Received-SPF" not in message.read_data()                     # only bypassed recipients: not stamped
    s.send(b"MAIL FROM:<alice@pass.test>\r\n")
    assert s.codes(b"RCPT TO:<bob@example.com>\r\n") == ["250 2.1.5"]      # a pass is not refused


def test_delete_spares_a_message_with_a_bypassed_recipient_and_stamps_it(tmp_path):
    s = session_with(tmp_path, stage(fail_action="Delete", bypassed_recipients=("postmaster@example.com",)))
    s.send(b"EHLO mx.client.test\r\nMAIL FROM:<alice@fail.test>\r\n"
           b"RCPT TO:<bob@example.com>\r\nRCPT TO:<postmaster@example.com>\r\nDATA\r\n")
    assert s.codes(b"Subject: hi\r\n\r\nhello\r\n.\r\n") == ["250 2.6.0"]
    [message] = s.sink.messages
    assert b"Received-SPF: Fail" in message.read_data()
    assert deliver(s, b"alice@fail.test") == ["250 2.6.0"] and len(s.sink.messages) == 1   # no bypass: deleted


def test_a_check_that_never_ends_hits_the_entrys_timeout(tmp_path):
    pending = SenderId(fqdn="edge01.example.com", lookup=table_lookup(), run=lambda f, *args: defer.Deferred())
    s = session_with(tmp_path, pending, timeout=5)
    s.send(b"EHLO mx.client.test\r\n")
    assert s.send(b"MAIL FROM:<alice@pass.test>\r\n") == b""
    s.clock.advance(6)
    assert s.transport.value().startswith(b"451 4.3.0")


def test_options_are_checked_and_name_the_entry():
    cfg = loads(config_text(25) + '''
[[pipeline]]
stage = "sender_id"
fail_action = "Bounce"
temp_error_action = "Delete"
dns_timeout = "0s"
threads = 0
bypassed_recipients = ["postmaster"]
''')
    with pytest.raises(ConfigError) as e:
        build_pipeline(cfg, None)
    text = "\n".join(map(str, e.value.problems))
    assert "pipeline[0].fail_action: stage sender_id: invalid value 'Bounce' " \
           "(expected one of StampStatus, Reject, Delete)" in text
    assert "pipeline[0].temp_error_action: stage sender_id: invalid value 'Delete'" in text
    assert "pipeline[0].dns_timeout: stage sender_id: dns_timeout is 1s to 5m" in text
    assert "pipeline[0].threads: stage sender_id: threads is a number from 1 to 64" in text
    assert "pipeline[0].bypassed_recipients: stage sender_id: expected user@domain, got 'postmaster'" in text
    ok = loads(config_text(25).replace("dns_servers = []", 'dns_servers = ["127.0.0.1:5353", "127.0.0.2"]') + '''
[[pipeline]]
stage = "sender_id"
fail_action = "reject"
bypassed_recipients = ["Postmaster@Example.com"]
bypassed_sender_domains = ["*.partner.test"]
''')
    [entry] = build_pipeline(ok, None).entries
    assert (entry.stage.fail_action, entry.stage.temp_error_action) == ("Reject", "StampStatus")
    assert entry.stage.bypassed_recipients == {"postmaster@example.com"}
    assert "mx.partner.test" in entry.stage.bypassed_senders and "partner.test.evil" not in entry.stage.bypassed_senders
    assert entry.stage.fqdn == "edge01.example.com"
    resolver = sender_id.make_resolver(entry.stage._servers)
    assert [(n.address, n.port) for n in resolver.nameservers] == [("127.0.0.1", 5353), ("127.0.0.2", 53)]


# -- through a real server and a real DNS server --------------------------------

ZONES = {
    "pass.test": {"pass.test": [["TXT", "v=spf1 ip4:127.0.0.1 -all"]]},
    "fail.test": {"fail.test": [["TXT", "v=spf1 -all"]]},
    "norecord.test": {"norecord.test": [["A", "127.0.0.1"], ["TXT", "not an spf record"]]},
}


def start_with_dns(start_server, dns_server: str, pipeline: str):
    """A real server whose [server].dns_servers is C{dns_server}, with this [[pipeline]] entry."""
    text = config_text(0, extra=pipeline).replace("dns_servers = []", f'dns_servers = ["{dns_server}"]')
    text = text.replace("{", "{{").replace("}", "}}").replace("127.0.0.1:0", "127.0.0.1:{port}")
    return start_server(text)


def drop_file_with(server, needle: bytes) -> bytes:
    def found():
        for path in server.drop_files():
            with open(path, "rb") as f:
                data = f.read()
            if needle in data:
                return data
        return None
    return server.wait_for(found, what=f"a drop file with {needle!r}")


def test_spf_through_real_dns_reject_and_stamp(start_server, dns_zones):
    dns_port = dns_zones(ZONES)
    server = start_with_dns(start_server, f"127.0.0.1:{dns_port}", '''
[[pipeline]]
stage = "sender_id"
fail_action = "Reject"
''')
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as c:
        c.ehlo("mx.client.test")
        assert c.mail("alice@fail.test") == (
            550, b"5.7.23 SPF validation failed: fail.test does not designate 127.0.0.1 as a permitted sender")
        c.rset()
        assert c.sendmail("alice@pass.test", ["bob@example.com"], b"Subject: pass\r\n\r\nhello\r\n") == {}
        assert c.sendmail("carol@norecord.test", ["bob@example.com"], b"Subject: none\r\n\r\nhello\r\n") == {}
    passed = drop_file_with(server, b"Subject: pass")
    assert b"\r\nAuthentication-Results: edge01.example.com; spf=pass smtp.mailfrom=pass.test\r\n" in passed
    assert b"\r\nReceived-SPF: Pass (edge01.example.com: domain of pass.test designates 127.0.0.1 as " \
           b"permitted sender) client-ip=127.0.0.1; envelope-from=\"alice@pass.test\"; helo=mx.client.test; " \
           b"receiver=edge01.example.com; mechanism=\"ip4:127.0.0.1\"; identity=mailfrom\r\nReceived: " in passed
    nothing = drop_file_with(server, b"Subject: none")
    assert b"\r\nReceived-SPF: None (" in nothing and b"spf=none smtp.mailfrom=norecord.test" in nothing


def test_stamp_status_and_delete_through_real_dns(start_server, dns_zones):
    dns_port = dns_zones(ZONES)
    stamping = start_with_dns(start_server, f"127.0.0.1:{dns_port}", '''
[[pipeline]]
stage = "sender_id"
''')
    with smtplib.SMTP("127.0.0.1", stamping.port, timeout=30) as c:
        assert c.sendmail("alice@fail.test", ["bob@example.com"], b"Subject: stamped\r\n\r\nhello\r\n") == {}
    data = drop_file_with(stamping, b"Subject: stamped")
    assert b"\r\nReceived-SPF: Fail (" in data and b"spf=fail smtp.mailfrom=fail.test" in data
    deleting = start_with_dns(start_server, f"127.0.0.1:{dns_port}", '''
[[pipeline]]
stage = "sender_id"
fail_action = "Delete"
''')
    with smtplib.SMTP("127.0.0.1", deleting.port, timeout=30) as c:
        c.ehlo("mx.client.test")
        assert c.mail("alice@fail.test")[0] == 250
        assert c.rcpt("bob@example.com")[0] == 250
        code, text = c.data(b"Subject: deleted\r\n\r\nhello\r\n")
        assert code == 250 and b"Queued mail for delivery" in text
        assert c.sendmail("alice@pass.test", ["bob@example.com"], b"Subject: kept\r\n\r\nhello\r\n") == {}
    drop_file_with(deleting, b"Subject: kept")                  # the one after it is through,
    assert len(deleting.drop_files()) == 1                      # and the deleted one never came


def test_a_dns_server_that_does_not_answer_is_a_temperror(start_server):
    silent = free_port()            # nothing listens there: every query goes unanswered
    server = start_with_dns(start_server, f"127.0.0.1:{silent}", '''
[[pipeline]]
stage = "sender_id"
temp_error_action = "Reject"
dns_timeout = "2s"
''')
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as c:
        c.ehlo("mx.client.test")
        assert c.mail("alice@pass.test") == (
            451, b"4.7.24 SPF validation error: temporary DNS error checking pass.test")

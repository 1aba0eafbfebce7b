"""NDRs are RFC 3464 reports that mail programs can parse."""

import email
import email.policy

from exedge.dsn import FailedRecipient, build_ndr, wants_ndr

ORIGINAL = b"From: a@s.test\r\nSubject: quarterly report\r\nX-Id: 7\r\n\r\nsecret body\r\n"


def ndr(**kw):
    args = dict(reporting_mta="edge01.example.com", original_sender="a@s.test", envid="ENV1", ret=None,
                arrival=1_700_000_000, now=1_700_000_100, original=ORIGINAL,
                failed=[FailedRecipient("b@x.test", "rfc822;B@x.test", "5.1.1", "550 5.1.1 User unknown",
                                        "mx.x.test"),
                        FailedRecipient("c@x.test", None, "5.3.4", "552 5.3.4 too big")])
    args.update(kw)
    return build_ndr(**args)


def test_report_structure_parses_as_rfc3464():
    msg = email.message_from_bytes(ndr(), policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Subject"] == "Undeliverable: quarterly report"
    assert msg["To"].addresses[0].addr_spec == "a@s.test" and "MAILER-DAEMON@edge01.example.com" in msg["From"]
    human, status, returned = msg.iter_parts()
    assert human.get_content_type() == "text/plain"
    assert "550 5.1.1 User unknown" in human.get_content() and "mx.x.test" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    raw = status.as_bytes()
    assert b"Reporting-MTA: dns; edge01.example.com" in raw and b"Original-Envelope-Id: ENV1" in raw
    for needed in (b"Final-Recipient: rfc822; b@x.test", b"Original-Recipient: rfc822;B@x.test",
                   b"Action: failed", b"Status: 5.1.1", b"Remote-MTA: dns; mx.x.test",
                   b"Diagnostic-Code: smtp; 550 5.1.1 User unknown", b"Final-Recipient: rfc822; c@x.test",
                   b"Status: 5.3.4", b"Last-Attempt-Date: "):
        assert needed in raw
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"X-Id: 7" in returned.as_bytes() and b"secret body" not in ndr()


def test_ret_full_returns_the_whole_message_and_lines_are_crlf():
    data = ndr(ret="FULL")
    assert b"secret body" in data and b"message/rfc822" in data
    assert data.count(b"\n") == data.count(b"\r\n")


def test_notify_decides():
    assert wants_ndr(()) and wants_ndr(("FAILURE",)) and wants_ndr(("SUCCESS", "FAILURE"))
    assert not wants_ndr(("NEVER",)) and not wants_ndr(("SUCCESS", "DELAY"))


def test_delay_notice_says_delayed_and_until_when():
    from exedge.dsn import wants_delay_notice
    data = ndr(ret="FULL", retry_until=1_700_172_800,
               failed=[FailedRecipient("b@x.test", None, "4.4.1", "451 4.4.1 no answer", action="delayed")])
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["Subject"] == "Delayed: quarterly report"
    raw = list(msg.iter_parts())[1].as_bytes()
    assert b"Action: delayed" in raw and b"Status: 4.4.1" in raw and b"Will-Retry-Until: " in raw
    assert b"secret body" not in data      # a delay notice never returns the body
    assert wants_delay_notice(()) and wants_delay_notice(("DELAY",)) and not wants_delay_notice(("FAILURE",))


def test_long_remote_replies_cannot_make_the_ndr_undeliverable():
    data = ndr(failed=[FailedRecipient("b@x.test", None, "5.0.0", "550 " + "x" * 5000)])
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def recipient_blocks(data: bytes):
    msg = email.message_from_bytes(data, policy=email.policy.default)
    return list(msg.iter_parts())[1].get_payload()[1:]      # after the per-message block


def test_diagnostic_code_quotes_the_reply_as_received_and_status_has_the_enhanced_code():
    multi = ("550-5.1.1 The email account that you tried to reach does not exist. Please try "
             "550-5.1.1 double-checking the recipient's email address for typos or "
             "550 5.1.1 unnecessary spaces.  https://support.example.test/mail/?p=NoSuchUser")
    data = ndr(failed=[FailedRecipient("b@x.test", None, "5.0.0", "550 No such user here", "mx.x.test"),
                       FailedRecipient("c@x.test", None, "5.1.1", multi, "mx.x.test")])
    plain, folded = recipient_blocks(data)
    assert plain["Status"] == "5.0.0" and plain["Diagnostic-Code"] == "smtp; 550 No such user here"
    assert folded["Status"] == "5.1.1" and folded["Diagnostic-Code"] == "smtp; " + multi
    assert b"Diagnostic-Code: smtp; 550 No such user here\r\n" in data
    # a long reply is folded (RFC 5322 §2.2.3), not cut: unfolding gives it back exactly
    start = data.index(b"Diagnostic-Code: smtp; 550-5.1.1")
    field = data[start:data.index(b"\r\nLast-Attempt-Date", start)]
    assert field.count(b"\r\n ") >= 2 and max(len(line) for line in field.split(b"\r\n")) <= 78
    assert field.replace(b"\r\n", b"") == b"Diagnostic-Code: smtp; " + multi.encode()

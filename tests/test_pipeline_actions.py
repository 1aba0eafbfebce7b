"""
What stages do to messages (headers, SCL, redirect, quarantine, delete,
replace), the later hooks (headers, auth, queued, route), stage verbs, and
the built-in content stages: header firewall, content restrictions,
attachment filter. Unit-level on a StringTransport session, then through
real SMTP into a real server.
"""

import email
import email.policy
import os
import smtplib
from email.message import EmailMessage

import pytest

from exedge.auth.permissions import Principal, session_permissions
from exedge.config import ConfigError, loads
from exedge.pipeline import Stage, build_pipeline, ok, reject
from exedge.pipeline.content import AttachmentFilter, ContentRestrictions, HeaderFirewall, message_priority
from exedge.queue.incoming import SPILL_THRESHOLD
from harness import config_text
from test_pipeline import session_with

START = b"EHLO client.test\r\nMAIL FROM:<a@partner.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"


def stored(s, index=-1) -> bytes:
    return s.sink.messages[index].read_data()


class Acts(Stage):
    """A stage that does, at the final dot, what it is given."""

    name = "acts"

    def __init__(self, act):
        self.act = act

    def on_message(self, session, message):
        return self.act(message)


def test_header_actions_and_scl_rewrite_the_message_before_it_is_committed(tmp_path):
    def act(m):
        m.add_header("X-Checked", "yes")
        m.remove_header("X-Remove-Me")
        m.remove_header("x-drop-*")
        m.set_scl(3)
        m.set_scl(1)                 # the highest level stays

    s = session_with(tmp_path, Acts(act))
    s.send(START)
    body = (b"X-Remove-Me: a\r\n\tfolded\r\nX-Drop-This: b\r\nSubject: kept\r\nX-Keep: c\r\n\r\n"
            b"X-Remove-Me: in the body stays\r\n")
    assert s.codes(body + b".\r\n") == ["250 2.6.0"]
    data = stored(s)
    assert data.startswith(b"X-Checked: yes\r\nX-MS-Exchange-Organization-SCL: 3\r\nReceived: from client.test")
    assert data.endswith(b"Subject: kept\r\nX-Keep: c\r\n\r\nX-Remove-Me: in the body stays\r\n")
    assert b"folded" not in data and b"X-Drop-This" not in data
    # Envelope.size is the octets stored and sent: our Received field and the added fields count
    assert s.sink.messages[-1].envelope.size == len(data) == s.sink.messages[-1].data_length


def test_an_untouched_message_is_committed_as_received(tmp_path):
    s = session_with(tmp_path, Acts(lambda m: None))
    s.send(START)
    s.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    data = stored(s)
    assert data.startswith(b"Received: ") and data.endswith(b"Subject: x\r\n\r\nbody\r\n")


def test_header_values_cannot_smuggle_lines():
    from exedge.pipeline import Message
    m = Message("", [], b"", 0)
    with pytest.raises(ValueError):
        m.add_header("X-Evil", "a\r\nBcc: victim@example.com")
    with pytest.raises(ValueError):
        m.add_header("X Evil", "a")


def test_redirect_keeps_the_original_recipient_as_orcpt(tmp_path):
    s = session_with(tmp_path, Acts(lambda m: m.redirect("BOB@example.com", ["carol@example.com", "dan@example.com"])))
    s.send(b"EHLO client.test\r\nMAIL FROM:<a@partner.test>\r\nRCPT TO:<bob@example.com>\r\n"
           b"RCPT TO:<carol@example.com>\r\nDATA\r\n")
    assert s.codes(b"Subject: x\r\n\r\nhi\r\n.\r\n") == ["250 2.6.0"]
    recipients = s.sink.messages[-1].envelope.recipients
    assert [(r.address, r.orcpt) for r in recipients] == [
        ("carol@example.com", "rfc822;bob@example.com"), ("dan@example.com", "rfc822;bob@example.com")]


def test_quarantine_goes_to_the_quarantine_mailbox_or_is_refused_without_one(tmp_path):
    s = session_with(tmp_path, Acts(lambda m: m.quarantine("looks like spam")))
    s.send(START)
    assert s.codes(b"Subject: x\r\n\r\nhi\r\n.\r\n") == ["550 5.7.1"]         # no mailbox: refused, not lost
    assert s.sink.messages == []

    s = session_with(tmp_path / "2", Acts(lambda m: m.quarantine("looks like spam")))
    s.context.cleanup.quarantine_mailbox = "quarantine@example.com"
    s.send(START)
    assert s.codes(b"Subject: x\r\n\r\nhi\r\n.\r\n") == ["250 2.6.0"]
    msg = s.sink.messages[-1]
    assert [r.address for r in msg.envelope.recipients] == ["quarantine@example.com"]
    data = msg.read_data()
    assert b"X-Exedge-Quarantine-Reason: looks like spam\r\n" in data
    assert b"X-Exedge-Original-Recipients: bob@example.com\r\n" in data


def test_delete_answers_250_and_keeps_nothing(tmp_path):
    s = session_with(tmp_path, Acts(lambda m: m.delete("policy")))
    s.send(START)
    assert s.codes(b"Subject: x\r\n\r\nhi\r\n.\r\n") == ["250 2.6.0"]
    assert s.sink.messages == []
    assert list((tmp_path / "spool" / "queue").iterdir()) == []
    assert list((tmp_path / "spool" / "incoming").iterdir()) == []


def test_a_stage_reads_and_replaces_a_message_that_spilled_to_disk(tmp_path):
    seen = []

    class Upper(Stage):
        name = "upper"

        async def on_message(self, session, message):
            content = await message.body()
            again = await message.body()           # read once, shared
            seen.append((len(content), content is again))
            message.replace(content.replace(b"line", b"LINE"))

    s = session_with(tmp_path, Upper())
    s.send(START)
    body = b"Subject: big\r\n\r\n" + b"line of text, long enough\r\n" * (SPILL_THRESHOLD // 20)
    assert s.codes(body + b".\r\n") == ["250 2.6.0"]
    assert seen == [(len(body), True)]
    data = stored(s)
    assert data.endswith(body.replace(b"line", b"LINE")) and data.startswith(b"Received: ")
    assert s.sink.messages[-1].envelope.size == len(data)          # stored octets, Received field included


def test_headers_hook_answers_at_the_final_dot_and_queued_hook_gets_the_id(tmp_path):
    calls = []

    class Watch(Stage):
        name = "watch"

        def on_headers(self, session, message):
            calls.append(("headers", message.headers["Subject"]))
            if message.headers["Subject"] == "no":
                return reject("Not this subject", "5.7.1", 550)

        def on_queued(self, session, queue_id):
            calls.append(("queued", queue_id))

    s = session_with(tmp_path, Watch())
    s.send(START)
    assert s.codes(b"Subject: no\r\n\r\nhi\r\n.\r\n") == ["550 5.7.1"]
    s.send(b"MAIL FROM:<a@partner.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    out = s.send(b"Subject: yes\r\n\r\nhi\r\n.\r\n")
    assert calls[:2] == [("headers", "no"), ("headers", "yes")]
    assert calls[2][0] == "queued" and calls[2][1].encode() in out


def test_stage_verbs_and_ehlo_keywords(tmp_path):
    class Knock(Stage):
        name = "knock"
        ehlo_keywords = ("XKNOCK",)

        def __init__(self):
            self.verbs = {"XKNOCK": self.knock}

        def knock(self, session, argument):
            if argument == "please":
                return ok("Who is there?\nExedge.", "2.0.0", 250)
            return reject("Say please", "5.5.4", 501)

    s = session_with(tmp_path, Knock())
    assert s.send(b"EHLO client.test\r\n").endswith(b"250-8BITMIME\r\n250 XKNOCK\r\n")
    assert s.send(b"XKNOCK please\r\n") == b"250-2.0.0 Who is there?\r\n250 Exedge.\r\n"
    assert s.codes(b"XKNOCK\r\n") == ["501 5.5.4"]
    # a stage limited to another connector neither answers nor advertises its verb
    s = session_with(tmp_path / "2", Knock(), connectors=frozenset({"From Internal Org"}))
    assert b"XKNOCK" not in s.send(b"EHLO client.test\r\n")
    assert s.codes(b"XKNOCK please\r\n") == ["500 5.5.1"]


def test_a_verb_that_raises_gets_451_and_the_session_goes_on(tmp_path):
    class Broken(Stage):
        name = "broken"
        verbs = {"XBOOM": lambda self, session, arg: 1 / 0}

    stage = Broken()
    stage.verbs = {"XBOOM": lambda session, arg: 1 / 0}
    s = session_with(tmp_path, stage)
    s.send(b"EHLO client.test\r\n")
    assert s.codes(b"XBOOM\r\nNOOP\r\n") == ["451 4.3.0", "250 2.0.0"]


# -- header firewall -----------------------------------------------------------

SPOOFED = (b"Received: from evil.test\r\nX-MS-Exchange-Organization-SCL: -1\r\nX-Exedge-Quarantine-Reason: x\r\n"
           b"X-MS-Exchange-Forest-Rules: y\r\nResent-From: boss@example.com\r\nSubject: hi\r\n\r\nbody\r\n.\r\n")


def test_header_firewall_strips_organization_headers_from_anonymous_peers(tmp_path):
    s = session_with(tmp_path, HeaderFirewall())
    s.send(START)
    assert s.codes(SPOOFED) == ["250 2.6.0"]
    data = stored(s)
    assert b"X-MS-Exchange-Organization-SCL" not in data and b"X-Exedge-" not in data
    assert b"X-MS-Exchange-Forest-Rules" not in data
    # anonymous peers hold Accept-Headers-Routing: their Received and Resent-* stay
    assert b"Received: from evil.test\r\n" in data and b"Resent-From:" in data


def test_header_firewall_trusts_each_principal_as_exchange_does(tmp_path):
    # Externally Secured Servers hold Accept-Headers-Routing but not -Organization or -Forest
    s = session_with(tmp_path, HeaderFirewall(), peer="127.0.0.2")
    s.send(START)
    assert s.codes(SPOOFED) == ["250 2.6.0"]
    data = stored(s)
    assert b"X-MS-Exchange-Organization-SCL" not in data and b"Received: from evil.test\r\n" in data
    # an authenticated Exchange server holds them all
    s = session_with(tmp_path / "2", HeaderFirewall())
    s.send(b"EHLO client.test\r\n")
    s.proto.session.permissions = session_permissions(["ExchangeServers"], ["Tls"],
                                              authenticated_as=[Principal.ExchangeServers])
    s.send(b"MAIL FROM:<a@partner.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert s.codes(SPOOFED) == ["250 2.6.0"]
    data = stored(s)
    assert b"X-MS-Exchange-Organization-SCL: -1\r\n" in data and b"X-MS-Exchange-Forest-Rules: y\r\n" in data


# -- content restrictions ------------------------------------------------------------

@pytest.mark.parametrize("field, priority", [
    (b"Importance: High", "High"), (b"X-Priority: 1 (Highest)", "High"), (b"Priority: non-urgent", "Low"),
    (b"importance:low", "Low"), (b"X-Priority: 3", "Normal"), (b"Subject: urgent", "Normal"),
])
def test_message_priority(field, priority):
    assert message_priority(b"From: a@b.test\r\n" + field + b"\r\n") == priority


def test_content_restrictions_on_a_receive_connector(tmp_path):
    s = session_with(tmp_path, ContentRestrictions(allow_system_messages=False, allowed_priorities=("Normal", "Low"),
                                                   max_message_size=100))
    s.send(b"EHLO client.test\r\n")
    assert s.codes(b"MAIL FROM:<>\r\n") == ["550 5.7.1"]
    s.send(b"MAIL FROM:<a@partner.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert s.codes(b"Importance: high\r\n\r\nhi\r\n.\r\n") == ["550 5.7.1"]
    s.send(b"MAIL FROM:<a@partner.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert s.codes(b"Subject: x\r\n\r\n" + b"y" * 200 + b"\r\n.\r\n") == ["552 5.3.4"]
    s.send(b"MAIL FROM:<a@partner.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert s.codes(b"Importance: low\r\n\r\nhi\r\n.\r\n") == ["250 2.6.0"]
    assert s.sink.messages[-1].envelope.notes == {"priority": "Low"}


def test_content_restrictions_send_connectors_must_exist():
    cfg = loads(config_text(25) + '''
[[pipeline]]
stage = "content_restrictions"
send_connectors = { "Nowhere" = { allow_system_messages = false } }
''')
    with pytest.raises(ConfigError, match=r"pipeline\[0\].*no send connector 'Nowhere'"):
        build_pipeline(cfg, None)
    cfg = loads(config_text(25) + '''
[[pipeline]]
stage = "content_restrictions"
send_connectors = { "Local drop" = { allowed_priorities = ["Urgent"] } }
''')
    with pytest.raises(ConfigError, match=r"send_connectors.Local drop: .*Urgent"):
        build_pipeline(cfg, None)


ROUTING = '''
[[send_connectors]]
name = "Primary"
address_spaces = ["partner.test;1"]
drop_directory = "var/primary"

[[send_connectors]]
name = "Secondary"
address_spaces = ["partner.test;5"]
drop_directory = "var/secondary"

[[pipeline]]
stage = "content_restrictions"
send_connectors = { "Primary" = { allow_system_messages = false }, "Secondary" = { allowed_priorities = ["Normal", "Low"] } }
'''


def _eml(server, name):
    d = server.path("var", name)
    return sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".eml")) if os.path.isdir(d) else []


def test_a_connector_that_may_not_carry_delivery_reports_hands_them_to_the_next(start_server):
    server = start_server(internal='permission_groups = ["ExchangeServers"]', extra=ROUTING)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10, source_address=("127.0.0.2", 0)) as c:
        c.sendmail("a@example.com", ["x@partner.test"], b"Subject: ordinary\r\n\r\nhi\r\n")
        c.sendmail("", ["y@partner.test"], b"Subject: a delivery report\r\n\r\nhi\r\n")
        # a high-priority report: neither connector may carry it, so it bounces (to nobody: null sender)
        c.sendmail("", ["z@partner.test"], b"Subject: urgent report\r\nImportance: High\r\n\r\nhi\r\n")
    server.wait_for(lambda: _eml(server, "primary") and _eml(server, "secondary"), what="both deliveries")
    primary = [open(p, "rb").read() for p in _eml(server, "primary")]
    secondary = [open(p, "rb").read() for p in _eml(server, "secondary")]
    assert len(primary) == 1 and b"Subject: ordinary" in primary[0]
    assert len(secondary) == 1 and b"Subject: a delivery report" in secondary[0]
    server.wait_for(lambda: "No send connector may carry this message to partner.test" in server.log,
                    what="the refused report in the log")


# -- attachment filter -----------------------------------------------------------------

def _with_attachments(*attachments, nested=False) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@partner.test", "bob@example.com", "files"
    msg.set_content("see attached")
    for name, ctype, data in attachments:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    if nested:
        outer = EmailMessage()
        outer["From"], outer["To"], outer["Subject"] = "a@partner.test", "bob@example.com", "forward"
        outer.set_content("forwarded")
        outer.add_attachment(msg)
        msg = outer
    return msg.as_bytes(policy=email.policy.SMTP)


def _send(s, raw: bytes):
    s.send(START)
    return s.codes(raw.replace(b"\r\n.", b"\r\n..") + b".\r\n")


def test_attachment_filter_strips_blocked_files_in_nested_messages_with_encoded_names(tmp_path):
    s = session_with(tmp_path, AttachmentFilter())
    raw = _with_attachments(("report.pdf", "application/pdf", b"%PDF-1.4 fine"),
                            ("rechnung_müller.exe", "application/octet-stream", b"MZ\x90\x00evil"), nested=True)
    assert b"rechnung_m" not in raw or b"utf-8''" in raw.lower() or b"=?" in raw   # the name is encoded
    assert _send(s, raw) == ["250 2.6.0"]
    data = stored(s)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    names = [p.get_filename() for p in parsed.walk() if p.get_filename()]
    assert "report.pdf" in names and "rechnung_müller.exe.txt" in names and "rechnung_müller.exe" not in names
    assert b"MZ\x90" not in data and b"TVqQAGV2aWw" not in data                     # the payload is gone
    assert parsed["Subject"] == "forward"
    removed = [p for p in parsed.walk() if p.get_filename() == "rechnung_müller.exe.txt"][0]
    assert "This attachment was removed." in removed.get_content()


def test_attachment_filter_by_content_type_reject_and_silent_delete(tmp_path):
    s = session_with(tmp_path, AttachmentFilter(content_types=("application/x-msdownload",), file_names=(),
                                                action="Reject"))
    assert _send(s, _with_attachments(("setup.bin", "application/x-msdownload", b"x"))) == ["554 5.6.1"]
    assert _send(s, _with_attachments(("setup.exe", "application/octet-stream", b"x"))) == ["250 2.6.0"]

    s = session_with(tmp_path / "2", AttachmentFilter(action="SilentDelete"))
    assert _send(s, _with_attachments(("run.bat", "text/plain", b"echo"))) == ["250 2.6.0"]
    assert s.sink.messages == []


def test_attachment_filter_leaves_clean_mail_unread_and_unchanged(tmp_path):
    reads = []

    class Spy(AttachmentFilter):
        async def on_message(self, session, message):
            real = message.body
            message.body = lambda: (reads.append(1), real())[1]
            return await super().on_message(session, message)

    s = session_with(tmp_path, Spy())
    s.send(START)
    assert s.codes(b"Subject: plain\r\n\r\njust text\r\n.\r\n") == ["250 2.6.0"]
    assert reads == []                                               # no multipart, no name: never read
    raw = _with_attachments(("notes.txt", "text/plain", b"fine"))
    assert _send(s, raw) == ["250 2.6.0"]
    assert reads == [1]
    assert stored(s).endswith(raw)                                   # nothing blocked: byte-identical


def test_a_whole_message_that_is_a_blocked_file_keeps_its_header(tmp_path):
    s = session_with(tmp_path, AttachmentFilter())
    raw = (b"From: a@partner.test\r\nSubject: tool\r\nContent-Type: application/octet-stream; name=\"tool.exe\"\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n")
    assert _send(s, raw) == ["250 2.6.0"]
    data = stored(s)
    assert b"Subject: tool\r\n" in data and b"TVqQ" not in data and b"This attachment was removed." in data


def test_attachment_stripped_through_real_smtp_with_the_default_list(start_server):
    server = start_server(extra='''
[[pipeline]]
stage = "attachment_filter"

[[pipeline]]
stage = "header_firewall"
''')
    raw = _with_attachments(("photo.jpg", "image/jpeg", b"\xff\xd8\xff"), ("invoice.pdf.scr", "application/octet-stream",
                                                                          b"MZ" * 100))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.sendmail("a@partner.test", ["bob@example.com"],
                   b"X-MS-Exchange-Organization-SCL: -1\r\n" + raw)
    path = server.wait_for(server.drop_files, what="the delivered message")[0]
    parsed = email.message_from_bytes(open(path, "rb").read(), policy=email.policy.default)
    names = sorted(p.get_filename() for p in parsed.walk() if p.get_filename())
    assert names == ["invoice.pdf.scr.txt", "photo.jpg"]
    assert parsed["X-MS-Exchange-Organization-SCL"] is None


def test_a_blocked_type_without_a_file_name_is_caught_at_the_top_level(tmp_path):
    s = session_with(tmp_path, AttachmentFilter(action="Reject"))
    raw = (b"From: a@partner.test\r\nSubject: update\r\nContent-Type: application/x-msdownload\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n")
    assert _send(s, raw) == ["554 5.6.1"]


@pytest.mark.parametrize("lines", [1, SPILL_THRESHOLD // 30], ids=["in memory", "spilled"])
def test_a_message_without_header_fields_keeps_its_body_whatever_the_stages_remove(tmp_path, lines):
    """
    Defect: a message whose header section is empty (it begins with the
    empty line) had its body lines read as header fields and removed.
    """
    def act(m):
        m.remove_header("X-Looks-Like-A-Field")
        m.remove_header("subject")
        m.add_header("X-Checked", "yes")

    s = session_with(tmp_path, Acts(act))
    s.send(START)
    body = (b"\r\nX-Looks-Like-A-Field: but this is the body\r\nSubject: body too\r\n\r\n" +
            b"more of the body, line after line\r\n" * lines)
    assert s.codes(body + b".\r\n") == ["250 2.6.0"]
    data = stored(s)
    assert data.startswith(b"X-Checked: yes\r\nReceived: from client.test")
    assert data.endswith(b"\r\n\r\n" + body[2:])           # our Received field, the empty line, the body intact

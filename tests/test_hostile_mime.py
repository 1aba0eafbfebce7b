"""
The attachment filter on hostile MIME. Each of these messages made the
filter raise, so the runner answered 451 4.3.0 and logged a traceback on
every retry: deep nesting, file names that cannot be decoded, 8-bit bodies
and header fields beside a stripped part, content the email package
cannot parse. On a StringTransport session, then through a real server
with smtplib.
"""

import email
import email.policy
import smtplib

import pytest
import pytest_twisted
from twisted.internet import defer

from exedge.config import ConfigError, loads
from exedge.pipeline import build_pipeline
from exedge.pipeline.content import AttachmentFilter
from harness import config_text
from test_pipeline import session_with
from test_pipeline_actions import _send, stored

EXE_PART = (b"Content-Type: application/octet-stream; name=\"evil.exe\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            b"TVqQAAMAAAAEAAAA\r\n")


def _multipart(*parts: bytes, top: bytes = b"From: a@partner.test\r\nSubject: parts\r\nMIME-Version: 1.0\r\n") -> bytes:
    body = b"".join(b"--XX\r\n" + part for part in parts)
    return top + b"Content-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n" + body + b"--XX--\r\n"


def _nested_multiparts(depth: int, inner: bytes = EXE_PART) -> bytes:
    """C{inner} at C{depth}: inside C{depth} multiparts, one in the other."""
    out = [b"From: a@partner.test\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"]
    for i in range(depth):
        out.append(b"Content-Type: multipart/mixed; boundary=\"b%d\"\r\n\r\n--b%d\r\n" % (i, i))
    out.append(inner)
    out.extend(b"--b%d--\r\n" % i for i in reversed(range(depth)))
    return b"".join(out)


def _nested_messages(depth: int, inner: bytes = EXE_PART) -> bytes:
    """C{inner} at C{depth}: the body of a message/rfc822 part, C{depth} times over."""
    out = [b"From: a@partner.test\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"]
    out.extend(b"Content-Type: message/rfc822\r\n\r\nSubject: forwarded %d\r\n" % i for i in range(depth))
    return b"".join(out) + inner


def nothing_spooled(s, tmp_path) -> bool:
    return (s.sink.messages == [] and list((tmp_path / "spool" / "queue").iterdir()) == []
            and list((tmp_path / "spool" / "incoming").iterdir()) == [])


def test_a_thousand_nested_multiparts_are_refused_for_good(tmp_path):
    s = session_with(tmp_path, AttachmentFilter())
    assert _send(s, _nested_multiparts(1000)) == ["554 5.6.0"]
    assert b"nested deeper than 100 levels" in s.transport.value()
    assert nothing_spooled(s, tmp_path)
    assert _send(s, _multipart(b"Content-Type: text/plain\r\n\r\nhi\r\n")) == ["250 2.6.0"]  # the session goes on


def test_three_hundred_nested_messages_are_refused_for_good(tmp_path):
    s = session_with(tmp_path, AttachmentFilter())
    assert _send(s, _nested_messages(300)) == ["554 5.6.0"]             # the .exe inside made it re-serialise
    assert b"nested deeper than 100 levels" in s.transport.value()
    assert nothing_spooled(s, tmp_path)


def test_max_nesting_depth_is_the_deepest_part_walked(tmp_path):
    s = session_with(tmp_path, AttachmentFilter(max_nesting_depth=4))
    assert _send(s, _nested_multiparts(4)) == ["250 2.6.0"]              # the .exe at depth 4: walked, stripped
    assert b"TVqQ" not in stored(s) and b"Original file: evil.exe" in stored(s)
    assert _send(s, _nested_multiparts(3, inner=b"Content-Type: message/rfc822\r\n\r\n" + EXE_PART)) == ["250 2.6.0"]
    assert len(s.sink.messages) == 2
    assert _send(s, _nested_multiparts(5)) == ["554 5.6.0"]
    assert _send(s, _nested_messages(5)) == ["554 5.6.0"]
    assert len(s.sink.messages) == 2


def test_max_nesting_depth_option():
    def stage(value):
        return build_pipeline(loads(config_text(25) + f'''
[[pipeline]]
stage = "attachment_filter"
{value}
'''), None).entries[0].stage

    assert stage("").max_nesting_depth == 100
    assert stage("max_nesting_depth = 20").max_nesting_depth == 20
    for bad in ("0", "151", "true", '"100"', "2.5"):
        with pytest.raises(ConfigError, match=r"pipeline\[0\]\.max_nesting_depth.*from 1 to 150"):
            stage(f"max_nesting_depth = {bad}")


def test_an_encoded_file_name_that_cannot_be_decoded_counts_as_blocked(tmp_path):
    s = session_with(tmp_path, AttachmentFilter())
    # an encoded word whose charset name is not ASCII (CharsetError), then one Python has no codec for
    # (LookupError: the name used to be matched undecoded, as "=?x-unknown?Q?invoice=2Eexe?=", and passed,
    # though a client that reads an unknown charset as ASCII shows invoice.exe)
    for name in (b"=?\xc3\xbctf-8?Q?evil=2Eexe?=", b"=?x-unknown?Q?invoice=2Eexe?="):
        raw = _multipart(b"Content-Type: text/plain\r\n\r\nsee attached\r\n",
                         b"Content-Type: application/octet-stream; name=\"" + name + b"\"\r\n"
                         b"Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n")
        assert _send(s, raw) == ["250 2.6.0"]
        data = stored(s)
        assert b"TVqQ" not in data and b"see attached" in data
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        notice = [p for p in parsed.walk() if p.get_filename()][0]
        assert notice.get_filename().startswith("unreadable file name ") and notice.get_filename().endswith(".txt")
        assert notice.get_content().startswith("This attachment was removed.\r\nOriginal file: unreadable file name")


def test_a_broken_rfc2231_continuation_counts_as_blocked(tmp_path):
    s = session_with(tmp_path, AttachmentFilter(action="Reject"))
    raw = _multipart(b"Content-Type: text/plain\r\n\r\nsee attached\r\n",
                     b"Content-Type: application/octet-stream\r\n"
                     b"Content-Disposition: attachment; filename*=utf-8''notes.txt; filename*0=\"x.exe\"\r\n"
                     b"Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n")
    assert _send(s, raw) == ["554 5.6.1"]               # neither notes.txt nor x.exe: we cannot tell which
    s = session_with(tmp_path / "strip", AttachmentFilter())
    assert _send(s, raw) == ["250 2.6.0"]
    assert b"TVqQ" not in stored(s) and b"see attached" in stored(s)
    s = session_with(tmp_path / "types", AttachmentFilter(file_names=()))     # names not filtered: not read
    assert _send(s, raw) == ["250 2.6.0"] and stored(s).endswith(raw)


def test_an_8bit_body_beside_a_stripped_part_arrives_byte_identical(tmp_path):
    s = session_with(tmp_path, AttachmentFilter())
    kept = (
        # a multipart whose boundary never appears: the parser keeps its 8-bit body as one string
        b"Content-Type: multipart/alternative; boundary=\"lost\"\r\n\r\nGr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n",
        b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGr\xfc\xdfe\r\n",
    )
    raw = _multipart(*kept, EXE_PART)
    assert _send(s, raw) == ["250 2.6.0"]
    data = stored(s)
    assert b"--XX\r\n" + kept[0] + b"--XX\r\n" + kept[1] + b"--XX\r\n" in data
    assert b"TVqQ" not in data and b"Original file: evil.exe" in data


def test_the_header_fields_of_kept_parts_are_written_back_as_they_came(tmp_path):
    s = session_with(tmp_path, AttachmentFilter())
    kept = (b"Content-Type: text/plain; charset=utf-8; format=flowed; delsp=yes; x-origin=\"a parameter that makes "
            b"this line long\"\r\nContent-Description: agenda\x0citem: one\r\nX-Folded: first\r\n  second\r\n\r\nbody\r\n")
    # compat32 folded the long line again, and raised HeaderParseError on the form feed (a line end to splitlines)
    assert _send(s, _multipart(kept, EXE_PART)) == ["250 2.6.0"]
    assert b"--XX\r\n" + kept + b"--XX\r\n" in stored(s)
    assert b"TVqQ" not in stored(s)


def test_mime_the_email_package_cannot_read_is_refused_for_good_and_logged_once(tmp_path):
    from twisted.logger import globalLogPublisher
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        s = session_with(tmp_path, AttachmentFilter())
        # a broken RFC 2231 continuation of the boundary: the parser itself raises TypeError
        raw = (b"From: a@partner.test\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
               b"Content-Type: multipart/mixed; boundary*=utf-8''XX; boundary*0=\"YY\"\r\n\r\n"
               b"--XX\r\n" + EXE_PART + b"--XX--\r\n")
        assert _send(s, raw) == ["554 5.6.0"]
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert nothing_spooled(s, tmp_path)
    ours = [e for e in events if e.get("log_namespace") == "exedge.pipeline.content"]
    assert len(ours) == 1 and "TypeError" in ours[0]["error"] and "log_failure" not in ours[0]
    assert not [e for e in events if "log_failure" in e]                   # no traceback anywhere


def test_hostile_mime_through_real_smtp(start_server):
    server = start_server(extra='''
[[pipeline]]
stage = "attachment_filter"
''')
    eight_bit = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    lost = b"Content-Type: multipart/alternative; boundary=\"lost\"\r\n\r\nK\xc3\xb6ln\r\n"
    unreadable = _multipart(EXE_PART).replace(b'boundary="XX"', b"boundary*=utf-8''XX; boundary*0=\"YY\"")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as c:
        for hostile in (_nested_multiparts(1000), _nested_messages(300), unreadable):
            with pytest.raises(smtplib.SMTPDataError) as e:
                c.sendmail("a@partner.test", ["bob@example.com"], hostile)
            assert e.value.smtp_code == 554 and e.value.smtp_error.startswith(b"5.6.0 ")
        c.sendmail("a@partner.test", ["bob@example.com"], _multipart(eight_bit, lost, EXE_PART),
                   mail_options=["BODY=8BITMIME"])
    delivered = server.wait_for(server.drop_files, what="the delivered message")
    assert len(delivered) == 1
    data = open(delivered[0], "rb").read()
    assert b"--XX\r\n" + eight_bit + b"--XX\r\n" + lost + b"--XX\r\n" in data
    assert b"TVqQ" not in data and b"Original file: evil.exe" in data
    assert "Traceback" not in server.log and "451 4.3.0" not in server.log
    assert server.log.count("whose MIME structure cannot be read: TypeError") == 1


@pytest_twisted.inlineCallbacks
def test_in_the_server_the_parse_runs_on_the_stages_own_threads_not_the_reactor():
    """
    The email package's parse costs time that grows with lines times
    nesting depth: in the server it runs on the stage's threads, and the
    reactor goes on serving other sessions meanwhile.
    """
    import threading
    from twisted.internet import reactor
    from exedge.pipeline import Message
    from exedge.pipeline.content import AttachmentFilterFactory
    from exedge.pipeline.registry import StageContext
    from exedge.pipeline.session import Session

    stage = AttachmentFilterFactory().build({}, StageContext(reactor, None, None))
    where = []
    examine = stage._examine
    stage._examine = lambda content: (where.append(threading.current_thread().name), examine(content))[1]
    data = _multipart(EXE_PART)
    header = data.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    message = Message("a@partner.test", ["bob@example.com"], header, len(data), read=lambda: defer.succeed(data))
    verdict = yield defer.ensureDeferred(stage.on_message(Session(peer="127.0.0.1"), message))
    assert verdict is None and message.replacement is not None and b"evil.exe" in message.replacement
    assert where and where[0].startswith("PoolThread-exedge-attachments")

"""
WireForm: data known at receipt to be in SMTP's wire form is not scanned
again when it is sent (exedge.interfaces.WireForm, exedge.send.client.dot_stuff).
The claim must never be made for data that is not: that would forward a bare
LF, the smuggling vector the DataReader refuses, or an unstuffed dot line.
"""

from hypothesis import HealthCheck, given, settings

from exedge.interfaces import WireForm, is_wire_form
from exedge.send.client import dot_stuff
from test_data_reader import bodies, limits, read
from test_pipeline import session_with
from test_pipeline_actions import START, Acts


@settings(max_examples=1000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=bodies, limits=limits)
def test_what_a_reader_accepts_without_a_dot_line_is_in_wire_form(body, limits):
    out = read(body, [], limits)
    if out.written is None or out.dot_lines:
        return
    written = out.written
    assert written == b"" or is_wire_form(written)
    # and sent as it is, it is what the scans would have made of it
    assert dot_stuff(WireForm(b"Received: x\r\n" + written)) == dot_stuff(b"Received: x\r\n" + written)


def test_wire_form_is_the_scan_free_path_of_dot_stuff():
    assert dot_stuff(WireForm(b"a\r\nb\r\n")) == b"a\r\nb\r\n.\r\n"
    assert type(dot_stuff(WireForm(b"a\r\n"))) is bytes
    assert not is_wire_form(b"a\nb\r\n") and not is_wire_form(b"a\r\n.b\r\n") and not is_wire_form(b".a\r\n")
    assert not is_wire_form(b"a\r\nb") and is_wire_form(b"a\r\n\r\nb\r\n")


def committed_data(tmp_path, body: bytes, act=lambda m: None):
    """The data of the commit request a session makes for C{body} (through a stage doing C{act})."""
    s = session_with(tmp_path, Acts(act))
    requests = []
    submit = s.spool.receiving.submit
    s.spool.receiving.submit = lambda request: requests.append(request) or submit(request)
    s.send(START)
    assert s.codes(body + b".\r\n") == ["250 2.6.0"]
    [request] = requests
    return request.data


def test_a_plain_message_goes_on_in_wire_form(tmp_path):
    data = committed_data(tmp_path, b"Subject: plain\r\n\r\nbody\r\n")
    assert type(data) is WireForm and is_wire_form(data) and data.startswith(b"Received: ")


def test_a_message_that_had_a_dot_line_is_scanned_when_sent(tmp_path):
    data = committed_data(tmp_path, b"Subject: dots\r\n\r\n..leading dot\r\n")
    assert type(data) is bytes and b"\r\n.leading dot\r\n" in data
    assert dot_stuff(data).endswith(b"\r\n..leading dot\r\n.\r\n")


def test_an_edited_message_is_scanned_when_sent(tmp_path):
    data = committed_data(tmp_path, b"Subject: edited\r\n\r\nbody\r\n", act=lambda m: m.add_header("X-Checked", "yes"))
    assert type(data) is bytes and data.startswith(b"X-Checked: yes\r\n")

"""twistd's text log through exedge's cheaper formatter (exedge.logs.text): same lines, less work."""

import io
import os
import re
import signal
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.logger import ILogObserver, LogLevel, formatEventAsClassicLogText, formatTime
from twisted.python.failure import Failure

from exedge.logs.literal import literal
from exedge.logs.text import StampCache, classic_line, text_observer, twistd_observer

from harness import free_port, server_config

BRACES = st.text(alphabet="{}ab0 \n\t:é", max_size=12)
LEVELS = st.sampled_from([None, *LogLevel.iterconstants()])


def _failure() -> Failure:
    try:
        raise ValueError("boom")
    except ValueError:
        return Failure()


@st.composite
def events(draw):
    """Events as exedge and Twisted log them: literal lines, fields, bad formats, systems, failures."""
    kind = draw(st.sampled_from(["literal", "fields", "raw", "none", "bytes"]))
    event = {}
    if kind == "literal":
        event["log_format"] = literal(draw(BRACES))
    elif kind == "fields":
        event["log_format"] = draw(BRACES) + "{who}" + draw(BRACES).replace("{", "{{").replace("}", "}}")
        event["who"] = draw(BRACES)
    elif kind == "raw":
        event["log_format"] = draw(BRACES)             # single braces: fields, or no valid format at all
        event["a"] = 1
    elif kind == "bytes":
        event["log_format"] = draw(BRACES).encode()
    if draw(st.booleans()):
        event["log_time"] = draw(st.floats(min_value=0, max_value=4e9))
    if draw(st.booleans()):
        event["log_system"] = draw(st.one_of(st.text(max_size=8), st.integers()))
    if draw(st.booleans()):
        event["log_namespace"] = draw(st.text(max_size=8))
    event["log_level"] = draw(LEVELS)
    if draw(st.integers(0, 9)) == 0:
        event["log_failure"] = _failure()
    return event


@settings(max_examples=400, deadline=None)
@given(events())
@example({"log_format": "}{{}", "log_time": 0.0})         # no valid format, though every brace has a twin
@example({"log_format": "{{0}}{0}", "log_level": LogLevel.info})
@example({"log_format": "a\nb {{x}}", "log_system": "-", "log_time": 1.5})
@example({"log_format": "", "log_time": 1.0})
def test_a_line_is_what_twisteds_classic_formatter_writes(event):
    stamp = StampCache()
    assert classic_line(event, stamp) == formatEventAsClassicLogText(event, formatTime=formatTime)


def test_the_stamp_is_formatted_once_a_second_and_is_twisteds():
    asked = []

    def format_time(when):
        asked.append(when)
        return formatTime(when)

    stamp = StampCache(format_time)
    start = 1_796_000_000.0
    times = [start + i * 0.13 for i in range(40)]            # about five seconds
    assert [stamp(t) for t in times] == [formatTime(t) for t in times]
    assert len(asked) == len({int(t) for t in times})
    assert stamp(None) == "-"


@pytest.fixture
def berlin():
    """Local time with summer time, so the offset changes on a known second."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


def test_the_stamp_follows_the_zone_across_a_change_of_offset(berlin):
    change = 1_774_746_000          # 2026-03-29 01:00 UTC: Berlin goes from +0100 to +0200
    stamp = StampCache()
    times = [change - 2 + i * 0.25 for i in range(16)]
    got = [stamp(t) for t in times]
    assert got == [formatTime(t) for t in times]
    assert got[0].endswith("+0100") and got[-1].endswith("+0200")


def test_the_observer_writes_and_flushes_each_line():
    out = io.StringIO()
    observer = text_observer(out)
    assert ILogObserver.providedBy(observer)
    observer({"log_format": literal("session {S1} +"), "log_time": 0.0, "log_namespace": "exedge.protocol",
              "log_level": LogLevel.info})
    observer({"log_format": ""})                 # formats to nothing: no line
    assert out.getvalue() == "1970-01-01T00:00:00+0000 [exedge.protocol#info] session {S1} +\n"


@pytest.mark.parametrize("argv, ours", [
    (["-n"], True),
    (["-n", "--logfile=-"], True),
    (["-n", "--logfile=x.log"], False),
    (["--logfile=x.log"], False),
    ([], False),                                  # a daemon writes twistd.log, rotated by SIGUSR1
    (["-n", "--syslog"], False),
    (["-n", "--logger=twisted.logger.textFileLogObserver"], False),
])
def test_exedge_writes_twistds_log_only_where_twistd_would_write_standard_output(tmp_path, argv, ours):
    from twisted.scripts.twistd import ServerOptions, _SomeApplicationRunner

    path = tmp_path / "exedge.toml"
    path.write_text(server_config().format(port=free_port()))
    config = ServerOptions()
    config.parseOptions([*argv, "--pidfile=", "exedge", "--config", str(path)])
    hup = signal.getsignal(signal.SIGHUP)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        # what twistd itself does before it starts logging: the plugin's service joins an Application
        application = _SomeApplicationRunner(config).createOrGetApplication()
    finally:
        os.chdir(cwd)
        signal.signal(signal.SIGHUP, hup)
    assert (application.getComponent(ILogObserver) is not None) == ours
    assert twistd_observer(config) is not None if ours else twistd_observer(config) is None


CLASSIC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]*\] .*$")


def test_a_running_servers_log_keeps_twistds_form(start_server):
    """The lines of a real `twistd -n exedge`: Twisted's own, exedge's literal ones, and ones with fields."""
    import smtplib

    server = start_server()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.ehlo("{client}.test")
    server.wait_for(lambda: ",-," in server.log, what="the session's end")
    lines = [line for line in server.log.splitlines() if line and not line.startswith("\t")]
    assert all(CLASSIC.match(line) for line in lines), [line for line in lines if not CLASSIC.match(line)]
    assert any("[exedge.protocol#info] " in line and ",+," in line for line in lines)
    assert any("twistd" in line and "starting up" in line for line in lines)

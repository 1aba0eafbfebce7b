"""
The CSV log writer (exedge/logs/csvlog.py) on a fake clock: header,
quoting and escaping read back with the csv module, buffered writes,
rotation by size and by day, retention by age and by directory size.
"""

import csv
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task

import exedge
from exedge.logs.csvlog import CsvLog, iso_time

DAY = 86400.0
T0 = 1796601600.0        # 2026-12-07T00:00:00Z
FIELDS = ("date-time", "a", "b")


def make(tmp_path, clock, **kw):
    log = CsvLog(str(tmp_path / "logs"), "RECV", "SMTP Receive Protocol Log", FIELDS, clock=clock,
                 run=lambda f: defer.maybeDeferred(f), **kw)
    log.startService()
    return log


def files(log):
    d = log.directory
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def read(path):
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\r\n")
    header = [line for line in lines if line.startswith("#")]
    rows = list(csv.reader([line for line in lines if line and not line.startswith("#")]))
    return header, rows


def test_header_rows_and_hostile_values_read_back(tmp_path):
    clock = task.Clock()
    clock.advance(T0 + 9 * 3600)
    log = make(tmp_path, clock)
    hostile = 'x,"y"\r\n\x1b[2J\x00 \u2028 é' + "z" * 3000
    log.write(("plain", hostile))
    assert files(log) == []                      # buffered: nothing written before the timer
    # (the header says when the file began: at the first flush)
    clock.advance(1.0)
    assert files(log) == ["RECV20261207-1.LOG"]
    header, rows = read(log.path)
    assert header == ["#Software: exedge", f"#Version: {exedge.__version__}",
                      "#Log-type: SMTP Receive Protocol Log", "#Date: 2026-12-07T09:00:01.000Z",
                      "#Fields: date-time,a,b"]
    assert len(rows) == 1
    assert rows[0][0] == "2026-12-07T09:00:00.000Z"
    assert rows[0][1] == "plain"
    # commas and quotes survive through csv quoting; controls come back escaped, one line
    assert rows[0][2] == 'x,"y"\\x0d\\x0a\\x1b[2J\\x00 \\u2028 é' + "z" * 3000
    log.stopService()


def test_stop_flushes_what_the_timer_has_not(tmp_path):
    clock = task.Clock()
    clock.advance(T0)
    log = make(tmp_path, clock)
    log.write(("1", "2"))
    log.stopService()
    assert read(log.path)[1][0][1:] == ["1", "2"]


def test_rotation_by_size_and_by_day(tmp_path):
    clock = task.Clock()
    clock.advance(T0)
    log = make(tmp_path, clock, max_file_size=600)
    for i in range(30):
        log.write((f"row{i}", "x" * 40))
        clock.advance(1.0)
    names = files(log)
    assert len(names) > 2 and all(n.startswith("RECV20261207-") for n in names)
    rows = []
    for n in sorted(names, key=lambda n: int(n[13:-4])):
        path = os.path.join(log.directory, n)
        assert os.path.getsize(path) <= 600
        header, got = read(path)
        assert header[-1] == "#Fields: date-time,a,b"      # every file has its header
        rows += [r[1] for r in got]
    assert rows == [f"row{i}" for i in range(30)]          # nothing lost, nothing twice, in order
    clock.advance(DAY)
    log.write(("tomorrow", ""))
    clock.advance(1.0)
    assert os.path.basename(log.path) == "RECV20261208-1.LOG"
    log.stopService()


def test_a_restart_begins_a_new_file(tmp_path):
    clock = task.Clock()
    clock.advance(T0)
    first = make(tmp_path, clock)
    first.write(("a", "b"))
    first.stopService()
    second = make(tmp_path, clock)
    second.write(("c", "d"))
    second.stopService()
    assert files(second) == ["RECV20261207-1.LOG", "RECV20261207-2.LOG"]


def test_retention_by_age_and_by_directory_size(tmp_path):
    clock = task.Clock()
    clock.advance(T0 + 40 * DAY)
    directory = tmp_path / "logs"
    directory.mkdir()
    now = clock.seconds()

    def old(name, age_days, size=100):
        path = directory / name
        path.write_bytes(b"x" * size)
        os.utime(path, (now - age_days * DAY, now - age_days * DAY))

    old("RECV20261101-1.LOG", 36)      # older than 30 days: goes
    old("RECV20261105-1.LOG", 31)      # goes
    old("RECV20261110-1.LOG", 10)      # young, but the directory is over its size: the oldest kept goes
    old("RECV20261111-1.LOG", 9)
    old("RECV20261112-1.LOG", 8)
    old("OTHER.LOG", 90)               # not this log's: never touched
    log = make(tmp_path, clock, max_age=30 * DAY, max_directory_size=250)
    # startService ran the sweep at once (on run's thread: here, in line)
    assert files(log) == ["OTHER.LOG", "RECV20261111-1.LOG", "RECV20261112-1.LOG"]
    # the file being written is never deleted, however old or large
    log.write(("x" * 400, ""))
    clock.advance(1.0)
    current = os.path.basename(log.path)
    clock.advance(3600.0)              # the next sweep
    assert current in files(log)
    assert "RECV20261111-1.LOG" not in files(log)
    log.stopService()


def _iso_reference(seconds: float) -> str:
    """Exchange's date-time the plain way: datetime for every row."""
    import datetime
    when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.floats(min_value=0, max_value=4e9),
                          st.integers(0, 4_000_000_000).map(lambda s: s + 0.9999995),
                          st.integers(0, 4_000_000_000).map(lambda s: s - 0.0000005)),
                min_size=1, max_size=20))
def test_the_date_time_formatted_once_a_second_is_what_datetime_gives(times):
    """iso_time keeps the last second's text; every row still gets datetime's own milliseconds."""
    times = times + sorted(times)        # the same second again, and time going back
    assert [iso_time(t) for t in times] == [_iso_reference(t) for t in times]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), st.integers(), st.text(max_size=6)),
                          st.one_of(st.none(), st.text(alphabet="ab,\"\r\n\x00\x1b\x7f\x85\u2028é", max_size=6))),
                min_size=1, max_size=5))
def test_each_value_is_escaped_alone_whatever_the_rest_of_its_row_holds(tmp_path_factory, rows):
    """A row is searched for control characters once; when it has any, each value is escaped on its own."""
    from exedge.logs.csvlog import escape
    clock = task.Clock()
    clock.advance(T0)
    log = make(tmp_path_factory.mktemp("rows"), clock)
    for row in rows:
        log.write(row)
    log.stopService()
    _, written = read(log.path)
    assert [r[1:] for r in written] == [[escape(v) for v in row] for row in rows]

"""
Back pressure (exedge/pressure.py, [back_pressure]): levels and hysteresis
on a task.Clock with fake probes; the 452 4.3.1 at MAIL FROM, by session
kind, in a session on a StringTransport and against a real server whose
thresholds make the level at once; the config's checks.
"""

from __future__ import annotations

import smtplib

import pytest
from twisted.internet import task
from twisted.logger import globalLogPublisher

from exedge.config import ConfigError, loads
from exedge.config.models import BackPressureConfig, free_space
from exedge.metrics import Metrics
from exedge.pressure import HIGH, MEDIUM, NORMAL, ResourceMonitor, rss_probe, statvfs_probe
from exedge.testing import StringSession

GB = 1024**3


class Probes:
    """Values the test sets; what the monitor reads at each sample."""

    def __init__(self):
        self.free, self.total = 50 * GB, 100 * GB
        self.free_inodes, self.inodes = 900_000, 1_000_000
        self.rss = 100 * 1024**2
        self.queue = 0
        self.fail_disk: Exception | None = None

    def free_space(self, path):
        if self.fail_disk is not None:
            raise self.fail_disk
        return self.free, self.total, self.free_inodes, self.inodes


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def pressure_lines(events) -> list[str]:
    return [e["line"] for e in events if str(e.get("line", "")).startswith("back pressure:")]


def monitor(probes: Probes, metrics=None, **keys):
    clock = task.Clock()
    config = BackPressureConfig(**{k: free_space(v) if k.startswith("min_free") else v for k, v in keys.items()})
    m = ResourceMonitor(config, clock, spool_directory="/spool", queue_length=lambda: probes.queue,
                        free_space=probes.free_space, rss=lambda: probes.rss, metrics=metrics)
    m.startService()
    return m, clock


def test_queue_length_levels_with_hysteresis_one_log_line_per_change(logged):
    probes = Probes()
    metrics = Metrics()
    m, clock = monitor(probes, metrics, max_queue_length_medium=1000, max_queue_length_high=2000)
    assert m.level == NORMAL
    probes.queue = 1001
    clock.advance(2)
    assert m.level == MEDIUM
    probes.queue = 2500
    clock.advance(2)
    assert m.level == HIGH
    # back under High's threshold, but not clearly (10 %: below 1800): still High, sample after sample
    for value in (1999, 1850, 1801, 1900):
        probes.queue = value
        clock.advance(2)
        assert m.level == HIGH, value
    probes.queue = 1799
    clock.advance(2)
    assert m.level == MEDIUM
    probes.queue = 950                  # under Medium's threshold, not clearly: Medium
    clock.advance(2)
    assert m.level == MEDIUM
    probes.queue = 899
    clock.advance(2)
    assert m.level == NORMAL
    probes.queue = 5000                 # straight to High, and from High straight back to Normal
    clock.advance(2)
    assert m.level == HIGH
    probes.queue = 0
    clock.advance(2)
    assert m.level == NORMAL
    lines = pressure_lines(logged)
    assert lines == [
        "back pressure: queue_length Normal -> Medium (queue_length 1001 messages; Medium above 1000 messages, "
        "High above 2000 messages); server level Medium",
        "back pressure: queue_length Medium -> High (queue_length 2500 messages; Medium above 1000 messages, "
        "High above 2000 messages); server level High",
        "back pressure: queue_length High -> Medium (queue_length 1799 messages; Medium above 1000 messages, "
        "High above 2000 messages); server level Medium",
        "back pressure: queue_length Medium -> Normal (queue_length 899 messages; Medium above 1000 messages, "
        "High above 2000 messages); server level Normal",
        "back pressure: queue_length Normal -> High (queue_length 5000 messages; Medium above 1000 messages, "
        "High above 2000 messages); server level High",
        "back pressure: queue_length High -> Normal (queue_length 0 messages; Medium above 1000 messages, "
        "High above 2000 messages); server level Normal",
    ]
    text = metrics.render().decode()
    assert 'exedge_back_pressure_level{resource="queue_length"} 0.0' in text
    assert 'exedge_back_pressure_value{resource="queue_length"} 0.0' in text
    assert 'exedge_back_pressure_transitions_total{level="High",resource="queue_length"} 2.0' in text
    assert 'exedge_back_pressure_transitions_total{level="Medium",resource="queue_length"} 2.0' in text
    m.stopService()
    assert not clock.getDelayedCalls()


def test_subscribers_hear_each_change_of_the_server_level_once():
    """What receive workers are told: the worst level, when it changes, not each resource's own changes."""
    probes = Probes()
    m, clock = monitor(probes, max_queue_length_medium=10, max_queue_length_high=20,
                       max_memory_medium=200 * 1024**2, max_memory_high=400 * 1024**2)
    heard = []
    m.subscribe(heard.append)
    probes.rss = 300 * 1024**2           # memory Medium: the server goes Medium
    clock.advance(2)
    probes.queue = 15                    # the queue Medium too: the server's level stays Medium
    clock.advance(2)
    probes.queue = 25                    # the queue High: the server High
    clock.advance(2)
    probes.queue = 0                     # the queue Normal, memory still Medium: the server Medium
    clock.advance(2)
    probes.rss = 100 * 1024**2
    clock.advance(2)
    assert heard == [MEDIUM, HIGH, MEDIUM, NORMAL]
    m.stopService()


def test_free_space_percent_and_size_the_smaller_of_both_and_its_hysteresis():
    probes = Probes()
    # defaults: Medium below "1GB or 10%", High below "500MB or 5%" (the smaller of the two)
    m, clock = monitor(probes)
    probes.free = int(1.5 * GB)          # 1.5 % of 100 GB, but above 1 GB: Normal on a large disk
    clock.advance(2)
    assert m.level == NORMAL
    probes.free = GB - 1
    clock.advance(2)
    assert m.level == MEDIUM and m.watches["free_space"].level == MEDIUM
    probes.free = 400 * 1024**2
    clock.advance(2)
    assert m.level == HIGH
    probes.free = 540 * 1024**2          # above 500 MB, under 550 MB: not clearly back
    clock.advance(2)
    assert m.level == HIGH
    probes.free = 560 * 1024**2
    clock.advance(2)
    assert m.level == MEDIUM
    # a small file system: the percentage is the smaller threshold
    probes.free, probes.total = 9 * 1024**2, 100 * 1024**2
    clock.advance(2)
    assert m.level == MEDIUM
    probes.free = 12 * 1024**2
    clock.advance(2)
    assert m.level == NORMAL
    status = m.status()
    assert status["level"] == "Normal"
    assert status["resources"]["free_space"] == {"level": "Normal", "value": 12 * 1024**2,
                                                 "medium": 10 * 1024**2, "high": 5 * 1024**2, "unit": "bytes"}


def test_inodes_watched_by_the_percentage_and_skipped_where_there_are_none():
    probes = Probes()
    m, clock = monitor(probes, min_free_space_medium="20%", min_free_space_high="2GB")
    probes.free_inodes = 150_000         # under 20 % of the inodes, disk bytes plentiful
    clock.advance(2)
    assert m.watches["inodes"].level == MEDIUM and m.watches["free_space"].level == NORMAL
    probes.free_inodes = 40_000          # High's key is a size: its inodes at the default 5 %
    clock.advance(2)
    assert m.level == HIGH
    probes.inodes = probes.free_inodes = 0   # btrfs: no inode count; the level stays where it was
    clock.advance(2)
    assert m.watches["inodes"].level == HIGH


def test_memory_and_the_worst_resource_wins():
    probes = Probes()
    m, clock = monitor(probes, max_memory_medium=200 * 1024**2, max_memory_high=300 * 1024**2,
                       max_queue_length_medium=10, max_queue_length_high=20)
    probes.rss = 250 * 1024**2
    clock.advance(2)
    assert m.level == MEDIUM
    probes.queue = 25
    clock.advance(2)
    assert m.level == HIGH
    probes.queue = 0
    clock.advance(2)
    assert m.level == MEDIUM and m.watches["memory"].level == MEDIUM


def test_sampled_every_two_seconds_from_start_and_a_failing_probe_logged_once(logged):
    probes = Probes()
    m, clock = monitor(probes, max_queue_length_medium=10, max_queue_length_high=20)
    assert m.watches["queue_length"].value == 0        # the first sample at start
    probes.queue = 15
    clock.advance(1.9)
    assert m.level == NORMAL
    clock.advance(0.1)
    assert m.level == MEDIUM
    probes.fail_disk = OSError(5, "Input/output error")
    for _ in range(5):
        clock.advance(2)
    errors = [e for e in logged if "cannot read" in str(e.get("log_format", ""))]
    assert len(errors) == 1
    assert m.level == MEDIUM
    probes.fail_disk = None
    clock.advance(2)
    assert [e for e in logged if "can be read again" in str(e.get("log_format", ""))]


def test_disabled_is_always_normal_and_samples_nothing():
    probes = Probes()
    probes.queue = 10**9
    m, clock = monitor(probes, enabled=False)
    clock.advance(10)
    assert m.level == NORMAL and m.watches["queue_length"].value is None
    assert not clock.getDelayedCalls()


def test_real_probes_read_this_machine(tmp_path):
    free, total, free_inodes, inodes = statvfs_probe(str(tmp_path))
    assert 0 <= free <= total and 0 <= free_inodes <= inodes
    assert 1024**2 < rss_probe() < 64 * GB


# -- configuration --------------------------------------------------------------------

BASE = '[server]\nfqdn = "edge01.example.com"\n'


def test_defaults_and_the_keys_read():
    c = loads(BASE).back_pressure
    assert c.enabled is True
    assert (c.min_free_space_medium.bytes, c.min_free_space_medium.percent) == (GB, 10.0)
    assert (c.min_free_space_high.bytes, c.min_free_space_high.percent) == (500 * 1024**2, 5.0)
    assert (c.max_queue_length_medium, c.max_queue_length_high) == (10000, 15000)
    c = loads(BASE + '[back_pressure]\nenabled = false\nmin_free_space_medium = "4GB"\nmin_free_space_high = "2GB"\n'
                     'max_memory_medium = "1GB"\nmax_memory_high = "1536MB"\nmax_queue_length_medium = 100\n'
                     'max_queue_length_high = 100\n').back_pressure
    assert c.enabled is False and c.min_free_space_high.bytes == 2 * GB and c.max_memory_high == 1536 * 1024**2


@pytest.mark.parametrize("lines, line, message", [
    ('min_free_space_medium = "2%"\nmin_free_space_high = "3%"\n', 4,
     "back_pressure.min_free_space_medium: 2% is less than min_free_space_high (3%): Medium must come before High"),
    ('max_memory_high = "1GB"\nmax_memory_medium = "2GB"\n', 5,
     "back_pressure.max_memory_medium: max_memory_medium (2147483648) is more than max_memory_high (1073741824)"),
    ('max_queue_length_medium = 20\nmax_queue_length_high = 10\n', 4,
     "back_pressure.max_queue_length_medium: max_queue_length_medium (20) is more than max_queue_length_high (10)"),
    ('min_free_space_high = "120%"\n', 4, "back_pressure.min_free_space_high: '120%': a percentage of the file system"),
    ('min_free_space_high = "lots"\n', 4, "back_pressure.min_free_space_high: invalid free space 'lots'"),
    ('max_queue_length_high = -1\n', 4, "back_pressure.max_queue_length_high: -1 is out of range"),
    ('min_free_space = "1GB"\n', 4, "back_pressure.min_free_space: unknown key"),
])
def test_bad_values_named_with_file_and_line(lines, line, message):
    with pytest.raises(ConfigError) as e:
        loads(BASE + "[back_pressure]\n" + lines, "edge.toml")
    assert any(str(p).startswith(f"edge.toml:{line}: {message}") for p in e.value.problems), e.value.problems


# -- at MAIL FROM, in one session --------------------------------------------------------

class Level:
    """A monitor as the session sees it: only its level."""

    def __init__(self, level):
        self.level = level


SESSION_CONFIG = BASE + """
[[accepted_domains]]
domain_name = "example.com"

[[receive_connectors]]
name = "From Internet"
usage = "Internet"
bindings = ["127.0.0.1:25"]
tarpit_interval = 0

[[receive_connectors]]
name = "From Internal Org"
bindings = ["127.0.0.1:25"]
remote_ip_ranges = ["10.0.0.2"]
auth_mechanisms = ["ExternalAuthoritative"]
permission_groups = ["ExchangeServers"]

[[send_connectors]]
name = "Local drop"
address_spaces = ["example.com"]
drop_directory = "var/drop"
"""


def session(tmp_path, level, peer="127.0.0.1"):
    s = StringSession(loads(SESSION_CONFIG), str(tmp_path / "spool"), peer=peer)
    s.context.back_pressure = Level(level)
    s.send(b"EHLO client.test\r\n")
    return s


@pytest.mark.parametrize("level, anonymous, secured", [
    (NORMAL, "250 2.1.0", "250 2.1.0"),
    (MEDIUM, "452 4.3.1", "250 2.1.0"),
    (HIGH, "452 4.3.1", "452 4.3.1"),
])
def test_mail_from_by_level_and_session_kind(tmp_path, level, anonymous, secured):
    assert session(tmp_path, level).codes(b"MAIL FROM:<a@partner.test>\r\n") == [anonymous]
    assert session(tmp_path, level, peer="10.0.0.2").codes(b"MAIL FROM:<a@partner.test>\r\n") == [secured]


def test_refused_then_accepted_once_the_level_drops(tmp_path):
    s = session(tmp_path, MEDIUM)
    reply = s.send(b"MAIL FROM:<a@partner.test>\r\n")
    assert reply == b"452 4.3.1 Insufficient system resources\r\n"
    s.context.back_pressure.level = NORMAL
    assert s.codes(b"MAIL FROM:<a@partner.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
                   b"Subject: x\r\n\r\nbody\r\n.\r\n") == ["250 2.1.0", "250 2.1.5", "354", "250 2.6.0"]


def test_a_transaction_under_way_finishes(tmp_path):
    """Back pressure refuses new mail: a MAIL already accepted goes on to its DATA."""
    s = session(tmp_path, NORMAL)
    assert s.codes(b"MAIL FROM:<a@partner.test>\r\n") == ["250 2.1.0"]
    s.context.back_pressure.level = HIGH
    assert s.codes(b"RCPT TO:<bob@example.com>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n") == \
        ["250 2.1.5", "354", "250 2.6.0"]
    assert s.codes(b"MAIL FROM:<a@partner.test>\r\n") == ["452 4.3.1"]


# -- against a real server --------------------------------------------------------------------

def test_real_server_medium_refuses_anonymous_mail_while_secured_and_authenticated_sessions_submit(
        start_server, tmp_path):
    from test_tls_auth import PASSWORD, add_user
    credentials = tmp_path / "users.txt"
    add_user(credentials, "smtpgateway@fabrikam.com")
    # "100%": less free space than the whole file system, so Medium from the first sample
    server = start_server(internet='auth_mechanisms = ["Tls", "BasicAuth"]\n'
                                   'permission_groups = ["AnonymousUsers", "ExchangeUsers"]\n',
                          extra=f'\n[directory]\ncredentials_file = "{credentials}"\n'
                                '\n[back_pressure]\nmin_free_space_medium = "100%"\n')
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.ehlo("client.test")
        assert c.mail("a@partner.test") == (452, b"4.3.1 Insufficient system resources")
        c.login("smtpgateway@fabrikam.com", PASSWORD)
        c.sendmail("a@partner.test", ["bob@example.com"], b"Subject: authenticated\r\n\r\nx\r\n")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10, source_address=("127.0.0.2", 0)) as c:
        c.sendmail("a@partner.test", ["bob@example.com"], b"Subject: externally secured\r\n\r\nx\r\n")
    server.wait_for(lambda: len(server.drop_files()) == 2, what="two deliveries")
    assert "back pressure: free_space Normal -> Medium" in server.log
    assert "Traceback" not in server.log


def test_real_server_high_refuses_every_mail_from_and_status_and_metrics_say_why(start_server):
    from manage_scenario import client_of
    server = start_server(extra='\n[back_pressure]\nmax_memory_medium = "1MB"\nmax_memory_high = "1MB"\n')
    for source in ("127.0.0.1", "127.0.0.2"):
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10, source_address=(source, 0)) as c:
            c.ehlo("client.test")
            assert c.mail("a@partner.test") == (452, b"4.3.1 Insufficient system resources"), source
    with client_of(server) as client:
        status = client.request("GET", "/api/status")
        metrics = client.request("GET", "/metrics", raw=True).decode()
    assert status["back_pressure"]["level"] == "High"
    assert status["back_pressure"]["resources"]["memory"]["level"] == "High"
    assert status["back_pressure"]["resources"]["memory"]["high"] == 1024**2
    assert 'exedge_back_pressure_level{resource="memory"} 2.0' in metrics
    assert 'exedge_back_pressure_refused_total{connector="From Internet"} 1.0' in metrics
    assert 'exedge_back_pressure_refused_total{connector="From Internal Org"} 1.0' in metrics
    assert server.log.count("back pressure: memory Normal -> High") == 1

"""
MAIL FROM's SIZE= against the spool's free space (RFC 1870 §6.1): more than
the file system holds above back pressure's High threshold is 452 4.3.1
"Insufficient system storage" now (552 stays for the fixed maximum). The
free-space probe is the monitor's, injected; the session a StringSession.
"""

from __future__ import annotations

from twisted.internet import task

from exedge.config import loads
from exedge.config.models import BackPressureConfig, free_space
from exedge.metrics import Metrics
from exedge.pressure import ResourceMonitor
from exedge.testing import StringSession
from harness import config_text

MB = 1024**2


class Disk:
    def __init__(self, free: int, total: int = 1000 * MB):
        self.free, self.total = free, total
        self.failing = False

    def probe(self, path):
        if self.failing:
            raise OSError(5, "Input/output error")
        return self.free, self.total, 1000, 1000


def session(tmp_path, disk: Disk, enabled: bool = True):
    """A session after EHLO whose server's spool has C{disk}'s free space; High below 100 MB."""
    config = BackPressureConfig(enabled=enabled, min_free_space_medium=free_space("200MB"),
                                min_free_space_high=free_space("100MB"))
    clock = task.Clock()
    monitor = ResourceMonitor(config, clock, spool_directory=str(tmp_path), queue_length=lambda: 0,
                              free_space=disk.probe, rss=lambda: 0)
    s = StringSession(loads(config_text(2525, internet="tarpit_interval = 0")), str(tmp_path / "spool"), clock=clock)
    s.context.back_pressure = monitor
    s.context.metrics = Metrics()
    s.send(b"EHLO client.test\r\n")
    return s


def mail(s, size: int) -> list[str]:
    return s.codes(b"MAIL FROM:<a@sender.test> SIZE=%d\r\n" % size)


def test_a_size_the_spool_cannot_take_now_is_452(tmp_path):
    disk = Disk(free=130 * MB)        # 30 MB above High
    s = session(tmp_path, disk)
    reply = s.send(b"MAIL FROM:<a@sender.test> SIZE=%d\r\n" % (31 * MB))
    assert reply == b"452 4.3.1 Insufficient system storage\r\n"
    assert s.proto.txn is None
    assert b'exedge_back_pressure_refused_total{connector="From Internet"} 1.0' in s.context.metrics.render()
    # what fits is taken (the level is Normal here: the monitor has not sampled; only the probe is read)
    assert mail(s, 29 * MB) == ["250 2.1.0"]
    assert s.codes(b"RSET\r\n") == ["250 2.0.0"]
    # the probe is read at each MAIL: space freed is seen at once, not at the next sample
    disk.free = 500 * MB
    assert mail(s, 31 * MB) == ["250 2.1.0"]


def test_above_the_fixed_maximum_stays_552_and_no_size_is_not_refused(tmp_path):
    s = session(tmp_path, Disk(free=101 * MB))
    assert mail(s, 37 * MB) == ["552 5.3.4"]          # max_message_size is 36 MB: permanent
    assert s.codes(b"MAIL FROM:<a@sender.test>\r\n") == ["250 2.1.0"]   # nothing declared: nothing to check here


def test_nothing_refused_on_a_guess_or_when_back_pressure_is_off(tmp_path):
    disk = Disk(free=100 * MB)
    disk.failing = True
    assert mail(session(tmp_path, disk), 10 * MB) == ["250 2.1.0"]       # the file system cannot be read
    assert mail(session(tmp_path, Disk(free=100 * MB), enabled=False), 10 * MB) == ["250 2.1.0"]

"""
Back pressure: the server watches what it runs on and says no early.

Exchange's transport service samples its resources every couple of
seconds and gives each a level, Normal, Medium or High; Medium stops mail
from the Internet (anonymous sessions) and keeps internal, authenticated
flow going; High stops all new mail while delivery goes on, so the queue
drains. Postfix's smtpd answers "452 4.3.1 Insufficient system storage"
at MAIL FROM when the queue file system is short of C{queue_minfree}.
L{ResourceMonitor} is that sampler; the receive side asks it for its
L{ResourceMonitor.level} at MAIL FROM (L{exedge.receive.checks}), and
for L{ResourceMonitor.room} when the client declares a SIZE.

Resources, as C{[back_pressure]} sets their thresholds:
  - C{free_space}: free bytes on the spool's file system (statvfs);
  - C{inodes}: free inodes there, against the free-space keys' percentage;
  - C{memory}: the resident memory of this process (/proc/self/statm);
  - C{queue_length}: the messages waiting in the queues (the queue
    manager's C{summary()}).

Hysteresis: a level is entered as soon as its threshold is passed, but
left only when the value is clearly back, L{HYSTERESIS} (10 %) of the
threshold beyond it: a queue High above 15,000 messages goes back to
Medium below 13,500; free space High below 500 MB goes back above 550 MB.
A value wavering round a threshold then changes the level once, not at
every sample, and the log says so once.

The probes run on the reactor: statvfs and a read of /proc/self/statm are
one system call each, answered from memory by the kernel, a few
microseconds every L{SAMPLE_INTERVAL} seconds; a thread hop would cost
more than the call. They are injectable (tests, other platforms).
"""

from __future__ import annotations

import os
import resource as _resource
from typing import Callable

import attrs
from twisted.application.service import Service
from twisted.internet import task
from twisted.logger import Logger

log = Logger()

NORMAL, MEDIUM, HIGH = 0, 1, 2
LEVELS = ("Normal", "Medium", "High")
SAMPLE_INTERVAL = 2.0      # seconds, as Exchange's ResourceMonitoringInterval
HYSTERESIS = 0.10          # a level is left when the value is this share of its threshold beyond it
# free inodes, in percent, when a free-space key is a size alone (inodes have no size)
INODES_MEDIUM_PERCENT, INODES_HIGH_PERCENT = 10.0, 5.0


def statvfs_probe(path: str) -> tuple[int, int, int, int]:
    """(free bytes, total bytes, free inodes, total inodes) of the file system holding C{path}."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, st.f_favail, st.f_files


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_of(pid: int) -> int:
    """Another process's resident memory in bytes (a receive worker's); OSError when it is gone."""
    with open(f"/proc/{int(pid)}/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def rss_probe() -> int:
    """This process's resident memory in bytes: /proc where there is one, else the peak from getrusage."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss * 1024


def next_level(current: int, value: float, medium: float, high: float, worse: Callable) -> int:
    """
    The level after a sample: entered as soon as C{value} is past its
    threshold, left only once it is clearly back (L{HYSTERESIS}).
    C{worse(value, threshold, margin)}: the value is on the bad side of the
    threshold moved by C{margin} of itself towards the good side.
    """
    entered = HIGH if worse(value, high, 0.0) else MEDIUM if worse(value, medium, 0.0) else NORMAL
    level = max(current, entered)
    thresholds = (None, medium, high)
    while level > entered and not worse(value, thresholds[level], HYSTERESIS):
        level -= 1
    return level


def above(value: float, threshold: float, margin: float) -> bool:
    """For what must stay below a maximum (memory, queue length)."""
    return value > threshold * (1.0 - margin)


def below(value: float, threshold: float, margin: float) -> bool:
    """For what must stay above a minimum (free space, free inodes)."""
    return value < threshold * (1.0 + margin)


@attrs.define
class Watch:
    """One resource: its last value, its thresholds as last resolved, its level."""

    name: str
    unit: str                   # "bytes", "inodes", "messages": for the log and the status
    worse: Callable             # above or below
    level: int = NORMAL
    value: float | None = None
    medium: float | None = None
    high: float | None = None

    def update(self, value: float, medium: float, high: float) -> int:
        """Take a sample; the level before it."""
        before = self.level
        self.value, self.medium, self.high = value, medium, high
        self.level = next_level(self.level, value, medium, high, self.worse)
        return before

    def describe(self) -> str:
        side = "below" if self.worse is below else "above"
        return (f"{self.name} {_amount(self.value, self.unit)}; Medium {side} {_amount(self.medium, self.unit)}, "
                f"High {side} {_amount(self.high, self.unit)}")

    def status(self) -> dict:
        return {"level": LEVELS[self.level], "value": _number(self.value), "medium": _number(self.medium),
                "high": _number(self.high), "unit": self.unit}


def _number(value):
    return None if value is None else int(value) if float(value).is_integer() else round(value, 1)


def _amount(value, unit: str) -> str:
    if value is None:
        return "unknown"
    if unit == "bytes":
        for name, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
            if abs(value) >= size:
                return f"{value / size:.1f} {name}"
        return f"{int(value)} bytes"
    return f"{_number(value)} {unit}"


class ResourceMonitor(Service):
    """
    Samples the resources every L{SAMPLE_INTERVAL} seconds on C{clock};
    L{level} is the worst resource's level (Normal when C{enabled} is
    false). One log line per change of a resource's level, never one per
    sample; C{metrics} (an L{exedge.metrics.Metrics}) gets the levels,
    the values and a count of the changes.

    C{free_space(path)} -> (free bytes, total bytes, free inodes, total
    inodes), C{rss()} -> bytes and C{queue_length()} -> messages are the
    probes; C{spool_directory} is where free space is measured.
    """

    def __init__(self, config, clock, *, spool_directory: str, queue_length: Callable[[], int],
                 free_space: Callable = statvfs_probe, rss: Callable[[], int] = rss_probe, metrics=None,
                 interval: float = SAMPLE_INTERVAL):
        self.config = config
        self.clock = clock
        self.spool_directory = spool_directory
        self.probes = {"free_space": free_space, "rss": rss, "queue_length": queue_length}
        self.metrics = metrics
        self.interval = interval
        self.watches = {
            "free_space": Watch("free_space", "bytes", below),
            "inodes": Watch("inodes", "inodes", below),
            "memory": Watch("memory", "bytes", above),
            "queue_length": Watch("queue_length", "messages", above),
        }
        self._loop: task.LoopingCall | None = None
        self._probe_errors: dict[str, str] = {}
        self._subscribers: list[Callable[[int], None]] = []

    def subscribe(self, callback: Callable[[int], None]) -> None:
        """
        C{callback(level)} whenever the server level changes: what sessions
        in other processes (receive workers) must be told, since they
        cannot read L{level} here.
        """
        self._subscribers.append(callback)

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def level(self) -> int:
        """The worst level of any resource: what MAIL FROM is answered by."""
        if not self.config.enabled:
            return NORMAL
        return max(w.level for w in self.watches.values())

    def startService(self) -> None:
        super().startService()
        if not self.config.enabled:
            log.info("back pressure: disabled ([back_pressure] enabled = false)")
            return
        self._loop = task.LoopingCall(self.sample)
        self._loop.clock = self.clock
        # now: the first sample is in place before any listener opens
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("back pressure: sampling stopped", f))

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    # -- sampling ----------------------------------------------------------------

    def sample(self) -> None:
        """Read every probe once and update the levels."""
        c = self.config
        disk = self._probe("free_space", self.spool_directory)
        if disk is not None:
            free, total, free_inodes, total_inodes = disk
            self._update("free_space", free, c.min_free_space_medium.of(total), c.min_free_space_high.of(total))
            if total_inodes > 0:       # some file systems (btrfs) have no inode count: nothing to watch
                self._update("inodes", free_inodes,
                             total_inodes * _inode_percent(c.min_free_space_medium, INODES_MEDIUM_PERCENT) / 100,
                             total_inodes * _inode_percent(c.min_free_space_high, INODES_HIGH_PERCENT) / 100)
        rss = self._probe("rss")
        if rss is not None:
            self._update("memory", rss, c.max_memory_medium, c.max_memory_high)
        waiting = self._probe("queue_length")
        if waiting is not None:
            self._update("queue_length", waiting, c.max_queue_length_medium, c.max_queue_length_high)

    def _probe(self, name: str, *args):
        """A probe's reading, or None when it fails (the level stays as it was; logged when it starts and ends)."""
        try:
            value = self.probes[name](*args)
        except Exception as e:
            text = f"{e.__class__.__name__}: {e}"
            if self._probe_errors.get(name) != text:
                self._probe_errors[name] = text
                log.error("back pressure: cannot read {probe}: {error}; its level stays as it was",
                          probe=name, error=text)
            return None
        if self._probe_errors.pop(name, None) is not None:
            log.info("back pressure: {probe} can be read again", probe=name)
        return value

    def _update(self, name: str, value: float, medium: float, high: float) -> None:
        watch = self.watches[name]
        server_before = self.level
        before = watch.update(value, medium, high)
        if self.metrics is not None:
            self.metrics.back_pressure_sampled(name, watch.level, value)
        if watch.level == before:
            return
        if self.metrics is not None:
            self.metrics.back_pressure_changed(name, LEVELS[watch.level])
        emit = log.warn if watch.level > before else log.info
        emit("{line}", line=f"back pressure: {name} {LEVELS[before]} -> {LEVELS[watch.level]} "
             f"({watch.describe()}); server level {LEVELS[self.level]}",
             resource=name, pressure_level=LEVELS[watch.level], previous=LEVELS[before], value=watch.value)
        if self.level != server_before:
            for callback in self._subscribers:
                callback(self.level)

    # -- one message's room ----------------------------------------------------------

    def room(self) -> int | None:
        """
        The octets one more message may take on the spool's file system
        before free space reaches its High threshold; None when back
        pressure is disabled or the file system cannot be read (nothing is
        refused on a guess). Read from the probe at each call, not from
        the last sample: MAIL FROM with SIZE= asks (L{exedge.receive.checks}),
        and a statvfs is cheaper than refusing a message that would fit,
        or taking one that would not, on two-second-old numbers. Postfix's
        smtpd does the same (fsspace() against queue_minfree).
        """
        if not self.config.enabled:
            return None
        disk = self._probe("free_space", self.spool_directory)
        if disk is None:
            return None
        free, total = disk[0], disk[1]
        return max(0, int(free - self.config.min_free_space_high.of(total)))

    # -- the management endpoint's view ---------------------------------------------

    def status(self) -> dict:
        return {"enabled": self.config.enabled, "level": LEVELS[self.level],
                "resources": {name: w.status() for name, w in self.watches.items()}}


def _inode_percent(threshold, default: float) -> float:
    """Inodes have no size: a free-space key's percentage applies to them, or the default's when it has none."""
    return threshold.percent if threshold.percent is not None else default

"""
Connection schedules: the weekly windows in which a send connector may
open connections (Exchange 2000's "Connection time" grid, in 15-minute
steps), and the time zone they are read in.

Written here because neither Twisted nor the standard library has weekly
windows; the arithmetic is small. A schedule is "Always", "Never", or a
list of windows such as ``"Mon-Fri 08:00-18:00"`` or ``"Sat 09:00-09:15"``.
Windows are wall-clock times in the schedule's zone, so "08:00" stays
08:00 across a change of daylight saving time. A time in the hour that a
spring change skips is read with the offset from before the change
(02:30 is 03:30 that day), and a time in the hour an autumn change
repeats is its first occurrence (PEP 495's fold 0).
A window may end at 24:00, or cross midnight ("Fri 22:00-02:00" ends on
Saturday); "Sun-Mon" wraps round the week's end.
"""

from __future__ import annotations

import datetime
import re
import zoneinfo
from typing import Any

import attrs

WEEK = 7 * 24 * 60      # minutes
STEP = 15
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^\s*([A-Za-z]{3})(?:\s*-\s*([A-Za-z]{3}))?\s+(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@attrs.frozen
class Schedule:
    """
    The minutes of the week (0 = Monday 00:00, local wall time) in which
    connections may be opened: sorted, disjoint [start, end) pairs that
    may run past the week's end (end > WEEK wraps to its start).
    """

    windows: tuple = ()
    text: str = attrs.field(default="Always", eq=False)

    @property
    def always(self) -> bool:
        return self.windows == ((0, WEEK),)

    @property
    def never(self) -> bool:
        return not self.windows

    def __str__(self) -> str:
        return self.text

    def _boundaries(self, when: float, zone):
        """(POSIX time, is a start) of every window edge of the weeks around C{when}."""
        local = _local(when, zone)
        monday = datetime.datetime.combine(local.date() - datetime.timedelta(days=local.weekday()),
                                           datetime.time())
        for week in (-1, 0, 1):
            for start, end in self.windows:
                yield _instant(monday + datetime.timedelta(minutes=week * WEEK + start), zone), True
                yield _instant(monday + datetime.timedelta(minutes=week * WEEK + end), zone), False

    def is_open(self, when: float, zone: datetime.tzinfo | None) -> bool:
        """
        Is C{when} (a POSIX time) inside a window? Read from the same
        instants as L{next_change}, so that what is open and when it next
        changes agree, in the hours a clock change skips or repeats too.
        """
        if self.always or self.never:
            return self.always
        last = max(((at, is_start) for at, is_start in self._boundaries(when, zone) if at <= when), default=None)
        return last is not None and last[1]

    def next_change(self, when: float, zone: datetime.tzinfo | None) -> float | None:
        """
        The first POSIX time after C{when} at which the schedule opens or
        closes (None for Always and Never, which never change).
        """
        if self.always or self.never:
            return None
        return min(at for at, _ in self._boundaries(when, zone) if at > when)

    def next_opening(self, when: float, zone: datetime.tzinfo | None) -> float | None:
        """When the schedule next opens after C{when} (None: never, or it is Always)."""
        at = when
        for _ in range(2 * len(self.windows) + 2):
            at = self.next_change(at, zone)
            if at is None:
                return None
            if self.is_open(at, zone):
                return at
        return None


ALWAYS = Schedule(((0, WEEK),), "Always")
NEVER = Schedule((), "Never")


def _local(when: float, zone) -> datetime.datetime:
    """C{when} as a naive wall-clock datetime in C{zone} (None: this machine's zone)."""
    if zone is None:
        return datetime.datetime.fromtimestamp(when)
    return datetime.datetime.fromtimestamp(when, zone).replace(tzinfo=None)


def _instant(wall: datetime.datetime, zone) -> float:
    """The POSIX time of a naive wall-clock time in C{zone} (PEP 495, fold 0)."""
    if zone is None:
        return wall.timestamp()
    return wall.replace(tzinfo=zone).timestamp()


def _minute(hours: str, minutes: str, window: str) -> int:
    h, m = int(hours), int(minutes)
    if h > 24 or m > 59 or (h == 24 and m):
        raise ValueError(f"{window!r}: {hours}:{minutes} is not a time of day")
    if m % STEP:
        raise ValueError(f"{window!r}: times are in 15-minute steps (:00, :15, :30, :45), not {hours}:{minutes}")
    return h * 60 + m


def _day(name: str, window: str) -> int:
    try:
        return DAYS.index(name.lower())
    except ValueError:
        raise ValueError(f"{window!r}: unknown day {name!r} (Mon, Tue, Wed, Thu, Fri, Sat, Sun)") from None


def parse_schedule(value: Any) -> Schedule:
    """"Always", "Never", or a list of windows "Mon-Fri 08:00-18:00" (15-minute steps)."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word == "always":
            return ALWAYS
        if word == "never":
            return NEVER
        raise ValueError(f'expected "Always", "Never" or a list of windows such as ["Mon-Fri 08:00-18:00"], '
                         f"got {value!r}")
    if not isinstance(value, list) or not value:
        raise ValueError('expected "Always", "Never" or a non-empty list of windows such as ["Mon-Fri 08:00-18:00"]')
    windows = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"expected a window such as \"Mon-Fri 08:00-18:00\", got {item!r}")
        m = _WINDOW.match(item)
        if not m:
            raise ValueError(f"{item!r} is not a window such as \"Mon-Fri 08:00-18:00\" or \"Sat 09:00-09:15\"")
        first = _day(m.group(1), item)
        last = _day(m.group(2), item) if m.group(2) else first
        start, end = _minute(m.group(3), m.group(4), item), _minute(m.group(5), m.group(6), item)
        if start == end:
            raise ValueError(f"{item!r} is empty (it starts when it ends)")
        if end < start:
            end += 24 * 60          # past midnight, into the next day
        days = (last - first) % 7 + 1
        for d in range(first, first + days):
            day = d % 7
            windows.append((day * 1440 + start, day * 1440 + end, item))
    windows.sort()
    # sorted by start, two windows overlap only if neighbours do (the last
    # one's neighbour being the first, a week later)
    for (start, end, item), (next_start, _, other) in zip(windows, windows[1:] + [
            (windows[0][0] + WEEK,) + windows[0][1:]]):
        if next_start < end and (len(windows) > 1 or end - start > WEEK):
            raise ValueError(f"windows overlap: {item!r} and {other!r}")
    return Schedule(tuple((start, end) for start, end, _ in windows), ", ".join(str(v) for v in value))


def parse_time_zone(value: Any) -> datetime.tzinfo:
    """An IANA time zone name ("Europe/Berlin", "UTC")."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'expected an IANA time zone name such as "Europe/Berlin", got {value!r}')
    try:
        return zoneinfo.ZoneInfo(value.strip())
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (an IANA name such as \"Europe/Berlin\" or \"UTC\")") \
            from None

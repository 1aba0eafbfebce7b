"""
twistd's text log, written by a cheaper formatter with the same output.

Every message puts several lines into twistd's log (a session's start and
end, the message received, a recipient delivered or held). Measured in the
running server (bench/relay_rate.py, accept, one connection), removing four
such lines per message saved 240 microseconds of CPU per message, about a
tenth of the server's work; in a tight loop the same lines cost a quarter
of that, so most of it is the formatter's own code paths. Twisted's
classic formatter, for every line, works out the local time zone and
formats the time with strftime, and runs the format through
C{string.Formatter} even when exedge has already formatted the line
(L{exedge.logs.literal}).

L{classic_line} writes what L{formatEventAsClassicLogText} writes,
character for character (a property test compares them), but:
  - it formats the time once per second: the stamp
    (C{2026-12-07T16:44:23+0000}) names no fraction of a second, and a
    zone's offset changes only on a whole second;
  - a format that L{exedge.logs.literal.literal} made is copied, not parsed;
  - anything else (fields, a failure's traceback, a flattened event) goes
    to Twisted's own formatter.

L{twistd_observer} gives this observer to twistd where twistd would have
written its text log to standard output (C{twistd -n}, as README and
C{etc/exedge.service} run it). twistd takes the observer from the
Application's L{ILogObserver} component (the way a C{.tac} file sets one);
with C{--logfile}, C{--syslog} or C{--logger}, twistd's own observer stays,
with its rotation and its C{SIGUSR1} handling.
"""

from __future__ import annotations

import math
import sys
from typing import IO, Any, Callable, Mapping

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)

from exedge.logs.literal import literal_text

__all__ = ["StampCache", "classic_line", "text_observer", "twistd_observer"]


class StampCache:
    """
    C{format_time} (by default Twisted's L{formatTime}) remembered for the
    second it was asked for: for texts that name no fraction of a second.

    Kept as one tuple so that a line logged from another thread sees a
    second and its stamp that belong together.
    """

    def __init__(self, format_time: Callable[[float], str] = formatTime):
        self._format_time = format_time
        self._last: tuple[int, str] | None = None

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = math.floor(when)
        last = self._last
        if last is not None and last[0] == second:
            return last[1]
        stamp = self._format_time(when)
        self._last = (second, stamp)
        return stamp


def _system(event: Mapping[str, Any]) -> str:
    """The bracketed part of a classic line, as Twisted's formatter writes it."""
    system = event.get("log_system", None)
    if system is None:
        level = event.get("log_level", None)
        return f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    try:
        return str(system)
    except Exception:
        return "UNFORMATTABLE"


def classic_line(event: Mapping[str, Any], stamp: Callable[[float | None], str]) -> str | None:
    """
    C{formatEventAsClassicLogText(event, formatTime=stamp)}, computed more
    cheaply for the events exedge logs most.
    """
    fmt = event.get("log_format", None)
    if type(fmt) is not str or "log_failure" in event or "log_flattened" in event:
        return formatEventAsClassicLogText(event, formatTime=stamp)
    text = literal_text(fmt)
    if text is None:
        text = formatEvent(event)
    if not text:
        return None
    line = f"{stamp(event.get('log_time', None))} [{_system(event)}] {text}"
    return line.replace("\n", "\n\t") + "\n"


def text_observer(out: IO[str]) -> ILogObserver:
    """A file observer writing L{classic_line}s to C{out}, flushed at each line as Twisted's is."""
    stamp = StampCache()
    return FileLogObserver(out, lambda event: classic_line(event, stamp))


def twistd_observer(twistd_options: Mapping[str, Any] | None, stdout: IO[str] | None = None) -> ILogObserver | None:
    """
    The observer for twistd's log given twistd's own options, or None where
    twistd's own observer should stay (a log file, syslog, a C{--logger}, or
    no twistd at all).
    """
    if not twistd_options:
        return None
    if twistd_options.get("syslog") or twistd_options.get("logger"):
        return None
    logfile = twistd_options.get("logfile") or ""
    if not twistd_options.get("nodaemon") or logfile not in ("", "-"):
        return None
    return text_observer(stdout if stdout is not None else sys.stdout)

"""
What a server costs, read from /proc: CPU time and resident memory of a
process and all its descendants, and the bookkeeping every benchmark needs
around the processes it starts (a time cap, stopping by PID on Ctrl-C and
SIGTERM).

Server CPU is counted for the whole process tree because neither server is
one process: exedge has its commit worker, Postfix's master has smtpd,
cleanup, qmgr, trivial-rewrite, smtp... Each live process contributes its
own user+system time plus that of its children it has already reaped
(cutime, cstime in /proc/PID/stat): a Postfix smtpd that served its 100
sessions and exited is then counted in its master's figures, so the sum
over the live tree never loses the time of a process that came and went
between two readings (as long as its parent reaps it, which both servers
do). Hand-written because psutil is not a dependency of the project and
four fields of one file are all it takes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def children_map() -> dict[int, list[int]]:
    """Parent PID -> child PIDs of every process now."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat(int(name))
        if fields is None or len(fields) < 2:
            continue
        kids.setdefault(int(fields[1]), []).append(int(name))
    return kids


def tree(root: int) -> list[int]:
    """C{root} and all its descendants alive now (root first); [] if C{root} is gone."""
    if _stat(root) is None:
        return []
    kids = children_map()
    found, todo = [], [root]
    while todo and len(found) < 100_000:      # bounded, whatever /proc says
        pid = todo.pop()
        found.append(pid)
        todo.extend(kids.get(pid, ()))
    return found


def cpu_seconds(root: int) -> float:
    """User + system CPU of C{root}'s tree so far, including reaped children (see the module's doc)."""
    total = 0
    for pid in tree(root):
        fields = _stat(pid)
        if fields is not None and len(fields) > 14:
            total += sum(int(v) for v in fields[11:15])   # utime stime cutime cstime
    return total / _TICK


def rss_bytes(root: int) -> int:
    """Resident memory of C{root}'s tree now (pages shared between processes count once per process)."""
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


class Meter:
    """CPU of a process tree between C{start()} and C{stop()}, and the wall time between them."""

    def __init__(self, root: int):
        self.root = root
        self.cpu = self.wall = 0.0

    def start(self) -> "Meter":
        self._cpu0, self._t0 = cpu_seconds(self.root), time.monotonic()
        return self

    def stop(self) -> "Meter":
        self.cpu = cpu_seconds(self.root) - self._cpu0
        self.wall = time.monotonic() - self._t0
        return self

    @property
    def cores(self) -> float:
        return self.cpu / self.wall if self.wall else 0.0


class TimeCap:
    """C{--max-seconds}: the whole run's budget; a benchmark asks before each step and reports a cut."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.cut = False

    def left(self) -> float:
        return self.end - time.monotonic()

    def over(self) -> bool:
        if self.left() <= 0:
            self.cut = True
        return self.cut


@contextlib.contextmanager
def interruptible():
    """
    SIGTERM (and SIGHUP) raise KeyboardInterrupt inside the block, as Ctrl-C
    does, so the benchmark's finally clauses stop every process it started
    by its PID instead of leaving servers behind.
    """
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def stop_pid(proc, timeout: float = 15.0) -> None:
    """Stop a subprocess.Popen we started: SIGTERM, then SIGKILL after C{timeout}; reaped either way."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except Exception:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return 0.0
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def write_json(path: str, data) -> None:
    """A benchmark's results to C{path} (its directory made if need be), for later reading."""
    import json
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)

"""
The long fuzzing campaign (`make fuzz`): as many random sessions as this
machine can run, each from a seeded random grammar (tests/fuzz_model.py,
the same grammar, oracle and end-of-session checks as the Hypothesis state
machine of tests/test_fuzz_session.py, without Hypothesis's bookkeeping,
which is too slow for a million sessions in an hour).

One worker process per CPU; each runs one server per variant (a
StringSession's context: one clock, one spool, one connection table) and
session after session on it, as a real server would. A failing session is
reported with its seed; `--replay SEED` runs it again and shows the
violation in full.

    python tests/fuzz_campaign.py --seconds 600
    python tests/fuzz_campaign.py --replay 123456
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import fuzz_model as fm  # noqa: E402

VARIANTS = fm.ALL_VARIANTS
GC_EVERY = 1000              # sessions between collections (an unhandled error in a Deferred is logged then)


def variant_of(seed: int) -> str:
    return VARIANTS[seed % len(VARIANTS)]


def _scratch() -> str:
    # tmpfs when there is one: the spool's fsyncs cost nothing there, and the campaign tests the session, not the disk
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="exedge-fuzz-", dir=base)


def _server(directory: str, variant: str):
    path = tempfile.mkdtemp(prefix=variant + "-", dir=directory)
    return fm.build_server(path, variant)


def _forget_queued(server) -> None:
    """The messages queued so far are checked already: remove them, so a long campaign's spool stays small."""
    for message in server.sink.messages:
        try:
            os.unlink(message.path)
        except OSError:
            pass
    server.sink.messages.clear()


def worker(index: int, workers: int, first_seed: int, deadline: float, limit: int | None, results) -> None:
    # the server's log goes nowhere (FailureLog still sees every event): a
    # stage's whims are logged as they should be, millions of times
    from twisted.logger import globalLogBeginner
    globalLogBeginner.beginLoggingTo([], redirectStandardIO=False)
    directory = _scratch()
    sessions = failures_found = 0
    failed: list = []
    try:
        with fm.FailureLog() as failures:
            servers = {v: _server(directory, v) for v in VARIANTS}
            seed = first_seed + index
            while time.monotonic() < deadline and (limit is None or sessions < limit):
                variant = variant_of(seed)
                try:
                    fm.random_session(random.Random(seed), servers[variant], failures)
                except Exception as e:          # a finding: keep its seed, start that server afresh
                    failures_found += 1
                    if len(failed) < 50:
                        failed.append((seed, variant, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
                    servers[variant] = _server(directory, variant)
                _forget_queued(servers[variant])
                sessions += 1
                seed += workers
                if sessions % GC_EVERY == 0:
                    gc.collect()
                    try:
                        failures.check()
                    except fm.Violation as e:
                        failures_found += 1
                        failed.append((f"{seed - GC_EVERY * workers}..{seed}", "-", str(e).splitlines()[0][:300]))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        results.put((sessions, failures_found, failed))


def campaign(seconds: float, workers: int, first_seed: int, sessions: int | None) -> int:
    start = time.monotonic()
    deadline = start + seconds
    per_worker = -(-sessions // workers) if sessions else None
    results = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=worker, args=(i, workers, first_seed, deadline, per_worker, results))
             for i in range(workers)]
    for p in procs:
        p.start()
    total = found = 0
    failed: list = []
    for _ in procs:
        n, f, fl = results.get()
        total, found = total + n, found + f
        failed.extend(fl)
    for p in procs:
        p.join()
    elapsed = time.monotonic() - start
    rate = total / elapsed if elapsed else 0.0
    print(f"fuzz campaign: {total} sessions in {elapsed:.0f} s with {workers} worker(s): {rate:.0f} sessions/s; "
          f"1,000,000 sessions would take {1_000_000 / rate / 60:.0f} min" if rate else "no sessions run")
    print(f"first seed {first_seed}; failing sessions: {found}")
    for seed, variant, text in failed:
        print(f"  seed {seed} ({variant}): {text}")
    return 1 if found else 0


def replay(seed: int) -> int:
    directory = _scratch()
    try:
        with fm.FailureLog() as failures:
            server = _server(directory, variant_of(seed))
            steps = fm.random_session(random.Random(seed), server, failures)
            gc.collect()
            failures.check()
        print(f"seed {seed} ({variant_of(seed)}): {steps} steps, no violation")
        return 0
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3600.0, help="how long to run (default: an hour)")
    parser.add_argument("--sessions", type=int, default=None, help="stop after this many sessions")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=None, help="first seed (default: from the clock)")
    parser.add_argument("--replay", type=int, default=None, metavar="SEED", help="run one session again")
    args = parser.parse_args(argv)
    if args.replay is not None:
        return replay(args.replay)
    first = args.seed if args.seed is not None else int(time.time()) * 1000
    return campaign(args.seconds, max(1, args.workers), first, args.sessions)


if __name__ == "__main__":
    sys.exit(main())

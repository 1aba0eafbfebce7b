"""bench/proc.py: the process-tree CPU and memory the benchmarks report must count children, reaped or not."""

import os
import signal
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import proc  # noqa: E402

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"


def test_cpu_of_a_reaped_child_stays_in_the_tree():
    # the shell runs a child that burns 0.3 s of CPU, reaps it, then waits to be stopped
    shell = subprocess.Popen(["sh", "-c", f'"{sys.executable}" -c "$BURN"; echo done; exec sleep 60'],
                             env=dict(os.environ, BURN=BURN), stdout=subprocess.PIPE)
    try:
        assert shell.stdout.readline() == b"done\n"      # the child has exited and been reaped
        assert proc.tree(shell.pid) == [shell.pid]
        assert proc.cpu_seconds(shell.pid) >= 0.25
        assert proc.rss_bytes(shell.pid) > 0
    finally:
        os.kill(shell.pid, signal.SIGKILL)
        shell.wait(timeout=15)


def test_tree_finds_running_descendants():
    shell = subprocess.Popen(["sh", "-c", "sleep 60 & echo started; wait"], stdout=subprocess.PIPE)
    try:
        assert shell.stdout.readline() == b"started\n"
        pids = proc.tree(shell.pid)
        assert len(pids) == 2 and pids[0] == shell.pid
    finally:
        for pid in reversed(proc.tree(shell.pid)):
            os.kill(pid, signal.SIGKILL)
        shell.wait(timeout=15)


def test_a_gone_process_has_an_empty_tree():
    p = subprocess.Popen(["true"])
    p.wait(timeout=15)
    assert proc.tree(p.pid) == [] and proc.cpu_seconds(p.pid) == 0.0

"""
Another commit of exedge beside this one, for benchmarks that compare the
two in one run (alternating, on the same machine at the same time: the
only comparison a shared, noisy machine allows).

C{checkout(rev)} makes a detached git worktree of C{rev} in a temporary
directory and removes it afterwards. The servers run with the same
virtualenv and C{PYTHONPATH} set to that worktree, so its C{exedge}
package (and its commit worker, which inherits the path) is the one
imported; both trees read the configuration the benchmark writes, so it
must be valid for both.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def checkout(rev: str):
    """The path of a worktree of C{rev}, for the duration of the block."""
    commit = subprocess.run(["git", "-C", TOP, "rev-parse", "--verify", f"{rev}^{{commit}}"],
                            capture_output=True, text=True, check=True).stdout.strip()
    path = tempfile.mkdtemp(prefix=f"exedge-{commit[:10]}-")
    os.rmdir(path)
    subprocess.run(["git", "-C", TOP, "worktree", "add", "--detach", "-q", path, commit], check=True)
    try:
        yield path, commit[:10]
    finally:
        subprocess.run(["git", "-C", TOP, "worktree", "remove", "--force", path], check=False)


class Runner:
    """
    What every benchmark's exedge runner class shares: C{self.server} (a
    tests/harness.py C{Server} its constructor makes, with C{code=self.code}),
    started, its PID, stopped; C{name} and C{code} are what L{variant} sets.
    """

    name = "exedge"
    code: str | None = None       # another checkout of exedge to run (--against), None: this one
    start_timeout = 20.0          # seconds to the first greeting (a big spool's servers need more)

    def start(self) -> None:
        self.server.start(timeout=self.start_timeout)

    @property
    def pid(self) -> int:
        return self.server.proc.pid

    def stop(self) -> None:
        self.server.stop()


def variant(server: type, tree: str, name: str) -> type:
    """C{server} (a benchmark's exedge runner class) running the code of C{tree}, reported as C{name}."""
    return type(f"{server.__name__}At", (server,), {"name": name, "code": tree})


def here() -> str:
    """This tree's commit, for the report (with "+" when it has uncommitted changes)."""
    head = subprocess.run(["git", "-C", TOP, "rev-parse", "--short=10", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", TOP, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head + ("+" if dirty else "")


def knows(code: str | None, key: str) -> bool:
    """
    Whether the exedge at C{code} (a checkout from L{checkout}; None: this
    tree) has the configuration key C{key}: a benchmark's knob that an
    older commit would refuse as an unknown key is written only for a tree
    that has it (the two trees' configurations must both load).
    """
    import re

    with open(os.path.join(code or TOP, "exedge", "config", "models.py")) as f:
        return re.search(rf"^\s+{re.escape(key)}\s*:", f.read(), re.M) is not None

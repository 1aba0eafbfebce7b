"""
The worked examples under etc/examples/ (README's dial-up scenario and the
connector guides' cost rule) are valid: `exedge check-config` passes on
each, and each says what its comment says it does.
"""

import glob
import os
import subprocess
import sys

import pytest

from exedge.config import load

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(HERE), "etc", "examples", "*.toml")))
EXEDGE = os.path.join(os.path.dirname(sys.executable), "exedge")


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_check_config_passes_on_every_example(path):
    r = subprocess.run([EXEDGE, "check-config", path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.rstrip().endswith(")") and ": OK (" in r.stdout, r.stdout + r.stderr


def test_the_examples_say_what_they_do():
    assert len(EXAMPLES) >= 3
    head = load(os.path.join(os.path.dirname(HERE), "etc", "examples", "head-office-edge.toml"))
    held = [c for c in head.send_connectors if c.remote_triggered_delivery]
    assert [c.name for c in held] == ["To Branch"] and held[0].remote_trigger_accounts == ("branch@fabrikam.com",)
    assert [p.stage for p in head.pipeline] == ["etrn"] and head.pipeline[0].options["atrn"] is True
    branch = load(os.path.join(os.path.dirname(HERE), "etc", "examples", "branch-site.toml"))
    [client] = branch.etrn_clients
    assert client.domains == ("branch.fabrikam.com",) and client.interval == 1800
    assert not branch.send_connectors[0].schedule.always and branch.send_connectors[0].oversize_threshold == 2 * 1024**2
    links = load(os.path.join(os.path.dirname(HERE), "etc", "examples", "two-links-by-cost.toml"))
    assert [s.cost for c in links.send_connectors for s in c.address_spaces] == [1, 50]

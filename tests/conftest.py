import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from harness import Server, Sink, config_text, free_port


@pytest.fixture
def start_server(tmp_path):
    """
    start_server(config=None, **config_text_knobs) -> a running Server;
    C{config} is a template with a {port} field (harness.server_config).
    """
    started = []

    def start(config: str | None = None, **knobs) -> Server:
        port = free_port()
        text = config.format(port=port) if config else config_text(port, **knobs)
        workdir = tmp_path / f"server{len(started)}"
        workdir.mkdir()
        server = Server(workdir, text, port)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def sinks(tmp_path):
    started = []

    def start(name, *args, host="127.0.0.1", port=None):
        sink = Sink(tmp_path, name, *args, host=host, port=port)
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()



@pytest.fixture
def tcp_server(start_server, tmp_path):
    """A server with mail to hold and retry whose management endpoint also listens on TCP with a token."""
    from manage_scenario import tcp_server_in
    return tcp_server_in(start_server, tmp_path)


DIRECTORY_SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "directory")


@pytest.fixture(scope="session")
def samba_ad(tmp_path_factory):
    """
    A real Samba AD domain controller for FABRIKAM.COM on a loopback address
    (provisioned once per machine, copied per session), with the users of
    tests/directory/start_samba_ad.sh. Outside CI it is skipped when samba
    is missing; in CI (CI=true) that is a failure.
    """
    if not shutil.which("samba") or os.geteuid() != 0:
        message = "samba (AD DC) not installed, or not root"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    work = tmp_path_factory.mktemp("samba-ad")
    env = dict(os.environ, SAMBA_AD_MAX_RUNTIME="5400")
    r = subprocess.run(["bash", os.path.join(DIRECTORY_SCRIPTS, "start_samba_ad.sh"), str(work), "auto"],
                       capture_output=True, text=True, timeout=300, env=env)
    if r.returncode:
        pytest.fail(f"samba did not start: {r.stderr[-2000:]}")
    info = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    yield info
    subprocess.run(["bash", os.path.join(DIRECTORY_SCRIPTS, "stop_samba_ad.sh"), str(work)], timeout=60)


@pytest.fixture
def dns_zones(tmp_path):
    """
    dns_zones(zones) -> the port of a twisted.names server on 127.0.0.1
    serving C{zones} (python -m exedge.testing --dns), stopped by PID after
    the test, or before by C{dns_zones.stop(port)}.
    """
    started = []
    by_port = {}

    def start(zones: dict) -> int:
        port = free_port()
        path = tmp_path / f"zones{len(started)}.json"
        path.write_text(json.dumps(zones))
        proc = subprocess.Popen([sys.executable, "-m", "exedge.testing", "--dns", str(path), "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        started.append(proc)
        by_port[port] = proc
        time.sleep(0.5)
        assert proc.poll() is None, "the DNS server died"
        return port

    def stop(port: int) -> None:
        proc = by_port[port]
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)

    start.stop = stop
    yield start
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)

"""
AUTH against a real directory: session rate and reactor responsiveness.

Starts a Samba AD DC (tests/directory/start_samba_ad.sh) and exedge with
a connector that offers AUTH only inside TLS, checked against the DC over
LDAPS. Then, in one run:

  1. sessions/s at 10 concurrent clients, each session EHLO, STARTTLS,
     EHLO, AUTH PLAIN, QUIT; the reference is the directory's own rate
     for the same number of concurrent LDAPS simple binds (ldap3, no SMTP),
     so the ratio says how much of the directory's capacity exedge delivers;
  2. NOOP round-trip latency on an unauthenticated session, idle and while
     50 AUTH sessions are in flight (their binds queue on the auth thread
     pool): the p99 ratio shows whether password checks reach the reactor.

Needs root and samba (make test installs it). Binds loopback only; every
process is stopped by PID.

    .venv/bin/python bench/auth_rate.py [--sessions N]
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing
import os
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import harness  # noqa: E402

USER, PASSWORD = "smtpgateway@fabrikam.com", "Gatew4y!pass"


def smtp_session(port: int) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
        c.ehlo("bench.test")
        c.starttls(context=ctx)
        c.ehlo("bench.test")
        code, _ = c.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode())
        if code != 235:
            raise RuntimeError(f"AUTH answered {code}")


def ldap_bind(host: str, ca: str) -> None:
    from ldap3 import SIMPLE, Connection, Server, Tls
    server = Server(host, port=636, use_ssl=True, tls=Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=ca), get_info=None)
    c = Connection(server, user=USER, password=PASSWORD, authentication=SIMPLE)
    if not c.bind():
        raise RuntimeError(c.result)
    c.unbind()


def _worker(job, count, args, out):
    failures = 0
    for _ in range(count):
        try:
            job(*args)
        except Exception:
            failures += 1
    out.put(failures)


def rate(job, args, total: int, concurrency: int) -> tuple[float, int]:
    """Jobs per second with C{concurrency} processes sharing C{total} jobs."""
    out = multiprocessing.Queue()
    per = [total // concurrency + (1 if i < total % concurrency else 0) for i in range(concurrency)]
    procs = [multiprocessing.Process(target=_worker, args=(job, n, args, out)) for n in per]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    failures = sum(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return total / (time.monotonic() - t0), failures


def noop_latencies(port: int, count: int) -> list[float]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO bench.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        out = []
        for _ in range(count):
            t0 = time.perf_counter()
            s.sendall(b"NOOP\r\n")
            f.readline()
            out.append(time.perf_counter() - t0)
            time.sleep(0.002)
        return out


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=400)
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not subprocess.run(["which", "samba"], capture_output=True).stdout:
        print("auth_rate: needs root and samba (make test installs it)")
        return 2
    work = tempfile.mkdtemp(prefix="auth-bench-")
    scripts = os.path.join(ROOT, "tests", "directory")
    r = subprocess.run(["bash", os.path.join(scripts, "start_samba_ad.sh"), os.path.join(work, "ad"), "auto"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode:
        print(r.stderr)
        return 1
    ad = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    port = harness.free_port()
    config = harness.server_config(
        accepted_domains=(),
        receive_connectors=({"name": "Client Frontend", "usage": "Client", "bindings": [harness.LOOPBACK],
                             "remote_ip_ranges": ["127.0.0.0/8"], "max_inbound_connection_per_source": 1000,
                             "tarpit_interval": 0, "max_logon_failures": 0},),
        send_connectors=(),
        directory={"servers": [f"ldaps://{ad['LDAP_HOST']}:636"], "base_dn": ad["BASE_DN"],
                   "ca_file": ad["TLS_CA_FILE"]},
    ).format(port=port)
    os.makedirs(os.path.join(work, "exedge"))
    server = harness.Server(os.path.join(work, "exedge"), config, port)
    try:
        server.start()
        smtp_session(port)                                      # warm up both sides
        bind_rate, bind_fail = rate(ldap_bind, (ad["LDAP_HOST"], ad["TLS_CA_FILE"]), args.sessions, 10)
        auth_rate, auth_fail = rate(smtp_session, (port,), args.sessions, 10)
        idle = noop_latencies(port, 300)
        load = multiprocessing.Process(target=rate, args=(smtp_session, (port,), 50 * 8, 50))
        load.start()
        time.sleep(1.0)                                         # the 50 sessions are under way
        busy = noop_latencies(port, 300)
        load.join(timeout=600)
    finally:
        server.stop()
        subprocess.run(["bash", os.path.join(scripts, "stop_samba_ad.sh"), os.path.join(work, "ad")],
                       capture_output=True, timeout=60)
    print(f"AUTH PLAIN + STARTTLS sessions, 10 concurrent: {auth_rate:7.1f}/s ({auth_fail} failed)")
    print(f"LDAPS binds straight to the DC, 10 concurrent: {bind_rate:7.1f}/s ({bind_fail} failed)")
    print(f"  exedge sessions / directory binds:           {auth_rate / bind_rate:7.2f}x")
    print(f"NOOP p99 idle:                                 {p99(idle) * 1000:7.2f} ms")
    print(f"NOOP p99 with 50 AUTH sessions in flight:      {p99(busy) * 1000:7.2f} ms "
          f"(max {max(busy) * 1000:.1f} ms)")
    return 0 if not (auth_fail or bind_fail) else 1


if __name__ == "__main__":
    sys.exit(main())

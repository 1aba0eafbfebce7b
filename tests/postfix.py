"""
A private Postfix instance for tests: its own configuration, queue, port
and log in a directory of its own (removed when it stops), started with `postfix -c DIR start`
and stopped by the PID of its master (Debian's package; the system's own
instance is never started). Postfix starts an instance from another
directory only when the default configuration lists it in
alternate_config_directories, so that line is added there.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from harness import read_log

HOST = "127.0.0.1"


def available() -> bool:
    return shutil.which("postfix") is not None and os.geteuid() == 0


class PrivatePostfix:
    def __init__(self, port: int, main: dict, master_extra: str = ""):
        self.port = port
        # its own directory, readable by the postfix user (a test's tmp_path is not), removed at stop
        self.workdir = tempfile.mkdtemp(prefix="exedge-postfix-")
        os.chmod(self.workdir, 0o755)
        self.conf = os.path.join(self.workdir, "postfix-etc")
        self.queue = os.path.join(self.workdir, "postfix-queue")
        self.data = os.path.join(self.workdir, "postfix-data")
        self.log_path = os.path.join(self.workdir, "postfix.log")
        os.makedirs(self.conf)
        with open("/etc/postfix/master.cf") as f:
            master = f.read()
        # no chroot (the private queue has no copy of /etc), smtpd on our loopback port only
        lines = []
        for line in master.splitlines():
            fields = line.split()
            if len(fields) >= 8 and not line.startswith((" ", "\t", "#")):
                fields[4] = "n"
                if fields[0] == "smtp" and fields[1] == "inet":
                    fields[0] = f"{HOST}:{port}"
                line = "  ".join(fields)
            lines.append(line)
        if not any(line.startswith("postlog") for line in lines):       # a file log needs postlogd
            lines.append("postlog   unix-dgram n  -       n       -       1       postlogd")
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write("\n".join(lines) + "\n" + master_extra)
        settings = {
            "compatibility_level": "3.6",
            "meta_directory": "/etc/postfix",
            "queue_directory": self.queue,
            "data_directory": self.data,
            "myhostname": "isp.test",
            "mydestination": "",
            "inet_interfaces": HOST,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "maillog_file": self.log_path,
            "maillog_file_prefixes": self.workdir,
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "biff": "no",
            "alias_maps": "",
            "alias_database": "",
            **main,
        }
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.writelines(f"{k} = {v}\n" for k, v in settings.items())

    def postfix(self, *args) -> str:
        r = subprocess.run(["postfix", "-c", self.conf, *args], capture_output=True, text=True, timeout=60)
        if r.returncode:
            raise RuntimeError(f"postfix {' '.join(args)}: {r.stderr.strip()[-800:]}")
        return r.stdout

    def queue_listing(self) -> str:
        return subprocess.run(["postqueue", "-c", self.conf, "-p"], capture_output=True, text=True,
                              timeout=60).stdout

    @property
    def log(self) -> str:
        return read_log(self.log_path)

    def start(self) -> "PrivatePostfix":
        if not os.path.exists("/etc/postfix/main.cf"):
            with open("/etc/postfix/main.cf", "w") as f:
                f.write("compatibility_level = 3.6\n")
        listed = subprocess.run(["postconf", "-h", "alternate_config_directories"],
                                capture_output=True, text=True).stdout.strip()
        if self.conf not in listed.split():
            subprocess.run(["postconf", "-e", f"alternate_config_directories = {listed} {self.conf}".strip()],
                           check=True)
        os.makedirs(self.queue, exist_ok=True)
        os.makedirs(self.data, exist_ok=True)
        shutil.chown(self.data, "postfix", "postfix")
        self.postfix("check")
        self.postfix("start")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection((HOST, self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"postfix did not listen on {self.port}:\n{self.log[-2000:]}")

    @property
    def pid(self) -> int:
        """The master's process id from its pid file; 0 when there is none (not running)."""
        try:
            with open(os.path.join(self.queue, "pid", "master.pid")) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return 0
        return int(text) if re.fullmatch(r"\d+", text) else 0

    def stop(self) -> None:
        try:
            self.postfix("stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        pid = self.pid
        if pid:
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        listed = subprocess.run(["postconf", "-h", "alternate_config_directories"],
                                capture_output=True, text=True).stdout.split()
        if self.conf in listed:
            subprocess.run(["postconf", "-e", "alternate_config_directories = " +
                            " ".join(d for d in listed if d != self.conf)], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

"""
The rspamd drop-in (plugins/rspamd_scan.py): its verdicts and options on
their own, then through real SMTP into a real exedge with a real rspamd
daemon, started here on a loopback port with a throw-away configuration.
"""

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import pytest_twisted
from twisted.internet import defer

from exedge.config import ConfigError, loads
from exedge.pipeline import Message, build_pipeline, discover
from harness import config_text, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGINS = os.path.join(ROOT, "plugins")
EXEDGE = os.path.join(os.path.dirname(sys.executable), "exedge")
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
HAM = (b"From: alice@partner.test\r\nTo: bob@example.com\r\nSubject: lunch\r\n"
       b"Message-ID: <lunch-1@partner.test>\r\nDate: Mon, 23 Nov 2026 06:00:00 +0000\r\n\r\n"
       b"Shall we meet at noon?\r\n")
SPAM = HAM.replace(b"Shall we meet at noon?", GTUBE.encode())


def plugin():
    """The plugin module as the server loads it (from the plugin directory, with twisted.plugin)."""
    factories, broken, _ = discover(PLUGINS)
    assert not broken, broken
    return sys.modules[type(factories["rspamd"]).__module__]


# -- rspamd, for real ---------------------------------------------------------

# A full configuration: rspamd's own modules ($CONFDIR is /etc/rspamd), one
# scanner worker on a loopback port, everything it writes in the test's
# directory. LOCAL_CONFDIR points there too, so the machine's local.d and
# override.d play no part, and local.d/options.inc (LOCAL_OPTIONS) wins over
# the stock options as an admin's would. No redis: the modules that need one
# disable themselves.
RSPAMD_CONF = """
.include "$CONFDIR/common.conf"
options {{
    .include "$CONFDIR/options.inc"
    .include(priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}}
logging {{
    type = "file";
    filename = "{work}/rspamd.log";
    level = "info";
}}
worker "normal" {{
    bind_socket = "127.0.0.1:{port}";
    count = 1;
    mime = true;
}}
"""
# DNS goes to a closed loopback port (fast failures, no traffic out); the TLD
# list is five names (compiling the public suffix list takes 10 s); no fuzzy
# servers; no hyperscan (its compiler would run in the background all along).
LOCAL_OPTIONS = """
url_tld = "{work}/tld.dat";
filters = "chartable,dkim,regexp";
disable_hyperscan = true;
dns {{ nameserver = ["127.0.0.1:9"]; timeout = 0.2s; retransmits = 1; }}
"""


class Rspamd:
    def __init__(self, url, work, proc):
        self.url, self.work, self.proc = url, work, proc

    @property
    def log(self) -> str:
        try:
            with open(os.path.join(self.work, "rspamd.log"), encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


def _stop(proc) -> None:
    """SIGTERM to rspamd's main process (it stops its workers), SIGKILL to its process group if it hangs."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory):
    """A real rspamd on 127.0.0.1 (skipped without the rspamd package outside CI; a failure in CI)."""
    binary = shutil.which("rspamd")
    if not binary:
        message = "rspamd not installed (make debian-test-deps installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    work = str(tmp_path_factory.mktemp("rspamd"))
    for d in ("db", "run", "local.d"):
        os.mkdir(os.path.join(work, d))
    with open(os.path.join(work, "local.d", "options.inc"), "w") as f:
        f.write(LOCAL_OPTIONS.format(work=work))
    with open(os.path.join(work, "tld.dat"), "w") as f:
        f.write("com\norg\nnet\ntest\nexample\n")
    port = free_port()
    conf = os.path.join(work, "rspamd.conf")
    with open(conf, "w") as f:
        f.write(RSPAMD_CONF.format(work=work, port=port))
    # -f: stay in the foreground, so proc.pid is rspamd's main process;
    # -i: let the workers run as root when the tests do (rspamd refuses otherwise)
    command = [binary, "-f", "-i", "-c", conf, f"--var=LOCAL_CONFDIR={work}", f"--var=DBDIR={work}/db",
               f"--var=RUNDIR={work}/run", f"--var=LOGDIR={work}"]
    with open(os.path.join(work, "stderr.log"), "wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    daemon = Rspamd(f"http://127.0.0.1:{port}", work, proc)
    started = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"rspamd exited with {proc.returncode}:\n{daemon.log[-3000:]}")
            try:
                with urllib.request.urlopen(daemon.url + "/ping", timeout=1) as r:
                    if r.read().strip() == b"pong":
                        break
            except OSError:
                pass
            if time.monotonic() - started > 30:
                pytest.fail(f"rspamd did not answer /ping within 30 s:\n{daemon.log[-3000:]}")
            time.sleep(0.05)
        print(f"rspamd ready in {time.monotonic() - started:.1f}s")
        yield daemon
    finally:
        _stop(proc)


def edge(start_server, url, *, quarantine_mailbox=None, **options):
    """A real exedge with plugins/ as its plugin directory and the rspamd stage talking to C{url}."""
    server = f'plugin_directory = "{PLUGINS}"\n'
    if quarantine_mailbox:
        server += f'quarantine_mailbox = "{quarantine_mailbox}"\n'
    stage = f'\n[[pipeline]]\nstage = "rspamd"\nurl = "{url}"\n'
    for key, value in options.items():
        stage += f"{key} = {value}\n"
    text = config_text("{port}").replace("dns_servers = []\n", "dns_servers = []\n" + server) + stage
    return start_server(config=text)


def send(server, message: bytes, recipients=("bob@example.com",)):
    """(code, text) of the reply to the final dot."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as c:
        c.ehlo("mail.partner.test")
        assert c.mail("alice@partner.test")[0] == 250
        for r in recipients:
            assert c.rcpt(r)[0] == 250
        code, text = c.data(message)
        return code, text


def stored(server) -> bytes:
    """The one message the drop directory received."""
    files = server.wait_for(server.drop_files, what="the delivered message")
    assert len(files) == 1, files
    with open(files[0], "rb") as f:
        return f.read()


def header_section(data: bytes) -> str:
    return data.split(b"\r\n\r\n", 1)[0].decode()


# -- through real SMTP, with the real daemon -----------------------------------

def test_gtube_is_rejected_with_rspamds_text(start_server, rspamd):
    server = edge(start_server, rspamd.url)
    code, text = send(server, SPAM)
    assert (code, text) == (550, b"5.7.1 Gtube pattern")
    assert server.drop_files() == []
    assert "<alice@partner.test>" in rspamd.log                  # rspamd got the envelope


def test_ordinary_message_is_accepted_with_score_and_scl(start_server, rspamd):
    server = edge(start_server, rspamd.url)
    code, _ = send(server, HAM, recipients=("bob@example.com", "carol@example.com"))
    assert code == 250
    header = header_section(stored(server))
    assert "X-Spam-Score: " in header and "X-MS-Exchange-Organization-SCL: " in header
    score = header.split("X-Spam-Score: ")[1].split("\r\n")[0]
    scl = int(header.split("X-MS-Exchange-Organization-SCL: ")[1].split("\r\n")[0])
    assert score.endswith(" / 15.00") and 0 <= scl <= 4                # rspamd's default reject score
    assert "X-Spam: Yes" not in header
    log = rspamd.log
    assert "<bob@example.com,carol@example.com>" in log or "<carol@example.com,bob@example.com>" in log


def test_the_greylisting_band_is_accepted(start_server, rspamd):
    # no Message-ID, Date or To: rspamd 3.4 scores 5.4, between greylist (4) and add header (6)
    server = edge(start_server, rspamd.url)
    assert send(server, b"From: alice@partner.test\r\nSubject: hi\r\n\r\nhello\r\n")[0] == 250
    assert "X-Spam-Score: 5.40 / 15.00" in header_section(stored(server))
    assert "(greylist): [5.40/15.00]" in rspamd.log


def test_forged_spam_headers_are_replaced(start_server, rspamd):
    server = edge(start_server, rspamd.url)
    forged = b"X-Spam-Score: -100 / 15\r\nX-Spam-Symbols: TRUST_ME\r\n" + HAM
    assert send(server, forged)[0] == 250
    header = header_section(stored(server))
    assert header.count("X-Spam-Score: ") == 1 and "-100" not in header and "TRUST_ME" not in header


def test_quarantine_instead_of_reject(start_server, rspamd):
    server = edge(start_server, rspamd.url, quarantine_mailbox="quarantine@example.com", quarantine="true")
    code, _ = send(server, SPAM)
    assert code == 250
    data = stored(server)
    header = header_section(data)
    assert "X-Receiver: <quarantine@example.com>" in header and "X-Receiver: <bob@example.com>" not in header
    assert "X-Spam: Yes" in header and "X-Spam-Score: 15.00 / 15.00" in header
    assert "X-Spam-Symbols: GTUBE(0.00)" in header and "X-MS-Exchange-Organization-SCL: 9" in header
    assert "X-Exedge-Quarantine-Reason: rspamd: Gtube pattern" in header
    assert "X-Exedge-Original-Recipients: bob@example.com" in header
    assert GTUBE.encode() in data


def test_messages_over_max_size_are_not_scanned(start_server, rspamd):
    server = edge(start_server, rspamd.url, max_size='"1KB"')
    big = SPAM + b"x" * 70 + b"\r\n" + (b"y" * 70 + b"\r\n") * 20
    assert send(server, big)[0] == 250
    assert "X-Spam-Score" not in header_section(stored(server))


# -- without the daemon: check-config, rspamd unreachable or silent -------------

def test_check_config_lists_the_stage(start_server):
    server = edge(start_server, "http://127.0.0.1:11333")
    check = subprocess.run([EXEDGE, "check-config", server.config_path], capture_output=True, text=True,
                           timeout=60, cwd=server.workdir)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "stage rspamd (anti-spam) (reads the body): " in check.stdout and "rspamd_scan.py; hooks: on_message" in check.stdout


def test_unreachable_scanner_accepts_by_default_and_defers_when_asked(start_server):
    nobody = f"http://127.0.0.1:{free_port()}"
    server = edge(start_server, nobody)
    assert send(server, SPAM)[0] == 250                       # an outage does not stop mail
    assert "X-Spam-Score" not in header_section(stored(server))
    assert "rspamd: " in server.log and "not scanned (ConnectionRefusedError" in server.log
    deferring = edge(start_server, nobody, on_error='"Defer"')
    assert send(deferring, HAM) == (451, b"4.3.0 Temporary content scanning failure; please try again later")


def test_a_scanner_that_never_answers_costs_scan_timeout(start_server):
    with socket.socket() as silent:                          # connections complete in the backlog, no answer
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = "http://127.0.0.1:%d" % silent.getsockname()[1]
        server = edge(start_server, url, scan_timeout='"1s"', on_error='"Defer"')
        began = time.monotonic()
        assert send(server, HAM)[0] == 451
        assert 0.9 < time.monotonic() - began < 10
        assert "not scanned (TimeoutError: no answer within 1s)" in server.log


# -- verdicts and options on their own ------------------------------------------

def stage(**options):
    module = plugin()
    return module.RspamdScan(**options)


def message(header=b"Subject: hi\r\n"):
    return Message("alice@partner.test", ["bob@example.com"], header + b"\r\n", 100)


@pytest.mark.parametrize("action, kind, code, status, text", [
    ("reject", "reject", 550, "5.7.1", "Message rejected as spam"),
    ("soft reject", "defer", 451, "4.7.1", "Try again later"),
])
def test_refusing_actions(action, kind, code, status, text):
    verdict = stage().act(message(), {"action": action, "score": 20, "required_score": 15})
    assert (verdict.kind, verdict.code, verdict.status, verdict.text) == (kind, code, status, text)
    said = stage().act(message(), {"action": action, "messages": {"smtp_message": "Go\r\naway \x00now"}})
    assert said.text == "Go away now"                           # one printable line


@pytest.mark.parametrize("action", ["add header", "rewrite subject"])
def test_spam_actions_stamp_headers_and_scl(action):
    m = message()
    symbols = {f"SYM_{i:02d}": {"score": i / 10} for i in range(30)}
    symbols["BAD NAME\r\nX-Injected: 1"] = {"score": 99}
    assert stage().act(m, {"action": action, "score": 7.3, "required_score": 15, "symbols": symbols}) is None
    added = dict(m.added)
    assert added["X-Spam"] == "Yes" and added["X-Spam-Score"] == "7.30 / 15.00"
    listed = added["X-Spam-Symbols"].split(", ")
    assert len(listed) == 20 and listed[0] == "SYM_29(2.90)" and "Injected" not in added["X-Spam-Symbols"]
    assert m.scl == 5 and m.quarantined is None


def test_quarantine_and_discard_actions():
    m = message()
    assert stage().act(m, {"action": "quarantine", "score": 9, "required_score": 15,
                           "messages": {"smtp_message": "Held"}}) is None
    assert m.quarantined == "rspamd: Held, score 9.00 / 15.00" and dict(m.added)["X-Spam"] == "Yes" and m.scl == 5
    m = message()
    assert stage().act(m, {"action": "discard", "score": 30, "required_score": 15}) is None
    assert m.deleted == "rspamd: discard" and m.added == []


def test_scl_mapping():
    scl = plugin().spam_confidence
    assert [scl(s, 15, False) for s in (-5, 0, 1, 5, 7, 14)] == [0, 0, 1, 3, 4, 4]
    assert [scl(s, 15, True) for s in (0, 6, 10, 12, 15, 40)] == [5, 5, 6, 7, 9, 9]
    assert scl(3, 0, False) == 0 and scl(3, 0, True) == 5


def test_no_action_greylist_and_unknown_actions_stamp_the_score_only():
    for action in ("no action", "greylist", "some custom action"):
        m = message(b"X-Spam: Yes\r\nSubject: hi\r\n")
        assert stage().act(m, {"action": action, "score": 1.5, "required_score": 15}) is None
        assert m.added == [("X-Spam-Score", "1.50 / 15.00")] and m.scl == 1
        assert m.removed == ["x-spam"]                            # the client's claim goes


def test_options_are_checked_with_the_entry_named():
    cfg = loads(config_text(25).replace("dns_servers = []\n", f'dns_servers = []\nplugin_directory = "{PLUGINS}"\n')
                + '''
[[pipeline]]
stage = "rspamd"
url = "ftp://127.0.0.1:11333"
scan_timeout = "0s"
max_size = "lots"
on_error = "Maybe"
quarantine = "yes"
''')
    with pytest.raises(ConfigError) as e:
        build_pipeline(cfg, None)
    text = "\n".join(map(str, e.value.problems))
    assert 'pipeline[0].url: stage rspamd: expected rspamd\'s address, such as "http://127.0.0.1:11333"' in text
    assert "pipeline[0].scan_timeout: stage rspamd: scan_timeout is more than 0" in text
    assert "pipeline[0].max_size: stage rspamd: invalid size 'lots'" in text
    assert "pipeline[0].on_error: stage rspamd: invalid value 'Maybe' (expected one of Accept, Defer)" in text
    assert "pipeline[0].quarantine: stage rspamd: expected true or false" in text
    good = loads(config_text(25).replace("dns_servers = []\n", f'dns_servers = []\nplugin_directory = "{PLUGINS}"\n')
                 + '[[pipeline]]\nstage = "rspamd"\nurl = "http://[::1]:11333/"\non_error = "defer"\n')
    built = build_pipeline(good, None).entries[0].stage
    assert built.endpoint == b"http://[::1]:11333/checkv2" and built.on_error == "Defer"


class FakeRspamd:
    """An HTTP server on 127.0.0.1 (this test's reactor) that records each request and answers C{answers} in turn."""

    def __init__(self, answers):
        from twisted.internet import reactor
        from twisted.internet.error import ConnectionDone
        from twisted.web import resource, server

        fake = self
        self.answers, self.requests = list(answers), []

        class Check(resource.Resource):
            isLeaf = True

            def render_POST(self, request):
                fake.requests.append((request.path, request.requestHeaders, request.content.read()))
                code, body = fake.answers.pop(0)
                request.setResponseCode(code)
                if code == 299:                     # headers and half the body, then silence
                    request.setHeader("Content-Length", "100")
                    request.write(body)
                    fake.hung = request.notifyFinish()
                    # the client gives up and hangs up: expected, not an error to report at exit
                    fake.hung.addErrback(lambda f: f.trap(ConnectionDone))
                    return server.NOT_DONE_YET
                return body

        self.port = reactor.listenTCP(0, server.Site(Check()), interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"


@pytest_twisted.ensureDeferred
async def test_request_headers_and_answers_that_are_not_verdicts():
    from types import SimpleNamespace

    nonsense = [(200, b"not json"), (200, b'{"action": "reject"}'), (200, b'["reject"]'),
                (200, b'{"action": "reject", "score": NaN, "required_score": 15}'), (500, b'{"error": "oops"}')]
    fake = FakeRspamd([(200, b'{"action": "no action", "score": 0.5, "required_score": 15}')] + nonsense * 2)
    session = SimpleNamespace(peer="192.0.2.7", helo="mail.partner.test", authenticated_as="alice")
    module = plugin()
    try:
        m = Message("alice@partner.test", ["bob@example.com", "carol@example.com"], HAM.split(b"\r\n\r\n")[0],
                    len(HAM), read=lambda: defer.succeed(HAM), queue_id="0660ABC")
        assert await module.RspamdScan(url=fake.url).on_message(session, m) is None
        path, headers, content = fake.requests[0]
        assert path == b"/checkv2" and content == HAM
        assert {name: headers.getRawHeaders(name) for name in ("IP", "Helo", "From", "Rcpt", "User", "Queue-Id")} \
            == {"IP": ["192.0.2.7"], "Helo": ["mail.partner.test"], "From": ["alice@partner.test"],
                "Rcpt": ["bob@example.com", "carol@example.com"], "User": ["alice"], "Queue-Id": ["0660ABC"]}
        assert not headers.hasHeader("Pass") and m.added == [("X-Spam-Score", "0.50 / 15.00")]
        for on_error in ("Accept", "Defer"):
            scanner = module.RspamdScan(url=fake.url, on_error=on_error)
            for _ in nonsense:
                m = Message("", ["bob@example.com"], b"Subject: x\r\n", 10, read=lambda: defer.succeed(HAM))
                verdict = await scanner.on_message(session, m)
                if on_error == "Accept":
                    assert verdict is None and m.added == [] and m.scl is None
                else:
                    assert (verdict.code, verdict.status) == (451, "4.3.0")
        assert fake.requests[-1][1].getRawHeaders("From") == ["<>"]             # the null sender
    finally:
        await fake.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_reply_that_stops_halfway_or_never_ends_is_an_error_and_its_connection_closed():
    from types import SimpleNamespace
    from twisted.internet import reactor, task

    module = plugin()
    fake = FakeRspamd([(299, b'{"action": '), (200, b" " * (module.MAX_REPLY + 10))])
    session = SimpleNamespace(peer="192.0.2.7", helo=None, authenticated_as=None)
    scanner = module.RspamdScan(url=fake.url, scan_timeout=0.5, on_error="Defer")
    try:
        for error, text in ((TimeoutError, "no answer within 0.5s"), (ValueError, "a reply of more than")):
            m = Message("a@partner.test", ["b@example.com"], b"Subject: x\r\n", 10, read=lambda: defer.succeed(HAM))
            with pytest.raises(error, match=text):
                await scanner.scan(session, m)
        for _ in range(40):                                   # the hung request ends when we hang up
            if fake.hung.called:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        assert fake.hung.called
    finally:
        await fake.port.stopListening()

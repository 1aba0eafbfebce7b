"""
The session fuzzed: Hypothesis drives one exedge SMTP session (a real
SMTPServer on a StringTransport, tests/fuzz_model.py's Driver) through
arbitrary command sequences, parameters, pipelined bursts, STARTTLS and
AUTH orderings, DATA bodies, time passing and the client going away, with
every write cut into random chunks. After every step the oracle checks
that no exception escaped and none was logged, that every complete command
line got exactly one reply and in order, that a transaction never sees
state from the one before, and what was queued; at the end, that the
session ended cleanly (221 or 421 then closed, or lost) and left no timer,
no draft and no connection slot behind.

CI runs EXEDGE_FUZZ_EXAMPLES examples (default 100, about 25 s here); a long
campaign raises it (`make fuzz`), beside tests/fuzz_campaign.py's seeded
random sessions.

The plain tests at the end are the oracle's own: each breaks one promise
on purpose and checks the oracle says so (a fuzzer whose oracle cannot
fail finds nothing).
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import fuzz_model as fm

EXAMPLES = int(os.environ.get("EXEDGE_FUZZ_EXAMPLES", "100"))
settings.register_profile(
    "exedge-fuzz", max_examples=EXAMPLES, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    derandomize=EXAMPLES <= 200,      # CI: the same examples every run; a campaign explores
)


class SessionMachine(RuleBasedStateMachine):
    """One session per example, on a server of a drawn variant (see fm.VARIANTS)."""

    def __init__(self):
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="exedge-fuzz-")
        self.failures = fm.FailureLog().__enter__()
        self.driver = None

    @initialize(variant=st.sampled_from(fm.ALL_VARIANTS), whims=st.integers(0, 2**32))
    def connect(self, variant, whims):
        self.server = fm.build_server(self.directory, variant, seed=whims)
        self.driver = fm.Driver(self.server, self.failures)

    def _whims(self, seed: int) -> None:
        if self.server.whims is not None:             # the "stages" variant: its stage's choices, seeded
            self.server.whims.rnd = random.Random(seed)

    def _step(self, step, data) -> None:
        step(fm.HypothesisDraw(data), self.driver)

    @property
    def open(self) -> bool:
        return self.driver is not None and self.driver.open

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def hello(self, data):
        self._step(fm.step_hello, data)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def mail(self, data):
        self._step(fm.step_mail, data)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def rcpt(self, data):
        self._step(fm.step_rcpt, data)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def transaction(self, data):
        self._step(fm.step_transaction, data)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def body(self, data):
        self._step(fm.step_body, data)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def other_command(self, data):
        self._step(fm.step_simple, data)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def auth(self, data):
        self._step(fm.step_auth, data)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def cram_md5(self, data):
        self._step(fm.step_cram, data)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def pipelined_burst(self, data):
        self._step(fm.step_burst, data)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def raw_bytes(self, data):
        self._step(fm.step_raw, data)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def long_line(self, data):
        self._step(fm.step_long, data)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def big_message(self, data):
        self._step(fm.step_big, data)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def starttls(self, data):
        self._step(fm.step_starttls, data)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def time_passes(self, data):
        self._step(fm.step_tick, data)

    @precondition(lambda self: self.open)
    @rule()
    def half_close(self):
        self.driver.half_close()

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def quit(self, data):
        self._step(fm.step_quit, data)

    @precondition(lambda self: self.open)
    @rule()
    def client_goes_away(self):
        self.driver.lose()

    @precondition(lambda self: self.driver is not None and not self.open)
    @rule(whims=st.integers(0, 2**32))
    def next_session(self, whims):
        """The session has ended: its end is checked, and the client connects again to the same server."""
        self.driver.finish()
        self._whims(whims)
        self.driver = fm.Driver(self.server, self.failures)

    @invariant()
    def promises_kept(self):
        if self.driver is not None:
            self.driver.check()

    def teardown(self):
        try:
            if self.driver is not None:
                self.driver.finish()                    # the session's end, checked
                self.server.proto.connectionLost(None)  # the session finish() opened to probe its slot
                gc.collect()                            # an unhandled error in a Deferred is logged now
                self.failures.check()
        finally:
            self.failures.__exit__(None, None, None)
            shutil.rmtree(self.directory, ignore_errors=True)


SessionMachine.TestCase.settings = settings.get_profile("exedge-fuzz")
TestSessionFuzz = SessionMachine.TestCase


# -- the oracle can fail ---------------------------------------------------------


def fed(oracle: fm.Oracle, sent: bytes, replies: bytes, *, disconnecting=False, lost=False) -> None:
    oracle.received(sent)
    oracle.wrote(replies)
    oracle.check(disconnecting=disconnecting, lost=lost)


GREETING = b"220 edge01.example.com exedge ESMTP service ready\r\n"


@pytest.mark.parametrize("sent,replies,why", [
    (b"NOOP\r\nNOOP\r\n", b"250 2.0.0 OK\r\n", "no reply"),
    (b"NOOP\r\n", b"250 2.0.0 OK\r\n250 2.0.0 OK\r\n", "nobody asked"),
    (b"EHLO a.test\r\nDATA\r\n", b"250 hi\r\n354 go\r\n", "DATA got 354"),
    (b"HELP\r\nNOOP\r\n", b"250 2.0.0 OK\r\n214 2.0.0 help\r\n", "HELP"),            # out of order
    (b"EHLO a.test\r\nMAIL FROM:<a@b.test>\r\nRSET\r\nRCPT TO:<c@example.com>\r\n",
     b"250 hi\r\n250 2.1.0 ok\r\n250 2.0.0 reset\r\n250 2.1.5 ok\r\n", "RCPT without MAIL"),
    (b"EHLO a.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@example.com>\r\nDATA\r\na\nb\r\n.\r\n",
     b"250 hi\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n250 2.6.0 queued\r\n", "bare CR or LF"),
    (b"x" * 600, b"250 2.0.0 OK\r\n", "over-long"),
    (b"QUIT\r\n", b"221 2.0.0 bye\r\n", "stays open"),
    (b"NOOP\x00\r\n", b"250 2.0.0 OK\r\n", "not 500"),
])
def test_the_oracle_sees_each_broken_promise(sent, replies, why):
    oracle = fm.Oracle()
    fed(oracle, b"", GREETING)
    with pytest.raises(fm.Violation, match=why):
        fed(oracle, sent, replies)


def test_the_oracle_accepts_a_well_behaved_pipelined_session():
    oracle = fm.Oracle()
    fed(oracle, b"", GREETING)
    fed(oracle, b"EHLO a.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n",
        b"250-hi\r\n250 PIPELINING\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n")
    fed(oracle, b"..x\r\n.\r\nRCPT TO:<c@example.com>\r\nQUIT\r\n",
        b"250 2.6.0 queued\r\n503 5.5.1 Need MAIL before RCPT\r\n221 2.0.0 bye\r\n", disconnecting=True)
    assert oracle.queued == [(b"MAIL FROM:<a@b.test>", 1, b".x\r\n")]
    assert oracle.closed.startswith("221")


def test_a_logged_failure_is_a_violation():
    from twisted.logger import Logger
    with fm.FailureLog() as failures:
        try:
            1 / 0
        except ZeroDivisionError:
            Logger().failure("boom")
        with pytest.raises(fm.Violation, match="ZeroDivisionError"):
            failures.check()


# -- what the fuzzer found ---------------------------------------------------------


def test_an_ehlo_a_stage_refuses_leaves_the_session_as_it_was(tmp_path):
    """
    Found by the fuzzer's "stages" variant: a stage that refused EHLO made
    the session drop its open transaction and forget the earlier greeting
    (RCPT then got 503 Need MAIL, MAIL 503 Send hello first). RFC 5321
    §4.1.4: after a refused EHLO the server stays in the state it was in.
    """
    from twisted.internet import task

    from exedge.config import loads
    from exedge.pipeline import Entry, Pipeline, Stage, reject
    from exedge.testing import StringSession
    from harness import config_text

    class RefusesSecondHelo(Stage):
        name = "helo-once"

        def __init__(self):
            self.seen = 0

        def on_helo(self, session, helo):
            self.seen += 1
            return reject("one greeting is enough") if self.seen > 1 else None

    clock = task.Clock()
    pipeline = Pipeline([Entry(RefusesSecondHelo(), 0, None, 30.0)], clock)
    s = StringSession(loads(config_text(2525)), str(tmp_path / "spool"), clock=clock, pipeline=pipeline)
    assert s.codes(b"EHLO a.test\r\nMAIL FROM:<a@sender.test>\r\n") == ["250", "250 2.1.0"]
    assert s.codes(b"HELO b.test\r\n") == ["550 5.7.1"]
    assert s.codes(b"RCPT TO:<bob@example.com>\r\n") == ["250 2.1.5"]      # the transaction is still there
    assert s.proto.session.helo == "a.test" and s.proto.esmtp
    assert s.codes(b"RSET\r\nMAIL FROM:<a@sender.test> SIZE=10\r\n") == ["250 2.0.0", "250 2.1.0"]   # EHLO's, kept

"""
The DATA reader (exedge.receive.data.DataReader) fed directly, in every
chunking.

TCP delivers a message in reads of any size: a CRLF, a dot line or the
end-of-data marker may be split anywhere. Whatever the split, the reader
must end the data at the same byte, leave the same bytes for the command
parser, and accept or refuse the message with the same reply; an accepted
message must be written, sized and have its header section measured
identically. A reader whose result depends on the split is exactly what
SMTP smuggling exploits, so the bodies here are hostile: dot lines, bare CR
and LF, CRLF pairs cut in two, lines around the 998-octet limit, Received
fields against the hop limit, and limits small enough to be hit.
"""

import attrs
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from exedge.receive.data import MAX_LINE, DataReader


@attrs.frozen
class Outcome:
    done: bool
    rest: bytes | None
    error: tuple | None
    # what an accepted message became; None when it was refused, because a
    # refused message is thrown away (the session aborts its spool file)
    # and how much of it had been streamed to disk before the fault showed
    # depends on where the reads fell, by design: the reader keeps nothing
    written: bytes | None
    size: int | None
    header: bytes | None
    dot_lines: bool | None = None     # whether a line began with "." (accepted messages only)


def read(data: bytes, cuts, limits: dict) -> Outcome:
    """Feed C{data} cut at C{cuts}, as the session does: stop at the end of data."""
    bounds = [0] + sorted({c for c in cuts if 0 < c < len(data)}) + [len(data)]
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    written = bytearray()
    reader = DataReader(written.extend, **limits)
    done, rest = False, None
    for i, chunk in enumerate(chunks):
        done, rest = reader.feed(chunk)
        if done:
            # what the session hands back to its line parser
            rest = rest + b"".join(chunks[i + 1:])
            break
    accepted = done and reader.error is None
    return Outcome(
        done=done, rest=rest, error=reader.error if done else None,
        written=bytes(written) if accepted else None,
        size=reader.size if accepted else None,
        header=bytes(reader.header) if accepted else None,
        dot_lines=reader.dot_lines if accepted else None,
    )


LONG = [MAX_LINE - 1, MAX_LINE, MAX_LINE + 1, MAX_LINE + 2, MAX_LINE + 3, 2500]

pieces = st.one_of(
    st.sampled_from([
        b"\r\n", b"\r", b"\n", b"\r\r\n", b"\n\r", b".", b"..", b".\r\n", b"..\r\n",
        b"\r\n.\r\n", b"\r\n..\r\n", b"\r\n.\n", b"\n.\r\n", b"\r\n.\r", b"\r\n\r\n",
        b"Received: from a\r\n", b"Subject: hi\r\n", b"\tfolded\r\n", b"body text\r\n",
        b"\x00", b"\xff",
    ]),
    # lines at and around the 998-octet limit, plain and dot-stuffed
    st.builds(lambda n, first: first + b"x" * n, st.sampled_from(LONG), st.sampled_from([b"", b"."])),
    st.binary(max_size=12),
)

bodies = st.builds(
    lambda parts, end, after: b"".join(parts) + end + after,
    st.lists(pieces, max_size=30),
    st.sampled_from([b"\r\n.\r\n", b".\r\n", b""]),   # usually an end, sometimes none
    st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<x@example.com>\r\n", b".\r\n"]),
)

limits = st.fixed_dictionaries({
    "max_size": st.one_of(st.none(), st.integers(0, 3000)),
    "max_header_size": st.integers(0, 3000),
    "max_hop_count": st.integers(0, 3),
})


def cuts_for(data: bytes):
    return st.lists(st.integers(1, max(1, len(data) - 1)), max_size=40)


@settings(max_examples=1000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=bodies, limits=limits, data=st.data())
# a bare LF inside an over-long line: found first or second depending on whether
# the line arrives with its CRLF or in a read that ends before it
@example(body=b"x" * 500 + b"\n" + b"x" * 600 + b"\r\n.\r\n",
         limits={"max_size": None, "max_header_size": 3000, "max_hop_count": 3},
         data=None)
# a message over the size limit whose header is over its limit too
@example(body=b"Subject: " + b"s" * 900 + b"\r\n" + b"Subject: " + b"s" * 900 + b"\r\n\r\nbody\r\n.\r\n",
         limits={"max_size": 1000, "max_header_size": 1500, "max_hop_count": 3},
         data=None)
def test_the_split_does_not_change_the_result(body, limits, data):
    whole = read(body, [], limits)
    # the two extremes, then random reads
    assert read(body, range(1, len(body)), limits) == whole, "one byte at a time"
    assert read(body, range(2, len(body), 2), limits) == whole, "two bytes at a time"
    for cut in range(1, len(body)):
        if body[cut - 1:cut + 1] in (b"\r\n", b"\n.", b".\r") or cut % 997 == 0:
            assert read(body, [cut], limits) == whole, f"cut at {cut}"
    if data is not None:
        cuts = data.draw(cuts_for(body), label="cuts")
        assert read(body, cuts, limits) == whole


def test_reads_of_every_size_around_a_dot_line():
    """Every two-read split of a message with every kind of dot line ends where the one-read feed does."""
    body = (b"Received: a\r\n.Received: b\r\n\r\n..\r\n.x\r\n"
            b"x\r.\r\nx\n.\r\n" + b"." + b"y" * MAX_LINE + b"\r\n"
            b"\r\n.\r\nQUIT\r\n")
    limits = {"max_size": None, "max_header_size": 10000, "max_hop_count": 5}
    whole = read(body, [], limits)
    assert whole.done and whole.rest == b"QUIT\r\n"
    for cut in range(1, len(body)):
        assert read(body, [cut], limits) == whole, f"cut at {cut}"


def test_an_accepted_message_is_unstuffed_and_measured():
    """The oracle the property compares against is itself right on a plain message."""
    body = b"Received: a\r\nSubject: s\r\n\r\n..dot\r\nline\r\n.\r\nNOOP\r\n"
    out = read(body, [], {"max_size": None, "max_header_size": 1000, "max_hop_count": 1})
    assert out == Outcome(done=True, rest=b"NOOP\r\n", error=None,
                          written=b"Received: a\r\nSubject: s\r\n\r\n.dot\r\nline\r\n",
                          size=len(b"Received: a\r\nSubject: s\r\n\r\n.dot\r\nline\r\n"),
                          header=b"Received: a\r\nSubject: s\r\n", dot_lines=True)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1500), min_size=1, max_size=60))
def test_the_long_line_check_agrees_with_measuring_every_line(lengths):
    """The windows are a shortcut: whatever the lines, the answer is the one measuring each line gives."""
    from exedge.receive.data import _has_long_line
    block = b"".join(b"x" * n + b"\r\n" for n in lengths)
    assert _has_long_line(block) == (max(lengths) > MAX_LINE)

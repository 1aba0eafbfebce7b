"""SMTP replies with RFC 3463 enhanced status codes, and what a pipeline stage's verdict makes of one."""

from __future__ import annotations

import attrs


@attrs.frozen
class Reply:
    code: int
    status: str | None          # "2.1.0"; None for 220/221/354 greetings and prompts
    text: str
    more: tuple[str, ...] = ()  # further lines of a multi-line reply (EHLO, HELP)
    protocol_error: bool = False  # counts towards max_protocol_errors
    tarpit: bool = False        # delayed by tarpit_interval for untrusted peers
    close: bool = False         # close the connection after sending
    after: object = attrs.field(default=None, eq=False)   # called once the reply is written (STARTTLS)

    def encode(self) -> bytes:
        lines = (self.text,) + self.more
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            prefix = f"{self.status} " if self.status and i == 0 else ""
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("ascii", "replace")


def syntax_error(text: str, status: str = "5.5.4", code: int = 501) -> Reply:
    return Reply(code, status, text, protocol_error=True, tarpit=True)


def bad_sequence(text: str, status: str = "5.5.1") -> Reply:
    return Reply(503, status, text, protocol_error=True, tarpit=True)


def verb_reply(verdict, note) -> Reply:
    """A stage verb's answer: its own positive reply, or the refusal."""
    if verdict.kind == "ok":
        first, *more = (verdict.text or "OK").split("\n")
        return Reply(verdict.code or 250, verdict.status or None, first, more=tuple(more))
    if not verdict.final:
        return Reply(250, "2.0.0", "OK")
    return verdict_reply(verdict, note)


def verdict_reply(verdict, note) -> Reply:
    """A stage's refusal as the reply to the command it refused (C{note}: the protocol log)."""
    if verdict.kind == "disconnect":
        return Reply(421, verdict.status or "4.7.0", verdict.text or "Closing connection", close=True)
    default = (550, "5.7.1") if verdict.kind == "reject" else (451, "4.7.1")
    note(f"pipeline: {verdict.kind} {verdict.code or default[0]} {verdict.text}")
    return Reply(verdict.code or default[0], verdict.status or default[1], verdict.text or "Refused",
                 tarpit=verdict.kind == "reject")

"""
The message as stages see it at the end of DATA, and what they may do to it.

Stages read the envelope and the header section (parsed once, on first
use, and shared); a stage that needs the body asks for it with
C{await message.body()}, which is the only thing that reads it back from
the spool. Actions are recorded here and applied once, by the session,
before the message is committed (L{Message.edit}): a message that no stage
touched is committed exactly as it was received, without a second pass
over its bytes.

The actions are Exchange's (research §1.8): add or remove header fields,
stamp a spam confidence level, redirect a recipient, send the message to
the quarantine mailbox, delete it (the client still gets 250, as the
Sender ID and attachment filter "delete" actions do), or replace the
content (the attachment filter's strip).
"""

from __future__ import annotations

import email.parser
import email.policy
import re

import attrs
from twisted.internet import defer
from zope.interface import implementer

from exedge.interfaces import IMessageEdit

SCL_HEADER = "X-MS-Exchange-Organization-SCL"
_FIELD_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")      # RFC 5322 ftext


class Message:
    """
    The message at the final dot. C{header_bytes} is the client's header
    section; C{read} (a callable returning a Deferred of bytes) reads the
    whole message back from the spool when a stage asks for the body.
    C{queue_id} is the id it will be queued under (our Received field
    names it), for stages that tell an outside service about the message.
    """

    def __init__(self, sender: str, recipients: list[str], header: bytes, size: int, read=None,
                 queue_id: str | None = None):
        self.sender = sender
        self.queue_id = queue_id
        self.recipients = recipients
        self.header_bytes = header
        self.size = size
        self._headers = None
        self._read = read
        self._pending = None
        self._content: bytes | None = None
        self.added: list[tuple[str, str]] = []
        self.removed: list[str] = []           # lower-case names; "x-foo-*" removes a prefix
        self.scl: int | None = None
        self.redirects: dict[str, list[str]] = {}
        self.quarantined: str | None = None
        self.deleted: str | None = None
        self.replacement: bytes | None = None
        self.notes: dict[str, str] = {}

    @property
    def headers(self):
        """The header section as an C{email.message.Message} (parsed once, shared)."""
        if self._headers is None:
            self._headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
                self.header_bytes)
        return self._headers

    def body(self):
        """A Deferred firing with the whole message as the client sent it (header section and body)."""
        if self._content is not None:
            return defer.succeed(self._content)
        if self._read is None:
            raise RuntimeError("this message's content cannot be read back")
        if self._pending is None:
            self._pending = self._read()
            self._pending.addCallback(self._keep)
        waiter = defer.Deferred()
        self._pending.addCallback(lambda data: (waiter.callback(data), data)[1])
        self._pending.addErrback(lambda f: (waiter.errback(f), None)[1])
        return waiter

    def _keep(self, data: bytes) -> bytes:
        self._content = bytes(data)
        return self._content

    # -- actions -----------------------------------------------------------

    def add_header(self, name: str, value: str) -> None:
        """Prepend a header field (above the Received field, as trace fields go: RFC 7208 §9.1)."""
        if not _FIELD_NAME.match(name):
            raise ValueError(f"not a header field name: {name!r}")
        if any(c in value for c in "\r\n\0"):
            raise ValueError("a header value cannot hold CR, LF or NUL; fold with a list of values instead")
        self.added.append((name, value))

    def remove_header(self, name: str) -> None:
        """Remove every field of this name (or, ending in "*", with this prefix) from the client's header."""
        self.removed.append(name.lower())

    def set_scl(self, level: int) -> None:
        """Stamp the spam confidence level (-1 .. 9), as X-MS-Exchange-Organization-SCL."""
        if not -1 <= int(level) <= 9:
            raise ValueError(f"SCL is -1..9, not {level}")
        self.scl = int(level) if self.scl is None else max(self.scl, int(level))

    def redirect(self, recipient: str, to: str | list[str]) -> None:
        """Deliver what was addressed to C{recipient} to C{to} (one address or several) instead."""
        self.redirects[recipient.lower()] = [to] if isinstance(to, str) else list(to)

    def quarantine(self, reason: str) -> None:
        """Send the message to the quarantine mailbox ([server] quarantine_mailbox) instead."""
        self.quarantined = reason

    def delete(self, reason: str) -> None:
        """Accept and drop the message: the client gets 250, nobody gets the message."""
        self.deleted = reason

    def annotate(self, key: str, value: str) -> None:
        """Keep a note with the message (in its envelope, on disk): routing stages read C{envelope.notes}."""
        self.notes[str(key)] = str(value)

    def replace(self, content: bytes) -> None:
        """Replace the whole message (header section and body, CRLF lines, no dot-stuffing)."""
        self.replacement = bytes(content)

    @property
    def edited(self) -> bool:
        """Do the bytes on disk change?"""
        return bool(self.added or self.removed or self.scl is not None or self.replacement is not None)

    def edit(self, prefix_length: int) -> "MessageEdit":
        """
        This message's header edits and replacement as a value that the
        spool applies to its bytes (our Received field, C{prefix_length}
        octets, then the client's message).
        """
        added = list(self.added)
        if self.scl is not None:
            added.append((SCL_HEADER, str(self.scl)))
        return MessageEdit(tuple(added), tuple(self.removed), self.replacement, prefix_length)


@implementer(IMessageEdit)
@attrs.frozen
class MessageEdit:
    """
    The stages' changes to a message's bytes: fields added above our
    Received field, fields removed from the client's header section, or
    the whole content replaced. Header edits alone leave everything after
    the header section as it is, so the spool can stream a large message
    instead of reading it into memory (L{head_only}).
    """

    added: tuple = ()                 # (name, value), in order
    removed: tuple = ()               # lower-case names; "x-foo-*" for a prefix
    replacement: bytes | None = None
    prefix_length: int = 0            # our Received field, kept as it is

    @property
    def head_only(self) -> bool:
        return self.replacement is None

    def apply(self, data: bytes) -> bytes:
        prefix, content = data[:self.prefix_length], data[self.prefix_length:]
        if self.replacement is not None:
            content = self.replacement
        if self.removed:
            content = remove_fields(content, self.removed)
        top = b"".join(f"{name}: {value}\r\n".encode("utf-8") for name, value in self.added)
        return top + prefix + content


def remove_fields(content: bytes, names: tuple[str, ...]) -> bytes:
    """
    C{content} without the header fields named (folded lines go with their
    field). Only the header section is looked at: it ends at the first
    empty line, and is empty when the message begins with one.
    """
    if content.startswith(b"\r\n"):
        return content                    # no header fields: nothing to remove, the body is not a header
    end = content.find(b"\r\n\r\n")
    header, rest = (content, b"") if end < 0 else (content[:end + 2], content[end + 2:])
    exact = {n for n in names if not n.endswith("*")}
    prefixes = tuple(n[:-1] for n in names if n.endswith("*"))
    kept: list[bytes] = []
    dropping = False
    for line in header.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        name = line.split(b":", 1)[0].strip().decode("latin-1").lower()
        dropping = name in exact or (bool(prefixes) and name.startswith(prefixes))
        if not dropping:
            kept.append(line)
    return b"".join(line + b"\r\n" for line in kept) + rest

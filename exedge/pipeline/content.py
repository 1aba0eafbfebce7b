"""
Built-in stages that look at the message itself: the header firewall,
content restrictions (Exchange 2000's connector restrictions, on receive
and at routing) and the attachment filter (research §1.4, §1.8).

Each reads as little as it can: the header firewall and content
restrictions scan the raw header section with a regular expression
instead of parsing it; only the attachment filter reads the body, and
only when the header says the message could carry an attachment.
"""

from __future__ import annotations

import email.header
import email.message
import email.parser
import email.policy
import email.utils
import fnmatch
import functools
import io
import re
import unicodedata
from email.generator import BytesGenerator

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from exedge.auth.permissions import Right
from exedge.config import values as v

from exedge.interfaces import Refusal
from exedge.routing import reroute

from .offload import StageThreads
from .stage import IStageFactory, Stage, reject

log = Logger()

# -- the header firewall -----------------------------------------------------

# Which fields need which right (ms-Exch-Accept-Headers-*): without it they are removed.
FIREWALL = (
    (Right.AcceptRoutingHeaders, ("received", "resent-*")),
    (Right.AcceptOrganizationHeaders, ("x-ms-exchange-organization-*", "x-exedge-*")),
    (Right.AcceptForestHeaders, ("x-ms-exchange-forest-*",)),
)


def _field_pattern(names) -> re.Pattern:
    alternatives = "|".join(re.escape(n[:-1]) + r"[!-9;-~]*" if n.endswith("*") else re.escape(n) for n in names)
    return re.compile(rb"^(?:" + alternatives.encode() + rb")[ \t]*:", re.I | re.M)


class HeaderFirewall(Stage):
    """
    Exchange's header firewall: a peer may not hand us the fields that our
    own servers trust (X-MS-Exchange-Organization-SCL: -1 would let spam
    skip the content filter) unless it holds the right to set them. Our
    own Received field is added after the client's header and is kept.
    """

    name = "header_firewall"
    anti_spam = False

    def __init__(self):
        self.rules = [(right, names, _field_pattern(names)) for right, names in FIREWALL]

    def on_message(self, session, message):
        for right, names, pattern in self.rules:
            if not session.has_right(right) and pattern.search(message.header_bytes):
                for name in names:
                    message.remove_header(name)
        return None


@implementer(IStageFactory)
class HeaderFirewallFactory:
    name = "header_firewall"
    anti_spam = False
    hooks = ("on_message",)
    options: dict = {}
    defaults: dict = {}

    def build(self, options):
        return HeaderFirewall()


# -- content restrictions ------------------------------------------------------

PRIORITIES = ("High", "Normal", "Low")
_PRIORITY_FIELD = re.compile(rb"^(importance|x-priority|priority)[ \t]*:[ \t]*([^\r\n]*)", re.I | re.M)


def message_priority(header: bytes) -> str:
    """High, Normal or Low, from Importance, X-Priority (1-5) or Priority (RFC 2156) fields."""
    for name, value in _PRIORITY_FIELD.findall(header):
        name, value = name.lower(), value.strip().lower()
        if name == b"importance" and value in (b"high", b"low"):
            return value.decode().capitalize()
        if name == b"x-priority" and value[:1] in (b"1", b"2"):
            return "High"
        if name == b"x-priority" and value[:1] in (b"4", b"5"):
            return "Low"
        if name == b"priority" and value in (b"urgent", b"non-urgent"):
            return "High" if value == b"urgent" else "Low"
    return "Normal"


def _restriction(value):
    """{ allow_system_messages, allowed_priorities, max_message_size } for one connector."""
    if not isinstance(value, dict):
        raise ValueError(f"expected {{ allow_system_messages = ..., allowed_priorities = [...], "
                         f"max_message_size = ... }}, got {value!r}")
    unknown = set(value) - {"allow_system_messages", "allowed_priorities", "max_message_size"}
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}")
    return Restriction(
        allow_system=v.boolean(value.get("allow_system_messages", True)),
        priorities=frozenset(v.list_of(v.choice(*PRIORITIES))(value.get("allowed_priorities", list(PRIORITIES)))),
        max_size=v.parse_size(value["max_message_size"]) if "max_message_size" in value else None)


class Restriction:
    """What one connector carries: system messages or not, which priorities, how large."""

    def __init__(self, allow_system=True, priorities=frozenset(PRIORITIES), max_size=None):
        self.allow_system = allow_system
        self.priorities = priorities
        self.max_size = max_size

    def refuses(self, system: bool, priority: str, size: int) -> str | None:
        """Why this connector may not carry such a message, or None."""
        if system and not self.allow_system:
            return "system messages (delivery reports) are not allowed"
        if priority not in self.priorities:
            return f"messages of {priority.lower()} priority are not allowed"
        if self.max_size is not None and size > self.max_size:
            return f"messages over {self.max_size} bytes are not allowed"
        return None


class ContentRestrictions(Stage):
    """
    Exchange 2000's connector content restrictions. On a receive connector
    (the stage's own options): delivery reports refused at MAIL, a
    priority refused at the end of the header section, a size at the final
    dot. At routing (C{send_connectors}): a message a connector may not
    carry goes to the next candidate connector, or bounces with the reason.
    The priority travels in the envelope (a note) so routing need not read
    the message again.
    """

    name = "content_restrictions"
    anti_spam = False

    def __init__(self, allow_system_messages=True, allowed_priorities=PRIORITIES, max_message_size=None,
                 send_connectors=None):
        self.receive = Restriction(allow_system_messages, frozenset(allowed_priorities), max_message_size)
        self.send = dict(send_connectors or {})

    def on_mail(self, session, sender):
        if not sender and not self.receive.allow_system:
            return reject("System messages (delivery reports) are not accepted on this connector", "5.7.1", 550)
        return None

    def on_headers(self, session, message):
        priority = message_priority(message.header_bytes)
        message.annotate("priority", priority)
        if priority not in self.receive.priorities:
            return reject(f"Messages of {priority.lower()} priority are not accepted on this connector",
                          "5.7.1", 550)
        return None

    def on_message(self, session, message):
        if self.receive.max_size is not None and message.size > self.receive.max_size:
            return reject("Message size exceeds the limit of this connector", "5.3.4", 552)
        return None

    def on_route(self, envelope, recipient, route):
        facts = (envelope.sender == "", envelope.notes.get("priority", "Normal"), envelope.size)

        def refuses(connector):
            rule = self.send.get(connector.name)
            return rule.refuses(*facts) if rule is not None else None

        chosen = reroute(route, refuses)
        if isinstance(chosen, Refusal):
            return reject(chosen.text, chosen.status, 550)
        return None if chosen is route else chosen


@implementer(IStageFactory)
class ContentRestrictionsFactory:
    name = "content_restrictions"
    anti_spam = False
    hooks = ("on_mail", "on_headers", "on_message", "on_route")
    options = {
        "allow_system_messages": v.boolean,
        "allowed_priorities": v.list_of(v.choice(*PRIORITIES)),
        "max_message_size": v.parse_size,
        "send_connectors": lambda value: _connector_table(value),
    }
    defaults = {"allow_system_messages": True, "allowed_priorities": list(PRIORITIES), "max_message_size": None,
                "send_connectors": None}

    def build(self, options, context=None):
        table = options.get("send_connectors") or {}
        config = getattr(context, "config", None)
        if config is not None:
            known = {c.name for c in config.send_connectors}
            unknown = sorted(set(table) - known)
            if unknown:
                raise ValueError(f"send_connectors: no send connector {', '.join(map(repr, unknown))}")
        return ContentRestrictions(**options)


def _connector_table(value):
    if not isinstance(value, dict):
        raise ValueError('expected a table: send_connectors = { "To Partner" = { ... } }')
    out = {}
    for name, rule in value.items():
        try:
            out[name] = _restriction(rule)
        except ValueError as e:
            raise ValueError(f"send_connectors.{name}: {e}") from None
    return out


# -- the attachment filter -------------------------------------------------------

DEFAULT_FILE_NAMES = (
    "*.exe", "*.bat", "*.cmd", "*.com", "*.cpl", "*.hta", "*.js", "*.jse", "*.lnk", "*.msi", "*.msp",
    "*.mst", "*.pif", "*.reg", "*.scr", "*.sct", "*.shb", "*.shs", "*.vb", "*.vbe", "*.vbs", "*.wsc",
    "*.wsf", "*.wsh", "*.ps1", "*.ps1xml", "*.ps2", "*.psc1", "*.msh", "*.xnk",
)
DEFAULT_CONTENT_TYPES = (
    "application/x-msdownload", "message/partial", "text/scriptlet", "application/prg", "application/msaccess",
    "text/javascript", "application/x-javascript", "application/javascript", "x-internet-signup", "application/hta",
)
REMOVED_TEXT = "This attachment was removed."
MAX_NESTING_DEPTH = 100
NESTING_DEPTH_CEILING = 150
_CONTENT_TYPE = re.compile(rb"^content-type[ \t]*:[ \t]*([^;\r\n]+)", re.I | re.M)
_MAYBE_ATTACHMENT = re.compile(rb"^content-type[ \t]*:[ \t]*(multipart/|message/)|name[ \t]*\*?[0-9]*\*?[ \t]*=",
                               re.I | re.M)
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_LAST_LINE_END = re.compile(r"(\r\n|\r|\n)\Z")


class TooDeep(Exception):
    """A part is nested deeper than the filter walks (L{AttachmentFilter.max_nesting_depth})."""


class _Part(email.message.Message):
    """
    A compat32 message part that knows how deep it lies: the top-level
    message is at depth 0, the parts of a multipart and the message inside
    a message/* part one deeper than their parent. The parser attaches
    every part to its parent as soon as it meets the part's header, so the
    first part that is too deep stops the parse there: the parser (which
    recurses once per level) and the generator (about four frames per
    level) never go deeper than the limit, and a 1,000-level message is
    refused after reading the headers of the first levels.
    """

    depth = 0

    def __init__(self, policy=email.policy.compat32, *, limit: int):
        super().__init__(policy)
        self.limit = limit

    def attach(self, payload):
        if self.depth >= self.limit:
            raise TooDeep(self.depth + 1)
        payload.depth = self.depth + 1
        super().attach(payload)


def _file_name(part) -> tuple[str, bool]:
    """
    The part's file name (filename=, else name=), RFC 2231 and encoded
    words decoded, and whether it could be read. The sender names the
    codecs (RFC 2231 charsets, encoded words) and writes the continuations,
    so decoding can fail in any way a codec or the parameter parser can
    (CharsetError, LookupError, UnicodeError, TypeError for
    C{name*=...; name*0=...}, ValueError): such a name, and one that decodes
    to control characters or lone surrogates (a NUL or a CR LF in a name is
    not a name a client shows as we see it), cannot be read. 8-bit bytes
    in a name are read as the header parser reads them (each one U+FFFD),
    which keeps the ASCII in it, and so its extension, as it was.
    """
    shown = ""
    try:
        raw = part.get_filename() or part.get_param("name") or ""
        if isinstance(raw, tuple):                              # RFC 2231 (charset, language, value)
            raw = email.utils.collapse_rfc2231_value(raw)
        shown = _FOLD.sub("", str(raw))                         # a quoted name may be folded
        name = str(email.header.make_header(email.header.decode_header(shown)))
    except Exception:
        return shown, False
    return name, not any(unicodedata.category(c) in ("Cc", "Cs") for c in name)


def _shown(text: str) -> str:
    """
    C{text} fit for the log, a header parameter and the notice: without
    control characters, and its last 200 characters (the extension is at
    the end).
    """
    text = "".join("\ufffd" if unicodedata.category(c) in ("Cc", "Cs") else c for c in text)
    return text if len(text) <= 200 else "\u2026" + text[-199:]


class AttachmentFilter(Stage):
    """
    Exchange's attachment filter, by file name (wildcards), extension and
    MIME type, in every part of nested multiparts and attached messages.
    One action for all entries: Strip (the part becomes a short text part
    saying it was removed), Reject (554 5.6.1) or SilentDelete.

    Every message it reads is hostile input: a message nested deeper than
    C{max_nesting_depth} is refused (554 5.6.0) before the parser recurses
    that deep; a file name that cannot be read counts as a blocked one; and
    content the email package still cannot take apart is refused with the
    same permanent 554 5.6.0 and one line in the log, so that it is not
    answered 451 and sent again and again.
    """

    name = "attachment_filter"
    anti_spam = False
    needs_body = True

    def __init__(self, file_names=DEFAULT_FILE_NAMES, content_types=DEFAULT_CONTENT_TYPES, action="Strip",
                 rejection_response="Message rejected due to unacceptable attachments",
                 admin_message=REMOVED_TEXT, max_nesting_depth=MAX_NESTING_DEPTH, run=None):
        """
        C{run(f, *args)}: where the parse runs, a Deferred of its result (the
        server gives the stage's own threads, L{StageThreads}); None: here.
        """
        self.file_names = tuple(n.lower() for n in file_names)
        self.content_types = tuple(t.lower() for t in content_types)
        self.action = action
        self.rejection_response = rejection_response
        self.admin_message = admin_message
        self.max_nesting_depth = max_nesting_depth
        self._parser = email.parser.BytesParser(_class=functools.partial(_Part, limit=max_nesting_depth),
                                                policy=email.policy.compat32)
        self._run = run or defer.maybeDeferred

    def _blocked_type(self, header: bytes) -> bool:
        """Is the top-level Content-Type (read from the raw header) a blocked one?"""
        found = _CONTENT_TYPE.search(header)
        ctype = found.group(1).strip().lower().decode("latin-1") if found else "text/plain"
        return any(fnmatch.fnmatchcase(ctype, t) for t in self.content_types)

    def _blocked(self, part) -> str | None:
        """What about this part is blocked (for the log), or None."""
        ctype = part.get_content_type()
        if any(fnmatch.fnmatchcase(ctype, t) for t in self.content_types):
            return _shown(ctype)
        if not self.file_names:
            return None
        name, readable = _file_name(part)
        if not readable:
            return _shown(f"unreadable file name {name}".rstrip())
        if name and any(fnmatch.fnmatchcase(name.lower(), n) for n in self.file_names):
            return _shown(name)
        return None

    async def on_message(self, session, message):
        if not _MAYBE_ATTACHMENT.search(message.header_bytes) and not self._blocked_type(message.header_bytes):
            return None                   # one part, no file name, an allowed type: nothing to read
        content = await message.body()    # a spool that cannot be read is the runner's 451: try again later
        try:
            found, replacement = await self._run(self._examine, content)
        except TooDeep:
            return reject(f"Message refused: MIME parts nested deeper than {self.max_nesting_depth} levels",
                          "5.6.0", 554)
        except Exception as e:
            # content the email package cannot take apart (or put back
            # together): a 451 would bring the same bytes back on every retry
            log.warn("attachment_filter: refused a message from {peer} whose MIME structure cannot be "
                     "read: {error}", peer=session.peer, error=f"{type(e).__name__}: {e}")
            return reject("Message refused: its MIME structure cannot be read", "5.6.0", 554)
        if not found:
            return None
        session.notes["attachments_blocked"] = found
        if self.action == "Reject":
            return reject(self.rejection_response, "5.6.1", 554)
        if self.action == "SilentDelete":
            message.delete(f"attachment filter: {', '.join(found)}")
            return None
        message.replace(replacement)
        return None

    def _examine(self, content: bytes) -> tuple[list[str], bytes | None]:
        """
        What is blocked in C{content}, and the message with it stripped
        (Strip only). A pure function of the bytes, so it can run on a
        thread: the parse costs time that grows with lines times depth.
        """
        parsed = self._parser.parsebytes(content)
        found: list[str] = []
        self._strip(parsed, found)
        return found, (_serialize(parsed) if found and self.action == "Strip" else None)

    def _strip(self, part, found: list) -> None:
        """Replace C{part}'s blocked descendants (or itself) in place; C{found} gets what was blocked."""
        what = self._blocked(part)
        if what is not None:
            found.append(what)
            self._neutralize(part, what)
        elif part.is_multipart():
            for child in part.get_payload():
                self._strip(child, found)

    def _neutralize(self, part, what: str) -> None:
        """
        The part becomes a text notice, in place: a top-level part keeps
        its From, To and Subject, only its content fields are replaced.
        """
        for field in ("Content-Type", "Content-Transfer-Encoding", "Content-Disposition",
                      "Content-Description", "Content-ID", "Content-Location"):
            del part[field]
        text = f"{self.admin_message}\r\nOriginal file: {what}\r\n"
        part.set_payload(text, "us-ascii" if text.isascii() else "utf-8")     # readable when it can be
        part.add_header("Content-Disposition", "attachment", filename=f"{what}.txt"[-200:])


class _Generator(BytesGenerator):
    """
    BytesGenerator that writes back what it did not change as it was read:

      - header fields as they came, folds included: compat32 folds every
        ASCII field again, which alters fields of the parts we keep (a
        multipart/signed part's signature covers them) and raises
        HeaderParseError on a value holding a character that str.splitlines
        takes for a line end (form feed, vertical tab, U+0085);
      - a multipart whose boundary never appears (the parser keeps its body
        as one string) as the bytes it came from. BytesGenerator does this
        for text parts; for such a multipart it asks get_payload(), which
        turns 8-bit bytes into U+FFFD or the part's charset, and then
        cannot write them (UnicodeEncodeError).
    """

    def _write_headers(self, msg):
        for name, value in msg.raw_items():
            self.write(f"{name}: {value}{self._NL}")
        self.write(self._NL)

    def _handle_multipart(self, msg):
        if msg.is_multipart() or msg._payload is None:
            super()._handle_multipart(msg)
            return
        payload = msg._payload       # as BytesGenerator._handle_text: the bytes read, surrogate-escaped
        if msg.epilogue is None:
            # inside another multipart: the line end before the next
            # boundary belongs to the boundary (RFC 2046), which the parser
            # takes off a text part's payload and off a multipart's epilogue
            # (leaving None), but not off this payload; the enclosing
            # multipart writes it again with its boundary
            payload = _LAST_LINE_END.sub("", payload, count=1)
        self.write(payload)


def _serialize(message) -> bytes:
    out = io.BytesIO()
    _Generator(out, mangle_from_=False, policy=email.policy.compat32.clone(linesep="\r\n")).flatten(message)
    return out.getvalue()


def _nesting_depth(value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= NESTING_DEPTH_CEILING:
        raise ValueError(f"max_nesting_depth is a number from 1 to {NESTING_DEPTH_CEILING}, got {value!r}")
    return value


@implementer(IStageFactory)
class AttachmentFilterFactory:
    name = "attachment_filter"
    anti_spam = False
    needs_body = True
    hooks = ("on_message",)
    options = {
        "file_names": v.list_of(lambda x: str(x).strip()),
        "content_types": v.list_of(lambda x: str(x).strip()),
        "action": v.choice("Strip", "Reject", "SilentDelete"),
        "rejection_response": str,
        "admin_message": str,
        "max_nesting_depth": _nesting_depth,
    }
    defaults = {"file_names": list(DEFAULT_FILE_NAMES), "content_types": list(DEFAULT_CONTENT_TYPES), "action": "Strip",
                "rejection_response": "Message rejected due to unacceptable attachments",
                "admin_message": REMOVED_TEXT, "max_nesting_depth": MAX_NESTING_DEPTH}

    def build(self, options, context=None):
        return AttachmentFilter(**options, run=StageThreads("exedge-attachments", 2, getattr(context, "clock", None)))


FACTORIES = (HeaderFirewallFactory(), ContentRestrictionsFactory(), AttachmentFilterFactory())

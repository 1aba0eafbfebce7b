"""
RFC 5321 paths and ESMTP parameters, parsed by code that knows the limits.

Written here because C{twisted.mail.smtp.Address} qualifies bare local
parts with our own host name, rejects address literals and strips source
routes silently (research §1.1); an edge server must see all three to refuse
relay tricks.
"""

from __future__ import annotations

import ipaddress
import re

import attrs

from exedge.config.values import is_domain

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = re.compile(rf"^{_ATEXT}+(?:\.{_ATEXT}+)*$")
_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$")
_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?$")


class SMTPError(Exception):
    """A refusal with its reply code, enhanced status code and text."""

    def __init__(self, code: int, status: str, text: str):
        super().__init__(f"{code} {status} {text}")
        self.code = code
        self.status = status
        self.text = text


@attrs.frozen
class Mailbox:
    local: str          # as written, quotes included
    domain: str         # lower-cased; "[1.2.3.4]" for a literal
    route: tuple = ()   # source route hops, if the client sent one
    quoted: bool = False

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    def routing_trick(self) -> str | None:
        """
        Why this address could be used to relay through a domain we accept,
        or None: Postfix's "untrusted routing" plus what Exchange refuses.
        """
        if self.route:
            return "source route"
        if self.is_literal:
            return "address literal"
        bare = self.local.strip('"') if self.quoted else self.local
        for char, name in (("@", "@ in the local part"), ("%", "percent hack"), ("!", "bang path")):
            if char in bare:
                return name
        return None


def _parse_domain(text: str, what: str) -> str:
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError(f"bad address literal in {what}")
        inner = text[1:-1]
        try:
            if inner.lower().startswith("ipv6:"):
                ipaddress.IPv6Address(inner[5:])
            else:
                ipaddress.IPv4Address(inner)
        except ValueError:
            raise ValueError(f"bad address literal in {what}") from None
        return text.lower()
    if text.endswith("."):
        raise ValueError(f"trailing dot in the domain of {what}")
    if not is_domain(text):
        raise ValueError(f"bad domain in {what}")
    return text.lower()


def _split_path(text: str) -> tuple[str, str]:
    """Split "<path> params" at the ">" that closes the path (quotes respected)."""
    if not text.startswith("<"):
        raise ValueError("the address must be in angle brackets")
    i = 1
    in_quote = False
    while i < len(text):
        c = text[i]
        if in_quote:
            if c == "\\":
                i += 1
            elif c == '"':
                in_quote = False
        elif c == '"':
            in_quote = True
        elif c == ">":
            return text[1:i], text[i + 1:]
        i += 1
    raise ValueError("no closing angle bracket")


def parse_path(text: str, what: str, *, allow_null: bool) -> tuple[Mailbox | None, str]:
    """
    Parse "<path> params" from a MAIL or RCPT line. Returns the mailbox (None
    for "<>") and the parameter text. Raises L{ValueError} on bad syntax and
    L{SMTPError} for addresses that are well formed but not acceptable.
    """
    text = text.lstrip(" ")
    inner, params = _split_path(text)
    if params and not params.startswith(" "):
        raise ValueError("parameters must follow the address after a space")
    if inner == "":
        if not allow_null:
            raise ValueError(f"empty {what}")
        return None, params
    if len(inner) > 256:
        raise SMTPError(501, "5.1.3" if what == "recipient" else "5.1.7", f"Path too long in {what} address")
    if any(ord(c) > 127 for c in inner):
        raise SMTPError(553, "5.6.7", "Non-ASCII addresses are not permitted (no SMTPUTF8)")
    route: tuple = ()
    if inner.startswith("@"):
        head, sep, inner = inner.partition(":")
        if not sep:
            raise ValueError(f"bad source route in {what}")
        hops = []
        for hop in head.split(","):
            if not hop.startswith("@"):
                raise ValueError(f"bad source route in {what}")
            hops.append(_parse_domain(hop[1:], what))
        route = tuple(hops)
    quoted = inner.startswith('"')
    if quoted:
        m = re.match(r'^"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*)"@(.*)$', inner)
        if not m:
            raise ValueError(f"bad quoted local part in {what}")
        local, domain = f'"{m.group(1)}"', m.group(2)
    else:
        local, at, domain = inner.rpartition("@")
        if not at:
            raise ValueError(f"no domain in {what} address")
        if not _DOT_STRING.match(local):
            raise ValueError(f"bad local part in {what} address")
    if len(local) > 64:
        raise SMTPError(501, "5.1.3" if what == "recipient" else "5.1.7", f"Local part too long in {what} address")
    return Mailbox(local, _parse_domain(domain, what), route, quoted), params


def parse_params(text: str) -> dict[str, str | None]:
    """ESMTP parameters: KEYWORD[=value], upper-cased keys, no duplicates."""
    params: dict[str, str | None] = {}
    for word in text.split(" "):
        if not word:
            continue
        m = _PARAM.match(word)
        if not m:
            raise ValueError(f"bad parameter {word[:40]!r}")
        key = m.group(1).upper()
        if key in params:
            raise ValueError(f"duplicate parameter {key}")
        params[key] = m.group(2)
    return params


def check_xtext(value: str, limit: int) -> str:
    """RFC 3461 xtext, length-limited."""
    if len(value) > limit or not _XTEXT.match(value):
        raise ValueError("not valid xtext")
    return value


def check_orcpt(value: str) -> str:
    kind, sep, rest = value.partition(";")
    if not sep or not kind or not re.match(r"^[A-Za-z0-9-]+$", kind) or not rest:
        raise ValueError("ORCPT must be addr-type;xtext")
    check_xtext(rest, 500)
    return f"{kind.lower()};{rest}"


def check_notify(value: str) -> tuple[str, ...]:
    items = tuple(v.upper() for v in value.split(","))
    if "NEVER" in items and len(items) > 1:
        raise ValueError("NOTIFY=NEVER cannot be combined")
    if not items or any(v not in ("NEVER", "SUCCESS", "FAILURE", "DELAY") for v in items) \
            or len(set(items)) != len(items):
        raise ValueError("NOTIFY takes NEVER or SUCCESS,FAILURE,DELAY")
    return items


def is_helo_argument(text: str) -> bool:
    """A domain or an address literal, as RFC 5321 requires after EHLO/HELO."""
    if text.startswith("["):
        try:
            _parse_domain(text, "greeting")
            return True
        except ValueError:
            return False
    return is_domain(text.rstrip("."))

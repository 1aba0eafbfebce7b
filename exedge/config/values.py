"""
Parsers for the value spellings an Exchange admin already knows.

Every parser takes the raw TOML value and returns the canonical Python value
or raises L{ValueError} with a message meant for the admin; the loader adds
the file, key and line.
"""

from __future__ import annotations

import ipaddress
import math
import re
from decimal import Decimal
import urllib.parse
from typing import Any, Callable, Iterable

import attrs

_SIZE_UNITS = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*(?:\(.*\))?\s*$", re.I)


def parse_size(value: object, *, allow_unlimited: bool = False) -> int | None:
    """
    A byte count: an integer, or "36MB", "512KB", "35 MB", "10GB" (binary
    units, as Exchange uses them), or Exchange's own echo
    "36 MB (37,748,736 bytes)". "unlimited" gives C{None} where allowed.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as \"36MB\", got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative ({value})")
        return value
    if isinstance(value, str):
        if value.strip().lower() == "unlimited":
            if allow_unlimited:
                return None
            raise ValueError("\"unlimited\" is not allowed here")
        m = _SIZE_RE.match(value)
        if m and len(m.group(1)) <= 30:
            unit = m.group(2).upper()
            if unit and not unit.endswith("B"):
                unit += "B"
            return int(Decimal(m.group(1)) * _SIZE_UNITS[unit])
    raise ValueError(
        f"invalid size {value!r} (expected bytes or e.g. \"36MB\", \"512KB\")"
    )


_SPAN_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SPAN_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.I)
# Exchange's TimeSpan: [d.]hh:mm:ss
_EXCHANGE_SPAN_RE = re.compile(r"^\s*(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2})\s*$")


def parse_timespan(value: object) -> float:
    """
    A duration in seconds: a number, "30s", "10m", "4h", "2d", or Exchange's
    "00:05:00" / "2.00:00:00" (days.hours:minutes:seconds).
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as \"5m\", got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"a duration must be a finite number of seconds, not {value}")
        return float(value)
    if isinstance(value, str):
        m = _SPAN_RE.match(value)
        if m:
            return float(m.group(1)) * _SPAN_UNITS[m.group(2).lower() or "s"]
        m = _EXCHANGE_SPAN_RE.match(value)
        if m:
            days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
            if minutes > 59 or seconds > 59:
                raise ValueError(f"invalid time span {value!r}")
            return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)
    raise ValueError(
        f"invalid duration {value!r} (expected seconds, \"30s\", \"10m\", "
        f"\"4h\", \"2d\" or \"hh:mm:ss\")"
    )


def parse_choice(value: object, choices: Iterable[str]) -> str:
    """
    One of Exchange's enumerated spellings, matched case-insensitively and
    returned in its canonical spelling.
    """
    choices = list(choices)
    if isinstance(value, str):
        for choice in choices:
            if choice.lower() == value.strip().lower():
                return choice
    raise ValueError(f"invalid value {value!r} (expected one of {', '.join(choices)})")


@attrs.frozen
class IPRange:
    """
    An inclusive range of addresses of one IP version: what Exchange accepts
    as RemoteIPRanges (a single address, "a-b", or CIDR).
    """

    first: ipaddress.IPv4Address | ipaddress.IPv6Address
    last: ipaddress.IPv4Address | ipaddress.IPv6Address
    text: str = attrs.field(eq=False)

    @property
    def size(self) -> int:
        """How many addresses the range covers: smaller is more specific."""
        return int(self.last) - int(self.first) + 1

    def __contains__(self, address) -> bool:
        return (
            address.version == self.first.version
            and self.first <= address <= self.last
        )

    def __str__(self) -> str:
        return self.text


def parse_ip_range(value: object) -> IPRange:
    if not isinstance(value, str):
        raise ValueError(f"expected an address, range or CIDR string, got {value!r}")
    text = value.strip()
    try:
        if "/" in text:
            net = ipaddress.ip_network(text, strict=False)
            return IPRange(net[0], net[-1], text)
        if "-" in text:
            a, b = (part.strip() for part in text.split("-", 1))
            first, last = ipaddress.ip_address(a), ipaddress.ip_address(b)
            if first.version != last.version:
                raise ValueError("mixes IPv4 and IPv6")
            if first > last:
                raise ValueError("starts after it ends")
            return IPRange(first, last, text)
        addr = ipaddress.ip_address(text)
        return IPRange(addr, addr, text)
    except ValueError as e:
        raise ValueError(f"invalid remote IP range {value!r}: {e}") from None


@attrs.frozen
class Binding:
    """A local address and port to listen on ("127.0.0.1:25", "[::1]:25")."""

    host: str
    port: int

    @property
    def is_wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::")

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.host).version

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_binding(value: object) -> Binding:
    if not isinstance(value, str):
        raise ValueError(f"expected \"ip:port\", got {value!r}")
    text = value.strip()
    m = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d+)$", text) or re.match(
        r"^([0-9.]+):(\d+)$", text
    )
    if not m:
        raise ValueError(f"invalid binding {value!r} (expected \"ip:port\" or \"[ipv6]:port\")")
    try:
        host = str(ipaddress.ip_address(m.group(1)))
    except ValueError:
        raise ValueError(f"invalid binding {value!r}: bad address") from None
    port = int(m.group(2))
    if not 0 < port < 65536:
        raise ValueError(f"invalid binding {value!r}: port out of range")
    return Binding(host, port)


_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_DOMAIN_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


def is_domain(text: str) -> bool:
    """A syntactically valid DNS name (underscores tolerated, as mail does)."""
    return len(text) <= 255 and bool(_DOMAIN_RE.match(text))


def parse_domain(value: object, *, wildcard: bool = False) -> str:
    """A lower-cased domain; "*.example.com" too when C{wildcard}."""
    if not isinstance(value, str):
        raise ValueError(f"expected a domain name, got {value!r}")
    text = value.strip().lower().rstrip(".")
    bare = text[2:] if wildcard and text.startswith("*.") else text
    if not is_domain(bare):
        raise ValueError(f"invalid domain name {value!r}")
    return text


def parse_fqdn(value: object) -> str:
    if not isinstance(value, str) or not is_domain(value.strip().rstrip(".")):
        raise ValueError(f"invalid FQDN {value!r}")
    return value.strip().rstrip(".")


# -- parsers composed from the ones above ------------------------------------
# The config models declare their keys with these, and pipeline stages
# (built-in and drop-in) declare their options with them too: one spelling
# of "a list", "a boolean", "a mailbox" everywhere an admin writes one.

def list_of(parse: Callable[[Any], Any]) -> Callable[[Any], tuple]:
    def parse_list(value: Any) -> tuple:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return tuple(parse(item) for item in value)

    return parse_list


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "$true", "false", "$false"):
        return value.strip().lower().lstrip("$") == "true"
    raise ValueError(f"expected true or false, got {value!r}")


def integer(low: int, high: int | None = None, *, unlimited: bool = False):
    def parse_int(value: Any) -> int | None:
        if unlimited and isinstance(value, str) and value.strip().lower() == "unlimited":
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {value!r}")
        if value < low or (high is not None and value > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            raise ValueError(f"{value} is out of range ({bound})")
        return value

    return parse_int


def timespan(high: float):
    """A duration of at most C{high} seconds."""
    def parse(value: Any) -> float:
        seconds = parse_timespan(value)
        if seconds > high:
            raise ValueError(f"{value!r} is longer than the maximum of {int(high)} seconds")
        return seconds

    return parse


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def name(value: Any) -> str:
    value = text(value).strip()
    if not value or len(value) > 64:
        raise ValueError("a name must be 1 to 64 characters")
    return value


def mailbox(value: Any) -> str:
    value = text(value).strip()
    local, at, domain = value.rpartition("@")
    if not at or not local or any(c in value for c in " <>\r\n"):
        raise ValueError(f"expected user@domain, got {value!r}")
    return f"{local}@{parse_domain(domain)}"


def choice(*choices: str):
    return lambda value: parse_choice(value, choices)


def host_port(default_port: int):
    def parse(value: Any) -> tuple[str, int]:
        if not isinstance(value, str):
            raise ValueError(f"expected \"ip\" or \"ip:port\", got {value!r}")
        host, _, port = value.strip().rpartition(":") if value.count(":") == 1 else (value.strip(), "", "")
        host = host or value.strip()
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise ValueError(f"invalid server address {value!r} (expected an IP address)") from None
        return host.strip("[]"), int(port) if port else default_port

    return parse


def address(value: Any) -> str:
    """A lower-cased user@domain, as the agents' lists hold addresses (matched case-insensitively)."""
    if not isinstance(value, str) or value.count("@") != 1:
        raise ValueError(f"expected user@domain, got {value!r}")
    return value.strip().lower()


def network(value: Any):
    """An address or CIDR range, as an C{ipaddress} network."""
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise ValueError(f"expected an address or CIDR range, got {value!r}") from None


def readable_file(value: Any) -> str:
    """The path of a file that can be read now (a stage's list file, say)."""
    path = str(value)
    try:
        with open(path, encoding="utf-8"):
            pass
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    return path


def parse_ldap_url(url: str) -> tuple[str, int, bool]:
    """("host", port, use_ssl) from ldaps://host[:636] or ldap://host[:389]."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
        raise ValueError(f"expected ldaps://host[:port] or ldap://host[:port], got {url!r}")
    secure = parts.scheme == "ldaps"
    return parts.hostname, parts.port or (636 if secure else 389), secure


def ldap_url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected \"ldaps://host:port\", got {value!r}")
    parse_ldap_url(value.strip())
    return value.strip()


_ETRN_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_ETRN_NODE = re.compile(rf"^{_ETRN_LABEL}(?:\.{_ETRN_LABEL})*$")
_ETRN_QUEUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_etrn_node(argument: str):
    """
    ("domain" | "subdomains" | "queue", name) for an ETRN argument (RFC
    1985: "domain", "@domain" for it and its subdomains, "#queue"), or
    None. Host-name syntax only: ASCII letters, digits and hyphens in
    dot-separated labels, at most 253 characters; domains are lower-cased.
    Both the server (a client's argument) and the config (an ETRN client's
    domains) read nodes this way.
    """
    kind, name = "domain", argument
    if argument.startswith("@"):
        kind, name = "subdomains", argument[1:]
    elif argument.startswith("#"):
        return ("queue", argument[1:]) if _ETRN_QUEUE.fullmatch(argument[1:]) else None
    if name.endswith(".") and not name.endswith(".."):
        name = name[:-1]
    if not name or len(name) > 253 or not name.isascii() or not _ETRN_NODE.fullmatch(name):
        return None
    return kind, name.lower()


def etrn_node(value: Any) -> str:
    """A node to ask for with ETRN: "branch.example.com", or "@example.com" for it and its subdomains."""
    node = parse_etrn_node(value) if isinstance(value, str) else None
    if node is None or node[0] == "queue":
        raise ValueError(f'expected a domain such as "branch.example.com" or "@example.com", got {value!r}')
    return ("@" if node[0] == "subdomains" else "") + node[1]


def sender_pattern(value: Any) -> str:
    """
    Who a send connector's delivery restrictions name: "user@domain",
    "*@domain" (anyone at the domain), "*.domain" (anyone at the domain or
    its subdomains), or "<>" (the null sender: reports and notices).
    """
    if not isinstance(value, str):
        raise ValueError(f'expected "user@domain", "*@domain", "*.domain" or "<>", got {value!r}')
    text = value.strip().lower()
    if text == "<>":
        return text
    if text.startswith("*."):
        return "*." + parse_domain(text[2:])
    local, at, domain = text.rpartition("@")
    if not at or not local or any(c in local for c in " <>\"") or (local != "*" and "*" in local):
        raise ValueError(f'expected "user@domain", "*@domain", "*.domain" or "<>", got {value!r}')
    return f"{local}@{parse_domain(domain)}"


def sender_matches(patterns, sender: str) -> bool:
    """Does C{sender} ("" for the null sender) match one of these L{sender_pattern}s?"""
    if not sender:
        return "<>" in patterns
    sender = sender.lower()
    domain = sender.rpartition("@")[2]
    for pattern in patterns:
        if pattern == sender or pattern == "*@" + domain:
            return True
        if pattern.startswith("*.") and (domain == pattern[2:] or domain.endswith(pattern[1:])):
            return True
    return False

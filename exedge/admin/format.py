"""
Records as PowerShell shows them: a table by default, C{| Format-List} as
C{Name : value} blocks, C{| Format-Table} as columns, and JSON for scripts.

A value is shown as the Exchange Management Shell shows it: lists in
braces (C{{SMTP:*;1}}), C{True}/C{False}, nothing for C{$null}, and other
objects by their C{str()} (sizes and time spans carry their own).
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any


class FormatError(ValueError):
    pass


def show(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (list, tuple)):
        return "{" + ", ".join(show(v) for v in value) + "}"
    text = str(value)
    if text.isprintable():
        return text
    # a sender, a subject or a remote server's error must not drive the terminal
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def select(records: list[dict], wanted: tuple, aliases: dict | None = None) -> list[str]:
    """
    The property names C{wanted} asks for, in its order and in the records'
    spelling: case-insensitive, C{*} wildcards, C{aliases} (written name ->
    property). A name no record has is an error that lists the valid ones.
    """
    known: list[str] = []
    for record in records:
        for key in record:
            if key not in known:
                known.append(key)
    if not wanted:
        return known
    by_lower = {k.lower(): k for k in known}
    lowered_aliases = {a.lower(): p for a, p in (aliases or {}).items()}
    out: list[str] = []
    for name in wanted:
        low = name.lower()
        if any(c in name for c in "*?["):
            hits = [k for k in known if fnmatch.fnmatchcase(k.lower(), low)]
        elif low in by_lower:
            hits = [by_lower[low]]
        elif low in lowered_aliases and lowered_aliases[low].lower() in by_lower:
            hits = [by_lower[lowered_aliases[low].lower()]]
        elif not records:
            hits = []
        else:
            raise FormatError(f"no property {name!r}; the properties are: {', '.join(known)}")
        out.extend(h for h in hits if h not in out)
    return out


def format_list(records: list[dict], names: list[str]) -> str:
    width = max((len(n) for n in names), default=0)
    blocks = []
    for record in records:
        blocks.append("\n".join(f"{n.ljust(width)} : {show(record.get(n))}".rstrip() for n in names))
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def format_table(records: list[dict], names: list[str]) -> str:
    if not records:
        return ""
    rows = [[show(r.get(n)) for n in names] for r in records]
    widths = [max([len(n)] + [len(row[i]) for row in rows]) for i, n in enumerate(names)]

    def line(cells):
        return " ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [line(names), line(["-" * len(n) for n in names])]
    out.extend(line(row) for row in rows)
    return "\n".join(out) + "\n"


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def render(records: list[dict], *, kind: str | None = None, properties: tuple = (), view: tuple = (),
           as_json: bool = False, aliases: dict | None = None) -> str:
    """The text to print. C{kind} is "List", "Table" or None (the default view)."""
    if kind is None and not properties and view and not as_json:
        names = select(records, view)
    else:
        names = select(records, properties, aliases)
    if as_json:
        return json.dumps([{n: _plain(r.get(n)) for n in names} for r in records], indent=2) + "\n"
    if kind == "List" or (kind is None and not view and len(names) > 4):
        return format_list(records, names)
    return format_table(records, names)

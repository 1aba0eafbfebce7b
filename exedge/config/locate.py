"""
Find the line of a key in a TOML file.

C{tomllib} parses but forgets positions, and an admin needs "line 14" to
fix a typo. This is a small, deliberately forgiving scanner over the same
text: it follows table headers (C{[server]}, C{[[receive_connectors]]}),
array-of-tables indices and C{key = value} lines, skipping the insides of
multi-line values and strings. It never decides what is valid (tomllib does);
if it cannot place a key it answers the nearest enclosing table's line.
"""

from __future__ import annotations

import re

_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY_RE = re.compile(r'^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\'))*)\s*=')


def _split_key(text: str) -> tuple[str, ...]:
    parts = re.findall(r'"[^"]*"|\'[^\']*\'|[A-Za-z0-9_-]+', text)
    return tuple(p.strip("\"'") for p in parts)


def _depth_change(text: str, state: dict) -> int:
    """
    Bracket depth change over C{text}, ignoring brackets inside strings and
    after comments; C{state["ml"]} carries an open multi-line string.
    """
    depth = 0
    i = 0
    n = len(text)
    while i < n:
        ml = state.get("ml")
        if ml:
            end = text.find(ml, i)
            if end < 0:
                return depth
            i = end + 3
            state["ml"] = None
            continue
        c = text[i]
        if c == "#":
            break
        if text.startswith('"""', i) or text.startswith("'''", i):
            state["ml"] = text[i : i + 3]
            i += 3
            continue
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if (c == '"' and text[j] == "\\") else 1
            i = j + 1
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        i += 1
    return depth


def index_lines(text: str) -> dict[tuple, int]:
    """
    Map key paths to 1-based line numbers. Paths look like
    C{("server",)}, C{("server", "fqdn")},
    C{("receive_connectors", 1, "bindings")}.
    """
    lines: dict[tuple, int] = {}
    counters: dict[tuple, int] = {}
    table: tuple = ()
    depth = 0
    state: dict = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if depth > 0 or state.get("ml"):
            depth += _depth_change(line, state)
            continue
        m = _HEADER_RE.match(line)
        if m:
            name = _split_key(m.group(2))
            if m.group(1) == "[[":
                index = counters.get(name, -1) + 1
                counters[name] = index
                table = name + (index,)
                lines.setdefault(name, lineno)   # the array itself: its first header
            else:
                # a sub-table of the latest array element: [a.b] after [[a]]
                table = ()
                for part in name:
                    table += (part,)
                    if table in counters:
                        table += (counters[table],)
            lines.setdefault(table, lineno)
            continue
        m = _KEY_RE.match(line)
        if m:
            lines.setdefault(table + _split_key(m.group(1)), lineno)
            depth += _depth_change(line[m.end():], state)
    return lines


def find_line(index: dict[tuple, int], path: tuple) -> int | None:
    """The line of C{path}, else of its closest ancestor that has one."""
    path = tuple(path)
    while path:
        if path in index:
            return index[path]
        path = path[:-1]
    return None

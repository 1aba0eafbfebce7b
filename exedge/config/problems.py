"""
What a configuration can be wrong with: one L{Problem} per mistake (file,
line, key, message) and the L{ConfigError} that lists them.

Its own module so that the models (which report problems found after
loading, such as a file they name) and the loader (which reports the rest)
both import it without importing each other.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Problem:
    source: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration has problems; C{problems} lists each one."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def key_text(path: tuple) -> str:
    """("receive_connectors", 0, "name") -> "receive_connectors[0].name", as an admin reads it."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out

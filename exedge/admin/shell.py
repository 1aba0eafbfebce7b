"""
Running lines: C{exedge ps "<line>" ...}, a script on standard input, and
C{exedge <Cmdlet-Name> ...} straight from the shell.

A script is lines run in order in one L{Session} (so C{$cred =
Get-Credential} on one line is there for the next); blank lines and C{#}
comments are skipped; the first failing line stops it, reported with its
number. Each line's output is rendered by L{exedge.admin.format}.
Everything a line can get wrong is reported as one message on standard
error with exit status 1, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterable, TextIO

from . import ps
from .cmdlets import CmdletError, Context, Registry, bind, load_builtin
from .format import FormatError, render
from exedge.manage.client import reload_after_edit


def execute(line: ps.Line, ctx: Context, registry: Registry) -> None:
    item = registry.get(line.command.name)
    args = bind(item, line.command, ctx.session)
    result = item.func(ctx, args)
    if line.assign is not None:
        ctx.session.set(line.assign, result)
        return
    if result is None:
        return
    if hasattr(result, "as_record"):
        result = [result.as_record()]
    fmt = line.format
    text = render(list(result), kind=fmt.kind if fmt else None, properties=fmt.properties if fmt else (),
                  view=item.view, as_json=ctx.json, aliases=item.property_aliases)
    ctx.stdout.write(text)


def run_one(parse, where: str, ctx: Context, registry: Registry) -> int:
    """C{parse()} gives the L{ps.Line} (or None); 0, or 1 with the reason on stderr."""
    try:
        line = parse()
        if line is not None:
            execute(line, ctx, registry)
    except (ps.ParseError, CmdletError, FormatError) as e:
        print(f"exedge: {where}{e}", file=ctx.stderr)
        return 1
    except OSError as e:
        print(f"exedge: {where}{e.filename or ''}: {e.strerror}", file=ctx.stderr)
        return 1
    return 0


class _Numbered:
    """Standard input that counts the lines read from it (by the script and by Get-Credential)."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self.count = 0

    def readline(self) -> str:
        line = self._stream.readline()
        if line:
            self.count += 1
        return line

    def isatty(self) -> bool:
        return self._stream.isatty()


def run_script(lines: Iterable[str] | None, ctx: Context, registry: Registry | None = None) -> int:
    """
    C{lines} in order, or (C{None}) the lines of C{ctx.stdin}, read one at a
    time so that Get-Credential reads the two lines after its own.
    """
    registry = registry or load_builtin()
    if lines is not None:
        for number, text in enumerate(lines, 1):
            where = f"line {number}: " if len(lines) > 1 else ""
            if run_one(lambda: ps.parse_line(text), where, ctx, registry):
                return 1
        return 0
    stdin = _Numbered(ctx.stdin)
    ctx.stdin = stdin
    for _ in range(1_000_000):          # a script's length, bounded
        text = stdin.readline()
        if not text:
            return 0
        if run_one(lambda: ps.parse_line(text.rstrip("\r\n")), f"line {stdin.count}: ", ctx, registry):
            return 1
    print("exedge: the script is too long", file=ctx.stderr)
    return 1


def run_argv(argv: list[str], ctx: Context, registry: Registry | None = None) -> int:
    """C{exedge New-SendConnector -Name ...}: argv already split and unquoted by the shell."""
    registry = registry or load_builtin()
    return run_one(lambda: ps.parse_tokens(ps.tokens_from_argv(argv)), "", ctx, registry)


# -- the command line ---------------------------------------------------------------

DEFAULT_CONFIG = "etc/exedge.toml"


def ps_command(args) -> int:
    """C{exedge ps [LINE ...]}: the lines given, or a script on standard input."""
    ctx = Context(config_path=args.config, json=args.json, on_config_changed=reload_after_edit)
    return run_script(args.lines or None, ctx)


def add_ps_parser(sub) -> None:
    p = sub.add_parser(
        "ps", help="run Exchange Management Shell lines: New-SendConnector ..., Get-ReceiveConnector | fl ...",
        description="Run PowerShell lines of the configuration cmdlets against --config. Give each line as one "
                    "argument in single quotes (exedge ps '$c = Get-Credential' 'New-SendConnector ... "
                    "-AuthenticationCredential $c'), or none to read a script from standard input. "
                    "Variables last for the lines of one run.")
    p.add_argument("lines", nargs="*", metavar="LINE", help="a line of PowerShell (quote it for the shell)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"the configuration file (default {DEFAULT_CONFIG})")
    p.add_argument("--json", action="store_true", help="output records as JSON")
    p.set_defaults(func=ps_command)


def direct(argv: list[str]) -> int | None:
    """
    C{exedge [--config FILE] [--json] <Cmdlet-Name> ...}, or None when
    argv does not name a cmdlet (then it is another sub-command).
    """
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--config", default=DEFAULT_CONFIG)
    options.add_argument("--json", action="store_true")
    head = []
    i = 0
    while i < len(argv) and argv[i].startswith("--"):
        head.append(argv[i])
        if argv[i] == "--config" and i + 1 < len(argv):
            head.append(argv[i + 1])
            i += 1
        i += 1
    if i >= len(argv) or "-" not in argv[i].strip("-"):
        return None
    registry = load_builtin()
    if registry.find(argv[i]) is None:
        return None
    rest, tail = [], []
    j = i + 1
    while j < len(argv):                  # --config and --json may also follow the cmdlet's parameters
        if argv[j] == "--json" or argv[j].startswith("--config="):
            tail.append(argv[j])
        elif argv[j] == "--config" and j + 1 < len(argv):
            tail.extend(argv[j:j + 2])
            j += 1
        else:
            rest.append(argv[j])
        j += 1
    known, unknown = options.parse_known_args(head + tail)
    if unknown:
        print(f"exedge: unknown option(s) {' '.join(unknown)} (valid: --config FILE, --json)", file=sys.stderr)
        return 2
    ctx = Context(config_path=known.config, json=known.json, on_config_changed=reload_after_edit)
    return run_argv([argv[i]] + rest, ctx, registry)

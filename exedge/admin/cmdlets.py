"""
The cmdlet registry: what C{exedge ps} and C{exedge <Cmdlet-Name>} can run.

A cmdlet is a function registered with its parameters::

    from exedge.admin.cmdlets import Param, cmdlet, CmdletError

    @cmdlet("Get-Queue", Param("Identity", position=0), Param("Filter"),
            view=("Identity", "DeliveryType", "Status", "MessageCount", "NextHopDomain"))
    def get_queue(ctx, args):
        ...
        return [{"Identity": ..., "Status": ...}, ...]

It is called as C{func(ctx, args)}: C{ctx} is the L{Context} (the
configuration path, the L{Session} with its variables, the streams,
C{on_config_changed}, C{warn}); C{args} maps each parameter the line gave,
by its declared name, to its value after the parameter's C{parse}. It
returns records (dicts whose keys are the properties, Exchange's names),
one object with C{as_record()}, or C{None}; the formatter
(L{exedge.admin.format}) renders them as a table (the C{view} columns), as
C{| Format-List} / C{| Format-Table} ask, or as JSON with C{--json}. It
raises L{CmdletError} for a failure the admin should read (exit status 1).

Values reach C{parse} as the line wrote them: a L{exedge.admin.ps.Word}
(a C{str} that knows whether it was quoted), C{True}/C{False}/C{None} for
C{$true}/C{$false}/C{$null}, a tuple for a comma list, or whatever a
variable holds. Parameter names are matched as PowerShell matches them:
case-insensitively, a unique prefix being enough.

Modules of cmdlets are listed in L{BUILTIN_MODULES} and imported by
L{load_builtin}, so a new family of cmdlets is one module and one line.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, TextIO

import attrs

from . import ps

BUILTIN_MODULES = [
    "exedge.admin.config_cmdlets",
    "exedge.admin.queue_cmdlets",
    "exedge.admin.tracking_cmdlets",
]


class CmdletError(Exception):
    """A failure to show the admin as it is (no traceback); the line's exit status is 1."""


def _identity(value: Any) -> Any:
    return value


def result_size(value: Any):
    """-ResultSize as Exchange takes it: a number from 1, or Unlimited (None)."""
    if str(value).lower() == "unlimited":
        return None
    try:
        number = int(str(value))
    except ValueError:
        raise ValueError(f"a number or Unlimited, not {value!s}") from None
    if number < 1:
        raise ValueError("at least 1")
    return number


@attrs.frozen
class Param:
    name: str                                   # Exchange's spelling, e.g. "AddressSpaces"
    parse: Callable[[Any], Any] = _identity     # raises ValueError with a message for a bad value
    switch: bool = False                        # -Custom: present or not (-Custom:$false also works)
    mandatory: bool = False
    position: int | None = None                 # 0: the first value without a parameter name (-Identity)
    aliases: tuple = ()                         # other spellings accepted (not prefix-matched)
    help: str = ""


@attrs.frozen
class Cmdlet:
    name: str
    params: tuple
    func: Callable
    view: tuple = ()        # the default table's columns (empty: every property)
    help: str = ""
    property_aliases: dict = attrs.field(factory=dict)   # other spellings Format-List accepts


def _default_on_config_changed(path: str) -> str:
    return "restart or reload the server to apply the change"


@attrs.define
class Session:
    """What lives across the lines of one script: the variables ($cred = Get-Credential)."""

    variables: dict = attrs.Factory(dict)

    def get(self, name: str) -> Any:
        key = name.lower()
        if key not in self.variables:
            known = ", ".join(f"${n}" for n in sorted(self.variables)) or "none"
            raise CmdletError(f"variable ${name} is not set (set in this script: {known})")
        return self.variables[key]

    def set(self, name: str, value: Any) -> None:
        self.variables[name.lower()] = value


@attrs.define
class Context:
    """
    What a cmdlet is handed. C{on_config_changed(path)} is called after a
    configuration file was rewritten and returns a message to print; by
    default it only says to restart or reload, and the management client
    supplies one that asks the running server to reload.
    """

    config_path: str = "etc/exedge.toml"
    session: Session = attrs.Factory(Session)
    stdin: TextIO = attrs.Factory(lambda: sys.stdin)
    stdout: TextIO = attrs.Factory(lambda: sys.stdout)
    stderr: TextIO = attrs.Factory(lambda: sys.stderr)
    on_config_changed: Callable[[str], str] = _default_on_config_changed
    json: bool = False
    warnings: list = attrs.Factory(list)

    def warn(self, text: str) -> None:
        """Something the line asked for that was left out: said plainly, and not a failure."""
        self.warnings.append(text)
        print(f"warning: {text}", file=self.stderr)

    def say(self, text: str) -> None:
        """A note for the admin that is not output (kept off stdout so that --json stays JSON)."""
        print(text, file=self.stderr)


class Registry:
    def __init__(self):
        self._cmdlets: dict[str, Cmdlet] = {}

    def add(self, item: Cmdlet) -> None:
        key = item.name.lower()
        if key in self._cmdlets:
            raise ValueError(f"cmdlet {item.name} is already registered")
        self._cmdlets[key] = item

    def find(self, name: str) -> Cmdlet | None:
        return self._cmdlets.get(name.lower())

    def get(self, name: str) -> Cmdlet:
        found = self.find(name)
        if found is None:
            raise CmdletError(f"unknown cmdlet {name!r}; known cmdlets: {', '.join(self.names())}")
        return found

    def names(self) -> list[str]:
        return sorted(c.name for c in self._cmdlets.values())


REGISTRY = Registry()


def cmdlet(name: str, *params: Param, view: tuple = (), help: str = "", property_aliases: dict | None = None,
           registry: Registry = REGISTRY):
    """Register the decorated C{func(ctx, args)} as cmdlet C{name} (see the module's docstring)."""
    def register(func: Callable) -> Callable:
        registry.add(Cmdlet(name, tuple(params), func, tuple(view), help or (func.__doc__ or "").strip(),
                            dict(property_aliases or {})))
        return func

    return register


def load_builtin() -> Registry:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return REGISTRY


# -- binding a parsed command to a cmdlet's parameters --------------------------

def _resolve(item: Cmdlet, written: str) -> Param:
    low = written.lower()
    for p in item.params:
        if p.name.lower() == low or low in (a.lower() for a in p.aliases):
            return p
    matches = [p for p in item.params if p.name.lower().startswith(low)]
    valid = ", ".join(f"-{p.name}" for p in item.params)
    if not matches:
        raise CmdletError(f"{item.name}: unknown parameter -{written}; valid parameters: {valid}")
    if len(matches) > 1:
        raise CmdletError(f"{item.name}: -{written} is ambiguous: "
                          f"{', '.join('-' + p.name for p in matches)}")
    return matches[0]


def _substitute(value: Any, session: Session) -> Any:
    if isinstance(value, ps.Variable):
        return session.get(value.name)
    if isinstance(value, tuple):
        return tuple(_substitute(v, session) for v in value)
    return value


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value)
    return repr(str(value)) if isinstance(value, str) else str(value)


def bind(item: Cmdlet, command: ps.Command, session: Session) -> dict:
    """The cmdlet's arguments, by declared parameter name, each parsed; CmdletError names what is wrong."""
    args: dict[str, Any] = {}
    positional = sorted((p for p in item.params if p.position is not None), key=lambda p: p.position)
    elements = list(command.elements)
    i = 0
    while i < len(elements):
        element = elements[i]
        i += 1
        if isinstance(element, ps.Parameter):
            param = _resolve(item, element.name)
            if param.switch:
                value = element.value if element.bound else True
            elif element.bound:
                value = element.value
            elif i < len(elements) and not isinstance(elements[i], ps.Parameter):
                value = elements[i]
                i += 1
            else:
                raise CmdletError(f"{item.name}: -{param.name} needs a value")
        else:
            free = [p for p in positional if p.name not in args]
            if not free:
                raise CmdletError(f"{item.name}: unexpected value {_show(element)} "
                                  f"(a value needs a -Parameter before it)")
            param, value = free[0], element
        if param.name in args:
            raise CmdletError(f"{item.name}: -{param.name} is given twice")
        value = _substitute(value, session)
        if param.switch and not isinstance(value, bool):
            raise CmdletError(f"{item.name}: -{param.name} is a switch ($true or $false after ':')")
        try:
            args[param.name] = param.parse(value)
        except ValueError as e:
            raise CmdletError(f"{item.name}: -{param.name}: {e}") from None
    missing = [p.name for p in item.params if p.mandatory and p.name not in args]
    if missing:
        raise CmdletError(f"{item.name}: missing mandatory parameter(s) {', '.join('-' + m for m in missing)}")
    return args

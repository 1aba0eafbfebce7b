"""
A PowerShell command line, as far as the admins' cmdlets need it.

What an Exchange admin types into the Exchange Management Shell::

    $cred = Get-Credential
    New-SendConnector -Name "To Edge" -AddressSpaces * -DNSRoutingEnabled $false -SmartHosts a,b -AuthenticationCredential $cred
    Set-ReceiveConnector "Default internal Receive connector Edge01" -Name "From Internet" -Bindings 10.1.1.1:25
    Get-SendConnector | Format-List Name,Usage,AddressSpaces

is read here into a L{Line}: an optional C{$variable =}, one L{Command}
(its name and, in order, its L{Parameter}s and values) and an optional
L{Format} after a pipe. Which parameter takes a value and which is a
switch is the cmdlet's business (L{exedge.admin.cmdlets} binds them).

Why the tokenizer is written here and not C{shlex}: PowerShell's rules are
not the POSIX shell's. C{shlex} treats C{$} as plain text, takes backslash
as an escape (it is a plain character in Exchange identities such as
C{EDGE01\\From Internet}), knows nothing of C{''} doubling inside single
quotes, of commas that make lists, of C{-Name:value}, or of the characters
that start code in PowerShell. And the point here is as much what is
I{refused} as what is read: everything PowerShell would evaluate
(C{$(...)} subexpressions, C{;} and C{&}, script blocks, redirections,
backtick escapes, variables inside double quotes) is an error that names
the character and its column, never something run, so a line is data from
start to end.
"""

from __future__ import annotations

import re

import attrs


class ParseError(ValueError):
    """The line is not one this shell reads; the message says where and why."""


class Word(str):
    """
    A value as written: C{quoted} says whether any part of it was in quotes,
    so that C{-Port 25} can be a number and C{-Name "25"} stays a string.
    """

    quoted: bool

    def __new__(cls, text: str, quoted: bool = False):
        self = super().__new__(cls, text)
        self.quoted = quoted
        return self

    def __repr__(self) -> str:
        return f"Word({str(self)!r}{', quoted=True' if self.quoted else ''})"


@attrs.frozen
class Variable:
    """C{$name}: looked up in the session when the command is bound."""

    name: str


@attrs.frozen
class Parameter:
    """C{-Name}; C{-Name:value} carries its value (the only way to give a switch one)."""

    name: str
    value: object = None
    bound: bool = False


@attrs.frozen
class Command:
    name: str
    elements: tuple = ()     # Parameter, or a value: Word, Variable, True/False/None, or a tuple of them


@attrs.frozen
class Format:
    """C{| Format-List a,b} (kind "List") or C{| Format-Table a,b} (kind "Table")."""

    kind: str
    properties: tuple = ()


@attrs.frozen
class Line:
    command: Command
    assign: str | None = None
    format: Format | None = None


# -- tokens ---------------------------------------------------------------------

@attrs.frozen
class Token:
    kind: str            # WORD, VAR, PARAM, COMMA, PIPE, ASSIGN
    text: str
    column: int = 0
    quoted: bool = False
    bound: bool = False  # PARAM written -Name:


# What PowerShell would evaluate or treat as syntax we do not take: refused
# wherever it appears outside single quotes, with the reason shown.
_REFUSED = {
    ";": "';' (one command per line)",
    "&": "'&' (call and background operators are not supported)",
    "(": "'(' (subexpressions are not supported)",
    ")": "')' (subexpressions are not supported)",
    "{": "'{' (script blocks are not supported)",
    "}": "'}' (script blocks are not supported)",
    "<": "'<' (a placeholder such as <Name> must be replaced by a value)",
    ">": "'>' (redirection is not supported)",
    "`": "'`' (backtick escapes are not supported; quote the value instead)",
}
_DASHES = "\u2013\u2014\u2015"                 # PowerShell takes these for '-', and documents carry them
_SINGLE = "'\u2018\u2019\u201a\u201b"
_DOUBLE = '"\u201c\u201d\u201e'
_DELIMITERS = " \t,|"
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PARAMETER = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def _refuse(char: str, column: int) -> ParseError:
    return ParseError(f"column {column}: {_REFUSED[char]}")


def tokenize(text: str) -> list[Token]:
    """The tokens of one line; a C{#} at the start of a token ends it (a comment)."""
    for i, c in enumerate(text):
        if (ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F:
            raise ParseError(f"column {i + 1}: control character {c!r} in the line")
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        col = i + 1
        if c in " \t":
            i += 1
        elif c == "#":
            break
        elif c == ",":
            tokens.append(Token("COMMA", c, col))
            i += 1
        elif c == "|":
            tokens.append(Token("PIPE", c, col))
            i += 1
        elif c == "=":
            tokens.append(Token("ASSIGN", c, col))
            i += 1
        elif c in _REFUSED:
            raise _refuse(c, col)
        elif c == "@":
            raise ParseError(f"column {col}: '@' starts an array, hash table or splatting, which are not supported")
        elif c == "$":
            if i + 1 < n and text[i + 1] in "({":
                raise ParseError(f"column {col}: '{text[i:i + 2]}' (subexpressions are not supported)")
            m = _VARIABLE.match(text, i + 1)
            if not m:
                raise ParseError(f"column {col}: '$' must start a variable name such as $cred")
            i = m.end()
            if i < n and text[i] not in _DELIMITERS and text[i] != "=":
                raise ParseError(f"column {i + 1}: {text[i]!r} after ${m.group()} "
                                 "(member access and expressions are not supported)")
            tokens.append(Token("VAR", m.group(), col))
        elif (c == "-" or c in _DASHES) and i + 1 < n and _PARAMETER.match(text, i + 1):
            m = _PARAMETER.match(text, i + 1)
            i = m.end()
            bound = i < n and text[i] == ":"
            if bound:
                i += 1
            elif i < n and text[i] not in _DELIMITERS:
                raise ParseError(f"column {i + 1}: {text[i]!r} after -{m.group()} "
                                 "(a parameter name is letters and digits; quote values that start with '-')")
            tokens.append(Token("PARAM", m.group(), col, bound=bound))
        else:
            word, i, quoted = _word(text, i)
            tokens.append(Token("WORD", word, col, quoted=quoted))
    return tokens


def _word(text: str, i: int) -> tuple[str, int, bool]:
    """A bare word, quoted strings, or both run together (as PowerShell joins them)."""
    out: list[str] = []
    quoted = False
    n = len(text)
    while i < n and text[i] not in _DELIMITERS:
        c = text[i]
        if c in _SINGLE:
            quoted = True
            i = _single(text, i, out)
        elif c in _DOUBLE:
            quoted = True
            i = _double(text, i, out)
        elif c in _REFUSED:
            raise _refuse(c, i + 1)
        elif c == "$":
            raise ParseError(f"column {i + 1}: '$' inside a value (variables are whole values: -X $cred; "
                             "quote a literal '$' with single quotes)")
        elif c == "=":
            raise ParseError(f"column {i + 1}: '=' inside a value (quote it)")
        else:
            out.append(c)
            i += 1
    return "".join(out), i, quoted


def _single(text: str, i: int, out: list[str]) -> int:
    """'...': literal; '' inside is one quote."""
    start = i
    i += 1
    while i < len(text):
        if text[i] in _SINGLE:
            if i + 1 < len(text) and text[i + 1] in _SINGLE:
                out.append("'")
                i += 2
                continue
            return i + 1
        out.append(text[i])
        i += 1
    raise ParseError(f"column {start + 1}: unbalanced single quote (the string is never closed)")


def _double(text: str, i: int, out: list[str]) -> int:
    """"...": "" inside is one quote; $ and ` (which PowerShell would expand) are refused."""
    start = i
    i += 1
    while i < len(text):
        c = text[i]
        if c in _DOUBLE:
            if i + 1 < len(text) and text[i + 1] in _DOUBLE:
                out.append('"')
                i += 2
                continue
            return i + 1
        if c == "$":
            raise ParseError(f"column {i + 1}: '$' inside double quotes would be expanded by PowerShell; "
                             "exedge does not expand it: use single quotes for a literal '$'")
        if c == "`":
            raise _refuse(c, i + 1)
        out.append(c)
        i += 1
    raise ParseError(f"column {start + 1}: unbalanced double quote (the string is never closed)")


def tokens_from_argv(argv: list[str]) -> list[Token]:
    """
    Tokens from arguments the shell has already split and unquoted
    (C{exedge New-SendConnector -Name "To Internet" ...}): C{-Name} and
    C{-Name:value} are parameters, a lone C{|} is a pipe, commas make
    lists, and C{$true}, C{$false}, C{$null} (single-quoted for the shell)
    are themselves. The values are never evaluated.
    """
    tokens: list[Token] = []
    for index, arg in enumerate(argv, 1):
        col = index
        m = re.fullmatch(r"[-\u2013\u2014\u2015]([A-Za-z][A-Za-z0-9_]*)(:(.*))?", arg, re.S)
        if m:
            tokens.append(Token("PARAM", m.group(1), col, bound=m.group(2) is not None))
            if m.group(3):
                tokens.extend(_argv_value(m.group(3), col))
            continue
        if arg == "|":
            tokens.append(Token("PIPE", arg, col))
            continue
        tokens.extend(_argv_value(arg, col))
    return tokens


def _argv_value(arg: str, col: int) -> list[Token]:
    for c in arg:
        if ord(c) < 0x20 or ord(c) == 0x7F:
            raise ParseError(f"argument {col}: control character {c!r}")
    out: list[Token] = []
    for j, part in enumerate(arg.split(",")):
        if j:
            out.append(Token("COMMA", ",", col))
        if not part:
            continue
        if part.startswith("$"):
            if part.lower() not in ("$true", "$false", "$null"):
                raise ParseError(f"argument {col}: {part!r}: variables live in a script; use exedge ps")
            out.append(Token("VAR", part[1:], col))
        else:
            out.append(Token("WORD", part, col))
    return out


# -- the line -------------------------------------------------------------------

_CMDLET_NAME = re.compile(r"[A-Za-z]+-[A-Za-z][A-Za-z0-9]*")
FORMATTERS = {"format-list": "List", "fl": "List", "format-table": "Table", "ft": "Table"}


def parse_line(text: str) -> Line | None:
    """One line of PowerShell; C{None} for a blank line or a comment."""
    tokens = tokenize(text)
    return parse_tokens(tokens) if tokens else None


def parse_tokens(tokens: list[Token]) -> Line:
    assign = None
    if len(tokens) >= 2 and tokens[0].kind == "VAR" and tokens[1].kind == "ASSIGN":
        assign = tokens[0].text
        if assign.lower() in ("true", "false", "null"):
            raise ParseError(f"${assign} is a constant and cannot be assigned")
        tokens = tokens[2:]
        if not tokens:
            raise ParseError(f"nothing after ${assign} =")
    for t in tokens:
        if t.kind == "ASSIGN":
            raise ParseError(f"column {t.column}: '=' only in \"$variable = Cmdlet ...\"")
    segments: list[list[Token]] = [[]]
    for t in tokens:
        if t.kind == "PIPE":
            segments.append([])
        else:
            segments[-1].append(t)
    if len(segments) > 2:
        raise ParseError("only one pipe is supported: Cmdlet ... | Format-List or | Format-Table")
    command = _command(segments[0])
    fmt = _format(segments[1]) if len(segments) == 2 else None
    if fmt is not None and assign is not None:
        raise ParseError("a formatted result cannot be assigned to a variable")
    return Line(command, assign, fmt)


def _command(tokens: list[Token]) -> Command:
    if not tokens:
        raise ParseError("a pipe needs a command before it")
    head = tokens[0]
    if head.kind != "WORD" or head.quoted or not _CMDLET_NAME.fullmatch(head.text):
        raise ParseError(f"expected a cmdlet name such as Get-SendConnector, got {head.text!r}")
    elements: list = []
    rest = tokens[1:]
    i = 0
    while i < len(rest):
        t = rest[i]
        if t.kind == "PARAM":
            if t.bound:
                if i + 1 >= len(rest) or rest[i + 1].kind == "PARAM":
                    raise ParseError(f"-{t.text}: needs a value after ':'")
                value, i = _value(rest, i + 1)
                elements.append(Parameter(t.text, value, True))
            else:
                elements.append(Parameter(t.text))
                i += 1
        else:
            value, i = _value(rest, i)
            elements.append(value)
    return Command(head.text, tuple(elements))


def _value(tokens: list[Token], i: int):
    """A value, or values joined by commas (a list)."""
    items = [_scalar(tokens[i])]
    i += 1
    while i < len(tokens) and tokens[i].kind == "COMMA":
        if i + 1 >= len(tokens) or tokens[i + 1].kind not in ("WORD", "VAR"):
            raise ParseError(f"column {tokens[i].column}: a comma must be followed by a value")
        items.append(_scalar(tokens[i + 1]))
        i += 2
    return (items[0] if len(items) == 1 else tuple(items)), i


def _scalar(t: Token):
    if t.kind == "VAR":
        constant = {"true": True, "false": False, "null": None}
        return constant[t.text.lower()] if t.text.lower() in constant else Variable(t.text)
    if t.kind == "WORD":
        return Word(t.text, t.quoted)
    raise ParseError(f"column {t.column}: unexpected {t.text!r}")


def _format(tokens: list[Token]) -> Format:
    if not tokens or tokens[0].kind != "WORD" or tokens[0].text.lower() not in FORMATTERS:
        got = tokens[0].text if tokens else "nothing"
        raise ParseError(f"after '|' only Format-List (fl) or Format-Table (ft) is supported, got {got!r}")
    kind = FORMATTERS[tokens[0].text.lower()]
    names: list[str] = []
    rest = tokens[1:]
    i = 0
    while i < len(rest):
        t = rest[i]
        if t.kind == "PARAM":
            if not "property".startswith(t.text.lower()):
                raise ParseError(f"Format-{kind}: unknown parameter -{t.text} (valid: -Property)")
            i += 1
            continue
        value, i = _value(rest, i)
        for item in value if isinstance(value, tuple) else (value,):
            if not isinstance(item, Word):
                raise ParseError(f"Format-{kind}: property names are words, not {item!r}")
            names.append(str(item))
    return Format(kind, tuple(names))

"""
The configuration written back as TOML, for the admin's two questions:
what can I set, and to what (C{exedge check-config --defaults}, one
pasteable document), and what does this file change (C{exedge
check-config -n}, Postfix's C{postconf -n}).

Values go out through tomlkit, so strings, arrays and inline tables are
quoted and escaped as TOML requires. A default is spelt the way an admin
writes it ("36MB", "5m") only when the key's own parser reads that
spelling back to the same value: what is printed is always something the
loader accepts and that means the default. The non-default view parses
each value the file sets with its key's parser and compares it with the
default, so "36MB" and 37748736 are the same setting, and prints the
value as the file wrote it.

Pipeline stages declare their options' parsers (C{options}) and defaults
(C{defaults}, TOML values) on their factory; the caller passes the
factories in (name -> factory), so this room imports no other.
"""

from __future__ import annotations

import datetime
import zoneinfo
from typing import Any, Callable, Iterable, Mapping

import attrs
import tomlkit

from . import models as m

_NONE = object()        # no spelling / no default to compare with

_SIZE_UNITS = (("TB", 1024**4), ("GB", 1024**3), ("MB", 1024**2), ("KB", 1024))
_SPAN_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))

# the key that names an entry of a list section: receive_connectors["From Internet"]
_IDENTITY = {"receive_connectors": "name", "send_connectors": "name", "etrn_clients": "name",
             "accepted_domains": "domain_name", "pipeline": "stage"}


def toml_value(value: Any) -> str:
    """A plain TOML value (as tomllib returns them) written as TOML text: tables inline."""
    return _item(value).as_string()


def _item(value: Any):
    if isinstance(value, Mapping):
        table = tomlkit.inline_table()
        for key, inner in value.items():
            table.append(key, _item(inner))
        return table
    if isinstance(value, (list, tuple)):
        array = tomlkit.array()
        array.extend(_item(inner) for inner in value)
        return array
    return tomlkit.item(value)


def _plain(value: Any) -> Any:
    """A parsed value back to the TOML value it came from, before choosing among spellings."""
    if isinstance(value, (str, bool, int, float, datetime.datetime, datetime.date)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(inner) for inner in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(inner) for k, inner in value.items()}
    if isinstance(value, zoneinfo.ZoneInfo):
        return value.key
    text = getattr(value, "text", None)      # IPRange, AddressSpace, Schedule keep what was written
    return text if isinstance(text, str) else str(value)


def _candidates(value: Any) -> Iterable[Any]:
    """The spellings of a parsed value, the admin's first."""
    if value is None:
        yield "unlimited"       # the one spelling of "no value" a parser may accept
    elif isinstance(value, bool):
        yield value
    elif isinstance(value, int):
        for unit, size in _SIZE_UNITS:
            if value and value % size == 0:
                yield f"{value // size}{unit}"
                break
        yield value
    elif isinstance(value, float):
        if value.is_integer() and value > 0:
            for unit, size in _SPAN_UNITS:
                if value % size == 0:
                    yield f"{int(value) // size}{unit}"
                    break
            yield int(value)
        yield value
    else:
        yield _plain(value)


def spell(value: Any, parse: Callable[[Any], Any]) -> Any:
    """
    The TOML value an admin would write for the parsed C{value}: the first
    spelling that C{parse} reads back as C{value}; C{_NONE} when none does.
    """
    for candidate in _candidates(value):
        try:
            if parse(candidate) == value:
                return candidate
        except (ValueError, TypeError):
            continue
    return _NONE


def _comment(text: str) -> list[str]:
    return [f"# {line}" for line in text.splitlines() if line.strip()]


def _key_lines(f: attrs.Attribute, usage: str) -> list[str]:
    """The doc comment and the line of one model key, with its default for C{usage}."""
    meta = f.metadata
    lines = _comment(meta.get("doc", ""))
    default = f.default
    if meta.get("required"):
        return lines + [f"# {f.name} =  (required)"]
    if isinstance(default, attrs.Factory):
        return lines + [f"# {f.name} =  (computed at start-up)"]
    if meta.get("per_usage"):
        by_usage = []
        for other in m.USAGES:
            value = default(other)
            spelt = _NONE if value is m._REQUIRED else spell(value, meta["parse"])
            shown = "required" if value is m._REQUIRED else "not set" if spelt is _NONE else toml_value(spelt)
            by_usage.append(f"{other}: {shown}")
        lines.append(f"# default by usage: {'; '.join(by_usage)}")
        default = default(usage)
        if default is m._REQUIRED:
            return lines + [f"# {f.name} =  (required with usage {usage})"]
    spelt = spell(default, meta["parse"])
    if spelt is _NONE:          # None, or a default no spelling reaches: say so rather than print a wrong value
        return lines + [f"# {f.name} =  (not set)" if default in (None, "") else f"# {f.name} =  (default {default!r})"]
    return lines + [f"{f.name} = {toml_value(spelt)}"]


def _model_lines(model: type) -> list[str]:
    usage = "Custom"
    out = []
    for f in attrs.fields(model):
        if f.name == "options":
            continue
        out += _key_lines(f, usage)
        if f.name == "usage":
            usage = f.default
    return out


def _stage_lines(name: str, factory) -> list[str]:
    """A [[pipeline]] table for one stage: the common keys, then its options with their defaults."""
    out = ["[[pipeline]]", f"stage = {toml_value(name)}"]
    for f in attrs.fields(m.PipelineEntry):
        if f.name in ("stage", "options"):
            continue
        if f.name == "enabled":
            out += _comment(f.metadata["doc"]) + [
                "# (the default is true; printed false so that pasting this table changes nothing)",
                "enabled = false"]
            continue
        out += _key_lines(f, "Custom")
    declared = getattr(factory, "defaults", None) or {}
    if factory.options:
        out.append(f"# the {name} stage's options")
    for option in sorted(factory.options):
        if option not in declared:
            out.append(f"# {option} =  (the stage declares no default)")
        elif declared[option] is None:
            out.append(f"# {option} =  (not set)")
        else:
            out.append(f"{option} = {toml_value(declared[option])}")
    return out


def defaults_document(stages: Mapping[str, Any] | None = None) -> str:
    """
    Every section and key with its default and doc, as TOML that loads.
    Keys without a default are printed commented out: C{# key =  (required)}
    for those a table must set (uncomment them and give a value), C{(not
    set)} for optional ones, C{(computed at start-up)} for the server's FQDN.
    """
    out = _comment(
        "exedge configuration: every key with its default (exedge check-config --defaults).\n"
        "Lines '# key =  (required)' must be uncommented and given a value in each table you keep;\n"
        "'(not set)' keys are optional. A [[...]] table is one entry of a list: repeat it for more.")
    for section, (model, is_list) in m.SECTIONS.items():
        if section == "pipeline":
            continue
        out += ["", f"[[{section}]]" if is_list else f"[{section}]"]
        out += _model_lines(model)
    out += ["", "# [[pipeline]]: one table per stage that runs, lowest priority first; these are the stages found"]
    for name in sorted(stages or {}):
        out += [""] + _stage_lines(name, stages[name])
    return "\n".join(out) + "\n"


def _default_for(f: attrs.Attribute, usage: str) -> Any:
    default = f.default
    if f.metadata.get("required") or isinstance(default, attrs.Factory):
        return _NONE
    if f.metadata.get("per_usage"):
        default = default(usage)
        return _NONE if default is m._REQUIRED else default
    return default


def _differs(parse: Callable[[Any], Any], raw: Any, default: Any) -> bool:
    if default is _NONE:
        return True
    try:
        return parse(raw) != default
    except (ValueError, TypeError):
        return True


def _labels(section: str, items: list) -> list[str]:
    """section["name"] where the identifying key is unique in the section, else section[index]."""
    key = _IDENTITY.get(section)
    names = [item.get(key) if isinstance(item, dict) else None for item in items]
    folded = [n.lower() for n in names if isinstance(n, str)]
    return [f"{section}[{toml_value(n)}]" if isinstance(n, str) and folded.count(n.lower()) == 1
            else f"{section}[{i}]" for i, n in enumerate(names)]


def _table_differences(label: str, model: type, table: dict, stages: Mapping[str, Any]) -> list[str]:
    fields = {f.name: f for f in attrs.fields(model)}
    usage = "Custom"
    if "usage" in fields and "usage" in table:
        try:
            usage = fields["usage"].metadata["parse"](table["usage"])
        except ValueError:
            pass
    factory = stages.get(table.get("stage")) if model is m.PipelineEntry else None
    out = []
    for key, raw in table.items():
        f = fields.get(key)
        if f is not None and key != "options":
            changed = _differs(f.metadata["parse"], raw, _default_for(f, usage))
        elif factory is not None and key in factory.options:
            declared = (getattr(factory, "defaults", None) or {}).get(key)
            parse = factory.options[key]
            try:
                default = _NONE if declared is None else parse(declared)
            except (ValueError, TypeError):
                default = _NONE
            changed = _differs(parse, raw, default)
        else:
            changed = True
        if changed:
            out.append(f"{label}.{key} = {toml_value(raw)}")
    return out


def non_defaults(raw: dict, stages: Mapping[str, Any] | None = None) -> list[str]:
    """
    C{section.key = value} for each key of the TOML document C{raw} (as
    tomllib read it; the caller has loaded it first) whose value is not
    the default, sorted; an entry of a list section is named by its name.
    """
    stages = stages or {}
    out = []
    for section, (model, is_list) in m.SECTIONS.items():
        value = raw.get(section)
        if value is None:
            continue
        if not is_list:
            out += _table_differences(section, model, value, stages)
            continue
        for label, item in zip(_labels(section, value), value):
            out += _table_differences(label, model, item, stages)
    return sorted(out)

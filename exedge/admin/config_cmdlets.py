"""
The configuration cmdlets: New-, Set-, Get- and Remove- for SendConnector,
ReceiveConnector and AcceptedDomain, and Get-Credential.

Their parameters are derived from the attrs models of
L{exedge.config.models}: each key's CamelCase (C{max_message_size} ->
C{-MaxMessageSize}) or, where Exchange spells it otherwise, Exchange's
spelling (L{EXCHANGE_NAMES}: C{-DNSRoutingEnabled}, C{-AuthMechanism} for
C{auth_mechanisms}, C{-RemoteIPRanges}, ...). A new key in a model is a new
parameter without a line here. Values are written in exedge's spellings
(the loader's canonical choice names, lists as arrays) and the loader
judges them: New-/Set- refuse what C{exedge check-config} would refuse,
with its problems.

What Exchange has and a single edge server does not (C{-SourceTransportServers},
the C{ExchangeServer} and C{Integrated} auth mechanisms, Active Directory
parameters) is left out with a warning that says why; the rest of the line
is applied.
"""

from __future__ import annotations

import getpass
from typing import Any

import attrs
import tomlkit

from exedge.config import ConfigError, load
from exedge.config import models as m

from .cmdlets import CmdletError, Context, Param, cmdlet
from .edit import ConfigFile
from .ps import Word

# Exchange's spelling where it is not the CamelCase of exedge's key.
EXCHANGE_NAMES = {
    "dns_routing_enabled": "DNSRoutingEnabled",
    "auth_mechanisms": "AuthMechanism",             # singular in Exchange
    "remote_ip_ranges": "RemoteIPRanges",
    "ignore_start_tls": "IgnoreSTARTTLS",
    "tls_send_domain_secure_list": "TLSSendDomainSecureList",
    "tls_receive_domain_secure_list": "TLSReceiveDomainSecureList",
}

# Values of multi-valued keys that Exchange has and exedge does not: left
# out of what is written, with the reason.
DROPPED_VALUES = {
    "auth_mechanisms": {
        "exchangeserver": "ExchangeServer is Exchange Server authentication (Kerberos between Exchange "
                          "servers), which exedge does not have; its peers can use Tls or BasicAuth",
        "integrated": "Integrated is NTLM/Kerberos (Windows integrated authentication), which exedge does not have",
    },
}

# Parameters Exchange takes that mean nothing on a single edge server:
# accepted, left out, and said so.
_AD = "exedge has no Active Directory: its configuration is the TOML file"
IGNORED = {
    "SendConnector": {
        "SourceTransportServers": "exedge is a single server: it is the one source transport server of its "
                                  "connectors (Get-SendConnector shows its fqdn)",
        "IsScopedConnector": "exedge has no Active Directory sites: a connector serves this server",
        "DomainController": _AD,
        "Force": "exedge never asks for confirmation",
    },
    "ReceiveConnector": {
        "Server": "exedge is a single server: its receive connectors are this server's",
        "DomainController": _AD,
        "Force": "exedge never asks for confirmation",
    },
    "AcceptedDomain": {
        "DomainController": _AD,
        "Force": "exedge never asks for confirmation",
    },
}

SIZE_KEYS = {"max_message_size", "max_header_size", "oversize_threshold"}


def exchange_name(key: str) -> str:
    return EXCHANGE_NAMES.get(key) or "".join(part.capitalize() for part in key.split("_"))


@attrs.frozen
class Noun:
    name: str              # SendConnector
    section: str           # send_connectors
    model: type
    usages: tuple          # the usage switches New- takes (-Custom, -Internet, ...)
    view: tuple
    what: str              # "send connector", for messages


NOUNS = (
    Noun("SendConnector", "send_connectors", m.SendConnector, ("Custom", "Internal", "Internet", "Partner"),
         ("Identity", "AddressSpaces", "Enabled"), "send connector"),
    Noun("ReceiveConnector", "receive_connectors", m.ReceiveConnector, m.USAGES,
         ("Identity", "Bindings", "Enabled"), "receive connector"),
    Noun("AcceptedDomain", "accepted_domains", m.AcceptedDomain, (),
         ("Name", "DomainName", "DomainType"), "accepted domain"),
)


# -- values: PowerShell -> TOML --------------------------------------------------

_DELETE = object()


class Credential:
    """What Get-Credential returns: a user name and a password that is never shown."""

    def __init__(self, username: str, password: str):
        self.username = username
        self._password = password

    @property
    def password(self) -> str:
        return self._password

    def __repr__(self) -> str:
        return f"Credential(username={self.username!r})"

    def as_record(self) -> dict:
        return {"UserName": self.username, "Password": "System.Security.SecureString"}


def _scalar(value: Any, param: str) -> Any:
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, str):
        return str(value)
    raise CmdletError(f"-{param}: expected a value, got {value!r}")


def to_toml(field: attrs.Attribute, value: Any, param: str, ctx: Context) -> Any:
    """A value from the line as the TOML key of C{field} takes it (the loader then judges it)."""
    if value is None:
        return _DELETE
    kind = str(field.type)
    if kind.startswith("tuple"):
        items = value if isinstance(value, tuple) else (value,)
        out = [_scalar(v, param) for v in items]
        dropped = DROPPED_VALUES.get(field.name, {})
        kept = []
        for item in out:
            if isinstance(item, str) and item.strip().lower() in dropped:
                ctx.warn(f"-{param} {item} left out: {dropped[item.strip().lower()]}")
            else:
                kept.append(item)
        return _canonical(field, kept)
    if isinstance(value, tuple):
        if "Schedule" in kind:
            return [_scalar(v, param) for v in value]
        raise CmdletError(f"-{param} takes one value, not a list")
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise CmdletError(f"-{param} takes $true or $false, not {value!r}")
    if isinstance(value, Word) and not value.quoted and (kind.startswith("int") or kind.startswith("float")):
        try:
            return int(value)
        except ValueError:
            pass
        if kind.startswith("float"):
            try:
                return float(value)
            except ValueError:
                pass
    return _canonical(field, _scalar(value, param))


def _canonical(field: attrs.Attribute, value: Any) -> Any:
    """
    Exchange's names match case-insensitively (TLS is Tls); the file gets
    the loader's own spelling of each string it would read the same way.
    """
    parse = field.metadata["parse"]
    try:
        parsed = parse(value)
    except Exception:            # the loader reports it, with the key and line
        return value
    if isinstance(value, list) and isinstance(parsed, tuple) and len(parsed) == len(value):
        return [p if _same(v, p) else v for v, p in zip(value, parsed)]
    return parsed if _same(value, parsed) else value


def _same(written: Any, parsed: Any) -> bool:
    return isinstance(written, str) and isinstance(parsed, str) and written.strip().lower() == parsed.lower()


def _toml_item(value: Any):
    if isinstance(value, dict):
        table = tomlkit.inline_table()
        table.update(value)
        return table
    return value


# -- values: the loaded model -> what Get- shows ---------------------------------

class ByteSize(int):
    """A size in bytes that shows itself as Exchange does: 36 MB (37,748,736 bytes)."""

    def __str__(self) -> str:
        n = int(self)
        for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
            if n >= size:
                amount = f"{n / size:.3f}".rstrip("0").rstrip(".")
                return f"{amount} {unit} ({n:,} bytes)"
        return f"{n} B ({n:,} bytes)"


class TimeSpan(float):
    """Seconds shown as Exchange's TimeSpan: 00:05:00, 2.00:00:00."""

    def __str__(self) -> str:
        total = int(self)
        days, rest = divmod(total, 86400)
        text = f"{rest // 3600:02}:{rest % 3600 // 60:02}:{rest % 60:02}"
        return f"{days}.{text}" if days else text


def _shown(key: str, kind: str, value: Any) -> Any:
    if key == "address_spaces":
        return [f"{a.type}:{a.domain};{a.cost}" for a in value]
    if key == "smart_hosts":
        return [(f"[{h}]" if ":" in h else h) + (f":{p}" if p else "") for h, p in value]
    if key == "authentication_credential":
        return value["username"] if value else None
    if isinstance(value, tuple):
        return [str(v) if not isinstance(v, (str, bool, int, float)) else v for v in value]
    if value is None:
        return "Unlimited" if kind.startswith("int") else None
    if key in SIZE_KEYS:
        return ByteSize(value)
    if kind.startswith("float"):
        return TimeSpan(value)
    if isinstance(value, (str, bool, int, dict)):
        return value
    return str(value)


def _short_server(config: m.Config) -> str:
    return config.server.fqdn.split(".")[0].upper()


def record(noun: Noun, item: Any, config: m.Config) -> dict:
    """One connector or domain with Exchange's property names and shown values."""
    out: dict = {}
    if noun.name == "ReceiveConnector":
        out["Identity"] = f"{_short_server(config)}\\{item.name}"
    elif noun.name == "SendConnector":
        out["Identity"] = item.name
    else:
        out["Identity"] = item.name or item.domain_name
        out["Name"] = item.name or item.domain_name
    for f in attrs.fields(noun.model):
        value = getattr(item, f.name)
        if noun.name == "AcceptedDomain" and f.name == "name":
            continue
        if f.name == "dns_routing_enabled" and value is None:
            value = not item.smart_hosts and not item.drop_directory     # the loader's default
        if f.name == "fqdn" and value is None and noun.name == "ReceiveConnector":
            value = item.effective_fqdn(config.server)
        out[exchange_name(f.name)] = _shown(f.name, str(f.type), value)
    if noun.name == "SendConnector":
        out["SourceTransportServers"] = [config.server.fqdn]
    return out


# -- finding the entry a line names ----------------------------------------------

def _identity_text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a name, got {value!r}")
    text = str(value).strip()
    # Exchange's identities may carry the server: EDGE01\From Internet
    return text.rsplit("\\", 1)[-1].strip()


def _keys(noun: Noun, table) -> list[str]:
    keys = [str(table.get("name", "")).lower()]
    if noun.name == "AcceptedDomain":
        keys.append(str(table.get("domain_name", "")).lower())
    return [k for k in keys if k]


def find(noun: Noun, edit: ConfigFile, identity: str) -> int:
    wanted = identity.lower()
    hits = [i for i, t in enumerate(edit.tables(noun.section)) if wanted in _keys(noun, t)]
    if not hits:
        names = ", ".join(repr(str(t.get("name") or t.get("domain_name", "?"))) for t in edit.tables(noun.section))
        raise CmdletError(f"no {noun.what} {identity!r} in {edit.path} (there: {names or 'none'})")
    if len(hits) > 1:
        raise CmdletError(f"{identity!r} names {len(hits)} {noun.what}s in {edit.path}; give a unique name")
    return hits[0]


# -- the parameters ---------------------------------------------------------------

def _key_params(noun: Noun) -> dict[str, attrs.Attribute]:
    """Exchange parameter name -> model field, for every key but the name (which is -Name)."""
    return {exchange_name(f.name): f for f in attrs.fields(noun.model) if f.name != "name"}


def _params(noun: Noun, verb: str) -> list[Param]:
    params = []
    if verb in ("Set", "Remove", "Get"):
        params.append(Param("Identity", _identity_text, mandatory=verb != "Get", position=0))
    if verb == "New":
        params.append(Param("Name", mandatory=True, position=0))
    if verb == "Set":
        params.append(Param("Name"))
    if verb in ("New", "Set"):
        # a key the model requires is mandatory on New- (DomainName, AddressSpaces, Bindings)
        params.extend(Param(name, mandatory=verb == "New" and f.metadata["required"])
                      for name, f in _key_params(noun).items())
        if verb == "New":
            params.extend(Param(u, switch=True) for u in noun.usages)
        params.extend(Param(name) for name in IGNORED[noun.name] if name != "Force")
        params.append(Param("Force", switch=True))
    if verb in ("New", "Set", "Remove"):
        params.append(Param("WhatIf", switch=True))
        params.append(Param("Confirm", switch=True))
    return params


# -- the verbs --------------------------------------------------------------------

def _apply(noun: Noun, verb: str, args: dict, table, edit: ConfigFile, ctx: Context) -> None:
    """Set the keys the line gives on C{table} (a tomlkit table), in the line's order."""
    for pname, value in args.items():
        if pname in IGNORED[noun.name]:
            if pname != "Force":
                ctx.warn(f"-{pname} left out: {IGNORED[noun.name][pname]}")
            continue
        if pname in ("Identity", "WhatIf", "Confirm") or pname in noun.usages:
            continue
        if pname == "Name":
            if value is None:
                raise CmdletError(f"{verb}-{noun.name}: -Name cannot be $null")
            table["name"] = _canonical(attrs.fields_dict(noun.model)["name"], _scalar(value, "Name"))
            continue
        field = _key_params(noun)[pname]
        if field.name == "authentication_credential":
            value = _credential_ref(value, table, edit, ctx, args)
        else:
            value = to_toml(field, value, pname, ctx)
        if value is _DELETE:
            if field.name in table:
                del table[field.name]
        else:
            table[field.name] = _toml_item(value)


def _credential_ref(value: Any, table, edit: ConfigFile, ctx: Context, args: dict):
    if value is None:
        return _DELETE
    if isinstance(value, str):               # PowerShell prompts for the password of a user name given
        value = get_credential(ctx, str(value))
    if not isinstance(value, Credential):
        raise CmdletError("-AuthenticationCredential takes a credential: $cred = Get-Credential, "
                          "then -AuthenticationCredential $cred")
    owner = str(args.get("Name") or table.get("name") or "connector")
    mine = (table.get("authentication_credential") or {}).get("password_file")
    taken = {str((t.get("authentication_credential") or {}).get("password_file"))
             for t in edit.tables("send_connectors") + edit.tables("etrn_clients") if t is not table}
    taken.discard(str(mine))
    return edit.write_password(owner, value.username, value.password, taken)


def _finish(noun: Noun, verb: str, edit: ConfigFile, ctx: Context, args: dict, done: str) -> m.Config:
    before = edit.old_warnings()
    config = edit.commit(dry_run=bool(args.get("WhatIf")))
    if args.get("WhatIf"):
        ctx.say(f"What if: {done} ({edit.path}; the change is valid, nothing was written)")
        return config
    for w in config.warnings:
        if (w.key, w.message) not in before:
            ctx.warn(str(w))
    ctx.say(f"{done} ({edit.path}); {ctx.on_config_changed(edit.path)}")
    return config


def _new(noun: Noun):
    def run(ctx: Context, args: dict):
        edit = ConfigFile(ctx.config_path)
        table = tomlkit.table()
        usages = [u for u in noun.usages if args.get(u)]
        if len(usages) > 1:
            raise CmdletError(f"New-{noun.name}: give one usage switch, not {', '.join('-' + u for u in usages)}")
        if usages:
            if args.get("Usage") is not None and str(args["Usage"]).lower() != usages[0].lower():
                raise CmdletError(f"New-{noun.name}: -{usages[0]} and -Usage {args['Usage']} disagree")
            table["usage"] = usages[0]
        _apply(noun, "New", args, table, edit, ctx)
        edit.append(noun.section, table)
        config = _finish(noun, "New", edit, ctx, args, f"added {noun.what} {str(table['name'])!r}")
        created = getattr(config, noun.section)[len(edit.tables(noun.section)) - 1]
        return [record(noun, created, config)]

    return run


def _set(noun: Noun):
    def run(ctx: Context, args: dict):
        edit = ConfigFile(ctx.config_path)
        index = find(noun, edit, args["Identity"])
        table = edit.tables(noun.section)[index]
        _apply(noun, "Set", args, table, edit, ctx)
        _finish(noun, "Set", edit, ctx, args, f"changed {noun.what} {args['Identity']!r}")
        return None

    return run


def _remove(noun: Noun):
    def run(ctx: Context, args: dict):
        edit = ConfigFile(ctx.config_path)
        index = find(noun, edit, args["Identity"])
        ref = edit.tables(noun.section)[index].get("authentication_credential")
        edit.remove(noun.section, index)
        _finish(noun, "Remove", edit, ctx, args, f"removed {noun.what} {args['Identity']!r}")
        if ref and not args.get("WhatIf"):
            ctx.say(f"its password file {ref.get('password_file')} was left in place")
        return None

    return run


def _get(noun: Noun):
    def run(ctx: Context, args: dict):
        try:
            config = load(ctx.config_path)
        except ConfigError as e:
            raise CmdletError("the configuration does not load:\n" + "\n".join(f"  {p}" for p in e.problems)) from None
        items = getattr(config, noun.section)
        if "Identity" in args:
            wanted = args["Identity"].lower()
            items = [i for i in items if wanted in (i.name.lower(), getattr(i, "domain_name", "").lower())]
            if not items:
                raise CmdletError(f"no {noun.what} {args['Identity']!r} in {ctx.config_path}")
        out = [record(noun, item, config) for item in items]
        return out

    return run


# The seeds' "Get-SendConnector | Format-List ...,DSNRoutingEnabled,..." has
# a typo for DNSRoutingEnabled (Exchange itself would print nothing for it);
# it is taken as that property so the documented line shows what it means.
PROPERTY_ALIASES = {"DSNRoutingEnabled": "DNSRoutingEnabled"}

for _noun in NOUNS:
    for _verb, _make in (("New", _new), ("Set", _set), ("Get", _get), ("Remove", _remove)):
        cmdlet(f"{_verb}-{_noun.name}", *_params(_noun, _verb), view=_noun.view,
               property_aliases=PROPERTY_ALIASES,
               help=f"{_verb} {_noun.what}s in the configuration file ([[{_noun.section}]])")(_make(_noun))


# -- Get-Credential ---------------------------------------------------------------

def get_credential(ctx: Context, username: str | None = None) -> Credential:
    """
    A user name and password: asked on the terminal (the password without
    echo), or read as two lines from standard input when it is not one (in
    a script read from standard input, the two lines after this one).
    """
    stdin = ctx.stdin
    tty = getattr(stdin, "isatty", lambda: False)()
    if username is None:
        if tty:
            print("User: ", end="", file=ctx.stderr, flush=True)
        line = stdin.readline()
        if not line:
            raise CmdletError("Get-Credential: no user name (give the user name and the password on two lines "
                              "of standard input, or run it on a terminal)")
        username = line.rstrip("\r\n")
    if tty:
        password = getpass.getpass(f"Password for user {username}: ", stream=ctx.stderr)
    else:
        line = stdin.readline()
        if not line:
            raise CmdletError(f"Get-Credential: no password for {username!r} on standard input "
                              "(the line after the user name)")
        password = line.rstrip("\r\n")
    username = username.strip()
    if not username or len(username) > 256 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in username):
        raise CmdletError("Get-Credential: the user name must be 1 to 256 printable characters")
    if not password or len(password) > 1024 or any(c in password for c in "\0\r\n"):
        raise CmdletError("Get-Credential: the password must be 1 to 1024 characters on one line")
    return Credential(username, password)


@cmdlet("Get-Credential", Param("UserName", position=0), Param("Message"),
        help="a user name and password for -AuthenticationCredential (prompted, or two lines on stdin)")
def _get_credential(ctx: Context, args: dict):
    name = args.get("UserName")
    if args.get("Message") and getattr(ctx.stdin, "isatty", lambda: False)():
        print(str(args["Message"]), file=ctx.stderr)
    return get_credential(ctx, None if name is None else str(name))


"""
Load and validate the TOML configuration into L{Config}.

All problems are collected before anything is raised, so an admin sees
every mistake in one run, each with the file, the line and the key.
"""

from __future__ import annotations

import ipaddress

import os
import tomllib
from typing import Any

import attrs

from . import models as m
from .locate import find_line, index_lines
from .problems import ConfigError, Problem, key_text


class _Collector:
    def __init__(self, source: str, text: str):
        self.source = source
        self.index = index_lines(text)
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []

    def problem(self, path: tuple, message: str, *, warning: bool = False) -> None:
        item = Problem(self.source, find_line(self.index, path), key_text(path), message)
        (self.warnings if warning else self.problems).append(item)


def _build(model: type, table: Any, path: tuple, out: _Collector) -> Any:
    """Parse one TOML table into C{model}, reporting each bad key."""
    if not isinstance(table, dict):
        out.problem(path, f"expected a table, got {type(table).__name__}")
        return None
    fields = {f.name: f for f in attrs.fields(model)}
    for key in table:
        if key not in fields:
            out.problem(path + (key,), f"unknown key (known keys: {', '.join(sorted(fields))})")
    values: dict[str, Any] = {}
    ok = True
    usage = None
    # usage first: other defaults depend on it
    for fname in sorted(fields, key=lambda n: n != "usage"):
        meta = fields[fname].metadata
        if fname in table:
            try:
                values[fname] = meta["parse"](table[fname])
            except ValueError as e:
                out.problem(path + (fname,), str(e))
                ok = False
                continue
            except Exception as e:   # a parser surprised by odd input: still a problem, not a traceback
                out.problem(path + (fname,), f"invalid value {table[fname]!r} ({e.__class__.__name__})")
                ok = False
                continue
        elif meta.get("required"):
            out.problem(path + (fname,), "is required")
            ok = False
            continue
        else:
            default = fields[fname].default
            if isinstance(default, attrs.Factory):
                default = default.factory()
            if meta.get("per_usage"):
                default = default(usage or "Custom")
                if default is m._REQUIRED:
                    out.problem(path + (fname,), f"is required for usage {usage or 'Custom'}")
                    ok = False
                    continue
            values[fname] = default
        if fname == "usage":
            usage = values[fname]
    return model(**values) if ok else None


def _validate(cfg: dict, out: _Collector) -> None:
    """Rules that span keys or sections (Exchange's cmdlet validations)."""
    management = cfg["management"]
    if management is not None and management.listen is not None:
        host = management.listen[0]
        if not management.token_file:
            out.problem(("management", "listen"), "the TCP endpoint needs a bearer token: add token_file = \"...\" "
                        "under [management] (a file holding the token)")
        if not ipaddress.ip_address(host).is_loopback and not management.allow_remote:
            out.problem(("management", "listen"), f"{host} is not a loopback address: the endpoint would be reachable "
                        "from the network; set allow_remote = true under [management] if that is meant")
    for section in ("receive_connectors", "send_connectors"):
        seen: dict[str, int] = {}
        for i, conn in enumerate(cfg[section]):
            if conn is None:
                continue
            lowered = conn.name.lower()
            if lowered in seen:
                out.problem((section, i, "name"), f"duplicate connector name {conn.name!r} (also {section}[{seen[lowered]}])")
            seen[lowered] = i

    drops: dict[str, int] = {}
    for i, conn in enumerate(cfg["send_connectors"]):
        if conn is None:
            continue
        path = ("send_connectors", i)
        if conn.drop_directory and conn.smart_hosts:
            out.problem(path + ("smart_hosts",), "a connector delivers to a drop_directory or to smart_hosts, not both")
        if conn.smart_hosts and conn.dns_routing_enabled:
            out.problem(path + ("dns_routing_enabled",), "must be false when smart_hosts are set (as in Exchange)")
        if not conn.drop_directory and not conn.smart_hosts and conn.dns_routing_enabled is False:
            out.problem(path + ("smart_hosts",), "dns_routing_enabled = false needs smart_hosts (or a drop_directory)")
        if conn.tls_auth_level and not conn.require_tls:
            out.problem(path + ("tls_auth_level",), "needs require_tls = true (as in Exchange)")
        if conn.tls_domain and conn.tls_auth_level != "DomainValidation":
            out.problem(path + ("tls_domain",), "only used with tls_auth_level = \"DomainValidation\"")
        if conn.ignore_start_tls and conn.require_tls:
            out.problem(path + ("ignore_start_tls",), "cannot be combined with require_tls")
        if conn.tls_send_domain_secure_list:
            if conn.smart_hosts or conn.drop_directory:
                out.problem(path + ("tls_send_domain_secure_list",),
                            "domain security is checked against the partner's own servers: needs DNS routing")
            if not conn.tls_certificate_file:
                out.problem(path + ("tls_send_domain_secure_list",),
                            "partners expect a client certificate: set tls_certificate_file")
            if conn.ignore_start_tls:
                out.problem(path + ("ignore_start_tls",), "cannot be combined with tls_send_domain_secure_list")
        auth = conn.smart_host_auth_mechanism
        if auth in ("BasicAuth", "BasicAuthRequireTLS"):
            if not conn.smart_hosts:
                out.problem(path + ("smart_host_auth_mechanism",), f"{auth} authenticates to smart_hosts: set them")
            if not conn.authentication_credential:
                out.problem(path + ("smart_host_auth_mechanism",),
                            f"{auth} needs authentication_credential = "
                            f"{{ username = \"...\", password_file = \"...\" }}")
            if auth == "BasicAuthRequireTLS" and conn.ignore_start_tls:
                out.problem(path + ("ignore_start_tls",), "BasicAuthRequireTLS needs STARTTLS")
        elif conn.authentication_credential:
            out.problem(path + ("authentication_credential",),
                        "set smart_host_auth_mechanism = \"BasicAuth\" or \"BasicAuthRequireTLS\" to use it")
        if conn.oversize_threshold is not None:
            if conn.oversize_schedule is None:
                out.problem(path + ("oversize_threshold",), "needs oversize_schedule (the windows for larger messages)")
            if conn.max_message_size is not None and conn.oversize_threshold > conn.max_message_size:
                out.problem(path + ("oversize_threshold",),
                            f"is above this connector's max_message_size ({conn.max_message_size} bytes): "
                            "no message would ever wait for the oversize schedule")
        elif conn.oversize_schedule is not None:
            out.problem(path + ("oversize_schedule",), "needs oversize_threshold (the size above which it applies)")
        if conn.remote_triggered_delivery:
            if not conn.schedule.always or conn.oversize_schedule is not None:
                out.problem(path + ("remote_triggered_delivery",),
                            "its queues run when the site asks, not on a schedule: leave schedule and "
                            "oversize_schedule out (Exchange offers one or the other)")
            if conn.drop_directory:
                out.problem(path + ("remote_triggered_delivery",), "a drop directory has no site to ask for its mail")
        elif conn.remote_trigger_accounts:
            out.problem(path + ("remote_trigger_accounts",), "needs remote_triggered_delivery = true")
        if not conn.drop_directory:
            continue
        # files are named by queue id: two connectors in one directory would
        # overwrite each other's copy of a message split between them
        where = os.path.realpath(conn.drop_directory)
        if where in drops:
            out.problem(("send_connectors", i, "drop_directory"),
                        f"{conn.drop_directory!r} is already the drop directory of send_connectors[{drops[where]}]")
        drops.setdefault(where, i)

    seen_clients: dict[str, int] = {}
    for i, client in enumerate(cfg["etrn_clients"]):
        if client is None:
            continue
        path = ("etrn_clients", i)
        if client.name.lower() in seen_clients:
            out.problem(path + ("name",), f"duplicate ETRN client name {client.name!r} "
                                          f"(also etrn_clients[{seen_clients[client.name.lower()]}])")
        seen_clients.setdefault(client.name.lower(), i)
        if not client.domains:
            out.problem(path + ("domains",), "needs at least one domain to ask for")
        if client.interval is not None and client.interval < 60:
            out.problem(path + ("interval",), "at least 60 seconds: ETRN starts a queue run at the provider")
        if client.tls_auth_level and not client.require_tls:
            out.problem(path + ("tls_auth_level",), "needs require_tls = true")
        if client.ignore_start_tls and (client.require_tls or client.smart_host_auth_mechanism == "BasicAuthRequireTLS"):
            out.problem(path + ("ignore_start_tls",), "cannot be combined with require_tls or BasicAuthRequireTLS")
        if client.smart_host_auth_mechanism != "None" and not client.authentication_credential:
            out.problem(path + ("smart_host_auth_mechanism",),
                        f"{client.smart_host_auth_mechanism} needs authentication_credential")

    _back_pressure(cfg["back_pressure"], out)

    seen_domains: dict[str, int] = {}
    for i, dom in enumerate(cfg["accepted_domains"]):
        if dom is None:
            continue
        if dom.domain_name in seen_domains:
            out.problem(("accepted_domains", i, "domain_name"), f"duplicate accepted domain {dom.domain_name!r}")
        seen_domains[dom.domain_name] = i

    directory = cfg["directory"]
    if directory is not None:
        if directory.servers and directory.credentials_file:
            out.problem(("directory", "servers"), "use servers (LDAP) or credentials_file (local), not both")
        if directory.servers and not directory.base_dn:
            out.problem(("directory", "base_dn"), "needed with servers (where users and groups are searched)")
        if directory.bind_mode == "Search" and not directory.service_account:
            out.problem(("directory", "service_account"), "bind_mode = \"Search\" needs a service_account")

    modes: dict = {}
    for i, rc in enumerate(cfg["receive_connectors"]):
        # TLS starts before a connector is chosen on an implicit-TLS port:
        # every connector on a binding must agree on how it starts
        for binding in (rc.bindings if rc is not None else ()):
            first = modes.setdefault(binding, (i, rc.tls_mode))
            if first[1] != rc.tls_mode:
                out.problem(("receive_connectors", i, "tls_mode"),
                            f"binding {binding} is {first[1]} in receive_connectors[{first[0]}]; "
                            "connectors sharing a binding must share tls_mode")

    pairs: dict[tuple, int] = {}
    for i, rc in enumerate(cfg["receive_connectors"]):
        if rc is None:
            continue
        path = ("receive_connectors", i)
        mechs = set(rc.auth_mechanisms)
        if "None" in mechs and len(mechs) > 1:
            out.problem(path + ("auth_mechanisms",), "None cannot be combined with other mechanisms")
        if "BasicAuthRequireTLS" in mechs and not {"BasicAuth", "Tls"} <= mechs:
            out.problem(path + ("auth_mechanisms",), "BasicAuthRequireTLS needs BasicAuth and Tls too")
        if "ExternalAuthoritative" in mechs:
            if not mechs <= {"ExternalAuthoritative", "Tls"}:
                out.problem(path + ("auth_mechanisms",), "ExternalAuthoritative can only be combined with Tls")
            if "ExchangeServers" not in rc.permission_groups:
                out.problem(path + ("permission_groups",), "ExternalAuthoritative requires the ExchangeServers permission group")
        if "None" in rc.permission_groups and len(rc.permission_groups) > 1:
            out.problem(path + ("permission_groups",), "None cannot be combined with other groups")
        if not rc.bindings:
            out.problem(path + ("bindings",), "needs at least one binding")
        if not rc.remote_ip_ranges:
            out.problem(path + ("remote_ip_ranges",), "needs at least one range")
        if rc.connection_inactivity_timeout >= rc.connection_timeout:
            out.problem(path + ("connection_inactivity_timeout",), "must be shorter than connection_timeout")
        if rc.max_message_size < 64 * 1024:
            out.problem(path + ("max_message_size",), "must be at least 64KB (RFC 5321 requires accepting 64KB messages)")
        if rc.max_recipients_per_message < 100:
            out.problem(path + ("max_recipients_per_message",),
                        "below 100: RFC 5321 requires accepting at least 100 recipients", warning=True)
        for binding in rc.bindings:
            for rng in rc.remote_ip_ranges:
                key = (binding, rng.first, rng.last)
                if key in pairs and pairs[key] != i:
                    out.problem(path + ("remote_ip_ranges",),
                                f"binding {binding} with range {rng} is already used by receive_connectors[{pairs[key]}]")
                pairs[key] = i
        if rc.tls_receive_domain_secure_list and not rc.tls_client_ca_file:
            out.problem(path + ("tls_receive_domain_secure_list",), "needs tls_client_ca_file to verify partners' certificates")
        if rc.tls_receive_domain_secure_list and "Tls" not in mechs:
            out.problem(path + ("tls_receive_domain_secure_list",), "needs Tls in auth_mechanisms")
        if rc.tls_mode == "Implicit" and "Tls" not in mechs:
            out.problem(path + ("tls_mode",), "Implicit TLS needs Tls in auth_mechanisms")
        if mechs & {"BasicAuth", "BasicAuthRequireTLS"} and cfg["directory"] is not None \
                and not cfg["directory"].credentials_file and not cfg["directory"].servers \
                and not cfg["directory"].cram_md5_accounts:
            out.problem(path + ("auth_mechanisms",),
                        "BasicAuth without [directory] servers or credentials_file: AUTH will not be offered",
                        warning=True)
        trusting = "ExternalAuthoritative" in mechs
        if trusting and any(r.size >= 2**24 for r in rc.remote_ip_ranges):
            out.problem(path + ("remote_ip_ranges",),
                        "ExternalAuthoritative with a range this wide makes an open relay: restrict remote_ip_ranges",
                        warning=True)


def _back_pressure(bp, out: _Collector) -> None:
    """Medium is the milder level: it must set in no later than High."""
    if bp is None:
        return
    path = ("back_pressure",)
    medium, high = bp.min_free_space_medium, bp.min_free_space_high
    if medium.bytes is not None and high.bytes is not None and medium.bytes < high.bytes or \
            medium.percent is not None and high.percent is not None and medium.percent < high.percent:
        out.problem(path + ("min_free_space_medium",),
                    f"{medium} is less than min_free_space_high ({high}): Medium must come before High")
    for key in ("max_memory", "max_queue_length"):
        medium, high = getattr(bp, f"{key}_medium"), getattr(bp, f"{key}_high")
        if medium > high:
            out.problem(path + (f"{key}_medium",),
                        f"{key}_medium ({medium}) is more than {key}_high ({high}): Medium must come before High")


def _pipeline(items: Any, out: _Collector) -> list:
    """[[pipeline]] tables: the common keys checked here, the rest kept as the stage's options."""
    if not isinstance(items, list):
        out.problem(("pipeline",), "must be an array of tables: write [[pipeline]]")
        return []
    common = {f.name for f in attrs.fields(m.PipelineEntry)} - {"options"}
    entries = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            out.problem(("pipeline", i), "must be a table")
            entries.append(None)
            continue
        known = {k: item[k] for k in item if k in common}
        options = {k: item[k] for k in item if k not in common}
        entry = _build(m.PipelineEntry, known, ("pipeline", i), out)
        entries.append(attrs.evolve(entry, options=options) if entry is not None else None)
    return entries


def loads(text: str, source: str = "<config>") -> m.Config:
    """Parse configuration text; raise L{ConfigError} listing every problem."""
    out = _Collector(source, text)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line = None
        detail = str(e)
        if "(at line " in detail:
            try:
                line = int(detail.split("(at line ", 1)[1].split(",", 1)[0])
            except ValueError:
                pass
        raise ConfigError([Problem(source, line, "", f"TOML syntax error: {detail}")]) from None

    for key in raw:
        if key not in m.SECTIONS:
            out.problem((key,), f"unknown section (known: {', '.join(m.SECTIONS)})")

    cfg: dict[str, Any] = {}
    for section, (model, is_list) in m.SECTIONS.items():
        if section == "pipeline":
            cfg[section] = _pipeline(raw.get(section, []), out)
            continue
        if is_list:
            items = raw.get(section, [])
            if not isinstance(items, list):
                out.problem((section,), f"must be an array of tables: write [[{section}]]")
                items = []
            cfg[section] = [_build(model, item, (section, i), out) for i, item in enumerate(items)]
        else:
            cfg[section] = _build(model, raw.get(section, {}), (section,), out)

    # cross-key rules run even after per-key problems (they skip what
    # failed to parse), so one run shows every mistake
    _validate(cfg, out)
    if out.problems:
        raise ConfigError(out.problems)
    return m.Config(
        server=cfg["server"],
        queue=cfg["queue"],
        directory=cfg["directory"],
        management=cfg["management"],
        logs=cfg["logs"],
        back_pressure=cfg["back_pressure"],
        pipeline=tuple(cfg["pipeline"]),
        etrn_clients=tuple(cfg["etrn_clients"]),
        accepted_domains=tuple(cfg["accepted_domains"]),
        receive_connectors=tuple(cfg["receive_connectors"]),
        send_connectors=tuple(cfg["send_connectors"]),
        source=source,
        warnings=tuple(out.warnings),
        lines=out.index,
    )


def load(path: str) -> m.Config:
    """Load the configuration file at C{path}."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([Problem(path, None, "", f"cannot read: {e.strerror}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([Problem(path, None, "", f"not UTF-8: {e}")]) from None
    return loads(text, path)


def load_section(path: str, section: str):
    """
    One section of the file at C{path}, whatever the rest says: the
    command line finds the running server's socket in [management] even
    when another section is broken (and the server refused to reload it).
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        raw = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError([Problem(path, None, "", f"cannot read: {e}")]) from None
    model, _ = m.SECTIONS[section]
    out = _Collector(path, text)
    built = _build(model, raw.get(section, {}), (section,), out)
    if out.problems:
        raise ConfigError(out.problems)
    return built


def defaults() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, doc) for every key, for C{--defaults}."""
    rows = []
    for section, (model, _) in m.SECTIONS.items():
        for f in attrs.fields(model):
            default = f.default
            if isinstance(default, attrs.Factory):
                default = "(computed at start-up)"
            elif f.metadata.get("per_usage"):
                default = "(depends on usage)"
            elif f.metadata.get("required"):
                default = "(required)"
            rows.append((section, f.name, default, f.metadata.get("doc", "")))
    return rows

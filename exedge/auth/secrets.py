"""
Passwords exedge itself uses (smart-host AUTH, the directory's service
account): each lives in its own password_file, never in the main
configuration and never in a log. They are all read here, once, at
start-up, so a file that cannot be read stops the server (and
check-config) with the key and line that name it.
"""

from __future__ import annotations

import attrs

from exedge.config import Config, ConfigError


@attrs.frozen
class Secrets:
    smart_hosts: dict           # send connector name -> (username, password)
    directory_service: tuple | None = None   # (username, password) for [directory] bind_mode = "Search"
    etrn_clients: dict = attrs.field(factory=dict)   # ETRN client name -> (username, password)
    cram_md5: dict = attrs.field(factory=dict)       # account (lower case) -> its secret, for CRAM-MD5


def _read(config: Config, path_key: tuple, path: str, problems: list) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    except OSError as e:
        problems.append(config.problem(path_key, f"cannot read password_file {path}: {e.strerror}"))
        return None
    if not password:
        problems.append(config.problem(path_key, f"password_file {path} is empty"))
        return None
    return password


def load_secrets(config: Config) -> Secrets:
    problems: list = []
    smart_hosts = {}
    for i, c in enumerate(config.send_connectors):
        if c.authentication_credential and c.smart_host_auth_mechanism in ("BasicAuth", "BasicAuthRequireTLS"):
            ref = c.authentication_credential
            password = _read(config, ("send_connectors", i, "authentication_credential"), ref["password_file"],
                             problems)
            if password is not None:
                smart_hosts[c.name] = (ref["username"], password)
    etrn = {}
    for i, c in enumerate(config.etrn_clients):
        if c.authentication_credential and c.smart_host_auth_mechanism != "None":
            ref = c.authentication_credential
            password = _read(config, ("etrn_clients", i, "authentication_credential"), ref["password_file"],
                             problems)
            if password is not None:
                etrn[c.name] = (ref["username"], password)
    cram = {}
    for i, ref in enumerate(config.directory.cram_md5_accounts):
        password = _read(config, ("directory", "cram_md5_accounts", i), ref["password_file"], problems)
        if password is not None:
            cram[ref["username"].lower()] = password
    service = None
    ref = config.directory.service_account
    if ref:
        password = _read(config, ("directory", "service_account"), ref["password_file"], problems)
        if password is not None:
            service = (ref["username"], password)
    if problems:
        raise ConfigError(problems)
    return Secrets(smart_hosts, service, etrn, cram)

"""
Passwords exedge itself uses (smart-host AUTH, an ETRN client's AUTH, the
directory's service account, the CRAM-MD5 accounts' secrets): each lives in its own password_file, never in the main
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

    def credentials(section: str, items) -> dict:
        """name -> (username, password) of the entries of C{section} that authenticate with a password."""
        found = {}
        for i, c in enumerate(items):
            if c.authentication_credential and c.smart_host_auth_mechanism in ("BasicAuth", "BasicAuthRequireTLS"):
                ref = c.authentication_credential
                password = _read(config, (section, i, "authentication_credential"), ref["password_file"], problems)
                if password is not None:
                    found[c.name] = (ref["username"], password)
        return found

    smart_hosts = credentials("send_connectors", config.send_connectors)
    etrn = credentials("etrn_clients", config.etrn_clients)
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

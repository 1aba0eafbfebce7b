"""
The `exedge` command. Sub-commands:

  exedge check-config FILE     validate FILE; each problem with file, line and key; exit 1 on error
  exedge check-config --defaults   every key with its default and meaning, as pasteable TOML
  exedge check-config -n FILE  (or show-config -n FILE)
                               the keys FILE sets to something other than their default (postconf -n)
  exedge --version             exedge's version, with Twisted's and Python's
  exedge user add|remove|list (--config FILE | --file CREDENTIALS)
                               local AUTH users ([directory] credentials_file)
  exedge etrn NAME [--config FILE]
                               run [[etrn_clients]] NAME once (a link-up script's call): print each
                               reply; exit 0 when every domain got a 25x
  exedge queue list|flush [--config FILE] [--json]
                               the running server's queues (postqueue -p / -f), over [management] socket
  exedge reload [--config FILE]   read the configuration again (as SIGHUP); the old one stays if it is bad
  exedge status [--config FILE]   version, uptime, connectors and their listening state, sessions, spool
  exedge Get-MessageTrackingLog [-Sender A] [-Recipients A,B] [-MessageId ID] [-EventId ID]
                               [-Start T] [-End T] [-ResultSize N] [--json] [--config FILE]
                               search [logs] message_tracking_log_path
  exedge ps ['LINE' ...] [--config FILE] [--json]
                               run Exchange Management Shell lines (New-SendConnector ..., Get-ReceiveConnector
                               | Format-List ...), or a script on stdin; see exedge/admin/
  exedge <Cmdlet-Name> ... [--config FILE] [--json]
                               one cmdlet with the shell's arguments (exedge Get-SendConnector)
"""

from __future__ import annotations

import argparse
import getpass
import sys
import tomllib

import attrs

from exedge.auth.secrets import load_secrets
from exedge.config import ConfigError, load


def _stages(plugin_directory: str) -> dict:
    """Every stage factory the server would find: built-in, and drop-ins in C{plugin_directory}."""
    from exedge.pipeline.registry import discover
    return discover(plugin_directory)[0]


def _version() -> str:
    import platform

    from importlib.metadata import PackageNotFoundError, version
    try:
        ours = version("exedge")
    except PackageNotFoundError:
        ours = "(not installed)"
    import twisted
    return f"exedge {ours} (Twisted {twisted.__version__}, Python {platform.python_version()})"


def show_config(args) -> int:
    """--defaults: every key as TOML; -n FILE: the keys FILE sets to something else."""
    from exedge.config.models import ServerConfig
    from exedge.config.render import defaults_document, non_defaults

    if args.defaults:
        directory = attrs.fields(ServerConfig).plugin_directory.default
        if args.file:
            try:
                directory = load(args.file).server.plugin_directory
            except ConfigError as e:
                return _problems(e, args.file)
        print(defaults_document(_stages(directory)), end="")
        return 0
    if not args.file:
        print(f"exedge {args.command}: -n needs a FILE", file=sys.stderr)
        return 2
    try:
        config = load(args.file)
    except ConfigError as e:
        return _problems(e, args.file)
    with open(args.file, "rb") as f:        # load() read it: it is TOML in UTF-8
        raw = tomllib.load(f)
    for line in non_defaults(raw, _stages(config.server.plugin_directory)):
        print(line)
    return 0


def _problems(error: ConfigError, path: str) -> int:
    for problem in error.problems:
        print(problem)
    print(f"{len(error.problems)} problem(s) in {path}")
    return 1


def check_config(args) -> int:
    if args.defaults or args.non_defaults:
        return show_config(args)
    if not args.file:
        print("exedge check-config: a FILE is required (or --defaults)", file=sys.stderr)
        return 2
    from exedge.admin.validate import validate_file
    from exedge.pipeline import describe
    try:
        config = validate_file(args.file)
    except ConfigError as e:
        for problem in e.problems:
            print(problem)
        print(f"{len(e.problems)} problem(s) in {args.file}")
        return 1
    for warning in config.warnings:
        print(f"warning: {warning}")
    for line in describe(config):
        print(line)
    print(f"{args.file}: OK ({len(config.receive_connectors)} receive connector(s), "
          f"{len(config.send_connectors)} send connector(s), "
          f"{len(config.accepted_domains)} accepted domain(s))")
    return 0


def _credentials_path(args) -> str | None:
    if args.file:
        return args.file
    if not args.config:
        print("exedge user: give --config FILE (its [directory] credentials_file) or --file", file=sys.stderr)
        return None
    try:
        config = load(args.config)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return None
    if not config.directory.credentials_file:
        if config.directory.servers:
            print(f"exedge user: {args.config} checks passwords against LDAP ([directory] servers): "
                  "manage its users in the directory", file=sys.stderr)
        else:
            print(f"exedge user: {args.config} has no [directory] credentials_file: add "
                  f'credentials_file = "..." under [directory] in {args.config} (a path such as '
                  f'"etc/exedge.users"; exedge user add creates the file)', file=sys.stderr)
        return None
    return config.directory.credentials_file


def _password(args) -> str | None:
    """
    From a terminal: asked twice. Otherwise (a pipe, a script, or
    --password-stdin) the first line of standard input; none at all is an
    error, not a prompt that echoes or waits on a terminal nobody watches.
    """
    if args.password_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:
            print(f"exedge user {args.action}: no terminal to ask for the password and nothing on standard "
                  "input: give it as one line on standard input", file=sys.stderr)
            return None
        return line.rstrip("\r\n")
    try:
        first = getpass.getpass(f"Password for {args.name}: ")
        again = getpass.getpass("Again: ")
    except (EOFError, KeyboardInterrupt):
        print(f"\nexedge user {args.action}: no password given", file=sys.stderr)
        return None
    if again != first:
        print("exedge user: the passwords differ", file=sys.stderr)
        return None
    return first


def user(args) -> int:
    from exedge.auth.credentials import CredentialsFile

    path = _credentials_path(args)
    if path is None:
        return 2
    store = CredentialsFile(path)
    try:
        if args.action == "list":
            for entry in sorted(store.read().values(), key=lambda e: e.name):
                print(f"{entry.name}\t{','.join(('ExchangeUsers',) + entry.groups)}")
            return 0
        if not args.name:
            print(f"exedge user {args.action}: a user NAME is required", file=sys.stderr)
            return 2
        if args.action == "remove":
            if not store.remove(args.name):
                print(f"exedge user remove: no user {args.name!r} in {path}", file=sys.stderr)
                return 1
            print(f"removed {args.name.lower()} from {path}")
            return 0
        password = _password(args)
        if password is None:
            return 1
        # no --group: an existing user keeps its groups; --no-groups clears them
        groups = () if args.no_groups else tuple(args.group) if args.group else None
        store.add(args.name, password, groups)
    except (ValueError, OSError) as e:
        print(f"exedge user {args.action}: {e}", file=sys.stderr)
        return 1
    print(f"{args.name.lower()} saved in {path}")
    return 0


def etrn(args) -> int:
    """One run of an ETRN client, whether or not a server is running: each reply printed."""
    try:
        config = load(args.config)
        secrets = load_secrets(config)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    client = next((c for c in config.etrn_clients if c.name.lower() == args.name.lower()), None)
    if client is None:
        names = ", ".join(c.name for c in config.etrn_clients) or "none"
        print(f"exedge etrn: no [[etrn_clients]] named {args.name!r} in {args.config} (there: {names})",
              file=sys.stderr)
        return 2
    from twisted.internet import defer, task

    from exedge.dequeue.client import EtrnFailed, Run

    outcome = []

    async def run(reactor):
        try:
            answers = await Run(client, helo=config.server.fqdn, reactor=reactor, clock=reactor,
                                credentials=secrets.etrn_clients.get(client.name)).start()
        except EtrnFailed as e:
            print(f"{client.name}: {e}", file=sys.stderr)
            outcome.append(1)
            return
        for answer in answers:
            print(f"ETRN {answer.node}: {answer.code} {answer.text}")
        outcome.append(0 if all(a.ok for a in answers) else 1)

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit:        # react() ends the process its own way; the outcome is ours
        pass
    return outcome[0] if outcome else 1


def main(argv=None) -> int:
    from exedge.admin import shell

    argv = sys.argv[1:] if argv is None else list(argv)
    code = shell.direct(argv)          # exedge <Cmdlet-Name> ...
    if code is not None:
        return code
    parser = argparse.ArgumentParser(prog="exedge", description="exedge SMTP edge transport server")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    shell.add_ps_parser(sub)
    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("file", nargs="?")
    p.add_argument("--defaults", action="store_true",
                   help="print every key with its default and doc as TOML (keys printed as "
                        "'# key =  (required)' must be uncommented and set); with FILE, its plugins' stages too")
    p.add_argument("-n", dest="non_defaults", action="store_true",
                   help="print the keys FILE sets to something other than their default, as postconf -n")
    p.set_defaults(func=check_config)
    p = sub.add_parser("show-config", help="show a configuration: -n FILE for its non-default keys")
    p.add_argument("file", nargs="?")
    p.add_argument("-n", dest="non_defaults", action="store_true", help="the keys FILE sets to something else")
    p.add_argument("--defaults", action="store_true", help="every key with its default, as TOML")
    p.set_defaults(func=show_config)
    p = sub.add_parser("user", help="manage local AUTH users (passwords hashed with scrypt)")
    p.add_argument("action", choices=["add", "remove", "list"])
    p.add_argument("name", nargs="?", help="user name, e.g. smtpgateway@fabrikam.com")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", help="the exedge configuration (uses its [directory] credentials_file)")
    where.add_argument("--file", help="the credentials file itself")
    groups = p.add_mutually_exclusive_group()
    groups.add_argument("--group", action="append", default=[],
                        help="permission group the user also holds: ExchangeServers, ExchangeLegacyServers, "
                             "Partners (repeat for more). Given, the list replaces an existing user's groups; "
                             "not given, an existing user keeps its groups")
    groups.add_argument("--no-groups", action="store_true", help="clear an existing user's groups")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from standard input (one line); the default when there is no terminal")
    p.set_defaults(func=user)
    p = sub.add_parser("etrn", help="ask a provider for our held mail once ([[etrn_clients]] NAME)")
    p.add_argument("name", help="the [[etrn_clients]] entry's name")
    p.add_argument("--config", default="etc/exedge.toml", help="the exedge configuration (default etc/exedge.toml)")
    p.set_defaults(func=etrn)
    from exedge.manage.commands import add_parsers
    add_parsers(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

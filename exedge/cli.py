"""
The `exedge` command. Sub-commands:

  exedge check-config FILE     validate FILE; each problem with file, line and key; exit 1 on error
  exedge check-config --defaults   every key with its default and meaning
"""

from __future__ import annotations

import argparse
import sys

from exedge.config import ConfigError, defaults, load


def check_config(args) -> int:
    if args.defaults:
        section = None
        for sec, key, default, doc in defaults():
            if sec != section:
                print(f"[{sec}]")
                section = sec
            print(f"  {key} = {default!r}\n      {doc}")
        return 0
    if not args.file:
        print("exedge check-config: a FILE is required (or --defaults)", file=sys.stderr)
        return 2
    try:
        config = load(args.file)
    except ConfigError as e:
        for problem in e.problems:
            print(problem)
        print(f"{len(e.problems)} problem(s) in {args.file}")
        return 1
    for warning in config.warnings:
        print(f"warning: {warning}")
    print(f"{args.file}: OK ({len(config.receive_connectors)} receive connector(s), "
          f"{len(config.send_connectors)} send connector(s), "
          f"{len(config.accepted_domains)} accepted domain(s))")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="exedge", description="exedge SMTP edge transport server")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("file", nargs="?")
    p.add_argument("--defaults", action="store_true", help="print every key with its default")
    p.set_defaults(func=check_config)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The `beeldportaal` command: one entry point for operators and developers."""

from __future__ import annotations

import argparse
import sys


def _platform(args: argparse.Namespace) -> int:
    from deploy.local.platform import main

    return main(args.action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beeldportaal", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    platform = commands.add_parser(
        "platform", help="the local Kafka, S3 and PostgreSQL (state in .state/)"
    )
    platform.add_argument(
        "action",
        choices=("up", "down", "status", "env", "purge"),
        help="up: install+start+provision (idempotent); down: stop what up started; "
        "status: health of each component (exit 1 unless all ready); env: print settings "
        "exports; purge: down, then delete all platform state (data, logs, secrets)",
    )
    platform.set_defaults(handler=_platform)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())

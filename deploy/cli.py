"""The `beeldportaal` command: one entry point for operators and developers."""

from __future__ import annotations

import argparse
import sys


def _platform(args: argparse.Namespace) -> int:
    from deploy.local.platform import main

    return main(args.action)


def _ingest(args: argparse.Namespace) -> int:
    from services.ingest import main

    return main.serve() if args.action == "serve" else main.assemble()


def _services(args: argparse.Namespace) -> int:
    from deploy.local.services import main

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

    ingest = commands.add_parser(
        "ingest", help="the ingest service (settings: BEELDPORTAAL_INGEST_*)"
    )
    ingest.add_argument(
        "action",
        choices=("serve", "assemble"),
        help="serve: STOW-RS + C-STORE SCP; assemble: the study assembly agent (faust worker)",
    )
    ingest.add_argument(
        "--tag", help="a label that makes this process recognisable in the process list"
    )
    ingest.set_defaults(handler=_ingest)

    services = commands.add_parser(
        "services", help="run the services as background processes on the local platform"
    )
    services.add_argument(
        "action",
        choices=("up", "down", "status"),
        help="up: start what is not running (logs and pids in .state/services); "
        "down: stop what up started; status: exit 1 unless all run and are ready",
    )
    services.set_defaults(handler=_services)

    from deploy.tokens import add_token_commands

    add_token_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())

"""The `beeldportaal` command: one entry point for operators and developers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _platform(args: argparse.Namespace) -> int:
    from deploy.local.platform import main

    return main(args.action)


def _ingest(args: argparse.Namespace) -> int:
    from services.ingest import main

    return main.serve() if args.action == "serve" else main.assemble()


def _consent(args: argparse.Namespace) -> int:
    from services.consent import main

    return main.serve() if args.action == "serve" else main.decide()


def _routing(args: argparse.Namespace) -> int:
    from services.routing import main

    if args.action == "seed":
        return main.seed(args.file)
    return main.serve() if args.action == "serve" else main.route()


def _notify(args: argparse.Namespace) -> int:
    from services.notify import main

    return main.serve() if args.action == "serve" else main.deliver()


def _timeline(args: argparse.Namespace) -> int:
    from services.timeline import main

    actions = {"serve": main.serve, "project": main.project, "rebuild": main.rebuild}
    return actions[args.action]()


def _migrate(args: argparse.Namespace) -> int:
    from shared.logging import configure_logging, get_logger
    from shared.migrations import MigrationError, migrate
    from shared.settings import PostgresSettings

    configure_logging("migrate", "INFO", json=False, stream=sys.stderr)
    log = get_logger("beeldportaal.migrate")
    try:
        applied = migrate(PostgresSettings().conninfo, grant_to=args.grant_to)
    except MigrationError as exc:
        log.error("migrations not applied", reason=str(exc))
        return 1
    log.info("migrations applied", applied=applied or "none pending", granted_to=args.grant_to)
    return 0


def _dead_letters(args: argparse.Namespace) -> int:
    from services.notify import main

    if args.action == "redrive" and (args.key is None) == (not args.all):
        print("redrive needs a KEY or --all (not both)", file=sys.stderr)
        return 2
    return main.dead_letters(args.action, args.key)


def _study(args: argparse.Namespace) -> int:
    from services.notify import main

    return main.study_status(args.uid, as_json=args.json)


def _observability(args: argparse.Namespace) -> int:
    from deploy.observability import main

    return main(args.prometheus)


def _services(args: argparse.Namespace) -> int:
    from deploy.local.services import main

    return main(args.action)


def _demo(args: argparse.Namespace) -> int:
    from deploy.local.demo import main

    return main(args.timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beeldportaal", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    tag_help = "a label that makes this process recognisable in the process list"

    platform = commands.add_parser(
        "platform", help="the local Kafka, S3, PostgreSQL and Prometheus (state in .state/)"
    )
    platform.add_argument(
        "action",
        choices=("up", "down", "status", "env", "purge"),
        help="up: install+start+provision (idempotent); down: stop what up started; "
        "status: health of each component (exit 1 unless all ready); env: print settings "
        "exports; purge: the services and the platform down, then delete all state (data, "
        "logs, secrets)",
    )
    platform.set_defaults(handler=_platform)

    ingest = commands.add_parser(
        "ingest", help="the ingest service (settings: BEELDPORTAAL_INGEST_*)"
    )
    ingest.add_argument(
        "action",
        choices=("serve", "assemble"),
        help="serve: STOW-RS + C-STORE SCP; assemble: the study assembly worker",
    )
    ingest.add_argument("--tag", help=tag_help)
    ingest.set_defaults(handler=_ingest)

    consent = commands.add_parser(
        "consent", help="the consent service (settings: BEELDPORTAAL_CONSENT_*)"
    )
    consent.add_argument(
        "action",
        choices=("serve", "decide"),
        help="serve: the consent API (Mitz notifications, treatment relationships, the closed "
        "question); decide: the decision worker on study-received",
    )
    consent.add_argument("--tag", help=tag_help)
    consent.set_defaults(handler=_consent)

    routing = commands.add_parser(
        "routing", help="the routing service (settings: BEELDPORTAAL_ROUTING_*)"
    )
    routing.add_argument(
        "action",
        choices=("serve", "route", "seed"),
        help="serve: the provider directory API; route: the routing worker on "
        "consent-checked; seed: publish the providers of a YAML file (refused whole if any "
        "entry is invalid; unchanged entries are not written again)",
    )
    routing.add_argument("--file", type=Path, help="seed: the directory YAML file")
    routing.add_argument("--tag", help=tag_help)
    routing.set_defaults(handler=_routing)

    notify = commands.add_parser(
        "notify", help="the notify service (settings: BEELDPORTAAL_NOTIFY_*)"
    )
    notify.add_argument(
        "action",
        choices=("serve", "deliver"),
        help="serve: the sender's study status, dead letters and portal pickup API; deliver: "
        "the delivery worker on route-resolved (queues, retry tiers, dead letters, webhooks)",
    )
    notify.add_argument("--tag", help=tag_help)
    notify.set_defaults(handler=_notify)

    timeline = commands.add_parser(
        "timeline", help="the timeline service (settings: BEELDPORTAAL_TIMELINE_*)"
    )
    timeline.add_argument(
        "action",
        choices=("serve", "project", "rebuild"),
        help="serve: the FHIR timeline search, access-log search and DICOMweb API; project: "
        "the projection worker (PostgreSQL) and the access-log archive (access-logged into "
        "access_log); rebuild: replay the topics into the read model (stop the projection "
        "worker first)",
    )
    timeline.add_argument("--tag", help=tag_help)
    timeline.set_defaults(handler=_timeline)

    migrate = commands.add_parser(
        "migrate",
        help="apply the database migrations, as the schema's owner (BEELDPORTAAL_POSTGRES_DSN); "
        "the services apply them at start too when they connect as the owner",
    )
    migrate.add_argument(
        "--grant-to",
        metavar="ROLE",
        help="the services' own PostgreSQL role, given what they need and no more (it may add "
        "to the append-only access_log, not alter or drop it): see docs/operations.md",
    )
    migrate.set_defaults(handler=_migrate)

    dead = commands.add_parser(
        "dead-letters", help="deliveries notify gave up on: list them, re-drive one or all"
    )
    dead.add_argument(
        "action",
        choices=("list", "redrive"),
        help="list: every dead letter, newest first; redrive: put one (KEY) or all (--all) "
        "back on its priority queue",
    )
    dead.add_argument(
        "key",
        nargs="?",
        help="redrive: the delivery key 'study|version|sender|destination|endpoint' (quoted)",
    )
    dead.add_argument("--all", action="store_true", help="redrive: every dead letter")
    dead.set_defaults(handler=_dead_letters)

    study = commands.add_parser(
        "study",
        help="one study's journey (received, consent, route, delivered) read from the events",
    )
    study.add_argument(
        "action",
        choices=("status",),
        help="status: each version's state, consent decision, routes and deliveries",
    )
    study.add_argument("uid", help="the Study Instance UID")
    study.add_argument("--json", action="store_true", help="print the status as JSON")
    study.set_defaults(handler=_study)

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

    demo = commands.add_parser(
        "demo",
        help="on top of `services up`: two demo hospitals send a study each (STOW-RS, C-STORE) "
        "to an Orthanc standing in for their PACS; prints each journey and the timeline",
    )
    demo.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds to wait for every delivery and the timeline (default 180)",
    )
    demo.set_defaults(handler=_demo)

    observability = commands.add_parser(
        "observability",
        help="check the Prometheus rules and Grafana dashboards (promtool, then a live Prometheus)",
    )
    observability.add_argument(
        "action",
        choices=("check",),
        help="check: promtool on the rules, then every rule and panel expression on a live "
        "Prometheus",
    )
    observability.add_argument(
        "--prometheus",
        metavar="URL",
        help="the Prometheus to run every expression on (default: the local platform's)",
    )
    observability.set_defaults(handler=_observability)

    from deploy.tokens import add_token_commands

    add_token_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())

"""Process entry points of routing: `serve` (directory API), `route` (worker), `seed` (YAML)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from services.routing.adapters.directory_view import (
    PROVIDER_DIRECTORY,
    DirectoryView,
    KafkaDirectoryWriter,
)
from services.routing.bootstrap import build
from services.routing.config import RoutingSettings
from services.routing.domain.directory import Directory, DirectoryError
from services.routing.handlers.seed import SeedOutcome, seed_directory
from shared import runtime
from shared.http import http_server
from shared.logging import configure_logging, get_logger

log = get_logger(__name__)


async def _serve(settings: RoutingSettings) -> None:
    from services.routing.entrypoints.http import create_app

    routing = build(settings)
    server = http_server(create_app(routing), settings.http_host, settings.http_port)
    log.info(
        "routing directory API starting", url=f"http://{settings.http_host}:{settings.http_port}"
    )
    await server.serve()


def serve(settings: RoutingSettings | None = None) -> int:
    """Run the directory API until SIGTERM/SIGINT (``beeldportaal routing serve``)."""
    settings = settings or RoutingSettings()
    configure_logging(settings.service_name, settings.log_level, settings.log_json)
    runtime.run(_serve(settings))
    return 0


def route(settings: RoutingSettings | None = None) -> int:
    """Run the routing worker until stopped (``beeldportaal routing route``)."""
    from services.routing.entrypoints.worker import main

    settings = settings or RoutingSettings()
    main(settings)
    return 0


async def publish_seed(
    directory: Directory, settings: RoutingSettings, topic: str = PROVIDER_DIRECTORY
) -> SeedOutcome:
    """Publish the providers of ``directory`` that differ from what the topic holds, and wait
    until a view has them (so a service started right after sees the seed)."""
    timeout = settings.view_start_timeout_seconds
    view = DirectoryView(settings.kafka, topic, name="seed")
    async with KafkaDirectoryWriter(settings.kafka, topic, client_id="routing-seed") as writer:
        await view.start()
        try:
            await view.wait_caught_up(timeout)
            outcome = await seed_directory(directory, view, writer)
            if outcome.last_written is not None:
                await view.wait_for(outcome.last_written, timeout)
        finally:
            await view.stop()
    return outcome


def seed(
    path: Path | str | None = None,
    settings: RoutingSettings | None = None,
    *,
    topic: str = PROVIDER_DIRECTORY,
) -> int:
    """Publish a YAML seed to the directory (``beeldportaal routing seed FILE``).

    The whole file is refused, listing every problem, when any entry is invalid (exit 2).
    Idempotent: entries equal to the directory's are not written again.
    """
    settings = settings or RoutingSettings()
    configure_logging(f"{settings.service_name}-seed", settings.log_level, settings.log_json)
    source = path if path is not None else settings.directory_seed
    if source is None:
        print(
            "no seed file given (argument or BEELDPORTAAL_ROUTING_DIRECTORY_SEED)", file=sys.stderr
        )
        return 2
    try:
        directory = Directory.load_yaml(source)
    except DirectoryError as exc:
        print(f"refused: the seed file has {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        log.error("directory seed refused", file=str(source), problems=len(exc.problems))
        return 2
    outcome = asyncio.run(publish_seed(directory, settings, topic))
    log.info(
        "directory seeded",
        file=str(source),
        published=outcome.published,
        unchanged=len(outcome.unchanged),
    )
    print(f"published {len(outcome.published)}, unchanged {len(outcome.unchanged)}")
    return 0

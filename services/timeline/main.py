"""Process entry points of the timeline: ``serve`` (the FHIR, access-log and DICOMweb API),
``project`` (the projection worker) and ``rebuild`` (replay the topics into the read model)."""

from __future__ import annotations

import asyncio

from services.timeline.config import TimelineSettings
from shared import runtime


def project(settings: TimelineSettings | None = None) -> int:
    """Run the projection worker until SIGTERM (``beeldportaal timeline project``)."""
    from services.timeline.entrypoints.projection import main

    main(settings or TimelineSettings())
    return 0


def rebuild(settings: TimelineSettings | None = None) -> int:
    """Replace the projection tables with what the topics give (``beeldportaal timeline
    rebuild``); the projection worker must be stopped first. Exit status 1 when refused or
    failed."""
    from services.timeline.entrypoints.rebuild import RebuildRefused
    from services.timeline.entrypoints.rebuild import rebuild as replay
    from shared import migrations
    from shared.errors import TransientError
    from shared.logging import configure_logging, get_logger

    settings = settings or TimelineSettings()
    configure_logging("timeline-rebuild", settings.log_level, settings.log_json)
    migrations.migrate(settings.postgres.conninfo)
    try:
        runtime.run(replay(settings))
    except RebuildRefused as exc:
        get_logger(__name__).error("rebuild refused", reason=str(exc))
        return 1
    except TransientError as exc:  # Kafka or PostgreSQL away, or the swap kept from its locks
        get_logger(__name__).error("rebuild failed; run it again", reason=str(exc))
        return 1
    return 0


# --- serve: the API ---------------------------------------------------------------------------


async def _serve(settings: TimelineSettings) -> None:
    from services.timeline.adapters.store import PostgresTimeline
    from services.timeline.bootstrap import build
    from services.timeline.entrypoints.http import create_app
    from shared import migrations
    from shared.http import http_server
    from shared.logging import get_logger

    # The API may start before the projection worker: the schema is the same either way.
    await asyncio.to_thread(migrations.migrate, settings.postgres.conninfo)
    reader = PostgresTimeline(settings.postgres.conninfo, pool_size=settings.pool_size)
    server = http_server(
        create_app(build(settings, reader=reader)), settings.http_host, settings.http_port
    )
    get_logger(__name__).info(
        "timeline API starting", url=f"http://{settings.http_host}:{settings.http_port}"
    )
    await server.serve()


def serve(settings: TimelineSettings | None = None) -> int:
    """Run the timeline API until SIGTERM/SIGINT (``beeldportaal timeline serve``)."""
    from shared.logging import configure_logging

    settings = settings or TimelineSettings()
    configure_logging(settings.service_name, settings.log_level, settings.log_json)
    runtime.run(_serve(settings))
    return 0

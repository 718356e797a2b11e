"""Process entry points of ingest: `serve` (STOW-RS + C-STORE SCP) and `assemble` (faust agent)."""

from __future__ import annotations

import logging

from services.ingest.bootstrap import build
from services.ingest.config import IngestSettings
from shared import runtime
from shared.http import http_server
from shared.logging import configure_logging, get_logger

log = get_logger(__name__)


async def _serve(settings: IngestSettings) -> None:
    from services.ingest.entrypoints.http import create_app
    from services.ingest.entrypoints.scp import StoreSCP

    ingest = build(settings)
    ingest.scp = StoreSCP()
    server = http_server(create_app(ingest), settings.http_host, settings.http_port)
    log.info(
        "ingest starting",
        stow=f"http://{settings.http_host}:{settings.http_port}/dicomweb/to/{{URA}}/studies",
        dimse=f"{settings.dimse_host}:{settings.dimse_port}",
    )
    # uvicorn handles SIGTERM/SIGINT: it stops accepting, drains requests in flight, then runs
    # the lifespan exit, which stops the SCP (finishing open associations) and then the producer.
    await server.serve()


def serve(settings: IngestSettings | None = None) -> int:
    settings = settings or IngestSettings()
    configure_logging(settings.service_name, settings.log_level, settings.log_json)
    # pynetdicom logs a line per received instance at INFO; our own log says what matters.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    runtime.run(_serve(settings))
    return 0


def assemble(settings: IngestSettings | None = None) -> int:
    """Run the study assembly worker (aiokafka, ``services.ingest.entrypoints.assembler``)."""
    from services.ingest.entrypoints.assembler import main

    main(settings or IngestSettings())  # configures its own logging
    return 0

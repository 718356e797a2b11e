"""Process entry points of consent: `serve` (the consent API) and `decide` (the decision worker)."""

from __future__ import annotations

from services.consent.bootstrap import build
from services.consent.config import ConsentSettings
from shared import runtime
from shared.http import http_server
from shared.logging import configure_logging, get_logger

log = get_logger(__name__)


async def _serve(settings: ConsentSettings) -> None:
    from services.consent.entrypoints.http import create_app

    api = build(settings)
    server = http_server(create_app(api), settings.http_host, settings.http_port)
    log.info("consent API starting", url=f"http://{settings.http_host}:{settings.http_port}")
    await server.serve()


def serve(settings: ConsentSettings | None = None) -> int:
    settings = settings or ConsentSettings()
    configure_logging(settings.service_name, settings.log_level, settings.log_json)
    runtime.run(_serve(settings))
    return 0


def decide(settings: ConsentSettings | None = None) -> int:
    """Run the decision worker until stopped (``beeldportaal consent decide``)."""
    from services.consent.entrypoints.decisions import main

    main(settings or ConsentSettings())  # configures its own logging
    return 0

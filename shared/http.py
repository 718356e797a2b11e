"""How a service serves its FastAPI app: uvicorn, our JSON logs, a graceful stop, and the
operational routes every service has."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import uvicorn
from fastapi import Request, Response
from fastapi.responses import JSONResponse

from shared.metrics import ServiceMetrics
from shared.runtime import tune_gc

# uvicorn handles SIGTERM/SIGINT: it stops accepting, drains requests in flight for up to this
# long, then runs the app's lifespan shutdown.
GRACEFUL_SHUTDOWN_SECONDS = 30


def http_server(app: Any, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server for ``app``; ``await server.serve()`` runs it until SIGTERM/SIGINT."""
    tune_gc()
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,  # our JSON logging (shared.logging)
            access_log=False,  # an access log adds nothing the metrics do not have
            lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
    )


def add_operational_routes(
    app: Any,
    readiness: Callable[[], Mapping[str, bool]],
    metrics: ServiceMetrics,
    *,
    not_ready: str,
) -> None:
    """``/healthz`` (the process answers), ``/readyz`` (every check in ``readiness()`` holds,
    503 otherwise; ``not_ready`` documents when) and ``/metrics`` (Prometheus)."""

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: {"description": not_ready}})
    async def readyz() -> Response:
        checks = dict(readiness())
        ready = all(checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["operations"])
    async def prometheus(request: Request) -> Response:
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

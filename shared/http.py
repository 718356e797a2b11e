"""The one way a service serves its FastAPI app: uvicorn, our JSON logs, a graceful stop."""

from __future__ import annotations

from typing import Any

import uvicorn

# uvicorn handles SIGTERM/SIGINT: it stops accepting, drains requests in flight for up to this
# long, then runs the app's lifespan shutdown.
GRACEFUL_SHUTDOWN_SECONDS = 30


def http_server(app: Any, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server for ``app``; ``await server.serve()`` runs it until SIGTERM/SIGINT."""
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

"""The provider directory API (``/providers``) plus /healthz, /readyz, /metrics.

Anyone with a valid token may look providers up; what they see is the public view (no secrets,
no network addresses). Only an operator may register, change or remove an entry, and a write
answers only once this process's view has applied it, so a read right after sees it.

Refusals list every problem as ``field: reason`` and never quote the input: a refused entry
may carry credentials, and error bodies end up in logs and browser consoles.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from services.routing.adapters.directory_view import Written
from services.routing.bootstrap import Routing
from services.routing.domain.directory import Provider, PublicProvider
from shared.auth import Principal, require_role
from shared.errors import TransientError
from shared.http import BodyLimitMiddleware, CorrelationMiddleware
from shared.logging import get_logger
from shared.topic_view import ViewFailed

log = get_logger(__name__)

OPERATOR = "operator"
_URA = re.compile(r"[0-9]{8}")
# A provider entry is a few KB; anything far larger is not an entry.
MAX_BODY_BYTES = 256 * 1024
RETRY_AFTER = {"Retry-After": "5"}

_PROBLEMS = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "detail": {"type": "string"},
                    "problems": {"type": "array", "items": {"type": "string"}},
                },
            }
        }
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "The URA in the path is not 8 digits."},
    401: {"description": "No bearer token, or an invalid one."},
    503: {"description": "The directory is still loading, or the write is not yet visible."},
}
_WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    403: {"description": "Only an operator may change the directory."},
    404: {"description": "No provider with this URA."},
    413: {"description": "The body is too large to be a provider entry."},
    422: {"description": "The entry is refused; every problem is listed.", **_PROBLEMS},
}


class Refused(Exception):
    """A request refused with a status and a list of problems (rendered without input)."""

    def __init__(self, status: int, detail: str, problems: list[str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.problems = problems or []


def _render_loc(loc: tuple[int | str, ...] | list[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(request)"


def request_problems(errors: Any) -> list[str]:
    """``where: what`` for each error of a RequestValidationError; inputs are left out."""
    problems = []
    for item in errors:
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append(f"{_render_loc(tuple(item.get('loc', ())))}: {message}")
    return problems


def _checked_ura(ura: str) -> str:
    if not _URA.fullmatch(ura):
        raise Refused(400, "a URA is 8 digits (quote it; leading zeros count)")
    return ura


def build_router(routing: Routing) -> APIRouter:
    router = APIRouter(prefix="/providers", tags=["directory"])
    authenticated = routing.principal_dependency
    operator = require_role(OPERATOR, authenticate=authenticated)
    directory = routing.directory
    timeout = routing.settings.view_sync_timeout_seconds

    def loaded() -> None:
        # Answering from a half-read directory would say "unknown" about providers that exist.
        if directory.failed:
            raise Refused(503, "the directory view stopped on a record it cannot apply")
        if not directory.is_caught_up:
            raise Refused(503, "the directory is still loading")

    async def visible(written: Written) -> None:
        try:
            await directory.wait_for(written, timeout)
        except (TimeoutError, ViewFailed):
            raise Refused(503, "written, but not yet visible here; read it again shortly") from None

    @router.get("", summary="Search providers by URA, name or city", responses=_ERRORS)
    async def search(
        _principal: Principal = Depends(authenticated),  # noqa: B008  (a local: see shared.auth)
        q: Annotated[str, Query(max_length=200, description="URA, name or city words")] = "",
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> list[PublicProvider]:
        loaded()
        return [p.public_view() for p in directory.search(q, limit=limit)]

    @router.get("/{ura}", summary="One provider's public entry", responses=_WRITE_ERRORS)
    async def get_provider(
        ura: str,
        _principal: Principal = Depends(authenticated),  # noqa: B008
    ) -> PublicProvider:
        _checked_ura(ura)
        loaded()
        provider = directory.get(ura)
        if provider is None:
            raise Refused(404, f"no provider with URA {ura}")
        return provider.public_view()

    @router.put(
        "/{ura}",
        summary="Register or replace a provider (operator)",
        responses={**_WRITE_ERRORS, 201: {"description": "Registered."}},
    )
    async def put_provider(
        ura: str,
        response: Response,
        provider: Annotated[Provider, Body(description="The full entry, secrets included.")],
        principal: Principal = Depends(operator),  # noqa: B008
    ) -> PublicProvider:
        _checked_ura(ura)
        if provider.ura != ura:
            raise Refused(422, "the entry is refused", ["body.ura: is not the URA in the path"])
        loaded()
        current = directory.get(ura)
        if current == provider:
            # Unchanged: nothing to write (an idempotent PUT keeps the topic short).
            routing.metrics.directory_writes.labels("unchanged").inc()
            return provider.public_view()
        try:
            written = await routing.writer.put(provider)
        except TransientError as exc:
            log.error("directory write failed", ura=ura, error=str(exc))
            raise Refused(503, "the directory cannot be written now; try again") from None
        await visible(written)
        routing.metrics.directory_writes.labels("put").inc()
        log.info(
            "directory entry written",
            ura=ura,
            created=current is None,
            by_ura=principal.organisation_ura,
            by=principal.subject,
        )
        response.status_code = 201 if current is None else 200
        return provider.public_view()

    @router.delete(
        "/{ura}",
        summary="Remove a provider (operator)",
        status_code=204,
        response_class=Response,
        responses=_WRITE_ERRORS,
    )
    async def delete_provider(
        ura: str,
        principal: Principal = Depends(operator),  # noqa: B008
    ) -> Response:
        _checked_ura(ura)
        loaded()
        try:
            # Another replica may have registered it a moment ago: look at the latest state.
            await directory.sync(timeout)
        except (TimeoutError, ViewFailed, TransientError):
            raise Refused(503, "the directory cannot be read now; try again") from None
        if directory.get(ura) is None:
            raise Refused(404, f"no provider with URA {ura}")
        try:
            written = await routing.writer.remove(ura)
        except TransientError as exc:
            log.error("directory write failed", ura=ura, error=str(exc))
            raise Refused(503, "the directory cannot be written now; try again") from None
        await visible(written)
        routing.metrics.directory_writes.labels("remove").inc()
        log.info(
            "directory entry removed",
            ura=ura,
            by_ura=principal.organisation_ura,
            by=principal.subject,
        )
        return Response(status_code=204)

    return router


def add_operational_routes(app: FastAPI, routing: Routing) -> None:
    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> Response:
        checks = routing.readiness()
        ready = all(checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["operations"])
    async def metrics(request: Request) -> Response:
        body, content_type = routing.metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)


def create_app(routing: Routing) -> FastAPI:
    app = FastAPI(
        title="beeldportaal routing",
        description="The provider directory: who receives studies, and how.",
        version="0.1.0",
        lifespan=routing.lifespan,
    )

    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES, what="a provider entry")
    # Added last, so outermost: a refused body gets its correlation id too.
    app.add_middleware(CorrelationMiddleware)

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused) -> JSONResponse:
        body: dict[str, Any] = {"detail": exc.detail}
        if exc.problems:
            body["problems"] = exc.problems
        headers = RETRY_AFTER if exc.status == 503 else None
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes every input value: the secrets of a refused entry too.
        problems = request_problems(exc.errors())
        return JSONResponse({"detail": "the request is refused", "problems": problems}, 422)

    app.include_router(build_router(routing))
    add_operational_routes(app, routing)
    return app

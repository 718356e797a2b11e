"""STOW-RS routes (``/dicomweb/to/{URA}/studies[/{uid}]``) plus /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections import Counter
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from services.ingest.adapters.multipart import (
    MalformedMultipart,
    RelatedType,
    SpooledPart,
    UnsupportedMediaType,
    iter_parts,
    parse_content_type,
)
from services.ingest.bootstrap import Ingest
from services.ingest.domain.status import Status
from services.ingest.domain.stow_response import InstanceResult, http_status, response_body
from services.ingest.handlers.store import Outcome, Received, Submission
from shared.auth import Principal
from shared.events import IngestChannel, Urgency
from shared.events.ingest import MAX_SENDER_ENDPOINT
from shared.http import CorrelationMiddleware
from shared.identifiers import contains_written_bsn
from shared.logging import get_logger

log = get_logger(__name__)

DICOM_JSON = "application/dicom+json"
NOTE_HEADER = "X-Beeldportaal-Note"
URGENCY_HEADER = "X-Beeldportaal-Urgency"
COMPLETE_HEADER = "X-Beeldportaal-Study-Complete"
# The status counted for a request whose client went away before its answer (nginx's).
CLIENT_CLOSED_REQUEST = 499
# Who sends: a care provider (a person) or a hospital's system (its PACS, a gateway); not a
# patient's representative, a consent authority or an operator.
SENDING_ROLES = frozenset({"provider", "system"})


def build_router(ingest: Ingest) -> APIRouter:
    router = APIRouter()
    principal = ingest.principal_dependency
    # Every request that got past authentication, refused or not (every answer, 401 included,
    # is counted by status in ``IngestMetrics.answered``).
    timed = ingest.metrics.request_duration.labels("stow-rs").time

    async def stow(
        request: Request,
        ura: str,
        study_uid: str | None,
        sender: Principal,
        note: str | None,
        urgency: str | None,
        complete: str | None,
    ) -> Response:
        # Refused before a single body byte is read or stored: a sender the portal does not
        # know (the token's organisation must be in the peers file, as a DIMSE sender's AE
        # title must), a token that is no sender's, a recipient it does not know.
        def refused(status: int, detail: str) -> HTTPException:
            # On the record for the operator too (a sender misconfigured, or someone probing).
            log.info("STOW-RS request refused", status=status, reason=detail,
                     sender=sender.organisation_ura, recipient=ura)  # fmt: skip
            return HTTPException(status, detail)

        if not ingest.peers.knows(sender.organisation_ura):
            raise refused(
                403, f"organisation {sender.organisation_ura} does not send through this portal"
            )
        if not sender.has_role(*SENDING_ROLES):
            raise refused(
                403, f"sending needs a token with the role {' or '.join(sorted(SENDING_ROLES))}"
            )
        if not ingest.peers.knows(ura):
            raise refused(404, f"no organisation with URA {ura} receives through this portal")
        if sender.client_id is not None and len(sender.client_id) > MAX_SENDER_ENDPOINT:
            # Recorded with every instance (instance-stored's sender_endpoint): refused before
            # any byte is stored rather than failing each instance after its write.
            raise HTTPException(
                401, f"the token's client_id is longer than {MAX_SENDER_ENDPOINT} characters"
            )
        try:
            related = parse_content_type(request.headers.get("content-type"))
        except UnsupportedMediaType as exc:
            raise HTTPException(415, str(exc)) from None
        submission = Submission(
            sender_ura=sender.organisation_ura,
            recipient_ura=ura,
            channel=IngestChannel.STOW_RS,
            correlation_id=request.state.correlation_id,
            sender_user=sender.user_uzi,
            sender_endpoint=sender.client_id,
            urgency=_urgency(urgency),
            sender_note=_note(note),
            completes_study=_flag(complete),
            expected_study_uid=study_uid,
        )
        try:
            results, broken = await _store_parts(ingest, request, related, submission)
        except ClientDisconnect:
            # Nobody to answer; what was stored before stays stored and announced (a resend
            # finds it), and the request completes no study. 499 for the metrics, as nginx.
            log.warning("STOW-RS client went away mid-request", sender=submission.sender_ura)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        status = http_status(results)
        if broken is not None:
            if not results:  # 400, or 413 (PayloadTooLarge) for the limits
                raise HTTPException(broken.status_code, f"multipart/related body refused: {broken}")
            # What the parts say decides the status (all of them A700 stays a 503 to retry);
            # the break makes an all-stored answer a partial one.
            status = 202 if status == 200 else status
            # The parts before the break are handled (stored and announced, or refused): the
            # answer says which, and the rest as one failure. The request did not complete
            # the study, whatever it said.
            log.warning(
                "STOW-RS body broke off after some parts",
                parts=len(results),
                error=str(broken),
                sender=submission.sender_ura,
            )
            results.append(
                InstanceResult(
                    Status.CANNOT_UNDERSTAND,
                    f"the body broke off after part {len(results)} and was not read further "
                    f"({broken}): send the instances not listed as stored again",
                    None,
                    None,
                    None,
                    stored=False,
                )
            )
        elif submission.completes_study:
            await ingest.store.request_ended(submission, _stored_per_study(results))
        study_url = _study_url(ingest, results, study_uid)
        headers = _warning_headers(results)
        if status == 503:
            headers["Retry-After"] = "5"
        return JSONResponse(
            response_body(results, study_url),
            status_code=status,
            media_type=DICOM_JSON,
            headers=headers,
        )

    @router.post("/dicomweb/to/{ura}/studies", tags=["STOW-RS"], summary="Store instances")
    async def store_instances(
        request: Request,
        ura: str,
        sender: Principal = Depends(principal),  # noqa: B008  (a local: see shared.auth)
        note: Annotated[str | None, Header(alias=NOTE_HEADER)] = None,
        urgency: Annotated[str | None, Header(alias=URGENCY_HEADER)] = None,
        complete: Annotated[str | None, Header(alias=COMPLETE_HEADER)] = None,
    ) -> Response:
        with timed():
            return await stow(request, ura, None, sender, note, urgency, complete)

    @router.post(
        "/dicomweb/to/{ura}/studies/{study_uid}",
        tags=["STOW-RS"],
        summary="Store instances of one study",
    )
    async def store_study_instances(
        request: Request,
        ura: str,
        study_uid: str,
        sender: Principal = Depends(principal),  # noqa: B008  (a local: see shared.auth)
        note: Annotated[str | None, Header(alias=NOTE_HEADER)] = None,
        urgency: Annotated[str | None, Header(alias=URGENCY_HEADER)] = None,
        complete: Annotated[str | None, Header(alias=COMPLETE_HEADER)] = None,
    ) -> Response:
        with timed():
            return await stow(request, ura, study_uid, sender, note, urgency, complete)

    return router


async def _store_parts(
    ingest: Ingest, request: Request, related: RelatedType, submission: Submission
) -> tuple[list[InstanceResult], MalformedMultipart | None]:
    """Each part's result, in order, and what broke the body off (the parts before it were
    handled all the same: what they stored is stored and announced)."""
    settings = ingest.settings
    slots = asyncio.Semaphore(settings.store_concurrency)
    tasks: list[asyncio.Task[InstanceResult]] = []

    async def one(part: SpooledPart) -> InstanceResult:
        try:
            if part.content_type is not None and part.media_type != "application/dicom":
                return InstanceResult(
                    Status.CANNOT_UNDERSTAND,
                    f"part {part.index + 1} is {part.media_type}, not application/dicom",
                    None,
                    None,
                    None,
                    stored=False,
                )
            outcome = await ingest.store.store(
                Received(part.file, part.size, part.sha256), submission
            )
            return _result(ingest, outcome)
        finally:
            part.close()
            slots.release()

    broken: MalformedMultipart | None = None
    # A client that goes away (ClientDisconnect) ends the parts too: raised once they are done.
    try:
        async for part in iter_parts(
            request.stream(),
            related,
            spool_memory=settings.spool_memory_bytes,
            max_part_bytes=settings.max_instance_bytes,
            max_parts=settings.max_instances_per_request,
            spool_dir=str(settings.spool_dir) if settings.spool_dir else None,
        ):
            # Backpressure: at most store_concurrency parts are spooled and in flight.
            await slots.acquire()
            tasks.append(asyncio.create_task(one(part)))
    except MalformedMultipart as exc:
        broken = exc
    finally:
        done = await asyncio.gather(*tasks, return_exceptions=True)
    results: list[InstanceResult] = []
    for item in done:
        if isinstance(item, BaseException):
            log.error("storing a part failed unexpectedly", error=repr(item))
            results.append(
                InstanceResult(
                    Status.PROCESSING_FAILURE, "internal error", None, None, None, stored=False
                )
            )
        else:
            results.append(item)
    return results, broken


def _result(ingest: Ingest, outcome: Outcome) -> InstanceResult:
    url = None
    if outcome.ok and ingest.retrieve_base is not None:
        url = (
            f"{ingest.retrieve_base}/studies/{outcome.study_instance_uid}"
            f"/series/{outcome.stored.series_instance_uid}"  # type: ignore[union-attr]
            f"/instances/{outcome.sop_instance_uid}"
        )
    return InstanceResult(
        outcome.status,
        outcome.reason,
        outcome.sop_class_uid,
        outcome.sop_instance_uid,
        outcome.study_instance_uid,
        stored=outcome.ok,
        retrieve_url=url,
    )


def _stored_per_study(results: list[InstanceResult]) -> Counter[str]:
    return Counter(r.study_instance_uid for r in results if r.stored and r.study_instance_uid)


def _study_url(ingest: Ingest, results: list[InstanceResult], study_uid: str | None) -> str | None:
    if ingest.retrieve_base is None:
        return None
    studies = {r.study_instance_uid for r in results if r.stored}
    uid = study_uid or (next(iter(studies)) if len(studies) == 1 else None)
    return f"{ingest.retrieve_base}/studies/{uid}" if uid else None


def _warning_headers(results: list[InstanceResult]) -> dict[str, str]:
    reasons = sorted({f"{int(r.status):04X} {r.reason}" for r in results if not r.stored})
    if not reasons:
        return {}
    shown = "; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else "")
    text = shown.replace('"', "'").encode("latin-1", "replace").decode("latin-1")
    return {"Warning": f'299 beeldportaal "{text}"'}


def _urgency(value: str | None) -> Urgency:
    if value is None or not value.strip():
        return Urgency.ROUTINE
    try:
        return Urgency(value.strip().lower())
    except ValueError:
        allowed = ", ".join(u.value for u in Urgency)
        raise HTTPException(400, f"{URGENCY_HEADER} must be one of {allowed}") from None


def _note(value: str | None) -> str | None:
    # HTTP header values are Latin-1; a note in any language is sent percent-encoded UTF-8.
    if value is None or not value.strip():
        return None
    try:
        note = urllib.parse.unquote(value.strip(), errors="strict")
    except UnicodeDecodeError:
        raise HTTPException(400, f"{NOTE_HEADER} must be percent-encoded UTF-8") from None
    if len(note) > 2000:
        raise HTTPException(400, f"{NOTE_HEADER} is longer than 2000 characters")
    if contains_written_bsn(note):
        # The note travels with the study on the bus: no BSN in clear there.
        raise HTTPException(
            400, f"{NOTE_HEADER} holds what looks like a BSN; leave patient numbers out of it"
        )
    return note


def _flag(value: str | None) -> bool:
    if value is None:
        return False
    lowered = value.strip().lower()
    if lowered in {"true", "1", "yes"}:
        return True
    if lowered in {"false", "0", "no", ""}:
        return False
    raise HTTPException(400, f"{COMPLETE_HEADER} must be true or false")


def add_operational_routes(app: FastAPI, ingest: Ingest) -> None:
    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> Response:
        checks = await ingest.readiness()
        ready = all(checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["operations"])
    async def metrics(request: Request) -> Response:
        body, content_type = ingest.metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)


def create_app(ingest: Ingest) -> FastAPI:
    app = FastAPI(
        title="beeldportaal ingest",
        description="DICOMweb STOW-RS front door: hospitals send studies addressed to a provider.",
        version="0.1.0",
        lifespan=ingest.lifespan,
    )

    app.add_middleware(CorrelationMiddleware, on_response=ingest.metrics.answered)
    app.include_router(build_router(ingest))
    add_operational_routes(app, ingest)
    return app

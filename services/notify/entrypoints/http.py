"""The notify API: a sender's view of its studies, the dead letters, and the portal pickup.

- ``GET /studies/{uid}/status`` (provider): how each version of a study the caller's own
  organisation sent is doing, from received to delivered. Anyone else gets 404, never 403: the
  answer must not tell another organisation that a study exists. An operator sees every version
  whoever sent it (the same as ``beeldportaal study status UID``).
- ``GET /dead-letters``, ``POST /dead-letters/{key}/redrive``, ``POST /dead-letters/redrive``
  (operator): deliveries notify gave up on, and putting them back on their queue.
- ``GET /pickup/{token}`` (provider of the link's recipient): the study version as a zip,
  streamed from S3, for providers without a PACS integration. Every attempt, the download and
  each refusal, is a NEN 7513 record on ``access-logged`` that Kafka acknowledged before the
  answer (:class:`PickupAudit`); the timeline loads it into the patient's access log.

No answer holds patient data: no BSN, no pseudonym, no name; only UIDs, URAs, endpoint ids and
what happened. Errors are problem documents (RFC 9457) that never quote the request.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from services.notify.adapters.dead_letters import KEY_PATTERN, DeadLetter, Redriven
from services.notify.adapters.journey_view import (
    EndpointJourney,
    Pickup,
    PickupInstance,
    State,
    VersionJourney,
)
from services.notify.bootstrap import NotifyApi
from services.notify.domain.pickup import (
    MAX_TOKEN_CHARS,
    ExpiredPickupToken,
    MalformedPickupToken,
    PickupGrant,
    TamperedPickupToken,
    ZipMember,
    dicom_entry_name,
    verify_pickup,
    zip_entries,
)
from shared.audit import AuditUnavailable
from shared.auth import Principal, require_role
from shared.errors import TransientError
from shared.events import (
    AccessLogged,
    AuditAction,
    AuditOutcome,
    Basis,
    Decision,
    DeliveryChannel,
    InstanceOutcomes,
    Urgency,
)
from shared.http import CorrelationMiddleware, add_operational_routes
from shared.logging import get_logger, scrub_bsns
from shared.storage.port import ObjectStoreError, read_verified
from shared.topic_view import ViewFailed

log = get_logger(__name__)

PROVIDER = "provider"
OPERATOR = "operator"
PROBLEM_JSON = "application/problem+json"
ZIP = "application/zip"
UID_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$"
_READ_CHUNK = 1024 * 1024
_NOT_TAKEN = "Kafka did not take the re-drive; nothing changed, try again"
PICKUP_ROUTE = "/pickup/{token}"
# The NEN 7513 event type of a pickup attempt, and what an allowed download rests on.
PICKUP_EVENT = "portal-pickup"
PICKUP_BASIS = "pickup link for the recipient of a routed delivery"


# --- answers --------------------------------------------------------------------------------------


class ConsentOut(BaseModel):
    """The consent decision for the targeted send (purpose delivery)."""

    decision: Decision
    basis: Basis
    flagged: bool


class RouteOut(BaseModel):
    destination_ura: str
    endpoint_id: str
    channel: DeliveryChannel
    priority: Urgency | None


class RouteFailureOut(BaseModel):
    reason_code: str | None
    reason: str
    failed_at: datetime


class FailedAttemptOut(BaseModel):
    attempt: int
    reason: str
    final: bool
    next_attempt_at: datetime | None
    failed_at: datetime


class DeliveryOut(BaseModel):
    destination_ura: str
    endpoint_id: str
    channel: DeliveryChannel
    # delivered; retrying (an attempt failed, another is planned); failed (given up: an
    # operator may re-drive it); pending (routed, no attempt has ended yet).
    state: Literal["delivered", "retrying", "failed", "pending"]
    outcomes: InstanceOutcomes | None = None
    attempts: int | None = None
    delivered_at: datetime | None = None
    last_failure: FailedAttemptOut | None = None


class VersionStatus(BaseModel):
    version: int
    sender_ura: str | None
    # received → consent-checked → routed → delivered | failed | not-routed
    state: State
    recipient_ura: str | None
    instances: int | None
    first_received_at: datetime | None
    last_received_at: datetime | None
    # When ingest announced the version complete (study-received).
    announced_at: datetime | None
    consent: ConsentOut | None
    routes: list[RouteOut]
    route_failure: RouteFailureOut | None
    deliveries: list[DeliveryOut]


class StudyStatus(BaseModel):
    study_instance_uid: str
    # False when the view could not confirm, in time, that it holds everything already
    # published: the answer may then be a moment behind.
    fresh: bool
    versions: list[VersionStatus]


class DeadLetterOut(BaseModel):
    key: str
    study_instance_uid: str
    study_version: int
    destination_ura: str
    endpoint_id: str
    channel: DeliveryChannel
    priority: Urgency
    attempts: int
    last_failure: str | None
    # When the run that died was queued: routed, or re-driven (the previous run's death).
    first_queued_at: datetime
    dead_since: datetime


class DeadLetterList(BaseModel):
    fresh: bool
    count: int
    dead_letters: list[DeadLetterOut]


class RedrivenOut(BaseModel):
    key: str
    study_instance_uid: str
    study_version: int
    destination_ura: str
    endpoint_id: str
    priority: Urgency
    queue: str
    event_id: str
    # False: re-driven (durably), but this replica's list may show it for a moment longer.
    visible: bool


class RedriveAll(BaseModel):
    count: int
    redriven: list[RedrivenOut]


def _reason(text: str | None) -> str | None:
    # Reasons are written by our own services without patient data; masked anyway, should a
    # receiver's error text ever have carried one through.
    return scrub_bsns(text) if text is not None else None


def _delivery(endpoint: EndpointJourney) -> DeliveryOut:
    failure = endpoint.failure
    delivered = endpoint.delivered
    return DeliveryOut(
        destination_ura=endpoint.destination_ura,
        endpoint_id=endpoint.endpoint_id,
        channel=endpoint.channel,
        state=endpoint.state,
        outcomes=delivered.outcomes if delivered else None,
        attempts=delivered.attempts if delivered else None,
        delivered_at=delivered.delivered_at if delivered else None,
        last_failure=FailedAttemptOut(
            attempt=failure.attempt,
            reason=_reason(failure.reason) or "",
            final=failure.final,
            next_attempt_at=failure.next_attempt_at,
            failed_at=failure.failed_at,
        )
        if failure is not None and delivered is None
        else None,
    )


def version_status(journey: VersionJourney) -> VersionStatus:
    endpoints = sorted(journey.endpoints.values(), key=lambda e: (e.destination_ura, e.endpoint_id))
    consent = journey.consent
    failure = journey.route_failure
    return VersionStatus(
        version=journey.version,
        sender_ura=journey.sender_ura,
        state=journey.state,
        recipient_ura=journey.recipient_ura,
        instances=journey.instances,
        first_received_at=journey.first_received_at,
        last_received_at=journey.last_received_at,
        announced_at=journey.announced_at,
        consent=ConsentOut(decision=consent.decision, basis=consent.basis, flagged=consent.flagged)
        if consent is not None
        else None,
        routes=[
            RouteOut(
                destination_ura=e.destination_ura,
                endpoint_id=e.endpoint_id,
                channel=e.channel,
                priority=e.priority,
            )
            for e in endpoints
            if e.routed
        ],
        route_failure=RouteFailureOut(
            reason_code=failure.reason_code,
            reason=_reason(failure.reason) or "",
            failed_at=failure.failed_at,
        )
        if failure is not None
        else None,
        deliveries=[_delivery(e) for e in endpoints],
    )


def _dead_letter(letter: DeadLetter) -> DeadLetterOut:
    return DeadLetterOut(
        key=letter.key,
        study_instance_uid=letter.study_instance_uid,
        study_version=letter.study_version,
        destination_ura=letter.destination_ura,
        endpoint_id=letter.endpoint_id,
        channel=letter.channel,
        priority=letter.priority,
        attempts=letter.attempts,
        last_failure=_reason(letter.last_failure),
        first_queued_at=letter.first_queued_at,
        dead_since=letter.dead_since,
    )


def _redriven(item: Redriven) -> RedrivenOut:
    return RedrivenOut(
        key=item.key,
        study_instance_uid=item.study_instance_uid,
        study_version=item.study_version,
        destination_ura=item.destination_ura,
        endpoint_id=item.endpoint_id,
        priority=item.priority,
        queue=item.queue,
        event_id=str(item.event_id),
        visible=item.visible,
    )


# --- problems -------------------------------------------------------------------------------------


class Problem(Exception):
    """A refusal rendered as ``application/problem+json``; ``detail`` never quotes input."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
    },
}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_JSON: {"schema": _PROBLEM_SCHEMA}}}


_AUTH: dict[int | str, dict[str, Any]] = {
    401: {"description": "No bearer token, or an invalid one."},
    403: {"description": "The token lacks the role."},
}
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: _problem("The read models are still loading, or Kafka is unavailable.")
}


def _require_ready(view: Any, what: str) -> None:
    # Answering from a half-read view would say "no such study" about studies that exist.
    if view.failed:
        raise Problem(503, "Unavailable", f"the {what} view stopped; the service needs a restart")
    if not view.is_caught_up:
        raise Problem(503, "Unavailable", f"the {what} view is still reading its topics")


async def _synced(view: Any, timeout: float) -> bool:
    """True once the view holds everything published before now; False if not in time."""
    try:
        async with asyncio.timeout(timeout):
            await view.sync(timeout)
    except (TimeoutError, TransientError, ViewFailed) as exc:
        log.warning("view could not sync; answering from what it holds", error=str(exc))
        return False
    return True


# --- pickup stream --------------------------------------------------------------------------------


async def _pickup_of(api: NotifyApi, grant: PickupGrant) -> Pickup | None:
    """What the link grants, as the journey view holds it; else as it holds it once it has read
    what was published before now (a link may be sent a moment after its route)."""
    key = (grant.study_instance_uid, grant.study_version, grant.recipient_ura, grant.sender_ura)
    found = api.journey.pickup(*key)
    if found is None and await _synced(api.journey, api.settings.view_sync_timeout_seconds):
        found = api.journey.pickup(*key)
    return found


def _verified_chunks(api: NotifyApi, instance: PickupInstance) -> Iterator[bytes]:
    """The object's bytes as stored, hashed on the way.

    The last chunk is held back until the whole object hashes to the sha256 ingest recorded; a
    mismatch raises instead, which breaks the download off (no last chunk of this member, no
    central directory, no final HTTP chunk): the recipient gets a failed download, never a
    readable zip with altered bytes in it. Hashing while streaming reads S3 once.
    """
    for chunk in read_verified(api.objects, instance.object_key, instance.sha256, _READ_CHUNK):
        api.metrics.pickup_bytes.inc(len(chunk))
        yield chunk


def _pickup_stream(
    api: NotifyApi,
    manifest: tuple[PickupInstance, ...],
    modified: datetime | None,
    study_instance_uid: str,
    version: int,
) -> Iterator[bytes]:
    members = (
        ZipMember(
            dicom_entry_name(i.series_instance_uid, i.sop_instance_uid),
            _verified_chunks(api, i),
            i.size,
        )
        for i in manifest
    )
    try:
        yield from zip_entries(members, modified=modified)
    except GeneratorExit:
        api.metrics.pickup("aborted")  # the recipient went away
        raise
    except Exception as exc:
        api.metrics.pickup("aborted")
        log.error(
            "pickup download aborted",
            study_instance_uid=study_instance_uid,
            study_version=version,
            error=type(exc).__name__,
            detail=str(exc),
        )
        raise
    api.metrics.pickup("ok")


# --- pickup audit ---------------------------------------------------------------------------------


class PickupAudit:
    """The NEN 7513 record of one pickup attempt, kept (Kafka acknowledged it) before the answer.

    Every attempt by an authenticated caller is recorded: the download (allowed) and each
    refusal (denied), naming the study whenever the link is genuine and the patient's
    pseudonym whenever the journey view knows it, so the patient's access-log search shows who
    tried. A record Kafka does not take refuses the request with 503: nothing is disclosed.
    """

    def __init__(self, api: NotifyApi, request: Request, principal: Principal) -> None:
        self._api = api
        self._principal = principal
        client = request.client.host if request.client else "unknown"
        # The route's template, never the path: the token stays out of the audit trail.
        self._access_point = f"GET {PICKUP_ROUTE} from {client}"[:256]
        self._correlation_id = (getattr(request.state, "correlation_id", None) or uuid.uuid4().hex)[
            :128
        ]

    async def allowed(self, grant: PickupGrant, found: Pickup) -> None:
        # Counted "ok" (or "aborted") when the stream ends.
        await self._record(AuditOutcome.ALLOWED, grant, found, None)

    async def denied(
        self,
        outcome: str,
        grant: PickupGrant | None,
        reason: str,
        found: Pickup | None = None,
        *,
        known: bool = True,
    ) -> None:
        """Record a refusal; ``known=False`` when the view has been asked already (or cannot
        be): the record then names the patient only through ``found``."""
        if found is None and grant is not None and known:
            found = await self._known(grant)
        await self._record(AuditOutcome.DENIED, grant, found, reason)
        self._api.metrics.pickup(outcome)

    async def _known(self, grant: PickupGrant) -> Pickup | None:
        # A refusal names the patient when the view can tell, as the download would.
        journey = self._api.journey
        if journey.failed or not journey.is_caught_up:
            return None
        return await _pickup_of(self._api, grant)

    async def _record(
        self,
        outcome: AuditOutcome,
        grant: PickupGrant | None,
        found: Pickup | None,
        reason: str | None,
    ) -> None:
        principal = self._principal
        basis = found.consent_basis if found is not None else None
        event = AccessLogged(
            correlation_id=self._correlation_id,
            producer=self._api.settings.service_name,
            event_type=PICKUP_EVENT,
            action=AuditAction.READ,
            outcome=outcome,
            patient=found.patient if found is not None else None,
            user_uzi=principal.user_uzi,
            user_role=principal.role[:32],
            on_behalf_of_uzi=principal.on_behalf_of_uzi,
            organisation_ura=principal.organisation_ura,
            access_point=self._access_point,
            authorisation_basis=PICKUP_BASIS if outcome is AuditOutcome.ALLOWED else None,
            consent_profile=f"delivery: {basis.value}" if basis is not None else None,
            reason=reason,
            study_instance_uids=(grant.study_instance_uid,) if grant is not None else (),
            purpose_of_use=principal.purpose_of_use[:32] if principal.purpose_of_use else None,
        )
        try:
            await self._api.audit.record(event)
        except AuditUnavailable:
            self._api.metrics.pickup("unaudited")
            if outcome is AuditOutcome.ALLOWED:
                # Kafka may still take the record it did not acknowledge in time: a second one
                # says the download was not answered, so the patient's log shows no download
                # that never happened. Best effort, in the background: the answer is 503 now.
                follow_up = event.model_copy(
                    update={
                        "event_id": uuid.uuid4(),
                        "outcome": AuditOutcome.DENIED,
                        "authorisation_basis": None,
                        "reason": "allowed, not answered: the record was not acknowledged in time",
                    }
                )
                task = asyncio.create_task(self._api.audit.record(follow_up))
                _FOLLOW_UPS.add(task)
                task.add_done_callback(_settled)
            raise Problem(
                503, "Unavailable", "the pickup could not be audited; nothing was disclosed"
            ) from None


# Follow-up records in flight (a task is only weakly referenced by the event loop).
_FOLLOW_UPS: set[asyncio.Task[None]] = set()


def _settled(task: asyncio.Task[None]) -> None:
    _FOLLOW_UPS.discard(task)
    if not task.cancelled():
        task.exception()  # AuditUnavailable: logged by the audit log already


# --- routes ---------------------------------------------------------------------------------------


def build_router(api: NotifyApi) -> APIRouter:
    router = APIRouter()
    authenticate = api.principal_dependency
    operator = require_role(OPERATOR, authenticate=authenticate)
    provider_or_operator = require_role(PROVIDER, OPERATOR, authenticate=authenticate)
    sync_timeout = api.settings.view_sync_timeout_seconds
    redrive_timeout = api.settings.redrive_timeout_seconds

    @router.get(
        "/studies/{study_instance_uid}/status",
        tags=["status"],
        summary="How each version of a study your organisation sent is doing",
        responses={
            **_AUTH,
            404: _problem("Your organisation sent no study with this UID (or it is unknown)."),
            **_UNAVAILABLE,
        },
    )
    async def study_status(
        study_instance_uid: Annotated[str, Path(pattern=UID_PATTERN, max_length=64)],
        principal: Principal = Depends(provider_or_operator),  # noqa: B008  (see shared.auth)
    ) -> StudyStatus:
        _require_ready(api.journey, "journey")
        fresh = await _synced(api.journey, sync_timeout)
        study = api.journey.get(study_instance_uid)
        if study is None:
            versions = []
        elif principal.has_role(OPERATOR):
            versions = study.all_versions()  # operators follow every study, whoever sent it
        else:
            versions = study.visible_to(principal.organisation_ura)
        if not versions:
            # The same answer whether the study is unknown or another organisation's.
            raise Problem(404, "Not Found", "your organisation sent no study with this UID")
        return StudyStatus(
            study_instance_uid=study_instance_uid,
            fresh=fresh,
            versions=[version_status(v) for v in versions],
        )

    @router.get(
        "/dead-letters",
        tags=["dead letters"],
        summary="Deliveries notify gave up on, newest first (operator)",
        responses={**_AUTH, **_UNAVAILABLE},
    )
    async def dead_letters(
        _principal: Principal = Depends(operator),  # noqa: B008
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> DeadLetterList:
        _require_ready(api.dead_letters, "dead-letter")
        fresh = await _synced(api.dead_letters, sync_timeout)
        letters = api.dead_letters.list()
        return DeadLetterList(
            fresh=fresh,
            count=len(letters),
            dead_letters=[_dead_letter(d) for d in letters[:limit]],
        )

    @router.post(
        "/dead-letters/redrive",
        tags=["dead letters"],
        summary="Re-drive every dead letter (operator)",
        responses={
            202: {"model": RedriveAll, "description": "Re-driven; the list may lag a moment."},
            **_AUTH,
            **_UNAVAILABLE,
        },
    )
    async def redrive_all(
        response: Response,
        principal: Principal = Depends(operator),  # noqa: B008
    ) -> RedriveAll:
        _require_ready(api.dead_letters, "dead-letter")
        try:
            done = await api.dead_letters.redrive_all(redrive_timeout)
        except TransientError as exc:
            log.error("re-drive of all dead letters failed", error=str(exc))
            raise Problem(
                503, "Unavailable", "Kafka did not take the re-drive; try again"
            ) from None
        for item in done:
            api.metrics.redrove(item.queue)
        log.info(
            "all dead letters re-driven",
            count=len(done),
            by_ura=principal.organisation_ura,
            by=principal.subject,
        )
        response.status_code = 200 if all(item.visible for item in done) else 202
        return RedriveAll(count=len(done), redriven=[_redriven(item) for item in done])

    @router.post(
        "/dead-letters/{key}/redrive",
        tags=["dead letters"],
        summary="Re-drive one dead letter (operator); the key URL-encoded",
        responses={
            202: {"model": RedrivenOut, "description": "Re-driven; the list may lag a moment."},
            **_AUTH,
            404: _problem("No dead letter under this key."),
            **_UNAVAILABLE,
        },
    )
    async def redrive(
        key: Annotated[
            str,
            Path(
                pattern=KEY_PATTERN,
                max_length=256,
                description="The delivery key: study UID|version|endpoint id",
            ),
        ],
        response: Response,
        principal: Principal = Depends(operator),  # noqa: B008
    ) -> RedrivenOut:
        _require_ready(api.dead_letters, "dead-letter")
        try:
            item = await api.dead_letters.redrive(key, redrive_timeout)
        except TransientError as exc:
            log.error("re-drive failed", error=str(exc))
            raise Problem(
                503, "Unavailable", "Kafka did not take the re-drive; try again"
            ) from None
        if item is None:
            raise Problem(404, "Not Found", "no dead letter under this key")
        api.metrics.redrove(item.queue)
        log.info(
            "dead letter re-driven by an operator",
            study_instance_uid=item.study_instance_uid,
            study_version=item.study_version,
            endpoint_id=item.endpoint_id,
            by_ura=principal.organisation_ura,
            by=principal.subject,
        )
        response.status_code = 200 if item.visible else 202
        return _redriven(item)

    @router.get(
        PICKUP_ROUTE,
        tags=["pickup"],
        summary="Download a study version from a pickup link, as a zip",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "The study version: DICOM/<series>/<sop>.dcm, stored as received.",
                "content": {ZIP: {"schema": {"type": "string", "format": "binary"}}},
            },
            400: _problem("Not a pickup link."),
            401: {"description": "No bearer token, or an invalid one."},
            403: _problem("The link was altered, or is for another organisation."),
            404: _problem("The study version is not (or no longer) available for pickup."),
            410: _problem("The link expired."),
            **_UNAVAILABLE,
        },
    )
    async def pickup(
        token: Annotated[str, Path(min_length=1, max_length=MAX_TOKEN_CHARS)],
        request: Request,
        # Authenticated only: a caller without the role is refused below, and recorded.
        principal: Principal = Depends(authenticate),  # noqa: B008  (see shared.auth)
    ) -> Response:
        audit = PickupAudit(api, request, principal)
        try:
            grant = verify_pickup(token, api.pickup_keys, api.clock())
        except ExpiredPickupToken as exc:
            await audit.denied("expired", exc.grant, "the pickup link expired")
            raise Problem(410, "Gone", f"{exc}; ask the sender for a fresh pickup link") from None
        except TamperedPickupToken:
            # Nothing in an unsigned payload is trusted: the record names no study.
            await audit.denied("tampered", None, "the pickup link is not genuine")
            raise Problem(403, "Forbidden", "this pickup link is not genuine") from None
        except MalformedPickupToken:
            await audit.denied("malformed", None, "not a pickup link")
            raise Problem(400, "Bad Request", "this is not a pickup link") from None
        if not principal.has_role(PROVIDER):
            await audit.denied("forbidden", grant, f"the token lacks the role {PROVIDER}")
            raise Problem(403, "Forbidden", f"a pickup needs the role {PROVIDER}")
        if grant.recipient_ura != principal.organisation_ura:
            log.warning(
                "pickup refused: link for another organisation",
                study_instance_uid=grant.study_instance_uid,
                caller_ura=principal.organisation_ura,
            )
            await audit.denied("forbidden", grant, "the pickup link is for another organisation")
            raise Problem(403, "Forbidden", "this pickup link is for another organisation")
        try:
            _require_ready(api.journey, "journey")
        except Problem as problem:
            await audit.denied("unavailable", grant, f"not answered: {problem.detail}", known=False)
            raise
        uid, version = grant.study_instance_uid, grant.study_version
        found = await _pickup_of(api, grant)
        if found is None:
            # Looked up (and synced) above: the record names no patient.
            await audit.denied(
                "not-found", grant, "not (or no longer) available for pickup", known=False
            )
            raise Problem(
                404, "Not Found", "this study version is not (or no longer) available for pickup"
            )
        manifest = found.instances
        if manifest:
            # Find out before answering 200 whether S3 can serve it at all.
            try:
                info = await asyncio.to_thread(api.objects.stat, manifest[0].object_key)
            except ObjectStoreError as exc:
                log.error("pickup: object store unavailable", error=str(exc))
                await audit.denied("unavailable", grant, "the images could not be read", found)
                raise Problem(503, "Unavailable", "the images cannot be read now") from None
            if info is None:
                log.error(
                    "pickup: an instance is missing from the object store",
                    study_instance_uid=uid,
                    study_version=version,
                    object_key=manifest[0].object_key,
                )
                await audit.denied("not-found", grant, "the images are missing", found)
                raise Problem(404, "Not Found", "this study version's images are not available")
        await audit.allowed(grant, found)
        log.info(
            "pickup download",
            study_instance_uid=uid,
            study_version=version,
            instances=len(manifest),
            by_ura=principal.organisation_ura,
            by=principal.subject,
        )
        return StreamingResponse(
            _pickup_stream(api, manifest, found.last_received_at, uid, version),
            media_type=ZIP,
            headers={
                "Content-Disposition": f'attachment; filename="study-{uid}-v{version}.zip"',
                "Cache-Control": "no-store",
            },
        )

    return router


def _render_loc(loc: Any) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(request)"


def create_app(api: NotifyApi) -> FastAPI:
    app = FastAPI(
        title="beeldportaal notify",
        description="Delivery status for senders, dead letters for operators, and the portal "
        "pickup of studies for providers without an integration. No patient data in any answer.",
        version="0.1.0",
        lifespan=api.lifespan,
    )

    app.add_middleware(CorrelationMiddleware, on_response=api.metrics.request)

    @app.exception_handler(Problem)
    async def problem(_request: Request, exc: Problem) -> JSONResponse:
        body: dict[str, Any] = {
            "type": "about:blank",
            "title": exc.title,
            "status": exc.status,
            "detail": exc.detail,
        }
        headers = {"Retry-After": "5"} if exc.status == 503 else None
        return JSONResponse(body, status_code=exc.status, media_type=PROBLEM_JSON, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input; a path here may be a pickup token.
        problems = [
            f"{_render_loc(item.get('loc', ()))}: {item.get('msg', 'invalid')}"
            for item in exc.errors()
        ]
        body = {
            "type": "about:blank",
            "title": "Unprocessable Content",
            "status": 422,
            "detail": "the request is refused",
            "problems": problems,
        }
        return JSONResponse(body, status_code=422, media_type=PROBLEM_JSON)

    app.include_router(build_router(api))
    add_operational_routes(
        app, api.readiness, api.metrics, not_ready="A view is not caught up, or it failed."
    )
    return app

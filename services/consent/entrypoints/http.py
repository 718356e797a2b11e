"""The consent API: Mitz notifications, treatment relationships and the closed consent question.

A BSN is only ever accepted in a request body, never in a URL, and never leaves this module:
it is pseudonymised at once, validation errors never echo input, and no answer names a patient.
"""

from __future__ import annotations

import json
from datetime import date
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.consent.bootstrap import PRODUCER, ConsentApi, Unavailable
from services.consent.domain.commands import (
    CommandRefused,
    InvalidPeriod,
    LooksLikeBsn,
    NotOwner,
    Planned,
    RevokedForGood,
    UnknownRelationship,
    plan_notification,
    plan_relationship_end,
    plan_relationship_registration,
)
from services.consent.domain.decide import DEFAULT_DATA_CATEGORY
from services.consent.domain.mitz import InvalidNotification, NotificationKind, parse_notification
from services.consent.domain.query import (
    BASIS_NO_TREATMENT_RELATIONSHIP,
    RULE_NO_TREATMENT_RELATIONSHIP,
    answer_query,
)
from shared.auth import Principal, require_role
from shared.events.consent import Decision, Purpose
from shared.http import BodyLimitMiddleware, CorrelationMiddleware, add_operational_routes
from shared.identifiers import Bsn, Ura
from shared.logging import get_logger

log = get_logger(__name__)

FHIR_JSON = "application/fhir+json"
_JSON_TYPES = (FHIR_JSON, "application/json")
# A Mitz notification is a few kilobytes; anything near this is not one.
MAX_NOTIFICATION_BYTES = 256 * 1024
ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
CODE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}$"
SOURCE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}$"

ROLE_PROVIDER = "provider"
ROLE_CONSENT_AUTHORITY = "consent-authority"
ROLE_OPERATOR = "operator"

# --- request and response bodies ------------------------------------------------------------------


class _Body(BaseModel):
    # A validation error's text leaves out the input: a body holds a BSN.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class RelationshipRegistration(_Body):
    """An organisation declares it treats the patient."""

    bsn: Bsn
    organisation_ura: Ura
    start: date
    end: date | None = None
    source: str = Field(pattern=SOURCE_PATTERN, description="e.g. referral, admission")
    relationship_id: str | None = Field(
        default=None, pattern=ID_PATTERN, description="derived from the other fields if absent"
    )


class RelationshipEnd(_Body):
    bsn: Bsn
    end: date


class RelationshipWritten(BaseModel):
    relationship_id: str
    organisation_ura: str
    start: date | None = None
    end: date | None = None
    # recorded: applied now; unchanged: it was already; accepted: durable, not yet visible.
    status: Literal["recorded", "unchanged", "accepted"]


class ConsentQuery(_Body):
    """The closed question: may ``requester_ura`` see this patient's data for ``purpose``?"""

    bsn: Bsn
    purpose: Purpose
    requester_ura: Ura
    provider_category: str | None = Field(
        default=None,
        pattern=CODE_PATTERN,
        description="Mitz requesting-provider category of the requester/recipient, e.g. "
        "RPZAC104; required for the timeline",
    )
    data_category: str = Field(default=DEFAULT_DATA_CATEGORY, pattern=CODE_PATTERN)

    @model_validator(mode="after")
    def _timeline_needs_category(self) -> ConsentQuery:
        if self.purpose is Purpose.TIMELINE and self.provider_category is None:
            raise ValueError("a timeline question needs provider_category")
        return self


class ConsentAnswer(BaseModel):
    decision: Decision
    basis: str
    decided_by: str
    registry_version: int
    treatment_relationship: bool


_BUNDLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "FHIR R4 Bundle with one Consent, one Patient (BSN), one Organization (URA)",
    "required": ["resourceType", "entry"],
    "properties": {
        "resourceType": {"type": "string", "enum": ["Bundle"]},
        "type": {"type": "string"},
        "entry": {"type": "array", "items": {"type": "object"}},
    },
}
_OUTCOME_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "resourceType": {"type": "string", "enum": ["OperationOutcome"]},
        "issue": {"type": "array", "items": {"type": "object"}},
    },
}


def _outcome_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {FHIR_JSON: {"schema": _OUTCOME_SCHEMA}}}


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or invalid bearer token"},
    403: {"description": "the token lacks the role, or the organisation is not the owner"},
    503: {"description": "Kafka or the registry view is unavailable; nothing was done"},
}


# --- helpers --------------------------------------------------------------------------------------


def outcome(
    severity: str, code: str, diagnostics: str, status: int, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)


def _unavailable(exc: Unavailable) -> HTTPException:
    return HTTPException(503, str(exc), headers={"Retry-After": "5"})


def _refused(exc: CommandRefused) -> HTTPException:
    match exc:
        case NotOwner():
            return HTTPException(403, str(exc))
        case UnknownRelationship():
            return HTTPException(404, str(exc))
        case InvalidPeriod() | LooksLikeBsn():
            return HTTPException(422, str(exc))
    return HTTPException(422, str(exc))


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is larger than ``limit``."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _write(
    api: ConsentApi, planned: Planned[Any], action: str
) -> tuple[Literal["recorded", "unchanged", "accepted"], int]:
    if planned.already_applied:
        api.metrics.relationship_write(action, "unchanged")
        return "unchanged", 200
    try:
        applied = await api.record(planned.event)
    except Unavailable as exc:
        api.metrics.relationship_write(action, "unavailable")
        raise _unavailable(exc) from None
    api.metrics.relationship_write(action, "recorded" if applied else "accepted")
    return ("recorded", 201 if action == "register" else 200) if applied else ("accepted", 202)


async def _registry(api: ConsentApi, bsn: Bsn) -> tuple[str, Any]:
    patient = api.pseudonymizer.pseudonym(bsn)
    try:
        return patient, await api.current_registry(patient)
    except Unavailable as exc:
        raise _unavailable(exc) from None


# --- routes ---------------------------------------------------------------------------------------


def build_router(api: ConsentApi) -> APIRouter:
    router = APIRouter()
    authenticate = api.principal_dependency
    consent_authority = require_role(ROLE_CONSENT_AUTHORITY, authenticate=authenticate)
    provider = require_role(ROLE_PROVIDER, authenticate=authenticate)
    questioner = require_role(ROLE_PROVIDER, ROLE_OPERATOR, authenticate=authenticate)

    @router.post(
        "/mitz/notifications",
        tags=["Mitz"],
        summary="Receive a Mitz consent notification (FHIR R4 Bundle)",
        status_code=201,
        responses={
            200: _outcome_response("already recorded (a repeated notification)"),
            201: _outcome_response("registered or revoked, visible to queries"),
            202: _outcome_response("accepted (durable) but not yet visible to queries"),
            400: _outcome_response("not a valid Mitz notification; nothing was recorded"),
            413: _outcome_response("body too large"),
            415: _outcome_response("not application/fhir+json"),
            **_ERRORS,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {t: {"schema": _BUNDLE_SCHEMA} for t in _JSON_TYPES},
            }
        },
    )
    async def mitz_notification(
        request: Request,
        principal: Principal = Depends(consent_authority),  # noqa: B008  (a local: see shared.auth)
    ) -> Response:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in _JSON_TYPES:
            api.metrics.notification("rejected")
            return outcome("error", "not-supported", f"send {FHIR_JSON}", 415)
        body = await _read_limited(request, MAX_NOTIFICATION_BYTES)
        if body is None:
            api.metrics.notification("rejected")
            return outcome("error", "too-costly", "the notification is too large", 413)
        try:
            bundle = json.loads(body)
        except (ValueError, RecursionError):
            api.metrics.notification("rejected")
            return outcome("error", "structure", "the body is not JSON", 400)
        try:
            notification = parse_notification(bundle)
        except InvalidNotification as exc:
            api.metrics.notification("rejected")
            return JSONResponse(exc.to_operation_outcome(), status_code=400, media_type=FHIR_JSON)
        patient = api.pseudonymizer.pseudonym(notification.bsn)
        try:
            registry = await api.current_registry(patient)
            planned = plan_notification(
                notification,
                registry,
                patient=patient,
                correlation_id=request.state.correlation_id,
                producer=PRODUCER,
            )
        except Unavailable as exc:
            api.metrics.notification("unavailable")
            return outcome("error", "transient", str(exc), 503, {"Retry-After": "5"})
        except RevokedForGood as exc:
            api.metrics.notification("rejected")
            return outcome("error", "conflict", str(exc), 409)
        except CommandRefused as exc:
            api.metrics.notification("rejected")
            return outcome("error", "value", str(exc), 400)
        done = "registered" if notification.kind is NotificationKind.REGISTERED else "revoked"
        log.info(
            "mitz notification",
            kind=notification.kind.value,
            consent_id=notification.consent_id,
            custodian_ura=notification.organisation_ura,
            caller_ura=principal.organisation_ura,
            duplicate=planned.already_applied,
        )
        if planned.already_applied:
            api.metrics.notification("duplicate")
            return outcome("information", "informational", f"consent {done} already", 200)
        try:
            applied = await api.record(planned.event)
        except Unavailable as exc:
            api.metrics.notification("unavailable")
            return outcome("error", "transient", str(exc), 503, {"Retry-After": "5"})
        if not applied:
            api.metrics.notification("pending")
            return outcome(
                "information", "informational", f"consent {done}; not yet visible to queries", 202
            )
        api.metrics.notification(done)
        return outcome("information", "informational", f"consent {done}", 201)

    @router.post(
        "/treatment-relationships",
        tags=["treatment relationships"],
        summary="Register the caller's own treatment relationship with a patient",
        status_code=201,
        response_model=RelationshipWritten,
        responses={
            200: {"model": RelationshipWritten, "description": "already recorded"},
            202: {"model": RelationshipWritten, "description": "durable, not yet visible"},
            **_ERRORS,
        },
    )
    async def register_relationship(
        body: RelationshipRegistration,
        request: Request,
        principal: Principal = Depends(provider),  # noqa: B008  (a local: see shared.auth)
    ) -> Response:
        if body.organisation_ura != principal.organisation_ura:
            api.metrics.relationship_write("register", "forbidden")
            raise HTTPException(403, "an organisation may only register its own relationships")
        patient, registry = await _registry(api, body.bsn)
        try:
            planned = plan_relationship_registration(
                registry,
                principal_ura=principal.organisation_ura,
                patient=patient,
                organisation_ura=body.organisation_ura,
                start=body.start,
                end=body.end,
                source=body.source,
                relationship_id=body.relationship_id,
                correlation_id=request.state.correlation_id,
                producer=PRODUCER,
            )
        except CommandRefused as exc:
            api.metrics.relationship_write("register", "refused")
            raise _refused(exc) from None
        status, code = await _write(api, planned, "register")
        event = planned.event
        written = RelationshipWritten(
            relationship_id=event.relationship_id,
            organisation_ura=event.organisation_ura,
            start=event.start,
            end=event.end,
            status=status,
        )
        return JSONResponse(written.model_dump(mode="json"), status_code=code)

    @router.post(
        "/treatment-relationships/{relationship_id}/end",
        tags=["treatment relationships"],
        summary="End one of the caller's own treatment relationships",
        response_model=RelationshipWritten,
        responses={
            202: {"model": RelationshipWritten, "description": "durable, not yet visible"},
            404: {"description": "no such relationship for this patient"},
            **_ERRORS,
        },
    )
    async def end_relationship(
        relationship_id: Annotated[str, Path(pattern=ID_PATTERN)],
        body: RelationshipEnd,
        request: Request,
        principal: Principal = Depends(provider),  # noqa: B008  (a local: see shared.auth)
    ) -> Response:
        patient, registry = await _registry(api, body.bsn)
        try:
            planned = plan_relationship_end(
                registry,
                principal_ura=principal.organisation_ura,
                patient=patient,
                relationship_id=relationship_id,
                end=body.end,
                correlation_id=request.state.correlation_id,
                producer=PRODUCER,
            )
        except CommandRefused as exc:
            api.metrics.relationship_write("end", "refused")
            raise _refused(exc) from None
        status, code = await _write(api, planned, "end")
        event = planned.event
        written = RelationshipWritten(
            relationship_id=event.relationship_id,
            organisation_ura=event.organisation_ura,
            end=event.end,
            status=status,
        )
        return JSONResponse(written.model_dump(mode="json"), status_code=code)

    @router.post(
        "/consent-queries",
        tags=["consent"],
        summary="The closed question: may this requester see the patient's data?",
        response_model=ConsentAnswer,
        responses=_ERRORS,
    )
    async def consent_query(
        body: ConsentQuery,
        principal: Principal = Depends(questioner),  # noqa: B008  (a local: see shared.auth)
    ) -> ConsentAnswer:
        if (
            not principal.has_role(ROLE_OPERATOR)
            and body.requester_ura != principal.organisation_ura
        ):
            raise HTTPException(403, "a provider may only ask for its own organisation")
        patient, registry = await _registry(api, body.bsn)
        answer = answer_query(
            registry,
            patient=patient,
            purpose=body.purpose,
            requester_ura=body.requester_ura,
            provider_category=body.provider_category,
            data_category=body.data_category,
            today=api.today(),
        )
        api.metrics.query(body.purpose.value, answer.decision.value, answer.basis)
        if (
            body.purpose is Purpose.TIMELINE
            and not answer.treatment_relationship
            and not principal.has_role(ROLE_OPERATOR)
        ):
            # Whether the patient objected or consented is not for an organisation that does
            # not treat them: told that alone (the timeline's own refusals say as little).
            return ConsentAnswer(
                decision=Decision.DENY,
                basis=BASIS_NO_TREATMENT_RELATIONSHIP,
                decided_by=RULE_NO_TREATMENT_RELATIONSHIP,
                registry_version=answer.registry_version,
                treatment_relationship=False,
            )
        return ConsentAnswer(
            decision=answer.decision,
            basis=answer.basis,
            decided_by=answer.decided_by,
            registry_version=answer.registry_version,
            treatment_relationship=answer.treatment_relationship,
        )

    return router


def _without_input(errors: Any) -> list[dict[str, Any]]:
    """Validation errors without the input they refused: it could hold a BSN."""
    cleaned = []
    for error in errors:
        loc = list(error.get("loc", ()))
        if error.get("type") == "extra_forbidden" and loc:
            loc[-1] = "<unknown field>"  # the key itself is input
        cleaned.append({"type": error.get("type"), "loc": loc, "msg": error.get("msg")})
    return cleaned


def create_app(api: ConsentApi) -> FastAPI:
    app = FastAPI(
        title="beeldportaal consent",
        description="Consent registry API: Mitz notifications, treatment relationships and the "
        "closed consent question. A BSN is accepted in request bodies only.",
        version="0.1.0",
        lifespan=api.lifespan,
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse({"detail": _without_input(exc.errors())}, status_code=422)

    # A backstop for every body (FastAPI reads JSON bodies before the token is checked), above
    # the notification route's own limit, which answers in FHIR.
    app.add_middleware(BodyLimitMiddleware, max_bytes=4 * MAX_NOTIFICATION_BYTES)
    app.add_middleware(CorrelationMiddleware, on_response=api.metrics.request)

    app.include_router(build_router(api))
    add_operational_routes(
        app, api.readiness, api.metrics, not_ready="the registry view is not caught up or failed"
    )
    return app

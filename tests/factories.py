"""Factories for every event model: valid by default, every field overridable by keyword.

Fixtures are factories: ``make_study(instances=3, bsn_status=BsnStatus.ABSENT, version=2)``.
Identifiers are fresh on every call (UIDs under the 2.25 UUID root, random pseudonyms), so
integration tests that share a broker or bucket never collide and keys spread over partitions.
``sample_event(model)`` gives a valid sample of any registered event class; a unit test keeps
``FACTORIES`` covering the whole registry.
"""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from aiokafka.structs import ConsumerRecord

from services.routing.domain.directory import Provider
from shared.codec import Codec
from shared.events import (
    AccessLogged,
    AuditAction,
    AuditOutcome,
    Basis,
    BsnStatus,
    CompletingRequestStored,
    ConsentChecked,
    ConsentRegistered,
    ConsentRevoked,
    Decision,
    Delivered,
    DeliveryChannel,
    DeliveryFailed,
    DeliveryQueued,
    Destination,
    Event,
    IngestChannel,
    InstanceOutcomes,
    InstanceRef,
    InstanceStored,
    PatientRef,
    Provision,
    Purpose,
    RouteFailed,
    RouteResolved,
    SeriesSummary,
    StudyReceived,
    StudySnapshot,
    TreatmentRelationshipEnded,
    TreatmentRelationshipRegistered,
    Urgency,
)
from shared.identifiers import PSEUDONYM_PREFIX, Bsn, Pseudonymizer

# UUID-derived UIDs (PS3.5 §B.2): no organisation root needed, unique without coordination.
TEST_UID_ROOT = "2.25"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"

SENDER_URA = "12345678"
RECIPIENT_URA = "87654321"
TEST_UZI = "900000001"
PRODUCER = "tests"

# A test number published by the government (passes the 11-proof, issued to nobody).
TEST_BSN = "999990019"
PSEUDONYM_KEY = b"beeldportaal-tests-pseudonym-key-32+bytes"
_pseudonymizer = Pseudonymizer(PSEUDONYM_KEY)

T0 = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)


def make_uid() -> str:
    return f"{TEST_UID_ROOT}.{uuid.uuid4().int}"


def make_provider(ura: str, **overrides: Any) -> Provider:
    """A provider directory entry as routing writes it: a hospital (V4) unless overridden."""
    fields: dict[str, Any] = {
        "ura": ura,
        "name": f"Zorgaanbieder {ura}",
        "type_code": "V4",
        "city": "Utrecht",
    }
    fields.update(overrides)
    return Provider.model_validate(fields)


def make_pseudonym(bsn: str | None = None) -> str:
    """The test key's pseudonym of ``bsn``; without one, a fresh patient (so keys spread)."""
    if bsn is None:
        return PSEUDONYM_PREFIX + base64.b32encode(os.urandom(32)).decode().rstrip("=").lower()
    return _pseudonymizer.pseudonym(Bsn(bsn))


def make_sha256(data: bytes = b"") -> str:
    return hashlib.sha256(data).hexdigest()


def make_envelope(**overrides: Any) -> dict[str, Any]:
    """The fields every event shares; ``event_id`` and ``occurred_at`` keep their defaults."""
    return {"correlation_id": str(uuid.uuid4()), "producer": PRODUCER, **overrides}


def make_patient(
    bsn_status: BsnStatus = BsnStatus.VERIFIED, pseudonym: str | None = None
) -> PatientRef:
    """A pseudonym exactly when the BSN is verified, as PatientRef demands (unless overridden)."""
    if pseudonym is None and bsn_status is BsnStatus.VERIFIED:
        pseudonym = make_pseudonym()
    return PatientRef(pseudonym=pseudonym, bsn_status=bsn_status)


def make_instance_ref(
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    sender_ura: str = SENDER_URA,
    data: bytes = b"DICM",
    **overrides: Any,
) -> InstanceRef:
    """An instance as ingest stored it: its object key is ingest's (``{sender}/{sop}.dcm``,
    services/ingest/domain/keys.py)."""
    series_instance_uid = make_uid() if series_instance_uid is None else series_instance_uid
    sop_instance_uid = make_uid() if sop_instance_uid is None else sop_instance_uid
    fields: dict[str, Any] = {
        "sop_instance_uid": sop_instance_uid,
        "sop_class_uid": CT_IMAGE_STORAGE,
        "series_instance_uid": series_instance_uid,
        "transfer_syntax_uid": EXPLICIT_VR_LITTLE_ENDIAN,
        "object_key": f"{sender_ura}/{sop_instance_uid}.dcm",
        "size": len(data),
        "sha256": make_sha256(data),
    }
    fields.update(overrides)
    return InstanceRef(**fields)


def make_study(
    instances: int = 3,
    *,
    series: int = 1,
    bsn_status: BsnStatus = BsnStatus.VERIFIED,
    version: int = 1,
    study_instance_uid: str | None = None,
    urgency: Urgency = Urgency.ROUTINE,
    modality: str = "CT",
    **overrides: Any,
) -> StudySnapshot:
    """A snapshot whose series summaries and modalities agree with its instances."""
    study_instance_uid = make_uid() if study_instance_uid is None else study_instance_uid
    # No instances, no series; otherwise instances are spread round-robin over the series.
    series_uids = [make_uid() for _ in range(max(series, 1) if instances else 0)]
    refs = tuple(
        make_instance_ref(
            series_instance_uid=series_uids[i % len(series_uids)],
            sender_ura=overrides.get("sender_ura", SENDER_URA),
            data=f"instance {i}".encode(),
        )
        for i in range(instances)
    )
    summaries = tuple(
        SeriesSummary(
            series_instance_uid=uid,
            modality=modality,
            series_number=n,
            series_description=f"series {n}",
            number_of_instances=sum(r.series_instance_uid == uid for r in refs),
        )
        for n, uid in enumerate(series_uids, start=1)
    )
    fields: dict[str, Any] = {
        "study_instance_uid": study_instance_uid,
        "version": version,
        "sender_ura": SENDER_URA,
        "recipient_ura": RECIPIENT_URA,
        "patient": make_patient(bsn_status),
        "accession_number": "ACC0001",
        "study_date": date(2025, 3, 14),
        "study_time": "092653",
        "study_description": "CT thorax",
        "institution_name": "Testziekenhuis",
        "modalities": (modality,) if summaries else (),
        "series": summaries,
        "instances": refs,
        "urgency": urgency,
        "first_received_at": T0,
        "last_received_at": T0 + timedelta(seconds=instances),
    }
    fields.update(overrides)
    return StudySnapshot(**fields)


# --- one factory per event model -----------------------------------------------------------------


def make_instance_stored(
    *, instance: InstanceRef | None = None, study_instance_uid: str | None = None, **overrides: Any
) -> InstanceStored:
    study_instance_uid = make_uid() if study_instance_uid is None else study_instance_uid
    fields: dict[str, Any] = make_envelope(
        study_instance_uid=study_instance_uid,
        instance=instance or make_instance_ref(),
        channel=IngestChannel.STOW_RS,
        sender_ura=SENDER_URA,
        sender_user=TEST_UZI,
        sender_endpoint="pacs-test",
        recipient_ura=RECIPIENT_URA,
        patient=make_patient(),
        accession_number="ACC0001",
        study_date=date(2025, 3, 14),
        modality="CT",
        series_number=1,
    )
    fields.update(overrides)
    return InstanceStored(**fields)


def make_completing_request_stored(
    *, study_instance_uid: str | None = None, **overrides: Any
) -> CompletingRequestStored:
    fields: dict[str, Any] = make_envelope(
        study_instance_uid=make_uid() if study_instance_uid is None else study_instance_uid,
        channel=IngestChannel.STOW_RS,
        sender_ura=SENDER_URA,
        recipient_ura=RECIPIENT_URA,
        instances=3,
    )
    fields.update(overrides)
    return CompletingRequestStored(**fields)


def make_study_received(*, study: StudySnapshot | None = None, **overrides: Any) -> StudyReceived:
    return StudyReceived(**{**make_envelope(study=study or make_study()), **overrides})


def make_consent_registered(**overrides: Any) -> ConsentRegistered:
    fields: dict[str, Any] = make_envelope(
        consent_id=f"consent-{uuid.uuid4()}",
        patient=make_pseudonym(),
        provision=Provision.PERMIT,
        data_category="GGC002",
        provider_category="RPZAC104",
        period_start=date(2025, 1, 1),
    )
    fields.update(overrides)
    return ConsentRegistered(**fields)


def make_consent_revoked(**overrides: Any) -> ConsentRevoked:
    fields: dict[str, Any] = make_envelope(
        consent_id=f"consent-{uuid.uuid4()}", patient=make_pseudonym(), reason="inactive in Mitz"
    )
    fields.update(overrides)
    return ConsentRevoked(**fields)


def make_treatment_relationship_registered(**overrides: Any) -> TreatmentRelationshipRegistered:
    fields: dict[str, Any] = make_envelope(
        relationship_id=f"relationship-{uuid.uuid4()}",
        patient=make_pseudonym(),
        organisation_ura=RECIPIENT_URA,
        start=date(2025, 1, 1),
        source="referral",
    )
    fields.update(overrides)
    return TreatmentRelationshipRegistered(**fields)


def make_treatment_relationship_ended(**overrides: Any) -> TreatmentRelationshipEnded:
    fields: dict[str, Any] = make_envelope(
        relationship_id=f"relationship-{uuid.uuid4()}",
        patient=make_pseudonym(),
        organisation_ura=RECIPIENT_URA,
        end=date(2025, 6, 30),
    )
    fields.update(overrides)
    return TreatmentRelationshipEnded(**fields)


def make_consent_checked(*, study: StudySnapshot | None = None, **overrides: Any) -> ConsentChecked:
    fields: dict[str, Any] = make_envelope(
        study=study or make_study(),
        purpose=Purpose.DELIVERY,
        decision=Decision.PERMIT,
        basis=Basis.PRESUMED_REFERRAL,
        decided_by="presumed-referral",
        registry_version=0,
    )
    fields.update(overrides)
    return ConsentChecked(**fields)


def make_destination(**overrides: Any) -> Destination:
    fields: dict[str, Any] = {
        "organisation_ura": RECIPIENT_URA,
        "endpoint_id": "pacs-dicomweb",
        "channel": DeliveryChannel.DICOMWEB,
    }
    fields.update(overrides)
    return Destination(**fields)


def make_route_resolved(*, study: StudySnapshot | None = None, **overrides: Any) -> RouteResolved:
    fields: dict[str, Any] = make_envelope(
        study=study or make_study(),
        destination=make_destination(),
        priority=Urgency.ROUTINE,
        consent_basis=Basis.PRESUMED_REFERRAL,
    )
    fields.update(overrides)
    return RouteResolved(**fields)


def make_route_failed(**overrides: Any) -> RouteFailed:
    fields: dict[str, Any] = make_envelope(
        study_instance_uid=make_uid(),
        study_version=1,
        recipient_ura=RECIPIENT_URA,
        reason="no endpoint for the recipient",
        sender_ura=SENDER_URA,
    )
    fields.update(overrides)
    return RouteFailed(**fields)


def make_delivered(**overrides: Any) -> Delivered:
    fields: dict[str, Any] = make_envelope(
        study_instance_uid=make_uid(),
        study_version=1,
        destination_ura=RECIPIENT_URA,
        endpoint_id="pacs-dicomweb",
        channel=DeliveryChannel.DICOMWEB,
        outcomes=InstanceOutcomes(sent=3, already_present=0),
        attempts=1,
        seconds_since_first_received=42.5,
        delivered_at=T0 + timedelta(minutes=2),
        sender_ura=SENDER_URA,
    )
    fields.update(overrides)
    return Delivered(**fields)


def make_delivery_failed(**overrides: Any) -> DeliveryFailed:
    fields: dict[str, Any] = make_envelope(
        study_instance_uid=make_uid(),
        study_version=1,
        destination_ura=RECIPIENT_URA,
        endpoint_id="pacs-dicomweb",
        channel=DeliveryChannel.DICOMWEB,
        reason="HTTP 503 from the receiver",
        attempt=1,
        final=False,
        next_attempt_at=T0 + timedelta(minutes=1),
        sender_ura=SENDER_URA,
    )
    fields.update(overrides)
    return DeliveryFailed(**fields)


def make_access_logged(**overrides: Any) -> AccessLogged:
    fields: dict[str, Any] = make_envelope(
        event_type="timeline-search",
        action=AuditAction.QUERY,
        outcome=AuditOutcome.ALLOWED,
        patient=make_pseudonym(),
        user_uzi=TEST_UZI,
        user_role="01.015",
        organisation_ura=RECIPIENT_URA,
        access_point="POST /fhir/ImagingStudy/_search",
        authorisation_basis="treatment-relationship",
        consent_profile="GGC002/RPZAC104",
        study_instance_uids=(make_uid(),),
    )
    fields.update(overrides)
    return AccessLogged(**fields)


def make_delivery_queued(**overrides: Any) -> DeliveryQueued:
    fields: dict[str, Any] = make_envelope(
        route=make_route_resolved(),
        attempt=1,
        first_queued_at=T0 + timedelta(minutes=1),
    )
    fields.update(overrides)
    return DeliveryQueued(**fields)


FACTORIES: dict[type[Event], Callable[..., Event]] = {
    InstanceStored: make_instance_stored,
    CompletingRequestStored: make_completing_request_stored,
    StudyReceived: make_study_received,
    ConsentRegistered: make_consent_registered,
    ConsentRevoked: make_consent_revoked,
    TreatmentRelationshipRegistered: make_treatment_relationship_registered,
    TreatmentRelationshipEnded: make_treatment_relationship_ended,
    ConsentChecked: make_consent_checked,
    RouteResolved: make_route_resolved,
    RouteFailed: make_route_failed,
    Delivered: make_delivered,
    DeliveryFailed: make_delivery_failed,
    DeliveryQueued: make_delivery_queued,
    AccessLogged: make_access_logged,
}


def sample_event(model_cls: type[Event], **overrides: Any) -> Event:
    """A valid sample of any registered event class (fresh ids on every call)."""
    try:
        factory = FACTORIES[model_cls]
    except KeyError:
        raise LookupError(
            f"no factory for {model_cls.__name__} ({model_cls.schema_name}): "
            "add one to tests/factories.py FACTORIES"
        ) from None
    return factory(**overrides)


def make_consumer_record(
    event: Event, *, topic: str | None = None, partition: int = 0, offset: int = 0
) -> ConsumerRecord:  # type: ignore[type-arg]
    """``event`` encoded as the project writes it, as aiokafka hands it to a consumer."""
    record = Codec().encode(event)
    return ConsumerRecord(
        topic=topic or record.topic,
        partition=partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=record.key,
        value=record.value,
        checksum=None,
        serialized_key_size=len(record.key),
        serialized_value_size=len(record.value),
        headers=record.headers,
    )

"""The consent API over ASGI with an in-memory registry view and publisher (no Kafka)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog.testing
from pydantic import ValidationError

from services.consent.bootstrap import ConsentApi, build
from services.consent.config import ConsentSettings
from services.consent.entrypoints.http import FHIR_JSON, ConsentQuery, create_app
from services.consent.metrics import ConsentMetrics
from shared.auth import (
    DEV_AUDIENCE,
    DEV_ISSUER,
    TokenVerifier,
    generate_dev_keypair,
    load_public_keys,
    mint_token,
)
from shared.identifiers import Bsn, Pseudonymizer
from shared.settings import PrivacySettings
from tests.factories import TEST_BSN
from tests.fakes.consent import FakePublisher, FakeView
from tests.unit.consent.test_mitz import make_bundle

PSEUDONYM_KEY = "unit-test-pseudonym-key-" + "x" * 32
TODAY = date(2025, 6, 1)
HOSPITAL = "11111111"
OTHER_HOSPITAL = "22222222"
MITZ = "00000001"


@dataclass
class Harness:
    api: ConsentApi
    view: FakeView
    publisher: FakePublisher
    client: httpx.AsyncClient
    token: Callable[..., str]

    def auth(self, ura: str = HOSPITAL, roles: tuple[str, ...] = ("provider",)) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(ura=ura, roles=roles)}"}

    async def mitz(self, bundle: Any, **headers: str) -> httpx.Response:
        return await self.client.post(
            "/mitz/notifications",
            content=json.dumps(bundle),
            headers={
                "Content-Type": FHIR_JSON,
                **self.auth(MITZ, ("consent-authority",)),
                **headers,
            },
        )

    async def query(self, ura: str = HOSPITAL, **body: Any) -> httpx.Response:
        payload = {"bsn": TEST_BSN, "purpose": "timeline", "requester_ura": ura}
        payload["provider_category"] = "RPZAC104"
        payload.update(body)
        return await self.client.post("/consent-queries", json=payload, headers=self.auth(ura))

    async def relate(self, ura: str = HOSPITAL, token_ura: str | None = None, **body: Any):
        payload = {
            "bsn": TEST_BSN,
            "organisation_ura": ura,
            "start": "2025-01-01",
            "source": "referral",
        }
        payload.update(body)
        return await self.client.post(
            "/treatment-relationships", json=payload, headers=self.auth(token_ura or ura)
        )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_dev_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture
async def harness(keys: tuple[Path, Path]) -> AsyncIterator[Harness]:
    private, public = keys
    view = FakeView()
    publisher = FakePublisher(view)
    api = build(
        ConsentSettings(view_sync_timeout_seconds=2),
        privacy=PrivacySettings(pseudonym_key=PSEUDONYM_KEY),  # type: ignore[arg-type]
        verifier=TokenVerifier(load_public_keys([public]), DEV_ISSUER, DEV_AUDIENCE),
        view=view,
        publisher=publisher,
        metrics=ConsentMetrics(),
        today=lambda: TODAY,
    )
    app = create_app(api)
    async with api.lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://consent") as client:
            yield Harness(
                api,
                view,
                publisher,
                client,
                lambda **kw: mint_token(private, **kw),
            )


def bsn_leaks(harness: Harness, bsn: str = TEST_BSN) -> list[str]:
    found = []
    for record in harness.publisher.sent:
        blobs = [record.key, record.value, *(v for _, v in record.headers)]
        if any(bsn.encode() in blob for blob in blobs):
            found.append(record.topic)
    return found


# --- Mitz -----------------------------------------------------------------------------------------


async def test_an_active_mitz_consent_is_recorded_and_then_permits_a_timeline_query(
    harness: Harness,
) -> None:
    await harness.relate()
    response = await harness.mitz(make_bundle())
    assert response.status_code == 201
    assert response.headers["content-type"] == FHIR_JSON
    assert response.json()["resourceType"] == "OperationOutcome"
    answer = (await harness.query()).json()
    assert answer == {
        "decision": "permit",
        "basis": "explicit-consent",
        "decided_by": "mitz-consent-1",
        "registry_version": 2,
        "treatment_relationship": True,
    }
    assert bsn_leaks(harness) == []


async def test_a_repeated_notification_is_answered_200_and_published_once(
    harness: Harness,
) -> None:
    assert (await harness.mitz(make_bundle())).status_code == 201
    again = await harness.mitz(make_bundle())
    assert again.status_code == 200
    assert len(harness.publisher.sent) == 1


async def test_an_inactive_notification_revokes_the_consent(harness: Harness) -> None:
    await harness.relate()
    await harness.mitz(make_bundle())
    response = await harness.mitz(make_bundle(status="inactive"))
    assert response.status_code == 201
    answer = (await harness.query()).json()
    assert (answer["decision"], answer["basis"]) == ("deny", "no-explicit-consent")


async def test_an_objection_renewed_after_a_permit_applies_and_a_revoked_one_is_a_409(
    harness: Harness,
) -> None:
    await harness.relate()
    for provision in ("deny", "permit", "deny"):
        assert (await harness.mitz(make_bundle(provision=provision))).status_code == 201
    answer = (await harness.query()).json()
    assert (answer["decision"], answer["basis"]) == ("deny", "explicit-objection")
    assert (await harness.mitz(make_bundle(status="inactive"))).status_code == 201
    renewed = make_bundle(provision="deny")
    renewed["entry"][0]["resource"]["provision"]["period"] = {"start": "2026-01-01"}
    refused = await harness.mitz(renewed)
    assert refused.status_code == 409
    assert "revoked for good" in refused.json()["issue"][0]["diagnostics"]


@pytest.mark.parametrize("provision", ["deny", "permit"])
async def test_an_organisation_not_treating_the_patient_is_told_only_that(
    harness: Harness, provision: str
) -> None:
    """Whether the patient objected or consented is theirs: a provider without a treatment
    relationship learns that it has none; an operator sees the whole answer."""
    assert (await harness.mitz(make_bundle(provision=provision))).status_code == 201

    answer = (await harness.query()).json()
    assert answer == {
        "decision": "deny",
        "basis": "no-treatment-relationship",
        "decided_by": "rule:no-treatment-relationship",
        "registry_version": answer["registry_version"],
        "treatment_relationship": False,
    }
    body = {"bsn": TEST_BSN, "purpose": "timeline", "requester_ura": HOSPITAL,
            "provider_category": "RPZAC104"}  # fmt: skip
    operator = await harness.client.post(
        "/consent-queries", json=body, headers=harness.auth(OTHER_HOSPITAL, ("operator",))
    )
    if provision == "deny":
        assert operator.json()["basis"] == "explicit-objection"
    await harness.relate()
    treating = (await harness.query()).json()
    expected = (
        ("deny", "explicit-objection") if provision == "deny" else ("permit", "explicit-consent")
    )
    assert (treating["decision"], treating["basis"]) == expected


async def test_a_malformed_bundle_is_an_operation_outcome_and_publishes_nothing(
    harness: Harness,
) -> None:
    bundle = make_bundle(bsn="123456789")  # fails the 11-proof
    response = await harness.mitz(bundle)
    assert response.status_code == 400
    assert response.headers["content-type"] == FHIR_JSON
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "error"
    assert "123456789" not in response.text
    assert harness.publisher.sent == []


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b"{not json", FHIR_JSON, 400),
        (b"[]", FHIR_JSON, 400),
        (b'{"resourceType": "Bundle"}', "application/json", 400),
        (b"<Bundle/>", "application/fhir+xml", 415),
        (b"[" * 100_000 + b"]" * 100_000, FHIR_JSON, 400),
        (b" " * (300 * 1024), FHIR_JSON, 413),
    ],
)
async def test_bodies_that_are_no_notification_are_refused_with_an_operation_outcome(
    harness: Harness, content: bytes, content_type: str, status: int
) -> None:
    response = await harness.client.post(
        "/mitz/notifications",
        content=content,
        headers={"Content-Type": content_type, **harness.auth(MITZ, ("consent-authority",))},
    )
    assert response.status_code == status
    assert response.json()["resourceType"] == "OperationOutcome"
    assert harness.publisher.sent == []


async def test_a_consent_id_that_looks_like_a_bsn_is_refused_before_it_reaches_kafka(
    harness: Harness,
) -> None:
    bundle = make_bundle()
    bundle["entry"][0]["resource"]["id"] = TEST_BSN
    response = await harness.mitz(bundle)
    assert response.status_code == 400
    assert TEST_BSN not in response.text
    assert harness.publisher.sent == []


async def test_only_the_consent_authority_may_notify(harness: Harness) -> None:
    response = await harness.client.post(
        "/mitz/notifications",
        content=json.dumps(make_bundle()),
        headers={"Content-Type": FHIR_JSON, **harness.auth(HOSPITAL)},
    )
    assert response.status_code == 403
    unauthenticated = await harness.client.post("/mitz/notifications", json=make_bundle())
    assert unauthenticated.status_code == 401
    assert harness.publisher.sent == []


async def test_kafka_down_answers_503_and_reports_nothing_as_done(harness: Harness) -> None:
    harness.publisher.down = True
    response = await harness.mitz(make_bundle())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["issue"][0]["code"] == "transient"
    relation = await harness.relate()
    assert relation.status_code == 503
    assert harness.view.get(Pseudonymizer(PSEUDONYM_KEY.encode()).pseudonym(Bsn(TEST_BSN))) is None


async def test_a_write_kafka_never_acknowledges_is_503_after_the_timeout(
    harness: Harness,
) -> None:
    harness.publisher.hang = True
    response = await harness.relate()
    assert response.status_code == 503
    assert "retried" in response.json()["detail"]
    assert harness.view.get(Pseudonymizer(PSEUDONYM_KEY.encode()).pseudonym(Bsn(TEST_BSN))) is None


async def test_a_write_kafka_took_but_the_view_did_not_show_in_time_is_202(
    harness: Harness,
) -> None:
    harness.view.visible = False
    response = await harness.mitz(make_bundle())
    assert response.status_code == 202
    assert len(harness.publisher.sent) == 1


async def test_nothing_is_answered_before_the_view_caught_up(harness: Harness) -> None:
    harness.view.caught_up = False
    assert (await harness.query()).status_code == 503
    assert (await harness.client.get("/readyz")).status_code == 503
    harness.view.caught_up = True
    assert (await harness.client.get("/readyz")).json() == {
        "ready": True,
        "checks": {"registry_view": True},
    }


# --- treatment relationships ----------------------------------------------------------------------


async def test_an_organisation_registers_and_ends_its_own_relationship(harness: Harness) -> None:
    created = await harness.relate(relationship_id="opname-1")
    assert created.status_code == 201
    assert created.json() == {
        "relationship_id": "opname-1",
        "organisation_ura": HOSPITAL,
        "start": "2025-01-01",
        "end": None,
        "status": "recorded",
    }
    assert (await harness.relate(relationship_id="opname-1")).status_code == 200
    ended = await harness.client.post(
        "/treatment-relationships/opname-1/end",
        json={"bsn": TEST_BSN, "end": "2025-05-31"},
        headers=harness.auth(),
    )
    assert ended.status_code == 200
    assert ended.json()["status"] == "recorded"
    answer = (await harness.query()).json()
    assert answer["treatment_relationship"] is False
    assert bsn_leaks(harness) == []


async def test_registering_a_relationship_for_another_organisation_is_forbidden(
    harness: Harness,
) -> None:
    response = await harness.relate(OTHER_HOSPITAL, token_ura=HOSPITAL)
    assert response.status_code == 403
    assert harness.publisher.sent == []


async def test_another_organisation_cannot_end_or_take_over_a_relationship(
    harness: Harness,
) -> None:
    await harness.relate(OTHER_HOSPITAL, relationship_id="theirs")
    ended = await harness.client.post(
        "/treatment-relationships/theirs/end",
        json={"bsn": TEST_BSN, "end": "2025-05-31"},
        headers=harness.auth(HOSPITAL),
    )
    assert ended.status_code == 403
    taken = await harness.relate(HOSPITAL, relationship_id="theirs")
    assert taken.status_code == 403
    assert len(harness.publisher.sent) == 1


async def test_ending_an_unknown_relationship_is_404(harness: Harness) -> None:
    response = await harness.client.post(
        "/treatment-relationships/nope/end",
        json={"bsn": TEST_BSN, "end": "2025-05-31"},
        headers=harness.auth(),
    )
    assert response.status_code == 404


async def test_a_relationship_ending_before_it_starts_is_422(harness: Harness) -> None:
    response = await harness.relate(start="2025-06-01", end="2025-05-01")
    assert response.status_code == 422
    assert harness.publisher.sent == []


# --- the closed question --------------------------------------------------------------------------


async def test_a_timeline_permit_without_a_treatment_relationship_is_a_deny(
    harness: Harness,
) -> None:
    await harness.mitz(make_bundle())
    answer = (await harness.query()).json()
    assert answer == {
        "decision": "deny",
        "basis": "no-treatment-relationship",
        "decided_by": "rule:no-treatment-relationship",
        "registry_version": 1,
        "treatment_relationship": False,
    }


async def test_a_delivery_question_without_any_registration_is_a_presumed_permit(
    harness: Harness,
) -> None:
    answer = (await harness.query(purpose="delivery", provider_category=None)).json()
    assert (answer["decision"], answer["basis"]) == ("permit", "presumed-referral")


async def test_a_provider_may_only_ask_for_itself_an_operator_for_anyone(
    harness: Harness,
) -> None:
    body = {"bsn": TEST_BSN, "purpose": "delivery", "requester_ura": OTHER_HOSPITAL}
    as_provider = await harness.client.post(
        "/consent-queries", json=body, headers=harness.auth(HOSPITAL)
    )
    assert as_provider.status_code == 403
    as_operator = await harness.client.post(
        "/consent-queries", json=body, headers=harness.auth(HOSPITAL, ("operator",))
    )
    assert as_operator.status_code == 200
    as_mitz = await harness.client.post(
        "/consent-queries", json=body, headers=harness.auth(HOSPITAL, ("consent-authority",))
    )
    assert as_mitz.status_code == 403


async def test_a_timeline_question_without_provider_category_is_422(harness: Harness) -> None:
    assert (await harness.query(provider_category=None)).status_code == 422


@pytest.mark.parametrize(
    "body",
    [
        {"bsn": "999990019x", "purpose": "delivery", "requester_ura": HOSPITAL},
        {"bsn": "123456789", "purpose": "delivery", "requester_ura": HOSPITAL},
        {"bsn": TEST_BSN, "purpose": "timeline", "requester_ura": HOSPITAL},
        {"bsn": TEST_BSN, "purpose": "delivery", "requester_ura": HOSPITAL, TEST_BSN: TEST_BSN},
        {"bsn": TEST_BSN, "purpose": "nonsense", "requester_ura": 11111111},
    ],
)
async def test_validation_errors_never_echo_the_request(harness: Harness, body: Any) -> None:
    response = await harness.client.post("/consent-queries", json=body, headers=harness.auth())
    assert response.status_code == 422
    assert "99999001" not in response.text
    assert "123456789" not in response.text


async def test_metrics_carry_routes_and_outcomes_but_no_patient(harness: Harness) -> None:
    await harness.relate()
    await harness.mitz(make_bundle())
    await harness.query()
    text = (await harness.client.get("/metrics")).text
    assert 'route="/consent-queries",status="200"' in text
    assert 'beeldportaal_consent_mitz_notifications_total{outcome="registered"} 1.0' in text
    assert "beeldportaal_consent_registry_view_patients 1.0" in text
    assert TEST_BSN not in text
    assert "psn1-" not in text


def test_the_openapi_document_takes_a_bsn_only_in_request_bodies(harness: Harness) -> None:
    document = harness.api and create_app(harness.api).openapi()
    for path, operations in document["paths"].items():
        assert "bsn" not in path
        for operation in operations.values():
            names = [p["name"] for p in operation.get("parameters", [])]
            assert "bsn" not in names, f"{path} takes a BSN outside the body"
    assert "bsn" in json.dumps(document["components"]["schemas"]["ConsentQuery"])


async def test_no_bsn_reaches_a_log_line_even_before_scrubbing(harness: Harness) -> None:
    with structlog.testing.capture_logs() as logs:
        await harness.relate(relationship_id="r1")
        await harness.mitz(make_bundle())
        await harness.mitz(make_bundle(bsn="123456789"))
        await harness.query()
        harness.publisher.down = True
        await harness.mitz(make_bundle(status="inactive"))
    assert logs, "the flows above log something"
    assert TEST_BSN not in repr(logs)
    assert "123456789" not in repr(logs)


def test_a_body_failing_a_model_level_check_does_not_echo_its_bsn() -> None:
    # Every field valid, the body as a whole not: the error is the model's, about all of it.
    body = {"bsn": TEST_BSN, "purpose": "timeline", "requester_ura": "12345678"}
    with pytest.raises(ValidationError) as raised:
        ConsentQuery.model_validate(body)
    assert "provider_category" in str(raised.value)
    assert TEST_BSN not in str(raised.value)


@pytest.mark.parametrize(
    "path", ["/consent-queries", "/treatment-relationships", "/treatment-relationships/x/end"]
)
async def test_a_huge_streamed_body_is_refused_as_it_arrives_even_without_a_token(
    harness: Harness, path: str
) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"bsn": "'
        for _ in range(1024):  # 64 MB if it were all read
            sent += 1
            yield b"9" * 65536

    response = await harness.client.post(
        path, content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert sent < 1024

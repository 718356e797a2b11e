"""The directory API over an in-memory directory: auth, validation, public views, writes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.routing.adapters.memory import InMemoryDirectory
from services.routing.bootstrap import Routing, build
from services.routing.config import RoutingSettings
from services.routing.entrypoints.http import create_app
from shared.auth import AuthSettings, generate_dev_keypair, mint_token

OPERATOR_URA = "00000001"
URA = "12345678"
PASSWORD = "s3cret-pacs-password"
TOKEN_SECRET = "receiver-bearer-token-value"
WEBHOOK_SECRET = "webhook-secret-of-at-least-32-characters"


def entry(ura: str = URA, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ura": ura,
        "name": "Ziekenhuis Rivierenland",
        "type_code": "V4",
        "city": "Tiel",
        "mailboxes": [{"id": "radiologie", "name": "Radiologie"}],
        "endpoints": [
            {
                "channel": "dicomweb",
                "id": "pacs-web",
                "base_url": "https://pacs.zrt.example.nl/dicom-web",
                "auth": {"type": "basic", "username": "bp", "password": PASSWORD},
            },
            {
                "channel": "dimse",
                "id": "pacs-dimse",
                "host": "10.1.2.3",
                "port": 104,
                "ae_title": "ZRT_PACS",
            },
        ],
        "webhook": {"url": "https://hooks.zrt.example.nl/bp", "secret": WEBHOOK_SECRET},
    }
    fields.update(overrides)
    return fields


class Api:
    def __init__(
        self, client: httpx.AsyncClient, key: Path, routing: Routing, memory: InMemoryDirectory
    ):
        self.client = client
        self.key = key
        self.routing = routing
        self.memory = memory

    def headers(self, *roles: str, ura: str = OPERATOR_URA) -> dict[str, str]:
        token = mint_token(self.key, ura=ura, roles=roles or ("operator",))
        return {"Authorization": f"Bearer {token}"}

    @property
    def operator(self) -> dict[str, str]:
        return self.headers("operator")

    @property
    def provider(self) -> dict[str, str]:
        return self.headers("provider", ura="87654321")


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    private, public = generate_dev_keypair(tmp_path / "keys")
    memory = InMemoryDirectory()
    routing = build(
        RoutingSettings(),
        auth=AuthSettings(public_keys=[public]),  # type: ignore[call-arg]
        directory=memory,
        writer=memory,
    )
    app = create_app(routing)
    # httpx over ASGI (starlette's TestClient warns about httpx); the lifespan run by hand.
    transport = httpx.ASGITransport(app=app)
    async with (
        routing.lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        yield Api(client, private, routing, memory)


async def test_an_operator_registers_a_provider_and_anyone_authenticated_reads_its_public_view(
    api: Api,
) -> None:
    created = await api.client.put(f"/providers/{URA}", json=entry(), headers=api.operator)
    assert created.status_code == 201, created.text
    for response in (created, (await api.client.get(f"/providers/{URA}", headers=api.provider))):
        body = response.json()
        assert body["ura"] == URA and body["name"] == "Ziekenhuis Rivierenland"
        assert body["channels"] == [
            {"id": "pacs-web", "channel": "dicomweb"},
            {"id": "pacs-dimse", "channel": "dimse"},
        ]
        assert body["has_webhook"] is True
        text = response.text
        for hidden in (PASSWORD, WEBHOOK_SECRET, "pacs.zrt.example.nl", "10.1.2.3", "hooks."):
            assert hidden not in text
    # The secrets were kept, for delivery.
    stored = api.memory.get(URA)
    assert stored is not None
    assert stored.webhook.secret.get_secret_value() == WEBHOOK_SECRET  # type: ignore[union-attr]


async def test_putting_again_replaces_and_putting_the_same_entry_writes_nothing(api: Api) -> None:
    assert (
        await api.client.put(f"/providers/{URA}", json=entry(), headers=api.operator)
    ).status_code == 201
    moved = await api.client.put(
        f"/providers/{URA}", json=entry(city="Culemborg"), headers=api.operator
    )
    assert moved.status_code == 200 and moved.json()["city"] == "Culemborg"
    again = await api.client.put(
        f"/providers/{URA}", json=entry(city="Culemborg"), headers=api.operator
    )
    assert again.status_code == 200
    writes = api.routing.metrics.directory_writes
    assert writes.labels("put")._value.get() == 2
    assert writes.labels("unchanged")._value.get() == 1


async def test_search_finds_by_name_city_or_ura_and_honours_the_limit(api: Api) -> None:
    for n, (name, city) in enumerate(
        [
            ("Ziekenhuis Rivierenland", "Tiel"),
            ("Rivas Beatrixziekenhuis", "Gorinchem"),
            ("Maasziekenhuis", "Boxmeer"),
        ]
    ):
        ura = f"1000000{n}"
        (
            await api.client.put(
                f"/providers/{ura}", json=entry(ura, name=name, city=city), headers=api.operator
            )
        )
    found = await api.client.get("/providers", params={"q": "ziekenhuis"}, headers=api.provider)
    assert found.status_code == 200
    assert [p["name"] for p in found.json()] == [
        "Ziekenhuis Rivierenland",
        "Maasziekenhuis",
        "Rivas Beatrixziekenhuis",
    ]
    by_city = await api.client.get("/providers", params={"q": "gorinchem"}, headers=api.provider)
    assert [p["ura"] for p in by_city.json()] == ["10000001"]
    by_ura = await api.client.get("/providers", params={"q": "10000002"}, headers=api.provider)
    assert [p["ura"] for p in by_ura.json()] == ["10000002"]
    limited = await api.client.get(
        "/providers", params={"q": "ziekenhuis", "limit": 1}, headers=api.provider
    )
    assert len(limited.json()) == 1
    assert "pacs.zrt" not in found.text and PASSWORD not in found.text


async def test_an_operator_removes_a_provider_and_removing_it_again_is_404(api: Api) -> None:
    (await api.client.put(f"/providers/{URA}", json=entry(), headers=api.operator))
    assert (await api.client.delete(f"/providers/{URA}", headers=api.operator)).status_code == 204
    assert (await api.client.get(f"/providers/{URA}", headers=api.provider)).status_code == 404
    again = await api.client.delete(f"/providers/{URA}", headers=api.operator)
    assert again.status_code == 404 and URA in again.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/providers?q=x"),
        ("get", f"/providers/{URA}"),
        ("put", f"/providers/{URA}"),
        ("delete", f"/providers/{URA}"),
    ],
)
async def test_every_directory_route_needs_a_valid_token(api: Api, method: str, path: str) -> None:
    kwargs: dict[str, Any] = {"json": entry()} if method == "put" else {}
    missing = await api.client.request(method, path, **kwargs)
    assert missing.status_code == 401
    forged = await api.client.request(
        method, path, headers={"Authorization": "Bearer not.a.token"}, **kwargs
    )
    assert forged.status_code == 401
    assert forged.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("method", ["put", "delete"])
async def test_only_an_operator_changes_the_directory(api: Api, method: str) -> None:
    kwargs: dict[str, Any] = {"json": entry()} if method == "put" else {}
    response = await api.client.request(method, f"/providers/{URA}", headers=api.provider, **kwargs)
    assert response.status_code == 403
    assert api.memory.get(URA) is None


@pytest.mark.parametrize("bad", ["1234567", "123456789", "abcdefgh", "1234567a"])
async def test_a_path_that_is_not_a_ura_is_refused_with_a_reason(api: Api, bad: str) -> None:
    for method, kwargs in (("get", {}), ("delete", {}), ("put", {"json": entry(bad)})):
        response = await api.client.request(
            method, f"/providers/{bad}", headers=api.operator, **kwargs
        )
        assert response.status_code in (400, 422), (method, response.text)
        assert "URA" in response.text or "ura" in response.text


async def test_the_ura_in_the_path_must_be_the_one_in_the_body(api: Api) -> None:
    response = await api.client.put("/providers/87654321", json=entry(URA), headers=api.operator)
    assert response.status_code == 422
    assert response.json()["problems"] == ["body.ura: is not the URA in the path"]
    assert api.memory.get(URA) is None and api.memory.get("87654321") is None


async def test_an_invalid_entry_is_refused_listing_every_problem_without_echoing_secrets(
    api: Api,
) -> None:
    bad = entry(
        type_code="ziekenhuis",
        endpoints=[
            {
                "channel": "dicomweb",
                "id": "web",
                "base_url": f"https://bp:{PASSWORD}@pacs.nl",
                "auth": {"type": "bearer", "token": TOKEN_SECRET + "\n"},
            },
        ],
        webhook={"url": "https://hooks.example.nl", "secret": "too-short-" + PASSWORD},
    )
    response = await api.client.put(f"/providers/{URA}", json=bad, headers=api.operator)
    assert response.status_code == 422
    problems = response.json()["problems"]
    text = " | ".join(problems)
    assert "body.type_code" in text
    assert "must not carry credentials" in text
    assert "body.webhook.secret: must be at least 32 characters" in text
    assert "control characters" in text
    for secret in (PASSWORD, TOKEN_SECRET):
        assert secret not in response.text
    assert api.memory.get(URA) is None


async def test_an_entry_carrying_masked_secrets_is_refused(api: Api) -> None:
    masked = entry(webhook={"url": "https://hooks.example.nl", "secret": "**********"})
    response = await api.client.put(f"/providers/{URA}", json=masked, headers=api.operator)
    assert response.status_code == 422
    assert "masked placeholder" in response.text


async def test_a_body_that_is_not_json_is_refused_with_422(api: Api) -> None:
    response = await api.client.put(
        f"/providers/{URA}",
        content=b"{nope",
        headers={**api.operator, "Content-Type": "application/json"},
    )
    assert response.status_code == 422 and response.json()["problems"]


async def test_a_huge_body_is_refused_before_it_is_parsed(api: Api) -> None:
    response = await api.client.put(
        f"/providers/{URA}",
        content=b" " * (300 * 1024),
        headers={**api.operator, "Content-Type": "application/json"},
    )
    assert response.status_code == 413


async def test_reads_wait_for_the_directory_to_load_and_readyz_says_so(api: Api) -> None:
    api.memory.caught_up = False
    response = await api.client.get(f"/providers/{URA}", headers=api.provider)
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    ready = await api.client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["directory_caught_up"] is False
    api.memory.caught_up = True
    assert (await api.client.get("/readyz")).json() == {
        "ready": True,
        "checks": {"directory_caught_up": True, "directory_ok": True},
    }


async def test_health_and_metrics_need_no_token(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    (await api.client.put(f"/providers/{URA}", json=entry(), headers=api.operator))
    metrics = await api.client.get("/metrics")
    assert metrics.status_code == 200
    assert 'beeldportaal_routing_directory_writes_total{action="put"} 1.0' in metrics.text


async def test_the_openapi_document_describes_the_directory_routes(api: Api) -> None:
    spec = (await api.client.get("/openapi.json")).json()
    assert set(spec["paths"]) >= {"/providers", "/providers/{ura}", "/readyz", "/metrics"}
    assert set(spec["paths"]["/providers/{ura}"]) == {"get", "put", "delete"}
    assert "422" in spec["paths"]["/providers/{ura}"]["put"]["responses"]

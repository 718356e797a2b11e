"""The directory view's fold: records in offset order, tombstones, and records it must skip."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.routing.adapters.directory_view import DirectoryFold
from services.routing.domain.directory import Provider
from shared.errors import PoisonEvent

PASSWORD = "s3cret-pacs-password"
WEBHOOK_SECRET = "webhook-secret-of-at-least-32-characters"


def make_provider(ura: str = "12345678", **overrides: Any) -> Provider:
    fields: dict[str, Any] = {
        "ura": ura,
        "name": "Testziekenhuis",
        "type_code": "V4",
        "city": "Utrecht",
        "endpoints": [
            {
                "channel": "dicomweb",
                "id": "pacs-web",
                "base_url": "https://pacs.example.nl/dicom-web",
                "auth": {"type": "basic", "username": "bp", "password": PASSWORD},
            }
        ],
        "webhook": {"url": "https://hooks.example.nl/bp", "secret": WEBHOOK_SECRET},
    }
    fields.update(overrides)
    return Provider.model_validate(fields)


def record(provider: Provider) -> tuple[bytes, bytes]:
    return provider.ura.encode(), provider.to_record().encode()


def test_a_record_puts_the_provider_with_its_secrets() -> None:
    fold = DirectoryFold()
    provider = make_provider()
    fold.apply(*record(provider))
    assert fold.get("12345678") == provider
    endpoint = fold.get("12345678").endpoints[0]  # type: ignore[union-attr]
    assert endpoint.auth.password.get_secret_value() == PASSWORD  # type: ignore[union-attr]
    assert len(fold) == 1


def test_a_later_record_replaces_the_earlier_one() -> None:
    fold = DirectoryFold()
    fold.apply(*record(make_provider(city="Utrecht")))
    fold.apply(*record(make_provider(city="Zwolle")))
    assert fold.get("12345678").city == "Zwolle"  # type: ignore[union-attr]
    assert len(fold) == 1


def test_a_tombstone_removes_the_provider_and_one_for_an_unknown_ura_is_harmless() -> None:
    fold = DirectoryFold()
    fold.apply(*record(make_provider()))
    fold.apply(b"12345678", None)
    assert fold.get("12345678") is None
    fold.apply(b"87654321", None)
    assert len(fold) == 0


def test_search_sees_every_change() -> None:
    fold = DirectoryFold()
    fold.apply(*record(make_provider(name="Ziekenhuis Oost")))
    assert [p.ura for p in fold.search("oost")] == ["12345678"]
    fold.apply(*record(make_provider("87654321", name="Oostelijk Medisch Centrum")))
    assert [p.ura for p in fold.search("oost")] == ["87654321", "12345678"]
    fold.apply(b"87654321", None)
    assert [p.ura for p in fold.search("oost")] == ["12345678"]


@pytest.mark.parametrize(
    ("key", "reason"),
    [(None, "no key"), (b"1234", "not a URA"), (b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8", "not a URA")],
)
def test_a_record_without_a_usable_key_is_poison(key: bytes | None, reason: str) -> None:
    with pytest.raises(PoisonEvent, match=reason):
        DirectoryFold().apply(key, make_provider().to_record().encode())


def test_an_invalid_record_is_poison_whose_reason_keeps_the_secrets_out() -> None:
    fold = DirectoryFold()
    valid = make_provider()
    fold.apply(*record(valid))
    # Written by a plain dump: the secrets are masks. And a broken URL besides.
    broken = valid.model_dump(mode="json")
    broken["endpoints"][0]["base_url"] = "ftp://pacs.example.nl"
    with pytest.raises(PoisonEvent) as caught:
        fold.apply(b"12345678", json.dumps(broken).encode())
    reason = str(caught.value)
    assert "URA 12345678" in reason
    assert "masked placeholder" in reason and "http:// or https://" in reason
    assert PASSWORD not in reason and "**********" not in reason
    assert fold.get("12345678") == valid  # the last good entry stays


def test_a_record_that_is_not_json_is_poison() -> None:
    with pytest.raises(PoisonEvent, match="invalid"):
        DirectoryFold().apply(b"12345678", b"{not json")


def test_a_record_keyed_by_another_ura_is_poison() -> None:
    with pytest.raises(PoisonEvent, match="another URA"):
        DirectoryFold().apply(b"87654321", make_provider("12345678").to_record().encode())

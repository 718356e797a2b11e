"""Consent's provider types read the directory topic as routing does: on any record, the type
code consent holds for a URA is the one of the provider routing's directory holds for it."""

from __future__ import annotations

import contextlib
import json
from typing import NamedTuple

import pytest

from services.consent.adapters.provider_types import ProviderTypes
from services.routing.adapters.directory_view import DirectoryFold
from shared.errors import PoisonEvent
from shared.settings import KafkaSettings
from tests.factories import make_provider

HOSPITAL, PRACTICE = "11111111", "22222222"


class Record(NamedTuple):
    """A directory record's fields as the views read them."""

    key: bytes | None
    value: bytes | None


def record_of(ura: str, **changes: object) -> bytes:
    """A V4 provider's record as routing writes it, with ``changes`` made to its JSON."""
    fields = json.loads(make_provider(ura).to_record().encode())
    fields.update(changes)
    return json.dumps(fields).encode()


# (key, value) records after a valid V4 entry of HOSPITAL; what both must hold for HOSPITAL.
CASES = [
    pytest.param(HOSPITAL.encode(), record_of(HOSPITAL, type_code="Z3"), "Z3", id="a-new-type"),
    pytest.param(HOSPITAL.encode(), None, None, id="removed"),
    pytest.param(
        HOSPITAL.encode(), record_of(HOSPITAL, type_code="Z3", name=""), "V4", id="invalid"
    ),
    pytest.param(HOSPITAL.encode(), record_of(PRACTICE, type_code="Z3"), "V4", id="another-ura"),
    pytest.param(HOSPITAL.encode(), record_of(HOSPITAL, type_code="v4"), "V4", id="bad-type-code"),
    pytest.param(HOSPITAL.encode(), b"{not json", "V4", id="not-json"),
    pytest.param(b"abc", record_of(HOSPITAL, type_code="Z3"), "V4", id="key-no-ura"),
    pytest.param(None, record_of(HOSPITAL, type_code="Z3"), "V4", id="no-key"),
]


@pytest.mark.parametrize(("key", "value", "expected"), CASES)
def test_consent_holds_the_type_of_the_provider_routing_holds(
    key: bytes | None, value: bytes | None, expected: str | None
) -> None:
    types = ProviderTypes(KafkaSettings(bootstrap_servers="127.0.0.1:1"))
    fold = DirectoryFold()
    first = (HOSPITAL.encode(), record_of(HOSPITAL))
    for reader in (types.apply_record, lambda r: fold.apply(r.key, r.value)):
        reader(Record(*first))
        # A record that is no provider is poison: the view skips it, keeping what the URA had.
        with contextlib.suppress(PoisonEvent):
            reader(Record(key, value))

    routing = fold.get(HOSPITAL)
    assert types.type_code(HOSPITAL) == (routing.type_code if routing else None) == expected

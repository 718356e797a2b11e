"""The provider directory: validation with reasons, secrets, the YAML seed, search ranking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from services.routing.domain.directory import (
    BsnAsPatientId,
    DicomWebEndpoint,
    DimseEndpoint,
    Directory,
    DirectoryError,
    PickupEndpoint,
    Provider,
    ReceiverPreferences,
    Webhook,
)
from shared.events.common import DeliveryChannel

DEMO_DIRECTORY = Path(__file__).resolve().parents[3] / "deploy" / "local" / "demo-directory.yaml"
WEBHOOK_SECRET = "webhook-secret-of-at-least-32-characters"
TOKEN = "bearer-token-value"


def provider_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ura": "12345678",
        "name": "Testziekenhuis",
        "type_code": "V4",
        "city": "Utrecht",
        "mailboxes": [{"id": "radiologie", "name": "Radiologie"}],
        "endpoints": [
            {
                "channel": "dicomweb",
                "id": "pacs-web",
                "base_url": "https://pacs.example.nl/dicom-web/",
                "auth": {"type": "bearer", "token": TOKEN},
            }
        ],
        "webhook": {"url": "https://hooks.example.nl/bp", "secret": WEBHOOK_SECRET},
    }
    fields.update(overrides)
    return fields


def make_provider(**overrides: Any) -> Provider:
    return Provider.model_validate(provider_fields(**overrides))


def reasons(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return " | ".join(e["msg"] for e in exc.value.errors())


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ura", ["1234567", "123456789", "1234567a", ""])
def test_a_ura_that_is_not_8_digits_is_refused(ura: str) -> None:
    with pytest.raises(ValidationError) as exc:
        make_provider(ura=ura)
    assert exc.value.errors()[0]["loc"] == ("ura",)


def test_a_ura_read_as_a_number_is_refused_saying_to_quote_it() -> None:
    with pytest.raises(ValidationError) as exc:
        make_provider(ura=65)  # what YAML makes of an unquoted 00000101
    assert "quoted" in reasons(exc)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://pacs.example.nl/dicom-web", "http:// or https://"),
        ("pacs.example.nl/dicom-web", "http:// or https://"),
        ("https:///dicom-web", "no host"),
        ("https://pacs example.nl/", "without spaces"),
        ("https://pacs_example!.nl/", "neither a DNS name nor an IP address"),
        ("https://pacs.example.nl:0/", "port"),
        ("https://pacs.example.nl:70000/", "port"),
        ("https://pacs.example.nl:http/", "port"),
        ("https://user:pw@pacs.example.nl/", "credentials"),
        ("https://pacs.example.nl/dicom-web?x=1", "query"),
        ("https://pacs.example.nl/dicom-web#top", "fragment"),
    ],
)
def test_an_unusable_base_url_is_refused_with_its_reason(url: str, reason: str) -> None:
    with pytest.raises(ValidationError) as exc:
        DicomWebEndpoint(id="web", base_url=url)
    assert reason in reasons(exc)


@pytest.mark.parametrize(
    "url",
    [
        "https://pacs.example.nl/dicom-web",
        "http://127.0.0.1:8042/dicom-web",
        "https://[::1]:8443/wado",
        "https://pacs/",
    ],
)
def test_a_reachable_base_url_is_kept_without_trailing_slash(url: str) -> None:
    endpoint = DicomWebEndpoint(id="web", base_url=url)
    assert endpoint.base_url == url.rstrip("/")


def test_a_webhook_url_follows_the_same_rules() -> None:
    with pytest.raises(ValidationError) as exc:
        Webhook(url="mailto:pacs@example.nl", secret=WEBHOOK_SECRET)
    assert "http:// or https://" in reasons(exc)


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_a_dimse_port_outside_1_to_65535_is_refused(port: int) -> None:
    with pytest.raises(ValidationError):
        DimseEndpoint(id="dimse", host="pacs.example.nl", port=port, ae_title="PACS")


@pytest.mark.parametrize(
    ("ae_title", "reason"),
    [
        ("    ", "blank"),
        ("A" * 17, "at most 16"),
        ("PACS\\1", "without backslash"),
        ("PACS\t", "printable ASCII"),
        ("PÄCS", "printable ASCII"),
    ],
)
def test_an_ae_title_breaking_ps3_5_is_refused(ae_title: str, reason: str) -> None:
    with pytest.raises(ValidationError) as exc:
        DimseEndpoint(id="dimse", host="127.0.0.1", port=104, ae_title=ae_title)
    assert reason in reasons(exc)


def test_an_ae_title_loses_its_insignificant_spaces() -> None:
    endpoint = DimseEndpoint(id="dimse", host="10.0.0.7", port=104, ae_title=" PACS_1 ")
    assert endpoint.ae_title == "PACS_1"
    assert endpoint.calling_ae_title == "BEELDPORTAAL"


def test_a_dimse_host_must_be_a_name_or_an_address() -> None:
    with pytest.raises(ValidationError) as exc:
        DimseEndpoint(id="dimse", host="pacs host", port=104, ae_title="PACS")
    assert "neither a DNS name nor an IP address" in reasons(exc)


def test_endpoint_ids_must_be_unique_within_a_provider() -> None:
    pickup = {"channel": "pickup", "id": "same"}
    with pytest.raises(ValidationError) as exc:
        make_provider(endpoints=[pickup, pickup])
    assert "endpoint ids must be unique; repeated: same" in reasons(exc)


def test_an_unknown_endpoint_channel_is_refused() -> None:
    with pytest.raises(ValidationError):
        make_provider(endpoints=[{"channel": "fax", "id": "f"}])


def test_the_webhook_secret_must_be_long_enough_to_key_an_hmac() -> None:
    with pytest.raises(ValidationError) as exc:
        Webhook(url="https://hooks.example.nl", secret="short")
    assert "at least 32 characters" in reasons(exc)


def test_a_refused_secret_never_appears_in_the_error() -> None:
    secret = "x" * 31 + " "  # fails: whitespace at the end
    with pytest.raises(ValidationError) as exc:
        make_provider(webhook={"url": "https://hooks.example.nl", "secret": secret})
    assert secret.strip() not in str(exc.value)


def test_coercion_must_keep_the_originals() -> None:
    with pytest.raises(ValidationError) as exc:
        BsnAsPatientId(keep_originals=False)
    assert "Original Attributes Sequence" in reasons(exc)


def test_bsn_coercion_defaults_to_the_dutch_bsn_issuer() -> None:
    profile = BsnAsPatientId()
    assert (profile.issuer, profile.universal_entity_id) == (
        "NLMINBIZA",
        "2.16.840.1.113883.2.4.6.3",
    )


def test_object_filters_take_named_groups_and_sop_class_uids() -> None:
    prefs = ReceiverPreferences(
        object_filters=("presentation-states", "1.2.840.10008.5.1.4.1.1.66")
    )
    assert not prefs.accepts("1.2.840.10008.5.1.4.1.1.11.1")  # Grayscale Softcopy PS
    assert not prefs.accepts("1.2.840.10008.5.1.4.1.1.66")  # Raw Data
    assert prefs.accepts("1.2.840.10008.5.1.4.1.1.2")  # CT Image


def test_an_unknown_object_filter_is_refused_listing_the_groups() -> None:
    with pytest.raises(ValidationError) as exc:
        ReceiverPreferences(object_filters=("overlays",))
    assert "presentation-states" in reasons(exc)


def test_batch_limits_must_be_positive() -> None:
    with pytest.raises(ValidationError):
        ReceiverPreferences.model_validate({"batch_limits": {"max_instances": 0}})


# --- secrets --------------------------------------------------------------------------------------


def test_repr_str_and_a_plain_dump_hide_every_secret() -> None:
    provider = make_provider()
    for text in (repr(provider), str(provider), provider.model_dump_json()):
        assert TOKEN not in text
        assert WEBHOOK_SECRET not in text


def test_a_record_keeps_the_secrets_and_reads_back_equal() -> None:
    provider = make_provider()
    record = provider.to_record()
    assert TOKEN in record and WEBHOOK_SECRET in record
    assert Provider.from_record(record) == provider


def test_a_record_written_without_secrets_is_refused_instead_of_storing_the_mask() -> None:
    with pytest.raises(ValidationError) as exc:
        Provider.from_record(make_provider().model_dump_json())
    assert "masked placeholder" in reasons(exc)


def test_the_public_view_has_no_secrets_and_no_addresses() -> None:
    provider = make_provider(
        endpoints=[
            {"channel": "dimse", "id": "dimse", "host": "10.1.2.3", "port": 104, "ae_title": "P"},
            {"channel": "pickup", "id": "portal", "enabled": False},
        ]
    )
    text = provider.public_view().model_dump_json()
    assert WEBHOOK_SECRET not in text and "10.1.2.3" not in text
    view = provider.public_view()
    assert [(c.id, c.channel) for c in view.channels] == [("dimse", DeliveryChannel.DIMSE)]
    assert view.has_webhook


# --- the directory value --------------------------------------------------------------------------


def test_add_replace_and_remove_return_new_directories() -> None:
    first = make_provider()
    empty = Directory()
    one = empty.add(first)
    renamed = one.replace(make_provider(name="Nieuwe naam"))
    assert len(empty) == 0 and one.get("12345678") == first
    assert renamed.get("12345678").name == "Nieuwe naam"  # type: ignore[union-attr]
    assert renamed.remove("12345678") == empty
    assert one.get("87654321") is None


def test_adding_a_known_ura_or_changing_an_unknown_one_is_refused() -> None:
    one = Directory([make_provider()])
    with pytest.raises(DirectoryError, match="already in the directory"):
        one.add(make_provider())
    with pytest.raises(DirectoryError, match="not in the directory"):
        one.replace(make_provider(ura="87654321"))
    with pytest.raises(DirectoryError, match="not in the directory"):
        one.remove("87654321")


def test_put_adds_or_replaces_like_a_compacted_topic() -> None:
    directory = Directory().put(make_provider()).put(make_provider(city="Zwolle"))
    assert [p.city for p in directory] == ["Zwolle"]


# --- search ---------------------------------------------------------------------------------------


@pytest.fixture
def hospitals() -> Directory:
    return Directory(
        [
            make_provider(ura="00000101", name="Demo Ziekenhuis Oost", city="Enschede"),
            make_provider(ura="00000202", name="Demo Ziekenhuis West", city="Den Haag"),
            make_provider(ura="10000101", name="Sint-Józef Ziekenhuis", city="Demo"),
            make_provider(ura="20000000", name="Ziekenhuis 00000101", city="Delft"),
            make_provider(ura="30000000", name="Rijnstate", city="Arnhem"),
            make_provider(ura="40000000", name="00000101 Kliniek", city="Breda"),
        ]
    )


def names(providers: list[Provider]) -> list[str]:
    return [p.name for p in providers]


def test_an_exact_ura_ranks_above_names_and_substrings(hospitals: Directory) -> None:
    found = hospitals.search("00000101")
    assert names(found) == ["Demo Ziekenhuis Oost", "00000101 Kliniek", "Ziekenhuis 00000101"]


def test_a_name_prefix_ranks_above_a_match_elsewhere(hospitals: Directory) -> None:
    # "Demo" starts two names, and is the city of Sint-Józef.
    found = hospitals.search("demo")
    assert names(found) == ["Demo Ziekenhuis Oost", "Demo Ziekenhuis West", "Sint-Józef Ziekenhuis"]


def test_search_ignores_case_and_accents(hospitals: Directory) -> None:
    assert names(hospitals.search("SINT-JOZEF")) == ["Sint-Józef Ziekenhuis"]
    assert names(hospitals.search("józef")) == ["Sint-Józef Ziekenhuis"]


def test_every_word_of_the_query_must_match_somewhere(hospitals: Directory) -> None:
    assert names(hospitals.search("west haag")) == ["Demo Ziekenhuis West"]
    assert hospitals.search("west enschede") == []


def test_a_blank_query_finds_nothing_and_limit_cuts(hospitals: Directory) -> None:
    assert hospitals.search("   ") == []
    assert len(hospitals.search("ziekenhuis", limit=2)) == 2


# --- the YAML seed --------------------------------------------------------------------------------


def test_the_demo_seed_loads_both_demo_hospitals() -> None:
    directory = Directory.load_yaml(DEMO_DIRECTORY)
    oost, west = directory.get("00000101"), directory.get("00000202")
    assert oost is not None and oost.name == "Demo Ziekenhuis Oost"
    assert west is not None and west.name == "Demo Ziekenhuis West"
    assert isinstance(oost.endpoints[0], DicomWebEndpoint)
    assert [type(e) for e in west.endpoints] == [DimseEndpoint, PickupEndpoint]
    assert isinstance(west.preferences.coercion, BsnAsPatientId)
    assert not oost.preferences.accepts("1.2.840.10008.5.1.4.1.1.11.1")


def test_a_seed_with_bad_entries_is_refused_whole_listing_every_problem() -> None:
    text = """
providers:
  - ura: "00000101"
    name: Goed
    type_code: V4
    city: Enschede
  - ura: 00000202
    name: URA niet gequote
    type_code: V4
    city: Den Haag
  - ura: "00000303"
    name: Slechte endpoints
    type_code: V4
    city: Zwolle
    endpoints:
      - {channel: dicomweb, id: web, base_url: "ftp://pacs"}
      - {channel: dimse, id: dimse, host: 127.0.0.1, port: 70000, ae_title: PACS}
  - ura: "00000101"
    name: Dubbel
    type_code: V4
    city: Enschede
"""
    with pytest.raises(DirectoryError) as exc:
        Directory.from_yaml(text)
    problems = exc.value.problems
    assert len(problems) == 4, problems
    assert problems[0].startswith("providers[1]: ura: ") and "quoted" in problems[0]
    assert problems[1].startswith("providers[2] (URA 00000303): endpoints[0].dicomweb.base_url")
    assert problems[2].startswith("providers[2] (URA 00000303): endpoints[1].dimse.port")
    assert problems[3] == "providers[3] (URA 00000101): URA repeats providers[0]"


def test_a_secret_in_a_refused_seed_is_not_repeated_in_the_problems() -> None:
    text = """
providers:
  - ura: "00000101"
    name: Oost
    type_code: V4
    city: Enschede
    webhook: {url: "https://hooks.example.nl", secret: "too-short-but-secret"}
"""
    with pytest.raises(DirectoryError) as exc:
        Directory.from_yaml(text)
    assert "too-short-but-secret" not in str(exc.value)
    assert "webhook.secret: must be at least 32 characters" in str(exc.value)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("providers: [", "not valid YAML at line"),
        ("- a\n- b\n", "exactly one key, 'providers'"),
        ("providers: {}\n", "must be a list"),
        ("providers:\n  - ura: '00000101'\n    ura: '00000202'\n", "appears twice"),
        ("providers: [42]\n", "providers[0]: must be a mapping"),
        ("providers:\n  - ? [a]\n    : b\n", "not valid YAML at line"),
        ("providers: []\nextra: 1\n", "exactly one key"),
    ],
)
def test_a_malformed_seed_is_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(DirectoryError, match=None) as exc:
        Directory.from_yaml(text)
    assert reason in str(exc.value)


def test_a_missing_seed_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DirectoryError, match="cannot be read"):
        Directory.load_yaml(tmp_path / "absent.yaml")


def test_problems_of_a_seed_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "seed.yaml"
    path.write_text("providers: {}\n", encoding="utf-8")
    with pytest.raises(DirectoryError) as exc:
        Directory.load_yaml(path)
    assert exc.value.problems[0].startswith(f"{path}: ")


def test_a_seed_with_no_providers_is_an_empty_directory() -> None:
    assert len(Directory.from_yaml("providers: []\n")) == 0

"""Pickup links (signed, expiring, free of patient identifiers) and the streamed study zip."""

from __future__ import annotations

import base64
import io
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from services.notify.config import NotifySettings
from services.notify.domain.pickup import (
    MIN_KEY_BYTES,
    ExpiredPickupToken,
    MalformedPickupToken,
    PickupGrant,
    TamperedPickupToken,
    ZipMember,
    dicom_entry_name,
    pickup_path,
    sign_pickup,
    verify_pickup,
    zip_entries,
)
from shared.identifiers import contains_bsn
from tests.factories import RECIPIENT_URA, SENDER_URA, T0, TEST_BSN, make_uid

KEY = b"pickup-key-for-tests-0123456789abcdef"
OLD_KEY = b"retired-pickup-key-for-tests-0123456789"
STUDY = "1.2.826.0.1.3680043.8.498.1"
EXPIRES = T0 + timedelta(days=7)

uids = st.lists(st.integers(min_value=0, max_value=10**12), min_size=2, max_size=6).map(
    lambda parts: ".".join(map(str, parts))
)


def _token(**overrides: object) -> str:
    fields: dict[str, object] = {
        "study_uid": STUDY,
        "version": 2,
        "recipient_ura": RECIPIENT_URA,
        "sender_ura": SENDER_URA,
        "expires_at": EXPIRES,
        "key": KEY,
    }
    fields.update(overrides)
    return sign_pickup(**fields)  # type: ignore[arg-type]


# --- tokens ---------------------------------------------------------------------------------------


def test_a_token_grants_its_study_version_to_its_recipient_until_it_expires() -> None:
    grant = verify_pickup(_token(), KEY, now=T0)

    assert grant == PickupGrant(STUDY, 2, RECIPIENT_URA, EXPIRES, SENDER_URA)


def test_a_link_signed_before_links_named_the_sender_still_grants_its_version() -> None:
    # A v1 payload, as signed before 2026-11-27 (and still for a delivery without a sender).
    token = _token(sender_ura=None)
    payload = base64.urlsafe_b64decode(token.split(".")[0] + "==").decode()

    assert payload.split("\n")[0] == "v1"
    assert verify_pickup(token, KEY, now=T0) == PickupGrant(STUDY, 2, RECIPIENT_URA, EXPIRES)


def test_a_token_is_url_safe_and_becomes_a_pickup_path() -> None:
    token = _token()

    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    assert pickup_path(token) == f"/pickup/{token}"
    with pytest.raises(ValueError, match="not a pickup token"):
        pickup_path("../admin")


def test_a_token_holds_identifiers_only_never_a_bsn() -> None:
    token = _token()
    payload = base64.urlsafe_b64decode(token.split(".")[0] + "==").decode()

    expiry = str(int(EXPIRES.timestamp()))
    assert payload.split("\n") == ["v2", STUDY, "2", RECIPIENT_URA, SENDER_URA, expiry]
    assert not contains_bsn(payload)
    assert TEST_BSN not in token


@given(
    study=uids.filter(lambda uid: len(uid) <= 64),
    version=st.integers(min_value=1, max_value=10**6),
    ura=st.from_regex(r"[0-9]{8}", fullmatch=True),
    sender=st.none() | st.from_regex(r"[0-9]{8}", fullmatch=True),
    seconds=st.integers(min_value=1, max_value=10**9),
)
def test_any_signed_grant_verifies_back_to_itself(
    study: str, version: int, ura: str, sender: str | None, seconds: int
) -> None:
    expires = T0 + timedelta(seconds=seconds)
    token = sign_pickup(study, version, ura, sender, expires, KEY)

    grant = verify_pickup(token, KEY, now=T0)

    assert grant == PickupGrant(study, version, ura, expires.replace(microsecond=0), sender)


@given(data=st.data())
def test_changing_any_character_of_a_token_makes_it_worthless(data: st.DataObject) -> None:
    token = _token()
    index = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    replacement = data.draw(st.sampled_from(alphabet).filter(lambda c: c != token[index]))
    tampered = token[:index] + replacement + token[index + 1 :]

    with pytest.raises((TamperedPickupToken, MalformedPickupToken)):
        verify_pickup(tampered, KEY, now=T0)


def test_a_token_with_a_forged_payload_is_tampered() -> None:
    genuine_payload, mac = _token().split(".")
    other = _token(recipient_ura="11111111").split(".")[0]

    with pytest.raises(TamperedPickupToken, match="signature does not match"):
        verify_pickup(f"{other}.{mac}", KEY, now=T0)
    assert genuine_payload != other


def test_a_token_from_another_key_is_tampered() -> None:
    with pytest.raises(TamperedPickupToken):
        verify_pickup(_token(key=b"x" * 32), KEY, now=T0)


def test_a_token_signed_with_a_retired_key_still_verifies_during_rotation() -> None:
    token = _token(key=OLD_KEY)

    assert verify_pickup(token, [KEY, OLD_KEY], now=T0).study_version == 2
    with pytest.raises(TamperedPickupToken):
        verify_pickup(token, [KEY], now=T0)


def test_a_token_is_expired_from_its_expiry_on() -> None:
    token = _token()

    assert verify_pickup(token, KEY, now=EXPIRES - timedelta(seconds=1))
    with pytest.raises(ExpiredPickupToken, match="expired") as caught:
        verify_pickup(token, KEY, now=EXPIRES)
    assert caught.value.expired_at == EXPIRES
    # Genuine: the refusal's audit record may name the study the link was for.
    assert caught.value.grant == verify_pickup(token, KEY, now=T0)


def test_an_expiry_is_rounded_down_so_a_link_never_lives_longer_than_asked() -> None:
    grant = verify_pickup(_token(expires_at=EXPIRES + timedelta(milliseconds=900)), KEY, now=T0)

    assert grant.expires_at == EXPIRES


@pytest.mark.parametrize(
    "token",
    [
        "",
        "no-dot-at-all",
        ".",
        "abc.",
        ".abc",
        "a" * 600,
        "dj!K.abcd",
        "djEK.c2hvcnQ",  # a signature that is not 32 bytes
    ],
)
def test_malformed_tokens_are_refused_without_echoing_them(token: str) -> None:
    with pytest.raises(MalformedPickupToken) as caught:
        verify_pickup(token, KEY, now=T0)
    assert token == "" or token not in str(caught.value)


def test_a_non_canonical_encoding_is_malformed_not_a_second_valid_token() -> None:
    payload, mac = _token().split(".")
    # 32 bytes take 43 characters, whose last one carries 2 unused bits; setting them
    # decodes to the same bytes, which must not yield a second valid token.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = mac[:-1] + alphabet[alphabet.index(mac[-1]) ^ 1]
    assert base64.urlsafe_b64decode(twin + "=") == base64.urlsafe_b64decode(mac + "=")

    with pytest.raises(MalformedPickupToken, match="canonically"):
        verify_pickup(f"{payload}.{twin}", KEY, now=T0)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"study_uid": "1.2.03"}, "valid Study Instance UID"),
        ({"study_uid": f"1.2.{TEST_BSN}x"}, "valid Study Instance UID"),
        ({"recipient_ura": "1234567"}, "URA"),
        ({"sender_ura": "1234567"}, "URA"),
        ({"version": 0}, "version"),
        ({"key": b"short"}, "at least 32 bytes"),
        ({"expires_at": datetime(2030, 1, 1)}, "timezone-aware"),
    ],
)
def test_signing_refuses_bad_input(overrides: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        _token(**overrides)


def test_verifying_needs_a_real_key_and_an_aware_clock() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        verify_pickup(_token(), b"short", now=T0)
    with pytest.raises(ValueError, match="no pickup verification key"):
        verify_pickup(_token(), [], now=T0)
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_pickup(_token(), KEY, now=datetime(2025, 1, 1))


# --- zip ------------------------------------------------------------------------------------------


def _read_zip(stream: Iterator[bytes]) -> zipfile.ZipFile:
    archive = zipfile.ZipFile(io.BytesIO(b"".join(stream)))
    assert archive.testzip() is None  # every member's CRC matches
    return archive


def test_entry_names_are_dicom_series_sop_dcm() -> None:
    series, sop = make_uid(), make_uid()

    assert dicom_entry_name(series, sop) == f"DICOM/{series}/{sop}.dcm"


@pytest.mark.parametrize(
    "bad", ["../../etc/passwd", "1.2/3", "..", "", "1.2.3\\x", "1.2.\x00", "/abs", "1.02.3"]
)
def test_an_invalid_uid_becomes_a_safe_unique_path_segment(bad: str) -> None:
    name = dicom_entry_name("1.2.3", bad)
    series_dir, _, file = name.rpartition("/")

    assert series_dir == "DICOM/1.2.3"
    assert file.endswith(".dcm")
    assert all(c.isalnum() or c in "._" for c in file)
    assert file not in (".dcm", "..dcm")
    assert name != dicom_entry_name("1.2.3", bad + "x")


def test_a_zip_streams_back_byte_for_byte() -> None:
    first, second = make_uid(), make_uid()
    members = {
        dicom_entry_name("1.2.3", first): [b"DICM" * 1000, b"\x00\x01" * 3000],
        dicom_entry_name("1.2.3", second): [bytes(range(256)) * 40],
        dicom_entry_name("1.2.4", first): [],
    }

    archive = _read_zip(zip_entries((name, iter(chunks)) for name, chunks in members.items()))

    assert archive.namelist() == list(members)
    for name, chunks in members.items():
        assert archive.read(name) == b"".join(chunks)
        info = archive.getinfo(name)
        assert info.compress_type == zipfile.ZIP_STORED
        assert info.external_attr >> 16 == 0o644


def test_a_zip_is_produced_chunk_by_chunk_not_all_at_the_end() -> None:
    pulled: list[int] = []

    def chunks(n: int) -> Iterator[bytes]:
        for i in range(n):
            pulled.append(i)
            yield bytes([i]) * 1024

    stream = zip_entries([("DICOM/1.2/1.2.3.dcm", chunks(5))])
    first = next(stream)

    # The first output carries the local header and the first chunk, before chunk 2 is read.
    assert pulled == [0]
    assert first.startswith(b"PK\x03\x04")
    assert first.endswith(b"\x00" * 1024)
    archive = _read_zip(iter([first, *stream]))
    assert archive.read("DICOM/1.2/1.2.3.dcm") == b"".join(bytes([i]) * 1024 for i in range(5))


def test_members_of_known_size_skip_zip64_and_unknown_sizes_use_it() -> None:
    stream = zip_entries(
        [ZipMember("known.dcm", [b"abc", b"def"], size=6), ("unknown.dcm", [b"ghi"])]
    )
    raw = b"".join(stream)
    archive = _read_zip(iter([raw]))

    assert archive.read("known.dcm") == b"abcdef"
    assert archive.read("unknown.dcm") == b"ghi"
    # A ZIP64 local header stores 0xFFFFFFFF sizes (the real ones follow in an extra field).
    known_header = raw[: raw.index(b"known.dcm")]
    unknown_header = raw[raw.index(b"PK\x03\x04", 1) :]
    assert b"\xff\xff\xff\xff" not in known_header
    assert unknown_header[18:26] == b"\xff" * 8


@pytest.mark.parametrize(("size", "problem"), [(5, "larger than"), (7, "smaller than")])
def test_a_member_that_does_not_match_its_size_is_refused(size: int, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        b"".join(zip_entries([ZipMember("a.dcm", [b"abc", b"def"], size=size)]))


@pytest.mark.parametrize("name", ["../evil.dcm", "/abs.dcm", "a//b.dcm", "a\\b.dcm", "", "a/./b"])
def test_unsafe_member_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="unsafe name"):
        b"".join(zip_entries([(name, [b"x"])]))


def test_two_members_with_one_name_are_refused() -> None:
    with pytest.raises(ValueError, match="two zip members"):
        b"".join(zip_entries([("a.dcm", [b"x"]), ("a.dcm", [b"y"])]))


def test_members_carry_the_given_time_stamp() -> None:
    archive = _read_zip(
        zip_entries([("a.dcm", [b"x"])], modified=datetime(2025, 3, 14, 9, 26, 52, tzinfo=UTC))
    )

    assert archive.getinfo("a.dcm").date_time == (2025, 3, 14, 9, 26, 52)


@given(
    st.lists(
        st.lists(st.binary(max_size=300), max_size=5),
        max_size=5,
    )
)
def test_any_members_round_trip_through_the_zip(contents: list[list[bytes]]) -> None:
    names = [f"DICOM/1.2/1.2.{i}.dcm" for i in range(len(contents))]

    archive = _read_zip(zip_entries(zip(names, contents, strict=True)))

    assert [archive.read(n) for n in archive.namelist()] == [b"".join(c) for c in contents]


def test_the_worker_refuses_at_start_a_pickup_key_the_links_could_not_be_signed_with() -> None:
    with pytest.raises(ValidationError, match=f"at least {MIN_KEY_BYTES} bytes"):
        NotifySettings(pickup_key="replace-me")  # type: ignore[arg-type]
    key = NotifySettings(pickup_key="k" * MIN_KEY_BYTES).pickup_key  # type: ignore[arg-type]
    assert key is not None and sign_pickup(
        "1.2.3", 1, "12345678", "87654321", T0, key.get_secret_value().encode()
    )

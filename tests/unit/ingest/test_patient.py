"""Finding the BSN where senders put it, and judging all claims of one header together."""

import io

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from services.ingest.domain.dicom import read_header
from services.ingest.domain.patient import (
    BsnFinding,
    find_bsn,
    uid_holds_bsn,
    without_bsns,
    without_own_bsn,
)
from shared.events import BsnStatus
from shared.identifiers import BSN_OID, Bsn
from tests.dicom_samples import bsn_item, make_dataset, make_dicom_bytes, patient_id_item

VALID = ["999990019", "999991772", "999999990", "111222333", "123456782"]
OTHER_VALID = "999991772"
INVALID = ["999990071", "123456789"]


def finding(patient: Dataset | None = None, *others: Dataset) -> BsnFinding:
    return find_bsn(make_dataset(patient=patient, other_patient_ids=others))


@pytest.mark.parametrize("bsn", VALID)
def test_a_valid_bsn_with_the_nlminbiza_issuer_is_verified(bsn: str) -> None:
    result = finding(patient_id_item(bsn, "NLMINBIZA"))
    assert result.status is BsnStatus.VERIFIED
    assert result.bsn == Bsn(bsn)


@pytest.mark.parametrize(
    "issuer",
    [
        "NLMINBIZA",
        "nlminbiza",
        " NLMinBiZa ",
        "NL MINBIZA",
        BSN_OID,
        f"urn:oid:{BSN_OID}",
        f"URN:OID:{BSN_OID}",
        f" {BSN_OID} ",
    ],
)
def test_the_bsn_issuer_is_recognised_however_it_is_spelled(issuer: str) -> None:
    assert finding(patient_id_item("999990019", issuer)).status is BsnStatus.VERIFIED


@pytest.mark.parametrize("oid", [BSN_OID, f"urn:oid:{BSN_OID}"])
def test_issuer_qualifiers_naming_the_bsn_oid_make_a_claim_without_an_issuer_name(
    oid: str,
) -> None:
    result = finding(patient_id_item("999990019", qualifiers_oid=oid))
    assert result == BsnFinding(BsnStatus.VERIFIED, Bsn("999990019"))


def test_a_nine_digit_patient_id_without_a_bsn_issuer_is_the_hospitals_own_number() -> None:
    assert finding(patient_id_item("999990019")).status is BsnStatus.ABSENT
    assert finding(patient_id_item("999990019", "ZNOORD")).status is BsnStatus.ABSENT


def test_qualifiers_naming_another_oid_do_not_make_a_bsn_claim() -> None:
    hospital = patient_id_item("999990019", "ZNOORD", qualifiers_oid="2.16.528.1.1007.99.1")
    assert finding(hospital).status is BsnStatus.ABSENT


def test_a_header_without_any_patient_id_has_no_bsn() -> None:
    result = finding(patient_id_item(None))
    assert result == BsnFinding(BsnStatus.ABSENT)
    assert result.bsn is None


def test_a_bsn_issuer_with_an_empty_patient_id_claims_nothing() -> None:
    assert finding(patient_id_item("", "NLMINBIZA")).status is BsnStatus.ABSENT


@pytest.mark.parametrize("value", [*INVALID, "99999001", "ABCDEFGHI", "999-99-0019", "9999900190"])
def test_a_claimed_bsn_that_fails_the_11_proof_or_is_malformed_is_invalid(value: str) -> None:
    result = finding(patient_id_item(value, "NLMINBIZA"))
    assert result == BsnFinding(BsnStatus.INVALID)


def test_a_bsn_only_in_other_patient_ids_is_found() -> None:
    result = finding(patient_id_item("H1234567", "ZNOORD"), bsn_item("999990019"))
    assert result == BsnFinding(BsnStatus.VERIFIED, Bsn("999990019"))


def test_each_other_patient_ids_item_is_judged_by_its_own_issuer() -> None:
    hospital_item = patient_id_item(OTHER_VALID, "ZNOORD")
    result = finding(bsn_item("999990019"), hospital_item)
    assert result == BsnFinding(BsnStatus.VERIFIED, Bsn("999990019"))


def test_the_same_bsn_in_several_places_is_one_verified_bsn() -> None:
    result = finding(bsn_item("999990019"), bsn_item("999990019"), bsn_item("999990019"))
    assert result == BsnFinding(BsnStatus.VERIFIED, Bsn("999990019"))


def test_two_different_valid_bsns_conflict_and_name_neither() -> None:
    result = finding(bsn_item("999990019"), bsn_item(OTHER_VALID))
    assert result == BsnFinding(BsnStatus.CONFLICTING)
    assert result.bsn is None
    # Neither is used, and neither may be published.
    assert result.claims == {Bsn("999990019"), Bsn(OTHER_VALID)}


def test_a_valid_bsn_next_to_an_invalid_claim_conflicts() -> None:
    assert finding(bsn_item("999990019"), bsn_item(INVALID[0])).status is BsnStatus.CONFLICTING


def test_only_invalid_claims_make_the_bsn_invalid_not_conflicting() -> None:
    assert finding(bsn_item(INVALID[0]), bsn_item(INVALID[1])).status is BsnStatus.INVALID


def test_a_finding_never_shows_the_bsn_in_its_repr() -> None:
    result = finding(bsn_item("999990019"))
    assert "999990019" not in repr(result)
    assert "999990019" not in str(result)


def test_a_verified_finding_must_carry_a_bsn_and_no_other_may() -> None:
    with pytest.raises(ValueError, match="exactly when"):
        BsnFinding(BsnStatus.VERIFIED)
    with pytest.raises(ValueError, match="exactly when"):
        BsnFinding(BsnStatus.CONFLICTING, Bsn("999990019"))


@pytest.mark.parametrize(
    "syntax",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ],
)
def test_the_bsn_is_read_from_the_header_bytes_in_every_encoding(syntax: str) -> None:
    data = make_dicom_bytes(
        transfer_syntax=syntax,
        patient=patient_id_item("H1234567", "ZNOORD"),
        other_patient_ids=[patient_id_item("999990019", qualifiers_oid=BSN_OID)],
    )
    result = read_header(io.BytesIO(data), len(data)).patient
    assert result == BsnFinding(BsnStatus.VERIFIED, Bsn("999990019"))


def test_a_conflict_between_header_attributes_is_seen_in_the_received_bytes() -> None:
    data = make_dicom_bytes(
        patient=bsn_item("999990019"), other_patient_ids=[bsn_item(OTHER_VALID)]
    )
    assert read_header(io.BytesIO(data), len(data)).patient.status is BsnStatus.CONFLICTING


def test_every_valid_bsn_claimed_is_kept_out_of_what_is_published() -> None:
    # Two different BSNs claimed: conflicting, no pseudonym, and neither may be published.
    first, second = Bsn("999990019"), Bsn("999991772")
    finding = BsnFinding(BsnStatus.CONFLICTING, claims=frozenset({first, second}))
    assert without_own_bsn(f"A{first.value}-{second.value}", finding.claims) == "A[BSN]-[BSN]"
    assert uid_holds_bsn(f"1.2.826.0.1.3680043.{second.value}.1", finding.claims)
    assert not uid_holds_bsn("1.2.826.0.1.3680043.1.1", finding.claims)
    assert without_bsns(None, finding.claims) is None

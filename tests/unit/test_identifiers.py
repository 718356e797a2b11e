"""BSN validation and masking, URA/UZI field types, and the keyed pseudonym."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from shared.identifiers import (
    BSN_DICOM_ISSUER,
    BSN_OID,
    BSN_SYSTEM,
    PROVIDER_TYPE_CODE_SYSTEM_OID,
    PSEUDONYM_PREFIX,
    URA_OID,
    URA_SYSTEM,
    UZI_PERSON_OID,
    UZI_PERSON_SYSTEM,
    UZI_ROLE_CODE_SYSTEM_OID,
    Bsn,
    InvalidBsn,
    Pseudonym,
    Pseudonymizer,
    Ura,
    UziNumber,
    contains_bsn,
    contains_pseudonym,
    contains_written_bsn,
    find_bsns,
    find_written_bsns,
    is_pseudonym,
    is_valid_bsn,
    mask_written_bsns,
    parse_bsn,
)

# Checked by hand against the 11-proof: 9*d1 + 8*d2 + ... + 2*d8 - d9 is a multiple of 11.
# 999990019 and 999991772 are from the government's published test numbers; 123456782 and
# 111222333 are the usual textbook examples.
VALID_BSNS = ["999990019", "999991772", "999999990", "111222333", "123456782"]
# 123456789: sum 147; 999999999: sum 387; 000000000 and 000000012: weighted sum 0.
INVALID_NINE_DIGITS = ["123456789", "999999999", "000000000", "000000012", "999990071"]
# The same valid number in non-ASCII digits, which str.isdigit() and int() would accept.
FULLWIDTH_BSN = "".join(chr(0xFF10 + int(d)) for d in "123456782")
ARABIC_INDIC_BSN = "".join(chr(0x0660 + int(d)) for d in "123456782")
KEY = b"k" * 32
OTHER_KEY = b"o" * 32

digit_strings = st.text(alphabet="0123456789", min_size=9, max_size=9)


def reference_weighted_sum(digits: str) -> int:
    weights = [9, 8, 7, 6, 5, 4, 3, 2, -1]
    return sum(int(d) * w for d, w in zip(digits, weights, strict=True))


@st.composite
def valid_bsns(draw: st.DrawFn) -> str:
    # Choose eight digits, then the check digit that makes the sum a multiple of 11 (if one exists).
    head = draw(st.text(alphabet="0123456789", min_size=8, max_size=8))
    partial = sum(int(d) * w for d, w in zip(head, [9, 8, 7, 6, 5, 4, 3, 2], strict=True))
    check = partial % 11
    assume(check <= 9 and partial - check != 0)
    return head + str(check)


class TestBsnValidation:
    @pytest.mark.parametrize("number", VALID_BSNS)
    def test_known_valid_numbers_pass_the_11_proof(self, number: str) -> None:
        assert is_valid_bsn(number)
        assert parse_bsn(number).value == number

    @pytest.mark.parametrize("number", INVALID_NINE_DIGITS)
    def test_nine_digit_numbers_that_fail_the_11_proof_are_rejected(self, number: str) -> None:
        assert not is_valid_bsn(number)
        with pytest.raises(InvalidBsn, match="11-proof"):
            parse_bsn(number)

    @pytest.mark.parametrize(
        "value",
        [
            "",
            "12345678",
            "1234567820",
            " 123456782",
            "123456782\n",
            "1234.56.782",
            "12345678a",
            FULLWIDTH_BSN,
            ARABIC_INDIC_BSN,
        ],
    )
    def test_anything_but_exactly_nine_ascii_digits_is_rejected(self, value: str) -> None:
        assert not is_valid_bsn(value)
        with pytest.raises(InvalidBsn, match="9 digits"):
            parse_bsn(value)

    @pytest.mark.parametrize("value", [123456782, None, b"123456782"])
    def test_non_strings_are_not_bsns(self, value: object) -> None:
        assert not is_valid_bsn(value)  # type: ignore[arg-type]
        with pytest.raises(InvalidBsn, match="must be a string"):
            parse_bsn(value)  # type: ignore[arg-type]

    def test_an_eight_digit_number_is_rejected_unless_padding_is_asked_for(self) -> None:
        with pytest.raises(InvalidBsn):
            parse_bsn("12345672")
        assert parse_bsn("12345672", pad_8_digits=True).value == "012345672"

    def test_padding_does_not_rescue_an_eight_digit_number_failing_the_11_proof(self) -> None:
        with pytest.raises(InvalidBsn, match="11-proof"):
            parse_bsn("12345678", pad_8_digits=True)

    @given(digit_strings)
    def test_a_nine_digit_string_is_valid_exactly_when_its_weighted_sum_is_a_nonzero_multiple_of_11(
        self, digits: str
    ) -> None:
        total = reference_weighted_sum(digits)
        assert is_valid_bsn(digits) == (total % 11 == 0 and total != 0)

    @given(valid_bsns(), st.integers(0, 8), st.integers(1, 9))
    def test_changing_any_single_digit_of_a_valid_bsn_makes_it_invalid(
        self, bsn: str, position: int, delta: int
    ) -> None:
        # True by construction: the change in sum is weight * delta with |weight|, |delta| < 11,
        # so it is never a multiple of the prime 11.
        assert is_valid_bsn(bsn)
        changed = str((int(bsn[position]) + delta) % 10)
        mutated = bsn[:position] + changed + bsn[position + 1 :]
        assert not is_valid_bsn(mutated)

    @given(valid_bsns(), st.integers(0, 7))
    def test_swapping_two_different_adjacent_digits_of_a_valid_bsn_makes_it_invalid(
        self, bsn: str, position: int
    ) -> None:
        # Neighbouring weights differ by 1, or by 3 for the last pair (2 and -1): never 0 mod 11.
        assume(bsn[position] != bsn[position + 1])
        swapped = bsn[:position] + bsn[position + 1] + bsn[position] + bsn[position + 2 :]
        assert not is_valid_bsn(swapped)


class TestBsnNeverLeaks:
    def test_repr_str_and_format_mask_the_number(self) -> None:
        bsn = parse_bsn("123456782")
        for shown in (repr(bsn), str(bsn), f"{bsn}", "%s" % bsn, f"{bsn!r}"):  # noqa: UP031
            assert shown == "Bsn(***)"
            assert "123456782" not in shown

    def test_a_bsn_inside_a_container_or_a_log_record_is_masked(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        bsn = parse_bsn("123456782")
        with caplog.at_level(logging.INFO):
            logging.getLogger("test").info("patient %s in %r", bsn, [bsn])
        assert "123456782" not in caplog.text
        assert "Bsn(***)" in caplog.text

    def test_json_encoding_a_bsn_by_accident_fails_instead_of_leaking(self) -> None:
        with pytest.raises(TypeError):
            json.dumps({"bsn": parse_bsn("123456782")})

    @given(digit_strings)
    def test_an_invalid_bsn_error_never_contains_the_input(self, digits: str) -> None:
        assume(not is_valid_bsn(digits))
        with pytest.raises(InvalidBsn) as raised:
            parse_bsn(digits)
        assert digits not in str(raised.value)
        assert digits not in repr(raised.value)
        assert raised.value.__cause__ is None and raised.value.__context__ is None

    def test_pydantic_validation_errors_do_not_echo_the_input(self) -> None:
        class Body(BaseModel):
            bsn: Bsn

        for bad in ("123456789", "12345678", 123456782):
            with pytest.raises(ValidationError) as raised:
                Body.model_validate({"bsn": bad})
            error = raised.value
            for text in (str(error), error.json(), repr(error.errors())):
                assert "12345678" not in text
            assert error.errors()[0]["input"] == "***"

    def test_a_bsn_is_immutable(self) -> None:
        bsn = parse_bsn("123456782")
        with pytest.raises(AttributeError):
            bsn._value = "999999990"  # type: ignore[misc]
        with pytest.raises(AttributeError):
            bsn.value = "999999990"  # type: ignore[misc]


class TestBsnValue:
    def test_equal_numbers_are_equal_and_hash_alike(self) -> None:
        assert parse_bsn("123456782") == Bsn("123456782")
        assert parse_bsn("123456782") != parse_bsn("999999990")
        assert len({parse_bsn("123456782"), Bsn("123456782")}) == 1

    def test_a_bsn_is_not_equal_to_its_digits(self) -> None:
        # Comparing with a str is almost certainly a bug (an unvalidated number); keep it False.
        assert parse_bsn("123456782") != "123456782"

    def test_constructing_a_bsn_validates_it(self) -> None:
        with pytest.raises(InvalidBsn):
            Bsn("123456789")

    def test_a_pickled_bsn_survives_the_round_trip(self) -> None:
        assert pickle.loads(pickle.dumps(parse_bsn("123456782"))).value == "123456782"

    def test_a_pydantic_model_takes_the_digits_and_dumps_them_in_clear(self) -> None:
        class Body(BaseModel):
            model_config = ConfigDict(frozen=True)
            bsn: Bsn

        body = Body.model_validate({"bsn": "999990019"})
        assert body.bsn == parse_bsn("999990019")
        assert "999990019" not in repr(body)
        assert body.model_dump() == {"bsn": "999990019"}
        assert Body.model_validate_json(body.model_dump_json()) == body
        assert Body(bsn=parse_bsn("999990019")) == body
        assert Body.model_json_schema()["properties"]["bsn"]["pattern"] == "^[0-9]{9}$"


class TestFindingBsnsInText:
    def test_only_standalone_nine_digit_runs_passing_the_11_proof_are_found(self) -> None:
        text = "bsn 123456782, order 123456789, ts 1234567820, uid 1.2.999990019.5, x999991772y"
        assert [m.group() for m in find_bsns(text)] == ["123456782", "999990019", "999991772"]

    def test_contains_bsn_is_false_for_longer_and_shorter_numbers(self) -> None:
        assert contains_bsn("patient 123456782")
        assert not contains_bsn("offset 1234567820 and 12345678")
        assert not contains_bsn("")


class TestFindingBsnsAPersonWrote:
    @pytest.mark.parametrize(
        "written",
        [
            "123456782",
            "1234.56.782",
            "123.456.782",
            "123 456 782",
            "123-456-782",
            "12 34 56 782",
            "123_456_782",
            "123:456:782",
            "123/456/782",
        ],
    )
    def test_a_bsn_written_in_groups_is_found(self, written: str) -> None:
        text = f"bewusteloos binnengebracht, BSN {written}, geen familie"
        assert [m.group() for m in find_written_bsns(text)] == [written]
        assert contains_written_bsn(text)
        assert mask_written_bsns(text) == "bewusteloos binnengebracht, BSN [BSN], geen familie"

    @pytest.mark.parametrize(
        "text",
        [
            "uid 1.2.840.10008.5.1.4.1.1.2",  # its digits joined hold 11-proof windows
            "12-05-2024 09:30",  # a date and a time
            "bel 06-1234 5678",  # a phone number: ten digits
            "123.456.789",  # nine digits failing the 11-proof
            "1234.56.7820",  # ten digits in groups
        ],
    )
    def test_digits_that_are_not_one_bsn_in_groups_are_not_found(self, text: str) -> None:
        assert not contains_written_bsn(text)
        assert mask_written_bsns(text) == text

    def test_a_bsn_beside_other_numbers_is_still_found_in_its_plain_form(self) -> None:
        # The space joins the date and the number into one longer sequence of groups, but the
        # nine-digit run itself stands alone.
        text = "opname 12-05-2024 123456782"
        assert mask_written_bsns(text) == "opname 12-05-2024 [BSN]"

    def test_every_bsn_is_masked_and_the_rest_kept(self) -> None:
        text = "BSN 999990019 of 1234.56.782; order 123456789"
        assert mask_written_bsns(text) == "BSN [BSN] of [BSN]; order 123456789"

    @given(st.text(alphabet="0123456789 .-abc", max_size=40))
    def test_masked_text_holds_no_bsn_any_longer(self, text: str) -> None:
        assert not contains_written_bsn(mask_written_bsns(text))


class TestNamingSystems:
    def test_the_oids_and_systems_match_the_dutch_registries(self) -> None:
        assert BSN_OID == "2.16.840.1.113883.2.4.6.3"
        assert BSN_SYSTEM == "http://fhir.nl/fhir/NamingSystem/bsn"
        assert BSN_DICOM_ISSUER == "NLMINBIZA"
        assert URA_OID == "2.16.528.1.1007.3.3"
        assert URA_SYSTEM == "http://fhir.nl/fhir/NamingSystem/ura"
        assert UZI_PERSON_OID == "2.16.528.1.1007.3.1"
        assert UZI_PERSON_SYSTEM == "http://fhir.nl/fhir/NamingSystem/uzi-nr-pers"
        assert UZI_ROLE_CODE_SYSTEM_OID == "2.16.840.1.113883.2.4.15.111"
        assert PROVIDER_TYPE_CODE_SYSTEM_OID == "2.16.840.1.113883.2.4.15.1060"


class TestUraAndUzi:
    class Sender(BaseModel):
        model_config = ConfigDict(frozen=True)
        ura: Ura
        uzi: UziNumber

    def test_valid_numbers_are_accepted_as_given(self) -> None:
        sender = self.Sender(ura="00012345", uzi="900012345")
        assert (sender.ura, sender.uzi) == ("00012345", "900012345")

    @pytest.mark.parametrize(
        "ura", ["1234567", "123456789", "1234567a", FULLWIDTH_BSN[:8], " 12345678", 12345678]
    )
    def test_a_ura_must_be_a_string_of_exactly_eight_ascii_digits(self, ura: object) -> None:
        with pytest.raises(ValidationError):
            TypeAdapter(Ura).validate_python(ura)

    @pytest.mark.parametrize("uzi", ["12345678", "1234567890", "12345678x", 900012345])
    def test_a_uzi_number_must_be_a_string_of_exactly_nine_ascii_digits(self, uzi: object) -> None:
        with pytest.raises(ValidationError):
            TypeAdapter(UziNumber).validate_python(uzi)


class TestPseudonymizer:
    def test_a_pseudonym_is_stable_for_the_same_key(self) -> None:
        bsn = parse_bsn("123456782")
        assert Pseudonymizer(KEY).pseudonym(bsn) == Pseudonymizer(KEY).pseudonym(bsn)

    def test_a_different_key_gives_a_different_pseudonym(self) -> None:
        bsn = parse_bsn("123456782")
        assert Pseudonymizer(KEY).pseudonym(bsn) != Pseudonymizer(OTHER_KEY).pseudonym(bsn)

    def test_different_bsns_give_different_pseudonyms(self) -> None:
        pseudonymizer = Pseudonymizer(KEY)
        pseudonyms = {pseudonymizer.pseudonym(parse_bsn(n)) for n in VALID_BSNS}
        assert len(pseudonyms) == len(VALID_BSNS)

    def test_the_pseudonym_is_a_domain_separated_hmac_sha256_in_base32(self) -> None:
        # Pinned so a change of algorithm, domain or encoding cannot go unnoticed: every stored
        # pseudonym (projection keys, consent state) would silently stop matching.
        assert Pseudonymizer(KEY).pseudonym(parse_bsn("123456782")) == (
            "psn1-qw5pvpiiqxe75cy2bdrak6eq3pslpbp3dv7rccsjl5x5bkoghqzq"
        )

    @given(valid_bsns())
    def test_a_pseudonym_has_the_documented_format_and_never_contains_the_bsn(
        self, number: str
    ) -> None:
        pseudonym = Pseudonymizer(KEY).pseudonym(parse_bsn(number))
        assert pseudonym.startswith(PSEUDONYM_PREFIX)
        assert is_pseudonym(pseudonym)
        assert TypeAdapter(Pseudonym).validate_python(pseudonym) == pseudonym
        assert number not in pseudonym
        assert not contains_bsn(pseudonym)

    def test_matches_compares_a_bsn_with_a_stored_pseudonym(self) -> None:
        pseudonymizer = Pseudonymizer(KEY)
        stored = pseudonymizer.pseudonym(parse_bsn("123456782"))
        assert pseudonymizer.matches(parse_bsn("123456782"), stored)
        assert not pseudonymizer.matches(parse_bsn("999999990"), stored)

    @pytest.mark.parametrize("key", [b"", b"k" * 31])
    def test_a_key_shorter_than_32_bytes_is_refused(self, key: bytes) -> None:
        with pytest.raises(ValueError, match="at least 32 bytes"):
            Pseudonymizer(key)

    def test_a_text_key_is_refused_so_its_encoding_is_decided_by_the_caller(self) -> None:
        with pytest.raises(TypeError):
            Pseudonymizer("k" * 32)  # type: ignore[arg-type]

    def test_only_a_parsed_bsn_can_be_pseudonymised(self) -> None:
        with pytest.raises(TypeError, match="parse_bsn"):
            Pseudonymizer(KEY).pseudonym("123456782")  # type: ignore[arg-type]

    def test_the_key_is_not_shown_in_repr(self) -> None:
        assert repr(Pseudonymizer(KEY)) == "Pseudonymizer(key=***)"
        assert "kkkk" not in repr(Pseudonymizer(KEY))

    @pytest.mark.parametrize(
        "value",
        [
            "",
            "psn1-",
            "psn2-" + "a" * 52,
            "psn1-" + "a" * 51,
            "psn1-" + "a" * 53,
            "psn1-" + "A" * 52,
            "psn1-" + "1" * 52,
            "123456782",
        ],
    )
    def test_malformed_pseudonyms_are_rejected(self, value: str) -> None:
        assert not is_pseudonym(value)
        with pytest.raises(ValidationError):
            TypeAdapter(Pseudonym).validate_python(value)

    def test_a_pseudonym_is_found_inside_longer_text(self) -> None:
        pseudonym = Pseudonymizer(KEY).pseudonym(parse_bsn("123456782"))
        assert contains_pseudonym(f"patient={pseudonym} done")
        assert not contains_pseudonym("patient=psn1-short")

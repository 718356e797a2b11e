"""The DICOM status constants ingest answers with, and how they are classified."""

import pytest

from services.ingest.domain.status import Status, is_failure, is_transient, is_warning

FAILURES = [
    Status.OUT_OF_RESOURCES,
    Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    Status.CANNOT_UNDERSTAND,
    Status.TRANSFER_SYNTAX_NOT_SUPPORTED,
    Status.PROCESSING_FAILURE,
    Status.DUPLICATE_SOP_INSTANCE,
    Status.SOP_CLASS_NOT_SUPPORTED,
    Status.NOT_AUTHORIZED,
]
WARNINGS = [
    Status.WARNING_COERCION,
    Status.WARNING_ELEMENTS_DISCARDED,
    Status.WARNING_DATASET_MISMATCH,
]


def test_every_status_has_the_code_the_standard_gives_it() -> None:
    assert {status.name: status.value for status in Status} == {
        "SUCCESS": 0x0000,
        "OUT_OF_RESOURCES": 0xA700,
        "DATASET_DOES_NOT_MATCH_SOP_CLASS": 0xA900,
        "CANNOT_UNDERSTAND": 0xC000,
        "TRANSFER_SYNTAX_NOT_SUPPORTED": 0xC122,
        "PROCESSING_FAILURE": 0x0110,
        "DUPLICATE_SOP_INSTANCE": 0x0111,
        "SOP_CLASS_NOT_SUPPORTED": 0x0122,
        "NOT_AUTHORIZED": 0x0124,
        "WARNING_COERCION": 0xB000,
        "WARNING_ELEMENTS_DISCARDED": 0xB006,
        "WARNING_DATASET_MISMATCH": 0xB007,
    }


def test_statuses_are_plain_integers_for_the_dicom_json_response() -> None:
    assert Status.CANNOT_UNDERSTAND == 0xC000
    assert int(Status.TRANSFER_SYNTAX_NOT_SUPPORTED) == 49442


@pytest.mark.parametrize("status", FAILURES)
def test_a_failure_is_neither_success_nor_warning(status: Status) -> None:
    assert is_failure(status)
    assert not is_warning(status)


@pytest.mark.parametrize("status", WARNINGS)
def test_a_warning_means_stored_and_is_not_a_failure(status: Status) -> None:
    assert is_warning(status)
    assert not is_failure(status)
    assert not is_transient(status)


def test_success_is_neither_failure_nor_warning_nor_transient() -> None:
    assert not is_failure(Status.SUCCESS)
    assert not is_warning(Status.SUCCESS)
    assert not is_transient(Status.SUCCESS)


@pytest.mark.parametrize("code", [0xA700, 0xA701, 0xA7FF])
def test_only_out_of_resources_codes_are_worth_retrying(code: int) -> None:
    assert is_transient(code)
    assert is_failure(code)


@pytest.mark.parametrize("status", [s for s in FAILURES if s is not Status.OUT_OF_RESOURCES])
def test_other_failures_will_fail_again_if_retried_unchanged(status: Status) -> None:
    assert not is_transient(status)


def test_codes_outside_the_named_ones_are_classified_by_range() -> None:
    assert is_warning(0xB123)
    assert is_failure(0xA9FF)
    assert is_failure(0xC3FF)
    assert not is_transient(0xA800)


@pytest.mark.parametrize("code", [0xFF00, 0xFF01, 0xFE00])
def test_pending_and_cancel_are_not_outcomes_of_a_store(code: int) -> None:
    assert not is_failure(code)
    assert not is_warning(code)

"""Classifying what a receiver answered per instance, and the errors that fail a whole batch."""

import pytest

from services.notify.domain.outcomes import (
    BatchResult,
    InstanceOutcome,
    InstanceStatus,
    OutgoingInstance,
    PermanentDeliveryError,
    TransientDeliveryError,
    classify_failure_reason,
    classify_status,
    describe_status,
    format_code,
    outcome_for_failure_reason,
    outcome_for_status,
)
from shared.errors import PoisonEvent, TransientError

STORED, WARNING, FAILED = InstanceStatus.STORED, InstanceStatus.WARNING, InstanceStatus.FAILED
ALREADY_PRESENT = InstanceStatus.ALREADY_PRESENT


def test_success_is_stored() -> None:
    assert classify_status(0x0000) == (STORED, False)
    assert outcome_for_status("1.2.3", 0x0000) == InstanceOutcome("1.2.3", STORED)


@pytest.mark.parametrize("status", [0xB000, 0xB006, 0xB007, 0xB123, 0x0001, 0x0107, 0x0116])
def test_warnings_mean_stored_but_not_quite_as_sent(status: int) -> None:
    assert classify_status(status) == (WARNING, False)


@pytest.mark.parametrize("status", [0xA700, 0xA701, 0xA7FF, 0x0213])
def test_out_of_resources_is_a_failure_worth_retrying(status: int) -> None:
    assert classify_status(status) == (FAILED, True)


def test_a_processing_failure_is_the_receivers_own_trouble_and_worth_retrying() -> None:
    # dcm4chee and the Azure DICOM service answer 0110 for their internal errors.
    assert classify_status(0x0110) == (FAILED, True)
    assert outcome_for_status("1.2.3", 0x0110) == InstanceOutcome(
        "1.2.3", FAILED, "0110", "processing failure", transient=True
    )


def test_a_duplicate_sop_instance_is_already_present_and_keeps_its_code() -> None:
    # The receiver holds that SOP Instance UID: as a rule our own copy from an earlier attempt.
    assert classify_status(0x0111) == (ALREADY_PRESENT, False)
    outcome = outcome_for_status("1.2.3", 0x0111)
    assert (outcome.status, outcome.code, outcome.failed) == (ALREADY_PRESENT, "0111", False)
    assert BatchResult((outcome,)).stored == (outcome,)


@pytest.mark.parametrize(
    "status", [0xA900, 0xA9FF, 0xC000, 0xC122, 0xCFFF, 0x0117, 0x0122, 0x0124, 0x0211]
)
def test_other_failures_are_permanent(status: int) -> None:
    assert classify_status(status) == (FAILED, False)


def test_a_stow_failure_reason_already_stored_is_already_present_and_being_created_transient() -> (
    None
):
    # The Azure DICOM service's 45070 and 45071, listed in FailedSOPSequence.
    assert classify_failure_reason(45070) == (ALREADY_PRESENT, False)
    assert classify_failure_reason(45071) == (FAILED, True)
    assert outcome_for_failure_reason("1.2.3", 0xB00E) == InstanceOutcome(
        "1.2.3", ALREADY_PRESENT, "B00E", "instance already stored"
    )
    assert outcome_for_failure_reason("1.2.3", 0xB00F) == InstanceOutcome(
        "1.2.3", FAILED, "B00F", "instance being stored by another process", transient=True
    )
    assert classify_failure_reason(0x0111) == (ALREADY_PRESENT, False)


@pytest.mark.parametrize("reason", [0x0000, 0xB000, 0xB006, 0x0001])
def test_a_stow_failure_reason_that_means_stored_is_a_permanent_failure(reason: int) -> None:
    # Listed as failed with a code that says otherwise: the receiver contradicts itself.
    assert classify_failure_reason(reason) == (FAILED, False)
    assert outcome_for_failure_reason("1.2.3", reason).reason == "listed as failed"


@pytest.mark.parametrize("reason", [0xA700, 0xA900, 0xC122, 0x0110])
def test_other_stow_failure_reasons_are_classified_as_c_store_statuses(reason: int) -> None:
    assert classify_failure_reason(reason) == classify_status(reason)


@pytest.mark.parametrize("status", [0xFF00, 0xFF01, 0xFE00])
def test_a_pending_or_cancel_answer_to_a_store_is_a_transient_failure(status: int) -> None:
    assert classify_status(status) == (FAILED, True)


def test_an_outcome_carries_the_code_as_four_hex_digits_and_a_fixed_reason() -> None:
    outcome = outcome_for_status("1.2.3", 0xA702)

    assert outcome == InstanceOutcome("1.2.3", FAILED, "A702", "out of resources", True)
    assert outcome_for_status("1.2.3", 0x0122).reason == "SOP class not supported"
    assert outcome_for_status("1.2.3", 0xB000) == InstanceOutcome(
        "1.2.3", WARNING, "B000", "coercion of data elements"
    )


def test_codes_and_descriptions() -> None:
    assert format_code(0x0122) == "0122"
    assert format_code(0xC122) == "C122"
    assert describe_status(0xC0FF) == "cannot understand"
    assert describe_status(0xA9AB) == "data set does not match SOP class"
    assert describe_status(0x0999) == "status 0999"
    with pytest.raises(ValueError):
        format_code(0x10000)
    with pytest.raises(ValueError):
        classify_status(-1)


def test_an_outcome_refuses_a_malformed_code_or_a_transient_success() -> None:
    with pytest.raises(ValueError):
        InstanceOutcome("1.2.3", FAILED, code="a700")
    with pytest.raises(ValueError):
        InstanceOutcome("1.2.3", FAILED, code="A70")
    with pytest.raises(ValueError):
        InstanceOutcome("1.2.3", STORED, transient=True)


def test_a_batch_result_sorts_its_outcomes() -> None:
    outcomes = (
        InstanceOutcome("1.1", STORED),
        InstanceOutcome("1.2", WARNING, "B006", "elements discarded"),
        InstanceOutcome("1.3", FAILED, "A700", "out of resources", transient=True),
        InstanceOutcome("1.4", FAILED, "0122", "SOP class not supported"),
        InstanceOutcome("1.5", InstanceStatus.ALREADY_PRESENT),
    )
    result = BatchResult(outcomes)

    assert [o.sop_instance_uid for o in result.stored] == ["1.1", "1.2", "1.5"]
    assert [o.sop_instance_uid for o in result.failed] == ["1.3", "1.4"]
    assert [o.sop_instance_uid for o in result.transient_failures] == ["1.3"]
    assert [o.sop_instance_uid for o in result.permanent_failures] == ["1.4"]
    assert result.counts == {
        STORED: 1,
        WARNING: 1,
        FAILED: 2,
        InstanceStatus.ALREADY_PRESENT: 1,
    }
    assert not result.all_stored
    assert result.outcome("1.4").code == "0122"
    with pytest.raises(KeyError):
        result.outcome("9.9")


def test_batch_results_merge_in_order_and_an_empty_one_is_all_stored() -> None:
    first = BatchResult((InstanceOutcome("1.1", STORED),))
    second = BatchResult((InstanceOutcome("1.2", FAILED, "A900", "x"),))

    merged = BatchResult.merge([first, second])

    assert [o.sop_instance_uid for o in merged.outcomes] == ["1.1", "1.2"]
    assert BatchResult().all_stored
    assert BatchResult().counts[STORED] == 0


def test_the_batch_errors_fit_the_projects_error_policy() -> None:
    transient = TransientDeliveryError("STOW-RS answered HTTP 503", retry_after=30.0)
    permanent = PermanentDeliveryError("STOW-RS answered HTTP 403")

    assert isinstance(transient, TransientError)
    assert (transient.reason, transient.retry_after) == ("STOW-RS answered HTTP 503", 30.0)
    assert isinstance(permanent, PoisonEvent)
    assert permanent.reason == str(permanent) == "STOW-RS answered HTTP 403"


def test_an_outgoing_instance_never_shows_its_bytes() -> None:
    instance = OutgoingInstance(
        "1.2.3", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", b"x" * 9
    )

    assert "size=9" in repr(instance)
    assert "xxx" not in repr(instance)

"""The C-STORE SCU against a scripted association: what an abort mid-batch keeps, and the
priority each request carries.

Real receivers are in tests/integration/notify/test_channels_orthanc.py; here the association
answers (or breaks off) exactly as a test asks, which Orthanc cannot be made to do on cue.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from services.notify.adapters.dimse import (
    PRIORITY_HIGH,
    PRIORITY_MEDIUM,
    DimseSender,
    c_store_priority,
)
from services.notify.domain.outcomes import InstanceStatus, OutgoingInstance, TransientDeliveryError
from services.routing.domain.directory import DimseEndpoint
from shared.events import Urgency
from tests.dicom_samples import make_dicom_bytes
from tests.factories import make_uid

ENDPOINT = DimseEndpoint(id="pacs-dimse", host="pacs.example.test", port=104, ae_title="PACS")
ABORT = "abort"  # the peer aborts (or the connection drops) instead of answering


class ScriptedAssociation:
    """An established association whose C-STORE responses are ``answers``, in order: a status,
    or ABORT (pynetdicom then returns a data set without Status, the association gone)."""

    def __init__(self, answers: list[int | str]) -> None:
        self.answers = list(answers)
        self.is_established = True
        self.accepted_contexts = [
            SimpleNamespace(
                abstract_syntax=CTImageStorage, transfer_syntax=[ExplicitVRLittleEndian]
            )
        ]
        self.rejected_contexts: list[Any] = []
        self.requests: list[dict[str, Any]] = []

    def send_c_store(self, dataset: Dataset, msg_id: int = 1, priority: int = 2) -> Dataset:
        self.requests.append({"sop": dataset.SOPInstanceUID, "priority": priority})
        answer = self.answers.pop(0)
        response = Dataset()
        if answer == ABORT:
            self.is_established = False
            return response
        response.Status = answer
        return response

    def release(self) -> None:
        self.is_established = False

    def abort(self) -> None:
        self.is_established = False


def instance() -> OutgoingInstance:
    uid = make_uid()
    data = make_dicom_bytes(SOPInstanceUID=uid, SOPClassUID=CTImageStorage)
    return OutgoingInstance(uid, CTImageStorage, ExplicitVRLittleEndian, data)


def sender_over(assoc: ScriptedAssociation, monkeypatch: pytest.MonkeyPatch) -> DimseSender:
    sender = DimseSender()
    monkeypatch.setattr(sender, "_associate", lambda endpoint, contexts: assoc)
    return sender


async def test_an_abort_mid_batch_keeps_the_answers_received_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batch = [instance() for _ in range(4)]
    assoc = ScriptedAssociation([0x0000, 0x0111, ABORT])

    with pytest.raises(TransientDeliveryError, match="after 2 of 4 instances") as caught:
        await sender_over(assoc, monkeypatch).send(ENDPOINT, batch)

    # Each C-STORE response is final: the first two are settled, the third (in flight when the
    # association went) and the fourth (never sent) are what a retry sends.
    answered = caught.value.answered
    assert [(o.sop_instance_uid, o.status) for o in answered.outcomes] == [
        (batch[0].sop_instance_uid, InstanceStatus.STORED),
        (batch[1].sop_instance_uid, InstanceStatus.ALREADY_PRESENT),
    ]
    assert len(assoc.requests) == 3


async def test_an_abort_before_any_answer_keeps_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    assoc = ScriptedAssociation([ABORT])

    with pytest.raises(TransientDeliveryError, match="after 0 of 2 instances") as caught:
        await sender_over(assoc, monkeypatch).send(ENDPOINT, [instance(), instance()])

    assert caught.value.answered.outcomes == ()


@pytest.mark.parametrize(
    ("urgency", "priority"),
    [
        (Urgency.ROUTINE, PRIORITY_MEDIUM),
        (Urgency.URGENT, PRIORITY_HIGH),
        (Urgency.EMERGENCY, PRIORITY_HIGH),
    ],
)
async def test_every_c_store_request_carries_the_deliverys_priority(
    urgency: Urgency, priority: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    assoc = ScriptedAssociation([0x0000, 0x0000])

    await sender_over(assoc, monkeypatch).send(
        ENDPOINT, [instance(), instance()], priority=c_store_priority(urgency)
    )

    assert [r["priority"] for r in assoc.requests] == [priority, priority]


async def test_a_routine_batch_goes_at_medium_priority_not_pynetdicoms_low(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # PS3.7: 0000 MEDIUM, 0001 HIGH, 0002 LOW; pynetdicom's default is 2.
    assoc = ScriptedAssociation([0x0000])

    await sender_over(assoc, monkeypatch).send(ENDPOINT, [instance()])

    assert assoc.requests[0]["priority"] == 0x0000

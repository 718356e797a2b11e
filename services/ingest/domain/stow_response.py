"""The STOW-RS answer: Store Instances Response Module (PS3.18 §10.5.3) and its HTTP status."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.ingest.domain.status import Status

# Private block for a human-readable reason per failed instance (FailureReason is only a code).
PRIVATE_CREATOR = "BEELDPORTAAL 1"
_CREATOR_TAG = "00090010"
_REASON_TAG = "00091001"


@dataclass(frozen=True)
class InstanceResult:
    status: Status
    reason: str
    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None
    stored: bool
    # Where it can be retrieved (WADO-RS), when stored and a retrieve base is configured.
    retrieve_url: str | None = None


def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]}


def _item(result: InstanceResult) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if result.sop_class_uid:
        item["00081150"] = _ui(result.sop_class_uid)
    if result.sop_instance_uid:
        item["00081155"] = _ui(result.sop_instance_uid)
    return item


def response_body(results: Sequence[InstanceResult], study_url: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if study_url:
        body["00081190"] = {"vr": "UR", "Value": [study_url]}
    failed, referenced = [], []
    for result in results:
        item = _item(result)
        if not result.stored:
            item["00081197"] = {"vr": "US", "Value": [int(result.status)]}
            item[_CREATOR_TAG] = {"vr": "LO", "Value": [PRIVATE_CREATOR]}
            item[_REASON_TAG] = {"vr": "LT", "Value": [result.reason]}
            failed.append(item)
        else:
            if result.retrieve_url is not None:
                item["00081190"] = {"vr": "UR", "Value": [result.retrieve_url]}
            if result.status != Status.SUCCESS:
                item["00081196"] = {"vr": "US", "Value": [int(result.status)]}
            referenced.append(item)
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    return body


def http_status(results: Sequence[InstanceResult]) -> int:
    """PS3.18: 200 all stored; 202 some stored or warnings; 409 none stored (conflict).

    None stored only because storage or the event bus was unavailable is 503: nothing is wrong
    with the request, and STOW clients (e.g. dicomweb-client) retry a 503 by themselves.
    """
    stored = [r for r in results if r.stored]
    if not results:
        return 400
    if len(stored) == len(results):
        return 200 if all(r.status == Status.SUCCESS for r in stored) else 202
    if stored:
        return 202
    if all(r.status == Status.OUT_OF_RESOURCES for r in results):
        return 503
    return 409

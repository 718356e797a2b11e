"""Where an instance's received bytes live in object storage: sender, study, series, instance."""

from __future__ import annotations

from pydantic import TypeAdapter, ValidationError

from services.ingest.domain.dicom import InstanceHeader, is_valid_uid
from shared.events.common import ObjectKey
from shared.identifiers import Ura

_URA: TypeAdapter[str] = TypeAdapter(Ura)
_OBJECT_KEY: TypeAdapter[str] = TypeAdapter(ObjectKey)


def object_key(sender_ura: str, header: InstanceHeader) -> str:
    """``{sender_ura}/{study}/{series}/{sop}.dcm``: identifiers only, never patient data.

    The sender is part of the key so two senders that (wrongly) reuse a UID never overwrite
    each other's bytes. The UIDs were validated by read_header; they are checked again because
    a key that is a path on a POSIX-backed S3 server must never depend on a caller's care.
    """
    try:
        _URA.validate_python(sender_ura)
    except ValidationError:
        raise ValueError("the sender URA must be 8 digits") from None
    uids = (header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
    for name, uid in zip(("Study", "Series", "SOP"), uids, strict=True):
        if not is_valid_uid(uid):
            raise ValueError(f"the {name} Instance UID is not a valid DICOM UID")
    study, series, sop = uids
    return _OBJECT_KEY.validate_python(f"{sender_ura}/{study}/{series}/{sop}.dcm")

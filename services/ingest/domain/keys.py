"""Where an instance's received bytes live in object storage: sender and SOP Instance UID."""

from __future__ import annotations

from pydantic import TypeAdapter, ValidationError

from services.ingest.domain.dicom import InstanceHeader, is_valid_uid
from shared.events.common import ObjectKey
from shared.identifiers import Ura

_URA: TypeAdapter[str] = TypeAdapter(Ura)
_OBJECT_KEY: TypeAdapter[str] = TypeAdapter(ObjectKey)


def object_key(sender_ura: str, header: InstanceHeader) -> str:
    """``{sender_ura}/{sop}.dcm``: identifiers only, never patient data.

    One key per SOP Instance UID of a sender, whatever study or series the instance names: the
    same UID sent again with other content, also under another series or study, finds the first
    copy under its key and is refused (0111), never stored beside it (a receiver would get two
    different instances under one UID). The sender is part of the key so two senders that
    (wrongly) reuse a UID never overwrite or refuse each other. The UID was validated by
    read_header; it is checked again because a key that is a path on a POSIX-backed S3 server
    must never depend on a caller's care.
    """
    try:
        _URA.validate_python(sender_ura)
    except ValidationError:
        raise ValueError("the sender URA must be 8 digits") from None
    if not is_valid_uid(header.sop_instance_uid):
        raise ValueError("the SOP Instance UID is not a valid DICOM UID")
    return _OBJECT_KEY.validate_python(f"{sender_ura}/{header.sop_instance_uid}.dcm")

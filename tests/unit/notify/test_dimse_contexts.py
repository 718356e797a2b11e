"""Which presentation contexts a C-STORE batch asks for: every instance as stored, and native
little-endian ones also in the syntaxes pynetdicom can re-encode them to without loss."""

import pytest
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
    RLELossless,
)

from services.notify.adapters.dimse import MAX_PRESENTATION_CONTEXTS, presentation_contexts
from services.notify.domain.outcomes import OutgoingInstance
from tests.factories import make_uid


def instance(sop_class: str, syntax: str) -> OutgoingInstance:
    return OutgoingInstance(make_uid(), sop_class, syntax, b"")


def requested(*instances: OutgoingInstance) -> list[tuple[str, list[str]]]:
    return [
        (str(c.abstract_syntax), [str(s) for s in c.transfer_syntax])
        for c in presentation_contexts(instances)
    ]


def test_native_instances_share_one_context_per_sop_class_offering_both_vr_encodings() -> None:
    contexts = requested(
        instance(CTImageStorage, ImplicitVRLittleEndian),
        instance(CTImageStorage, ExplicitVRLittleEndian),
        instance(CTImageStorage, ImplicitVRLittleEndian),
        instance(MRImageStorage, ExplicitVRLittleEndian),
    )

    assert contexts == [
        (CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
        (MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    ]


def test_a_deflated_instance_is_offered_as_stored_first_then_inflated() -> None:
    assert requested(instance(CTImageStorage, DeflatedExplicitVRLittleEndian)) == [
        (
            CTImageStorage,
            [DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian],
        )
    ]


def test_without_a_decoder_compressed_and_big_endian_instances_are_offered_only_as_stored() -> None:
    contexts = requested(
        instance(CTImageStorage, JPEGBaseline8Bit),
        instance(CTImageStorage, RLELossless),
        instance(CTImageStorage, JPEGBaseline8Bit),
        instance(CTImageStorage, ExplicitVRBigEndian),
        instance(CTImageStorage, "1.2.826.0.1.3680043.8.498.77"),  # unknown to pydicom
    )

    assert contexts == [
        (CTImageStorage, [JPEGBaseline8Bit]),
        (CTImageStorage, [RLELossless]),
        (CTImageStorage, [ExplicitVRBigEndian]),
        (CTImageStorage, ["1.2.826.0.1.3680043.8.498.77"]),
    ]


def test_a_batch_needing_more_contexts_than_one_association_holds_is_refused() -> None:
    many = [
        instance(f"1.2.826.0.1.3680043.8.498.{n}", ExplicitVRLittleEndian)
        for n in range(MAX_PRESENTATION_CONTEXTS + 1)
    ]

    assert len(presentation_contexts(many[:-1])) == MAX_PRESENTATION_CONTEXTS
    with pytest.raises(ValueError, match="split it"):
        presentation_contexts(many)

"""The uncompressed fallback of C-STORE delivery: which contexts a compressed instance adds,
decoding pydicom's own compressed samples, and a batch against a receiver that accepts its SOP
classes only uncompressed (a scripted association; Orthanc does it for real in
tests/integration/notify/test_channels_orthanc.py)."""

from __future__ import annotations

import asyncio
import copy
import io
import re
import threading
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
import structlog
from prometheus_client import CollectorRegistry
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from services.notify.adapters import dimse as dimse_adapter
from services.notify.adapters.dimse import (
    MAX_PRESENTATION_CONTEXTS,
    DimseSender,
    presentation_contexts,
)
from services.notify.domain.outcomes import (
    InstanceStatus,
    OutgoingInstance,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from services.notify.domain.transcode import (
    MAX_DECODED_BYTES,
    UndecodablePixelData,
    decodable_syntaxes,
    decoded_size,
    decompress,
)
from services.notify.worker_metrics import NotifyWorkerMetrics
from services.routing.domain.directory import DimseEndpoint
from tests.dicom_samples import make_dicom_bytes
from tests.factories import make_uid

ENDPOINT = DimseEndpoint(id="pacs-dimse", host="pacs.example.test", port=104, ae_title="PACS")
NATIVE = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
# PS3.8 §9.3.3.2 results: Orthanc (dcmtk) answers 3 where 4 would be exact (none of the
# transfer syntaxes offered taken).
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

# pydicom's samples: (file, stored syntax, the same image uncompressed or None).
LOSSLESS = [
    ("SC_rgb_rle.dcm", RLELossless, None),
    ("MR_small_RLE.dcm", RLELossless, "MR_small.dcm"),
    ("SC_rgb_jpeg_gdcm.dcm", JPEGLosslessSV1, None),
    ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless, "MR_small.dcm"),
    ("MR_small_jp2klossless.dcm", JPEG2000Lossless, "MR_small.dcm"),
]
LOSSY = [
    ("SC_rgb_jpeg_dcmtk.dcm", JPEGBaseline8Bit),  # YBR_FULL
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", JPEGBaseline8Bit),  # YBR_FULL_422
    ("examples_ybr_color.dcm", JPEGBaseline8Bit),  # YBR_FULL_422, 30 frames
    ("JPEGLSNearLossless_16.dcm", JPEGLSNearLossless),  # no Lossy Image Compression of its own
    ("693_J2KI.dcm", JPEG2000),
]


def sample(name: str) -> Dataset:
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return pydicom.dcmread(path)


def part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def outgoing(data: bytes) -> OutgoingInstance:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return OutgoingInstance(ds.SOPInstanceUID, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID, data)


def corrupted(name: str) -> bytes:
    """A sample whose (last) frame's codestream is cut to a third: undecodable."""
    ds = sample(name)
    frames = list(generate_frames(ds.PixelData, number_of_frames=ds.get("NumberOfFrames") or 1))
    frames[-1] = frames[-1][: len(frames[-1]) // 3]
    ds.PixelData = encapsulate(frames)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return part10(ds)


# --- presentation contexts ------------------------------------------------------------------------


def instance(sop_class: str, syntax: str) -> OutgoingInstance:
    return OutgoingInstance(make_uid(), sop_class, syntax, b"")


def requested(
    *instances: OutgoingInstance, decodable: frozenset[str] = frozenset({JPEGBaseline8Bit})
) -> list[tuple[str, list[str]]]:
    return [
        (str(c.abstract_syntax), [str(s) for s in c.transfer_syntax])
        for c in presentation_contexts(instances, decodable)
    ]


def test_a_decodable_compressed_instance_is_offered_as_stored_and_uncompressed_apart() -> None:
    # Apart: in one context the receiver would pick a syntax of its liking, and may well take
    # Explicit VR LE over the JPEG it accepts too; the stored syntax must stay its own choice.
    contexts = requested(
        instance(SecondaryCaptureImageStorage, JPEGBaseline8Bit),
        instance(SecondaryCaptureImageStorage, JPEGBaseline8Bit),
        instance(MRImageStorage, JPEGBaseline8Bit),
    )

    assert contexts == [
        (SecondaryCaptureImageStorage, [JPEGBaseline8Bit]),
        (MRImageStorage, [JPEGBaseline8Bit]),
        (SecondaryCaptureImageStorage, NATIVE),
        (MRImageStorage, NATIVE),
    ]


def test_a_sop_class_with_native_instances_too_shares_their_context_for_its_fallback() -> None:
    contexts = requested(
        instance(CTImageStorage, JPEGBaseline8Bit),
        instance(CTImageStorage, ImplicitVRLittleEndian),
    )

    assert contexts == [
        (CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
        (CTImageStorage, [JPEGBaseline8Bit]),
    ]


def test_a_syntax_this_process_cannot_decode_is_offered_only_as_stored() -> None:
    contexts = requested(instance(CTImageStorage, RLELossless), instance(MRImageStorage, MPEG2MPML))

    assert contexts == [(CTImageStorage, [RLELossless]), (MRImageStorage, [MPEG2MPML])]


def test_fallbacks_take_only_the_room_the_stored_syntaxes_leave_of_128_contexts() -> None:
    stored = [
        instance(f"1.2.826.0.1.3680043.8.498.{n}", JPEGBaseline8Bit)
        for n in range(MAX_PRESENTATION_CONTEXTS - 2)
    ]

    contexts = requested(*stored)
    full = requested(*stored, instance(CTImageStorage, JPEGBaseline8Bit))

    assert len(contexts) == len(full) == MAX_PRESENTATION_CONTEXTS
    assert contexts[-2:] == [(stored[0].sop_class_uid, NATIVE), (stored[1].sop_class_uid, NATIVE)]
    assert full[-1] == (stored[0].sop_class_uid, NATIVE)  # every stored syntax first
    with pytest.raises(ValueError, match="split it"):
        requested(*stored, *(instance(f"1.2.3.{n}", JPEGBaseline8Bit) for n in range(3)))


def test_what_can_be_decoded_is_what_the_installed_plugins_decode() -> None:
    # python-gdcm (a dependency) brings JPEG Lossless, JPEG-LS and JPEG 2000; RLE needs none.
    assert {
        RLELossless,
        JPEGBaseline8Bit,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEG2000Lossless,
        JPEG2000,
    } <= decodable_syntaxes()
    assert MPEG2MPML not in decodable_syntaxes()  # pydicom has no video decoder
    assert not {ExplicitVRLittleEndian, ImplicitVRLittleEndian} & decodable_syntaxes()


# --- decoding -------------------------------------------------------------------------------------


def decoded(ds: Dataset) -> Dataset:
    """``ds`` decompressed, written and read back: what a receiver gets."""
    decompress(ds)
    return pydicom.dcmread(io.BytesIO(part10(ds)))


@pytest.mark.parametrize(("name", "syntax", "uncompressed"), LOSSLESS)
def test_a_losslessly_compressed_instance_decodes_to_exactly_its_pixels(
    name: str, syntax: UID, uncompressed: str | None
) -> None:
    original = sample(name)
    assert original.file_meta.TransferSyntaxUID == syntax

    ds = decoded(sample(name))

    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not ds["PixelData"].is_undefined_length  # native, not encapsulated
    assert ds.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(ds.pixel_array, original.pixel_array)
    if uncompressed is not None:
        assert np.array_equal(ds.pixel_array, sample(uncompressed).pixel_array)
    assert "LossyImageCompression" not in ds


def test_jpeg_lossless_decodes_to_the_same_pixels_as_the_rle_copy_of_that_image() -> None:
    # Two encodings of one image (same SOP Instance UID): both lossless, so equal when decoded.
    jpeg, rle = decoded(sample("SC_rgb_jpeg_gdcm.dcm")), decoded(sample("SC_rgb_rle.dcm"))

    assert np.array_equal(jpeg.pixel_array, rle.pixel_array)
    assert jpeg.PhotometricInterpretation == rle.PhotometricInterpretation == "RGB"


@pytest.mark.parametrize(("name", "syntax"), LOSSY)
def test_a_lossy_instance_decodes_to_its_pixels_and_says_it_was_lossy_compressed(
    name: str, syntax: UID
) -> None:
    original = sample(name)
    assert original.file_meta.TransferSyntaxUID == syntax

    ds = decoded(sample(name))

    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(ds.pixel_array, original.pixel_array)
    assert ds.LossyImageCompression == "01"
    assert ds.get("NumberOfFrames", 1) == original.get("NumberOfFrames", 1)


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm"])
def test_a_ycbcr_jpeg_decodes_to_rgb_and_says_so(name: str) -> None:
    assert sample(name).PhotometricInterpretation.startswith("YBR_FULL")

    ds = decoded(sample(name))

    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration) == (
        "RGB",
        3,
        0,
    )
    # Whole frames of RGB triplets: 8 bits, rows x columns x 3 bytes.
    assert len(ds.PixelData) == ds.Rows * ds.Columns * 3


def test_the_lossy_compression_ratio_and_method_it_had_are_kept() -> None:
    ds = sample("SC_rgb_jpeg_dcmtk.dcm")
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [12.5]
    ds.LossyImageCompressionMethod = ["ISO_10918_1"]

    ds = decoded(ds)

    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionRatio == 12.5
    assert ds.LossyImageCompressionMethod == "ISO_10918_1"


def test_a_lossy_instance_without_a_method_gets_the_method_of_its_syntax() -> None:
    ds = sample("SC_rgb_jpeg_dcmtk.dcm")
    del ds.LossyImageCompressionMethod

    ds = decoded(ds)

    assert (ds.LossyImageCompression, ds.LossyImageCompressionMethod) == ("01", "ISO_10918_1")


def test_what_only_encapsulated_pixel_data_may_have_is_not_sent_uncompressed() -> None:
    ds = sample("SC_rgb_jpeg_gdcm.dcm")
    [frame] = generate_frames(ds.PixelData, number_of_frames=1)
    ds.ExtendedOffsetTable = (0).to_bytes(8, "little")
    ds.ExtendedOffsetTableLengths = len(frame).to_bytes(8, "little")
    icon = Dataset()
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored"):
        setattr(icon, keyword, getattr(ds, keyword))
    icon.HighBit, icon.PixelRepresentation = ds.HighBit, ds.PixelRepresentation
    icon.PhotometricInterpretation = ds.PhotometricInterpretation
    icon.add(copy.deepcopy(ds["PixelData"]))  # still encapsulated
    ds.IconImageSequence = [icon]
    assert icon["PixelData"].is_undefined_length

    ds = decoded(ds)

    assert "ExtendedOffsetTable" not in ds and "ExtendedOffsetTableLengths" not in ds
    assert "IconImageSequence" not in ds
    assert not ds["PixelData"].is_undefined_length


def test_an_image_too_large_to_decode_here_is_undecodable_before_any_decoding() -> None:
    ds = sample("SC_rgb_jpeg_gdcm.dcm")
    ds.NumberOfFrames = MAX_DECODED_BYTES // decoded_size(ds) + 1
    pixels = ds.PixelData

    with pytest.raises(UndecodablePixelData, match="too large to decompress here"):
        decompress(ds)

    assert ds.PixelData is pixels  # untouched


@pytest.mark.parametrize(
    "name",
    ["SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm", "examples_ybr_color.dcm"],
)
def test_a_corrupt_codestream_is_undecodable_and_the_error_names_no_value(name: str) -> None:
    ds = pydicom.dcmread(io.BytesIO(corrupted(name)))

    with pytest.raises(UndecodablePixelData) as caught:
        decompress(ds)

    assert re.fullmatch(r"pixel data not decodable \(\w+\)", str(caught.value))


def test_an_instance_without_pixel_data_only_changes_its_transfer_syntax() -> None:
    ds = pydicom.dcmread(io.BytesIO(make_dicom_bytes(transfer_syntax=JPEGBaseline8Bit)))
    del ds.PixelData
    before = copy.deepcopy(ds)

    decompress(ds)

    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds == before and "LossyImageCompression" not in ds


# --- a batch against a receiver that accepts its SOP classes only uncompressed -------------------


class NativeOnlyAssociation:
    """An established association whose receiver refused every context without a native
    syntax (with ``refusal``) and accepted the others, in Explicit VR LE unless ``chosen``
    names another for the SOP class; it answers Success to every C-STORE."""

    def __init__(
        self,
        contexts: list[Any],
        chosen: dict[str, str] | None = None,
        refusal: int = TRANSFER_SYNTAXES_NOT_SUPPORTED,
    ) -> None:
        self.is_established = True
        self.accepted_contexts: list[Any] = []
        self.rejected_contexts: list[Any] = []
        for context in contexts:
            sop_class = context.abstract_syntax
            if any(s in NATIVE for s in context.transfer_syntax):
                syntax = (chosen or {}).get(sop_class, ExplicitVRLittleEndian)
                self.accepted_contexts.append(
                    SimpleNamespace(abstract_syntax=sop_class, transfer_syntax=[syntax])
                )
            else:
                self.rejected_contexts.append(
                    SimpleNamespace(abstract_syntax=sop_class, result=refusal)
                )
        self.sent: list[Dataset] = []

    def send_c_store(self, dataset: Dataset, msg_id: int = 1, priority: int = 2) -> Dataset:
        self.sent.append(dataset)
        response = Dataset()
        response.Status = 0x0000
        return response

    def release(self) -> None:
        self.is_established = False

    def abort(self) -> None:
        self.is_established = False


def sender_against(
    monkeypatch: pytest.MonkeyPatch,
    *,
    chosen: dict[str, str] | None = None,
    refusal: int = TRANSFER_SYNTAXES_NOT_SUPPORTED,
    **kwargs: Any,
) -> tuple[DimseSender, list[NativeOnlyAssociation]]:
    """A DimseSender(**kwargs) whose associations are NativeOnlyAssociations."""
    sender = DimseSender(**kwargs)
    made: list[NativeOnlyAssociation] = []

    def associate(endpoint: DimseEndpoint, contexts: list[Any]) -> NativeOnlyAssociation:
        made.append(NativeOnlyAssociation(contexts, chosen, refusal))
        return made[-1]

    monkeypatch.setattr(sender, "_associate", associate)
    return sender, made


async def test_compressed_instances_go_decompressed_and_a_corrupt_one_fails_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lossless = outgoing(part10(sample("SC_rgb_jpeg_gdcm.dcm")))
    lossy = outgoing(part10(sample("SC_rgb_dcmtk_+eb+cy+np.dcm")))
    broken = outgoing(corrupted("SC_rgb_jpeg_gdcm.dcm"))
    native = outgoing(make_dicom_bytes())
    metrics = NotifyWorkerMetrics(registry=CollectorRegistry())
    sender, made = sender_against(monkeypatch, metrics=metrics)

    with structlog.testing.capture_logs() as logs:
        result = await sender.send(ENDPOINT, [lossless, broken, lossy, native])

    [assoc] = made
    assert [o.status for o in result.outcomes] == [
        InstanceStatus.STORED,
        InstanceStatus.FAILED,
        InstanceStatus.STORED,
        InstanceStatus.STORED,
    ]
    failed = result.outcome(broken.sop_instance_uid)
    # No DICOM status was exchanged (code None); the same bytes fail the same way (permanent).
    assert (failed.code, failed.transient) == (None, False)
    assert failed.reason == (
        "pixel data not decodable (RuntimeError); the receiver accepts it only uncompressed, "
        "not sent"
    )
    # The corrupt instance never went out, not even in part.
    assert [ds.SOPInstanceUID for ds in assoc.sent] == [
        lossless.sop_instance_uid,
        lossy.sop_instance_uid,
        native.sop_instance_uid,
    ]
    for ds, original in zip(assoc.sent[:2], [lossless, lossy], strict=True):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(
            ds.pixel_array, pydicom.dcmread(io.BytesIO(original.data)).pixel_array
        )
    assert "LossyImageCompression" not in assoc.sent[0]
    assert (assoc.sent[1].LossyImageCompression, assoc.sent[1].PhotometricInterpretation) == (
        "01",
        "RGB",
    )
    # One line for the batch, counts only.
    [line] = [entry for entry in logs if "decompressed" in entry["event"]]
    assert (line["log_level"], line["sent"], line["failed"], line["batch"]) == ("warning", 2, 1, 4)
    assert line["transfer_syntaxes"] == ["JPEGBaseline8Bit", "JPEGLosslessSV1"]
    assert lossless.sop_instance_uid not in str(line)
    registry = metrics.registry
    counted = {
        outcome: registry.get_sample_value(
            "beeldportaal_notify_instances_decompressed_total", {"outcome": outcome}
        )
        for outcome in ("sent", "failed")
    }
    assert counted == {"sent": 2, "failed": 1}


async def test_a_receiver_accepting_only_implicit_vr_gets_the_decompressed_instance_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rle = outgoing(part10(sample("MR_small_RLE.dcm")))
    sender, made = sender_against(monkeypatch, chosen={MRImageStorage: ImplicitVRLittleEndian})

    result = await sender.send(ENDPOINT, [rle])

    assert result.all_stored
    # Decoded into Explicit VR LE; pynetdicom encodes it as Implicit for the accepted context.
    assert made[0].sent[0].file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(made[0].sent[0].pixel_array, sample("MR_small.dcm").pixel_array)


async def test_a_syntax_that_cannot_be_decoded_here_is_refused_as_today(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jpeg = outgoing(part10(sample("SC_rgb_jpeg_gdcm.dcm")))
    sender, made = sender_against(monkeypatch, decodable=frozenset())

    result = await sender.send(ENDPOINT, [jpeg])

    [refused] = result.outcomes
    assert (refused.status, refused.code, refused.reason) == (
        InstanceStatus.FAILED,
        "C122",
        "stored transfer syntax not accepted by the receiver",
    )
    assert made[0].sent == []


@pytest.mark.parametrize(
    "refusal", [ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED]
)
async def test_a_refused_syntax_of_a_sop_class_taken_natively_is_c122_whatever_the_answer(
    refusal: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    jpeg = outgoing(part10(sample("SC_rgb_jpeg_gdcm.dcm")))
    native = outgoing(make_dicom_bytes(sop_class_uid=SecondaryCaptureImageStorage))
    sender, _ = sender_against(monkeypatch, refusal=refusal, decodable=frozenset())

    result = await sender.send(ENDPOINT, [jpeg, native])

    assert [(o.status, o.code) for o in result.outcomes] == [
        (InstanceStatus.FAILED, "C122"),
        (InstanceStatus.STORED, None),
    ]


async def test_the_stored_syntax_goes_as_stored_when_the_receiver_accepts_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jpeg = outgoing(part10(sample("SC_rgb_jpeg_gdcm.dcm")))
    sender = DimseSender()
    sent: list[Dataset] = []

    class AcceptsAll(NativeOnlyAssociation):
        def __init__(self, contexts: list[Any]) -> None:
            super().__init__(contexts)
            self.accepted_contexts = [
                SimpleNamespace(abstract_syntax=c.abstract_syntax, transfer_syntax=[s])
                for c in contexts
                for s in c.transfer_syntax[:1]
            ]
            self.sent = sent

    monkeypatch.setattr(sender, "_associate", lambda endpoint, contexts: AcceptsAll(contexts))

    result = await sender.send(ENDPOINT, [jpeg])

    assert result.all_stored
    [ds] = sent
    assert ds.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    assert ds.PixelData == pydicom.dcmread(io.BytesIO(jpeg.data)).PixelData  # the fragments


# --- an image too large to decode with an association open --------------------------------------


class Unestablished:
    """A new association that did not come about: rejected permanently (an unknown called AE
    title), or no answer at all."""

    def __init__(self, *, rejected: bool) -> None:
        self.is_established = False
        self.is_rejected = rejected
        self.acceptor = SimpleNamespace(
            primitive=SimpleNamespace(result=1, result_source=1, diagnostic=7) if rejected else None
        )
        self.accepted_contexts: list[Any] = []
        self.rejected_contexts: list[Any] = []

    def release(self) -> None: ...

    def abort(self) -> None: ...


def large_batch() -> list[OutgoingInstance]:
    """Two images decoded for the receiver (large, with the limit at 0), a native one."""
    return [
        outgoing(part10(sample("SC_rgb_jpeg_gdcm.dcm"))),
        outgoing(make_dicom_bytes()),
        outgoing(part10(sample("MR_small_RLE.dcm"))),
    ]


async def test_a_large_image_is_decoded_with_no_association_open_and_sent_over_a_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batch = large_batch()
    sender, made = sender_against(monkeypatch)
    monkeypatch.setattr(dimse_adapter, "DECODE_WITH_ASSOCIATION_OPEN", 0)
    decode = dimse_adapter.decompress
    open_while_decoding: list[list[bool]] = []

    def watched(dataset: Dataset) -> None:
        open_while_decoding.append([a.is_established for a in made])
        decode(dataset)

    monkeypatch.setattr(dimse_adapter, "decompress", watched)

    result = await sender.send(ENDPOINT, batch)

    # In the batch's order, though the native one went first.
    assert [o.sop_instance_uid for o in result.outcomes] == [i.sop_instance_uid for i in batch]
    assert result.all_stored
    assert [[ds.SOPInstanceUID for ds in a.sent] for a in made] == [
        [batch[1].sop_instance_uid],
        [batch[0].sop_instance_uid],
        [batch[2].sop_instance_uid],
    ]
    assert open_while_decoding == [[False], [False, False]]
    assert not any(a.is_established for a in made)
    for ds, original in ((made[1].sent[0], batch[0]), (made[2].sent[0], batch[2])):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(
            ds.pixel_array, pydicom.dcmread(io.BytesIO(original.data)).pixel_array
        )


async def test_an_image_under_the_limit_is_decoded_on_the_open_association(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batch = large_batch()
    sender, made = sender_against(monkeypatch)  # the sample images are far under 32 MiB

    result = await sender.send(ENDPOINT, batch)

    assert result.all_stored and len(made) == 1 and len(made[0].sent) == 3


@pytest.mark.parametrize("rejected", [True, False], ids=["rejected-permanently", "no-answer"])
async def test_a_new_association_that_does_not_come_about_keeps_what_was_answered(
    monkeypatch: pytest.MonkeyPatch, rejected: bool
) -> None:
    batch = large_batch()
    sender = DimseSender()
    first: list[NativeOnlyAssociation] = []

    def associate(endpoint: DimseEndpoint, contexts: list[Any]) -> Any:
        if first:
            return Unestablished(rejected=rejected)
        first.append(NativeOnlyAssociation(contexts))
        return first[0]

    monkeypatch.setattr(sender, "_associate", associate)
    monkeypatch.setattr(dimse_adapter, "DECODE_WITH_ASSOCIATION_OPEN", 0)

    if rejected:
        with pytest.raises(PermanentDeliveryError, match="called AE title not recognised"):
            await sender.send(ENDPOINT, batch)
    else:
        with pytest.raises(TransientDeliveryError) as caught:
            await sender.send(ENDPOINT, batch)
        # The native instance was answered and stays settled; the large ones are retried.
        assert [o.sop_instance_uid for o in caught.value.answered.outcomes] == [
            batch[1].sop_instance_uid
        ]


async def test_a_batch_cancelled_during_a_large_decode_opens_no_new_association(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batch = large_batch()
    sender, made = sender_against(monkeypatch)
    monkeypatch.setattr(dimse_adapter, "DECODE_WITH_ASSOCIATION_OPEN", 0)
    decode = dimse_adapter.decompress
    started = threading.Event()
    go_on = threading.Event()

    def slow(dataset: Dataset) -> None:
        started.set()
        go_on.wait(10)
        decode(dataset)

    monkeypatch.setattr(dimse_adapter, "decompress", slow)
    sending = asyncio.ensure_future(sender.send(ENDPOINT, batch))
    await asyncio.to_thread(started.wait, 10)
    sending.cancel()
    await asyncio.sleep(0.05)  # the cancel reaches the worker thread's flag
    go_on.set()

    with pytest.raises(asyncio.CancelledError):
        await sending
    await asyncio.sleep(0.2)  # the worker thread finishes its decode, then stops
    assert len(made) == 1 and [ds.SOPInstanceUID for ds in made[0].sent] == [
        batch[1].sop_instance_uid
    ]


async def test_no_memory_to_read_an_instance_is_a_transient_failure_of_it_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_memory(*_args: Any, **_kwargs: Any) -> Dataset:
        raise MemoryError

    sender, made = sender_against(monkeypatch)
    monkeypatch.setattr(dimse_adapter, "pydicom", SimpleNamespace(dcmread=no_memory))
    rle = outgoing(part10(sample("MR_small_RLE.dcm")))

    result = await sender.send(ENDPOINT, [rle])

    outcome = result.outcome(rle.sop_instance_uid)
    assert (outcome.status, outcome.transient) == (InstanceStatus.FAILED, True)
    assert made[0].sent == []

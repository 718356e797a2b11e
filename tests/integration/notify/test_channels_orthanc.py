"""The delivery channels against a real receiving PACS (Orthanc): STOW-RS and C-STORE.

What arrives is checked through Orthanc's own REST API: every instance, its Pixel Data bytes,
the coerced header. Refusals are Orthanc's own: an instance of another study in a STOW-RS to
``/studies/{uid}`` (Orthanc answers 409 with FailureReason 0110, a transient failure, for it
and stores the rest), a SOP class Orthanc does not accept over DIMSE (it rejects that
presentation context), an unknown called AE title (association rejected permanently), a
stopped receiver, and a STOW-RS endpoint guarded by an Orthanc HTTP filter that wants a bearer
token. A second Orthanc accepts every SOP class only uncompressed (AcceptedTransferSyntaxes), as
many PACS do: compressed instances reach it decompressed over C-STORE. A third does too, and
closes an association idle for a second: a long decode must not happen with one open. Over
STOW-RS, a receiver refusing compressed parts with C122 (written by the test, in front of
Orthanc) gets them again decoded.
"""

from __future__ import annotations

import copy
import io
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    UID,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from deploy.local.orthanc import OrthancPeer
from services.notify.adapters import dimse as dimse_adapter
from services.notify.adapters.dimse import DimseSender, DimseTimeouts
from services.notify.adapters.stow import StowSender, StowTimeouts
from services.notify.domain.coercion import coerce
from services.notify.domain.outcomes import (
    InstanceStatus,
    OutgoingInstance,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from services.routing.domain.directory import BearerAuth, DicomWebEndpoint, DimseEndpoint
from shared.events.routing import Coercion
from shared.identifiers import BSN_DICOM_ISSUER, BSN_OID, is_valid_bsn
from tests.dicom_samples import bsn_item, make_dicom_bytes, patient_id_item
from tests.factories import TEST_BSN

pytestmark = pytest.mark.integration

RECEIVER_AET = "RECEIVER"
NATIVE_AET = "NATIVEONLY"
NATIVE_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
GOOD_TOKEN = "receiver-token-8c1f2e"
# Orthanc runs this on every HTTP request; false means 403 Forbidden. Header names are lower case.
TOKEN_FILTER = f"""
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if string.sub(uri, 1, 10) ~= '/dicom-web' then
    return true
  end
  return httpHeaders['authorization'] == 'Bearer {GOOD_TOKEN}'
end
"""
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.8.498.1.4242"  # a SOP class Orthanc does not know
PIXEL_DATA = 0x7FE00010
BSN_AS_PATIENT_ID = Coercion(
    profile="bsn-as-patient-id", issuer_of_patient_id=BSN_DICOM_ISSUER, universal_entity_id=BSN_OID
)
FAST_STOW = StowTimeouts(connect=5, write=30, read=60, pool=5)
FAST_DIMSE = DimseTimeouts(connection=5, acse=15, dimse=60, network=60)


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    """The receiving hospital's PACS; it checks that it is the called AE title."""
    with OrthancPeer.running(
        tmp_path_factory.mktemp("notify") / "receiver",
        aet=RECEIVER_AET,
        stable_age=2,
        extra={"DicomCheckCalledAet": True},
    ) as peer:
        yield peer


@pytest.fixture(scope="module")
def native_receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    """A PACS that accepts every SOP class only in Implicit or Explicit VR Little Endian."""
    with OrthancPeer.running(
        tmp_path_factory.mktemp("notify-native") / "receiver",
        aet=NATIVE_AET,
        stable_age=2,
        extra={"DicomCheckCalledAet": True, "AcceptedTransferSyntaxes": list(NATIVE_SYNTAXES)},
    ) as peer:
        yield peer


@pytest.fixture(scope="module")
def impatient_receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    """Uncompressed only, like ``native_receiver``, and it closes an association on which no
    command came for a second (DicomScpTimeout; 30 s by default)."""
    with OrthancPeer.running(
        tmp_path_factory.mktemp("notify-impatient") / "receiver",
        aet=NATIVE_AET,
        stable_age=2,
        extra={"AcceptedTransferSyntaxes": list(NATIVE_SYNTAXES), "DicomScpTimeout": 1},
    ) as peer:
        yield peer


@pytest.fixture(scope="module")
def guarded_receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    """A PACS whose DICOMweb wants ``Authorization: Bearer GOOD_TOKEN``."""
    root = tmp_path_factory.mktemp("notify-guarded")
    script = root / "token-filter.lua"
    script.write_text(TOKEN_FILTER)
    with OrthancPeer.running(
        root / "receiver", aet="GUARDED", stable_age=2, extra={"LuaScripts": [str(script)]}
    ) as peer:
        yield peer


@pytest.fixture
async def stow() -> AsyncIterator[StowSender]:
    async with StowSender(timeouts=FAST_STOW) as sender:
        yield sender


def dicomweb(peer: OrthancPeer, **fields: object) -> DicomWebEndpoint:
    return DicomWebEndpoint(id="pacs-dicomweb", base_url=peer.dicomweb_url, **fields)


def dimse(peer: OrthancPeer, ae_title: str = RECEIVER_AET) -> DimseEndpoint:
    return DimseEndpoint(id="pacs-dimse", host="127.0.0.1", port=peer.dicom_port, ae_title=ae_title)


def outgoing(data: bytes) -> OutgoingInstance:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return OutgoingInstance(ds.SOPInstanceUID, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID, data)


def sample(name: str, study_uid: str) -> bytes:
    """A pydicom sample file with real compressed pixel data, re-identified into our study."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.update(patient_id_item("H1234567", "ZNOORD"))
    ds.OtherPatientIDsSequence = [bsn_item(TEST_BSN)]
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def corrupted(name: str, study_uid: str) -> bytes:
    """:func:`sample` with its last frame's codestream cut to a third: not decodable."""
    ds = read(sample(name, study_uid))
    frames = list(generate_frames(ds.PixelData, number_of_frames=ds.get("NumberOfFrames") or 1))
    frames[-1] = frames[-1][: len(frames[-1]) // 3]
    ds.PixelData = encapsulate(frames)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def study_batch(study_uid: str) -> list[OutgoingInstance]:
    """Native (both VR encodings), fake-fragment JPEG, real JPEG baseline, real RLE, a PDF."""
    hospital = {
        "StudyInstanceUID": study_uid,
        "patient": patient_id_item("H1234567", "ZNOORD"),
        "other_patient_ids": [bsn_item(TEST_BSN)],
    }
    return [
        outgoing(make_dicom_bytes(transfer_syntax=ExplicitVRLittleEndian, **hospital)),
        outgoing(make_dicom_bytes(transfer_syntax=ImplicitVRLittleEndian, **hospital)),
        outgoing(make_dicom_bytes(transfer_syntax=RLELossless, **hospital)),
        outgoing(sample("SC_rgb_jpeg_dcmtk.dcm", study_uid)),
        outgoing(sample("MR_small_RLE.dcm", study_uid)),
        outgoing(make_dicom_bytes(sop_class_uid=EncapsulatedPDFStorage, **hospital)),
    ]


def received(peer: OrthancPeer, sop_instance_uid: str) -> bytes | None:
    """The file Orthanc holds for an instance, or None when it has none."""
    found = [r for r in peer.lookup(sop_instance_uid) if r["Type"] == "Instance"]
    if not found:
        return None
    [resource] = found
    return peer.instance_file(resource["ID"])


def read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def raw_pixel_data(data: bytes) -> bytes | None:
    elem = read(data).get_item(PIXEL_DATA)
    return None if elem is None else bytes(elem.value)


def assert_arrived_intact(peer: OrthancPeer, batch: list[OutgoingInstance]) -> None:
    for instance in batch:
        stored = received(peer, instance.sop_instance_uid)
        assert stored is not None, instance
        ours, theirs = read(instance.data), read(stored)
        # Values as sent, Pixel Data in its stored (compressed) transfer syntax, byte for byte.
        assert theirs == ours
        assert theirs.file_meta.TransferSyntaxUID == instance.transfer_syntax_uid or (
            instance.transfer_syntax_uid == ImplicitVRLittleEndian  # re-encoded, values kept
        )
        assert raw_pixel_data(stored) == raw_pixel_data(instance.data)


# --- delivery ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
async def test_a_batch_stowed_to_orthanc_arrives_whole_and_byte_identical(
    receiver: OrthancPeer, chunked: bool
) -> None:
    study_uid = generate_uid()
    batch = study_batch(study_uid)

    async with StowSender(timeouts=FAST_STOW, chunked=chunked) as sender:
        result = await sender.send(dicomweb(receiver), study_uid, batch)

    assert [o.status for o in result.outcomes] == [InstanceStatus.STORED] * len(batch)
    assert [o.sop_instance_uid for o in result.outcomes] == [i.sop_instance_uid for i in batch]
    assert_arrived_intact(receiver, batch)
    # Over STOW-RS Orthanc keeps the very file it was given.
    assert all(received(receiver, i.sop_instance_uid) == i.data for i in batch)


async def test_a_batch_c_stored_to_orthanc_arrives_whole_with_pixel_data_as_stored(
    receiver: OrthancPeer,
) -> None:
    study_uid = generate_uid()
    batch = study_batch(study_uid)

    result = await DimseSender(timeouts=FAST_DIMSE).send(dimse(receiver), batch)

    assert [o.status for o in result.outcomes] == [InstanceStatus.STORED] * len(batch)
    assert_arrived_intact(receiver, batch)
    compressed = {JPEGBaseline8Bit, RLELossless}
    assert {
        read(received(receiver, i.sop_instance_uid) or b"").file_meta.TransferSyntaxUID
        for i in batch
        if i.transfer_syntax_uid in compressed
    } == compressed  # sent as stored, never decompressed


@pytest.mark.parametrize("channel", ["stow-rs", "c-store"])
async def test_a_coerced_instance_arrives_under_the_bsn_with_its_original_patient_id_kept(
    receiver: OrthancPeer, stow: StowSender, channel: str
) -> None:
    assert is_valid_bsn(TEST_BSN)
    study_uid = generate_uid()
    stored = [sample("SC_rgb_jpeg_dcmtk.dcm", study_uid), sample("MR_small_RLE.dcm", study_uid)]
    batch = [
        outgoing(coerce(data, BSN_AS_PATIENT_ID, source_of_previous_values="Ziekenhuis Noord"))
        for data in stored
    ]

    if channel == "stow-rs":
        result = await stow.send(dicomweb(receiver), study_uid, batch)
    else:
        result = await DimseSender(timeouts=FAST_DIMSE).send(dimse(receiver), batch)

    assert result.all_stored
    for original, instance in zip(stored, batch, strict=True):
        arrived = received(receiver, instance.sop_instance_uid)
        assert arrived is not None
        ds = read(arrived)
        assert ds.SOPInstanceUID == read(original).SOPInstanceUID
        assert (ds.PatientID, ds.IssuerOfPatientID) == (TEST_BSN, BSN_DICOM_ISSUER)
        assert ds.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == BSN_OID
        [record] = ds.OriginalAttributesSequence
        assert record.ReasonForTheAttributeModification == "COERCE"
        assert record.ModifyingSystem == "BEELDPORTAAL"
        assert record.SourceOfPreviousValues == "Ziekenhuis Noord"
        [modified] = record.ModifiedAttributesSequence
        assert (modified.PatientID, modified.IssuerOfPatientID) == ("H1234567", "ZNOORD")
        assert raw_pixel_data(arrived) == raw_pixel_data(original)
    [found] = [r for r in receiver.lookup(study_uid) if r["Type"] == "Study"]
    study = receiver.rest("GET", f"/studies/{found['ID']}")
    assert study["PatientMainDicomTags"]["PatientID"] == TEST_BSN


async def test_a_receiver_accepting_the_stored_syntax_gets_it_as_stored_fallback_or_not(
    receiver: OrthancPeer,
) -> None:
    # JPEG Lossless SV1 can be decoded here, so an uncompressed fallback is offered beside it;
    # Orthanc accepts both, and the stored syntax wins.
    study_uid = generate_uid()
    batch = [
        outgoing(sample("SC_rgb_jpeg_gdcm.dcm", study_uid)),
        outgoing(sample("SC_rgb_jpeg_dcmtk.dcm", study_uid)),
    ]

    result = await DimseSender(timeouts=FAST_DIMSE).send(dimse(receiver), batch)

    assert result.all_stored
    assert_arrived_intact(receiver, batch)
    assert [
        read(received(receiver, i.sop_instance_uid) or b"").file_meta.TransferSyntaxUID
        for i in batch
    ] == [JPEGLosslessSV1, JPEGBaseline8Bit]


# --- a receiver that accepts its SOP classes only uncompressed -----------------------------------

# What decompressing may change in a data set; every other element arrives as sent.
DECODED_ELEMENTS = (
    "PixelData",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "LossyImageCompression",
)


def without_pixel_encoding(ds: Dataset) -> Dataset:
    ds = copy.deepcopy(ds)
    for keyword in DECODED_ELEMENTS:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


async def test_a_receiver_refusing_compressed_syntaxes_refuses_them_without_the_fallback(
    native_receiver: OrthancPeer,
) -> None:
    # The configuration the next tests rely on: without a decoder, the JPEG is refused (C122:
    # Orthanc takes its SOP class, in the native instance's context) and the native one stored.
    study_uid = generate_uid()
    batch = [
        outgoing(sample("SC_rgb_jpeg_gdcm.dcm", study_uid)),
        outgoing(
            make_dicom_bytes(StudyInstanceUID=study_uid, sop_class_uid=SecondaryCaptureImageStorage)
        ),
    ]

    result = await DimseSender(timeouts=FAST_DIMSE, decodable=()).send(
        dimse(native_receiver, NATIVE_AET), batch
    )

    assert [(o.status, o.code) for o in result.outcomes] == [
        (InstanceStatus.FAILED, "C122"),
        (InstanceStatus.STORED, None),
    ]
    assert received(native_receiver, batch[0].sop_instance_uid) is None


async def test_compressed_instances_reach_a_receiver_accepting_only_uncompressed_decoded(
    native_receiver: OrthancPeer,
) -> None:
    study_uid = generate_uid()
    lossless = outgoing(sample("SC_rgb_jpeg_gdcm.dcm", study_uid))  # JPEG Lossless SV1, RGB
    lossy = outgoing(sample("SC_rgb_dcmtk_+eb+cy+np.dcm", study_uid))  # JPEG baseline, YBR 422
    native = outgoing(
        make_dicom_bytes(
            StudyInstanceUID=study_uid,
            patient=patient_id_item("H1234567", "ZNOORD"),
            other_patient_ids=[bsn_item(TEST_BSN)],
        )
    )

    result = await DimseSender(timeouts=FAST_DIMSE).send(
        dimse(native_receiver, NATIVE_AET), [lossless, lossy, native]
    )

    assert [o.status for o in result.outcomes] == [InstanceStatus.STORED] * 3
    assert_arrived_intact(native_receiver, [native])
    arrived = {}
    for instance in (lossless, lossy):
        stored = received(native_receiver, instance.sop_instance_uid)  # the same SOP Instance UID
        assert stored is not None, instance
        ours, theirs = read(instance.data), read(stored)
        arrived[instance.sop_instance_uid] = theirs
        assert theirs.file_meta.TransferSyntaxUID in NATIVE_SYNTAXES
        assert not theirs["PixelData"].is_undefined_length
        assert theirs.SOPInstanceUID == instance.sop_instance_uid
        # The image as pydicom decodes the stored codestream; every other element as sent.
        assert np.array_equal(theirs.pixel_array, ours.pixel_array)
        assert without_pixel_encoding(theirs) == without_pixel_encoding(ours)
    from_lossless, from_lossy = arrived[lossless.sop_instance_uid], arrived[lossy.sop_instance_uid]
    # Lossless is lossless: the RLE copy of the same image decodes to the very same pixels.
    rle = read(sample("SC_rgb_rle.dcm", study_uid))
    assert np.array_equal(from_lossless.pixel_array, rle.pixel_array)
    assert "LossyImageCompression" not in from_lossless
    assert from_lossy.LossyImageCompression == "01"
    assert (from_lossy.PhotometricInterpretation, from_lossy.PlanarConfiguration) == ("RGB", 0)
    assert read(lossy.data).PhotometricInterpretation == "YBR_FULL_422"


def relabelled(data: bytes, syntax: UID) -> bytes:
    """A file whose codestream is stored in ``syntax`` instead: a lossless JPEG-LS codestream
    (NEAR 0) is valid in the syntax that also allows near-lossless ones."""
    ds = read(data)
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


async def test_a_near_lossless_image_arrives_decoded_marked_lossy_only_if_it_was(
    native_receiver: OrthancPeer,
) -> None:
    # JPEG-LS Lossy (Near-Lossless) may be lossless: NEAR 0 is, NEAR 2 is not.
    study_uid = generate_uid()
    exact = outgoing(
        relabelled(sample("MR_small_jpeg_ls_lossless.dcm", study_uid), JPEGLSNearLossless)
    )
    near = outgoing(sample("JPEGLSNearLossless_16.dcm", study_uid))
    assert exact.transfer_syntax_uid == near.transfer_syntax_uid == JPEGLSNearLossless

    result = await DimseSender(timeouts=FAST_DIMSE).send(
        dimse(native_receiver, NATIVE_AET), [exact, near]
    )

    assert [o.status for o in result.outcomes] == [InstanceStatus.STORED] * 2
    from_exact, from_near = (
        read(received(native_receiver, i.sop_instance_uid) or b"") for i in (exact, near)
    )
    assert from_exact.file_meta.TransferSyntaxUID in NATIVE_SYNTAXES
    assert "LossyImageCompression" not in from_exact
    assert np.array_equal(
        from_exact.pixel_array, pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    )
    assert from_near.file_meta.TransferSyntaxUID in NATIVE_SYNTAXES
    assert (from_near.LossyImageCompression, from_near.LossyImageCompressionMethod) == (
        "01",
        "ISO_14495_1",
    )


def refusing_compressed(requests: list[list[str]]) -> Any:
    """A DICOMweb receiver that takes instances only uncompressed, as some do: it answers
    FailureReason C122 for each compressed part itself and hands the others, as a STOW-RS
    request of their own, to the Orthanc the URL names (which stores everything), whose answer
    it merges. ``requests``: the SOP Instance UIDs of each request."""

    async def handle(request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        boundary = request.headers["Content-Type"].split("boundary=")[1]
        files = [
            chunk.split(b"\r\n\r\n", 1)[1][: -len(b"\r\n")]
            for chunk in body.split(f"--{boundary}".encode())[1:-1]
        ]
        datasets = [read(data) for data in files]
        requests.append([ds.SOPInstanceUID for ds in datasets])
        refused = [ds for ds in datasets if ds.file_meta.TransferSyntaxUID.is_compressed]
        taken = [f for f, ds in zip(files, datasets, strict=True) if ds not in refused]
        answer: dict[str, Any] = {"00081198": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": [ds.SOPInstanceUID]},
             "00081197": {"vr": "US", "Value": [0xC122]}}
            for ds in refused
        ]}}  # fmt: skip
        if taken:
            forwarded = b"".join(
                b"--x\r\nContent-Type: application/dicom\r\n\r\n" + f + b"\r\n" for f in taken
            )
            async with httpx.AsyncClient(timeout=60) as client:
                stored = await client.post(
                    str(request.url),  # the peer's own STOW-RS URL
                    content=forwarded + b"--x--\r\n",
                    headers={
                        "Content-Type": 'multipart/related; type="application/dicom"; boundary=x',
                        "Accept": "application/dicom+json",
                    },
                )
            answer = {**stored.json(), "00081198": answer["00081198"]}
        status = 409 if refused else 200
        return httpx.Response(
            status, json=answer, headers={"Content-Type": "application/dicom+json"}
        )

    return handle


async def test_stow_rs_resends_decoded_what_a_receiver_refuses_for_its_transfer_syntax(
    receiver: OrthancPeer,
) -> None:
    study_uid = generate_uid()
    lossless = outgoing(sample("SC_rgb_jpeg_gdcm.dcm", study_uid))
    native = outgoing(make_dicom_bytes(StudyInstanceUID=study_uid))
    rle = outgoing(sample("MR_small_RLE.dcm", study_uid))
    requests: list[list[str]] = []
    transport = httpx.MockTransport(refusing_compressed(requests))

    async with StowSender(timeouts=FAST_STOW, transport=transport) as sender:
        result = await sender.send(dicomweb(receiver), study_uid, [lossless, native, rle])

    assert [o.status for o in result.outcomes] == [InstanceStatus.STORED] * 3
    assert requests == [
        [lossless.sop_instance_uid, native.sop_instance_uid, rle.sop_instance_uid],
        [lossless.sop_instance_uid],
        [rle.sop_instance_uid],
    ]
    assert received(receiver, native.sop_instance_uid) == native.data
    for instance in (lossless, rle):
        stored = received(receiver, instance.sop_instance_uid)
        assert stored is not None, instance
        theirs = read(stored)
        assert theirs.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(theirs.pixel_array, read(instance.data).pixel_array)
        assert without_pixel_encoding(theirs) == without_pixel_encoding(read(instance.data))


async def test_an_undecodable_instance_fails_alone_and_nothing_of_it_arrives(
    native_receiver: OrthancPeer,
) -> None:
    study_uid = generate_uid()
    broken = outgoing(corrupted("SC_rgb_jpeg_gdcm.dcm", study_uid))
    rle = outgoing(sample("MR_small_RLE.dcm", study_uid))

    result = await DimseSender(timeouts=FAST_DIMSE).send(
        dimse(native_receiver, NATIVE_AET), [broken, rle]
    )

    failed = result.outcome(broken.sop_instance_uid)
    assert (failed.status, failed.code, failed.transient) == (InstanceStatus.FAILED, None, False)
    assert "not decodable" in (failed.reason or "")
    assert received(native_receiver, broken.sop_instance_uid) is None
    assert result.outcome(rle.sop_instance_uid).status is InstanceStatus.STORED
    theirs = read(received(native_receiver, rle.sop_instance_uid) or b"")
    assert theirs.file_meta.TransferSyntaxUID in NATIVE_SYNTAXES
    assert np.array_equal(theirs.pixel_array, read(rle.data).pixel_array)


async def test_a_slow_decode_happens_with_no_association_open_so_an_impatient_pacs_gets_all(
    impatient_receiver: OrthancPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_uid = generate_uid()
    batch = [
        outgoing(sample("SC_rgb_jpeg_gdcm.dcm", study_uid)),  # JPEG Lossless: decoded
        outgoing(make_dicom_bytes(StudyInstanceUID=study_uid)),  # native: as stored
        outgoing(sample("MR_small_RLE.dcm", study_uid)),  # RLE: decoded
    ]
    decode = dimse_adapter.decompress

    def slow(dataset: Dataset) -> None:  # a large image, as far as the receiver can tell
        time.sleep(2.5)
        decode(dataset)

    monkeypatch.setattr(dimse_adapter, "decompress", slow)
    sender = DimseSender(timeouts=FAST_DIMSE)
    endpoint = dimse(impatient_receiver, NATIVE_AET)

    # Decoded with the association open (as for an image under the limit), the receiver hangs
    # up during the decode: the set-up does show the problem.
    monkeypatch.setattr(dimse_adapter, "DECODE_WITH_ASSOCIATION_OPEN", 2**40)
    with pytest.raises(TransientDeliveryError, match="aborted"):
        await sender.send(endpoint, batch[:1])
    assert received(impatient_receiver, batch[0].sop_instance_uid) is None

    # Over the limit, each is decoded between associations: everything arrives, in order.
    monkeypatch.setattr(dimse_adapter, "DECODE_WITH_ASSOCIATION_OPEN", 0)
    result = await sender.send(endpoint, batch)

    assert [o.sop_instance_uid for o in result.outcomes] == [i.sop_instance_uid for i in batch]
    assert [o.status for o in result.outcomes] == [InstanceStatus.STORED] * 3
    for instance in batch:
        stored = received(impatient_receiver, instance.sop_instance_uid)
        assert stored is not None, instance
        theirs = read(stored)
        assert theirs.file_meta.TransferSyntaxUID in NATIVE_SYNTAXES
        assert np.array_equal(theirs.pixel_array, read(instance.data).pixel_array)


# --- refusals -----------------------------------------------------------------------------------


async def test_stow_an_instance_orthanc_refuses_fails_alone_while_the_rest_is_stored(
    receiver: OrthancPeer, stow: StowSender
) -> None:
    study_uid = generate_uid()
    batch = study_batch(study_uid)[:3]
    stray = outgoing(make_dicom_bytes())  # another study: Orthanc refuses it in this request

    result = await stow.send(dicomweb(receiver), study_uid, [*batch, stray])

    refused = result.outcome(stray.sop_instance_uid)
    # 0110 (processing failure) is transient: dcm4chee and Azure answer it for their own
    # errors. Orthanc's use of it for another study's instance is retried too (and in the end
    # dead-letters the delivery); beeldportaal never sends one study's instance in another's.
    assert (refused.status, refused.code, refused.transient) == (
        InstanceStatus.FAILED,
        "0110",
        True,
    )
    assert [o.sop_instance_uid for o in result.stored] == [i.sop_instance_uid for i in batch]
    assert received(receiver, stray.sop_instance_uid) is None
    assert_arrived_intact(receiver, batch)


async def test_c_store_an_instance_of_a_sop_class_orthanc_rejects_fails_alone(
    receiver: OrthancPeer,
) -> None:
    study_uid = generate_uid()
    batch = study_batch(study_uid)[:3]
    private = outgoing(
        make_dicom_bytes(StudyInstanceUID=study_uid, sop_class_uid=PRIVATE_SOP_CLASS)
    )

    result = await DimseSender(timeouts=FAST_DIMSE).send(dimse(receiver), [*batch, private])

    refused = result.outcome(private.sop_instance_uid)
    assert (refused.status, refused.code, refused.transient) == (
        InstanceStatus.FAILED,
        "0122",
        False,
    )
    assert len(result.stored) == len(batch)
    assert received(receiver, private.sop_instance_uid) is None
    assert_arrived_intact(receiver, batch)


async def test_a_batch_orthanc_accepts_nothing_of_fails_per_instance_not_as_a_whole(
    receiver: OrthancPeer,
) -> None:
    only_private = [outgoing(make_dicom_bytes(sop_class_uid=PRIVATE_SOP_CLASS)) for _ in range(2)]

    result = await DimseSender(timeouts=FAST_DIMSE).send(dimse(receiver), only_private)

    assert [(o.status, o.code) for o in result.outcomes] == [(InstanceStatus.FAILED, "0122")] * 2


async def test_an_unknown_called_ae_title_is_refused_permanently(receiver: OrthancPeer) -> None:
    batch = study_batch(generate_uid())[:1]

    with pytest.raises(PermanentDeliveryError, match="called AE title not recognised"):
        await DimseSender(timeouts=FAST_DIMSE).send(dimse(receiver, "NOT_THE_PACS"), batch)

    assert received(receiver, batch[0].sop_instance_uid) is None


# pynetdicom 3.0 drops the socket of a refused connection unclosed (its _shutdown_socket calls
# shutdown() first, which raises on a socket that never connected, and so skips close());
# CPython closes it when it is collected, with a ResourceWarning.
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
async def test_a_stopped_receiver_is_a_transient_error_on_both_channels(tmp_path: Path) -> None:
    peer = OrthancPeer.running(tmp_path / "stopped", aet=RECEIVER_AET, stable_age=2)
    with peer as stopped:
        reachable = dimse(stopped)
        web = dicomweb(stopped)
    assert stopped.pid is None
    study_uid = generate_uid()
    batch = study_batch(study_uid)[:2]

    with pytest.raises(TransientDeliveryError, match="no association"):
        await DimseSender(timeouts=FAST_DIMSE).send(reachable, batch)
    async with StowSender(timeouts=FAST_STOW) as sender:
        with pytest.raises(TransientDeliveryError, match="unreachable"):
            await sender.send(web, study_uid, batch)


async def test_stow_with_a_bad_bearer_token_is_refused_permanently_and_a_good_one_stores(
    guarded_receiver: OrthancPeer, stow: StowSender
) -> None:
    study_uid = generate_uid()
    batch = study_batch(study_uid)[:2]

    with pytest.raises(PermanentDeliveryError, match="HTTP 403") as refused:
        await stow.send(
            dicomweb(guarded_receiver, auth=BearerAuth(token="stolen")), study_uid, batch
        )
    nothing = [received(guarded_receiver, i.sop_instance_uid) for i in batch]
    result = await stow.send(
        dicomweb(guarded_receiver, auth=BearerAuth(token=GOOD_TOKEN)), study_uid, batch
    )

    assert "stolen" not in refused.value.reason
    assert nothing == [None, None]
    assert result.all_stored
    assert_arrived_intact(guarded_receiver, batch)

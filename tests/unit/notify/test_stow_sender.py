"""The STOW-RS client's request and how it reads answers, over an in-process httpx transport.

Real receivers are in tests/integration/notify/test_channels_orthanc.py; here every answer a
receiver may give is produced on purpose, including those Orthanc never gives.
"""

import base64
import io
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from prometheus_client import CollectorRegistry
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian

from services.notify.adapters import stow as stow_adapter
from services.notify.adapters.stow import StowSender, parse_store_response
from services.notify.domain.outcomes import (
    InstanceOutcome,
    InstanceStatus,
    OutgoingInstance,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from services.notify.worker_metrics import NotifyWorkerMetrics
from services.routing.domain.directory import BasicAuth, BearerAuth, DicomWebEndpoint
from tests.dicom_samples import make_dicom_bytes
from tests.factories import CT_IMAGE_STORAGE, EXPLICIT_VR_LITTLE_ENDIAN, make_uid

STUDY = "1.2.826.0.1.3680043.8.498.1"
BASE_URL = "http://pacs.example.test/dicom-web"
STORED, WARNING, FAILED = InstanceStatus.STORED, InstanceStatus.WARNING, InstanceStatus.FAILED
ALREADY_PRESENT = InstanceStatus.ALREADY_PRESENT

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def instance(data: bytes = b"DICM-ish bytes") -> OutgoingInstance:
    return OutgoingInstance(make_uid(), CT_IMAGE_STORAGE, EXPLICIT_VR_LITTLE_ENDIAN, data)


def endpoint(**fields: Any) -> DicomWebEndpoint:
    return DicomWebEndpoint(id="pacs", base_url=BASE_URL, **fields)


def ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]}


def referenced(uid: str, warning: int | str | None = None) -> dict[str, Any]:
    item = {"00081150": ui(CT_IMAGE_STORAGE), "00081155": ui(uid)}
    if warning is not None:
        item["00081196"] = {"vr": "US", "Value": [warning]}
    return item


def failed(uid: str, reason: int | str | None) -> dict[str, Any]:
    item = {"00081150": ui(CT_IMAGE_STORAGE), "00081155": ui(uid)}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def module(
    refs: Sequence[dict[str, Any]] = (), fails: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    # Orthanc writes an empty sequence without "Value"; do the same here.
    body: dict[str, Any] = {"00081199": {"vr": "SQ"}, "00081198": {"vr": "SQ"}}
    if refs:
        body["00081199"]["Value"] = list(refs)
    if fails:
        body["00081198"]["Value"] = list(fails)
    return body


def answer(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Handler:
    async def handle(request: httpx.Request) -> httpx.Response:
        await request.aread()
        if body is None or isinstance(body, bytes):
            content = body or b""
        else:
            content = json.dumps(body).encode()
        return httpx.Response(
            status,
            content=content,
            headers={"Content-Type": "application/dicom+json", **(headers or {})},
        )

    return handle


async def send(
    handler: Handler, instances: list[OutgoingInstance], *, chunked: bool = True, **fields: Any
) -> Any:
    async with StowSender(transport=httpx.MockTransport(handler), chunked=chunked) as sender:
        return await sender.send(endpoint(**fields), STUDY, instances)


# --- the request ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
async def test_the_request_is_one_multipart_related_part_per_instance(chunked: bool) -> None:
    seen: list[tuple[httpx.Request, bytes]] = []
    batch = [instance(b"first instance"), instance(b"\r\n--second\r\n")]

    async def handle(request: httpx.Request) -> httpx.Response:
        seen.append((request, await request.aread()))
        return httpx.Response(200, json=module([referenced(i.sop_instance_uid) for i in batch]))

    result = await send(handle, batch, chunked=chunked)

    [(request, body)] = seen
    assert request.method == "POST"
    assert str(request.url) == f"{BASE_URL}/studies/{STUDY}"
    assert request.headers["Accept"] == "application/dicom+json"
    content_type = request.headers["Content-Type"]
    match = re.fullmatch(
        r'multipart/related; type="application/dicom"; boundary=(\w+)', content_type
    )
    assert match is not None
    boundary = match.group(1).encode()
    assert body == (
        b"".join(
            b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + i.data + b"\r\n"
            for i in batch
        )
        + b"--"
        + boundary
        + b"--\r\n"
    )
    if chunked:
        assert request.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in request.headers
    else:
        assert int(request.headers["Content-Length"]) == len(body)
    assert "Authorization" not in request.headers
    assert [o.status for o in result.outcomes] == [STORED, STORED]


async def test_a_bearer_token_and_basic_credentials_go_in_the_authorization_header() -> None:
    seen: list[str] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        await request.aread()
        seen.append(request.headers["Authorization"])
        return httpx.Response(200, json=module())

    await send(handle, [instance()], auth=BearerAuth(token="tok-en.123"))
    await send(handle, [instance()], auth=BasicAuth(username="pacs", password="pä:ss"))

    assert seen[0] == "Bearer tok-en.123"
    assert seen[1] == "Basic " + base64.b64encode("pacs:pä:ss".encode()).decode()


async def test_an_empty_batch_sends_nothing_and_a_bad_study_uid_is_refused() -> None:
    async def handle(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    async with StowSender(transport=httpx.MockTransport(handle)) as sender:
        assert (await sender.send(endpoint(), STUDY, [])).outcomes == ()
        with pytest.raises(ValueError):
            await sender.send(endpoint(), "1.2.3/../../patients", [instance()])


# --- per-instance answers -------------------------------------------------------------------------


async def test_referenced_instances_are_stored_and_warnings_kept() -> None:
    a, b, c = instance(), instance(), instance()

    result = await send(
        answer(
            200, module([referenced(a.sop_instance_uid), referenced(b.sop_instance_uid, 0xB006)])
        ),
        [a, b, c],
    )

    assert result.outcomes == (
        InstanceOutcome(a.sop_instance_uid, STORED),
        InstanceOutcome(b.sop_instance_uid, WARNING, "B006", "elements discarded"),
        # In neither sequence of a 200: stored, as the status says all were.
        InstanceOutcome(c.sop_instance_uid, STORED),
    )


async def test_a_202_mixes_stored_and_failed_and_an_unlisted_instance_is_resent() -> None:
    a, b, c, d = instance(), instance(), instance(), instance()
    body = module(
        [referenced(a.sop_instance_uid)],
        [failed(b.sop_instance_uid, 0xA700), failed(c.sop_instance_uid, 0xA900)],
    )

    result = await send(answer(202, body), [a, b, c, d])

    assert [(o.status, o.code, o.transient) for o in result.outcomes] == [
        (STORED, None, False),
        (FAILED, "A700", True),
        (FAILED, "A900", False),
        (FAILED, None, True),
    ]


async def test_a_409_like_orthancs_for_another_study_fails_only_that_instance() -> None:
    ours, foreign = instance(), instance()
    body = module([referenced(ours.sop_instance_uid)], [failed(foreign.sop_instance_uid, 272)])

    result = await send(answer(409, body), [ours, foreign])

    assert result.outcome(ours.sop_instance_uid).status is STORED
    # 0110 is a processing failure: transient (dcm4chee and Azure answer it for their own
    # errors), although Orthanc also answers it for an instance of another study.
    assert result.outcome(foreign.sop_instance_uid) == InstanceOutcome(
        foreign.sop_instance_uid, FAILED, "0110", "processing failure", transient=True
    )


@pytest.mark.parametrize("status", [409, 202])
async def test_instances_azure_lists_as_already_stored_are_already_present_not_failed(
    status: int,
) -> None:
    new, held, busy, duplicate = instance(), instance(), instance(), instance()
    body = module(
        [referenced(new.sop_instance_uid)],
        [
            failed(held.sop_instance_uid, 45070),  # B00E: instance already stored
            failed(busy.sop_instance_uid, 45071),  # B00F: being stored by another process
            failed(duplicate.sop_instance_uid, 0x0111),
        ],
    )

    result = await send(answer(status, body), [new, held, busy, duplicate])

    assert [(o.status, o.code, o.transient) for o in result.outcomes] == [
        (STORED, None, False),
        (ALREADY_PRESENT, "B00E", False),
        (FAILED, "B00F", True),
        (ALREADY_PRESENT, "0111", False),
    ]
    assert [o.sop_instance_uid for o in result.failed] == [busy.sop_instance_uid]


async def test_a_400_naming_stored_instances_is_read_per_instance() -> None:
    good, unreadable = instance(), instance(b"not dicom")

    result = await send(
        answer(400, module([referenced(good.sop_instance_uid)])), [good, unreadable]
    )

    assert result.outcome(good.sop_instance_uid).status is STORED
    unnamed = result.outcome(unreadable.sop_instance_uid)
    assert (unnamed.status, unnamed.transient) == (FAILED, False)


async def test_failure_reasons_as_hex_text_and_a_one_element_array_body_are_understood() -> None:
    a, b = instance(), instance()
    body = [module([referenced(a.sop_instance_uid, "B000")], [failed(b.sop_instance_uid, "C122")])]

    result = await send(answer(202, body), [a, b])

    assert [(o.status, o.code) for o in result.outcomes] == [(WARNING, "B000"), (FAILED, "C122")]


async def test_a_failed_item_without_a_reason_is_a_permanent_failure() -> None:
    a = instance()

    result = await send(answer(409, module(fails=[failed(a.sop_instance_uid, None)])), [a])

    assert (result.outcomes[0].status, result.outcomes[0].transient) == (FAILED, False)


# --- unreadable answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"<NativeDicomModel/>", b'{"unrelated": 1}', b"[1, 2]"])
async def test_an_unreadable_200_counts_every_instance_stored(body: bytes) -> None:
    batch = [instance(), instance()]

    result = await send(answer(200, body), batch)

    assert [o.status for o in result.outcomes] == [STORED, STORED]


async def test_an_unreadable_202_is_transient_because_what_was_stored_is_unknown() -> None:
    with pytest.raises(TransientDeliveryError, match="202"):
        await send(answer(202, b"oops"), [instance()])


@pytest.mark.parametrize("body", [module(), module([referenced("1.2.3.4")]), b"conflict", b""])
@pytest.mark.parametrize("status", [400, 409])
async def test_a_400_or_409_that_names_none_of_the_instances_refuses_each_of_them(
    status: int, body: Any
) -> None:
    # The receiver judged this request, not the endpoint: the batch's instances are refused
    # (permanently), and the delivery goes on with its other batches.
    batch = [instance(), instance()]

    result = await send(answer(status, body), batch)

    assert result.outcomes == tuple(
        InstanceOutcome(
            i.sop_instance_uid,
            FAILED,
            reason=f"refused by the receiver without naming it (HTTP {status})",
        )
        for i in batch
    )


def test_parse_store_response_rejects_what_is_not_a_response_module() -> None:
    assert parse_store_response(b"{") is None
    assert parse_store_response(b'{"00081199": {"vr": "SQ", "Value": "x"}}') is None
    assert parse_store_response(b'{"00081199": {"vr": "SQ", "Value": [1]}}') is None
    parsed = parse_store_response(json.dumps(module([referenced("1.2")])).encode())
    assert parsed is not None
    assert (dict(parsed.referenced), dict(parsed.failed)) == ({"1.2": None}, {})


# --- whole-batch errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
async def test_server_errors_timeouts_and_throttling_are_transient(status: int) -> None:
    with pytest.raises(TransientDeliveryError, match=f"HTTP {status}") as caught:
        await send(answer(status, module()), [instance()])

    assert caught.value.retry_after is None


async def test_retry_after_in_seconds_or_as_a_date_is_passed_on() -> None:
    with pytest.raises(TransientDeliveryError) as seconds:
        await send(answer(503, b"", {"Retry-After": "120"}), [instance()])
    later = format_datetime(datetime.now(UTC) + timedelta(minutes=10), usegmt=True)
    with pytest.raises(TransientDeliveryError) as date:
        await send(answer(429, b"", {"Retry-After": later}), [instance()])

    assert seconds.value.retry_after == 120.0
    assert date.value.retry_after is not None
    assert 500 < date.value.retry_after <= 600


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_credentials_are_permanent_and_the_reason_holds_no_secret(
    status: int,
) -> None:
    with pytest.raises(PermanentDeliveryError, match="credentials") as caught:
        await send(answer(status, b"bad token"), [instance()], auth=BearerAuth(token="s3cr3t-tok"))

    assert "s3cr3t-tok" not in caught.value.reason


@pytest.mark.parametrize("status", [404, 405, 413, 415, 302])
async def test_other_client_errors_and_redirects_are_permanent(status: int) -> None:
    with pytest.raises(PermanentDeliveryError, match=f"HTTP {status}"):
        await send(answer(status, b"", {"Location": "http://elsewhere/"}), [instance()])


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("slow"),
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("reset"),
    ],
)
async def test_network_failures_are_transient(error: httpx.HTTPError) -> None:
    async def handle(request: httpx.Request) -> httpx.Response:
        raise error

    with pytest.raises(TransientDeliveryError, match=type(error).__name__):
        await send(handle, [instance()])


@pytest.mark.parametrize(
    "error", [httpx.ReadError("closed"), httpx.RemoteProtocolError("server disconnected")]
)
async def test_a_connection_the_receiver_dropped_is_tried_once_more_with_the_whole_body(
    error: httpx.HTTPError,
) -> None:
    bodies: list[bytes] = []
    sent = instance()

    async def handle(request: httpx.Request) -> httpx.Response:
        bodies.append(await request.aread())
        if len(bodies) == 1:
            raise error
        return await answer(200, module(refs=[referenced(sent.sop_instance_uid)]))(request)

    result = await send(handle, [sent])
    assert len(bodies) == 2 and bodies[0] == bodies[1] and bodies[1]
    assert result.all_stored


@pytest.mark.parametrize(
    ("written", "code"),
    [
        (0xA700, 0xA700),
        ("A700", 0xA700),
        ("0110", 0x0110),
        ("0x0122", 0x0122),
        ("c122", 0xC122),
        ("272", 0x0110),  # the number in decimal text
        ("290", 0x0122),
        ("110", 0x0110),  # unpadded hex
        ("122", 0x0122),
        ("43264", 0xA900),
        (" 0111 ", 0x0111),
        ("", None),
        ("failed", None),
        ("123456", None),
        (0x10000, None),
        (True, None),
    ],
)
def test_a_failure_reason_is_read_as_a_number_or_as_text_in_either_spelling(
    written: Any, code: int | None
) -> None:
    item = {
        "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
        "00081155": {"vr": "UI", "Value": ["1.2"]},
        "00081197": {"vr": "US", "Value": [written]},
    }
    parsed = parse_store_response(json.dumps({"00081198": {"vr": "SQ", "Value": [item]}}).encode())

    assert parsed is not None
    assert dict(parsed.failed) == {"1.2": code}


# --- a transfer syntax the receiver refuses (C122) ----------------------------------------------


def compressed(name: str = "MR_small_RLE.dcm") -> OutgoingInstance:
    """A pydicom sample with real compressed Pixel Data, as a Part 10 file."""
    ds = pydicom.dcmread(get_testdata_file(name))
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return OutgoingInstance(
        ds.SOPInstanceUID, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID, buffer.getvalue()
    )


def uncompressed() -> OutgoingInstance:
    data = make_dicom_bytes()
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return OutgoingInstance(ds.SOPInstanceUID, ds.SOPClassUID, EXPLICIT_VR_LITTLE_ENDIAN, data)


def parts(request: httpx.Request) -> list[pydicom.Dataset]:
    """The data sets of a STOW-RS request's parts."""
    boundary = request.headers["Content-Type"].split("boundary=")[1]
    chunks = request.content.split(f"--{boundary}".encode())[1:-1]
    return [
        pydicom.dcmread(io.BytesIO(chunk.split(b"\r\n\r\n", 1)[1][: -len(b"\r\n")]))
        for chunk in chunks
    ]


def only_uncompressed(
    seen: list[list[pydicom.Dataset]],
    *,
    down_after: int = 99,
    then: int = 503,
    partly: int = 409,
) -> Handler:
    """A receiver that stores what is uncompressed and refuses the rest with C122, answering
    ``partly`` (Orthanc's 409, or PS3.18's 202) when it refused some; after ``down_after``
    requests it answers ``then``."""

    async def handle(request: httpx.Request) -> httpx.Response:
        await request.aread()
        datasets = parts(request)
        seen.append(datasets)
        if len(seen) > down_after:
            return httpx.Response(then)
        refs, fails = [], []
        for ds in datasets:
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                fails.append(failed(ds.SOPInstanceUID, 0xC122))
            else:
                refs.append(referenced(ds.SOPInstanceUID))
        status = partly if fails else 200
        return httpx.Response(status, content=json.dumps(module(refs, fails)).encode())

    return handle


@pytest.mark.parametrize("partly", [409, 202])
async def test_an_instance_refused_for_its_transfer_syntax_is_stowed_again_decoded(
    partly: int,
) -> None:
    rle, jpeg, native = compressed(), compressed("SC_rgb_jpeg_gdcm.dcm"), uncompressed()
    seen: list[list[pydicom.Dataset]] = []
    metrics = NotifyWorkerMetrics(registry=CollectorRegistry())
    receiver = only_uncompressed(seen, partly=partly)
    sender = StowSender(transport=httpx.MockTransport(receiver), metrics=metrics)

    async with sender:
        result = await sender.send(endpoint(), STUDY, [rle, native, jpeg])

    assert [o.sop_instance_uid for o in result.outcomes] == [
        rle.sop_instance_uid, native.sop_instance_uid, jpeg.sop_instance_uid
    ]  # fmt: skip
    assert [o.status for o in result.outcomes] == [STORED] * 3
    # The batch as stored, then each refused instance alone, decoded; the same UID.
    assert [[ds.SOPInstanceUID for ds in request] for request in seen] == [
        [rle.sop_instance_uid, native.sop_instance_uid, jpeg.sop_instance_uid],
        [rle.sop_instance_uid],
        [jpeg.sop_instance_uid],
    ]
    for [ds], original in zip(seen[1:], (rle, jpeg), strict=True):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        before = pydicom.dcmread(io.BytesIO(original.data))
        assert np.array_equal(ds.pixel_array, before.pixel_array)
    assert (
        metrics.registry.get_sample_value(
            "beeldportaal_notify_instances_decompressed_total", {"outcome": "sent"}
        )
        == 2
    )


async def test_an_undecodable_refused_instance_keeps_its_c122_and_others_are_not_resent() -> None:
    broken = compressed()
    ds = pydicom.dcmread(io.BytesIO(broken.data))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # RLE segments cut short
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    broken = OutgoingInstance(
        broken.sop_instance_uid, broken.sop_class_uid, broken.transfer_syntax_uid,
        buffer.getvalue(),
    )  # fmt: skip
    seen: list[list[pydicom.Dataset]] = []

    result = await send(only_uncompressed(seen), [broken, uncompressed()])

    outcome = result.outcome(broken.sop_instance_uid)
    assert (outcome.status, outcome.code, outcome.transient) == (FAILED, "C122", False)
    assert "not decodable" in (outcome.reason or "")
    assert len(seen) == 1


async def test_a_receiver_failing_during_the_decoded_resend_keeps_what_it_judged() -> None:
    rle, native, jpeg = compressed(), uncompressed(), compressed("SC_rgb_jpeg_gdcm.dcm")
    seen: list[list[pydicom.Dataset]] = []

    with pytest.raises(TransientDeliveryError, match="503") as caught:
        await send(only_uncompressed(seen, down_after=2), [rle, native, jpeg])

    # The native instance was stored and the RLE one resent decoded: settled. The JPEG one,
    # refused and not yet sent decoded, goes again with the next attempt.
    assert [(o.sop_instance_uid, o.status) for o in caught.value.answered.outcomes] == [
        (rle.sop_instance_uid, STORED),
        (native.sop_instance_uid, STORED),
    ]


async def test_a_c122_for_a_syntax_this_process_does_not_decode_is_final() -> None:
    rle = compressed()
    seen: list[list[pydicom.Dataset]] = []
    async with StowSender(
        transport=httpx.MockTransport(only_uncompressed(seen)), decodable=()
    ) as sender:
        result = await sender.send(endpoint(), STUDY, [rle])

    assert result.outcome(rle.sop_instance_uid).code == "C122" and len(seen) == 1


@pytest.mark.parametrize("status", [413, 415])
async def test_a_decoded_resend_refused_outright_fails_that_instance_only(status: int) -> None:
    rle, native = compressed(), uncompressed()
    seen: list[list[pydicom.Dataset]] = []

    result = await send(only_uncompressed(seen, down_after=1, then=status), [rle, native])

    outcome = result.outcome(rle.sop_instance_uid)
    assert (outcome.status, outcome.code, outcome.transient) == (FAILED, "C122", False)
    assert f"HTTP {status}" in (outcome.reason or "")
    assert result.outcome(native.sop_instance_uid).status is STORED
    assert len(seen) == 2


async def test_no_memory_to_decode_a_refused_instance_is_a_transient_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_memory(data: bytes) -> bytes:
        raise MemoryError

    monkeypatch.setattr(stow_adapter, "decompressed_file", no_memory)
    rle = compressed()

    result = await send(only_uncompressed([]), [rle])

    outcome = result.outcome(rle.sop_instance_uid)
    assert (outcome.status, outcome.transient) == (FAILED, True)

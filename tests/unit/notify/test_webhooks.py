"""Webhooks: the signature contract, the payloads, and the sender's retry budget (no network)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from services.notify.adapters.webhooks import (
    ATTEMPT_HEADER,
    DELIVERED_TYPE,
    DELIVERY_FAILED_TYPE,
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookOutcome,
    WebhookResult,
    WebhookSender,
    delivered_payload,
    delivery_failed_payload,
    encode_body,
    sign,
    verify,
)
from services.notify.config import NotifySettings
from services.notify.entrypoints.worker import build_notify_worker
from services.notify.handlers.webhooks import Notifier
from services.notify.worker_metrics import NotifyWorkerMetrics
from services.routing.adapters.memory import InMemoryDirectory
from shared.events.delivery import Delivered, DeliveryFailed
from shared.storage.memory import InMemoryObjectStore
from tests.factories import (
    SENDER_URA,
    T0,
    TEST_BSN,
    make_consumer_record,
    make_delivered,
    make_delivery_failed,
    make_provider,
)

SECRET = "shared-secret-of-at-least-32-characters!"
URL = "https://hooks.example.nl/beeldportaal?token=subscriber-token-xyz"

secrets = st.text(min_size=1, max_size=64).filter(lambda s: "\x00" not in s)


# --- signing --------------------------------------------------------------------------------------


def test_the_signature_is_hmac_sha256_of_the_body_in_hex() -> None:
    # Expected value from `printf '{"a":1}' | openssl dgst -sha256 -hmac "$SECRET"`.
    assert sign(b'{"a":1}', SECRET) == (
        "sha256=6448b94414a254043209d70da827e23b79263967703a26b06ad09f6b57beb2ce"
    )
    assert sign(b'{"a":1}', SecretStr(SECRET)) == sign(b'{"a":1}', SECRET)


@given(body=st.binary(max_size=512), secret=secrets)
def test_a_body_verifies_under_the_secret_it_was_signed_with(body: bytes, secret: str) -> None:
    assert verify(body, secret, sign(body, secret))


@given(body=st.binary(min_size=1, max_size=256), secret=secrets, data=st.data())
def test_changing_any_byte_of_the_body_breaks_the_signature(
    body: bytes, secret: str, data: st.DataObject
) -> None:
    header = sign(body, secret)
    index = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
    flip = data.draw(st.integers(min_value=1, max_value=255))
    tampered = body[:index] + bytes([body[index] ^ flip]) + body[index + 1 :]

    assert not verify(tampered, secret, header)


@given(body=st.binary(max_size=256), secret=secrets, other=secrets)
def test_a_different_secret_does_not_verify(body: bytes, secret: str, other: str) -> None:
    if other != secret:
        assert not verify(body, other, sign(body, secret))


@given(body=st.binary(max_size=64), data=st.data())
def test_changing_any_character_of_the_header_breaks_the_signature(
    body: bytes, data: st.DataObject
) -> None:
    header = sign(body, SECRET)
    index = data.draw(st.integers(min_value=0, max_value=len(header) - 1))
    replacement = data.draw(st.characters().filter(lambda c: c != header[index]))

    assert not verify(body, SECRET, header[:index] + replacement + header[index + 1 :])


@pytest.mark.parametrize(
    "header",
    [None, "", "sha256=", "6448b94414a254043209d70da827e23b79263967703a26b06ad09f6b57beb2ce"],
)
def test_a_missing_or_bare_signature_does_not_verify(header: str | None) -> None:
    assert not verify(b'{"a":1}', SECRET, header)


def test_an_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be empty"):
        sign(b"{}", "")


def test_the_body_is_compact_sorted_utf8_json() -> None:
    body = encode_body({"b": 1, "a": {"z": "Ziekenhuis Oost-Brabant é", "y": None}})

    assert body == '{"a":{"y":null,"z":"Ziekenhuis Oost-Brabant é"},"b":1}'.encode()


# --- payloads -------------------------------------------------------------------------------------


def test_the_delivered_payload_is_the_v1_contract() -> None:
    event = make_delivered(study_version=2, attempts=3)

    payload = delivered_payload(event)

    assert payload == {
        "type": "delivered.v1",
        "id": str(event.event_id),
        "occurred_at": event.occurred_at.isoformat(),
        "correlation_id": event.correlation_id,
        "data": {
            "study_instance_uid": event.study_instance_uid,
            "study_version": 2,
            "sender_ura": SENDER_URA,
            "destination_ura": event.destination_ura,
            "endpoint_id": "pacs-dicomweb",
            "channel": "dicomweb",
            "outcomes": {"sent": 3, "already_present": 0, "warnings": 0, "failed": 0},
            "attempts": 3,
            "delivered_at": (T0 + timedelta(minutes=2)).isoformat(),
        },
    }
    assert json.loads(encode_body(payload)) == payload
    # A delivery concluded before events named their sender.
    assert delivered_payload(make_delivered(sender_ura=None))["data"]["sender_ura"] is None


def test_the_delivery_failed_payload_is_the_v1_contract() -> None:
    final = make_delivery_failed(attempt=6, final=True, next_attempt_at=None)
    retrying = make_delivery_failed(attempt=1)

    payload = delivery_failed_payload(final)

    assert payload["type"] == "delivery.failed.v1"
    assert payload["id"] == str(final.event_id)
    assert payload["data"] == {
        "study_instance_uid": final.study_instance_uid,
        "study_version": 1,
        "sender_ura": SENDER_URA,
        "destination_ura": final.destination_ura,
        "endpoint_id": "pacs-dicomweb",
        "channel": "dicomweb",
        "reason": "HTTP 503 from the receiver",
        "attempt": 6,
        "final": True,
        "next_attempt_at": None,
    }
    assert delivery_failed_payload(retrying)["data"]["next_attempt_at"] == (
        (T0 + timedelta(minutes=1)).isoformat()
    )
    assert json.loads(encode_body(payload)) == payload


def test_a_bsn_echoed_in_a_failure_reason_never_reaches_the_subscriber() -> None:
    event = make_delivery_failed(reason=f"receiver said: patient {TEST_BSN} unknown")

    body = encode_body(delivery_failed_payload(event))

    assert TEST_BSN.encode() not in body
    assert b"patient [BSN] unknown" in body


def test_webhook_types_stay_pinned_to_the_v1_event_schemas() -> None:
    # If an event moves to .v2, the webhook contract must be decided on, not follow silently.
    assert Delivered.schema_name == DELIVERED_TYPE
    assert DeliveryFailed.schema_name == DELIVERY_FAILED_TYPE


# --- sending --------------------------------------------------------------------------------------


class Recorder:
    """A subscriber behind httpx.MockTransport: answers from a script, keeps what it got."""

    def __init__(self, answers: list[int | Callable[[httpx.Request], httpx.Response]]) -> None:
        self.answers = answers
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        return answer(request) if callable(answer) else httpx.Response(answer)


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def _sender(
    recorder: Recorder, sleeps: Sleeps, backoff: tuple[float, ...] = (1.0, 5.0, 30.0)
) -> tuple[WebhookSender, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(recorder))
    return WebhookSender(client, backoff=backoff, sleep=sleeps), client


async def _deliver(
    sender: WebhookSender, payload: dict[str, object] | None = None
) -> WebhookResult:
    return await sender.deliver(
        URL, SECRET, "delivery-1", DELIVERED_TYPE, payload or {"type": DELIVERED_TYPE, "n": 1}
    )


async def test_a_2xx_answer_is_delivered_at_once_with_every_header() -> None:
    recorder, sleeps = Recorder([202]), Sleeps()
    sender, client = _sender(recorder, sleeps)
    payload = delivered_payload(make_delivered())

    async with client:
        result = await _deliver(sender, payload)

    assert result.outcome is WebhookOutcome.DELIVERED
    assert (result.delivered, result.permanent, result.attempts) == (True, False, 1)
    assert result.status_code == 202
    assert sleeps.waits == []
    (request,) = recorder.requests
    assert request.method == "POST"
    assert request.content == encode_body(payload)
    assert request.headers["Content-Type"] == "application/json"
    assert verify(request.content, SECRET, request.headers[SIGNATURE_HEADER])
    assert request.headers[DELIVERY_HEADER] == "delivery-1"
    assert request.headers[ATTEMPT_HEADER] == "1"
    assert request.headers[EVENT_HEADER] == "delivered.v1"
    assert request.headers[TIMESTAMP_HEADER].isdigit()


async def test_the_timestamp_is_taken_once_the_request_holds_its_slot() -> None:
    """A subscriber that refuses stale timestamps must not refuse a notification for the time
    it waited for a slot: each attempt is stamped after getting its slot."""
    now = [1_000_000.0]

    class SlowSlot:
        async def __aenter__(self) -> None:
            now[0] += 90  # a minute and a half waiting for the slot

        async def __aexit__(self, *exc_info: object) -> None:
            return None

    recorder = Recorder([503, 204])
    client = httpx.AsyncClient(transport=httpx.MockTransport(recorder))
    sender = WebhookSender(client, backoff=(5.0,), sleep=Sleeps(), clock=lambda: now[0])
    async with client:
        result = await sender.deliver(
            URL, SECRET, "delivery-1", DELIVERED_TYPE, {"n": 1}, slot=SlowSlot()
        )

    assert result.outcome is WebhookOutcome.DELIVERED
    # Each attempt waited for its slot, then was stamped.
    assert [r.headers[TIMESTAMP_HEADER] for r in recorder.requests] == ["1000090", "1000180"]


async def test_server_errors_are_retried_with_backoff_under_one_delivery_id() -> None:
    recorder, sleeps = Recorder([503, 500, 200]), Sleeps()
    sender, client = _sender(recorder, sleeps)

    async with client:
        result = await _deliver(sender)

    assert result.outcome is WebhookOutcome.DELIVERED
    assert result.attempts == 3
    assert sleeps.waits == [1.0, 5.0]
    assert [r.headers[ATTEMPT_HEADER] for r in recorder.requests] == ["1", "2", "3"]
    assert {r.headers[DELIVERY_HEADER] for r in recorder.requests} == {"delivery-1"}
    assert len({r.content for r in recorder.requests}) == 1
    assert all(verify(r.content, SECRET, r.headers[SIGNATURE_HEADER]) for r in recorder.requests)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_retryable_answers_use_up_the_budget_and_then_give_up(status: int) -> None:
    recorder, sleeps = Recorder([status]), Sleeps()
    sender, client = _sender(recorder, sleeps)

    async with client:
        result = await _deliver(sender)

    assert result.outcome is WebhookOutcome.EXHAUSTED
    assert (result.delivered, result.permanent) == (False, False)
    assert result.attempts == len(recorder.requests) == 4
    assert result.status_code == status
    assert result.error == f"HTTP {status}"
    assert sleeps.waits == [1.0, 5.0, 30.0]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422, 301, 302, 307])
async def test_other_answers_are_final_and_not_retried(status: int) -> None:
    redirect = {"Location": "https://elsewhere.example.nl/"} if status < 400 else {}
    recorder = Recorder([lambda _: httpx.Response(status, headers=redirect), 200])
    sleeps = Sleeps()
    sender, client = _sender(recorder, sleeps)

    async with client:
        result = await _deliver(sender)

    assert result.outcome is WebhookOutcome.REJECTED
    assert (result.delivered, result.permanent, result.attempts) == (False, True, 1)
    assert result.status_code == status
    assert len(recorder.requests) == 1  # a redirect is not followed either
    assert sleeps.waits == []


async def test_network_errors_are_retried_and_reported() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    recorder, sleeps = Recorder([refuse, refuse, 204]), Sleeps()
    sender, client = _sender(recorder, sleeps)

    async with client:
        result = await _deliver(sender)

    assert result.outcome is WebhookOutcome.DELIVERED
    assert result.attempts == 3

    recorder, sleeps = Recorder([refuse]), Sleeps()
    sender, client = _sender(recorder, sleeps, backoff=(0.0,))
    async with client:
        result = await _deliver(sender)

    assert result.outcome is WebhookOutcome.EXHAUSTED
    assert (result.attempts, result.status_code) == (2, None)
    assert result.error == "ConnectError: connection refused"


async def test_retry_after_lengthens_a_wait_but_never_past_the_longest_backoff() -> None:
    recorder = Recorder(
        [
            lambda _: httpx.Response(429, headers={"Retry-After": "3"}),
            lambda _: httpx.Response(503, headers={"Retry-After": "3600"}),
            lambda _: httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
            200,
        ]
    )
    sleeps = Sleeps()
    sender, client = _sender(recorder, sleeps)

    async with client:
        result = await _deliver(sender)

    assert result.delivered
    assert sleeps.waits == [3.0, 30.0, 30.0]


async def test_no_backoff_means_a_single_attempt() -> None:
    recorder, sleeps = Recorder([503]), Sleeps()
    sender, client = _sender(recorder, sleeps, backoff=())

    async with client:
        result = await _deliver(sender)

    assert sender.max_attempts == 1
    assert (result.outcome, result.attempts, len(recorder.requests)) == (
        WebhookOutcome.EXHAUSTED,
        1,
        1,
    )


async def test_a_url_that_can_never_work_is_rejected_without_retrying() -> None:
    sleeps = Sleeps()
    async with httpx.AsyncClient() as client:
        sender = WebhookSender(client, sleep=sleeps)
        result = await sender.deliver("ftp://hooks.example.nl/x", SECRET, "d", "t", {})

    assert result.outcome is WebhookOutcome.REJECTED
    assert (result.attempts, result.status_code) == (1, None)
    assert sleeps.waits == []


async def test_negative_backoff_or_timeout_is_refused() -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(ValueError, match="backoff"):
            WebhookSender(client, backoff=(1.0, -1.0))
        with pytest.raises(ValueError, match="timeout"):
            WebhookSender(client, timeout=0)


async def test_logs_name_the_host_but_never_the_url_path_query_or_body() -> None:
    recorder, sleeps = Recorder([503, 200]), Sleeps()
    sender, client = _sender(recorder, sleeps)

    with structlog.testing.capture_logs() as logs:
        async with client:
            await _deliver(sender, {"type": DELIVERED_TYPE, "marker": "body-marker-123"})

    assert [entry["event"] for entry in logs] == [
        "webhook attempt failed, retrying",
        "webhook delivered",
    ]
    assert all(entry["host"] == "hooks.example.nl" for entry in logs)
    text = repr(logs)
    assert "subscriber-token-xyz" not in text
    assert "/beeldportaal" not in text
    assert "body-marker-123" not in text
    assert SECRET not in text


# --- the notifier: a batch's studies side by side -------------------------------------------------


async def _notifier(
    answer: Callable[[httpx.Request], Awaitable[httpx.Response]],
    max_concurrent: int,
    backoff: tuple[float, ...] = (),
) -> Notifier:
    """A notifier over the real sender whose HTTP answers come from ``answer``, and a started
    in-memory directory in which SLOW and FAST each have a webhook."""
    directory = InMemoryDirectory(
        [
            make_provider(ura, webhook={"url": f"https://hooks.example.nl/{ura}", "secret": SECRET})
            for ura in (SLOW, FAST)
        ]
    )
    await directory.start()
    client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    return Notifier(
        directory,  # type: ignore[arg-type]  (the reader port of DirectoryView)
        WebhookSender(client, backoff=backoff),
        NotifyWorkerMetrics(registry=CollectorRegistry()),
        max_concurrent=max_concurrent,
    )


SLOW, FAST = "10000001", "10000002"


def delivered_to(ura: str) -> Any:
    return make_consumer_record(make_delivered(destination_ura=ura))


async def test_a_subscriber_that_hangs_takes_no_slot_from_another_organisation() -> None:
    release = asyncio.Event()
    hanging = 0
    answered: list[str] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        nonlocal hanging
        if request.url.path.endswith(SLOW):
            hanging += 1
            await release.wait()
        answered.append(request.url.path.rsplit("/", 1)[1])
        return httpx.Response(204)

    notifier = await _notifier(answer, max_concurrent=2)
    # More hanging notifications than SLOW has slots: one of them waits for a slot.
    slow = [asyncio.create_task(notifier.handle(delivered_to(SLOW))) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert hanging == 2

    assert await asyncio.wait_for(notifier.handle(delivered_to(FAST)), 5) == []
    assert answered == [FAST] and not any(task.done() for task in slow)
    release.set()
    assert await asyncio.gather(*slow) == [[], [], []]
    assert answered == [FAST, SLOW, SLOW, SLOW]


async def test_at_most_max_concurrent_requests_are_in_flight_per_organisation() -> None:
    in_flight: dict[str, int] = {SLOW: 0, FAST: 0}
    peak: dict[str, int] = {SLOW: 0, FAST: 0, "both": 0}

    async def answer(request: httpx.Request) -> httpx.Response:
        ura = request.url.path.rsplit("/", 1)[1]
        in_flight[ura] += 1
        peak[ura] = max(peak[ura], in_flight[ura])
        peak["both"] = max(peak["both"], sum(in_flight.values()))
        await asyncio.sleep(0.01)
        in_flight[ura] -= 1
        return httpx.Response(204)

    notifier = await _notifier(answer, max_concurrent=3)
    records = [delivered_to(ura) for ura in (SLOW, FAST) for _ in range(8)]

    await asyncio.gather(*(notifier.handle(r) for r in records))

    assert peak == {SLOW: 3, FAST: 3, "both": 6}  # the slots are each organisation's own
    sent = notifier.metrics.registry.get_sample_value(
        "beeldportaal_notify_webhooks_total", {"type": DELIVERED_TYPE, "outcome": "delivered"}
    )
    assert sent == 16


async def test_the_wait_before_a_retry_holds_no_slot() -> None:
    """With one slot, a notification waiting to retry lets the next one make its request."""
    requests: list[tuple[str, str]] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        attempt = (request.headers[DELIVERY_HEADER], request.headers[ATTEMPT_HEADER])
        requests.append(attempt)
        return httpx.Response(503 if attempt[1] == "1" else 204)

    notifier = await _notifier(answer, max_concurrent=1, backoff=(0.2,))
    first, second = delivered_to(SLOW), delivered_to(SLOW)

    await asyncio.gather(notifier.handle(first), notifier.handle(second))

    ids = [json.loads(r.value)["event_id"] for r in (first, second)]
    # Both first attempts before either retry: the first's wait did not keep the slot.
    assert requests[:2] == [(ids[0], "1"), (ids[1], "1")]
    assert sorted(requests[2:]) == sorted([(ids[0], "2"), (ids[1], "2")])


def test_the_worker_notifies_a_partitions_studies_side_by_side() -> None:
    """The notifier's slots only matter if the stream hands it a batch's studies at once."""
    worker = build_notify_worker(
        NotifySettings(),
        objects=InMemoryObjectStore(),
        metrics=NotifyWorkerMetrics(registry=CollectorRegistry()),
    )

    side_by_side = {stream.name: stream.parallel_keys for stream in worker.streams}
    assert side_by_side["notify-webhooks"] is True
    # A retry tier's records wait in order (a record not yet due stops its partition).
    assert side_by_side["notify-retry"] is False

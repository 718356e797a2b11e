"""Webhooks: tell a receiver or downstream system, in a signed HTTP POST, what happened to a study.

The contract a subscriber implements:

* ``POST <url>`` with ``Content-Type: application/json``. The body is compact UTF-8 JSON with
  sorted keys: ``{"type": "delivered.v1", "id": ..., "occurred_at": ..., "data": {...}}``
  (see :func:`delivered_payload` and :func:`delivery_failed_payload`). Within a ``.v1`` type
  fields are only ever added; a breaking change gets a new type (``delivered.v2``).
* ``X-Beeldportaal-Signature: sha256=<hex>``: HMAC-SHA256, keyed with the shared secret (its
  UTF-8 bytes), over **exactly the body bytes as received** and nothing else; no header is
  signed. Verify before parsing, with a constant-time comparison (:func:`verify` does both).
* ``X-Beeldportaal-Delivery``: the delivery id, the same on every attempt of one notification.
  Subscribers deduplicate on it (or on the body's ``id``, which is signed): delivery is
  at-least-once, and a replayed request is then a harmless duplicate.
* ``X-Beeldportaal-Attempt``: 1, 2, 3, ... within one notification. ``X-Beeldportaal-Event``:
  the body's ``type``. ``X-Beeldportaal-Timestamp``: when this attempt was sent (Unix seconds);
  informational, not signed (the signed body carries ``occurred_at``).
* Answer 2xx to accept. 408, 429, 5xx and network errors are retried with backoff within a
  bounded budget; any other status (other 4xx, 3xx: redirects are not followed) is final.

Payloads carry identifiers only (UIDs, URA, endpoint id), never patient data: the events they
are built from carry no BSN, and free text is scrubbed. Logs name the URL's host, never its
path or query, which may hold a subscriber's token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr

from shared.events.delivery import Delivered, DeliveryFailed
from shared.logging import get_logger, scrub_bsns

log = get_logger(__name__)

SIGNATURE_HEADER = "X-Beeldportaal-Signature"
DELIVERY_HEADER = "X-Beeldportaal-Delivery"
ATTEMPT_HEADER = "X-Beeldportaal-Attempt"
EVENT_HEADER = "X-Beeldportaal-Event"
TIMESTAMP_HEADER = "X-Beeldportaal-Timestamp"
_SIGNATURE_PREFIX = "sha256="

# The webhook types: equal to the events' schema names today, but their own contract, so an
# internal event can move to .v2 without silently changing what subscribers receive.
DELIVERED_TYPE = "delivered.v1"
DELIVERY_FAILED_TYPE = "delivery.failed.v1"

DEFAULT_BACKOFF: tuple[float, ...] = (1.0, 5.0, 30.0)
RETRYABLE_STATUSES = frozenset({408, 429})  # and every 5xx


# --- signing --------------------------------------------------------------------------------------


def _key(secret: str | SecretStr) -> bytes:
    clear = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    if not clear:
        raise ValueError("a webhook secret cannot be empty")
    return clear.encode("utf-8")


def sign(body: bytes, secret: str | SecretStr) -> str:
    """The ``X-Beeldportaal-Signature`` value: ``sha256=`` + HMAC-SHA256(secret, body) in hex."""
    return _SIGNATURE_PREFIX + hmac.new(_key(secret), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str | SecretStr, header: str | None) -> bool:
    """True when ``header`` is the signature of ``body`` under ``secret`` (constant time)."""
    if not header:
        return False
    expected = sign(body, secret).encode("ascii")
    given = header.strip().encode("utf-8", errors="replace")
    return hmac.compare_digest(expected, given)


def encode_body(payload: Mapping[str, Any]) -> bytes:
    """Compact, sorted-key UTF-8 JSON: the same payload always gives the same signed bytes."""
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


# --- payloads -------------------------------------------------------------------------------------


def _envelope(kind: str, event: Delivered | DeliveryFailed, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": kind,
        "id": str(event.event_id),
        "occurred_at": event.occurred_at.isoformat(),
        "correlation_id": event.correlation_id,
        "data": data,
    }


def delivered_payload(event: Delivered) -> dict[str, Any]:
    """``delivered.v1``: a study version reached a destination.

    ``data``: ``study_instance_uid``, ``study_version`` (1, 2, ... as instances were added),
    ``sender_ura`` (who sent it; null for a delivery concluded before 2026-11-27),
    ``destination_ura``, ``endpoint_id``, ``channel`` (dicomweb, dimse, pickup), ``outcomes``
    (``sent``, ``already_present``, ``warnings``, ``failed`` instance counts), ``attempts``
    and ``delivered_at`` (ISO 8601 with offset).
    """
    return _envelope(
        DELIVERED_TYPE,
        event,
        {
            "study_instance_uid": event.study_instance_uid,
            "study_version": event.study_version,
            "sender_ura": event.sender_ura,
            "destination_ura": event.destination_ura,
            "endpoint_id": event.endpoint_id,
            "channel": event.channel.value,
            "outcomes": event.outcomes.model_dump(mode="json"),
            "attempts": event.attempts,
            "delivered_at": event.delivered_at.isoformat(),
        },
    )


def delivery_failed_payload(event: DeliveryFailed) -> dict[str, Any]:
    """``delivery.failed.v1``: an attempt failed; ``final`` true means no more retries.

    ``data``: ``study_instance_uid``, ``study_version``, ``sender_ura`` (as in
    ``delivered.v1``), ``destination_ura``, ``endpoint_id``, ``channel``, ``reason`` (free text,
    BSN-scrubbed), ``attempt``, ``final`` and ``next_attempt_at`` (ISO 8601, or null when
    final).
    """
    return _envelope(
        DELIVERY_FAILED_TYPE,
        event,
        {
            "study_instance_uid": event.study_instance_uid,
            "study_version": event.study_version,
            "sender_ura": event.sender_ura,
            "destination_ura": event.destination_ura,
            "endpoint_id": event.endpoint_id,
            "channel": event.channel.value,
            # Built from a receiver's answer, which might echo a patient id: scrub it.
            "reason": scrub_bsns(event.reason),
            "attempt": event.attempt,
            "final": event.final,
            "next_attempt_at": (
                event.next_attempt_at.isoformat() if event.next_attempt_at else None
            ),
        },
    )


# --- sending --------------------------------------------------------------------------------------


class WebhookOutcome(StrEnum):
    DELIVERED = "delivered"  # a 2xx answer
    REJECTED = "rejected"  # a final answer (4xx other than 408/429, 3xx): retrying cannot help
    EXHAUSTED = "exhausted"  # every attempt met a retryable failure


@dataclass(frozen=True, slots=True)
class WebhookResult:
    """What happened to one notification: ``status_code`` is the last answer (None: no answer)."""

    outcome: WebhookOutcome
    attempts: int
    status_code: int | None
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.outcome is WebhookOutcome.DELIVERED

    @property
    def permanent(self) -> bool:
        """The subscriber refused it: retrying later will not help either."""
        return self.outcome is WebhookOutcome.REJECTED


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES or 500 <= status <= 599


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None  # the HTTP-date form is ignored


def _host(url: str) -> str:
    return urlsplit(url).hostname or "?"


class WebhookSender:
    """POSTs signed notifications over a caller-owned ``httpx.AsyncClient``.

    ``backoff`` holds the waits between attempts, so there are ``len(backoff) + 1`` attempts.
    A ``Retry-After`` (seconds) from a 429/503 lengthens a wait, but never beyond the longest
    backoff delay: one notification never takes much more than ``sum(backoff)`` plus the
    request timeouts, plus any wait for a ``slot`` (see :meth:`deliver`). Redirects are not
    followed (the body and signature must not be replayed to another address).
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        backoff: Sequence[float] = DEFAULT_BACKOFF,
        timeout: float = 10.0,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if any(not (delay >= 0) for delay in backoff):
            raise ValueError("backoff delays must be >= 0 seconds")
        if not timeout > 0:
            raise ValueError("the request timeout must be > 0 seconds")
        self._client = client
        self._backoff = tuple(float(d) for d in backoff)
        self._timeout = timeout
        self._sleep = sleep
        self._clock = clock  # the timestamp header's (Unix seconds)

    @property
    def max_attempts(self) -> int:
        return len(self._backoff) + 1

    async def deliver(
        self,
        url: str,
        secret: str | SecretStr,
        delivery_id: str,
        event_type: str,
        payload: Mapping[str, Any],
        slot: AbstractAsyncContextManager[Any] | None = None,
    ) -> WebhookResult:
        """Send ``payload`` until it is accepted, refused for good, or the budget is spent;
        each request is made holding ``slot`` (if given), the waits between them are not."""
        body = encode_body(payload)
        signature = sign(body, secret)
        host = _host(url)
        status: int | None = None
        error: str | None = None
        for attempt in range(1, self.max_attempts + 1):
            retry_after: float | None = None
            try:
                async with slot or contextlib.nullcontext():
                    # Stamped once the request may go: a wait for the slot is not in it.
                    headers = {
                        "Content-Type": "application/json",
                        SIGNATURE_HEADER: signature,
                        DELIVERY_HEADER: delivery_id,
                        ATTEMPT_HEADER: str(attempt),
                        EVENT_HEADER: event_type,
                        TIMESTAMP_HEADER: str(int(self._clock())),
                    }
                    # Streamed and never read: a subscriber's answer body is of no use to us.
                    async with self._client.stream(
                        "POST",
                        url,
                        content=body,
                        headers=headers,
                        timeout=self._timeout,
                        follow_redirects=False,
                    ) as response:
                        status, error = response.status_code, None
                        retry_after = _retry_after(response)
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
                # A URL that can never work; the directory refuses these, so this is a bug.
                return WebhookResult(
                    WebhookOutcome.REJECTED, attempt, None, f"unusable URL: {type(exc).__name__}"
                )
            except httpx.TransportError as exc:
                # Includes timeouts, after which the subscriber may have it: hence the delivery id.
                status, error = None, f"{type(exc).__name__}: {scrub_bsns(str(exc))}"[:512]

            if status is not None and 200 <= status <= 299:
                log.info(
                    "webhook delivered",
                    host=host,
                    delivery_id=delivery_id,
                    event_type=event_type,
                    attempt=attempt,
                    status=status,
                )
                return WebhookResult(WebhookOutcome.DELIVERED, attempt, status)
            if status is not None and not is_retryable_status(status):
                log.warning(
                    "webhook rejected",
                    host=host,
                    delivery_id=delivery_id,
                    event_type=event_type,
                    attempt=attempt,
                    status=status,
                )
                return WebhookResult(
                    WebhookOutcome.REJECTED, attempt, status, f"HTTP {status} is final"
                )
            if status is not None:
                error = f"HTTP {status}"
            if attempt < self.max_attempts:
                wait = self._backoff[attempt - 1]
                if retry_after is not None:
                    wait = min(max(wait, retry_after), max(self._backoff))
                log.info(
                    "webhook attempt failed, retrying",
                    host=host,
                    delivery_id=delivery_id,
                    event_type=event_type,
                    attempt=attempt,
                    status=status,
                    error=error,
                    retry_in_seconds=wait,
                )
                await self._sleep(wait)

        log.warning(
            "webhook gave up",
            host=host,
            delivery_id=delivery_id,
            event_type=event_type,
            attempts=self.max_attempts,
            status=status,
            error=error,
        )
        return WebhookResult(WebhookOutcome.EXHAUSTED, self.max_attempts, status, error)

"""When a failed delivery is tried again, on which retry topic it waits, and when it is dead.

Non-blocking retry with one Kafka topic per delay tier (the pattern of Uber's "reliable
reprocessing" and Spring Kafka's ``@RetryableTopic``)::

    route-resolved ──▶ attempt 1 ──fail──▶ delivery-retry-10s ──▶ attempt 2 ──fail──▶
    delivery-retry-1m ──▶ ... ──▶ delivery-retry-2h ──▶ attempt 6 ──fail──▶ delivery-dead-letter

* A failed attempt ``n`` is republished to the topic of tier ``policy.tier(n)`` with the headers
  of :func:`retry_headers`: the attempt that failed and the record's *not before* time
  (failure time + that tier's delay). ``policy.next_delay(n) is None`` means the retries are
  used up: the record goes to :data:`DEAD_LETTER_TOPIC` and notify emits a final DeliveryFailed.
* Every record on one tier topic has the same delay and records are appended in failure order,
  so within a partition the head always has the earliest not-before time. A tier's consumer
  reads the head; if it is not yet due it pauses that partition for :func:`wait_seconds` (and
  seeks back to the head), then resumes. It never sleeps on a record while later ones wait
  behind it for nothing, it never blocks the main topic, and a slow tier does not hold up the
  others. The committed offset of a tier only moves past a record once it has been re-attempted
  (or moved on to the next tier), so a crash re-reads it: at-least-once, like every handler.
* Poison (a failure that can never succeed, see ``outcomes.py``) skips the tiers and goes to
  the dead letter at once.

Delays are whole seconds: a tier is a topic, and sub-second tiers would only churn the broker.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise

from shared.errors import PoisonEvent
from shared.events.common import Urgency

DEFAULT_DELAYS: tuple[float, ...] = (10.0, 60.0, 300.0, 1800.0, 7200.0)
RETRY_TOPIC_PREFIX = "delivery-retry-"
DEAD_LETTER_TOPIC = "delivery-dead-letter"

# Kafka headers of a record on a tier topic (lower-case, like shared.codec's headers).
ATTEMPT_HEADER = "attempt"  # the attempt that failed, as ASCII digits
NOT_BEFORE_HEADER = "not-before"  # epoch milliseconds (Kafka's own time unit), ASCII digits

_UNITS = (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1))


def tier_topic_name(delay_seconds: float) -> str:
    """``delivery-retry-<delay>`` in the largest unit that divides it: 10s, 1m, 90s, 2h, 1d."""
    seconds = _whole_seconds(delay_seconds)
    for suffix, size in _UNITS:
        if seconds % size == 0:
            return f"{RETRY_TOPIC_PREFIX}{seconds // size}{suffix}"
    raise AssertionError("unreachable: every whole number of seconds divides by 1")


def _whole_seconds(delay: float) -> int:
    if isinstance(delay, bool) or not isinstance(delay, int | float):
        raise TypeError(f"a retry delay is a number of seconds, got {type(delay).__name__}")
    if not math.isfinite(delay) or delay < 1 or delay != int(delay):
        raise ValueError(f"a retry delay is a whole number of seconds >= 1, got {delay!r}")
    return int(delay)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Delays before each retry: after attempt ``n`` fails, wait ``delays[n - 1]``.

    ``len(delays) + 1`` attempts in all; an empty tuple means a failure is final at once.
    Delays are whole seconds and never decrease (equal delays share one tier topic).
    """

    delays: tuple[float, ...] = DEFAULT_DELAYS

    def __post_init__(self) -> None:
        delays = tuple(float(_whole_seconds(d)) for d in self.delays)
        for earlier, later in pairwise(delays):
            if later < earlier:
                raise ValueError(f"retry delays must not decrease: {earlier:g}s then {later:g}s")
        object.__setattr__(self, "delays", delays)

    @property
    def max_attempts(self) -> int:
        return len(self.delays) + 1

    def next_delay(self, attempt: int) -> float | None:
        """Seconds to wait after attempt ``attempt`` (1-based) failed; None = dead-letter it."""
        _check_attempt(attempt)
        return self.delays[attempt - 1] if attempt <= len(self.delays) else None

    def delay_covering(self, attempt: int, wait: float) -> float | None:
        """The delay of the tier a retry after attempt ``attempt`` waits on when the receiver
        asked to wait ``wait`` seconds (Retry-After): the shortest of this and the later tiers'
        delays that covers it, else the longest; None = dead-letter it. A record waits on a tier
        for that tier's delay, so that the head of each tier is the one due first: put on a
        shorter tier, a record due later would hold up every record behind it."""
        delay = self.next_delay(attempt)
        if delay is None:
            return None
        later = self.delays[attempt - 1 :]
        return next((d for d in later if d >= wait), later[-1])

    def tier(self, attempt: int) -> str | None:
        """The retry topic a record waits on after attempt ``attempt`` failed; None = exhausted."""
        delay = self.next_delay(attempt)
        return None if delay is None else tier_topic_name(delay)

    def next_topic(self, attempt: int) -> str:
        """Where a record goes after attempt ``attempt`` failed: its tier, or the dead letter."""
        return self.tier(attempt) or DEAD_LETTER_TOPIC

    def not_before(self, attempt: int, failed_at: datetime) -> datetime | None:
        """When the next attempt is due (DeliveryFailed.next_attempt_at); None = exhausted."""
        delay = self.next_delay(attempt)
        return None if delay is None else _aware(failed_at) + timedelta(seconds=delay)


def _check_attempt(attempt: int) -> None:
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempts are numbered from 1, got {attempt!r}")


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("a naive datetime is ambiguous: pass a timezone-aware one")
    return moment


def retry_topic_names(policy: RetryPolicy) -> tuple[str, ...]:
    """Every topic the policy uses: its tiers, shortest first, then the dead letter."""
    tiers = dict.fromkeys(tier_topic_name(d) for d in policy.delays)
    return (*tiers, DEAD_LETTER_TOPIC)


# --- headers of a record on a tier topic ----------------------------------------------------------


def retry_headers(attempt: int, not_before: datetime) -> tuple[tuple[str, bytes], ...]:
    """Headers to add to a record republished on a tier topic (next to the codec's own)."""
    _check_attempt(attempt)
    millis = math.ceil(_aware(not_before).timestamp() * 1000)
    return ((ATTEMPT_HEADER, str(attempt).encode()), (NOT_BEFORE_HEADER, str(millis).encode()))


def read_retry_headers(
    headers: Iterable[tuple[str, bytes]] | Mapping[str, bytes] | None,
) -> tuple[int, datetime]:
    """``(failed attempt, not before)`` from a tier record's headers; PoisonEvent if unusable."""
    found = dict(headers.items() if isinstance(headers, Mapping) else headers or ())
    attempt = _header_int(found, ATTEMPT_HEADER)
    if attempt < 1:
        raise PoisonEvent(f"retry header {ATTEMPT_HEADER!r} must be >= 1")
    millis = _header_int(found, NOT_BEFORE_HEADER)
    try:
        not_before = datetime.fromtimestamp(millis / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise PoisonEvent(f"retry header {NOT_BEFORE_HEADER!r} is out of range") from exc
    return attempt, not_before


def _header_int(headers: Mapping[str, bytes], name: str) -> int:
    raw = headers.get(name)
    if raw is None:
        raise PoisonEvent(f"record on a retry topic has no {name!r} header")
    text = raw.decode("ascii", errors="replace")
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise PoisonEvent(f"retry header {name!r} is not a non-negative integer")
    return int(text)


def wait_seconds(not_before: datetime, now: datetime) -> float:
    """How long a tier consumer pauses the partition whose head is due at ``not_before``."""
    return max(0.0, (_aware(not_before) - _aware(now)).total_seconds())


# --- priority -------------------------------------------------------------------------------------

_RANK = {Urgency.ROUTINE: 0, Urgency.URGENT: 1, Urgency.EMERGENCY: 2}


def priority_rank(urgency: Urgency) -> int:
    """Higher goes first (same order as routing's): ``sorted(work, key=..., reverse=True)``."""
    return _RANK[Urgency(urgency)]

"""The delivery retry policy: delays per attempt, tier topics, their headers, and priority."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.notify.domain.retry import (
    ATTEMPT_HEADER,
    DEAD_LETTER_TOPIC,
    NOT_BEFORE_HEADER,
    RetryPolicy,
    priority_rank,
    read_retry_headers,
    retry_headers,
    retry_topic_names,
    tier_topic_name,
    wait_seconds,
)
from services.routing.domain.route import priority_rank as routing_priority_rank
from shared.errors import PoisonEvent
from shared.events.common import Urgency
from tests.factories import T0

delay_lists = st.lists(st.integers(min_value=1, max_value=7 * 86_400), max_size=8).map(
    lambda ds: tuple(sorted(ds))
)


def test_the_default_policy_waits_10s_1m_5m_30m_2h_and_then_dead_letters() -> None:
    policy = RetryPolicy()

    assert [policy.next_delay(n) for n in range(1, 7)] == [10, 60, 300, 1800, 7200, None]
    assert policy.max_attempts == 6


def test_the_default_tiers_are_named_after_their_delay() -> None:
    policy = RetryPolicy()

    assert [policy.tier(n) for n in range(1, 7)] == [
        "delivery-retry-10s",
        "delivery-retry-1m",
        "delivery-retry-5m",
        "delivery-retry-30m",
        "delivery-retry-2h",
        None,
    ]
    assert policy.next_topic(5) == "delivery-retry-2h"
    assert policy.next_topic(6) == DEAD_LETTER_TOPIC


def test_the_topic_list_holds_every_tier_once_and_then_the_dead_letter() -> None:
    assert retry_topic_names(RetryPolicy()) == (
        "delivery-retry-10s",
        "delivery-retry-1m",
        "delivery-retry-5m",
        "delivery-retry-30m",
        "delivery-retry-2h",
        "delivery-dead-letter",
    )
    assert retry_topic_names(RetryPolicy((60, 60, 120))) == (
        "delivery-retry-1m",
        "delivery-retry-2m",
        DEAD_LETTER_TOPIC,
    )


@pytest.mark.parametrize(
    ("seconds", "name"),
    [
        (10, "delivery-retry-10s"),
        (60, "delivery-retry-1m"),
        (90, "delivery-retry-90s"),
        (300.0, "delivery-retry-5m"),
        (5400, "delivery-retry-90m"),
        (7200, "delivery-retry-2h"),
        (86_400, "delivery-retry-1d"),
        (129_600, "delivery-retry-36h"),
    ],
)
def test_a_tier_name_uses_the_largest_unit_that_divides_the_delay(
    seconds: float, name: str
) -> None:
    assert tier_topic_name(seconds) == name


@pytest.mark.parametrize("bad", [0, -10, 1.5, 0.01, float("inf"), float("nan")])
def test_a_delay_must_be_a_whole_positive_number_of_seconds(bad: float) -> None:
    with pytest.raises(ValueError, match="whole number of seconds"):
        tier_topic_name(bad)
    with pytest.raises(ValueError, match="whole number of seconds"):
        RetryPolicy((10, bad))


def test_delays_that_decrease_are_refused() -> None:
    with pytest.raises(ValueError, match="must not decrease"):
        RetryPolicy((60, 10))


def test_an_empty_policy_dead_letters_the_first_failure() -> None:
    policy = RetryPolicy(())

    assert policy.next_delay(1) is None
    assert policy.next_topic(1) == DEAD_LETTER_TOPIC
    assert retry_topic_names(policy) == (DEAD_LETTER_TOPIC,)


@pytest.mark.parametrize("attempt", [0, -1, True])
def test_attempts_are_numbered_from_one(attempt: int) -> None:
    with pytest.raises(ValueError, match="numbered from 1"):
        RetryPolicy().next_delay(attempt)


def test_a_policy_can_be_built_from_a_list_of_settings() -> None:
    policy = RetryPolicy([1, 2])  # type: ignore[arg-type]

    assert policy.delays == (1.0, 2.0)
    assert policy == RetryPolicy((1, 2))


@given(delay_lists)
def test_delays_never_decrease_and_run_out_after_the_last_one(delays: tuple[int, ...]) -> None:
    policy = RetryPolicy(delays)
    given_delays = [policy.next_delay(n) for n in range(1, policy.max_attempts)]

    assert given_delays == list(delays)
    assert all(a <= b for a, b in pairwise(d for d in given_delays if d is not None))
    assert policy.next_delay(policy.max_attempts) is None
    assert policy.next_topic(policy.max_attempts) == DEAD_LETTER_TOPIC


@given(delay_lists)
def test_every_tier_a_policy_uses_is_in_its_topic_list(delays: tuple[int, ...]) -> None:
    policy = RetryPolicy(delays)
    topics = retry_topic_names(policy)

    assert len(set(topics)) == len(topics)
    assert {policy.next_topic(n) for n in range(1, policy.max_attempts + 1)} == set(topics)


@given(st.integers(min_value=1, max_value=10**7), st.integers(min_value=1, max_value=10**7))
def test_different_delays_get_different_tier_topics(a: int, b: int) -> None:
    assert (tier_topic_name(a) == tier_topic_name(b)) == (a == b)


def test_the_next_attempt_is_due_one_delay_after_the_failure() -> None:
    policy = RetryPolicy()

    assert policy.not_before(2, T0) == T0 + timedelta(minutes=1)
    assert policy.not_before(6, T0) is None
    with pytest.raises(ValueError, match="timezone-aware"):
        policy.not_before(1, datetime(2025, 1, 1))


def test_retry_headers_round_trip() -> None:
    not_before = datetime(2025, 3, 14, 9, 27, 3, 250_000, tzinfo=UTC)

    headers = retry_headers(3, not_before)

    assert dict(headers) == {ATTEMPT_HEADER: b"3", NOT_BEFORE_HEADER: b"1741944423250"}
    assert read_retry_headers(headers) == (3, not_before)
    assert read_retry_headers(dict(headers)) == (3, not_before)


def test_retry_headers_round_up_to_the_millisecond_so_a_record_is_never_early() -> None:
    not_before = datetime(2025, 3, 14, 9, 27, 3, 250_400, tzinfo=timezone(timedelta(hours=1)))

    _, read = read_retry_headers(retry_headers(1, not_before))

    assert read >= not_before
    assert read - not_before < timedelta(milliseconds=1)


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ([], "no 'attempt' header"),
        ([(ATTEMPT_HEADER, b"2")], "no 'not-before' header"),
        ([(ATTEMPT_HEADER, b"two"), (NOT_BEFORE_HEADER, b"1")], "not a non-negative integer"),
        ([(ATTEMPT_HEADER, b"0"), (NOT_BEFORE_HEADER, b"1")], "must be >= 1"),
        ([(ATTEMPT_HEADER, b"1"), (NOT_BEFORE_HEADER, b"-5")], "not a non-negative integer"),
        ([(ATTEMPT_HEADER, b"1"), (NOT_BEFORE_HEADER, "٣".encode())], "non-negative integer"),
        ([(ATTEMPT_HEADER, b"1"), (NOT_BEFORE_HEADER, b"9" * 18)], "out of range"),
    ],
)
def test_unusable_retry_headers_are_poison(headers: list[tuple[str, bytes]], problem: str) -> None:
    with pytest.raises(PoisonEvent, match=problem):
        read_retry_headers(headers)


def test_a_tier_consumer_waits_until_the_head_is_due_and_not_when_it_is_late() -> None:
    assert wait_seconds(T0 + timedelta(seconds=42), T0) == 42
    assert wait_seconds(T0 - timedelta(seconds=5), T0) == 0


def test_urgent_work_ranks_above_routine_and_emergencies_above_all() -> None:
    ordered = sorted(
        [Urgency.ROUTINE, Urgency.EMERGENCY, Urgency.URGENT, Urgency.ROUTINE],
        key=priority_rank,
        reverse=True,
    )

    assert ordered == [Urgency.EMERGENCY, Urgency.URGENT, Urgency.ROUTINE, Urgency.ROUTINE]
    assert priority_rank("urgent") == priority_rank(Urgency.URGENT)  # type: ignore[arg-type]


@pytest.mark.parametrize("urgency", list(Urgency))
def test_notify_ranks_priorities_exactly_as_routing_does(urgency: Urgency) -> None:
    assert priority_rank(urgency) == routing_priority_rank(urgency)

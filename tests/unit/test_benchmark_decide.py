"""bench-decide's figures: the backlog's steady rate and latencies of the named studies only."""

from __future__ import annotations

import math

from benchmarks.decide import latencies, steady_rate


def test_the_steady_rate_leaves_the_first_tenth_out() -> None:
    # 100 answers: ten slow ones (the group joining), then one every 10 ms.
    answered = {f"s{i}": i * 0.5 if i < 10 else 5.0 + (i - 10) * 0.01 for i in range(100)}
    which = list(answered)
    # From the 11th answer (5.00 s) to the last (5.89 s): 89 answers in 0.89 s.
    assert steady_rate(answered, which) == 100.0
    assert steady_rate(answered, which, warmup=0) < 20


def test_the_steady_rate_counts_only_the_studies_named() -> None:
    answered = {"a": 1.0, "b": 2.0, "c": 3.0, "late": 100.0}
    assert steady_rate(answered, ["a", "b", "c"], warmup=0) == 1.0
    assert math.isnan(steady_rate(answered, ["a"], warmup=0))


def test_latencies_are_of_the_named_studies_answered() -> None:
    sent = {"a": 1.0, "b": 1.0, "c": 1.0}
    answered = {"a": 1.1, "b": 1.3, "other": 9.0}
    figures = latencies(sent, answered, ["a", "b", "c"])
    assert figures["max_ms"] == 300.0
    assert figures["p50_ms"] == 300.0  # of two values, the upper

"""The rebuild's build steps on several sessions (``reload._run_steps``): each step runs once,
after the steps it names, on whichever session is free; a failure stops the rest."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.timeline.adapters.reload import _run_steps, _Step


class Session:
    def __init__(self, name: str) -> None:
        self.name = name


def recording(log: list[tuple[str, str, str]], name: str, seconds: float = 0.0) -> Any:
    async def run(conn: Any) -> None:
        log.append(("start", name, conn.name))
        await asyncio.sleep(seconds)
        log.append(("end", name, conn.name))

    return run


async def test_each_step_runs_once_after_the_steps_it_names() -> None:
    log: list[tuple[str, str, str]] = []
    steps = [
        _Step("a", (), recording(log, "a", 0.02)),
        _Step("b", (), recording(log, "b", 0.01)),
        _Step("c", ("a",), recording(log, "c")),
        _Step("d", ("b", "c"), recording(log, "d")),
        _Step("e", (), recording(log, "e", 0.03)),
    ]
    await _run_steps(steps, [Session("one"), Session("two")])

    starts = [name for event, name, _ in log if event == "start"]
    assert sorted(starts) == ["a", "b", "c", "d", "e"]
    ended = {name: i for i, (event, name, _) in enumerate(log) if event == "end"}
    started = {name: i for i, (event, name, _) in enumerate(log) if event == "start"}
    assert started["c"] > ended["a"]
    assert started["d"] > max(ended["b"], ended["c"])
    # Both sessions worked, and never on two steps at once.
    assert {conn for _, _, conn in log} == {"one", "two"}
    for conn in ("one", "two"):
        mine = [event for event, _, c in log if c == conn]
        assert mine == ["start", "end"] * (len(mine) // 2)


async def test_a_free_session_takes_the_first_ready_step_in_list_order() -> None:
    log: list[tuple[str, str, str]] = []
    steps = [
        _Step("slow", (), recording(log, "slow", 0.05)),
        _Step("after slow", ("slow",), recording(log, "after slow")),
        _Step("ready 1", (), recording(log, "ready 1")),
        _Step("ready 2", (), recording(log, "ready 2")),
    ]
    await _run_steps(steps, [Session("one"), Session("two")])

    starts = [name for event, name, _ in log if event == "start"]
    assert starts == ["slow", "ready 1", "ready 2", "after slow"]


async def test_a_failing_step_stops_the_others_and_is_raised() -> None:
    log: list[tuple[str, str, str]] = []

    async def fail(conn: Any) -> None:
        await asyncio.sleep(0.01)
        raise OSError("server gone")

    steps = [
        _Step("long", (), recording(log, "long", 5.0)),
        _Step("fails", (), fail),
        _Step("never", ("fails",), recording(log, "never")),
    ]
    with pytest.raises(OSError, match="server gone"):
        await asyncio.wait_for(_run_steps(steps, [Session("one"), Session("two")]), 2.0)
    assert ("end", "long", "one") not in log
    assert not [name for _, name, _ in log if name == "never"]


async def test_a_step_waiting_for_a_step_that_is_not_there_is_refused() -> None:
    log: list[tuple[str, str, str]] = []
    steps = [
        _Step("a", (), recording(log, "a")),
        _Step("b", ("no such step",), recording(log, "b")),
    ]
    with pytest.raises(RuntimeError, match="never run"):
        await asyncio.wait_for(_run_steps(steps, [Session("one"), Session("two")]), 2.0)
    assert ("start", "b", "one") not in log and ("start", "b", "two") not in log

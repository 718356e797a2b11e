"""tune_gc: the start-up heap is frozen and young collections are rarer; collector_paused: no
collection inside the block, the collector as it was after; run: uvloop unless told."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from shared.runtime import EVENT_LOOP_VARIABLE, YOUNG_THRESHOLD, collector_paused, run, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_the_heap_alive_at_start_up_is_frozen_and_young_collections_are_rarer() -> None:
    gc.unfreeze()
    alive_before = len(gc.get_objects())
    tune_gc()
    assert gc.get_freeze_count() >= alive_before // 2  # the start-up heap, not a few objects
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    assert gc.isenabled()  # cycles are still collected, only less often


def test_no_collection_runs_while_the_collector_is_paused_and_it_is_as_before_after() -> None:
    collections: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    try:
        with collector_paused():
            assert not gc.isenabled()
            # Enough container allocations for three young collections.
            held = [[] for _ in range(3 * max(gc.get_threshold()[0], 700))]
            assert collections == []
            del held
        assert gc.isenabled()
        gc.disable()
        try:
            with collector_paused():
                pass
            assert not gc.isenabled()  # left disabled, as the caller had it
        finally:
            gc.enable()
        with pytest.raises(RuntimeError), collector_paused():
            raise RuntimeError("the block failed")
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(count)


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_services_run_on_uvloop_unless_told_to_use_asyncios_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(EVENT_LOOP_VARIABLE, raising=False)
    assert run(_loop_module()).startswith("uvloop")
    monkeypatch.setenv(EVENT_LOOP_VARIABLE, "asyncio")
    assert run(_loop_module()).startswith("asyncio")
    monkeypatch.setenv(EVENT_LOOP_VARIABLE, "trio")
    with pytest.raises(ValueError, match="uvloop or asyncio"):
        run(_loop_module())

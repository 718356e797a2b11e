"""Process-wide settings every long-running beeldportaal process applies once it has started,
and the event loop it runs on.

Every service and worker runs its main coroutine with :func:`run`: on uvloop (libuv; MIT and
Apache-2.0), whose socket transports, callbacks and timers are C where asyncio's are Python.
Each worker spends much of its CPU in Kafka's network I/O, and ingest in HTTP bodies (uvicorn
then parses with httptools too). ``BEELDPORTAAL_EVENT_LOOP=asyncio`` runs the standard loop
instead, e.g. to rule uvloop out when chasing a bug.

The cyclic garbage collector is tuned for event streams: a worker decodes thousands of events a
second into pydantic models and holds a batch of them until it is applied. With CPython's
defaults (a young collection every 700 allocations, the start-up heap of pydantic, FastAPI and
aiokafka traversed by every old collection) decoding a held batch of 10-instance study events
took 2-4x as long as decoding the same events one at a time (``make bench-timeline``).

- ``gc.freeze()`` moves everything alive after start-up (modules, schemas, settings) into a
  permanent generation that collections no longer traverse;
- a young collection every 10,000 allocations instead of 700: our events are acyclic and freed
  by reference counting, so the collector rarely finds anything, and cyclic garbage (exception
  tracebacks) waits a little longer before it is freed;
- a bulk loop that allocates millions of objects it frees itself (the timeline rebuild's
  loaders) pauses the collector altogether (:func:`collector_paused`) and collects between
  chunks of its work: even at 10,000 allocations a young collection ran every ~300 events
  there and took 10 % of a loader's CPU (0.37-0.56 s of 3.1-4.1 s per loader for 25,000
  studies), and finding ~700 unreachable objects was all it did.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

YOUNG_THRESHOLD = 10_000
EVENT_LOOP_VARIABLE = "BEELDPORTAAL_EVENT_LOOP"
T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on uvloop (see above), or on asyncio's loop when
    ``BEELDPORTAAL_EVENT_LOOP`` says ``asyncio``; like :func:`asyncio.run` otherwise."""
    choice = os.environ.get(EVENT_LOOP_VARIABLE, "uvloop").strip().lower()
    if choice not in ("uvloop", "asyncio"):
        main.close()
        raise ValueError(f"{EVENT_LOOP_VARIABLE} must be uvloop or asyncio, not {choice!r}")
    if choice == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def tune_gc() -> None:
    """Freeze the start-up heap and make young collections rarer; call once, after imports."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off inside the block (see above), as it was after; the
    block calls ``gc.collect()`` between chunks of its work so that cyclic garbage stays
    bounded."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()

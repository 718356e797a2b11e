"""Running a :class:`shared.stream.Worker` inside a test: started, assigned, stopped cleanly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from shared.stream import Worker

TIMEOUT = 60.0


@asynccontextmanager
async def running(worker: Worker, timeout: float = TIMEOUT) -> AsyncIterator[Worker]:
    """The worker started, its partitions assigned and its loop running; on exit it finishes
    the batch in hand, commits and leaves the group (the SIGTERM path)."""
    async with worker:
        task = asyncio.create_task(worker.run())
        try:
            await worker.wait_assigned(timeout)
            yield worker
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, timeout)

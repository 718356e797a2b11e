"""InstanceStore: writers of one object key take turns on the event loop, never in a worker
thread, and a write that has started ends before the next writer of its key goes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import time

import pytest
from prometheus_client import CollectorRegistry
from pydicom.uid import generate_uid

from services.ingest.handlers.store import InstanceStore, Outcome, Received, Submission
from services.ingest.metrics import IngestMetrics
from shared.events import IngestChannel
from shared.identifiers import Pseudonymizer
from shared.storage import InMemoryObjectStore, ObjectInfo
from tests.dicom_samples import make_dicom_bytes

SENDER = "11111111"
SUBMISSION = Submission(SENDER, "22222222", IngestChannel.STOW_RS, "correlation")
SMALL = 4_000  # at most this many bytes: checked and stored on the loop


class _Publisher:
    def __init__(self) -> None:
        self.events: list[object] = []

    async def publish(self, event: object) -> None:
        self.events.append(event)

    async def publish_many(self, events: list[object]) -> None:
        self.events.extend(events)


def _store(objects: InMemoryObjectStore, **options: int) -> InstanceStore:
    return InstanceStore(
        objects,
        _Publisher(),  # type: ignore[arg-type]
        Pseudonymizer(b"k" * 32),
        IngestMetrics(registry=CollectorRegistry()),
        inline_threshold=SMALL,
        **options,
    )


def _instance(large: bool = False, **uids: str) -> tuple[bytes, str]:
    attrs = {
        "StudyInstanceUID": uids.get("study", generate_uid()),
        "SeriesInstanceUID": uids.get("series", generate_uid()),
        "SOPInstanceUID": uids.get("sop", generate_uid()),
    }
    if large:
        attrs["ImageComments"] = "x" * (2 * SMALL)
    data = make_dicom_bytes(**attrs)
    assert (len(data) > SMALL) is large
    return data, f"{SENDER}/{attrs['SOPInstanceUID']}.dcm"


def _received(data: bytes) -> Received:
    return Received(io.BytesIO(data), len(data), hashlib.sha256(data).hexdigest())


class _NeedsThreads(InMemoryObjectStore):
    """Large writes are slow and every small write first needs a worker thread, as the S3
    store's does for its HEAD after a refused conditional write."""

    async def aput_if_absent(self, key: str, data: bytes, *args, **kwargs):  # type: ignore[override]
        await asyncio.to_thread(self.stat, key)
        return await super().aput_if_absent(key, data, *args, **kwargs)

    def put_if_absent(self, *args, **kwargs) -> tuple[ObjectInfo, bool]:  # type: ignore[override]
        time.sleep(0.3)
        return super().put_if_absent(*args, **kwargs)


def test_a_small_write_that_needs_a_thread_is_not_stuck_behind_large_writes() -> None:
    store = _store(_NeedsThreads(), large_threshold=SMALL, large_uploads=1)
    small, small_key = _instance()
    # A large instance whose key shares the small one's turn (its stripe).
    while True:
        shares, key = _instance(large=True)
        if hash(key) % 256 == hash(small_key) % 256:
            break
    others = [_instance(large=True)[0] for _ in range(4)]

    async def scenario() -> list[Outcome]:
        # Fewer worker threads than writes waiting for them.
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=2))
        first = await store.store(_received(small), SUBMISSION)
        tasks = [asyncio.create_task(store.store(_received(others[0]), SUBMISSION))]
        await asyncio.sleep(0.05)
        tasks.append(asyncio.create_task(store.store(_received(shares), SUBMISSION)))
        tasks += [asyncio.create_task(store.store(_received(o), SUBMISSION)) for o in others[1:]]
        await asyncio.sleep(0.05)
        tasks.append(asyncio.create_task(store.store(_received(small), SUBMISSION)))
        return [first, *await asyncio.wait_for(asyncio.gather(*tasks), 20)]

    outcomes = asyncio.run(scenario())
    assert all(outcome.ok for outcome in outcomes), outcomes
    assert outcomes[-1].reason == "already received"


class _HeldWrites(InMemoryObjectStore):
    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.started: list[str] = []

    async def aput_if_absent(self, key: str, data: bytes, *args, **kwargs):  # type: ignore[override]
        self.started.append(key)
        await self.release.wait()
        return await super().aput_if_absent(key, data, *args, **kwargs)


def test_a_cancelled_write_ends_before_the_next_writer_of_its_key_goes() -> None:
    objects = _HeldWrites()
    store = _store(objects)
    data, key = _instance()

    async def scenario() -> tuple[list[str], Outcome]:
        first = asyncio.create_task(store.store(_received(data), SUBMISSION))
        while not objects.started:
            await asyncio.sleep(0.01)
        first.cancel()
        second = asyncio.create_task(store.store(_received(data), SUBMISSION))
        await asyncio.sleep(0.1)
        waiting = list(objects.started)  # the second has not begun its write
        objects.release.set()
        with pytest.raises(asyncio.CancelledError):
            await first
        return waiting, await second

    waiting, second = asyncio.run(scenario())
    assert waiting == [key]
    assert objects.exists(key)  # the cancelled request's write was let finish
    assert second.ok
    assert objects.started == [key, key]

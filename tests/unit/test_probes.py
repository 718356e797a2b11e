"""The probe server of stream workers: health from the event loop, readiness from the worker."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from shared.probes import ProbeServer


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def _probe(port: int, path: str) -> tuple[int, bytes]:
    return await asyncio.to_thread(_get, port, path)


async def test_readiness_follows_the_worker_and_metrics_come_from_its_registry() -> None:
    registry = CollectorRegistry()
    Counter("probe_test_events", "test counter", registry=registry).inc(3)
    ready = False
    async with ProbeServer(0, registry, ready=lambda: ready) as probes:
        assert await _probe(probes.port, "/healthz") == (200, b"ok\n")
        assert (await _probe(probes.port, "/readyz"))[0] == 503
        ready = True
        assert await _probe(probes.port, "/readyz") == (200, b"ready\n")
        status, body = await _probe(probes.port, "/metrics")
        assert status == 200 and b"probe_test_events_total 3.0" in body
        assert (await _probe(probes.port, "/nothing"))[0] == 404


async def test_a_stalled_event_loop_is_reported_unhealthy_and_not_ready() -> None:
    async with ProbeServer(
        0, CollectorRegistry(), ready=lambda: True, stall_after=0.3, beat_every=60
    ) as probes:
        await asyncio.sleep(0)  # let the heartbeat run once
        time.sleep(0.5)  # block the loop: the heartbeat cannot beat
        assert (await _probe(probes.port, "/healthz")) == (503, b"event loop stalled\n")
        assert (await _probe(probes.port, "/readyz"))[0] == 503

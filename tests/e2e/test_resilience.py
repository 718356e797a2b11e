"""Nothing is lost or doubled when a process dies: kill -9 each service in turn, or restart the
Kafka broker, during a stream of 200 studies; every study still reaches the receiving PACS, with
exactly one ``delivered`` event per (study version, destination), and enters the timeline.

One private platform (real CLI, own state directory and ports), every process of
``deploy.local.services.specs()`` on free ports, a real Orthanc as the receiving hospital,
patients with an explicit Mitz consent and a treatment relationship with the receiver, so each
study must appear on their timeline. The hospital client resends a STOW-RS request that failed
(ingest down, broker down), as a PACS does. A service that exits on its own is restarted, as a
supervisor would, so the rest of the run still says what was lost, and fails the test: neither
another service's death nor a broker restart is a reason for a service to exit. Module-scoped:
both tests share the set-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deploy.local.demo import mitz_bundle
from deploy.local.orthanc import OrthancPeer
from services.consent.entrypoints.http import FHIR_JSON
from shared.identifiers import parse_bsn
from tests.e2e.resilience_harness import (
    Outcome,
    PrivatePlatform,
    Services,
    Stream,
    Study,
    announced_versions,
    converge,
    fhir_timeline,
    kafka_log_digest,
    log,
    make_studies,
    observe,
    post_json,
    valid_test_bsns,
)

pytestmark = pytest.mark.e2e

RECIPIENT = "00000931"  # the receiving hospital (Orthanc), in the directory
SENDER = "00000932"  # the sending hospital, allowed by the peers file
ENDPOINT_ID = "resilience-orthanc"
MITZ = "00000001"  # the consent authority
UZI = "900000001"
STUDIES = 200
PATIENTS = 10
# One study every so many seconds: while killing, the stream lasts about as long as ten
# kill-restart cycles (about 9 s each on 2 CPUs).
KILL_INTERVAL = 0.45
BROKER_INTERVAL = 0.3
# How long the broker stays stopped: longer than the producers' request timeout (30 s, so
# batches waiting in the clients expire), as a broker restart with log recovery easily takes.
BROKER_PAUSE = 35.0
# After the last study was queued: until ingest accepted every one (resends included).
STREAM_TIMEOUT = 150.0
CONVERGE_TIMEOUT = 150.0
# After everything arrived: long enough for a delivery retried after the first delay (10 s).
SETTLE = 15.0
# The order services are killed in: down the pipeline, then the APIs.
KILL_ORDER = (
    "ingest",
    "ingest-assembly",
    "consent-decisions",
    "routing-worker",
    "notify-worker",
    "timeline-projection",
    "consent",
    "routing",
    "notify",
    "timeline",
)


@dataclass
class Pipeline:
    platform: PrivatePlatform
    services: Services
    orthanc: OrthancPeer
    bsns: list[str]
    sender_token: str
    reader_token: str
    timings: dict[str, float] = field(default_factory=dict)
    streams: list[Stream] = field(default_factory=list)

    @property
    def stow_base(self) -> str:
        return f"{self.services.url('INGEST_HTTP_PORT')}/dicomweb/to/{RECIPIENT}/studies"

    def stream(self, studies: list[Study], interval: float) -> Stream:
        stream = Stream(self.stow_base, self.sender_token, studies, interval=interval)
        self.streams.append(stream)
        return stream.start()

    def freeze_receiver(self, seconds: float) -> Callable[[], None]:
        """Stop the receiving Orthanc (SIGSTOP) for ``seconds``; returns what continues it."""
        pid = self.orthanc.pid
        assert pid is not None, "the receiving Orthanc is not running"
        os.kill(pid, signal.SIGSTOP)
        time.sleep(seconds)
        return lambda: os.kill(pid, signal.SIGCONT)

    def close_streams(self) -> None:
        for stream in self.streams:
            stream.close()

    def observe(self, studies: list[Study]) -> Outcome:
        env = self.platform.client_env
        return observe(
            studies,
            peer=self.orthanc,
            bootstrap=env["BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS"],
            dsn=env["BEELDPORTAAL_POSTGRES_DSN"],
            endpoint=(RECIPIENT, ENDPOINT_ID),
        )

    def off_the_fhir_timeline(self, studies: list[Study]) -> list[str]:
        """Studies the timeline API does not show the receiving hospital (one search a patient)."""
        base = self.services.url("TIMELINE_HTTP_PORT")
        shown = set()
        for bsn in sorted({s.bsn for s in studies}):
            shown |= fhir_timeline(base, self.reader_token, bsn)
        return [s.uid for s in studies if s.uid not in shown]


def _seed_directory(platform: PrivatePlatform, orthanc: OrthancPeer, path: Path) -> None:
    provider = {
        "ura": RECIPIENT,
        "name": "Ziekenhuis Veerkracht (resilience test)",
        "type_code": "V4",
        "city": "Loopback",
        "endpoints": [
            {
                "channel": "dicomweb",
                "id": ENDPOINT_ID,
                "base_url": orthanc.dicomweb_url,
                "auth": {"type": "none"},
            }
        ],
        "preferences": {
            "coercion": {"profile": "none"},
            "batch_limits": {"max_instances": 10, "max_bytes": 10 * 1024 * 1024},
        },
    }
    path.write_text(json.dumps({"providers": [provider]}, indent=2))  # JSON is YAML
    platform.cli("routing", "seed", "--file", str(path), env=platform.client_env)


def _register_consents(pipeline: Pipeline) -> None:
    consent = pipeline.services.url("CONSENT_HTTP_PORT")
    provider = pipeline.platform.token(RECIPIENT, "provider")
    authority = pipeline.platform.token(MITZ, "consent-authority")
    for n, bsn in enumerate(pipeline.bsns):
        relationship = {
            "bsn": bsn,
            "organisation_ura": RECIPIENT,
            "start": "2025-01-01",
            "source": "referral",
        }
        assert post_json(f"{consent}/treatment-relationships", relationship, provider) == 201
        bundle = mitz_bundle(parse_bsn(bsn), RECIPIENT, f"resilience-consent-{n}")
        assert post_json(f"{consent}/mitz/notifications", bundle, authority, FHIR_JSON) in (
            201,
            202,
        )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    root = tmp_path_factory.mktemp("resilience")
    timings: dict[str, float] = {}
    began = time.monotonic()
    platform = PrivatePlatform(root)
    with contextlib.ExitStack() as stack:
        stack.callback(platform.purge)
        platform.up()
        timings["platform_up_s"] = round(time.monotonic() - began, 1)
        orthanc = stack.enter_context(
            OrthancPeer.running(root / "orthanc", aet="VEERKRACHT", name="resilience-receiver")
        )
        _seed_directory(platform, orthanc, root / "directory.yaml")
        peers = root / "peers.json"
        peers.write_text(
            json.dumps(
                {
                    "organisations": [
                        {"ura": SENDER, "name": "Ziekenhuis Zender (resilience test)"},
                        {"ura": RECIPIENT, "name": "Ziekenhuis Veerkracht (resilience test)"},
                    ]
                }
            )
        )
        (root / "services").mkdir()
        services = Services(
            platform.config,
            platform.client_env,
            root / "services",
            peers_file=peers,
            extra_env={},  # every other setting as `make up` runs them
        )
        stack.callback(services.stop_all)
        started = time.monotonic()
        services.start_all()
        timings["services_up_s"] = round(time.monotonic() - started, 1)
        running = Pipeline(
            platform,
            services,
            orthanc,
            valid_test_bsns(PATIENTS),
            sender_token=platform.token(SENDER, "provider"),
            # The timeline shows a named person's treatment access only.
            reader_token=platform.token(RECIPIENT, "provider", uzi=UZI, purpose="TREAT"),
            timings=timings,
        )
        stack.callback(running.close_streams)
        _register_consents(running)
        timings["setup_s"] = round(time.monotonic() - began, 1)
        log(f"set up: {timings}")
        yield running


def _diagnosis(pipeline: Pipeline, studies: list[Study], stream: Stream) -> str:
    refused = [(s.uid, s.attempts, s.errors[-3:]) for s in studies if s.accepted_at is None]
    kafka_log = pipeline.platform.state / "kafka" / "kafka.log"
    return (
        f"stream: {stream.queued} of {len(studies)} queued, {stream.accepted} accepted by ingest;"
        f" not accepted ({len(refused)}, first 10: uid, attempts, last errors): {refused[:10]}\n"
        f"unexpected exits: {pipeline.services.unexpected_exits}\n"
        f"---- kafka broker ({kafka_log}) ----\n{kafka_log_digest(kafka_log)}\n"
        f"{pipeline.services.diagnosis()}"
    )


def _assert_every_study_arrived_once(
    pipeline: Pipeline, studies: list[Study], stream: Stream
) -> dict[str, object]:
    if not stream.join(timeout=STREAM_TIMEOUT) or stream.accepted != len(studies):
        outcome = pipeline.observe(studies)
        pytest.fail(
            f"ingest did not accept every study, even with resends, within {STREAM_TIMEOUT:.0f}s"
            f" after the disruption\n{outcome.summary()}\n{_diagnosis(pipeline, studies, stream)}",
            pytrace=False,
        )
    outcome, took = converge(lambda: pipeline.observe(studies), CONVERGE_TIMEOUT, SETTLE)
    log(f"after {took:.0f}s: {outcome.summary()}")
    verdict = f"{outcome.summary()}\n{_diagnosis(pipeline, studies, stream)}"
    assert outcome.complete, f"not every study arrived within {CONVERGE_TIMEOUT:.0f}s:\n{verdict}"
    assert not outcome.doubled, f"more than one delivered event:\n{verdict}"
    assert not outcome.failed_outcomes, verdict
    # Every study version delivered to the one endpoint, and only the studies sent.
    assert {k[0] for k in outcome.delivered} == {s.uid for s in studies}, verdict
    off = pipeline.off_the_fhir_timeline(studies)
    assert not off, f"not in the FHIR timeline search: {off[:20]}\n{verdict}"
    # Not failures, but worth seeing: a study announced in more than one version (e.g. a request
    # cut off by a killed ingest, its rest stored by the resend after the study went stable),
    # and deliveries that found instances already present (a repeated send after a crash).
    later = {k[0] for k in outcome.delivered if k[1] > 1}
    announced = announced_versions(pipeline.platform.bootstrap, later) if later else {}
    by_uid = {s.uid: s for s in studies}
    return {
        "stream_s": round((stream.finished_at or 0) - stream.started_at, 1),
        "converged_after_stream_s": round(took, 1),
        "stow_resends": sum(s.attempts - 1 for s in studies),
        "delivered_versions": dict(outcome.versions()),
        "more_than_one_version": {
            uid: {
                "announced (version, new, all)": announced.get(uid),
                "stow attempts": by_uid[uid].attempts,
                "stow errors": by_uid[uid].errors,
            }
            for uid in later
        },
        "retried or already present (study, version, attempts, present)": outcome.resent(),
        "unexpected_exits": pipeline.services.unexpected_exits,
    }


def _assert_no_service_exited_on_its_own(pipeline: Pipeline, before: int) -> None:
    exits = pipeline.services.unexpected_exits[before:]
    assert not exits, f"services exited on their own (restarted by the test): {exits}"


def test_killing_each_service_in_turn_loses_and_doubles_no_delivery(pipeline: Pipeline) -> None:
    began = time.monotonic()
    exits_before = len(pipeline.services.unexpected_exits)
    studies = make_studies(STUDIES, pipeline.bsns, "kill")
    stream = pipeline.stream(studies, KILL_INTERVAL)
    kills = {}
    for n, name in enumerate(KILL_ORDER, start=1):
        stream.wait_queued(STUDIES * n // (len(KILL_ORDER) + 2))
        at = (stream.queued, stream.accepted)
        thaw = None
        if name == "notify-worker":
            # Catch it mid-delivery: the receiver stops answering (SIGSTOP), deliveries pile up
            # in flight, then notify dies; the receiver goes on once it is dead (SIGCONT).
            thaw = pipeline.freeze_receiver(seconds=3.0)
        try:
            took = pipeline.services.kill_and_restart(name, pause=1.0, after_kill=thaw)
        finally:
            if thaw is not None:
                thaw()  # again, in case the kill failed (continuing twice is harmless)
        kills[name] = {"at_queued_accepted": at, "ready_again_s": round(took, 1)}
    stats = _assert_every_study_arrived_once(pipeline, studies, stream)
    assert pipeline.services.all_ready() == []
    log(f"kill -9 run: {stats}, kills {kills}, took {time.monotonic() - began:.0f}s")
    _assert_no_service_exited_on_its_own(pipeline, exits_before)


def test_restarting_the_kafka_broker_loses_and_doubles_no_delivery(pipeline: Pipeline) -> None:
    began = time.monotonic()
    exits_before = len(pipeline.services.unexpected_exits)
    studies = make_studies(STUDIES, pipeline.bsns, "broker")
    stream = pipeline.stream(studies, BROKER_INTERVAL)
    stream.wait_queued(STUDIES // 3)
    log(f"stopping the broker at {stream.queued} queued, {stream.accepted} accepted")
    stop_s, start_s = pipeline.platform.restart_broker(pause=BROKER_PAUSE)
    log(f"broker stopped in {stop_s:.1f}s, back after {BROKER_PAUSE:.0f}s pause + {start_s:.1f}s")
    stats = _assert_every_study_arrived_once(pipeline, studies, stream)
    ready = time.monotonic() + 120
    while pipeline.services.all_ready() and time.monotonic() < ready:
        time.sleep(1)
    assert pipeline.services.all_ready() == []
    log(f"broker restart run: {stats}, took {time.monotonic() - began:.0f}s")
    _assert_no_service_exited_on_its_own(pipeline, exits_before)

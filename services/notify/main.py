"""Process entry points of notify: ``serve`` (the status, dead-letter and pickup API),
``deliver`` (the delivery worker), and the operator's CLI: ``dead_letters`` and
``study_status``."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

from services.notify.api_config import NotifyApiSettings
from services.notify.config import NotifySettings
from shared import runtime
from shared.http import http_server
from shared.logging import configure_logging, get_logger

if TYPE_CHECKING:
    from services.notify.adapters.journey_view import JourneyTopics
    from services.notify.entrypoints.http import StudyStatus

log = get_logger(__name__)


# --- serve: the notify API ------------------------------------------------------------------------


async def _serve(settings: NotifyApiSettings) -> None:
    from services.notify.bootstrap import build
    from services.notify.entrypoints.http import create_app

    server = http_server(create_app(build(settings)), settings.http_host, settings.http_port)
    log.info("notify API starting", url=f"http://{settings.http_host}:{settings.http_port}")
    await server.serve()


def serve(settings: NotifyApiSettings | None = None) -> int:
    """Run the notify API until SIGTERM/SIGINT (``beeldportaal notify serve``)."""
    settings = settings or NotifyApiSettings()  # type: ignore[call-arg]
    configure_logging(settings.service_name, settings.log_level, settings.log_json)
    runtime.run(_serve(settings))
    return 0


# --- deliver: the worker --------------------------------------------------------------------------


def deliver(settings: NotifySettings | None = None) -> int:
    """Run the delivery worker until SIGTERM (``beeldportaal notify deliver``)."""
    from services.notify.entrypoints.worker import main

    main(settings or NotifySettings())
    return 0


# --- dead letters: list and re-drive --------------------------------------------------------------


async def _dead_letters(settings: NotifySettings, action: str, key: str | None) -> int:
    from services.notify.adapters.dead_letters import DeadLetters

    letters = DeadLetters(settings.kafka, name="notify-cli-dead-letters")
    await letters.start()
    try:
        await letters.sync(60)
        if action == "list":
            found = letters.list()
            for letter in found:
                print(
                    f"{letter.key}\t{letter.destination_ura}\t{letter.priority}\t"
                    f"attempts={letter.attempts}\tdead since {letter.dead_since:%Y-%m-%d %H:%M}\t"
                    f"{letter.last_failure or ''}"
                )
            print(f"{len(found)} dead letter(s)", file=sys.stderr)
            return 0
        if key is not None:
            done = await letters.redrive(key, timeout=60)
            if done is None:
                print(f"no dead letter under {key}", file=sys.stderr)
                return 1
            print(f"re-driven onto {done.queue}: {done.key}")
            return 0
        total = len(letters)
        print(f"re-driving {total} dead letter(s) ...", file=sys.stderr)
        redriven = await letters.redrive_all(timeout=60)
        for done in redriven:
            print(f"re-driven onto {done.queue}: {done.key}")
        print(f"{len(redriven)} of {total} re-driven", file=sys.stderr)
        return 0
    finally:
        await letters.stop()


def dead_letters(
    action: str, key: str | None = None, settings: NotifySettings | None = None
) -> int:
    """``beeldportaal dead-letters list`` / ``redrive KEY`` / ``redrive --all``."""
    settings = settings or NotifySettings()
    configure_logging("notify-cli", "WARNING", settings.log_json)
    return asyncio.run(_dead_letters(settings, action, key))


# --- study status: one study's journey, for operators -----------------------------------------


def describe(status: StudyStatus) -> list[str]:
    """A study's journey as lines an operator reads: one block per version, hop by hop."""
    lines = [f"study {status.study_instance_uid}" + ("" if status.fresh else "  (view behind)")]
    for v in status.versions:
        lines.append(
            f"  version {v.version}: {v.state}  (from {v.sender_ura or '?'} to "
            f"{v.recipient_ura or '?'}, {v.instances if v.instances is not None else '?'} "
            "instances)"
        )
        if v.first_received_at is not None:
            lines.append(
                f"    received     {v.first_received_at:%Y-%m-%d %H:%M:%S} .. "
                f"{v.last_received_at or v.first_received_at:%H:%M:%S}, announced "
                + (f"{v.announced_at:%H:%M:%S}" if v.announced_at else "not yet")
            )
        if v.consent is not None:
            flag = ", flagged" if v.consent.flagged else ""
            lines.append(f"    consent      {v.consent.decision} ({v.consent.basis}{flag})")
        for route in v.routes:
            lines.append(
                f"    routed       {route.destination_ura} {route.endpoint_id} "
                f"({route.channel}, {route.priority or 'routine'})"
            )
        if v.route_failure is not None:
            lines.append(
                f"    not routed   {v.route_failure.reason_code or ''} {v.route_failure.reason}"
            )
        for d in v.deliveries:
            line = f"    {d.state:12} {d.destination_ura} {d.endpoint_id} ({d.channel})"
            if d.delivered_at is not None:
                line += f" at {d.delivered_at:%Y-%m-%d %H:%M:%S}"
            if d.attempts:
                line += f", {d.attempts} attempt(s)"
            if d.outcomes is not None:
                o = d.outcomes
                line += f", {o.sent} sent, {o.already_present} already there"
                line += f", {o.failed} refused" if o.failed else ""
            if d.last_failure is not None:
                line += f"; last failure: {d.last_failure.reason}"
            lines.append(line)
    return lines


async def _study_status(
    settings: NotifySettings, uid: str, as_json: bool, topics: JourneyTopics | None = None
) -> int:
    from services.notify.adapters.journey_view import JourneyView
    from services.notify.entrypoints.http import StudyStatus, version_status

    view = JourneyView(settings.kafka, topics, name="notify-cli-study-status")
    await view.start()
    try:
        print("reading the journey topics ...", file=sys.stderr)
        try:
            await view.sync(120)
            fresh = True
        except TimeoutError:
            fresh = False  # show what was read, marked as behind
        study = view.get(uid)
        if study is None or not study.versions:
            print(f"no study {uid} on the event stream", file=sys.stderr)
            return 1
        status = StudyStatus(
            study_instance_uid=uid,
            fresh=fresh,
            versions=[version_status(v) for v in study.all_versions()],
        )
    finally:
        await view.stop()
    if as_json:
        print(status.model_dump_json(indent=2))
    else:
        print("\n".join(describe(status)))
    return 0


def study_status(uid: str, as_json: bool = False, settings: NotifySettings | None = None) -> int:
    """``beeldportaal study status UID``: every version of one study, whoever sent it."""
    settings = settings or NotifySettings()
    configure_logging("notify-cli", "WARNING", settings.log_json)
    return asyncio.run(_study_status(settings, uid, as_json))

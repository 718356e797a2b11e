"""Process entry points of notify: ``serve`` (the status, dead-letter and pickup API),
``deliver`` (the delivery worker) and ``dead_letters`` (the operator's CLI)."""

from __future__ import annotations

import asyncio
import sys

from services.notify.api_config import NotifyApiSettings
from services.notify.config import NotifySettings
from shared.http import http_server
from shared.logging import configure_logging, get_logger

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
    asyncio.run(_serve(settings))
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

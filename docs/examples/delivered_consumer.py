"""A downstream subscriber of ``delivered``: print one line per study version that arrived.

    python docs/examples/delivered_consumer.py --bootstrap 127.0.0.1:19092 --group my-system

Deliberately independent of beeldportaal's code: what a hospital's integration engine would
write. It relies only on the published contract (docs/events.md): JSON values, the schema name
in the ``schema`` header, and transactions — hence ``isolation_level="read_committed"``.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiokafka import AIOKafkaConsumer

ACCEPTED = "delivered.v1"


async def consume(bootstrap: str, group: str, topic: str, limit: int | None) -> None:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        isolation_level="read_committed",  # never see an attempt that did not commit
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen: set[str] = set()
    try:
        async for record in consumer:
            headers = {key: value.decode() for key, value in record.headers}
            if headers.get("schema") != ACCEPTED:
                continue  # a newer major version: upgrade before reading it
            event = json.loads(record.value)
            if event["event_id"] in seen:  # at-least-once: the id makes a repeat harmless
                continue
            seen.add(event["event_id"])
            outcomes = event["outcomes"]
            print(
                f"{event['delivered_at']} study {event['study_instance_uid']} "
                # Versions are numbered per sender and recipient (sender null before 2026-11-27).
                f"v{event['study_version']} from {event.get('sender_ura') or '?'} "
                f"-> {event['destination_ura']}/{event['endpoint_id']} "
                f"({event['channel']}): {outcomes['sent']} sent, {outcomes['failed']} failed",
                flush=True,
            )
            await consumer.commit()
            if limit is not None and len(seen) >= limit:
                return
    finally:
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:19092")
    parser.add_argument("--group", default="example-delivered-consumer")
    parser.add_argument("--topic", default="delivered")
    parser.add_argument("--limit", type=int, help="stop after this many distinct events")
    args = parser.parse_args()
    asyncio.run(consume(args.bootstrap, args.group, args.topic, args.limit))


if __name__ == "__main__":
    main()

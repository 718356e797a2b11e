"""Which kind of provider each organisation is: the one fact consent needs from the directory.

A delivery is decided for its recipient's Mitz provider category, which follows from the
recipient's provider type in the routing service's directory. The directory is the compacted
``provider-directory`` topic (key URA, value the provider's JSON record, None when removed);
this view reads only ``type_code`` from each record and keeps nothing else (the records also
hold endpoint credentials, which consent has no business keeping in memory).
"""

from __future__ import annotations

import json
from typing import Any

from shared.errors import PoisonEvent
from shared.settings import KafkaSettings
from shared.topic_view import TopicView

DIRECTORY_TOPIC = "provider-directory"


class ProviderTypes:
    def __init__(self, kafka: KafkaSettings, *, topic: str = DIRECTORY_TOPIC) -> None:
        self._types: dict[str, str] = {}
        self.view = TopicView(kafka, [topic], self._apply, name="consent-provider-types")

    def type_code(self, ura: str) -> str | None:
        return self._types.get(ura)

    def __len__(self) -> int:
        return len(self._types)

    def _apply(self, record: Any) -> None:
        if record.key is None:
            raise PoisonEvent("directory record without a key (URA)")
        ura = record.key.decode(errors="replace")
        if record.value is None:
            self._types.pop(ura, None)
            return
        try:
            type_code = json.loads(record.value)["type_code"]
        except (ValueError, KeyError, TypeError) as exc:
            # Never the value in the reason: directory records hold credentials.
            raise PoisonEvent(
                f"directory record is not a provider ({type(exc).__name__})"
            ) from None
        if not isinstance(type_code, str):
            raise PoisonEvent("directory record has no type_code string")
        self._types[ura] = type_code

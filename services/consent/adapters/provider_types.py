"""Which kind of provider each organisation is: the one fact consent needs from the directory.

A delivery is decided for its recipient's Mitz provider category, which follows from the
recipient's provider type in the routing service's directory. The directory is the compacted
``provider-directory`` topic (key URA, value the provider's JSON record, None when removed);
this view keeps only ``type_code`` of each record (the records also hold endpoint credentials,
which consent has no business keeping in memory). It reads a record as routing does
(``directory_view.read_record``): one routing skips as invalid (not a provider, keyed by no URA
or by another one) is skipped here too, keeping the URA's type, so that consent never decides
on a provider category the directory does not hold.
"""

from __future__ import annotations

from typing import Any

from services.routing.adapters.directory_view import read_record
from shared.settings import KafkaSettings
from shared.topic_view import TopicView

DIRECTORY_TOPIC = "provider-directory"


class ProviderTypes:
    def __init__(self, kafka: KafkaSettings, *, topic: str = DIRECTORY_TOPIC) -> None:
        self._types: dict[str, str] = {}
        self.view = TopicView(kafka, [topic], self.apply_record, name="consent-provider-types")

    def type_code(self, ura: str) -> str | None:
        return self._types.get(ura)

    def __len__(self) -> int:
        return len(self._types)

    def apply_record(self, record: Any) -> None:
        """Raises PoisonEvent for a record that is no provider: the view skips it."""
        ura, provider = read_record(record.key, record.value)
        if provider is None:
            self._types.pop(ura, None)
        else:
            self._types[ura] = provider.type_code

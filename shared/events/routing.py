"""Events of routing: where a permitted study must go, or why it cannot go anywhere."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from shared.events.base import Event, Model, event
from shared.events.common import DeliveryChannel, DicomUid, StudySnapshot, Urgency
from shared.events.consent import Basis
from shared.identifiers import Ura


class Destination(Model):
    """A delivery endpoint from the provider directory; credentials stay in the directory."""

    organisation_ura: Ura
    endpoint_id: str = Field(min_length=1, max_length=128)
    channel: DeliveryChannel
    mailbox: str | None = Field(default=None, max_length=128)


@event
class RouteResolved(Event):
    """Emitted by routing for each destination a consent-permitted study version must reach."""

    schema_name: ClassVar[str] = "route.resolved.v1"
    topic: ClassVar[str] = "route-resolved"

    study: StudySnapshot
    destination: Destination
    priority: Urgency
    consent_basis: Basis
    flagged: bool = False

    def partition_key(self) -> str:
        return self.study.study_instance_uid


@event
class RouteFailed(Event):
    """Emitted by routing when a study cannot go anywhere: consent denied delivery, the recipient is
    unknown, or it has no usable endpoint. The sender is told why."""

    schema_name: ClassVar[str] = "route.failed.v1"
    topic: ClassVar[str] = "route-failed"

    study_instance_uid: DicomUid
    study_version: int = Field(ge=1)
    recipient_ura: Ura
    reason: str = Field(min_length=1, max_length=512)

    def partition_key(self) -> str:
        return self.study_instance_uid

"""Wires the timeline API from its settings: reader, access guard, audit trail, S3, auth, metrics.

No client connects here: the consent views, the audit producer and (if it has a lifecycle) the
reader start in the app's lifespan; /readyz says when the views hold their topics' history and
PostgreSQL answers.

``build(settings, reader=...)`` takes the read model (``TimelineReader``: the PostgreSQL
projection, as ``main`` builds it); everything else defaults to the real adapter and can be
replaced:

- ``guard``: :class:`ConsentAccessGuard` on a ``RegistryView`` of the registry topics and the
  ``ProviderTypes`` of the provider directory (``registry_topics``/``directory_topic`` rename
  those topics, for tests);
- ``audit``: :class:`PostgresAuditTrail` on ``settings.postgres`` and a ``KafkaEventPublisher``
  (acks=all) sending to ``audit_topic``;
- a reader with ``start``/``stop`` is started and stopped with the app, and one with ``ready()``
  joins /readyz (``PostgresTimeline`` has both);
- ``objects``: the S3 bucket of ``settings.s3``, read only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from services.consent.adapters.provider_types import DIRECTORY_TOPIC, ProviderTypes
from services.consent.adapters.registry_view import RegistryTopics, RegistryView
from services.timeline.adapters.audit import PRODUCER, PostgresAuditTrail
from services.timeline.config import TimelineSettings
from services.timeline.domain.access import ConsentAccessGuard
from services.timeline.domain.fhir import PageCursors
from services.timeline.domain.ports import AccessGuard, AuditTrail, TimelineReader
from services.timeline.metrics import TimelineMetrics
from shared.auth import AuthSettings, TokenVerifier, bearer_principal
from shared.events import AccessLogged
from shared.identifiers import Pseudonymizer
from shared.kafka import KafkaEventPublisher
from shared.settings import PrivacySettings
from shared.storage.port import ObjectStore
from shared.storage.s3 import S3ObjectStore

Check = Callable[[], Awaitable[bool]]


@runtime_checkable
class Lifecycle(Protocol):
    """Something the app starts before serving and stops after (views, producers, pools)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class _View(Protocol):
    @property
    def is_caught_up(self) -> bool: ...

    @property
    def failed(self) -> bool: ...

    def lag(self) -> int: ...


def utcnow() -> datetime:
    return datetime.now(UTC)


def _view_check(view: _View) -> Check:
    async def check() -> bool:
        return view.is_caught_up and not view.failed

    return check


@dataclass
class TimelineApi:
    """Everything the HTTP entrypoint needs, built once per process."""

    settings: TimelineSettings
    reader: TimelineReader
    guard: AccessGuard
    audit: AuditTrail
    objects: ObjectStore
    pseudonymizer: Pseudonymizer
    cursors: PageCursors
    metrics: TimelineMetrics
    principal_dependency: Callable[..., Any]
    # Started in this order before serving, stopped in reverse after.
    components: Sequence[Lifecycle] = ()
    checks: Mapping[str, Check] = field(default_factory=dict)
    clock: Callable[[], datetime] = utcnow

    @property
    def base_url(self) -> str:
        return self.settings.public_base_url.rstrip("/")

    @asynccontextmanager
    async def lifespan(self, _app: object = None) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for component in self.components:
                await component.start()
                stack.push_async_callback(component.stop)
            yield

    async def readiness(self) -> dict[str, bool]:
        results: dict[str, bool] = {}
        for name, check in self.checks.items():
            try:
                results[name] = await check()
            except Exception:  # a readiness probe answers, it does not raise
                results[name] = False
        return results


def build(
    settings: TimelineSettings,
    *,
    reader: TimelineReader,
    privacy: PrivacySettings | None = None,
    auth: AuthSettings | None = None,
    verifier: TokenVerifier | None = None,
    guard: AccessGuard | None = None,
    audit: AuditTrail | None = None,
    objects: ObjectStore | None = None,
    registry_topics: RegistryTopics | None = None,
    directory_topic: str = DIRECTORY_TOPIC,
    audit_topic: str = AccessLogged.topic,
    metrics: TimelineMetrics | None = None,
    clock: Callable[[], datetime] | None = None,
) -> TimelineApi:
    privacy = privacy or PrivacySettings()  # type: ignore[call-arg]
    secret = privacy.pseudonym_key.get_secret_value().encode()
    if verifier is None:
        verifier = (auth or AuthSettings()).build_verifier()  # type: ignore[call-arg]
    metrics = metrics or TimelineMetrics()
    components: list[Lifecycle] = []
    checks: dict[str, Check] = {}

    if audit is None:
        audit = PostgresAuditTrail(
            settings.postgres.conninfo,
            # No linger: each record waits for its own acknowledgement before the answer.
            KafkaEventPublisher(settings.kafka, PRODUCER, linger_ms=0),
            topic=audit_topic,
            pool_size=settings.pool_size,
            timeout=settings.view_sync_timeout_seconds,
        )
    # The audit producer first: nothing may be served that could not be audited.
    if isinstance(audit, Lifecycle):
        components.append(audit)
    audit_ready = getattr(audit, "ready", None)
    if audit_ready is not None:
        checks["postgres"] = audit_ready

    if guard is None:
        registry = RegistryView(settings.kafka, registry_topics, name="timeline-consent-registry")
        providers = ProviderTypes(settings.kafka, topic=directory_topic)
        guard = ConsentAccessGuard(
            registry,
            providers,
            settings.data_category,
            settings.provider_categories,
            sync_timeout=settings.view_sync_timeout_seconds,
        )
        components.extend([registry, providers.view])
        metrics.watch_view("consent-registry", registry)
        metrics.watch_view("provider-directory", providers.view)
        checks["consent_registry_view"] = _view_check(registry)
        checks["provider_directory_view"] = _view_check(providers.view)

    if isinstance(reader, Lifecycle):
        components.append(reader)
    reader_ready = getattr(reader, "ready", None)
    if reader_ready is not None:
        checks["read_model"] = reader_ready

    return TimelineApi(
        settings=settings,
        reader=reader,
        guard=guard,
        audit=audit,
        # Read only: the API never writes objects, nor creates the bucket.
        objects=objects or S3ObjectStore.from_settings(settings.s3),
        pseudonymizer=Pseudonymizer(secret),
        cursors=PageCursors(secret),
        metrics=metrics,
        principal_dependency=bearer_principal(verifier),
        components=tuple(components),
        checks=checks,
        clock=clock or utcnow,
    )

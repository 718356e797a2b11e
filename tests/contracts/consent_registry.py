"""The consent registry contract: what the consent API relies on from its publisher and its
registry view together, as one suite subclassed per backend, so the fakes its unit tests use
cannot drift from RegistryView and KafkaEventPublisher on Kafka.

The API (``services/consent/bootstrap.py``) writes by sending a registry event to the view's
topic for it and, once Kafka acknowledged it, waiting for the view to apply exactly that record
(``wait_for_offset`` with the acknowledgement's topic, partition and offset): read-your-writes.
It reads by syncing the view with the topics and looking the patient up. It serves nothing until
the view ``is_caught_up`` and exports ``lag``, ``patients``, ``applied`` and ``skipped`` as
metrics. Those are the behaviours below. The fakes' failure switches (a broker down or hanging,
a view that never shows a write) stand in for failures and are no part of the contract.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from services.consent.bootstrap import Publisher, RegistryReader
from services.consent.domain.registry import (
    Consent,
    ConsentStatus,
    PatientRegistry,
    RegistryEvent,
)
from shared.events import Event
from tests.factories import (
    make_consent_checked,
    make_consent_registered,
    make_consent_revoked,
    make_pseudonym,
    make_treatment_relationship_ended,
    make_treatment_relationship_registered,
)

# Generous for a broker loaded by other suites; the fakes never wait.
TIMEOUT = 15.0
# How long a wait that cannot succeed is given before it must have timed out.
SHORT_TIMEOUT = 0.5


@dataclass(frozen=True)
class RegistryBackend:
    """A started publisher and view over registry topics no other test writes to, and a topic
    of the same broker that the view does not read; ``another_view`` makes a view, not started,
    over the same topics (a second API replica, or this one restarted)."""

    publisher: Publisher
    view: RegistryReader
    stray_topic: str
    another_view: Callable[[], RegistryReader]


class ConsentRegistryContract:
    """Subclass as ``Test...`` and override the ``backend`` fixture with one whose topics are
    empty at the start of every test."""

    @pytest.fixture
    def backend(self) -> RegistryBackend:
        raise NotImplementedError("a backend overrides the backend fixture")

    @staticmethod
    async def send(backend: RegistryBackend, event: Event, topic: str) -> Any:
        """Send ``event`` to ``topic`` and return Kafka's acknowledgement: where it was stored."""
        async with asyncio.timeout(TIMEOUT):
            return await (await backend.publisher.send(event, topic))

    async def publish(self, backend: RegistryBackend, event: RegistryEvent) -> Any:
        """Send ``event`` to the view's topic for it, as the API does."""
        return await self.send(backend, event, backend.view.topics.for_event(event))

    async def record(self, backend: RegistryBackend, event: RegistryEvent) -> Any:
        """Publish ``event`` and wait until the view applied it: the API's write path."""
        stored = await self.publish(backend, event)
        await backend.view.wait_for_offset(stored.topic, stored.partition, stored.offset, TIMEOUT)
        return stored

    @staticmethod
    def registry(backend: RegistryBackend, patient: str) -> PatientRegistry:
        registry = backend.view.get(patient)
        assert registry is not None, "the patient has no registry in the view"
        return registry

    # -- before any write -------------------------------------------------------------------------

    async def test_a_view_over_empty_topics_is_caught_up_and_knows_no_patient(
        self, backend: RegistryBackend
    ) -> None:
        view = backend.view
        assert view.is_caught_up
        assert not view.failed
        assert (view.patients, view.lag(), view.applied, view.skipped) == (0, 0, 0, 0)
        assert view.get(make_pseudonym()) is None
        await view.sync(TIMEOUT)  # nothing to wait for: returns at once
        assert view.patients == 0

    async def test_a_view_started_later_holds_what_was_written_before_and_none_unstarted(
        self, backend: RegistryBackend
    ) -> None:
        """A replica (re)started reads the registry back from the topics; before it started, it
        vouches for nothing (readiness hangs on ``is_caught_up``) and cannot be synced."""
        consent = make_consent_registered()
        await self.record(backend, consent)
        later = backend.another_view()
        assert not later.is_caught_up
        with pytest.raises(RuntimeError, match="not started"):
            await later.sync(TIMEOUT)

        await later.start()
        try:
            await later.sync(TIMEOUT)
            assert later.is_caught_up
            found = later.get(consent.patient)
            assert found is not None and found.consent(consent.consent_id) is not None
        finally:
            await later.stop()
        assert not later.is_caught_up

    # -- read-your-writes -------------------------------------------------------------------------

    async def test_an_acknowledged_consent_is_in_the_registry_once_its_offset_was_applied(
        self, backend: RegistryBackend
    ) -> None:
        event = make_consent_registered()
        stored = await self.record(backend, event)

        assert stored.topic == backend.view.topics.consent_registered
        registry = self.registry(backend, event.patient)
        assert registry.consents == (Consent.from_event(event),)
        assert registry.version == 1
        assert (backend.view.patients, backend.view.applied) == (1, 1)

    async def test_sync_shows_every_write_acknowledged_before_it_and_leaves_no_lag(
        self, backend: RegistryBackend
    ) -> None:
        consent = make_consent_registered()
        relationship = make_treatment_relationship_registered()
        for event in (consent, relationship):
            await self.publish(backend, event)
        # Caught up is about the history the view started on: new writes do not undo it.
        assert backend.view.is_caught_up

        await backend.view.sync(TIMEOUT)
        assert self.registry(backend, consent.patient).consent(consent.consent_id) is not None
        found = self.registry(backend, relationship.patient).relationship(
            relationship.relationship_id
        )
        assert found is not None and found.organisation_ura == relationship.organisation_ura
        assert (backend.view.lag(), backend.view.patients, backend.view.applied) == (0, 2, 2)
        assert backend.view.is_caught_up

    async def test_waiting_for_an_offset_not_yet_written_times_out(
        self, backend: RegistryBackend
    ) -> None:
        stored = await self.record(backend, make_consent_registered())
        with pytest.raises(TimeoutError):
            await backend.view.wait_for_offset(
                stored.topic, stored.partition, stored.offset + 1, SHORT_TIMEOUT
            )
        # An offset already applied is no wait at all.
        await backend.view.wait_for_offset(stored.topic, stored.partition, stored.offset, 0.01)

    # -- a patient's events -----------------------------------------------------------------------

    async def test_a_patients_events_on_one_topic_keep_one_partition_and_consecutive_offsets(
        self, backend: RegistryBackend
    ) -> None:
        patient = make_pseudonym()
        started = make_treatment_relationship_registered(patient=patient)
        consent = make_consent_registered(patient=patient)
        ended = make_treatment_relationship_ended(
            patient=patient,
            relationship_id=started.relationship_id,
            organisation_ura=started.organisation_ura,
        )
        first = await self.record(backend, started)
        elsewhere = await self.record(backend, consent)  # another topic, in between
        then = await self.record(backend, ended)

        topics = backend.view.topics
        assert (first.topic, elsewhere.topic, then.topic) == (
            topics.treatment_relationships,
            topics.consent_registered,
            topics.treatment_relationships,
        )
        # Offsets count per topic partition: an end can never overtake its registration.
        assert (then.partition, then.offset) == (first.partition, first.offset + 1)
        registry = self.registry(backend, patient)
        relationship = registry.relationship(started.relationship_id)
        assert relationship is not None and relationship.end == ended.end
        assert registry.version == 3

    async def test_a_revocation_on_its_own_topic_revokes_the_registered_consent(
        self, backend: RegistryBackend
    ) -> None:
        registered = make_consent_registered()
        revoked = make_consent_revoked(patient=registered.patient, consent_id=registered.consent_id)
        await self.record(backend, registered)
        stored = await self.record(backend, revoked)

        assert stored.topic == backend.view.topics.consent_revoked
        consent = self.registry(backend, registered.patient).consent(registered.consent_id)
        assert consent is not None and consent.status is ConsentStatus.REVOKED
        assert backend.view.patients == 1

    async def test_an_event_delivered_again_changes_no_registry_but_counts_as_applied(
        self, backend: RegistryBackend
    ) -> None:
        event = make_consent_registered()
        first = await self.record(backend, event)
        before = self.registry(backend, event.patient)
        again = await self.record(backend, event)  # an API retry: the same event id

        assert (again.topic, again.partition, again.offset) == (
            first.topic,
            first.partition,
            first.offset + 1,
        )
        assert self.registry(backend, event.patient) == before
        assert backend.view.applied == 2

    async def test_an_event_for_another_patient_stays_out_of_this_patients_registry(
        self, backend: RegistryBackend
    ) -> None:
        mine = make_consent_registered()
        theirs = make_consent_registered(consent_id=mine.consent_id)
        for event in (mine, theirs):
            await self.record(backend, event)

        assert self.registry(backend, mine.patient).consents == (Consent.from_event(mine),)
        assert self.registry(backend, theirs.patient).consents == (Consent.from_event(theirs),)
        assert backend.view.get(make_pseudonym()) is None
        assert backend.view.patients == 2

    # -- what the view does not fold in -----------------------------------------------------------

    async def test_an_event_on_a_topic_the_view_does_not_read_stays_out_of_it(
        self, backend: RegistryBackend
    ) -> None:
        event = make_consent_registered()
        await self.send(backend, event, backend.stray_topic)
        await backend.view.sync(TIMEOUT)

        assert backend.view.get(event.patient) is None
        assert (backend.view.patients, backend.view.applied, backend.view.lag()) == (0, 0, 0)
        await self.record(backend, event)  # on its own topic it is folded in
        assert self.registry(backend, event.patient).version == 1

    async def test_a_record_that_is_no_registry_event_is_skipped_and_counted_not_fatal(
        self, backend: RegistryBackend
    ) -> None:
        poison = make_consent_checked()  # a decision, not a registry event
        stored = await self.send(backend, poison, backend.view.topics.consent_registered)
        # Skipping a record moves past it like applying one does.
        await backend.view.wait_for_offset(stored.topic, stored.partition, stored.offset, TIMEOUT)

        assert (backend.view.skipped, backend.view.applied, backend.view.patients) == (1, 0, 0)
        assert not backend.view.failed
        event = make_consent_registered()
        await self.record(backend, event)
        assert self.registry(backend, event.patient).version == 1
        assert (backend.view.skipped, backend.view.applied) == (1, 1)
        assert backend.view.is_caught_up

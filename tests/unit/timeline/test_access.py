"""The timeline's access guard on registries built with consent's own domain: a treatment
relationship and an explicit consent covering the requester's category, or break the glass.

The guard's two ports (``services/timeline/domain/access.py``) are played by contract-tested
fakes, not by fakes of this file's own:

- ``RegistrySource`` (production: consent's ``RegistryView``, wired in
  ``services/timeline/bootstrap.py``) is ``tests.fakes.consent.FakeView``, fed by its
  ``FakePublisher`` as the consent API feeds the registry topics: both are held to
  ``RegistryView`` and ``KafkaEventPublisher`` by ``tests/contracts/consent_registry.py``. A
  published event is stored but applied only when the guard syncs the view.
- ``ProviderTypeSource`` (production: consent's ``ProviderTypes``, a view of its own on the
  ``provider-directory`` topic that keeps only each provider's ``type_code``) is
  :class:`DirectoryTypes` over routing's ``InMemoryDirectory``, held to ``DirectoryView`` and
  ``KafkaDirectoryWriter`` by ``tests/contracts/provider_directory.py``. No production class
  wraps a directory reader to give a type code, so :class:`DirectoryTypes` is this file's one
  (three-line) adapter.

The failures the guard must answer 503 to use the fakes' own switches (``FakeView.caught_up``,
``InMemoryDirectory.caught_up``/``broken``) plus one control of this file, :func:`break_sync`,
for a sync that raises or hangs.
"""

from __future__ import annotations

import asyncio
from datetime import date

import pytest

from services.consent.domain.registry import RegistryEvent
from services.routing.adapters.directory_view import DirectoryReader
from services.routing.adapters.memory import InMemoryDirectory
from services.timeline.domain.access import (
    BASIS_EMERGENCY,
    BASIS_TREATMENT_RELATIONSHIP,
    CONDITION_CONSENT,
    CONDITION_EMERGENCY_REASON,
    CONDITION_OBJECTION,
    CONDITION_PURPOSE_OF_USE,
    CONDITION_REQUESTER_TYPE,
    CONDITION_TREATMENT_RELATIONSHIP,
    CONDITION_USER_IDENTITY,
    AccessCheckUnavailable,
    ConsentAccessGuard,
)
from services.timeline.domain.ports import AccessOutcome
from shared.auth import Principal
from shared.errors import TransientError
from shared.events.consent import Provision
from shared.topic_view import ViewFailed
from tests.factories import (
    make_consent_registered,
    make_provider,
    make_pseudonym,
    make_treatment_relationship_registered,
)
from tests.fakes.consent import FakePublisher, FakeView

TODAY = date(2025, 6, 1)
PATIENT = make_pseudonym()
HOSPITAL = "11111111"
OTHER_HOSPITAL = "22222222"
UNLISTED = "33333333"
GP_PRACTICE = "44444444"
HOSPITALS = "RPZAC104"
CATEGORIES = {"V4": HOSPITALS}
DIRECTORY = {HOSPITAL: "V4", OTHER_HOSPITAL: "V4", GP_PRACTICE: "Z3"}


class DirectoryTypes:
    """The guard's ``ProviderTypeSource`` over a routing ``DirectoryReader``: the type code of
    the provider the directory holds for the URA, and the reader itself as the view to sync.

    Stands in for ``ProviderTypes``, which folds the same topic itself and keeps only
    ``type_code``: both read a record with ``directory_view.read_record``, and
    tests/unit/consent/test_provider_types.py holds them to the same answer on every kind of
    record, those the directory skips included.
    """

    def __init__(self, reader: DirectoryReader) -> None:
        self.view = reader

    def type_code(self, ura: str) -> str | None:
        provider = self.view.get(ura)
        return None if provider is None else provider.type_code


async def published(*events: RegistryEvent) -> FakeView:
    """A started registry view with ``events`` published to their topics, as the consent API
    publishes them: stored and acknowledged, but applied only once someone syncs the view."""
    view = FakeView()
    publisher = FakePublisher(view)
    await publisher.start()
    await view.start()
    for event in events:
        await (await publisher.send(event, view.topics.for_event(event)))
    return view


async def listed(types: dict[str, str] = DIRECTORY) -> InMemoryDirectory:
    """A started directory holding a provider of each ``{ura: type_code}``."""
    directory = InMemoryDirectory(
        [make_provider(ura, type_code=code) for ura, code in types.items()]
    )
    await directory.start()
    return directory


def break_sync(
    monkeypatch: pytest.MonkeyPatch, view: FakeView, error: BaseException | None
) -> None:
    """Test control, no part of the registry contract: ``view.sync`` raises ``error``, as
    ``RegistryView.sync`` does when it cannot catch up (``TimeoutError`` past its timeout,
    ``TransientError`` when Kafka does not give the end offsets, ``ViewFailed`` once stopped
    on a record), or with ``None`` never returns, whatever timeout it was given."""

    async def sync(timeout: float) -> None:
        if error is not None:
            raise error
        await asyncio.Event().wait()

    monkeypatch.setattr(view, "sync", sync)


def principal(
    ura: str = HOSPITAL, purpose: str | None = "TREAT", uzi: str | None = "900000001"
) -> Principal:
    return Principal(
        organisation_ura=ura,
        user_uzi=uzi,
        role="01.015",
        roles=frozenset({"01.015", "provider"}),
        purpose_of_use=purpose,
        subject="900000001",
    )


def consent(provision: Provision = Provision.PERMIT, **kw):  # type: ignore[no-untyped-def]
    fields = {"consent_id": "c1", "provider_category": HOSPITALS, **kw}
    return make_consent_registered(patient=PATIENT, provision=provision, **fields)


def relationship(ura: str = HOSPITAL):  # type: ignore[no-untyped-def]
    return make_treatment_relationship_registered(
        patient=PATIENT, relationship_id=f"r-{ura}", organisation_ura=ura, start=date(2025, 1, 1)
    )


async def guard(
    *events: RegistryEvent,
    view: FakeView | None = None,
    directory: InMemoryDirectory | None = None,
    sync_timeout: float = 1.0,
) -> ConsentAccessGuard:
    """The guard on ``view`` (default: one with ``events`` published, not yet applied) and
    ``directory`` (default: :data:`DIRECTORY`)."""
    return ConsentAccessGuard(
        view if view is not None else await published(*events),
        DirectoryTypes(directory if directory is not None else await listed()),
        "GGC002",
        CATEGORIES,
        sync_timeout=sync_timeout,
        today=lambda: TODAY,
    )


RELATIONSHIP = {"yes": [relationship()], "no": []}
CONSENT = {
    "permit": [consent()],
    "none": [],
    "objection": [consent(Provision.DENY)],
}


@pytest.mark.parametrize(
    ("has_relationship", "consent_state", "outcome", "failed"),
    [
        ("yes", "permit", AccessOutcome.ALLOWED, ()),
        ("yes", "none", AccessOutcome.DENIED, (CONDITION_CONSENT,)),
        ("yes", "objection", AccessOutcome.DENIED, (CONDITION_OBJECTION,)),
        ("no", "permit", AccessOutcome.DENIED, (CONDITION_TREATMENT_RELATIONSHIP,)),
        ("no", "none", AccessOutcome.DENIED, (CONDITION_TREATMENT_RELATIONSHIP, CONDITION_CONSENT)),
        (
            "no",
            "objection",
            AccessOutcome.DENIED,
            (CONDITION_TREATMENT_RELATIONSHIP, CONDITION_OBJECTION),
        ),
    ],
)
async def test_access_needs_both_a_treatment_relationship_and_consent_covering_the_category(
    has_relationship: str, consent_state: str, outcome: AccessOutcome, failed: tuple[str, ...]
) -> None:
    decision = await (await guard(*RELATIONSHIP[has_relationship], *CONSENT[consent_state])).check(
        principal(), PATIENT
    )

    assert decision.outcome is outcome
    assert decision.failed_conditions == failed
    assert decision.allowed is (outcome is AccessOutcome.ALLOWED)
    if decision.allowed:
        assert decision.authorisation_basis == BASIS_TREATMENT_RELATIONSHIP
        assert decision.consent_profile == f"GGC002/{HOSPITALS}:c1"
        assert decision.reason is None
    else:
        assert decision.authorisation_basis is None
        assert decision.reason
        # The refusal names what failed, in words a provider understands.
        if CONDITION_TREATMENT_RELATIONSHIP in failed:
            assert "no active treatment relationship" in decision.reason
        if CONDITION_CONSENT in failed:
            assert f"no explicit consent of the patient covers GGC002 for {HOSPITALS}" in (
                decision.reason
            )
        if CONDITION_OBJECTION in failed:
            assert "objected" in decision.reason
            assert decision.consent_profile is not None and decision.consent_profile.endswith(":c1")
        told_reason, told_conditions = decision.told
        if CONDITION_TREATMENT_RELATIONSHIP in failed:
            # Not treating the patient: told that alone; the consent's state is only audited.
            assert told_conditions == (CONDITION_TREATMENT_RELATIONSHIP,)
            assert told_reason == "no active treatment relationship with the patient"
        else:
            # A treating provider is told what the consent lacks (to ask the patient).
            assert (told_reason, told_conditions) == (decision.reason, failed)


@pytest.mark.parametrize(
    ("purpose", "uzi", "failed"),
    [
        ("HRESCH", "900000001", (CONDITION_PURPOSE_OF_USE,)),  # research
        ("HMARKT", "900000001", (CONDITION_PURPOSE_OF_USE,)),  # marketing
        (None, "900000001", (CONDITION_PURPOSE_OF_USE,)),
        ("TREAT", None, (CONDITION_USER_IDENTITY,)),
        ("ETREAT", None, (CONDITION_USER_IDENTITY,)),  # an emergency names its user too
        (None, None, (CONDITION_USER_IDENTITY, CONDITION_PURPOSE_OF_USE)),
    ],
)
async def test_only_a_token_of_a_named_person_for_treatment_opens_a_timeline(
    purpose: str | None, uzi: str | None, failed: tuple[str, ...]
) -> None:
    # Relationship and consent are in place: the token alone decides.
    decision = await (await guard(relationship(), consent())).check(
        principal(purpose=purpose, uzi=uzi), PATIENT, emergency_reason="unconscious"
    )

    assert decision.outcome is AccessOutcome.DENIED
    assert decision.failed_conditions == failed
    assert decision.reason is not None
    if CONDITION_PURPOSE_OF_USE in failed:
        assert "treatment only" in decision.reason
    if CONDITION_USER_IDENTITY in failed:
        assert "names no person" in decision.reason


async def test_another_organisations_relationship_does_not_open_the_timeline() -> None:
    decision = await (await guard(relationship(OTHER_HOSPITAL), consent())).check(
        principal(), PATIENT
    )
    assert decision.failed_conditions == (CONDITION_TREATMENT_RELATIONSHIP,)


async def test_a_consent_for_another_provider_category_does_not_cover_the_requester() -> None:
    decision = await (await guard(relationship(), consent(provider_category="RPZAC999"))).check(
        principal(), PATIENT
    )
    assert (decision.outcome, decision.failed_conditions) == (
        AccessOutcome.DENIED,
        (CONDITION_CONSENT,),
    )


async def test_a_consent_for_another_data_category_does_not_count() -> None:
    decision = await (await guard(relationship(), consent(data_category="GGC001"))).check(
        principal(), PATIENT
    )
    assert decision.failed_conditions == (CONDITION_CONSENT,)


async def test_a_consent_naming_the_requesting_organisation_counts() -> None:
    decision = await (
        await guard(relationship(), consent(provider_category=None, organisation_ura=HOSPITAL))
    ).check(principal(), PATIENT)
    assert decision.outcome is AccessOutcome.ALLOWED


@pytest.mark.parametrize(
    ("ura", "words"),
    [
        (UNLISTED, "not in the provider directory"),
        (GP_PRACTICE, "provider type Z3 has no Mitz provider category"),
    ],
)
async def test_a_requester_of_unknown_type_is_refused_naming_that(ura: str, words: str) -> None:
    decision = await (await guard(relationship(ura), consent(provider_category=None))).check(
        principal(ura), PATIENT
    )
    assert decision.outcome is AccessOutcome.DENIED
    assert decision.failed_conditions == (CONDITION_REQUESTER_TYPE,)
    assert decision.reason is not None and decision.reason.startswith("unknown requester type")
    assert words in decision.reason


@pytest.mark.parametrize(
    ("who", "emergency_reason", "failed"),
    [
        (principal(uzi=None), None, (CONDITION_USER_IDENTITY,)),
        (principal(purpose="HRESCH"), None, (CONDITION_PURPOSE_OF_USE,)),
        (principal(purpose="ETREAT"), None, (CONDITION_EMERGENCY_REASON,)),
        (principal(GP_PRACTICE), None, (CONDITION_REQUESTER_TYPE,)),
        (principal(UNLISTED), "unconscious", (CONDITION_REQUESTER_TYPE,)),
        (principal(), None, None),
        (principal(OTHER_HOSPITAL), None, None),  # treats nobody: that is about a patient
        (principal(GP_PRACTICE, purpose="ETREAT"), "unconscious", None),  # break the glass
    ],
)
async def test_what_holds_for_the_requester_whatever_the_patient_is_decided_without_one(
    who: Principal, emergency_reason: str | None, failed: tuple[str, ...] | None
) -> None:
    checked = await guard(relationship(), consent())

    refused = await checked.check_requester(who, emergency_reason=emergency_reason)

    assert (refused.failed_conditions if refused is not None else None) == failed
    if refused is not None:
        # The same refusal a check on any patient gives.
        full = await checked.check(who, PATIENT, emergency_reason=emergency_reason)
        assert (full.outcome, full.failed_conditions, full.reason) == (
            refused.outcome,
            refused.failed_conditions,
            refused.reason,
        )


async def test_a_check_after_the_requester_check_reads_what_that_one_synced() -> None:
    view = await published(relationship(), consent())
    access = await guard(view=view)
    publisher = FakePublisher(view)
    await publisher.start()

    assert await access.check_requester(principal()) is None  # synced the views
    objection = consent(Provision.DENY, consent_id="c2")  # stored, not yet applied:
    await (await publisher.send(objection, view.topics.for_event(objection)))
    decision = await access.check(principal(), PATIENT, requester_checked=True)

    # Not synced again: the objection a moment later is not applied yet, and the request is
    # decided on the registry as the requester check read it.
    assert decision.outcome is AccessOutcome.ALLOWED
    assert view.lag() == 1
    assert (await access.check(principal(), PATIENT)).outcome is AccessOutcome.DENIED


async def test_a_consent_registered_a_moment_ago_counts_because_the_view_is_synced_first() -> None:
    view = await published(relationship(), consent())
    assert view.get(PATIENT) is None and view.lag() == 2  # stored, not yet applied
    access = await guard(view=view)

    decision = await access.check(principal(), PATIENT)

    assert decision.outcome is AccessOutcome.ALLOWED


async def test_break_the_glass_with_a_reason_is_allowed_over_an_objection_and_flagged() -> None:
    decision = await (await guard(consent(Provision.DENY))).check(
        principal(purpose="ETREAT"), PATIENT, emergency_reason="  unconscious patient at the ED "
    )

    assert decision.outcome is AccessOutcome.EMERGENCY and decision.allowed
    assert decision.authorisation_basis == BASIS_EMERGENCY
    assert decision.reason == "unconscious patient at the ED"
    # The audit shows whether the glass had to be broken, and why it would have been refused.
    assert decision.consent_profile is not None
    assert "normal rules denied" in decision.consent_profile
    assert "objected" in decision.consent_profile


async def test_break_the_glass_where_the_normal_rules_allow_is_still_recorded_as_emergency() -> (
    None
):
    decision = await (await guard(relationship(), consent())).check(
        principal(purpose="ETREAT"), PATIENT, emergency_reason="trauma call"
    )
    assert decision.outcome is AccessOutcome.EMERGENCY
    assert decision.consent_profile is not None
    assert "normal rules allowed" in decision.consent_profile


@pytest.mark.parametrize("reason", [None, "", "   "])
async def test_an_emergency_without_a_reason_is_refused_and_says_so(reason: str | None) -> None:
    access = await guard(relationship(), consent())

    decision = await access.check(principal(purpose="ETREAT"), PATIENT, emergency_reason=reason)

    assert decision.outcome is AccessOutcome.DENIED
    assert decision.failed_conditions == (CONDITION_EMERGENCY_REASON,)
    assert decision.reason is not None and "needs a stated reason" in decision.reason


async def test_a_reason_without_an_emergency_token_opens_nothing_and_says_what_is_missing() -> None:
    decision = await (await guard()).check(
        principal(), PATIENT, emergency_reason="I just want to see"
    )

    assert decision.outcome is AccessOutcome.DENIED
    assert decision.failed_conditions == (CONDITION_TREATMENT_RELATIONSHIP, CONDITION_CONSENT)
    assert decision.reason is not None and "purpose of use ETREAT" in decision.reason
    told_reason, told_conditions = decision.told
    assert told_conditions == (CONDITION_TREATMENT_RELATIONSHIP,)
    assert "purpose of use ETREAT" in told_reason and "consent" not in told_reason


@pytest.mark.parametrize(
    "error",
    [TimeoutError("slow"), TransientError("kafka down"), ViewFailed("poison record")],
)
async def test_a_view_that_cannot_sync_makes_the_check_unavailable_never_a_guess(
    error: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    view = await published(relationship(), consent())
    break_sync(monkeypatch, view, error)
    access = await guard(view=view)

    with pytest.raises(AccessCheckUnavailable, match="in time") as raised:
        await access.check(principal(), PATIENT)
    assert raised.value.__cause__ is error


async def test_a_slow_view_is_given_up_on_after_the_sync_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    view = await published()
    break_sync(monkeypatch, view, None)  # a sync that never returns
    access = await guard(view=view, sync_timeout=0.05)

    with pytest.raises(AccessCheckUnavailable, match="in time"):
        await access.check(principal(), PATIENT)


@pytest.mark.parametrize(
    ("state", "says"),
    [("failed", "stopped"), ("reading", "still reading"), ("registry-reading", "still reading")],
)
async def test_a_failed_or_still_reading_view_makes_the_check_unavailable(
    state: str, says: str
) -> None:
    view = await published(relationship(), consent())
    directory = await listed()
    if state == "failed":
        directory.broken = True  # the directory view stopped on a record
    elif state == "reading":
        directory.caught_up = False  # the directory view is still reading its history
    else:
        view.caught_up = False  # the registry view is still reading its history
    access = await guard(view=view, directory=directory)

    with pytest.raises(AccessCheckUnavailable, match=says):
        await access.check(principal(), PATIENT)

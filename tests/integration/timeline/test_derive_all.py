"""The rebuild's set-based derivation gives exactly the rows of the per-study refresh.

``DERIVE_STUDIES`` and ``DERIVE_ENTRIES`` (``store.py``) fill the empty ``timeline_studies``
and ``timeline_entries`` from all sources, reports and deliveries at once; ``REFRESH_STUDIES``
and ``REFRESH_ENTRIES`` derive the same rows a study at a time. Two implementations of one set
of rules, held to each other here on the real PostgreSQL: random table contents over few keys,
so primary-source ties, patients, visibility, modalities and shared report instances collide.
"""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest

from services.timeline.adapters.store import (
    DERIVE_ENTRIES,
    DERIVE_STUDIES,
    PROJECTION_TABLES,
    REFRESH_ENTRIES,
    REFRESH_STUDIES,
)
from shared import migrations

pytestmark = pytest.mark.integration

SEEDS = 40
T0 = datetime(2025, 3, 14, 9, 0, tzinfo=UTC)
# Few keys, spelled so that collations disagree ("C" orders "B" before "a", "10" before "9").
STUDIES = ("1.2.10", "1.2.9", "1.2.a", "1.2.B", "2.25.1")
SENDERS = ("10000001", "9000002", "a-ura", "B-ura", "10000001x")
RECIPIENTS = ("33333333", "44444444")
PATIENTS = ("patient-a", "patient-B", None)
MODALITIES = ("CT", "MR", "SR", "ct", "US", "OT")
REPORT_KINDS = ("sr", "pdf")

SOURCE_COLUMNS = """
study_instance_uid, sender_ura, version, last_received_at, recipient_ura, first_received_at,
patient_pseudonym, accession_number, study_date, study_time, study_description,
institution_name, modalities, number_of_series, number_of_instances, number_of_images,
decision_version, decision_last_received_at, decision_recipient_ura, permitted, basis,
decided_by, decision_patient, withdrawn
"""


def source_row(rnd: random.Random, study: str, sender: str) -> tuple[Any, ...]:
    version = rnd.randint(1, 3)
    last = T0 + timedelta(minutes=10 + rnd.randint(0, 2))
    recipient = rnd.choice(RECIPIENTS)
    patient = rnd.choice(PATIENTS)
    instances = rnd.randint(0, 4)
    images = rnd.choice([0, 0, instances])  # 0: reports only (or nothing yet)
    decision: tuple[Any, ...] = (None,) * 7
    withdrawn = False
    roll = rnd.random()  # < 0.15: no decision yet, invisible
    if roll >= 0.15:
        d_version, d_last, d_recipient, d_patient = version, last, recipient, patient
        # A permit (visible if the patient is known), or a deny.
        permitted = roll < 0.6 or roll >= 0.75
        if 0.75 <= roll < 0.85:
            withdrawn = True  # its consent was revoked
        elif roll >= 0.85:
            # A permit for another snapshot (or patient) than the one shown: invisible.
            which = rnd.randrange(4)
            if which == 0:
                d_version = version + 1
            elif which == 1:
                d_last = last + timedelta(seconds=1)
            elif which == 2:
                d_recipient = next(r for r in RECIPIENTS if r != recipient)
            else:
                d_patient = next(p for p in PATIENTS if p != patient and p is not None)
        decision = (
            d_version,
            d_last,
            d_recipient,
            permitted,
            "explicit_consent" if permitted else "no_explicit_consent",
            rnd.choice(["consent-a", "consent-b"]) if permitted else "rule:x",
            d_patient,
        )
    return (
        study,
        sender,
        version,
        last,
        recipient,
        T0 + timedelta(minutes=rnd.choice([0, 0, 0, 1])),  # ties, broken by sender URA
        patient,
        rnd.choice([None, "A1", "A2"]),
        rnd.choice([None, date(2025, 1, rnd.randint(1, 3))]),
        rnd.choice([None, "101010", "0900"]),
        rnd.choice([None, "one", "two"]),
        rnd.choice([None, "Alpha", "beta", "GAMMA"]),
        [rnd.choice(MODALITIES) for _ in range(rnd.choice([0, 0, 1, 2, 3]))],
        rnd.randint(0, 3),
        instances,
        images,
        *decision,
        withdrawn,
    )


def fill(conn: psycopg.Connection, rnd: random.Random) -> None:
    conn.execute(f"TRUNCATE {', '.join(PROJECTION_TABLES)}")
    sources: list[tuple[Any, ...]] = []
    reports: list[tuple[Any, ...]] = []
    deliveries: list[tuple[Any, ...]] = []
    for study in rnd.sample(STUDIES, rnd.randint(1, len(STUDIES))):
        # The same few report instances, so two sources hold the same one (maybe as other kinds).
        sops = [f"{study}.r{n}" for n in (1, 9, 10)]
        for sender in rnd.sample(SENDERS, rnd.randint(1, 4)):
            sources.append(source_row(rnd, study, sender))
            for sop in rnd.sample(sops, rnd.choice([0, 0, 1, 2, 3])):
                reports.append((study, sender, sop, f"{study}.s1", rnd.choice(REPORT_KINDS)))
    for study in STUDIES:  # some for studies without sources
        for _ in range(rnd.choice([0, 0, 1, 2, 3])):
            deliveries.append(
                (study, rnd.choice(RECIPIENTS + SENDERS[:2]), rnd.choice(["e1", "e2"]),
                 rnd.randint(1, 3), T0 + timedelta(minutes=rnd.randint(0, 3)))
            )  # fmt: skip
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO timeline_sources ({SOURCE_COLUMNS}) VALUES ({', '.join(['%s'] * 24)})",
            sources,
        )
        cur.executemany("INSERT INTO timeline_reports VALUES (%s, %s, %s, %s, %s)", reports)
        cur.executemany(
            "INSERT INTO timeline_deliveries VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            deliveries,
        )


def derived(conn: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {
        "timeline_studies": conn.execute(
            "SELECT * FROM timeline_studies ORDER BY study_instance_uid"
        ).fetchall(),
        "timeline_entries": conn.execute(
            "SELECT * FROM timeline_entries "
            "ORDER BY study_instance_uid, kind, report_sop_instance_uid"
        ).fetchall(),
    }


def test_derive_gives_the_rows_of_refresh_over_every_study(scratch_database: str) -> None:
    migrations.migrate(scratch_database)
    seen = {"visible": 0, "invisible": 0, "reports_only": 0, "shared_reports": 0}
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        conn.execute("SET jit = off")
        for seed in range(SEEDS):
            rnd = random.Random(seed)
            fill(conn, rnd)
            uids = [r[0] for r in conn.execute("SELECT study_instance_uid FROM timeline_sources")]
            rnd.shuffle(uids)  # in any order, with duplicates
            conn.execute(REFRESH_STUDIES, {"uids": uids})
            conn.execute(REFRESH_ENTRIES, {"uids": uids})
            refreshed = derived(conn)

            conn.execute("TRUNCATE timeline_studies, timeline_entries")
            conn.execute(DERIVE_STUDIES)
            conn.execute(DERIVE_ENTRIES)
            derived_all = derived(conn)

            for table, rows in refreshed.items():
                assert derived_all[table] == rows, (
                    f"seed {seed}, {table}: refresh only "
                    f"{[r for r in rows if r not in derived_all[table]]}, derive only "
                    f"{[r for r in derived_all[table] if r not in rows]}"
                )
            studies = refreshed["timeline_studies"]
            seen["visible"] += sum(1 for s in studies if s[-1])
            seen["invisible"] += sum(1 for s in studies if not s[-1])
            seen["reports_only"] += sum(1 for s in studies if s[-1] and not s[-2])
            seen["shared_reports"] += sum(
                1 for e in refreshed["timeline_entries"] if e[1] == "report" and len(e[12]) > 1
            )
    # The contents are not vacuous: every case occurred in some seed.
    assert all(seen.values()), seen

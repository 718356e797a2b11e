"""How the ingest benchmark lays out its instances and picks the round it reports."""

from __future__ import annotations

import io
from collections import Counter

import pydicom

from benchmarks.ingest import _median_round, build_instances, select_sources


def _headers(instances: list[bytes]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True) for data in instances]


def test_consecutive_instances_make_studies_of_one_patient_in_series() -> None:
    headers = _headers(build_instances(select_sources(), 45, per_study=20, per_series=10))

    studies = Counter(h.StudyInstanceUID for h in headers)
    assert sorted(studies.values()) == [5, 20, 20]
    first = headers[:20]
    assert len({h.StudyInstanceUID for h in first}) == 1
    assert len({h.PatientID for h in first}) == 1
    assert [len({h.SeriesInstanceUID for h in half}) for half in (first[:10], first[10:])] == [1, 1]
    assert first[0].SeriesInstanceUID != first[10].SeriesInstanceUID
    assert len({h.PatientID for h in headers}) == 3
    assert len({h.SeriesInstanceUID for h in headers}) == 5
    assert len({h.SOPInstanceUID for h in headers}) == 45
    assert all(h.file_meta.MediaStorageSOPInstanceUID == h.SOPInstanceUID for h in headers)


def test_a_study_of_one_gives_every_instance_its_own_study_and_series() -> None:
    headers = _headers(build_instances(select_sources(), 6, per_study=1, per_series=1))

    assert len({h.StudyInstanceUID for h in headers}) == 6
    assert len({h.SeriesInstanceUID for h in headers}) == 6


def test_the_reported_round_is_the_median_one() -> None:
    rounds = [{"instances_per_s": v, "n": i} for i, v in enumerate([300.0, 500.0, 400.0])]
    assert _median_round(rounds)["n"] == 2
    assert _median_round(rounds[:2])["n"] == 0  # the lower middle of an even count

"""JSON log lines, correlation ids, Kafka positions and BSN scrubbing (shared.logging)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from shared.identifiers import find_bsns, parse_bsn
from shared.logging import (
    SCRUBBED_BSN,
    configure_logging,
    correlation_context,
    current_correlation_id,
    get_logger,
    kafka_position,
    scrub_bsns,
)

VALID_BSN = "123456782"
OTHER_VALID_BSN = "999990019"
NOT_A_BSN = "123456789"  # nine digits, fails the 11-proof

Configure = Callable[..., io.StringIO]


@pytest.fixture
def configure() -> Iterator[Configure]:
    """configure_logging into a StringIO; restores stdlib and structlog configuration afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_structlog = structlog.get_config()

    def _configure(service: str = "ingest", level: str = "INFO", json: bool = True) -> io.StringIO:
        stream = io.StringIO()
        configure_logging(service, level, json, stream=stream)
        return stream

    try:
        yield _configure
    finally:
        for handler in root.handlers[:]:
            if handler not in saved_handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(saved_level)
        structlog.reset_defaults()
        structlog.configure(**saved_structlog)
        structlog.contextvars.clear_contextvars()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def only_line(stream: io.StringIO) -> dict[str, object]:
    [line] = lines(stream)
    return line


class TestJsonLines:
    def test_a_structlog_event_becomes_one_json_line_with_the_common_fields(
        self, configure: Configure
    ) -> None:
        stream = configure(service="consent")
        with correlation_context("cid-1"):
            get_logger("consent.handlers").info("consent checked", study="1.2.3")
        line = only_line(stream)
        assert line["event"] == "consent checked"
        assert line["service"] == "consent"
        assert line["level"] == "info"
        assert line["logger"] == "consent.handlers"
        assert line["correlation_id"] == "cid-1"
        assert line["study"] == "1.2.3"
        timestamp = datetime.fromisoformat(str(line["timestamp"]))
        assert timestamp.utcoffset() == timedelta(0)

    def test_a_library_logging_through_stdlib_comes_out_as_the_same_json(
        self, configure: Configure
    ) -> None:
        stream = configure(service="notify")
        with correlation_context("cid-2"):
            logging.getLogger("aiokafka.consumer").warning(
                "rebalance in %s", "group-1", extra={"generation": 7}
            )
        line = only_line(stream)
        assert line["event"] == "rebalance in group-1"
        assert line["service"] == "notify"
        assert line["level"] == "warning"
        assert line["logger"] == "aiokafka.consumer"
        assert line["correlation_id"] == "cid-2"
        assert line["generation"] == 7
        assert "timestamp" in line

    def test_an_exception_is_logged_as_a_traceback_string(self, configure: Configure) -> None:
        stream = configure()
        try:
            raise RuntimeError("broker gone")
        except RuntimeError:
            get_logger("test").exception("publish failed")
        line = only_line(stream)
        assert line["level"] == "error"
        assert "RuntimeError: broker gone" in str(line["exception"])

    def test_events_below_the_configured_level_are_dropped(self, configure: Configure) -> None:
        stream = configure(level="warning")
        get_logger("test").info("not shown")
        logging.getLogger("lib").info("not shown either")
        get_logger("test").warning("shown")
        assert [line["event"] for line in lines(stream)] == ["shown"]

    def test_an_unknown_level_is_refused(self, configure: Configure) -> None:
        with pytest.raises(ValueError, match="unknown log level"):
            configure(level="chatty")

    def test_a_logger_made_before_configuration_follows_the_configuration(
        self, configure: Configure
    ) -> None:
        early = get_logger("made.at.import")
        stream = configure(service="routing")
        early.info("hello")
        assert only_line(stream)["service"] == "routing"

    def test_the_console_renderer_is_used_when_json_is_off(self, configure: Configure) -> None:
        stream = configure(json=False)
        get_logger("test").info("human readable", bsn=VALID_BSN)
        text = stream.getvalue()
        assert "human readable" in text and not text.startswith("{")
        assert VALID_BSN not in text and SCRUBBED_BSN in text


class TestIdempotentConfiguration:
    def test_configuring_twice_leaves_one_handler_and_uses_the_latest_settings(
        self, configure: Configure
    ) -> None:
        first = configure(service="first")
        second = configure(service="second")
        get_logger("test").info("once")
        assert first.getvalue() == ""
        assert only_line(second)["service"] == "second"
        ours = [
            h
            for h in logging.getLogger().handlers
            if h.formatter is not None
            and isinstance(h.formatter, structlog.stdlib.ProcessorFormatter)
        ]
        assert len(ours) == 1

    def test_handlers_installed_by_others_are_kept(self, configure: Configure) -> None:
        other = logging.NullHandler()
        logging.getLogger().addHandler(other)
        configure()
        configure()
        assert other in logging.getLogger().handlers


class TestBsnScrubbing:
    def test_a_bsn_in_the_message_is_scrubbed(self, configure: Configure) -> None:
        stream = configure()
        get_logger("test").info(f"patient {VALID_BSN} arrived")
        get_logger("test").info("patient %s arrived", OTHER_VALID_BSN)
        assert [line["event"] for line in lines(stream)] == ["patient [BSN] arrived"] * 2

    def test_a_bsn_in_an_extra_field_at_any_depth_is_scrubbed(self, configure: Configure) -> None:
        stream = configure()
        get_logger("test").info(
            "ids", patient_id=VALID_BSN, others=[{"id": OTHER_VALID_BSN}], pair=("x", VALID_BSN)
        )
        line = only_line(stream)
        assert line["patient_id"] == SCRUBBED_BSN
        assert line["others"] == [{"id": SCRUBBED_BSN}]
        assert line["pair"] == ["x", SCRUBBED_BSN]
        assert VALID_BSN not in stream.getvalue() and OTHER_VALID_BSN not in stream.getvalue()

    def test_a_bsn_in_an_exception_message_is_scrubbed(self, configure: Configure) -> None:
        stream = configure()
        try:
            raise ValueError(f"no consent for {VALID_BSN}")
        except ValueError:
            get_logger("test").exception("decision failed")
            logging.getLogger("library").exception("library failed")
        assert VALID_BSN not in stream.getvalue()
        for line in lines(stream):
            assert "ValueError: no consent for [BSN]" in str(line["exception"])

    def test_a_bsn_logged_by_a_library_in_args_or_extra_is_scrubbed(
        self, configure: Configure
    ) -> None:
        stream = configure()
        logging.getLogger("pynetdicom").info("PatientID=%s", VALID_BSN, extra={"pid": VALID_BSN})
        line = only_line(stream)
        assert line["event"] == "PatientID=[BSN]"
        assert line["pid"] == SCRUBBED_BSN

    def test_a_bsn_inside_an_arbitrary_object_is_scrubbed_from_its_repr(
        self, configure: Configure
    ) -> None:
        @dataclass
        class Patient:
            patient_id: str

        stream = configure()
        get_logger("test").info("patient", patient=Patient(VALID_BSN))
        assert str(only_line(stream)["patient"]).endswith("Patient(patient_id='[BSN]')")

    def test_a_bsn_value_object_is_already_masked(self, configure: Configure) -> None:
        stream = configure()
        bsn = parse_bsn(VALID_BSN)
        get_logger("test").info("patient %s", bsn, bsn=bsn)
        line = only_line(stream)
        assert line["event"] == "patient Bsn(***)"
        assert line["bsn"] == "Bsn(***)"

    def test_a_nine_digit_number_failing_the_11_proof_is_left_alone(
        self, configure: Configure
    ) -> None:
        stream = configure()
        get_logger("test").info(f"accession {NOT_A_BSN}", accession=NOT_A_BSN)
        line = only_line(stream)
        assert line["event"] == f"accession {NOT_A_BSN}"
        assert line["accession"] == NOT_A_BSN

    def test_numbers_stay_numbers_even_when_they_pass_the_11_proof(
        self, configure: Configure
    ) -> None:
        stream = configure()
        get_logger("test").info("stored", size=int(VALID_BSN), ratio=0.5, ok=True)
        line = only_line(stream)
        assert (line["size"], line["ratio"], line["ok"]) == (int(VALID_BSN), 0.5, True)

    def test_a_kafka_offset_that_passes_the_11_proof_is_kept(self, configure: Configure) -> None:
        stream = configure()
        position = kafka_position("study-received", 3, int(VALID_BSN))
        get_logger("test").error(f"poison at {position}", position=position)
        line = only_line(stream)
        assert line["position"] == f"study-received[3]@{VALID_BSN}"
        assert line["event"] == f"poison at study-received[3]@{VALID_BSN}"

    def test_only_exact_nine_digit_runs_are_scrubbed(self) -> None:
        assert scrub_bsns(f"{VALID_BSN}0 0{VALID_BSN} {VALID_BSN}") == (
            f"{VALID_BSN}0 0{VALID_BSN} [BSN]"
        )
        assert scrub_bsns(f"a{VALID_BSN}b,{OTHER_VALID_BSN}") == "a[BSN]b,[BSN]"

    @given(
        st.text(alphabet=st.characters(blacklist_categories=["Nd"]), max_size=20),
        st.sampled_from([VALID_BSN, OTHER_VALID_BSN, "999991772", "111222333"]),
        st.text(alphabet=st.characters(blacklist_categories=["Nd"]), max_size=20),
    )
    def test_a_valid_bsn_between_any_non_digits_never_survives(
        self, before: str, bsn: str, after: str
    ) -> None:
        # No digit before it, so never the offset of a kafka_position ("topic[3]@").
        assert scrub_bsns(before + bsn + after) == before + SCRUBBED_BSN + after

    def test_a_bsn_as_a_field_name_is_scrubbed_too(self, configure: Configure) -> None:
        stream = configure()
        get_logger("test").info("counts", **{f"p{VALID_BSN}": 1}, nested={VALID_BSN: 2})
        line = only_line(stream)
        assert line["p[BSN]"] == 1 and line["nested"] == {"[BSN]": 2}
        assert VALID_BSN not in json.dumps(line)

    def test_only_a_whole_kafka_position_keeps_its_offset(self) -> None:
        assert scrub_bsns(f"x]@{VALID_BSN}") == "x]@[BSN]"
        assert scrub_bsns(f"t[]@{VALID_BSN}") == "t[]@[BSN]"
        assert scrub_bsns(f"[3]@{VALID_BSN}") == "[3]@[BSN]"
        assert scrub_bsns(f"study-received[3]@{VALID_BSN}") == f"study-received[3]@{VALID_BSN}"

    @given(st.text(alphabet="0123456789 x[]@", max_size=60))
    def test_after_scrubbing_no_valid_bsn_is_left_but_a_kafka_offset(self, text: str) -> None:
        scrubbed = scrub_bsns(text)
        for match in find_bsns(scrubbed):
            assert re.search(r"[A-Za-z0-9._-]\[[0-9]+\]@$", scrubbed[: match.start()])
        if next(find_bsns(text), None) is None:
            assert scrubbed == text


class TestCorrelationId:
    def test_a_given_correlation_id_is_bound_and_removed_afterwards(self) -> None:
        assert current_correlation_id() is None
        with correlation_context("abc") as cid:
            assert cid == "abc"
            assert current_correlation_id() == "abc"
        assert current_correlation_id() is None

    def test_without_an_id_a_fresh_one_is_made(self) -> None:
        with correlation_context() as first, correlation_context() as second:
            assert first and second and first != second
            assert current_correlation_id() == second

    def test_a_nested_context_restores_the_outer_id(self) -> None:
        with correlation_context("outer"):
            with correlation_context("inner"):
                assert current_correlation_id() == "inner"
            assert current_correlation_id() == "outer"

    def test_concurrent_tasks_keep_their_own_correlation_id(self) -> None:
        async def handle(cid: str) -> str | None:
            with correlation_context(cid):
                await asyncio.sleep(0)
                return current_correlation_id()

        async def main() -> list[str | None]:
            return list(await asyncio.gather(handle("a"), handle("b"), handle("c")))

        assert asyncio.run(main()) == ["a", "b", "c"]


class TestKafkaPosition:
    def test_a_position_reads_topic_partition_at_offset(self) -> None:
        assert kafka_position("consent-checked", 0, 42) == "consent-checked[0]@42"


class TestWhatPythonWouldPrintItself:
    """An uncaught exception, one in a thread and a warning go through the scrubbing handler,
    not straight to stderr (run in a child process: the hooks are process-wide)."""

    SCRIPT = f"""
import sys, threading, warnings
from shared.logging import configure_logging
configure_logging("test")
warnings.warn("could not read value {VALID_BSN}")
def fail():
    raise ValueError("t {VALID_BSN}")
thread = threading.Thread(target=fail)
thread.start(); thread.join()
raise RuntimeError("cannot build event from {{'patient_id': '{VALID_BSN}'}}")
"""

    def test_none_of_it_shows_a_bsn_and_all_of_it_is_logged(self) -> None:
        done = subprocess.run(
            [sys.executable, "-c", self.SCRIPT], capture_output=True, text=True, timeout=60
        )

        assert done.returncode == 1
        assert VALID_BSN not in done.stdout + done.stderr
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert [line["event"] for line in lines[1:]] == [
            "uncaught exception in a thread",
            "uncaught exception; exiting",
        ]
        assert "could not read value [BSN]" in lines[0]["event"]
        assert "ValueError: t [BSN]" in lines[1]["exception"]
        assert (
            "RuntimeError: cannot build event from {'patient_id': '[BSN]'}"
            in (lines[2]["exception"])
        )


class TestPydicomQuotesNoValue:
    """pydicom warns about values it cannot read by quoting them, through its logger and through
    Python's warnings: a birth date or a name must not reach the log that way (a timeline
    reading a stored header for WADO-RS metadata met such a sender's dates)."""

    SCRIPT = """
import io
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from shared.logging import configure_logging
configure_logging("test")
ds = Dataset()
ds.file_meta = FileMetaDataset()
ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
ds.add_new(0x00100030, "DA", "1980-03-14")  # PatientBirthDate, not in DICOM's YYYYMMDD
ds.add_new(0x00101010, "AS", "45 years")  # PatientAge
buffer = io.BytesIO()
ds.save_as(buffer, enforce_file_format=False)
buffer.seek(0)
dcmread(buffer, force=True).to_json_dict()
"""

    def test_the_warnings_are_logged_with_the_values_withheld(self) -> None:
        done = subprocess.run(
            [sys.executable, "-c", self.SCRIPT], capture_output=True, text=True, timeout=60
        )

        assert done.returncode == 0, done.stderr
        output = done.stdout + done.stderr
        assert "1980-03-14" not in output and "45 years" not in output
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        events = [(line["logger"], line["event"]) for line in lines]
        assert ("pydicom", "Invalid value for VR DA: <value withheld>.") in events
        assert ("pydicom", "Invalid value for VR AS: <value withheld>.") in events
        assert any(
            logger == "py.warnings"
            and "UserWarning: Invalid value for VR DA: <value withheld>" in event
            for logger, event in events
        )


@pytest.mark.parametrize(
    ("logger", "message", "logged"),
    [
        ("pydicom", "Invalid value for VR PN: \"O'Brien^Jan\".", "Invalid value for VR PN: "
         "<value withheld>."),
        ("pydicom.valuerep", "bad 'a' and 'b'", "bad <value withheld>"),
        # A repr holding both kinds of quote, and one cut off: nothing of the value shows.
        ("pydicom", "bad 'a\\'b\"c' here", "bad <value withheld> here"),
        ("pydicom", "bad 'Jansen^Pie", "bad <value withheld>"),
        ("pynetdicom.dsutils", "invalid literal for int() with base 10: '1e400'",
         "invalid literal for int() with base 10: <value withheld>"),
        ("py.warnings", "x.py:1: UserWarning: Invalid value for VR DA: '1980-03-14'.",
         "x.py:1: UserWarning: Invalid value for VR DA: <value withheld>."),
        # Other libraries' quotes are theirs to keep (a Kafka topic, a file name).
        ("aiokafka", "Topic 'study-received' is not available", "Topic 'study-received' is "
         "not available"),
    ],
)  # fmt: skip
def test_only_the_dicom_libraries_quoted_values_are_withheld(
    configure: Configure, logger: str, message: str, logged: str
) -> None:
    stream = configure()
    logging.getLogger(logger).warning(message)
    assert only_line(stream)["event"] == logged

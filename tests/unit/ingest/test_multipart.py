"""The STOW-RS multipart/related parser: any chunking, RFC 2046 edges, limits, bounded memory."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from io import BytesIO
from pathlib import Path
from typing import Any, NamedTuple

import pydicom
import pytest
from dicomweb_client.web import DICOMwebClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from services.ingest.adapters import multipart
from services.ingest.adapters.multipart import (
    MalformedMultipart,
    PayloadTooLarge,
    RelatedType,
    UnsupportedMediaType,
    iter_parts,
    parse_content_type,
)

REPO = Path(__file__).resolve().parents[3]
BOUNDARY = b"0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"
RELATED = RelatedType(boundary=BOUNDARY, type="application/dicom")
DICOM_HEADERS = b"Content-Type: application/dicom\r\n"
KiB = 1024
MiB = 1024 * KiB


class Got(NamedTuple):
    number: int
    headers: dict[str, str]
    body: bytes
    size: int
    sha256: str


def encode(
    bodies: Sequence[bytes],
    *,
    boundary: bytes = BOUNDARY,
    headers: bytes = DICOM_HEADERS,
    preamble: bytes = b"",
    epilogue: bytes = b"",
) -> bytes:
    # RFC 2046 layout with a preamble: preamble CRLF --b CRLF headers CRLF body CRLF --b ... --b--
    out = [preamble + b"\r\n" if preamble else b""]
    for i, body in enumerate(bodies):
        out.append((b"\r\n" if i else b"") + b"--" + boundary + b"\r\n" + headers + b"\r\n" + body)
    out.append(b"\r\n--" + boundary + b"--" + epilogue)
    return b"".join(out)


async def in_chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def split_at(body: bytes, cuts: Sequence[int]) -> AsyncIterator[bytes]:
    edges = [0, *sorted(cuts), len(body)]
    for start, end in itertools.pairwise(edges):
        yield body[start:end]


async def collect(
    chunks: AsyncIterator[bytes],
    related: RelatedType = RELATED,
    *,
    max_part_bytes: int = 64 * MiB,
    max_parts: int = 1000,
    **kwargs: Any,
) -> list[Got]:
    got = []
    async for part in iter_parts(
        chunks, related, max_part_bytes=max_part_bytes, max_parts=max_parts, **kwargs
    ):
        with part:
            assert part.file.tell() == 0
            got.append(Got(part.index, part.headers, part.file.read(), part.size, part.sha256))
    return got


def bodies_of(got: Sequence[Got]) -> list[bytes]:
    return [g.body for g in got]


def parse(body: bytes, chunk_size: int | None = None, **kwargs: Any) -> list[Got]:
    return asyncio.run(collect(in_chunks(body, chunk_size or len(body) or 1), **kwargs))


class TestContentType:
    def test_the_header_dicomweb_client_sends_gives_the_boundary_and_the_dicom_type(self) -> None:
        related = parse_content_type(
            'multipart/related; type="application/dicom"; '
            'boundary="0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"'
        )
        assert related == RelatedType(boundary=BOUNDARY, type="application/dicom", start=None)

    @pytest.mark.parametrize(
        "header",
        [
            "multipart/related; type=application/dicom; boundary=abc",
            'Multipart/Related;TYPE="Application/DICOM";Boundary=abc',
            'multipart/related ;  boundary = "abc" ; type = "application/dicom" ;',
            'multipart/related; boundary=abc; type="application/dicom"; start="<root@x>"',
        ],
    )
    def test_quoting_spacing_order_and_case_of_parameters_do_not_matter(self, header: str) -> None:
        related = parse_content_type(header)
        assert (related.boundary, related.type) == (b"abc", "application/dicom")

    def test_the_start_parameter_is_kept(self) -> None:
        related = parse_content_type(
            'multipart/related; type="application/dicom"; boundary=b; start="<root@x>"'
        )
        assert related.start == "<root@x>"

    def test_a_boundary_is_case_sensitive_and_may_hold_spaces_and_rfc_2046_punctuation(
        self,
    ) -> None:
        related = parse_content_type('multipart/related; boundary="Ab c\'()+_,-./:=?"')
        assert related.boundary == b"Ab c'()+_,-./:=?"

    def test_an_absent_type_parameter_is_tolerated_and_reported_as_none(self) -> None:
        assert parse_content_type("multipart/related; boundary=abc").type is None

    @pytest.mark.parametrize(
        "header",
        [
            None,
            "",
            "application/dicom",
            "multipart/mixed; boundary=abc",
            "multipart/form-data; boundary=abc",
            'multipart/related; type="application/dicom"',
            'multipart/related; type="application/dicom+json"; boundary=abc',
            'multipart/related; type="application/octet-stream"; boundary=abc',
            'multipart/related; boundary=""',
            "multipart/related; boundary=" + "x" * 201,
            'multipart/related; boundary="ends in space "',
            "multipart/related; boundary=a<b>",
            "multipart/related; boundary=abc; boundary=def",
            "multipart/related; boundary",
            'multipart/related; boundary="unterminated',
        ],
    )
    def test_anything_but_multipart_related_of_dicom_with_a_usable_boundary_is_415(
        self, header: str | None
    ) -> None:
        with pytest.raises(UnsupportedMediaType) as caught:
            parse_content_type(header)
        assert caught.value.status_code == 415

    def test_a_boundary_of_seventy_characters_is_the_longest_accepted(self) -> None:
        assert parse_content_type("multipart/related; boundary=" + "x" * 70).boundary == b"x" * 70


class TestParts:
    def test_a_single_part_yields_its_headers_body_size_and_sha256(self) -> None:
        body = b"DICM-ish \x00\xff bytes"
        (got,) = parse(encode([body], headers=b"Content-Type: application/dicom\r\nX-A: 1\r\n"))
        assert got == Got(
            0,
            {"content-type": "application/dicom", "x-a": "1"},
            body,
            len(body),
            hashlib.sha256(body).hexdigest(),
        )

    def test_content_type_and_media_type_come_from_the_part_headers(self) -> None:
        data = encode([b"x"], headers=b"CONTENT-TYPE: Application/DICOM; transfer-syntax=1.2\r\n")

        async def first() -> tuple[str | None, str | None]:
            parts = iter_parts(in_chunks(data, 3), RELATED, max_part_bytes=10, max_parts=1)
            async with aclosing(parts):
                async for part in parts:
                    with part:
                        return part.content_type, part.media_type
            raise AssertionError("no part")

        assert asyncio.run(first()) == (
            "Application/DICOM; transfer-syntax=1.2",
            "application/dicom",
        )

    @pytest.mark.parametrize("chunk_size", [1, 7, 64 * KiB])
    def test_many_parts_arrive_intact_in_order_whatever_the_chunk_size(
        self, chunk_size: int
    ) -> None:
        bodies = [bytes([i]) * (i * 997 % 5000) + b"\r\n--" + BOUNDARY[: i % 30] for i in range(60)]
        got = parse(encode(bodies), chunk_size)
        assert bodies_of(got) == bodies
        assert [g.number for g in got] == list(range(60))
        assert [g.sha256 for g in got] == [hashlib.sha256(b).hexdigest() for b in bodies]
        assert [g.size for g in got] == [len(b) for b in bodies]

    def test_a_boundary_split_at_any_byte_between_two_chunks_is_still_found(self) -> None:
        bodies = [b"first\r\n", b"\r\n--" + BOUNDARY + b"X", b""]
        data = encode(bodies, preamble=b"pre", epilogue=b"\r\npost")
        for cut in range(len(data) + 1):
            got = asyncio.run(collect(split_at(data, [cut])))
            assert bodies_of(got) == bodies, cut

    @pytest.mark.parametrize(
        "body",
        [
            b"--" + BOUNDARY,  # no leading CRLF
            b"x--" + BOUNDARY + b"\r\n",
            b"\r\n--" + BOUNDARY + b"X\r\n",  # different suffix
            b"\r\n--" + BOUNDARY + b"-\r\n",
            b"\r\n--" + BOUNDARY + b" x\r\n",  # padding, then not CRLF
            b"\r\n--" + BOUNDARY[:-1] + b"\r\n",  # a prefix of the boundary
            b"\n--" + BOUNDARY + b"\r\n",  # bare LF is not a delimiter
            b"\r\n--" + BOUNDARY + b"\n",
        ],
    )
    def test_boundary_look_alikes_inside_a_body_are_body_data(self, body: bytes) -> None:
        for chunk_size in (1, 7, 4096):
            assert bodies_of(parse(encode([body, b"after"]), chunk_size)) == [body, b"after"]

    def test_crlf_inside_and_at_the_end_of_a_body_belongs_to_the_body(self) -> None:
        bodies = [b"\r\n", b"a\r\n\r\nb\r\n", b"\r\n\r\n"]
        assert bodies_of(parse(encode(bodies), 1)) == bodies

    def test_preamble_and_epilogue_are_ignored(self) -> None:
        data = encode(
            [b"one", b"two"],
            preamble=b"This is a preamble.\r\n--not-the-boundary",
            epilogue=b"\r\nThis is the epilogue.\r\n--" + BOUNDARY + b"\r\n",
        )
        assert bodies_of(parse(data, 5)) == [b"one", b"two"]

    def test_transport_padding_after_a_boundary_is_tolerated(self) -> None:
        data = (
            b"--" + BOUNDARY + b" \t \r\n\r\none"
            b"\r\n--" + BOUNDARY + b"\t\r\n\r\ntwo"
            b"\r\n--" + BOUNDARY + b"--  \r\n"
        )
        assert bodies_of(parse(data, 2)) == [b"one", b"two"]

    def test_an_empty_body_and_a_part_without_headers_are_parts_too(self) -> None:
        data = encode([b"", b"x"], headers=b"")
        got = parse(data, 1)
        assert [(g.headers, g.body, g.size) for g in got] == [({}, b"", 0), ({}, b"x", 1)]
        assert got[0].sha256 == hashlib.sha256(b"").hexdigest()

    def test_a_body_without_trailing_crlf_after_the_close_delimiter_ends_cleanly(self) -> None:
        # Exactly how dicomweb-client ends its bodies: "...\r\n--boundary--" and nothing more.
        assert encode([b"x"]).endswith(b"--" + BOUNDARY + b"--")
        assert bodies_of(parse(encode([b"x"]), 1)) == [b"x"]

    def test_folded_and_repeated_headers_are_joined(self) -> None:
        headers = b"X-Long: a\r\n  b\r\nX-Rep: 1\r\nx-rep: 2\r\n"
        (got,) = parse(encode([b"x"], headers=headers), 3)
        assert got.headers == {"x-long": "a b", "x-rep": "1, 2"}

    def test_the_epilogue_is_read_to_the_end_of_the_request(self) -> None:
        pulled = []

        async def source() -> AsyncIterator[bytes]:
            for chunk in [encode([b"x"]), b"\r\nepilogue", b" more"]:
                pulled.append(chunk)
                yield chunk

        assert bodies_of(asyncio.run(collect(source()))) == [b"x"]
        assert len(pulled) == 3


def _real_delimiter(boundary: bytes) -> re.Pattern[bytes]:
    return re.compile(rb"\r\n--" + re.escape(boundary) + rb"([ \t]*\r\n|--)")


_PIECES = [b"\r\n", b"\r", b"\n", b"-", b"--", b" ", b"x", b"\x00", BOUNDARY, BOUNDARY[:5]]


def _is_a_clean_body(body: bytes) -> bool:
    # The first real delimiter after this body must be the one the encoder appends.
    found = _real_delimiter(BOUNDARY).search(body + b"\r\n--" + BOUNDARY + b"--")
    return found is not None and found.start() == len(body)


tricky_bodies = (
    st.lists(st.sampled_from(_PIECES) | st.binary(max_size=40), max_size=12)
    .map(b"".join)
    .filter(_is_a_clean_body)
)


class TestAnySplit:
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(bodies=st.lists(tricky_bodies, min_size=1, max_size=6), data=st.data())
    def test_any_split_of_the_same_body_yields_the_same_parts_and_digests(
        self, bodies: list[bytes], data: st.DataObject
    ) -> None:
        payload = encode(bodies, preamble=b"pre--" + BOUNDARY, epilogue=b"\r\n--" + BOUNDARY)
        cuts = data.draw(st.lists(st.integers(0, len(payload)), max_size=30))
        got = asyncio.run(collect(split_at(payload, cuts)))
        assert bodies_of(got) == bodies
        assert [g.sha256 for g in got] == [hashlib.sha256(b).hexdigest() for b in bodies]
        assert [g.size for g in got] == [len(b) for b in bodies]

    @settings(max_examples=100, deadline=None)
    @given(payload=st.binary(max_size=300), data=st.data())
    def test_any_split_of_arbitrary_bytes_gives_the_same_outcome_as_one_chunk(
        self, payload: bytes, data: st.DataObject
    ) -> None:
        payload = data.draw(st.sampled_from([b"", b"--" + BOUNDARY + b"\r\n\r\n"])) + payload
        cuts = data.draw(st.lists(st.integers(0, len(payload)), max_size=20))

        def outcome(chunks: AsyncIterator[bytes]) -> object:
            try:
                return asyncio.run(collect(chunks, max_part_bytes=200, max_parts=3))
            except MalformedMultipart as exc:
                return type(exc)

        assert outcome(split_at(payload, cuts)) == outcome(split_at(payload, []))


class TestMalformed:
    @pytest.mark.parametrize(
        "data",
        [
            b"",
            b"no boundary at all",
            b"--" + BOUNDARY + b"--",  # a close delimiter and no part
            b"--" + BOUNDARY + b"\r\nContent-Type: application/dicom\r\n\r\nbody",
            b"--" + BOUNDARY + b"\r\nContent-Type: application/dicom\r\n\r\nbody\r\n--" + BOUNDARY,
            b"--" + BOUNDARY + b"\r\nContent-Type: application/dic",
            b"--" + BOUNDARY + b"\r\n\r\nbody\r\n--" + BOUNDARY + b"\r\n",
            b"--" + BOUNDARY + b"\r\n\r\nbody\r\n--" + BOUNDARY + b"-",
        ],
    )
    def test_a_body_that_ends_before_its_closing_boundary_is_malformed(self, data: bytes) -> None:
        for chunk_size in (1, 64 * KiB):
            with pytest.raises(MalformedMultipart) as caught:
                parse(data, chunk_size)
            assert caught.value.status_code == 400

    def test_parts_before_the_truncation_are_yielded_before_the_error(self) -> None:
        data = encode([b"one", b"two"])[:-10]
        got: list[bytes] = []

        async def run() -> None:
            async for part in iter_parts(
                in_chunks(data, 4), RELATED, max_part_bytes=100, max_parts=10
            ):
                with part:
                    got.append(part.file.read())

        with pytest.raises(MalformedMultipart, match="before the closing boundary"):
            asyncio.run(run())
        assert got == [b"one"]

    def test_a_header_block_larger_than_the_limit_is_malformed(self) -> None:
        headers = b"X-Big: " + b"a" * multipart.MAX_HEADER_BYTES + b"\r\n"
        with pytest.raises(MalformedMultipart, match="header block"):
            parse(encode([b"x"], headers=headers), 1000)

    def test_a_header_block_that_never_ends_is_refused_without_reading_the_rest(self) -> None:
        pulled = 0

        async def endless() -> AsyncIterator[bytes]:
            nonlocal pulled
            yield b"--" + BOUNDARY + b"\r\nX: "
            while True:
                pulled += 1
                yield b"a" * 1000

        with pytest.raises(MalformedMultipart, match="header block"):
            asyncio.run(collect(endless()))
        assert pulled <= multipart.MAX_HEADER_BYTES // 1000 + 2

    def test_a_header_line_without_a_colon_is_malformed(self) -> None:
        with pytest.raises(MalformedMultipart, match="header line 1 is malformed"):
            parse(encode([b"x"], headers=b"Content-Type application/dicom\r\n"))

    def test_a_malformed_header_line_is_not_quoted(self) -> None:
        # The sender's text (here a patient's name in a description) goes into no log.
        headers = b"Content-Type: application/dicom\r\nDescription Jansen^Piet 19700101\r\n"
        with pytest.raises(MalformedMultipart) as refused:
            parse(encode([b"x"], headers=headers))
        assert "line 2" in str(refused.value)
        assert "Jansen" not in str(refused.value) and "1970" not in str(refused.value)

    def test_a_preamble_longer_than_the_limit_is_refused(self) -> None:
        data = b"junk " * (multipart.MAX_PREAMBLE_BYTES // 4) + encode([b"x"])
        with pytest.raises(MalformedMultipart, match="no opening boundary"):
            parse(data, 4096)

    def test_more_than_the_allowed_transport_padding_is_malformed(self) -> None:
        data = b"--" + BOUNDARY + b" " * (multipart.MAX_PADDING + 1) + b"\r\n\r\nx"
        with pytest.raises(MalformedMultipart, match="padding"):
            parse(data + b"\r\n--" + BOUNDARY + b"--", 100)


class TestLimits:
    def test_exactly_max_parts_parts_are_accepted(self) -> None:
        assert len(parse(encode([b"x"] * 5), 3, max_parts=5)) == 5

    def test_one_part_more_than_max_parts_is_too_large_after_the_allowed_ones(self) -> None:
        got: list[int] = []

        async def run() -> None:
            async for part in iter_parts(
                in_chunks(encode([b"x"] * 6), 3), RELATED, max_part_bytes=10, max_parts=5
            ):
                with part:
                    got.append(part.index)

        with pytest.raises(PayloadTooLarge, match="more than 5 parts") as caught:
            asyncio.run(run())
        assert got == [0, 1, 2, 3, 4]
        assert isinstance(caught.value, MalformedMultipart)
        assert caught.value.status_code == 413

    @pytest.mark.parametrize("chunk_size", [1, 7, 64 * KiB])
    def test_a_part_of_exactly_max_part_bytes_is_accepted(self, chunk_size: int) -> None:
        (got,) = parse(encode([b"a" * 1000]), chunk_size, max_part_bytes=1000)
        assert got.size == 1000

    @pytest.mark.parametrize("chunk_size", [1, 7, 64 * KiB])
    def test_a_part_one_byte_over_max_part_bytes_is_too_large(self, chunk_size: int) -> None:
        with pytest.raises(PayloadTooLarge, match="part 1 is larger than 1000 bytes"):
            parse(encode([b"ok", b"a" * 1001]), chunk_size, max_part_bytes=1000)

    def test_a_huge_part_is_refused_after_reading_little_more_than_the_limit(self) -> None:
        pulled = 0

        async def endless() -> AsyncIterator[bytes]:
            nonlocal pulled
            yield b"--" + BOUNDARY + b"\r\n\r\n"
            while True:
                pulled += 1
                yield b"a" * KiB

        with pytest.raises(PayloadTooLarge):
            asyncio.run(collect(endless(), max_part_bytes=100 * KiB))
        assert pulled <= 101

    @pytest.mark.parametrize(
        "limits",
        [
            {"max_parts": 0, "max_part_bytes": 1},
            {"max_parts": 1, "max_part_bytes": -1},
            {"max_parts": 1, "max_part_bytes": 1, "spool_memory": -1},
        ],
    )
    def test_nonsensical_limits_are_a_programming_error(self, limits: dict[str, Any]) -> None:
        with pytest.raises(ValueError):
            asyncio.run(collect(in_chunks(encode([b"x"]), 10), **limits))


class TestSpoolingAndBackpressure:
    def test_a_part_within_spool_memory_never_touches_the_spool_dir(self, tmp_path: Path) -> None:
        missing = tmp_path / "missing"
        got = parse(encode([b"a" * 1000]), 100, spool_memory=1000, spool_dir=missing)
        assert bodies_of(got) == [b"a" * 1000]

    def test_a_part_larger_than_spool_memory_goes_to_the_spool_dir(self, tmp_path: Path) -> None:
        # A spool dir that does not exist shows that the part rolled over to it.
        with pytest.raises(FileNotFoundError):
            parse(encode([b"a" * 1001]), 100, spool_memory=1000, spool_dir=tmp_path / "missing")
        got = parse(encode([b"a" * 1001]), 100, spool_memory=1000, spool_dir=tmp_path)
        assert bodies_of(got) == [b"a" * 1001]

    def test_spool_memory_zero_spools_every_part_to_disk(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            parse(encode([b"a"]), 100, spool_memory=0, spool_dir=tmp_path / "missing")

    def test_the_spool_of_an_unfinished_part_is_closed_when_the_body_goes_wrong(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        spools: list[Any] = []
        real = tempfile.SpooledTemporaryFile

        def recording(*args: Any, **kwargs: Any) -> Any:
            spools.append(real(*args, **kwargs))
            return spools[-1]

        monkeypatch.setattr(multipart.tempfile, "SpooledTemporaryFile", recording)
        with pytest.raises(PayloadTooLarge):
            parse(encode([b"ok", b"a" * 2000]), 100, max_part_bytes=1000)
        with pytest.raises(MalformedMultipart):
            parse(encode([b"ok", b"a" * 20])[:-12], 100)
        assert len(spools) == 4
        assert all(spool.closed for spool in spools)

    def test_the_spool_of_the_part_being_received_is_closed_when_the_request_stream_fails(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        spools: list[Any] = []
        real = tempfile.SpooledTemporaryFile

        def recording(*args: Any, **kwargs: Any) -> Any:
            spools.append(real(*args, **kwargs))
            return spools[-1]

        monkeypatch.setattr(multipart.tempfile, "SpooledTemporaryFile", recording)
        data = encode([b"one", b"two" * 100])

        async def disconnecting() -> AsyncIterator[bytes]:
            yield data[:-100]
            raise ConnectionResetError("client went away")

        with pytest.raises(ConnectionResetError):
            asyncio.run(collect(disconnecting()))
        assert len(spools) == 2
        assert all(spool.closed for spool in spools)

    def test_cancelling_the_request_while_a_chunk_is_parsed_in_a_thread_closes_every_spool(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        spools: list[Any] = []
        real = tempfile.SpooledTemporaryFile

        def recording(*args: Any, **kwargs: Any) -> Any:
            spools.append(real(*args, **kwargs))
            return spools[-1]

        monkeypatch.setattr(multipart.tempfile, "SpooledTemporaryFile", recording)
        block = b"a" * MiB

        async def endless() -> AsyncIterator[bytes]:
            yield b"--" + BOUNDARY + b"\r\n\r\n"
            while True:
                yield block

        async def run() -> None:
            task = asyncio.create_task(collect(endless(), max_part_bytes=1 << 40, spool_memory=0))
            while not spools:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(run())
        assert len(spools) == 1
        assert spools[0].closed

    @pytest.mark.parametrize("chunk_size", [64 * KiB, MiB])
    def test_parts_spooled_to_disk_in_a_worker_thread_are_the_same_as_inline(
        self, chunk_size: int, tmp_path: Path
    ) -> None:
        bodies = [bytes([i]) * (i * 77_777) + b"\r\n--" + BOUNDARY[:i] for i in range(12)]
        data = encode(bodies, preamble=b"pre", epilogue=b"post")
        inline = parse(data, 1000, spool_memory=64 * MiB)
        offloaded = parse(data, chunk_size, spool_memory=100 * KiB, spool_dir=tmp_path)
        assert offloaded == inline
        assert bodies_of(offloaded) == bodies

    def test_a_part_is_yielded_before_the_rest_of_the_body_is_read(self) -> None:
        data = encode([b"a" * 10 * KiB, b"b" * 10 * KiB, b"c" * 10 * KiB])
        first_delimiter_end = data.index(b"\r\n--" + BOUNDARY, 1) + len(BOUNDARY) + 6
        pulled = 0

        async def source() -> AsyncIterator[bytes]:
            nonlocal pulled
            for start in range(0, len(data), KiB):
                pulled += 1
                yield data[start : start + KiB]

        async def run() -> list[int]:
            seen = []
            async for part in iter_parts(source(), RELATED, max_part_bytes=MiB, max_parts=9):
                with part:
                    seen.append(pulled)
            return seen

        seen = asyncio.run(run())
        assert seen[0] == -(-first_delimiter_end // KiB)
        assert seen[0] < seen[1] < seen[2] == -(-len(data) // KiB)


def _dataset(instance: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.preamble = b"\0" * 128  # as read from a Part 10 file: dcmwrite then writes "DICM"
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3"
    ds.InstanceNumber = instance
    ds.PatientName = "Test^Interop"
    # Pixel-like payload holding CRLFs and a look-alike of the client's boundary.
    ds.add_new(0x00091010, "OB", (b"\r\n--" + BOUNDARY + b"X\r\n") * 50)
    return ds


def test_a_request_built_by_dicomweb_client_store_instances_parses_into_its_instances() -> None:
    sent: dict[str, Any] = {}
    client = DICOMwebClient(url="http://127.0.0.1:9/dicomweb")

    def capture(url: str, data: Any, headers: dict[str, str]) -> Any:
        sent.update(url=url, data=b"".join(data) if not isinstance(data, bytes) else data)
        sent["headers"] = dict(headers)
        raise _Captured

    client._http_post = capture  # type: ignore[method-assign]
    datasets = [_dataset(i) for i in range(3)]
    with pytest.raises(_Captured):
        client.store_instances(datasets)

    related = parse_content_type(sent["headers"]["Content-Type"])
    got = asyncio.run(collect(in_chunks(sent["data"], client._chunk_size), related))
    read = [pydicom.dcmread(BytesIO(g.body)) for g in got]
    assert [ds.SOPInstanceUID for ds in read] == [ds.SOPInstanceUID for ds in datasets]
    assert {g.headers["content-type"] for g in got} == {"application/dicom"}
    for g, ds in zip(got, datasets, strict=True):
        with BytesIO() as out:
            pydicom.dcmwrite(out, ds)
            assert g.sha256 == hashlib.sha256(out.getvalue()).hexdigest()


class _Captured(Exception):
    pass


_BIG_BODY_SCRIPT = textwrap.dedent(
    """
    import asyncio, hashlib, json, random, sys, time
    from services.ingest.adapters.multipart import RelatedType, iter_parts

    PARTS, PART_MIB, CHUNK = int(sys.argv[1]), int(sys.argv[2]), 1 << 20
    BOUNDARY = b"0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"
    BLOCK = random.Random(0).randbytes(CHUNK)
    digest = hashlib.sha256()
    for _ in range(PART_MIB):
        digest.update(BLOCK)
    EXPECTED = digest.hexdigest()

    def pieces():
        for i in range(PARTS):
            yield (b"\\r\\n" if i else b"") + b"--" + BOUNDARY
            yield b"\\r\\nContent-Type: application/dicom\\r\\n\\r\\n"
            for _ in range(PART_MIB):
                yield BLOCK
        yield b"\\r\\n--" + BOUNDARY + b"--"

    async def body():
        # Re-cut into exact 1 MiB chunks, so delimiters straddle chunk borders.
        pending = b""
        for piece in pieces():
            pending += piece
            while len(pending) >= CHUNK:
                yield pending[:CHUNK]
                pending = pending[CHUNK:]
        if pending:
            yield pending

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    async def main():
        seen = []
        async for part in iter_parts(
            body(), RelatedType(BOUNDARY, "application/dicom"),
            max_part_bytes=PART_MIB << 20, max_parts=PARTS, spool_dir=sys.argv[3],
        ):
            with part:
                seen.append((part.size, part.sha256))
        return seen

    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    before = status("VmRSS:")
    started = time.perf_counter()
    seen = asyncio.run(main())
    elapsed = time.perf_counter() - started
    print(json.dumps({
        "ok": seen == [(PART_MIB << 20, EXPECTED)] * PARTS,
        "rss_growth_kib": status("VmHWM:") - before,
        "mib_per_s": PARTS * PART_MIB / elapsed,
    }))
    """
)


def _run_big_body(parts: int, part_mib: int, spool_dir: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _BIG_BODY_SCRIPT, str(parts), str(part_mib), str(spool_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_a_one_gib_body_of_four_parts_parses_with_less_than_64_mib_peak_rss_growth(
    tmp_path: Path,
) -> None:
    # Measured through Linux's /proc (VmHWM after clear_refs): these machines are Linux.
    assert Path("/proc/self/clear_refs").exists(), "peak RSS is measured through /proc"
    result = _run_big_body(parts=4, part_mib=256, spool_dir=tmp_path)
    print(f"1 GiB body: {result['mib_per_s']:.0f} MiB/s, peak RSS +{result['rss_growth_kib']} KiB")
    assert result["ok"]
    assert result["rss_growth_kib"] < 64 * 1024


def test_a_boundary_longer_than_rfc_2046_allows_is_accepted_as_orthanc_sends_one() -> None:
    boundary = "40e6e4be-a2b2-4323-aae1-38e932e262b5-40e6e4be-a2b2-4323-aae1-38e932e262b5"
    related = parse_content_type(
        f'multipart/related; type="application/dicom"; boundary={boundary}'
    )
    assert related.boundary == boundary.encode()

"""Streaming ``multipart/related`` parser for STOW-RS bodies: bounded memory, spooled and hashed."""

# Grammar (RFC 2046 §5.1.1): a delimiter is CRLF "--" boundary; a part's body ends right before
# that CRLF. The opening delimiter may come without the CRLF (no preamble); the parser treats the
# stream as if it began with CRLF, so the opening and every later delimiter are found the same way.
# "--" boundary is a delimiter only if followed by optional transport padding (SP/HT) and CRLF,
# or by "--" (the close delimiter); anything else ("--boundaryX") is ordinary body data.
#
# Memory: at most one input chunk (or a 1 MiB batch of them), a carry-over of len(delimiter) +
# padding bytes, one header block (MAX_HEADER_BYTES) and the in-memory part of one spool
# (spool_memory) are held by the parser.
# Each chunk is parsed whole (those bound for disk batched to 1 MiB, in a worker thread); the parts
# it completed are then yielded, and the next chunk is only pulled when the consumer asks for the
# next part, so a slow consumer slows the reading of the request (backpressure).

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
import threading
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Literal, Self

from shared.errors import BeeldportaalError

MiB = 1024 * 1024
DICOM_MEDIA_TYPE = "application/dicom"
# One part's header block (Content-Type, Content-Length, Content-ID, ...): a few hundred bytes.
MAX_HEADER_BYTES = 16 * 1024
# Transport padding allowed between a boundary and its CRLF.
MAX_PADDING = 256
# A preamble is never sent by DICOMweb clients; more than this before the first boundary is junk.
MAX_PREAMBLE_BYTES = 64 * 1024
# After the close delimiter the epilogue is read (so the request is consumed to its end) and
# discarded, up to this much; a longer one is left unread.
MAX_EPILOGUE_BYTES = 64 * 1024
# Body bytes bound for a spool on disk are parsed in a worker thread, this many at a time.
OFFLOAD_BATCH_BYTES = 1024 * 1024

_CRLF = b"\r\n"
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf'\s*;\s*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;"]+))\s*')
_QUOTED_PAIR = re.compile(r"\\(.)")
# RFC 2046 bchars; a boundary may contain spaces but not end in one.
# RFC 2046 caps a boundary at 70 characters, but real senders exceed it (Orthanc's DICOMweb
# plugin 1.7 sends 73): be liberal in what is accepted, within a bound.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,199}[0-9A-Za-z'()+_,\-./:=?]")
_PADDING = re.compile(rb"[ \t]{0,%d}" % (MAX_PADDING + 1))


class MultipartError(BeeldportaalError):
    """The request body cannot be accepted; ``status_code`` is the HTTP answer (PS3.18 §10.5.3)."""

    status_code = 400


class UnsupportedMediaType(MultipartError):
    """Content-Type is not ``multipart/related`` of ``application/dicom`` with a usable boundary."""

    status_code = 415


class MalformedMultipart(MultipartError):
    """The body breaks the multipart grammar: no opening boundary, truncated, oversized headers."""

    status_code = 400


class PayloadTooLarge(MalformedMultipart):
    """A limit was exceeded (too many parts, a part too large). Answer 413, or 400 as its base."""

    status_code = 413


@dataclass(frozen=True)
class RelatedType:
    """The parameters of a ``multipart/related`` Content-Type that the parser needs."""

    boundary: bytes
    # The ``type`` parameter, lower-cased; None when the client left it out.
    type: str | None = None
    # The ``start`` parameter (Content-ID of the root part); informational, STOW-RS ignores it.
    start: str | None = None


def parse_content_type(header: str | None) -> RelatedType:
    """Parse a STOW-RS request Content-Type or raise :class:`UnsupportedMediaType` (HTTP 415).

    PS3.18 requires ``type="application/dicom"``. A present ``type`` of anything else is refused
    (e.g. ``application/dicom+json``, the metadata + bulk data variant, which is not supported).
    An absent ``type`` is tolerated: some clients omit it, and every part's own Content-Type is
    still checked by the caller.
    """
    if header is None or not header.strip():
        raise UnsupportedMediaType("no Content-Type; expected multipart/related")
    media_type, _, rest = header.partition(";")
    media_type = media_type.strip().lower()
    if media_type != "multipart/related":
        raise UnsupportedMediaType(f"Content-Type {media_type!r} is not multipart/related")
    params: dict[str, str] = {}
    rest = ";" + rest if rest else ""
    pos = 0
    while pos < len(rest):
        if not rest[pos:].strip(" \t;"):  # trailing ";" or whitespace
            break
        match = _PARAM.match(rest, pos)
        if match is None:
            raise UnsupportedMediaType(f"cannot parse Content-Type parameters {rest[pos:]!r}")
        name = match.group(1).lower()
        quoted, token = match.group(2), match.group(3)
        value = _QUOTED_PAIR.sub(r"\1", quoted) if quoted is not None else token
        if name in params:
            raise UnsupportedMediaType(f"Content-Type parameter {name!r} is given twice")
        params[name] = value
        pos = match.end()
    boundary = params.get("boundary")
    if boundary is None:
        raise UnsupportedMediaType("multipart/related without a boundary parameter")
    if not _BOUNDARY.fullmatch(boundary):
        raise UnsupportedMediaType(
            "boundary must be 1 to 200 characters from RFC 2046 bchars, not ending in a space"
        )
    related_type = params.get("type")
    if related_type is not None:
        related_type = related_type.split(";", 1)[0].strip().lower()
        if related_type != DICOM_MEDIA_TYPE:
            raise UnsupportedMediaType(
                f'multipart/related type="{related_type}" is not supported; '
                f'send type="{DICOM_MEDIA_TYPE}"'
            )
    return RelatedType(
        boundary=boundary.encode("ascii"), type=related_type, start=params.get("start")
    )


@dataclass(eq=False)
class SpooledPart:
    """One received part: its headers and its body, spooled (memory, then disk) and hashed.

    ``file`` is positioned at 0. The consumer owns the part and must ``close()`` it (or use it as a
    context manager); a spool that rolled over to disk is deleted on close.
    """

    index: int  # 0-based position in the request
    headers: dict[str, str]  # names lower-cased; repeated headers joined with ", "
    file: IO[bytes]
    size: int
    sha256: str  # hex digest of exactly the body bytes

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")

    @property
    def media_type(self) -> str | None:
        """Content-Type without parameters, lower-cased (``application/dicom``)."""
        if self.content_type is None:
            return None
        return self.content_type.split(";", 1)[0].strip().lower()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def iter_parts(
    chunks: AsyncIterable[bytes],
    related: RelatedType,
    *,
    max_part_bytes: int,
    max_parts: int,
    spool_memory: int = 8 * MiB,
    spool_dir: str | os.PathLike[str] | None = None,
) -> AsyncGenerator[SpooledPart, None]:
    """Yield each part of the body as soon as the chunk that completes it has been parsed.

    A part belongs to the consumer once yielded. Raises :class:`MalformedMultipart` (or its
    :class:`PayloadTooLarge`) where the body goes wrong, after yielding every part completed before
    that point. Whatever the parser still holds when it stops (error, ``aclose``, cancellation,
    a failing ``chunks``) is closed here.
    """
    if max_parts < 1 or max_part_bytes < 0 or spool_memory < 0:
        raise ValueError("max_parts must be >= 1, max_part_bytes and spool_memory >= 0")
    parser = _Parser(related.boundary, max_part_bytes, max_parts, spool_memory, spool_dir)
    # Chunks bound for a spool on disk are batched up to OFFLOAD_BATCH_BYTES and parsed in a
    # worker thread: hashing and writing them can take milliseconds (far longer under dirty-page
    # throttling) and must not stall the event loop. One thread hop per small chunk would cost
    # more than it saves, and in-memory spools are cheap, so everything else is parsed inline.
    batch: list[bytes] = []
    batched = 0
    try:
        async for chunk in chunks:
            if parser.done:
                if not parser.discard_epilogue(len(chunk)):
                    break
                continue
            if parser.would_hit_disk(batched + len(chunk)):
                batch.append(chunk)
                batched += len(chunk)
                if batched < OFFLOAD_BATCH_BYTES:
                    continue
                data, batch, batched = b"".join(batch), [], 0
                await asyncio.to_thread(parser.feed_all, data)
            else:
                parser.feed_all(chunk)
            while parser.ready:
                yield parser.ready.popleft()
            parser.raise_error()
        if batch:
            parser.feed_all(b"".join(batch))
            while parser.ready:
                yield parser.ready.popleft()
            parser.raise_error()
        parser.finish()
    finally:
        parser.close()


_State = Literal["preamble", "headers", "body", "done"]
_Found = Literal["none", "more", "part", "close"]


@dataclass(eq=False)
class _Parser:
    boundary: bytes
    max_part_bytes: int
    max_parts: int
    spool_memory: int
    spool_dir: str | os.PathLike[str] | None
    state: _State = "preamble"
    parts: int = 0
    # Bytes carried over to the next chunk; the stream is read as if it began with CRLF.
    carry: bytes = _CRLF
    preamble: int = 0
    epilogue: int = 0
    header_scanned: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    spool: IO[bytes] | None = None
    digest: hashlib._Hash | None = None
    size: int = 0

    def __post_init__(self) -> None:
        self.delimiter = _CRLF + b"--" + self.boundary
        # Completed parts not yet handed to the consumer, and what stopped the parse.
        self.ready: deque[SpooledPart] = deque()
        self.error: Exception | None = None
        # A chunk may be parsed in a worker thread; close() must not race it (e.g. on cancel).
        self.lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self.state == "done"

    def would_hit_disk(self, size: int) -> bool:
        return self.state == "body" and self.size + size > self.spool_memory

    def feed_all(self, chunk: bytes) -> None:
        with self.lock:
            if self.error is not None:
                return
            try:
                self.ready.extend(self.feed(chunk))
            except Exception as exc:  # raised to the consumer after the parts before it
                self.error = exc

    def raise_error(self) -> None:
        error, self.error = self.error, None
        if error is not None:
            raise error

    def feed(self, chunk: bytes) -> Iterator[SpooledPart]:
        buf = self.carry + chunk if self.carry else bytes(chunk)
        pos = 0
        while True:
            if self.state == "body":
                found, at, end = self._scan(buf, pos)
                self._write(buf, pos, at)
                if found in ("none", "more"):
                    pos = at
                    break
                yield self._finish_part()
                pos = end
                if found == "close":
                    self.state = "done"
                    self.epilogue = len(buf) - pos
                    buf, pos = b"", 0
                    break
                self._begin_part()
            elif self.state == "headers":
                end = self._header_end(buf, pos)
                if end < 0:
                    break
                self._start_spool(buf[pos : end - 4] if end - pos > 2 else b"")
                pos = end
            elif self.state == "preamble":
                found, at, end = self._scan(buf, pos)
                # The virtual leading CRLF is not part of the preamble.
                self.preamble += at - pos
                if found in ("none", "more"):
                    pos = at
                    if self.preamble > MAX_PREAMBLE_BYTES + 2:
                        raise MalformedMultipart(
                            f"no opening boundary in the first {MAX_PREAMBLE_BYTES} bytes"
                        )
                    break
                if found == "close":
                    raise MalformedMultipart("multipart body has no parts")
                pos = end
                self._begin_part()
            else:
                break
        self.carry = buf[pos:]

    def _scan(self, buf: bytes, start: int) -> tuple[_Found, int, int]:
        """Find the next delimiter at or after ``start``.

        Returns ("part", at, after-CRLF), ("close", at, after "--"), or, when there is none yet,
        ("none", at, 0) / ("more", at, 0): everything before ``at`` is certainly not a delimiter.
        """
        delimiter = self.delimiter
        while True:
            at = buf.find(delimiter, start)
            if at < 0:
                return "none", max(start, len(buf) - len(delimiter) + 1), 0
            after = at + len(delimiter)
            if len(buf) - after < 2:
                return "more", at, 0
            if buf[after : after + 2] == b"--":
                return "close", at, after + 2
            padding = _PADDING.match(buf, after)
            assert padding is not None  # the pattern also matches zero bytes
            padding_end = padding.end()
            if padding_end - after > MAX_PADDING:
                raise MalformedMultipart(f"more than {MAX_PADDING} bytes of padding after boundary")
            tail = buf[padding_end : padding_end + 2]
            if tail == _CRLF:
                return "part", at, padding_end + 2
            if tail in (b"", b"\r"):
                return "more", at, 0
            start = at + 1  # "--boundary" followed by something else: body data

    def _header_end(self, buf: bytes, pos: int) -> int:
        """End (after CRLFCRLF) of the header block starting at ``pos``, or -1 if incomplete."""
        if len(buf) - pos < 2:
            return -1
        if buf.startswith(_CRLF, pos):  # no headers at all
            return pos + 2
        found = buf.find(b"\r\n\r\n", pos + self.header_scanned)
        if found >= 0 and found - pos <= MAX_HEADER_BYTES:
            return found + 4
        if found >= 0 or len(buf) - pos > MAX_HEADER_BYTES + 4:
            raise MalformedMultipart(
                f"part {self.parts - 1}: header block larger than {MAX_HEADER_BYTES} bytes"
            )
        self.header_scanned = max(0, len(buf) - pos - 3)
        return -1

    def _begin_part(self) -> None:
        if self.parts >= self.max_parts:
            raise PayloadTooLarge(f"more than {self.max_parts} parts in one request")
        self.parts += 1
        self.state = "headers"
        self.header_scanned = 0

    def _start_spool(self, block: bytes) -> None:
        self.headers = _parse_headers(block, self.parts - 1)
        # Owned by the parser until yielded, then by the consumer: no context manager fits.
        spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=self.spool_memory,
            mode="w+b",
            dir=None if self.spool_dir is None else os.fspath(self.spool_dir),
        )
        if self.spool_memory == 0:  # max_size=0 would mean "never roll over"
            try:
                spool.rollover()
            except BaseException:
                spool.close()
                raise
        self.spool = spool
        self.digest = hashlib.sha256()
        self.size = 0
        self.state = "body"

    def _write(self, buf: bytes, start: int, end: int) -> None:
        if end <= start:
            return
        assert self.spool is not None and self.digest is not None
        self.size += end - start
        if self.size > self.max_part_bytes:
            raise PayloadTooLarge(
                f"part {self.parts - 1} is larger than {self.max_part_bytes} bytes"
            )
        data = memoryview(buf)[start:end]
        self.digest.update(data)
        self.spool.write(data)

    def _finish_part(self) -> SpooledPart:
        assert self.spool is not None and self.digest is not None
        spool, self.spool = self.spool, None
        spool.seek(0)
        return SpooledPart(
            index=self.parts - 1,
            headers=self.headers,
            file=spool,
            size=self.size,
            sha256=self.digest.hexdigest(),
        )

    def discard_epilogue(self, size: int) -> bool:
        self.epilogue += size
        return self.epilogue <= MAX_EPILOGUE_BYTES

    def finish(self) -> None:
        if self.state == "done":
            return
        if self.state == "preamble":
            raise MalformedMultipart("body ended without an opening boundary")
        raise MalformedMultipart(
            f"body ended inside part {self.parts - 1}, before the closing boundary"
        )

    def close(self) -> None:
        with self.lock:
            if self.spool is not None:
                self.spool.close()
                self.spool = None
            while self.ready:
                self.ready.popleft().close()


def _parse_headers(block: bytes, index: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    name = ""
    for number, raw in enumerate(block.split(_CRLF) if block else (), start=1):
        line = raw.decode("latin-1")
        if line[:1] in (" ", "\t") and name:  # obsolete line folding (RFC 5322 §2.2.3)
            headers[name] = f"{headers[name]} {line.strip()}".strip()
            continue
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if not sep or not key or not re.fullmatch(_TOKEN, key):
            # Not quoted: the line is the sender's (a file name, a description), and the
            # error goes into the log.
            raise MalformedMultipart(f"part {index}: header line {number} is malformed")
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
        name = key
    return headers

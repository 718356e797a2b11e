"""Portal pickup for providers without an integration: signed links, and the study as a zip.

A pickup token is ``<payload>.<mac>``, both unpadded base64url (so it is safe in a URL path):

* payload = the UTF-8 lines ``v2``, Study Instance UID, study version, recipient URA, sender
  URA and the expiry in Unix seconds, joined by ``\\n``. Identifiers only: no BSN, no
  pseudonym, no name. The sender is there because versions are numbered per sender: two
  organisations sending one Study Instance UID to one recipient each have a version 1. Links
  signed before 2026-11-27 are ``v1``, without the sender, and still verify: they name the
  version of the one sender that routed it to the recipient's pickup.
* mac = HMAC-SHA256(key, ``beeldportaal:pickup:v1\\0`` + payload): the prefix keeps a pickup MAC
  from ever being valid for any other use of the same key.

The token is a reference, not a bearer credential on its own: the portal still requires a
logged-in user whose organisation is :attr:`PickupGrant.recipient_ura`. Verification accepts
several keys (newest first) so a key can be rotated without breaking links already sent.

:func:`zip_entries` streams the study as a zip (stored, not compressed: DICOM pixel data is
mostly compressed already) without holding it in memory; names come from :func:`dicom_entry_name`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, NamedTuple, cast

from pydantic import TypeAdapter, ValidationError

from shared.events.common import DicomUid
from shared.identifiers import Ura

MIN_KEY_BYTES = 32
MAX_TOKEN_CHARS = 512
PICKUP_PATH_PREFIX = "/pickup/"

_VERSION = "v2"
_WITHOUT_SENDER = "v1"
_MAC_DOMAIN = b"beeldportaal:pickup:v1\x00"
_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")
_DIGITS = re.compile(r"^(0|[1-9][0-9]{0,17})$")  # canonical: no sign, no leading zeros
_UID: TypeAdapter[str] = TypeAdapter(DicomUid)
_URA: TypeAdapter[str] = TypeAdapter(Ura)


class PickupTokenError(ValueError):
    """A pickup token that grants nothing. Messages never repeat the token."""


class MalformedPickupToken(PickupTokenError):
    """Not a pickup token at all (truncated, wrong shape, not base64url)."""


class TamperedPickupToken(PickupTokenError):
    """Well-formed, but no key of ours signed it: altered, forged, or signed with a retired key."""


@dataclass(frozen=True, slots=True)
class PickupGrant:
    """What a genuine, unexpired token refers to."""

    study_instance_uid: str
    study_version: int
    recipient_ura: str
    expires_at: datetime
    # None for a link signed before links named the sender (v1).
    sender_ura: str | None = None


class ExpiredPickupToken(PickupTokenError):
    """Genuine but past its expiry; the portal can offer to send a fresh link. ``grant`` is
    what the link granted (genuine, so the refusal's audit record may name the study)."""

    def __init__(self, grant: PickupGrant) -> None:
        super().__init__(f"the pickup link expired at {grant.expires_at.isoformat()}")
        self.grant = grant

    @property
    def expired_at(self) -> datetime:
        return self.grant.expires_at


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not _B64URL.match(text):
        raise MalformedPickupToken("a pickup token is base64url text")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise MalformedPickupToken("a pickup token is base64url text") from None
    # One token, one spelling: unused low bits in the last character would otherwise let
    # several strings decode to the same signed bytes.
    if _b64encode(data) != text:
        raise MalformedPickupToken("a pickup token is not canonically encoded")
    return data


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        raise ValueError(f"a pickup signing key must be at least {MIN_KEY_BYTES} bytes")
    return key


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(_check_key(key), _MAC_DOMAIN + payload, hashlib.sha256).digest()


def _aware(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime")
    return moment


def sign_pickup(
    study_uid: str,
    version: int,
    recipient_ura: str,
    sender_ura: str | None,
    expires_at: datetime,
    key: bytes,
) -> str:
    """A URL-safe token granting ``recipient_ura`` this study version of ``sender_ura`` until
    ``expires_at``; a ``v1`` token for None (a delivery written before deliveries named their
    sender).

    The expiry is kept to the whole second, rounded down (a link never lives longer than asked).
    """
    try:
        _UID.validate_python(study_uid)
        _URA.validate_python(recipient_ura)
        if sender_ura is not None:
            _URA.validate_python(sender_ura)
    except ValidationError:
        raise ValueError("a pickup link needs a valid Study Instance UID and URA") from None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError("a study version is an integer >= 1")
    expiry = int(_aware(expires_at, "expires_at").timestamp())
    if expiry < 0:
        raise ValueError("expires_at is before 1970")
    if sender_ura is None:
        fields = (_WITHOUT_SENDER, study_uid, str(version), recipient_ura, str(expiry))
    else:
        fields = (_VERSION, study_uid, str(version), recipient_ura, sender_ura, str(expiry))
    payload = "\n".join(fields).encode()
    return f"{_b64encode(payload)}.{_b64encode(_mac(key, payload))}"


def verify_pickup(token: str, key: bytes | Sequence[bytes], now: datetime) -> PickupGrant:
    """The grant a token holds; raises a :class:`PickupTokenError` subclass when it holds none.

    ``key`` may be a list of keys, newest first: a token signed by any of them is genuine.
    The signature is checked before anything in the payload is read or trusted.
    """
    keys = [key] if isinstance(key, bytes) else list(key)
    if not keys:
        raise ValueError("no pickup verification key given")
    for candidate in keys:
        _check_key(candidate)
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
        raise MalformedPickupToken("a pickup token is 1 to 512 characters of text")
    payload_text, dot, mac_text = token.partition(".")
    if not dot or not payload_text or not mac_text:
        raise MalformedPickupToken("a pickup token has two dot-separated parts")
    payload, mac = _b64decode(payload_text), _b64decode(mac_text)
    if len(mac) != hashlib.sha256().digest_size:
        raise MalformedPickupToken("a pickup token's signature has the wrong length")
    # Every key is tried (no early exit) so the timing does not tell which one matched.
    matches = [hmac.compare_digest(_mac(k, payload), mac) for k in keys]
    if not any(matches):
        raise TamperedPickupToken("the pickup link's signature does not match")

    grant = _parse(payload)
    if _aware(now, "now") >= grant.expires_at:
        raise ExpiredPickupToken(grant)
    return grant


def _parse(payload: bytes) -> PickupGrant:
    # Only reached with a genuine signature: a failure here is a bug or a leaked key.
    try:
        fields = payload.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise MalformedPickupToken("the pickup payload is not UTF-8") from None
    if len(fields) == 6 and fields[0] == _VERSION:
        _, study_uid, version, ura, sender, expiry = fields
    elif len(fields) == 5 and fields[0] == _WITHOUT_SENDER:
        _, study_uid, version, ura, expiry = fields
        sender = None
    else:
        raise MalformedPickupToken("the pickup payload is not a v1 or v2 payload")
    try:
        _UID.validate_python(study_uid)
        _URA.validate_python(ura)
        if sender is not None:
            _URA.validate_python(sender)
    except ValidationError:
        raise MalformedPickupToken("the pickup payload has an invalid UID or URA") from None
    if not (_DIGITS.match(version) and _DIGITS.match(expiry)) or version == "0":
        raise MalformedPickupToken("the pickup payload has an invalid version or expiry")
    try:
        expires_at = datetime.fromtimestamp(int(expiry), tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise MalformedPickupToken("the pickup payload's expiry is out of range") from None
    return PickupGrant(study_uid, int(version), ura, expires_at, sender)


def pickup_path(token: str) -> str:
    """``/pickup/{token}``: safe in a URL, since the token holds no patient identifier."""
    if not token or "." not in token or not _B64URL.match(token.replace(".", "", 1)):
        raise ValueError("not a pickup token")
    return PICKUP_PATH_PREFIX + token


# --- the study as a zip ---------------------------------------------------------------------------

_UID_CHARACTERS = re.compile(r"[^0-9.]")


def _uid_segment(uid: str) -> str:
    try:
        return _UID.validate_python(uid)
    except ValidationError:
        pass
    # Not a valid UID: keep what is safe, and tag it with a hash of the original so two
    # different bad UIDs never end up under one name.
    cleaned = re.sub(r"\.{2,}", ".", _UID_CHARACTERS.sub("_", uid)).strip(".")[:48] or "invalid"
    digest = hashlib.sha256(uid.encode("utf-8", errors="surrogatepass")).hexdigest()[:12]
    return f"{cleaned}_{digest}"


def dicom_entry_name(series_instance_uid: str, sop_instance_uid: str) -> str:
    """``DICOM/<series>/<sop>.dcm``; a UID that is not valid is made path-safe, never trusted."""
    return f"DICOM/{_uid_segment(series_instance_uid)}/{_uid_segment(sop_instance_uid)}.dcm"


class ZipMember(NamedTuple):
    """One file of the zip. ``size``, when known (InstanceRef.size), avoids ZIP64 headers for
    members under 2 GiB and is checked against the bytes actually streamed."""

    name: str
    chunks: Iterable[bytes]
    size: int | None = None


class _Sink:
    """A write-only, unseekable file: zipfile then writes data descriptors and never seeks."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts.clear()
        return data


def _check_name(name: str, seen: set[str]) -> str:
    if (
        not isinstance(name, str)
        or not name
        or name.startswith("/")
        or "\\" in name
        or any(not c.isprintable() for c in name)
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise ValueError(f"unsafe name for a zip member: {name!r}")
    if name in seen:
        raise ValueError(f"two zip members named {name!r}")
    seen.add(name)
    return name


def zip_entries(
    entries: Iterable[ZipMember | tuple[str, Iterable[bytes]]],
    *,
    modified: datetime | None = None,
) -> Iterator[bytes]:
    """Stream a zip of ``entries`` (name, chunks[, size]) as it is written.

    Memory holds one input chunk at a time, whatever the size of the study: each member is
    written with a data descriptor (sizes and CRC after its data), ZIP64 where it may pass
    2 GiB or the archive passes 4 GiB. ``modified`` is the members' time stamp (default
    1980-01-01, the zip epoch, so the same input gives the same bytes). Any reader using the
    central directory (zipfile, unzip, 7-Zip, Windows, macOS) opens it.
    """
    date_time = (modified.timetuple()[:6]) if modified else (1980, 1, 1, 0, 0, 0)
    sink = _Sink()
    seen: set[str] = set()
    fileobj = cast(IO[bytes], sink)  # zipfile needs only write() and flush()
    with zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for entry in entries:
            member = entry if isinstance(entry, ZipMember) else ZipMember(*entry)
            info = zipfile.ZipInfo(_check_name(member.name, seen), date_time=date_time)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16  # -rw-r--r-- when unpacked on Unix
            declared = member.size
            if declared is not None:
                if declared < 0:
                    raise ValueError(f"zip member {member.name!r} has a negative size")
                info.file_size = declared
            written = 0
            with archive.open(info, "w", force_zip64=declared is None) as out:
                for chunk in member.chunks:
                    if not chunk:
                        continue
                    written += len(chunk)
                    if declared is not None and written > declared:
                        raise ValueError(f"zip member {member.name!r} is larger than its size")
                    out.write(chunk)
                    yield sink.take()
            if declared is not None and written != declared:
                raise ValueError(f"zip member {member.name!r} is smaller than its size")
            tail = sink.take()  # the data descriptor (and the header of an empty member)
            if tail:
                yield tail
    yield sink.take()  # the central directory

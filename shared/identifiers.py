"""Dutch care identifiers (BSN, URA, UZI), their OIDs, and the keyed pseudonym replacing a BSN."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler, StringConstraints
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

# --- Naming systems -------------------------------------------------------------------------------

BSN_OID = "2.16.840.1.113883.2.4.6.3"
BSN_SYSTEM = "http://fhir.nl/fhir/NamingSystem/bsn"
# How HL7v2 and DICOM senders usually write the BSN issuer (Issuer of Patient ID, 0010,0021).
BSN_DICOM_ISSUER = "NLMINBIZA"

URA_OID = "2.16.528.1.1007.3.3"
URA_SYSTEM = "http://fhir.nl/fhir/NamingSystem/ura"

UZI_PERSON_OID = "2.16.528.1.1007.3.1"
UZI_PERSON_SYSTEM = "http://fhir.nl/fhir/NamingSystem/uzi-nr-pers"

UZI_ROLE_CODE_SYSTEM_OID = "2.16.840.1.113883.2.4.15.111"
PROVIDER_TYPE_CODE_SYSTEM_OID = "2.16.840.1.113883.2.4.15.1060"

# --- BSN ------------------------------------------------------------------------------------------

_BSN_WEIGHTS = (9, 8, 7, 6, 5, 4, 3, 2, -1)
_NINE_DIGITS = re.compile(r"[0-9]{9}")
_EIGHT_DIGITS = re.compile(r"[0-9]{8}")
# A run of exactly nine ASCII digits, not part of a longer number. Unicode digits are ignored on
# purpose: \d would also match Arabic-Indic and other digits that int() accepts.
_NINE_DIGIT_RUN = re.compile(r"(?<![0-9])[0-9]{9}(?![0-9])")

_MASK = "***"


class InvalidBsn(ValueError):
    """Raised for anything that is not a valid BSN. The message never contains the input."""


def _weighted_sum(digits: str) -> int:
    return sum(int(d) * w for d, w in zip(digits, _BSN_WEIGHTS, strict=True))


def is_valid_bsn(value: str) -> bool:
    """Nine ASCII digits passing the 11-proof; a weighted sum of 0 (e.g. 000000000) fails."""
    if not isinstance(value, str) or not _NINE_DIGITS.fullmatch(value):
        return False
    total = _weighted_sum(value)
    return total != 0 and total % 11 == 0


def _check_bsn(value: object, *, pad_8_digits: bool) -> str:
    # Messages describe the problem, never the value: they end up in logs and HTTP error bodies.
    if not isinstance(value, str):
        raise InvalidBsn(f"a BSN must be a string, not {type(value).__name__}")
    if pad_8_digits and _EIGHT_DIGITS.fullmatch(value):
        value = "0" + value
    if not _NINE_DIGITS.fullmatch(value):
        raise InvalidBsn(f"a BSN must be exactly 9 digits (got {len(value)} characters)")
    if not is_valid_bsn(value):
        raise InvalidBsn("the number fails the BSN 11-proof")
    return value


class Bsn:
    """A validated BSN that masks itself in repr, str and f-strings; ``.value`` is the clear number.

    Deliberately not a ``str`` subclass: string operations, ``json.dumps`` and ``"%s" %`` would
    then silently expose the digits. Usable as a pydantic field type (e.g. a POST body); a model
    dump yields the clear digits, validation errors show ``'***'`` instead of the input.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = _check_bsn(value, pad_8_digits=False)

    @property
    def value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Bsn({_MASK})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bsn):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash((Bsn, self._value))

    def __setattr__(self, name: str, value: object) -> None:
        if hasattr(self, "_value"):
            raise AttributeError("Bsn is immutable")
        object.__setattr__(self, name, value)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        # pydantic echoes the input of a failed validator (str(ValidationError), FastAPI's 422
        # body). Sealing the input first makes that echo '***' instead of the number.
        return core_schema.chain_schema(
            [
                core_schema.no_info_plain_validator_function(_Sealed.seal),
                core_schema.no_info_plain_validator_function(_Sealed.to_bsn),
            ],
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda bsn: bsn.value, return_schema=core_schema.str_schema()
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "pattern": "^[0-9]{9}$", "description": "BSN (11-proof)"}


class _Sealed(str):
    """A string that reads '***' but carries the raw input, so pydantic errors cannot echo it."""

    __slots__ = ("raw",)
    raw: object

    def __new__(cls, raw: object) -> _Sealed:
        sealed = super().__new__(cls, _MASK)
        sealed.raw = raw
        return sealed

    @staticmethod
    def seal(value: object) -> object:
        return value if isinstance(value, Bsn) else _Sealed(value)

    @staticmethod
    def to_bsn(value: object) -> Bsn:
        if isinstance(value, Bsn):
            return value
        raw = value.raw if isinstance(value, _Sealed) else value
        try:
            return Bsn(raw)  # type: ignore[arg-type]  # _check_bsn rejects non-str input
        except InvalidBsn as exc:
            raise PydanticCustomError("bsn", str(exc)) from None


def parse_bsn(value: str, *, pad_8_digits: bool = False) -> Bsn:
    """Validate a BSN, raising :class:`InvalidBsn`.

    BSNs issued with fewer digits are officially written with a leading zero. Some systems store
    them as integers and lose it; ``pad_8_digits=True`` restores it for such known sources. It is
    off by default because an 8-digit value is ambiguous (roughly 1 in 11 of any 8-digit numbers,
    dates included, passes the 11-proof once padded).
    """
    return Bsn(_check_bsn(value, pad_8_digits=pad_8_digits))


def find_bsns(text: str) -> Iterator[re.Match[str]]:
    """Every run of exactly nine digits in ``text`` that passes the 11-proof."""
    for match in _NINE_DIGIT_RUN.finditer(text):
        if is_valid_bsn(match.group()):
            yield match


def contains_bsn(text: str) -> bool:
    return next(find_bsns(text), None) is not None


# Nine digits as a person may type them: in one run, or in groups split by one space, dot,
# hyphen, underscore, colon or slash ("1234.56.782", "123 456 782", "123_456_782": what an id
# field allows), the groups not part of a longer such sequence (a UID's
# components, a date followed by a number). For free text a person wrote, never for logs: dotted
# UIDs and version strings in logs would give ~1 in 11 false hits of any 9-digit window.
_WRITTEN_NINE_DIGITS = re.compile(
    r"(?<![0-9])(?<![0-9][ .\-_:/])(?:[0-9][ .\-_:/]?){8}[0-9](?![ .\-_:/]?[0-9])"
)
_DIGIT_SEPARATORS = re.compile(r"[ .\-_:/]")


def find_written_bsns(text: str) -> Iterator[re.Match[str]]:
    """Every BSN in free text a person wrote, as :func:`find_bsns` finds them and also written
    in groups (``_WRITTEN_NINE_DIGITS``), in order; for refusing or masking such text before
    it is published (a note, a stated reason)."""
    found = [*find_bsns(text)]
    for match in _WRITTEN_NINE_DIGITS.finditer(text):
        if not _DIGIT_SEPARATORS.search(match.group()):
            continue  # a plain run: find_bsns has it (or it is not a BSN)
        if is_valid_bsn(_DIGIT_SEPARATORS.sub("", match.group())):
            found.append(match)
    yield from sorted(found, key=lambda match: match.start())


def contains_written_bsn(text: str) -> bool:
    return next(find_written_bsns(text), None) is not None


def mask_written_bsns(text: str, mask: str = "[BSN]") -> str:
    """``text`` with every BSN :func:`find_written_bsns` finds replaced by ``mask``."""
    pieces: list[str] = []
    end = 0
    for match in find_written_bsns(text):
        if match.start() < end:
            continue  # inside one masked already
        pieces += [text[end : match.start()], mask]
        end = match.end()
    return "".join(pieces) + text[end:] if pieces else text


# --- URA and UZI ----------------------------------------------------------------------------------

# Strings only: pydantic does not coerce an int to str, so a URA read as a number (and robbed of
# its leading zeros) is rejected instead of silently becoming another organisation.
Ura = Annotated[str, StringConstraints(pattern=r"^[0-9]{8}$")]
"""URA: the 8-digit number of a care organisation (UZI register)."""

UziNumber = Annotated[str, StringConstraints(pattern=r"^[0-9]{9}$")]
"""UZI number of a natural person (card holder): 9 digits."""

# --- Pseudonym ------------------------------------------------------------------------------------

PSEUDONYM_PREFIX = "psn1-"
# HMAC-SHA256 output (32 bytes) in unpadded lowercase base32: 52 characters of [a-z2-7]. Base32
# rather than hex so a pseudonym practically never holds a 9-digit run the log scrubber would hit.
_PSEUDONYM_RE = re.compile(r"psn1-[a-z2-7]{52}")
PSEUDONYM_PATTERN = f"^{_PSEUDONYM_RE.pattern}$"
# Domain separation: the same key must never yield the same value for a different kind of input.
_PSEUDONYM_DOMAIN = b"beeldportaal:bsn:v1:"
MIN_PSEUDONYM_KEY_BYTES = 32

Pseudonym = Annotated[str, StringConstraints(pattern=PSEUDONYM_PATTERN)]
"""A patient pseudonym as produced by :class:`Pseudonymizer` (``psn1-`` + 52 base32 chars)."""


def is_pseudonym(value: str) -> bool:
    return isinstance(value, str) and _PSEUDONYM_RE.fullmatch(value) is not None


def contains_pseudonym(text: str) -> bool:
    return _PSEUDONYM_RE.search(text) is not None


class Pseudonymizer:
    """Turns a BSN into a stable pseudonym: keyed HMAC-SHA256, so it cannot be brute-forced
    over the ~10^8 possible BSNs without the key (a plain hash could)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray):
            raise TypeError("the pseudonym key must be bytes")
        if len(key) < MIN_PSEUDONYM_KEY_BYTES:
            raise ValueError(f"the pseudonym key must be at least {MIN_PSEUDONYM_KEY_BYTES} bytes")
        self._key = bytes(key)

    def __repr__(self) -> str:
        return f"Pseudonymizer(key={_MASK})"

    def pseudonym(self, bsn: Bsn) -> str:
        if not isinstance(bsn, Bsn):
            # A str here would be an unvalidated number; make callers parse it first.
            raise TypeError("pseudonym() takes a Bsn; use parse_bsn() first")
        digest = hmac.new(self._key, _PSEUDONYM_DOMAIN + bsn.value.encode(), hashlib.sha256)
        encoded = base64.b32encode(digest.digest()).decode().rstrip("=").lower()
        return PSEUDONYM_PREFIX + encoded

    def matches(self, bsn: Bsn, pseudonym: str) -> bool:
        return hmac.compare_digest(self.pseudonym(bsn), pseudonym)

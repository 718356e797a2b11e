"""The provider directory: who the care providers are and how each wants to receive studies.

A :class:`Provider` is one organisation (URA) with its mailboxes, delivery endpoints, webhook and
receiver preferences. Entries are validated on the way in, so a bad URA or a URL that can never
be reached is refused with a reason when it is registered, not discovered at delivery time.

Secrets (endpoint credentials, the webhook's shared secret) are ``SecretStr``: repr, str and a
plain ``model_dump``/``model_dump_json`` show them masked, so an entry can be logged or returned
by an API without leaking them. The directory itself lives on the compacted, access-controlled
``provider-directory`` topic, which must keep them: :meth:`Provider.to_record` is the one way to
serialise *with* secrets, :meth:`Provider.from_record` reads it back, and a masked value read
back is refused (a record written by a plain dump would otherwise silently store the mask as the
password). The search API shows :meth:`Provider.public_view`, which has no secrets and no
network addresses at all.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainSerializer,
    SecretStr,
    SerializationInfo,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.events.base import Model
from shared.events.common import REPORT_SOP_CLASSES, DeliveryChannel, DicomUid
from shared.identifiers import BSN_DICOM_ISSUER, BSN_OID, PROVIDER_TYPE_CODE_SYSTEM_OID, Ura

__all__ = [
    "OBJECT_FILTER_GROUPS",
    "PROVIDER_TYPE_CODE_SYSTEM_OID",
    "REVEAL_SECRETS",
    "BasicAuth",
    "BatchLimits",
    "BearerAuth",
    "BsnAsPatientId",
    "CoercionProfile",
    "DicomWebEndpoint",
    "DimseEndpoint",
    "Directory",
    "DirectoryError",
    "Endpoint",
    "Mailbox",
    "NoAuth",
    "NoCoercion",
    "PickupEndpoint",
    "Provider",
    "ProviderLookup",
    "PublicEndpoint",
    "PublicProvider",
    "ReceiverPreferences",
    "Webhook",
    "validation_problems",
]

# --- secrets --------------------------------------------------------------------------------------

# Serialisation context key: ``model_dump_json(context={REVEAL_SECRETS: True})`` writes secrets in
# clear. Only Provider.to_record() passes it.
REVEAL_SECRETS = "reveal_secrets"
_MASK = "**********"  # what SecretStr shows, and what a dump without REVEAL_SECRETS writes


def _serialise_secret(value: SecretStr, info: SerializationInfo) -> str:
    context = info.context
    if isinstance(context, dict) and context.get(REVEAL_SECRETS) is True:
        return value.get_secret_value()
    return _MASK


def _secret_check(min_length: int) -> AfterValidator:
    def check(value: SecretStr) -> SecretStr:
        # Messages never contain the value: they end up in logs and HTTP error bodies.
        clear = value.get_secret_value()
        if clear == _MASK:
            raise ValueError("is a masked placeholder, not a secret (written without secrets?)")
        if len(clear) < min_length:
            raise ValueError(f"must be at least {min_length} characters")
        if len(clear) > 4096:
            raise ValueError("must be at most 4096 characters")
        if clear != clear.strip() or any(not c.isprintable() for c in clear):
            raise ValueError("must not contain whitespace at the ends or control characters")
        return value

    return AfterValidator(check)


Secret = Annotated[SecretStr, _secret_check(1), PlainSerializer(_serialise_secret, return_type=str)]
# HMAC-SHA256 keys shorter than the hash output weaken the signature.
SharedSecret = Annotated[
    SecretStr, _secret_check(32), PlainSerializer(_serialise_secret, return_type=str)
]

# --- addresses ------------------------------------------------------------------------------------

_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _host_problem(host: str) -> str | None:
    if not host:
        return "has no host"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_HOST_LABEL.match(label) for label in name.split(".")):
        return "has a host that is neither a DNS name nor an IP address"
    return None


def _check_host(value: str) -> str:
    host = value.strip()
    problem = _host_problem(host)
    if problem:
        raise ValueError(problem)
    return host


def _check_url(value: str) -> str:
    # Parsed by hand rather than with pydantic's HttpUrl: it rewrites the URL (adds a trailing
    # slash, punycode) and its messages do not say what is wrong.
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("must be a URL without spaces or control characters")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise ValueError("must not carry credentials (user:password@); configure auth instead")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("has a port that is not a number from 1 to 65535")
    problem = _host_problem(parts.hostname or "")
    if problem:
        raise ValueError(problem)
    if "#" in value:
        raise ValueError("must not have a #fragment")
    return value


def _check_base_url(value: str) -> str:
    url = _check_url(value)
    if "?" in url:
        raise ValueError("must not have a ?query (it is a base URL)")
    # Without a trailing slash, so "{base_url}/studies" is always well-formed.
    return url.rstrip("/")


HttpUrlText = Annotated[str, AfterValidator(_check_url)]
BaseUrlText = Annotated[str, AfterValidator(_check_base_url)]
HostText = Annotated[str, AfterValidator(_check_host)]


def _check_ae_title(value: str) -> str:
    # PS3.5 §6.2 AE: at most 16 characters of the default repertoire, no backslash or control
    # characters; leading and trailing spaces are not significant, an all-space title is invalid.
    title = value.strip(" ")
    if not title:
        raise ValueError("an AE title cannot be blank")
    if len(title) > 16:
        raise ValueError("an AE title has at most 16 characters")
    if any(not (0x20 <= ord(c) <= 0x7E) or c == "\\" for c in title):
        raise ValueError("an AE title holds printable ASCII only, without backslash")
    return title


AeTitle = Annotated[str, AfterValidator(_check_ae_title)]

# Endpoint and mailbox ids appear in events (Destination.endpoint_id) and metric labels.
Slug = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


def _ura_text(value: object) -> object:
    # YAML reads an unquoted 00000101 as the (octal) number 65: say so instead of "not a string".
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError("a URA must be quoted text of 8 digits; a number loses its leading zeros")
    return value


UraText = Annotated[Ura, BeforeValidator(_ura_text)]

# --- endpoints ------------------------------------------------------------------------------------


class _Entry(Model):
    # pydantic's error text would echo the input (for a refused secret, the secret): the base
    # Model hides it (hide_input_in_errors).
    pass


class NoAuth(_Entry):
    type: Literal["none"] = "none"


class BearerAuth(_Entry):
    type: Literal["bearer"] = "bearer"
    token: Secret


class BasicAuth(_Entry):
    type: Literal["basic"] = "basic"
    username: str = Field(min_length=1, max_length=256, pattern=r"^[^:\s]+$")
    password: Secret


DicomWebAuth = Annotated[NoAuth | BearerAuth | BasicAuth, Field(discriminator="type")]


class DicomWebEndpoint(_Entry):
    """The receiver's DICOMweb STOW-RS service: ``POST {base_url}/studies``."""

    channel: Literal["dicomweb"] = "dicomweb"
    id: Slug
    base_url: BaseUrlText
    auth: DicomWebAuth = NoAuth()
    enabled: bool = True


class DimseEndpoint(_Entry):
    """The receiver's C-STORE SCP; beeldportaal calls it as ``calling_ae_title``."""

    channel: Literal["dimse"] = "dimse"
    id: Slug
    host: HostText
    port: int = Field(ge=1, le=65535)
    ae_title: AeTitle
    calling_ae_title: AeTitle = "BEELDPORTAAL"
    enabled: bool = True


class PickupEndpoint(_Entry):
    """No integration: the study waits in the portal for the receiver to fetch it."""

    channel: Literal["pickup"] = "pickup"
    id: Slug
    enabled: bool = True


Endpoint = Annotated[
    DicomWebEndpoint | DimseEndpoint | PickupEndpoint, Field(discriminator="channel")
]


class Webhook(_Entry):
    """Where the receiver is told a delivery happened; bodies are HMAC-signed with ``secret``."""

    url: HttpUrlText
    secret: SharedSecret


class Mailbox(_Entry):
    """A department of the organisation that studies can be addressed to (e.g. radiology)."""

    id: Slug
    name: str = Field(min_length=1, max_length=128)


# --- receiver preferences -------------------------------------------------------------------------


class NoCoercion(_Entry):
    profile: Literal["none"] = "none"


_LO = r"^[^\\\x00-\x1f]{1,64}$"  # DICOM LO: 64 characters, no backslash or control characters


class BsnAsPatientId(_Entry):
    """IHE Import Reconciliation: the receiver imports under the BSN as Patient ID (0010,0020)
    with this Issuer of Patient ID (0010,0021) and, when set, Issuer of Patient ID Qualifiers
    (0010,0024) Universal Entity ID of type ISO. The sender's values are kept in Original
    Attributes Sequence (0400,0561)."""

    profile: Literal["bsn-as-patient-id"] = "bsn-as-patient-id"
    issuer: str = Field(default=BSN_DICOM_ISSUER, pattern=_LO)
    universal_entity_id: DicomUid | None = BSN_OID
    keep_originals: bool = True

    @field_validator("keep_originals")
    @classmethod
    def _originals_are_kept(cls, value: bool) -> bool:
        if not value:
            raise ValueError(
                "coerced attributes must be recorded in Original Attributes Sequence (0400,0561)"
            )
        return value


CoercionProfile = Annotated[NoCoercion | BsnAsPatientId, Field(discriminator="profile")]

_PRESENTATION_STATES = tuple(f"1.2.840.10008.5.1.4.1.1.11.{n}" for n in range(1, 13))
# Named groups of SOP classes a receiver may decline (object_filters may also list single UIDs).
OBJECT_FILTER_GROUPS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "presentation-states": frozenset(_PRESENTATION_STATES),
        "key-object-selections": frozenset({"1.2.840.10008.5.1.4.1.1.88.59"}),
        "raw-data": frozenset({"1.2.840.10008.5.1.4.1.1.66"}),
        "reports": frozenset(REPORT_SOP_CLASSES),
    }
)
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def _check_filter(value: str) -> str:
    if value in OBJECT_FILTER_GROUPS or (len(value) <= 64 and _UID.match(value)):
        return value
    groups = ", ".join(sorted(OBJECT_FILTER_GROUPS))
    raise ValueError(f"an object filter is a SOP Class UID or one of: {groups}")


ObjectFilter = Annotated[str, AfterValidator(_check_filter)]


class BatchLimits(_Entry):
    """At most this much per request to the receiver; one larger instance still goes alone."""

    max_instances: int = Field(default=100, ge=1, le=10_000)
    max_bytes: int = Field(default=100 * 1024 * 1024, ge=1024 * 1024)


class ReceiverPreferences(_Entry):
    coercion: CoercionProfile = NoCoercion()
    # SOP classes the receiver does not want: they are dropped before delivery.
    object_filters: tuple[ObjectFilter, ...] = ()
    batch_limits: BatchLimits = BatchLimits()

    def excluded_sop_classes(self) -> frozenset[str]:
        excluded: set[str] = set()
        for item in self.object_filters:
            excluded |= OBJECT_FILTER_GROUPS.get(item, {item})
        return frozenset(excluded)

    def accepts(self, sop_class_uid: str) -> bool:
        return sop_class_uid not in self.excluded_sop_classes()


# --- the provider ---------------------------------------------------------------------------------


class PublicEndpoint(_Entry):
    id: str
    channel: DeliveryChannel


class PublicProvider(_Entry):
    """What any participant may see of a provider (search API): no secrets, no addresses."""

    ura: str
    name: str
    type_code: str
    city: str
    mailboxes: tuple[Mailbox, ...]
    channels: tuple[PublicEndpoint, ...]
    has_webhook: bool


def _unique(ids: Iterable[str], what: str) -> None:
    doubles = sorted(i for i, n in Counter(ids).items() if n > 1)
    if doubles:
        raise ValueError(f"{what} ids must be unique; repeated: {', '.join(doubles)}")


class Provider(_Entry):
    """One care organisation in the directory, keyed by its URA."""

    ura: UraText
    name: str = Field(min_length=1, max_length=128)
    # Code from the provider type code system (PROVIDER_TYPE_CODE_SYSTEM_OID), e.g. V4 hospital.
    type_code: str = Field(pattern=r"^[A-Z0-9]{1,8}$")
    city: str = Field(min_length=1, max_length=64)
    mailboxes: tuple[Mailbox, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    webhook: Webhook | None = None
    preferences: ReceiverPreferences = ReceiverPreferences()

    @field_validator("name", "city")
    @classmethod
    def _trimmed(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value:
            raise ValueError("cannot be blank")
        return value

    @model_validator(mode="after")
    def _ids_unique(self) -> Provider:
        _unique((e.id for e in self.endpoints), "endpoint")
        _unique((m.id for m in self.mailboxes), "mailbox")
        return self

    def usable_endpoints(self) -> tuple[DicomWebEndpoint | DimseEndpoint | PickupEndpoint, ...]:
        return tuple(e for e in self.endpoints if e.enabled)

    def endpoint(self, endpoint_id: str) -> DicomWebEndpoint | DimseEndpoint | PickupEndpoint:
        for candidate in self.endpoints:
            if candidate.id == endpoint_id:
                return candidate
        raise KeyError(f"provider {self.ura} has no endpoint {endpoint_id!r}")

    def to_record(self) -> str:
        """JSON with secrets in clear: only for the access-controlled provider-directory topic."""
        return self.model_dump_json(context={REVEAL_SECRETS: True})

    @classmethod
    def from_record(cls, raw: str | bytes) -> Provider:
        return cls.model_validate_json(raw)

    def public_view(self) -> PublicProvider:
        return PublicProvider(
            ura=self.ura,
            name=self.name,
            type_code=self.type_code,
            city=self.city,
            mailboxes=self.mailboxes,
            channels=tuple(
                PublicEndpoint(id=e.id, channel=DeliveryChannel(e.channel))
                for e in self.usable_endpoints()
            ),
            has_webhook=self.webhook is not None,
        )


# --- the directory --------------------------------------------------------------------------------


class ProviderLookup(Protocol):
    """What routing needs of the directory (a Directory, or a wrapper over a faust table)."""

    def get(self, ura: str) -> Provider | None: ...


class DirectoryError(ValueError):
    """The directory or its seed file cannot be used; ``problems`` lists every reason."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


def _fold(text: str) -> str:
    """Case- and accent-insensitive form for search: 'Sint-Jozef Ziekenhuis Ĳsselmonde' ..."""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(bare.casefold().split())


def _render_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(entry)"


def validation_problems(error: ValidationError) -> list[str]:
    """``field: reason`` for every error, never the input (it can hold secrets)."""
    return _reasons(error)


def _reasons(error: ValidationError) -> list[str]:
    # loc + message only: pydantic's own str() would echo the input, secrets included.
    reasons = []
    for item in error.errors(include_url=False, include_input=False, include_context=False):
        message = item["msg"].removeprefix("Value error, ")
        reasons.append(f"{_render_loc(item['loc'])}: {message}")
    return reasons


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader's own construct_mapping refuses it with a reason
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class Directory:
    """An immutable set of providers keyed by URA; changes return a new Directory."""

    __slots__ = ("_providers",)

    def __init__(self, providers: Iterable[Provider] = ()) -> None:
        by_ura: dict[str, Provider] = {}
        for provider in providers:
            if provider.ura in by_ura:
                raise DirectoryError([f"URA {provider.ura} appears more than once"])
            by_ura[provider.ura] = provider
        self._providers: Mapping[str, Provider] = MappingProxyType(dict(sorted(by_ura.items())))

    # --- reading

    def get(self, ura: str) -> Provider | None:
        return self._providers.get(ura)

    def __contains__(self, ura: object) -> bool:
        return ura in self._providers

    def __iter__(self) -> Iterator[Provider]:
        return iter(self._providers.values())

    def __len__(self) -> int:
        return len(self._providers)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Directory):
            return NotImplemented
        return dict(self._providers) == dict(other._providers)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Directory({len(self)} providers)"

    def search(self, query: str, *, limit: int = 20) -> list[Provider]:
        """Providers matching ``query`` on URA, name or city, best first.

        Exact URA, then name starting with the query, then every query word found somewhere in
        name, city or URA; ties by name. Case and accents are ignored ("sint-jozef" finds
        "Sint-Józef"). A blank query finds nothing.
        """
        q = _fold(query)
        if not q or limit <= 0:
            return []
        words = q.split()
        ranked: list[tuple[int, str, str, Provider]] = []
        for provider in self:
            name = _fold(provider.name)
            if q == provider.ura:
                rank = 0
            elif name.startswith(q):
                rank = 1
            elif all(w in f"{name} {_fold(provider.city)} {provider.ura}" for w in words):
                rank = 2
            else:
                continue
            ranked.append((rank, name, provider.ura, provider))
        ranked.sort(key=lambda r: r[:3])
        return [r[3] for r in ranked[:limit]]

    # --- changing

    def add(self, provider: Provider) -> Directory:
        if provider.ura in self:
            raise DirectoryError([f"URA {provider.ura} is already in the directory"])
        return self.put(provider)

    def replace(self, provider: Provider) -> Directory:
        if provider.ura not in self:
            raise DirectoryError([f"URA {provider.ura} is not in the directory"])
        return self.put(provider)

    def put(self, provider: Provider) -> Directory:
        """Add or replace: what a record on the compacted provider-directory topic means."""
        return Directory({**self._providers, provider.ura: provider}.values())

    def remove(self, ura: str) -> Directory:
        if ura not in self:
            raise DirectoryError([f"URA {ura} is not in the directory"])
        return Directory(p for u, p in self._providers.items() if u != ura)

    # --- seed file

    @classmethod
    def from_yaml(cls, text: str) -> Directory:
        """A directory from a seed document ``{providers: [...]}``; refused whole if any entry
        is invalid, with every problem listed (entry index, URA when readable, field, reason)."""
        try:
            document = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "cannot be parsed"
            raise DirectoryError([f"not valid YAML{where}: {problem}"]) from None
        if not isinstance(document, dict) or set(document) != {"providers"}:
            raise DirectoryError(["the file must be a mapping with exactly one key, 'providers'"])
        entries = document["providers"]
        if not isinstance(entries, list):
            raise DirectoryError(["'providers' must be a list of provider entries"])

        problems: list[str] = []
        providers: list[Provider] = []
        seen: dict[str, int] = {}
        for index, entry in enumerate(entries):
            ura = entry.get("ura") if isinstance(entry, dict) else None
            label = f"providers[{index}]" + (f" (URA {ura})" if isinstance(ura, str) else "")
            if not isinstance(entry, dict):
                problems.append(f"{label}: must be a mapping of provider fields")
                continue
            try:
                provider = Provider.model_validate(entry)
            except ValidationError as exc:
                problems.extend(f"{label}: {reason}" for reason in _reasons(exc))
                continue
            if provider.ura in seen:
                problems.append(f"{label}: URA repeats providers[{seen[provider.ura]}]")
                continue
            seen[provider.ura] = index
            providers.append(provider)
        if problems:
            raise DirectoryError(problems)
        return cls(providers)

    @classmethod
    def load_yaml(cls, path: Path | str) -> Directory:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DirectoryError([f"{path}: cannot be read ({type(exc).__name__})"]) from None
        try:
            return cls.from_yaml(text)
        except DirectoryError as exc:
            raise DirectoryError(f"{path}: {p}" for p in exc.problems) from None

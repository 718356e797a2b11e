"""The organisations ingest knows: who may receive, and which DIMSE peers speak for whom.

Loaded from a JSON file (``BEELDPORTAAL_INGEST_PEERS_FILE``) until the provider directory of the
routing service feeds it::

    {"organisations": [
        {"ura": "11111111", "name": "Ziekenhuis Oost",
         "receive_ae_title": "BP_ZHOOST",
         "dimse_senders": [{"ae_title": "ZHOOST_PACS", "hosts": ["127.0.0.1"]}]}
    ]}
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.identifiers import Ura

_AE = r"^[\x20-\x5b\x5d-\x7e]{1,16}$"  # PS3.5 AE VR: 16 chars, no backslash or control chars


def _ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped:
        raise ValueError("an AE title cannot be blank")
    return stripped


def _peer_address(host: str) -> str:
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return str(address)


class _DimseSender(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    ae_title: str = Field(pattern=_AE)
    # Peer addresses allowed to use this AE title; empty = any (only for trusted networks).
    hosts: tuple[str, ...] = ()

    @field_validator("ae_title")
    @classmethod
    def _strip(cls, value: str) -> str:
        return _ae_title(value)

    @field_validator("hosts")
    @classmethod
    def _addresses(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        # A typo must fail loudly at start-up, not silently deny a hospital at 3 a.m.
        return tuple(str(ipaddress.ip_address(h.strip())) for h in hosts)


class _Organisation(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    ura: Ura
    name: str = Field(min_length=1, max_length=128)
    receive_ae_title: str | None = Field(default=None, pattern=_AE)
    dimse_senders: tuple[_DimseSender, ...] = ()

    @field_validator("receive_ae_title")
    @classmethod
    def _strip_ae(cls, value: str | None) -> str | None:
        return _ae_title(value) if value is not None else None


class _PeersFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    organisations: tuple[_Organisation, ...] = ()


class PeersFileError(ValueError):
    """The peers file cannot be used; the message says where."""


@dataclass(frozen=True)
class Organisation:
    ura: str
    name: str


@dataclass
class PeerDirectory:
    organisations: dict[str, Organisation] = field(default_factory=dict)
    # Called AE title -> recipient URA.
    receivers: dict[str, str] = field(default_factory=dict)
    # Calling AE title -> (sending URA, allowed hosts).
    senders: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> PeerDirectory:
        if path is None:
            return cls()
        try:
            parsed = _PeersFile.model_validate(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise PeersFileError(f"{path}: {exc}") from None
        except ValidationError as exc:
            raise PeersFileError(f"{path}: {exc}") from None
        return cls.from_model(parsed)

    @classmethod
    def from_model(cls, parsed: _PeersFile) -> PeerDirectory:
        directory = cls()
        for org in parsed.organisations:
            if org.ura in directory.organisations:
                raise PeersFileError(f"organisation {org.ura} is listed twice")
            directory.organisations[org.ura] = Organisation(org.ura, org.name)
            if org.receive_ae_title:
                if org.receive_ae_title in directory.receivers:
                    raise PeersFileError(f"AE title {org.receive_ae_title!r} receives twice")
                directory.receivers[org.receive_ae_title] = org.ura
            for sender in org.dimse_senders:
                if sender.ae_title in directory.senders:
                    raise PeersFileError(
                        f"AE title {sender.ae_title!r} sends for two organisations"
                    )
                directory.senders[sender.ae_title] = (org.ura, frozenset(sender.hosts))
        return directory

    @classmethod
    def from_dict(cls, data: dict) -> PeerDirectory:
        return cls.from_model(_PeersFile.model_validate(data))

    def knows(self, ura: str) -> bool:
        return ura in self.organisations

    def recipient_for_called_ae(self, called_ae: str) -> str | None:
        return self.receivers.get(called_ae.strip())

    def sender_for(self, calling_ae: str, host: str) -> str | None:
        """The sending organisation of a DIMSE peer, or None when it is not on the allow-list."""
        entry = self.senders.get(calling_ae.strip())
        if entry is None:
            return None
        ura, hosts = entry
        if not hosts:
            return ura
        try:
            return ura if _peer_address(host) in hosts else None
        except ValueError:
            return None

"""Bearer-JWT authentication shared by every HTTP API, and the dev issuer that signs local tokens.

A token says which organisation (URA) and which person (UZI number) acts, in which role and for
which purpose of use. Services only ever verify: they hold the issuer's *public* keys, built once
in their bootstrap from :class:`AuthSettings` and passed down (no globals, no app state).

Claim set (anything else in a token is ignored):

- ``iss`` issuer, must equal the configured one; ``aud`` string or list, must contain ours.
- ``exp`` (required), ``iat`` (required; in the future means "not yet valid"), ``nbf``: seconds
  since the epoch, with ``leeway_s`` of clock skew tolerated.
- ``sub`` (required): the subject at the issuer (a user id, or the client for system tokens).
- ``jti``: the token id, kept for the audit trail.
- ``ura`` (required): the acting care organisation, a string of 8 digits.
- ``uzi``: the acting person's UZI number, a string of 9 digits; absent in system tokens.
- ``roles`` (required): a non-empty list of strings, UZI role codes (``01.015`` radiologist)
  and/or app roles (``provider``, ``consent-authority``, ``operator``, ``system``). The first is
  the principal's primary ``role``.
- ``purpose``: purpose of use (HL7 PurposeOfUse): ``TREAT``, ``ETREAT`` (emergency), ...
- ``on_behalf_of``: the UZI number (9 digits) of the care professional the acting person works
  for (an assistant acting for a physician), recorded as NEN 7513's "on behalf of".
- ``client_id``: the OAuth client that obtained the token (RFC 9068); ``azp`` (OpenID Connect)
  is read when it is absent.
- ``represents``: for a patient portal's token (role ``patient-representative``), the BSNs
  (strings of 9 digits passing the 11-proof) of the patients the authenticated person may act
  for: themselves, and whom they legally represent (a parent for a child). A service shows a
  patient's own data (the access log) only for these. The numbers never leave the principal:
  it does not show them in its repr, and nothing logs claims.

Only asymmetric algorithms are accepted (RS256, ES256, EdDSA by default). ``alg=none`` and HS*
are refused outright, and each key only verifies the algorithms of its own type, so a token
"signed" with HS256 using a public key as the HMAC secret (algorithm confusion) cannot pass.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.types import Options
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.errors import BeeldportaalError
from shared.identifiers import Ura, UziNumber, is_valid_bsn
from shared.logging import get_logger

log = get_logger(__name__)

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)

DEFAULT_ALGORITHMS: Final = ("RS256", "ES256", "EdDSA")
# Every asymmetric JWS algorithm PyJWT implements; anything else (none, HS*) is never accepted.
_ASYMMETRIC_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_EC_CURVE_ALGORITHM: Final = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_MIN_RSA_BITS: Final = 2048
# A bearer token is a few hundred bytes; refuse to parse megabytes of attacker input.
MAX_TOKEN_CHARS: Final = 16 * 1024

DEV_ISSUER: Final = "beeldportaal-dev"
DEV_AUDIENCE: Final = "beeldportaal"
DEV_PRIVATE_KEY_NAME: Final = "dev-jwt.key"
DEV_PUBLIC_KEY_NAME: Final = "dev-jwt.pub"

EMERGENCY_PURPOSE: Final = "ETREAT"
TREATMENT_PURPOSE: Final = "TREAT"

_URA_RE = re.compile(r"[0-9]{8}")
_UZI_RE = re.compile(r"[0-9]{9}")
_MAX_ROLES = 64
# Patients one person may act for (``represents``): themselves and their wards.
_MAX_REPRESENTED = 32
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.DOTALL)


class InvalidToken(BeeldportaalError):
    """A bearer token was refused. ``reason`` is short and never contains token content."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- Principal ------------------------------------------------------------------------------------


class Principal(BaseModel):
    """Who is calling: the organisation and person a verified token speaks for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    organisation_ura: Ura
    user_uzi: UziNumber | None = None
    # Whom the acting person works for (the token's ``on_behalf_of``), for the audit trail.
    on_behalf_of_uzi: UziNumber | None = None
    # The primary role (the token's first role); ``roles`` holds all of them, primary included.
    role: str = Field(min_length=1)
    roles: frozenset[str]
    purpose_of_use: str | None = None
    subject: str
    client_id: str | None = None
    token_id: str | None = None
    issuer: str | None = None
    expires_at: datetime | None = None
    # The BSNs of the patients a portal's person may act for (the ``represents`` claim); kept
    # out of the repr, so a logged principal shows no number.
    represents: frozenset[str] = Field(default_factory=frozenset, repr=False)

    def has_role(self, *roles: str) -> bool:
        """True when the principal holds any of ``roles``."""
        return not self.roles.isdisjoint(roles)

    def acts_for(self, bsn: str) -> bool:
        """True when the token's issuer says its person may act for the patient ``bsn``."""
        return bsn in self.represents

    @property
    def is_emergency(self) -> bool:
        return self.purpose_of_use == EMERGENCY_PURPOSE


# --- Keys -----------------------------------------------------------------------------------------


def _key_algorithms(key: PublicKey) -> frozenset[str]:
    """The JWS algorithms a key of this type can verify: an RSA key never verifies ES256, etc."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"RSA keys must be at least {_MIN_RSA_BITS} bits")
        return frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_CURVE_ALGORITHM.get(key.curve.name)
        if alg is None:
            raise ValueError(f"unsupported elliptic curve {key.curve.name}")
        return frozenset({alg})
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    raise ValueError(f"unsupported public key type {type(key).__name__}")


def _public_jwk(key: PublicKey) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPublicKey):
        return dict(RSAAlgorithm.to_jwk(key, as_dict=True))  # type: ignore[arg-type]
    if isinstance(key, ec.EllipticCurvePublicKey):
        return dict(ECAlgorithm.to_jwk(key, as_dict=True))  # type: ignore[arg-type]
    return dict(OKPAlgorithm.to_jwk(key, as_dict=True))  # type: ignore[arg-type]


_THUMBPRINT_MEMBERS: Final = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}


def jwk_thumbprint(key: PublicKey) -> str:
    """RFC 7638 SHA-256 thumbprint: the default ``kid`` of a key that has no name of its own."""
    jwk = _public_jwk(key)
    members = _THUMBPRINT_MEMBERS.get(jwk["kty"], ("crv", "kty", "x"))
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class VerificationKey:
    """One issuer public key. A token whose header names a ``kid`` is only tried against keys
    whose ``kid`` or RFC 7638 thumbprint equals it."""

    key: PublicKey
    kid: str | None = None
    # Restricts the key further (a JWK's "alg"); None means every algorithm of its type.
    algorithm: str | None = None
    thumbprint: str = field(init=False)
    algorithms: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        algorithms = _key_algorithms(self.key)
        if self.algorithm is not None:
            if self.algorithm not in algorithms:
                raise ValueError(f"algorithm {self.algorithm} does not fit this key type")
            algorithms = frozenset({self.algorithm})
        object.__setattr__(self, "algorithms", algorithms)
        object.__setattr__(self, "thumbprint", jwk_thumbprint(self.key))

    def matches_kid(self, kid: str) -> bool:
        return kid in (self.kid, self.thumbprint)


KeySource = str | bytes | Mapping[str, Any] | PublicKey | VerificationKey
"""PEM text or bytes (public key or X.509 certificate, possibly several blocks), a JWK or JWKS
(dict or JSON text), a cryptography public key, or a ready :class:`VerificationKey`."""


def _keys_from_pem(data: bytes, kid: str | None) -> list[VerificationKey]:
    keys: list[VerificationKey] = []
    for block in _PEM_BLOCK.finditer(data):
        label = block.group(1)
        if b"PRIVATE" in label:
            raise ValueError("a private key was given where a public key is expected")
        public: object = (
            x509.load_pem_x509_certificate(block.group()).public_key()
            if label == b"CERTIFICATE"
            else serialization.load_pem_public_key(block.group())
        )
        if not isinstance(public, PublicKey):
            raise ValueError(f"unsupported public key type {type(public).__name__}")
        keys.append(VerificationKey(public, kid=kid))
    if not keys:
        raise ValueError("no PEM public key or certificate found")
    return keys


def _keys_from_jwk(jwk: Mapping[str, Any]) -> list[VerificationKey]:
    if "keys" in jwk:  # a JWKS
        return [key for item in jwk["keys"] for key in _keys_from_jwk(item)]
    if jwk.get("use", "sig") != "sig":
        return []
    if jwk.get("kty") == "oct" or "d" in jwk:
        raise ValueError("only public asymmetric JWKs are accepted")
    public = jwt.PyJWK(dict(jwk)).key
    if not isinstance(public, PublicKey):
        raise ValueError(f"unsupported JWK key type {jwk.get('kty')!r}")
    return [VerificationKey(public, kid=jwk.get("kid"), algorithm=jwk.get("alg"))]


def _coerce_keys(source: KeySource) -> list[VerificationKey]:
    if isinstance(source, VerificationKey):
        return [source]
    if isinstance(source, PublicKey):
        return [VerificationKey(source)]
    if isinstance(source, Mapping):
        return _keys_from_jwk(source)
    if isinstance(source, str):
        if source.lstrip().startswith("{"):
            return _keys_from_jwk(json.loads(source))
        source = source.encode()
    if isinstance(source, bytes):
        return _keys_from_pem(source, kid=None)
    raise TypeError(f"cannot use a {type(source).__name__} as a public key")


_KEY_FILE_SUFFIXES: Final = (".pem", ".pub")


def load_public_keys(paths: Iterable[Path | str]) -> list[VerificationKey]:
    """Read PEM public keys or certificates; a directory contributes every ``*.pem``/``*.pub``.

    A key read from a file is also known by the file's stem as ``kid`` (name the file after the
    issuer's key id), besides its RFC 7638 thumbprint. A ``*.json`` file is read as a JWK/JWKS.
    """
    keys: list[VerificationKey] = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in _KEY_FILE_SUFFIXES)
            if not files:
                raise ValueError(f"no *.pem or *.pub key in {path}")
        else:
            files = [path]
        for file in files:
            try:
                if file.suffix == ".json":
                    keys.extend(_keys_from_jwk(json.loads(file.read_text())))
                else:
                    keys.extend(_keys_from_pem(file.read_bytes(), kid=file.stem))
            except ValueError as exc:
                raise ValueError(f"{file}: {exc}") from exc
    return keys


# --- Verification ---------------------------------------------------------------------------------


def _reason(exc: jwt.PyJWTError) -> str:
    # Order matters: several of these subclass each other (e.g. ExpiredSignature < InvalidToken).
    match exc:
        case jwt.ExpiredSignatureError():
            return "token expired"
        case jwt.ImmatureSignatureError():
            return "token not yet valid"
        case jwt.InvalidAudienceError():
            return "wrong audience"
        case jwt.InvalidIssuerError():
            return "wrong issuer"
        case jwt.MissingRequiredClaimError():
            return f"missing claim {exc.claim}"
        case jwt.InvalidSignatureError():
            return "bad signature"
        case jwt.InvalidAlgorithmError():
            return "token algorithm not allowed"
        case jwt.InvalidIssuedAtError():
            return "claim iat must be a number"
        case jwt.exceptions.InvalidSubjectError():
            return "claim sub must be a string"
        case jwt.exceptions.InvalidJTIError():
            return "claim jti must be a string"
        case jwt.DecodeError():
            return "malformed token"
        case _:
            return "invalid token"


def _optional_str(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidToken(f"claim {name} must be a non-empty string")
    return value


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    """Map verified claims onto a :class:`Principal`; raise :class:`InvalidToken` on bad claims."""
    ura = claims.get("ura")
    if ura is None:
        raise InvalidToken("missing claim ura")
    if not isinstance(ura, str) or not _URA_RE.fullmatch(ura):
        # A number would have lost its leading zeros: only the string form is accepted.
        raise InvalidToken("claim ura must be a string of 8 digits")
    uzi = claims.get("uzi")
    if uzi is not None and (not isinstance(uzi, str) or not _UZI_RE.fullmatch(uzi)):
        raise InvalidToken("claim uzi must be a string of 9 digits")
    on_behalf_of = claims.get("on_behalf_of")
    if on_behalf_of is not None and (
        not isinstance(on_behalf_of, str) or not _UZI_RE.fullmatch(on_behalf_of)
    ):
        raise InvalidToken("claim on_behalf_of must be a string of 9 digits (a UZI number)")
    roles = claims.get("roles")
    if roles is None:
        raise InvalidToken("missing claim roles")
    if (
        not isinstance(roles, list)
        or not 0 < len(roles) <= _MAX_ROLES
        or not all(isinstance(r, str) and r for r in roles)
    ):
        raise InvalidToken("claim roles must be a non-empty list of strings")
    subject = _optional_str(claims, "sub")
    if subject is None:
        raise InvalidToken("missing claim sub")
    client_id = _optional_str(claims, "client_id") or _optional_str(claims, "azp")
    represents = claims.get("represents", [])
    if (
        not isinstance(represents, list)
        or len(represents) > _MAX_REPRESENTED
        or not all(is_valid_bsn(bsn) for bsn in represents)
    ):
        # Without the values: they are BSNs.
        raise InvalidToken(
            f"claim represents must be a list of at most {_MAX_REPRESENTED} BSNs "
            "(strings of 9 digits passing the 11-proof)"
        )
    try:
        return Principal(
            organisation_ura=ura,
            user_uzi=uzi,
            on_behalf_of_uzi=on_behalf_of,
            role=roles[0],
            roles=frozenset(roles),
            purpose_of_use=_optional_str(claims, "purpose"),
            subject=subject,
            client_id=client_id,
            token_id=claims.get("jti"),
            issuer=claims.get("iss"),
            expires_at=datetime.fromtimestamp(claims["exp"], UTC) if "exp" in claims else None,
            represents=frozenset(represents),
        )
    except (ValidationError, TypeError, ValueError, OverflowError, OSError) as exc:
        # e.g. an exp beyond datetime's range; the message would be pydantic's, so keep ours.
        raise InvalidToken("invalid claims") from exc


class TokenVerifier:
    """Verifies bearer JWTs against the issuer's public keys (several during key rotation)."""

    def __init__(
        self,
        public_keys: Sequence[KeySource],
        issuer: str | None,
        audience: str | None,
        leeway_s: float = 30,
        algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
    ) -> None:
        refused = [alg for alg in algorithms if alg not in _ASYMMETRIC_ALGORITHMS]
        if refused:
            raise ValueError(f"only asymmetric JWS algorithms are allowed, not {refused}")
        if not algorithms:
            raise ValueError("at least one algorithm is required")
        if leeway_s < 0:
            raise ValueError("leeway_s must not be negative")
        self._algorithms = frozenset(algorithms)
        self._keys: list[VerificationKey] = []
        for source in public_keys:
            for key in _coerce_keys(source):
                if key.algorithms.isdisjoint(self._algorithms):
                    raise ValueError(
                        f"key {key.kid or key.thumbprint} fits none of the allowed algorithms "
                        f"{sorted(self._algorithms)} (it needs one of {sorted(key.algorithms)})"
                    )
                self._keys.append(key)
        if not self._keys:
            raise ValueError("at least one public key is required")
        self._issuer = issuer
        self._audience = audience
        self._leeway_s = leeway_s
        self._options: Options = {
            "require": ["exp", "iat", "sub"],
            "verify_aud": audience is not None,
            "enforce_minimum_key_length": True,
        }

    def __repr__(self) -> str:
        kids = [key.kid or key.thumbprint for key in self._keys]
        return f"TokenVerifier(issuer={self._issuer!r}, audience={self._audience!r}, keys={kids})"

    def _candidates(self, token: str) -> tuple[str, list[VerificationKey]]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken("malformed token") from exc
        alg = header.get("alg")
        # Checked before any key is touched: "none" and HS* never reach a verification.
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise InvalidToken("token algorithm not allowed")
        kid = header.get("kid")
        keys = self._keys if kid is None else [k for k in self._keys if k.matches_kid(kid)]
        if not keys:
            raise InvalidToken("unknown key id")
        keys = [k for k in keys if alg in k.algorithms]
        if not keys:
            raise InvalidToken("token algorithm does not match the key")
        return alg, keys

    def verify(self, token: str) -> Principal:
        if not isinstance(token, str) or not token:
            raise InvalidToken("empty token")
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidToken("token too large")
        alg, keys = self._candidates(token)
        for key in keys:
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=[alg],
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=self._leeway_s,
                    options=self._options,
                )
            except jwt.InvalidSignatureError:
                continue  # rotation: the next key may have signed it
            except jwt.PyJWTError as exc:
                raise InvalidToken(_reason(exc)) from exc
            return principal_from_claims(claims)
        raise InvalidToken("bad signature")


# --- Settings -------------------------------------------------------------------------------------


class AuthSettings(BaseSettings):
    """Which issuer a service trusts: its public keys, name and our audience."""

    model_config = SettingsConfigDict(
        env_prefix="BEELDPORTAAL_AUTH_", extra="ignore", hide_input_in_errors=True
    )

    # Files or directories of PEM public keys. The env var takes a JSON list
    # (["/a.pem","/keys"]) or a comma-separated list (/a.pem,/keys). Required: no keys, no API.
    public_keys: Annotated[list[Path], NoDecode]
    issuer: str = DEV_ISSUER
    audience: str = DEV_AUDIENCE
    leeway_s: float = Field(default=30, ge=0, le=300)

    @field_validator("public_keys", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("public_keys")
    @classmethod
    def _not_empty(cls, value: list[Path]) -> list[Path]:
        if not value:
            raise ValueError("at least one public key path is required")
        return value

    def build_verifier(self) -> TokenVerifier:
        return TokenVerifier(
            load_public_keys(self.public_keys),
            issuer=self.issuer,
            audience=self.audience,
            leeway_s=self.leeway_s,
        )


# --- FastAPI --------------------------------------------------------------------------------------

_REALM: Final = "beeldportaal"


def _header_value(text: str) -> str:
    return text.replace("\\", "").replace('"', "'")


def _challenge(error: str | None = None, description: str | None = None) -> dict[str, str]:
    parts = [f'realm="{_REALM}"']
    if error is not None:
        parts.append(f'error="{error}"')
    if description is not None:
        parts.append(f'error_description="{_header_value(description)}"')
    return {"WWW-Authenticate": "Bearer " + ", ".join(parts)}


_bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    bearerFormat="JWT",
    description="A JWT from the trusted issuer carrying ura, uzi, roles and purpose claims.",
)

Authenticate = Callable[..., Awaitable[Principal]]


def _log_refusal(request: Request, reason: str) -> None:
    """A 401 names nobody, so it is no NEN 7513 record (that needs an organisation); the
    operator still sees each one: where it came from, on which route, and why. The route's
    template, never the path (a pickup link is a path), and the reason is one of ours (it never
    quotes the token)."""
    route = request.scope.get("route")
    log.warning(
        "request refused: not authenticated",
        reason=reason,
        route=f"{request.method} {getattr(route, 'path', '(unmatched)')}",
        client=request.client.host if request.client else "unknown",
    )


def bearer_principal(verifier: TokenVerifier) -> Authenticate:
    """A FastAPI dependency returning the verified :class:`Principal`, or answering 401.

    Following RFC 6750 §3.1, a request without bearer credentials gets a bare challenge (no
    error code); a bad token gets ``error="invalid_token"`` and the reason.
    """

    # Dependencies as default values: with postponed annotations FastAPI resolves annotation strings
    # in module globals only, where these closures' locals do not exist.
    async def authenticate(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer_scheme),  # noqa: B008
    ) -> Principal:
        if credentials is None:
            _log_refusal(request, "missing bearer token")
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers=_challenge()
            )
        try:
            return verifier.verify(credentials.credentials)
        except InvalidToken as exc:
            _log_refusal(request, exc.reason)
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                exc.reason,
                headers=_challenge("invalid_token", exc.reason),
            ) from exc

    return authenticate


def require_role(*roles: str, authenticate: Authenticate) -> Authenticate:
    """A dependency returning the principal when it holds *any* of ``roles``; 403 otherwise.

    ``Depends(require_role("provider", authenticate=auth))`` where ``auth`` is the service's
    :func:`bearer_principal`.
    """
    if not roles:
        raise ValueError("require_role needs at least one role")
    wanted = frozenset(roles)
    description = "requires role " + " or ".join(sorted(wanted))

    async def authorise(principal: Principal = Depends(authenticate)) -> Principal:  # noqa: B008
        if principal.roles.isdisjoint(wanted):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                description,
                headers=_challenge("insufficient_scope", description),
            )
        return principal

    return authorise


# --- Dev issuer -----------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start: no window in which the key is readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def generate_dev_keypair(directory: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create an Ed25519 signing key (mode 0600) and its PEM public key in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_path = directory / DEV_PRIVATE_KEY_NAME
    public_path = directory / DEV_PUBLIC_KEY_NAME
    if private_path.exists() and not overwrite:
        raise FileExistsError(f"{private_path} exists")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.unlink(missing_ok=True)
    _write_private(private_path, private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def ensure_dev_keypair(directory: Path) -> tuple[Path, Path]:
    """The dev keypair in ``directory``, generated on first use."""
    private_path = Path(directory) / DEV_PRIVATE_KEY_NAME
    if private_path.exists():
        return private_path, private_path.with_name(DEV_PUBLIC_KEY_NAME)
    return generate_dev_keypair(directory)


def _signing_algorithm(key: PrivateKey) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = _EC_CURVE_ALGORITHM.get(key.curve.name)
        if alg is None:
            raise ValueError(f"unsupported elliptic curve {key.curve.name}")
        return alg
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    raise ValueError(f"unsupported private key type {type(key).__name__}")


def mint_token(
    private_key_path: Path,
    *,
    ura: str,
    uzi: str | None = None,
    roles: Sequence[str] = ("provider",),
    purpose: str | None = None,
    issuer: str = DEV_ISSUER,
    audience: str = DEV_AUDIENCE,
    ttl_s: int = 3600,
    kid: str | None = None,
    client_id: str | None = None,
    subject: str | None = None,
    on_behalf_of: str | None = None,
    represents: Sequence[str] = (),
    now: float | None = None,
) -> str:
    """Sign a token with a dev key. ``kid`` defaults to the key's RFC 7638 thumbprint and
    ``sub`` to the UZI number, else the client id, else the URA."""
    if not _URA_RE.fullmatch(ura):
        raise ValueError("ura must be 8 digits")
    if uzi is not None and not _UZI_RE.fullmatch(uzi):
        raise ValueError("uzi must be 9 digits")
    if on_behalf_of is not None and not _UZI_RE.fullmatch(on_behalf_of):
        raise ValueError("on_behalf_of must be 9 digits (a UZI number)")
    if not roles or not all(roles):
        raise ValueError("at least one non-empty role is required")
    if len(represents) > _MAX_REPRESENTED or not all(is_valid_bsn(b) for b in represents):
        raise ValueError(
            f"represents must hold at most {_MAX_REPRESENTED} BSNs (9 digits passing the 11-proof)"
        )
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    key = serialization.load_pem_private_key(Path(private_key_path).read_bytes(), password=None)
    if not isinstance(key, PrivateKey):
        raise ValueError(f"unsupported private key type {type(key).__name__}")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject or uzi or client_id or ura,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl_s,
        "jti": uuid.uuid4().hex,
        "ura": ura,
        "roles": list(roles),
    }
    if uzi is not None:
        claims["uzi"] = uzi
    if purpose is not None:
        claims["purpose"] = purpose
    if client_id is not None:
        claims["client_id"] = client_id
    if on_behalf_of is not None:
        claims["on_behalf_of"] = on_behalf_of
    if represents:
        claims["represents"] = list(represents)
    headers = {"kid": kid or jwk_thumbprint(key.public_key()), "typ": "JWT"}
    return jwt.encode(claims, key, algorithm=_signing_algorithm(key), headers=headers)

"""Bearer-JWT verification, the FastAPI dependencies and the dev token CLI (no network)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from fastapi import Depends, FastAPI

from deploy.cli import build_parser
from deploy.tokens import add_token_commands
from shared.auth import (
    DEV_AUDIENCE,
    DEV_ISSUER,
    AuthSettings,
    InvalidToken,
    Principal,
    TokenVerifier,
    VerificationKey,
    bearer_principal,
    generate_dev_keypair,
    jwk_thumbprint,
    load_public_keys,
    mint_token,
    require_role,
)
from tests.asgi import asgi_get

ISSUER = "https://issuer.example"
AUDIENCE = "beeldportaal"
URA = "12345678"
UZI = "123456782"

# --- factories ------------------------------------------------------------------------------------


def make_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims by default; an override of ``None`` removes the claim."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "token-1",
        "ura": URA,
        "uzi": UZI,
        "roles": ["01.015", "provider"],
        "purpose": "TREAT",
        "client_id": "pacs-viewer",
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def sign(key: Any, claims: dict[str, Any] | None = None, *, alg: str = "EdDSA", **headers: Any):
    return jwt.encode(make_claims() if claims is None else claims, key, alg, headers=headers)


def verifier_for(*keys: Any, **kwargs: Any) -> TokenVerifier:
    kwargs.setdefault("issuer", ISSUER)
    kwargs.setdefault("audience", AUDIENCE)
    return TokenVerifier([public_pem(k) for k in keys], **kwargs)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def forge(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    if secret is None:
        return signing_input + "."
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def refusal(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as caught:
        verifier.verify(token)
    return caught.value.reason


# --- verification ---------------------------------------------------------------------------------


def test_a_valid_token_yields_a_principal_with_every_claim() -> None:
    key = make_key()
    principal = verifier_for(key).verify(sign(key))

    assert principal.organisation_ura == URA
    assert principal.user_uzi == UZI
    assert principal.role == "01.015"
    assert principal.roles == frozenset({"01.015", "provider"})
    assert principal.purpose_of_use == "TREAT"
    assert principal.subject == "user-1"
    assert principal.client_id == "pacs-viewer"
    assert principal.token_id == "token-1"
    assert principal.issuer == ISSUER
    assert principal.expires_at is not None
    assert principal.has_role("provider", "operator")
    assert not principal.has_role("operator")
    assert not principal.is_emergency


def test_a_system_token_without_uzi_or_purpose_is_valid_and_azp_names_the_client() -> None:
    key = make_key()
    claims = make_claims(uzi=None, purpose=None, client_id=None, azp="routing", roles=["system"])
    principal = verifier_for(key).verify(sign(key, claims))

    assert principal.user_uzi is None
    assert principal.purpose_of_use is None
    assert principal.client_id == "routing"
    assert principal.role == "system"


def test_an_emergency_purpose_is_flagged() -> None:
    key = make_key()
    assert verifier_for(key).verify(sign(key, make_claims(purpose="ETREAT"))).is_emergency


def test_an_expired_token_is_refused() -> None:
    key = make_key()
    token = sign(key, make_claims(exp=int(time.time()) - 120))
    assert refusal(verifier_for(key), token) == "token expired"


def test_a_token_expired_within_the_leeway_is_accepted() -> None:
    key = make_key()
    token = sign(key, make_claims(exp=int(time.time()) - 10))
    assert verifier_for(key, leeway_s=30).verify(token).organisation_ura == URA


def test_a_token_not_yet_valid_is_refused() -> None:
    key = make_key()
    later = int(time.time()) + 600
    assert refusal(verifier_for(key), sign(key, make_claims(nbf=later))) == "token not yet valid"
    assert refusal(verifier_for(key), sign(key, make_claims(iat=later))) == "token not yet valid"


def test_a_token_from_another_issuer_is_refused() -> None:
    key = make_key()
    token = sign(key, make_claims(iss="https://elsewhere.example"))
    assert refusal(verifier_for(key), token) == "wrong issuer"


def test_a_token_for_another_audience_is_refused() -> None:
    key = make_key()
    assert refusal(verifier_for(key), sign(key, make_claims(aud="other-api"))) == "wrong audience"


def test_a_token_listing_our_audience_among_others_is_accepted() -> None:
    key = make_key()
    token = sign(key, make_claims(aud=["other-api", AUDIENCE]))
    assert verifier_for(key).verify(token).organisation_ura == URA


def test_a_token_without_audience_is_refused_when_one_is_configured() -> None:
    key = make_key()
    assert refusal(verifier_for(key), sign(key, make_claims(aud=None))) == "missing claim aud"


def test_a_token_without_expiry_is_refused() -> None:
    key = make_key()
    assert refusal(verifier_for(key), sign(key, make_claims(exp=None))) == "missing claim exp"


def test_a_token_signed_by_an_unknown_key_has_a_bad_signature() -> None:
    trusted, stranger = make_key(), make_key()
    assert refusal(verifier_for(trusted), sign(stranger)) == "bad signature"


def test_a_tampered_payload_has_a_bad_signature() -> None:
    key = make_key()
    header, _, signature = sign(key).split(".")
    payload = b64url(json.dumps(make_claims(ura="87654321")).encode())
    assert refusal(verifier_for(key), f"{header}.{payload}.{signature}") == "bad signature"


def test_a_token_naming_an_unknown_kid_is_refused() -> None:
    key = make_key()
    assert refusal(verifier_for(key), sign(key, kid="retired-2023")) == "unknown key id"


def test_rotation_verifies_tokens_of_both_keys_by_kid_and_without_kid() -> None:
    old, new = make_key(), make_key()
    verifier = TokenVerifier(
        [
            VerificationKey(old.public_key(), kid="2024"),
            VerificationKey(new.public_key(), kid="2025"),
        ],
        issuer=ISSUER,
        audience=AUDIENCE,
    )

    assert verifier.verify(sign(old, kid="2024")).organisation_ura == URA
    assert verifier.verify(sign(new, kid="2025")).organisation_ura == URA
    assert verifier.verify(sign(old)).organisation_ura == URA
    assert verifier.verify(sign(new)).organisation_ura == URA
    assert verifier.verify(sign(new, kid=jwk_thumbprint(new.public_key()))).role == "01.015"
    # The kid selects the key: the old key's token presented under the new key's kid fails.
    assert refusal(verifier, sign(old, kid="2025")) == "bad signature"


def test_rsa_and_p256_keys_verify_rs256_and_es256_tokens() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    verifier = verifier_for(rsa_key, ec_key)

    assert verifier.verify(sign(rsa_key, alg="RS256")).organisation_ura == URA
    assert verifier.verify(sign(ec_key, alg="ES256")).organisation_ura == URA


def test_a_jwks_document_is_accepted_as_keys() -> None:
    key = make_key()
    jwk = jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    verifier = TokenVerifier(
        [{"keys": [{**jwk, "kid": "idp-1", "use": "sig"}]}], issuer=ISSUER, audience=AUDIENCE
    )
    assert verifier.verify(sign(key, kid="idp-1")).organisation_ura == URA


def test_an_unsigned_alg_none_token_is_refused() -> None:
    key = make_key()
    token = forge({"alg": "none", "typ": "JWT"}, make_claims(), secret=None)
    assert refusal(verifier_for(key), token) == "token algorithm not allowed"


def test_an_hs256_token_signed_with_the_public_key_pem_as_secret_is_refused() -> None:
    key = make_key()
    pem = public_pem(key)
    for header in ({"alg": "HS256"}, {"alg": "HS256", "kid": jwk_thumbprint(key.public_key())}):
        token = forge(header, make_claims(), secret=pem)
        assert refusal(verifier_for(key), token) == "token algorithm not allowed"


def test_a_token_whose_algorithm_does_not_fit_the_key_type_is_refused() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = make_key()
    token = sign(rsa_key, alg="RS256", kid=jwk_thumbprint(ed_key.public_key()))
    assert refusal(verifier_for(ed_key), token) == "token algorithm does not match the key"


def test_symmetric_algorithms_cannot_be_configured() -> None:
    key = make_key()
    for algorithms in (("HS256",), ("none",), ("EdDSA", "HS512")):
        with pytest.raises(ValueError, match="asymmetric"):
            verifier_for(key, algorithms=algorithms)


def test_a_private_key_is_not_accepted_as_a_public_key() -> None:
    pem = make_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError, match="private key"):
        TokenVerifier([pem], issuer=ISSUER, audience=AUDIENCE)


def test_a_verifier_needs_at_least_one_key() -> None:
    with pytest.raises(ValueError, match="at least one public key"):
        TokenVerifier([], issuer=ISSUER, audience=AUDIENCE)


def test_a_token_without_ura_is_refused() -> None:
    key = make_key()
    assert refusal(verifier_for(key), sign(key, make_claims(ura=None))) == "missing claim ura"


@pytest.mark.parametrize("ura", ["1234567", "123456789", "1234567a", 12345678])
def test_a_malformed_ura_is_refused(ura: Any) -> None:
    key = make_key()
    reason = refusal(verifier_for(key), sign(key, make_claims(ura=ura)))
    assert reason == "claim ura must be a string of 8 digits"


def test_on_behalf_of_names_the_professional_the_acting_person_works_for() -> None:
    key = make_key()
    verifier = verifier_for(key)
    assert verifier.verify(sign(key)).on_behalf_of_uzi is None
    principal = verifier.verify(sign(key, make_claims(on_behalf_of="123456782")))
    assert principal.on_behalf_of_uzi == "123456782" and principal.user_uzi == UZI
    for bad in ("12345678", 123456782, ""):
        reason = refusal(verifier, sign(key, make_claims(on_behalf_of=bad)))
        assert reason == "claim on_behalf_of must be a string of 9 digits (a UZI number)"


def test_represents_names_the_patients_a_portal_token_may_act_for_and_never_shows_them() -> None:
    key = make_key()
    verifier = verifier_for(key)
    assert verifier.verify(sign(key)).represents == frozenset()
    principal = verifier.verify(sign(key, make_claims(represents=["999991772", "111222333"])))

    assert principal.acts_for("999991772") and principal.acts_for("111222333")
    assert not principal.acts_for("999990019")
    assert "999991772" not in repr(principal) and "999991772" not in str(principal)


@pytest.mark.parametrize(
    "represents",
    ["999991772", ["999991773"], ["99999177"], [999991772], [None], ["999991772"] * 33],
)
def test_a_represents_claim_of_anything_but_bsns_is_refused_without_echoing_it(
    represents: Any,
) -> None:
    key = make_key()
    reason = refusal(verifier_for(key), sign(key, make_claims(represents=represents)))

    assert reason.startswith("claim represents must be a list of at most 32 BSNs")
    assert "99999177" not in reason


def test_a_malformed_uzi_is_refused() -> None:
    key = make_key()
    reason = refusal(verifier_for(key), sign(key, make_claims(uzi="12345678")))
    assert reason == "claim uzi must be a string of 9 digits"


@pytest.mark.parametrize("roles", [None, [], "provider", [""], [1]])
def test_roles_must_be_a_non_empty_list_of_strings(roles: Any) -> None:
    key = make_key()
    reason = refusal(verifier_for(key), sign(key, make_claims(roles=roles)))
    assert reason in {"missing claim roles", "claim roles must be a non-empty list of strings"}


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "empty token"),
        ("not-a-jwt", "malformed token"),
        ("a.b.c", "malformed token"),
        ("x" * 20_000, "token too large"),
    ],
    ids=["empty", "no-dots", "bad-base64", "huge"],
)
def test_garbage_is_refused_with_a_reason_that_does_not_echo_it(token: str, reason: str) -> None:
    assert refusal(verifier_for(make_key()), token) == reason


def test_an_expiry_beyond_the_calendar_is_refused_cleanly() -> None:
    key = make_key()
    assert refusal(verifier_for(key), sign(key, make_claims(exp=10**15))) == "invalid claims"


# --- keys on disk and settings --------------------------------------------------------------------


def test_a_key_directory_loads_every_pem_and_pub_file_named_by_its_stem(tmp_path: Path) -> None:
    first, second = make_key(), make_key()
    (tmp_path / "idp-2024.pem").write_bytes(public_pem(first))
    (tmp_path / "idp-2025.pub").write_bytes(public_pem(second))
    (tmp_path / "README.txt").write_text("not a key")

    keys = load_public_keys([tmp_path])
    verifier = TokenVerifier(keys, issuer=ISSUER, audience=AUDIENCE)

    assert sorted(k.kid for k in keys if k.kid) == ["idp-2024", "idp-2025"]
    assert verifier.verify(sign(second, kid="idp-2025")).organisation_ura == URA


def test_an_x509_certificate_file_supplies_its_public_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer.example")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "issuer.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))

    verifier = TokenVerifier(load_public_keys([tmp_path / "issuer.pem"]), ISSUER, AUDIENCE)

    assert verifier.verify(sign(key, alg="ES256", kid="issuer")).organisation_ura == URA


def test_an_empty_key_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no \*\.pem"):
        load_public_keys([tmp_path])


def test_auth_settings_read_key_paths_as_json_or_comma_separated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a.pem", tmp_path / "keys"
    monkeypatch.setenv("BEELDPORTAAL_AUTH_PUBLIC_KEYS", json.dumps([str(a), str(b)]))
    assert AuthSettings().public_keys == [a, b]

    monkeypatch.setenv("BEELDPORTAAL_AUTH_PUBLIC_KEYS", f"{a}, {b}")
    monkeypatch.setenv("BEELDPORTAAL_AUTH_ISSUER", ISSUER)
    settings = AuthSettings()
    assert settings.public_keys == [a, b]
    assert settings.issuer == ISSUER
    assert settings.audience == DEV_AUDIENCE


def test_auth_settings_require_public_keys() -> None:
    with pytest.raises(ValueError, match="public_keys"):
        AuthSettings()


def test_auth_settings_build_a_verifier_for_the_configured_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private_path, public_path = generate_dev_keypair(tmp_path)
    monkeypatch.setenv("BEELDPORTAAL_AUTH_PUBLIC_KEYS", str(public_path.parent))

    verifier = AuthSettings().build_verifier()
    token = mint_token(private_path, ura=URA, issuer=DEV_ISSUER, audience=DEV_AUDIENCE)

    assert verifier.verify(token).organisation_ura == URA


# --- FastAPI --------------------------------------------------------------------------------------


def make_app(verifier: TokenVerifier) -> FastAPI:
    app = FastAPI()
    auth = bearer_principal(verifier)

    @app.get("/whoami")
    async def whoami(principal: Principal = Depends(auth)) -> dict[str, str]:  # noqa: B008
        return {"ura": principal.organisation_ura}

    @app.get("/operators")
    async def operators(
        principal: Principal = Depends(require_role("operator", authenticate=auth)),  # noqa: B008
    ) -> dict[str, str]:
        return {"role": principal.role}

    return app


async def call(app: FastAPI, path: str, token: str | None = None, scheme: str = "Bearer"):
    """One GET: (status, headers, JSON body)."""
    headers = {} if token is None else {"authorization": f"{scheme} {token}"}
    answer = await asgi_get(app, path, headers)
    return answer.status, answer.headers, json.loads(answer.body)


async def test_a_request_without_a_bearer_token_gets_a_401_challenge() -> None:
    app = make_app(verifier_for(make_key()))
    for scheme in ("Bearer", "Basic"):
        status, headers, body = await call(
            app, "/whoami", None if scheme == "Bearer" else "x:y", scheme
        )
        assert status == 401
        assert headers["www-authenticate"] == 'Bearer realm="beeldportaal"'
        assert body == {"detail": "missing bearer token"}


async def test_an_invalid_token_gets_a_401_with_the_reason_in_the_challenge() -> None:
    key = make_key()
    app = make_app(verifier_for(key))
    status, headers, body = await call(app, "/whoami", sign(key, make_claims(aud="other")))

    assert status == 401
    assert headers["www-authenticate"] == (
        'Bearer realm="beeldportaal", error="invalid_token", error_description="wrong audience"'
    )
    assert body == {"detail": "wrong audience"}


async def test_each_401_is_logged_with_the_route_and_why_never_the_token_or_the_path() -> None:
    key = make_key()
    app = make_app(verifier_for(key))
    auth = bearer_principal(verifier_for(key))

    @app.get("/links/{link}")
    async def link(link: str, principal: Principal = Depends(auth)) -> dict[str, str]:  # noqa: B008
        return {"ura": principal.organisation_ura}

    other_audience = sign(key, make_claims(aud="other"))

    with structlog.testing.capture_logs() as logs:
        await call(app, "/whoami")
        await call(app, "/links/secret-link-token", other_audience)

    refusals = [e for e in logs if e["event"] == "request refused: not authenticated"]
    assert [(e["reason"], e["route"], e["log_level"]) for e in refusals] == [
        ("missing bearer token", "GET /whoami", "warning"),
        ("wrong audience", "GET /links/{link}", "warning"),
    ]
    assert other_audience not in repr(logs) and "secret-link-token" not in repr(logs)


async def test_a_principal_without_the_required_role_gets_a_403() -> None:
    key = make_key()
    status, headers, body = await call(make_app(verifier_for(key)), "/operators", sign(key))

    assert status == 403
    assert 'error="insufficient_scope"' in headers["www-authenticate"]
    assert body == {"detail": "requires role operator"}


async def test_a_valid_token_with_the_role_gets_a_200() -> None:
    key = make_key()
    app = make_app(verifier_for(key))

    status, _, body = await call(app, "/whoami", sign(key))
    assert (status, body) == (200, {"ura": URA})
    status, _, body = await call(app, "/operators", sign(key, make_claims(roles=["operator"])))
    assert (status, body) == (200, {"role": "operator"})


def test_the_openapi_document_declares_the_bearer_scheme() -> None:
    schemes = make_app(verifier_for(make_key())).openapi()["components"]["securitySchemes"]
    assert schemes["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": schemes["bearer"]["description"],
    }


# --- dev issuer and CLI ---------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    # deploy/cli.py does not wire the token commands yet: add them to its parser here.
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    if "token" not in commands.choices:  # type: ignore[operator]
        add_token_commands(commands)  # type: ignore[arg-type]
    args = parser.parse_args(list(argv))
    return int(args.handler(args))


def test_the_dev_keypair_keeps_its_private_key_owner_only(tmp_path: Path) -> None:
    private_path, public_path = generate_dev_keypair(tmp_path / "dev-jwt")

    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert b"PRIVATE" not in public_path.read_bytes()
    with pytest.raises(FileExistsError):
        generate_dev_keypair(tmp_path / "dev-jwt")


def test_minted_tokens_carry_the_requested_claims(tmp_path: Path) -> None:
    private_path, public_path = generate_dev_keypair(tmp_path)
    token = mint_token(
        private_path,
        ura=URA,
        uzi=UZI,
        roles=("01.015", "provider"),
        purpose="ETREAT",
        issuer=ISSUER,
        audience=AUDIENCE,
        ttl_s=60,
        client_id="cli",
        on_behalf_of="123456782",
        represents=("999991772",),
    )
    principal = TokenVerifier(load_public_keys([public_path]), ISSUER, AUDIENCE).verify(token)

    assert principal.on_behalf_of_uzi == "123456782"
    assert principal.represents == frozenset({"999991772"})
    assert principal.subject == UZI
    assert principal.role == "01.015"
    assert principal.client_id == "cli"
    assert principal.is_emergency
    assert principal.token_id


def test_minting_refuses_a_malformed_ura(tmp_path: Path) -> None:
    private_path, _ = generate_dev_keypair(tmp_path)
    with pytest.raises(ValueError, match="ura"):
        mint_token(private_path, ura="1234567", issuer=ISSUER, audience=AUDIENCE)
    with pytest.raises(ValueError, match="represents"):
        mint_token(private_path, ura=URA, represents=("999991773",))


def test_cli_keygen_then_mint_round_trips_through_the_verifier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("token", "keygen", "--dir", str(tmp_path)) == 0
    public_path = Path(capsys.readouterr().out.strip())

    argv = ["token", "mint", "--key", str(tmp_path / "dev-jwt.key"), "--ura", URA, "--uzi", UZI]
    argv += ["--role", "01.015", "--role", "provider", "--purpose", "TREAT", "--ttl", "120"]
    argv += ["--represents", "999991772"]
    assert run_cli(*argv) == 0
    token = capsys.readouterr().out.strip()

    verifier = TokenVerifier(load_public_keys([public_path]), DEV_ISSUER, DEV_AUDIENCE)
    principal = verifier.verify(token)
    assert (principal.organisation_ura, principal.user_uzi) == (URA, UZI)
    assert principal.roles == frozenset({"01.015", "provider"})
    assert principal.purpose_of_use == "TREAT"
    assert principal.acts_for("999991772")


def test_cli_mint_without_key_creates_the_dev_keypair_in_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BEELDPORTAAL_LOCAL_STATE_DIR", str(tmp_path))

    assert run_cli("token", "mint", "--ura", URA) == 0
    token = capsys.readouterr().out.strip()

    key_dir = tmp_path / "secrets" / "dev-jwt"
    principal = TokenVerifier(load_public_keys([key_dir]), DEV_ISSUER, DEV_AUDIENCE).verify(token)
    assert principal.role == "provider"
    assert principal.user_uzi is None
    assert stat.S_IMODE((key_dir / "dev-jwt.key").stat().st_mode) == 0o600

    # A second mint reuses the key; keygen keeps it unless forced.
    assert run_cli("token", "keygen") == 0
    assert capsys.readouterr().out.strip() == str(key_dir / "dev-jwt.pub")
    assert TokenVerifier(load_public_keys([key_dir]), DEV_ISSUER, DEV_AUDIENCE).verify(token)


def test_cli_mint_rejects_a_seven_digit_ura(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run_cli("token", "mint", "--ura", "1234567", "--key", "unused.key")
    assert exited.value.code == 2
    assert "URA must be exactly 8 digits" in capsys.readouterr().err


def test_cli_mint_with_a_missing_key_file_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("token", "mint", "--ura", URA, "--key", str(tmp_path / "absent.key")) == 1
    assert "no private key" in capsys.readouterr().err

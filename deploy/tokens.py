"""`beeldportaal token keygen|mint`: the local dev issuer that signs bearer JWTs for the APIs.

The keypair lives under the platform's state directory (``<state>/secrets/dev-jwt/``), so
``platform purge`` removes it. Services trust it with
``BEELDPORTAAL_AUTH_PUBLIC_KEYS=<state>/secrets/dev-jwt``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from shared.auth import (
    DEV_AUDIENCE,
    DEV_ISSUER,
    DEV_PRIVATE_KEY_NAME,
    ensure_dev_keypair,
    generate_dev_keypair,
    mint_token,
)


def dev_key_dir() -> Path:
    from deploy.local.config import LocalConfig

    return LocalConfig.from_env().dev_jwt_dir


def _digits(count: int, what: str) -> Callable[[str], str]:
    pattern = re.compile(rf"[0-9]{{{count}}}")

    def parse(value: str) -> str:
        if not pattern.fullmatch(value):
            raise argparse.ArgumentTypeError(f"{what} must be exactly {count} digits")
        return value

    return parse


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return number


def _keygen(args: argparse.Namespace) -> int:
    directory: Path = args.dir or dev_key_dir()
    if (directory / DEV_PRIVATE_KEY_NAME).exists() and not args.force:
        private_path, public_path = ensure_dev_keypair(directory)
        print(f"keeping the existing keypair {private_path} (--force replaces it)", file=sys.stderr)
    else:
        private_path, public_path = generate_dev_keypair(directory, overwrite=args.force)
        print(f"wrote {private_path} (private, 0600) and {public_path}", file=sys.stderr)
    print(public_path)
    return 0


def _mint(args: argparse.Namespace) -> int:
    if args.key is None:
        private_path, _ = ensure_dev_keypair(dev_key_dir())
    else:
        private_path = args.key
        if not private_path.is_file():
            print(f"no private key at {private_path}", file=sys.stderr)
            return 1
    try:
        token = mint_token(
            private_path,
            ura=args.ura,
            uzi=args.uzi,
            roles=args.roles or ("provider",),
            purpose=args.purpose,
            issuer=args.issuer,
            audience=args.audience,
            ttl_s=args.ttl,
            kid=args.kid,
            client_id=args.client_id,
            subject=args.subject,
            on_behalf_of=args.on_behalf_of,
            represents=args.represents or (),
        )
    except ValueError as exc:
        print(f"cannot mint a token: {exc}", file=sys.stderr)
        return 1
    print(token)
    return 0


def add_token_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `token keygen` and `token mint` on the `beeldportaal` command's subparsers."""
    token = subparsers.add_parser("token", help="dev bearer tokens for the HTTP APIs")
    actions = token.add_subparsers(dest="token_command", required=True)

    keygen = actions.add_parser(
        "keygen", help="create the dev signing keypair (Ed25519); prints the public key path"
    )
    keygen.add_argument(
        "--dir", type=Path, help="where to keep it (default: <state>/secrets/dev-jwt)"
    )
    keygen.add_argument(
        "--force", action="store_true", help="replace an existing keypair (old tokens stop working)"
    )
    keygen.set_defaults(handler=_keygen)

    mint = actions.add_parser("mint", help="print a signed token for the given organisation/user")
    mint.add_argument("--ura", required=True, type=_digits(8, "URA"), help="organisation URA")
    mint.add_argument("--uzi", type=_digits(9, "UZI number"), help="the acting person's UZI")
    mint.add_argument(
        "--role",
        dest="roles",
        action="append",
        metavar="ROLE",
        help="repeatable; the first is the primary role (default: provider)",
    )
    mint.add_argument("--purpose", help="purpose of use, e.g. TREAT or ETREAT (emergency)")
    mint.add_argument(
        "--on-behalf-of",
        type=_digits(9, "UZI number"),
        help="UZI number of the professional the acting person works for (audited)",
    )
    mint.add_argument(
        "--represents",
        action="append",
        metavar="BSN",
        help="repeatable; a patient the portal's person may act for (role "
        "patient-representative): a test BSN, as the command line is no place for a real one",
    )
    mint.add_argument(
        "--ttl", type=_positive_int, default=3600, help="lifetime in seconds (default 3600)"
    )
    mint.add_argument(
        "--key",
        type=Path,
        help="private key PEM (default: the dev key under the state dir, created if missing)",
    )
    mint.add_argument("--issuer", default=DEV_ISSUER, help=f"iss claim (default {DEV_ISSUER})")
    mint.add_argument(
        "--audience", default=DEV_AUDIENCE, help=f"aud claim (default {DEV_AUDIENCE})"
    )
    mint.add_argument("--client-id", help="client_id claim")
    mint.add_argument(
        "--subject", help="sub claim (default: the UZI, else the client id, else the URA)"
    )
    mint.add_argument("--kid", help="key id header (default: the key's RFC 7638 thumbprint)")
    mint.set_defaults(handler=_mint)

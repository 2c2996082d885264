"""Authentication of Coinbase WebSocket subscribes: Exchange HMAC signatures and CDP API key JWTs.

- **Exchange** (``level2``, authenticated since 2023): the subscribe message carries ``key``,
  ``passphrase``, ``timestamp`` and ``signature`` = base64(HMAC-SHA256(secret, timestamp + "GET" +
  "/users/self/verify")), exactly as a REST request is signed.
- **Advanced Trade** (optional for market data; Coinbase recommends it "for the most reliable
  connection"): every subscribe message carries a ``jwt`` signed with the CDP API key's EC private
  key (ES256). Coinbase's documented claims: ``iss`` "cdp", ``sub`` the key name, ``nbf`` now,
  ``exp`` now + 120 s, and, for WebSocket (unlike REST), no ``uri``; headers ``kid`` the key name
  and a random ``nonce``. A JWT expires after 2 minutes, so a fresh one is built for each message.

Pure: the caller supplies the time and the nonce. Secrets come from the environment (the ingest's
config), never from the repository; the credential types hide them from ``repr``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

EXCHANGE_SIGNATURE_PATH: Final = "/users/self/verify"
CDP_ISSUER: Final = "cdp"
CDP_JWT_LIFETIME_SECONDS: Final = 120
CDP_ALGORITHM: Final = "ES256"


@dataclass(frozen=True)
class ExchangeCredentials:
    """Coinbase Exchange API credentials (from the environment only; ``repr`` hides them)."""

    key: str = field(repr=False)
    secret_b64: str = field(repr=False)
    passphrase: str = field(repr=False)


def exchange_signature(
    secret_b64: str, timestamp: str, method: str = "GET", path: str = EXCHANGE_SIGNATURE_PATH
) -> str:
    """The ``CB-ACCESS-SIGN`` value: base64(HMAC-SHA256(base64decode(secret), timestamp + method + path)).

    The Exchange WebSocket authenticates a subscribe by signing ``GET /users/self/verify`` exactly
    as a REST request would be signed (Exchange docs, "WebSocket Authentication").

    Raises:
        ValueError: the secret is not base64.
    """
    try:
        key = base64.b64decode(secret_b64, validate=True)
    except ValueError as exc:
        raise ValueError("COINBASE_API_SECRET is not base64") from exc
    digest = hmac.new(key, f"{timestamp}{method}{path}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class CdpKeyError(ValueError):
    """The CDP API private key is not a PEM EC (P-256) private key."""


@dataclass(frozen=True)
class CdpCredentials:
    """A CDP API key for Advanced Trade: its name and its EC private key (PEM; ``repr`` hides it).

    ``key_name`` looks like ``organizations/{org_id}/apiKeys/{key_id}``. The PEM may come with
    literal ``\\n`` escapes (one-line environment variables); they are turned into newlines.
    """

    key_name: str = field(repr=False)
    private_key_pem: str = field(repr=False)

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """The parsed private key.

        Raises:
            CdpKeyError: not a PEM EC private key.
        """
        pem = self.private_key_pem.replace("\\n", "\n").strip().encode()
        try:
            key = load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise CdpKeyError(f"COINBASE_CDP_PRIVATE_KEY is not a PEM private key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CdpKeyError("COINBASE_CDP_PRIVATE_KEY is not an EC (ES256) private key")
        return key


def cdp_websocket_jwt(key_name: str, private_key: ec.EllipticCurvePrivateKey, *, now_seconds: int, nonce: str) -> str:
    """A JWT for one Advanced Trade WebSocket subscribe message (Coinbase's claims; no ``uri``)."""
    claims = {
        "iss": CDP_ISSUER,
        "sub": key_name,
        "nbf": now_seconds,
        "exp": now_seconds + CDP_JWT_LIFETIME_SECONDS,
    }
    return jwt.encode(claims, private_key, algorithm=CDP_ALGORITHM, headers={"kid": key_name, "nonce": nonce})


JwtClaims = dict[str, Any]  # not a topic record: the claims of a CDP JSON Web Token


def verify_cdp_websocket_jwt(token: Any, public_key_pem: str, *, now_seconds: int, leeway: int = 5) -> JwtClaims:
    """Check a subscribe message's ``jwt`` as Coinbase would (the feed server's ``--require-jwt``).

    Verified: the ES256 signature against ``public_key_pem``; ``iss`` "cdp"; ``nbf`` and ``exp``
    present and valid at ``now_seconds`` (``exp`` at most 120 s after ``nbf``); ``sub`` equal to the
    ``kid`` header; a ``nonce`` header; no ``uri`` claim (a WebSocket JWT has none).

    Returns:
        The claims.

    Raises:
        ValueError: why the token is not acceptable.
    """
    if not isinstance(token, str) or not token:
        raise ValueError("no jwt in the subscribe message")
    key = load_pem_public_key(public_key_pem.replace("\\n", "\n").strip().encode())
    try:
        header = jwt.get_unverified_header(token)
        claims: JwtClaims = jwt.decode(
            token,
            key,  # type: ignore[arg-type]  # an EC public key; PyJWT's alias lists the key types loosely
            algorithms=[CDP_ALGORITHM],
            issuer=CDP_ISSUER,
            leeway=leeway,
            # The times are checked below against the caller's clock, not PyJWT's own.
            options={"require": ["iss", "sub", "nbf", "exp"], "verify_exp": False, "verify_nbf": False},
        )
    except jwt.PyJWTError as exc:
        raise ValueError(f"invalid jwt: {exc}") from None
    if header.get("kid") != claims["sub"]:
        raise ValueError("invalid jwt: the kid header is not the sub claim")
    if not header.get("nonce"):
        raise ValueError("invalid jwt: no nonce header")
    if "uri" in claims:
        raise ValueError("invalid jwt: a WebSocket jwt has no uri claim")
    if not isinstance(claims["nbf"], int) or not isinstance(claims["exp"], int):
        raise ValueError("invalid jwt: nbf and exp must be integers")
    if not claims["nbf"] - leeway <= now_seconds <= claims["exp"] + leeway:
        raise ValueError("invalid jwt: not valid now")
    if claims["exp"] - claims["nbf"] > CDP_JWT_LIFETIME_SECONDS:
        raise ValueError(f"invalid jwt: valid longer than {CDP_JWT_LIFETIME_SECONDS} s")
    return claims

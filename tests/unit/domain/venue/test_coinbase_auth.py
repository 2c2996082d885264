"""CDP API key JWTs for Advanced Trade subscribes, against Coinbase's documented claims and headers."""

from __future__ import annotations

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from quotewatch.domain.venue.coinbase_auth import (
    CdpCredentials,
    CdpKeyError,
    cdp_websocket_jwt,
    verify_cdp_websocket_jwt,
)
from quotewatch.domain.venue.coinbase_feeds import book_resubscribe_messages, subscribe_messages

KEY_NAME = "organizations/11111111-2222-3333-4444-555555555555/apiKeys/66666666-7777-8888-9999-000000000000"
NOW = 1_786_309_548


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()


def public_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def test_the_jwt_has_coinbases_documented_claims_and_headers(key: ec.EllipticCurvePrivateKey) -> None:
    token = cdp_websocket_jwt(KEY_NAME, key, now_seconds=NOW, nonce="a1b2c3")
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": KEY_NAME, "nonce": "a1b2c3", "typ": "JWT"}
    claims = jwt.decode(
        token, key.public_key(), algorithms=["ES256"], options={"verify_exp": False, "verify_nbf": False}
    )
    # iss "cdp", sub = key name, nbf = now, exp = now + 2 minutes, and no uri for a WebSocket JWT.
    assert claims == {"iss": "cdp", "sub": KEY_NAME, "nbf": NOW, "exp": NOW + 120}
    assert verify_cdp_websocket_jwt(token, public_pem(key), now_seconds=NOW + 60) == claims


def test_every_advanced_subscribe_message_carries_a_fresh_token(key: ec.EllipticCurvePrivateKey) -> None:
    nonces = iter(["n1", "n2", "n3", "n4", "n5"])

    def fresh() -> str:
        return cdp_websocket_jwt(KEY_NAME, key, now_seconds=NOW, nonce=next(nonces))

    messages = subscribe_messages("coinbase-advanced", ["BTC-USD"], jwt=fresh)
    assert [m["channel"] for m in messages] == ["level2", "heartbeats", "market_trades"]
    assert [jwt.get_unverified_header(m["jwt"])["nonce"] for m in messages] == ["n1", "n2", "n3"]
    resubscribe = book_resubscribe_messages(["ETH-USD"], jwt=fresh)
    assert [(m["type"], m["channel"], m["product_ids"]) for m in resubscribe] == [
        ("unsubscribe", "level2", ["ETH-USD"]),
        ("subscribe", "level2", ["ETH-USD"]),
    ]
    assert all("jwt" in m for m in resubscribe)
    assert all("jwt" not in m for m in subscribe_messages("coinbase-advanced", ["BTC-USD"]))


def test_the_private_key_is_read_from_pem_with_or_without_escaped_newlines(key: ec.EllipticCurvePrivateKey) -> None:
    text = pem(key)
    for form in (text, text.replace("\n", "\\n")):
        credentials = CdpCredentials(key_name=KEY_NAME, private_key_pem=form)
        assert credentials.private_key().private_numbers() == key.private_numbers()
    assert KEY_NAME not in repr(CdpCredentials(key_name=KEY_NAME, private_key_pem=text))
    assert "PRIVATE" not in repr(CdpCredentials(key_name=KEY_NAME, private_key_pem=text))
    with pytest.raises(CdpKeyError, match="not a PEM private key"):
        CdpCredentials(key_name=KEY_NAME, private_key_pem="not a key").private_key()


def test_verification_refuses_wrong_keys_expired_tokens_and_uri_claims(key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    good = cdp_websocket_jwt(KEY_NAME, key, now_seconds=NOW, nonce="n")
    with pytest.raises(ValueError, match="Signature verification failed"):
        verify_cdp_websocket_jwt(good, public_pem(other), now_seconds=NOW)
    with pytest.raises(ValueError, match="not valid now"):
        verify_cdp_websocket_jwt(good, public_pem(key), now_seconds=NOW + 300)
    with pytest.raises(ValueError, match="no jwt"):
        verify_cdp_websocket_jwt(None, public_pem(key), now_seconds=NOW)
    claims = {"iss": "cdp", "sub": KEY_NAME, "nbf": NOW, "exp": NOW + 120, "uri": "GET api.coinbase.com/x"}
    rest = jwt.encode(claims, key, algorithm="ES256", headers={"kid": KEY_NAME, "nonce": "n"})
    with pytest.raises(ValueError, match="no uri claim"):
        verify_cdp_websocket_jwt(rest, public_pem(key), now_seconds=NOW)

"""Registry webhooks: MLflow's own signature scheme, and the receiver over real HTTP on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature

from quotewatch.core.clock import FakeClock
from quotewatch.core.errors import ConfigError
from quotewatch.domain.ml.registry import (
    WebhookRejectedError,
    is_alias_change,
    parse_model_uri,
    verify_webhook,
    webhook_signature,
)
from quotewatch.services.inference.webhook import PATH, WebhookReceiver

SECRET = "s3cret-for-tests"
NOW = 1_786_300_000
BODY = json.dumps(
    {
        "entity": "model_version_alias",
        "action": "created",
        "timestamp": "2026-08-09T21:00:00+00:00",
        "data": {"name": "quotewatch", "alias": "champion", "version": "7"},
    }
).encode()


def headers(body: bytes = BODY, timestamp: int = NOW, secret: str = SECRET, delivery: str = "d-1") -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": str(timestamp),
        "X-MLflow-Signature": webhook_signature(secret, delivery, str(timestamp), body),
    }


def test_our_signature_is_the_one_mlflow_sends() -> None:
    assert webhook_signature(SECRET, "abc", "123", BODY) == _generate_hmac_signature(
        SECRET, "abc", "123", BODY.decode()
    )


def test_verify_accepts_an_authentic_fresh_request() -> None:
    payload = verify_webhook(SECRET, headers(), BODY, NOW + 10)
    assert is_alias_change(payload, "quotewatch")
    assert not is_alias_change(payload, "another-model")


@pytest.mark.parametrize(
    ("request_headers", "body", "message"),
    [
        (headers(secret="wrong"), BODY, "bad signature"),
        (headers(), BODY + b" ", "bad signature"),
        (headers(timestamp=NOW - 3600), BODY, "old"),
        ({"X-MLflow-Timestamp": str(NOW)}, BODY, "missing MLflow webhook headers"),
        (headers(body=b"[1]"), b"[1]", "not a JSON object"),
    ],
)
def test_verify_rejects(request_headers: dict[str, str], body: bytes, message: str) -> None:
    with pytest.raises(WebhookRejectedError, match=message):
        verify_webhook(SECRET, request_headers, body, NOW)


def test_model_uris() -> None:
    assert parse_model_uri("models:/quotewatch@champion").alias == "champion"
    pinned = parse_model_uri("models:/quotewatch/12")
    assert (pinned.name, pinned.version, pinned.alias) == ("quotewatch", "12", None)
    assert str(pinned) == "models:/quotewatch/12"
    assert parse_model_uri("models:/q@challenger").pinned("3") == "models:/q/3"
    with pytest.raises(ConfigError, match="is not models:/<name>@<alias>"):
        parse_model_uri("runs:/abc/model")


@pytest.fixture
def receiver() -> Iterator[tuple[WebhookReceiver, threading.Event]]:
    nudged = threading.Event()
    server = WebhookReceiver("127.0.0.1", 0, SECRET, "quotewatch", FakeClock(NOW * 10**9), nudged.set).start()
    try:
        yield server, nudged
    finally:
        server.stop()


def post(url: str, body: bytes, request_headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, data=body, headers=request_headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_receiver_nudges_on_an_authentic_alias_event(receiver: tuple[WebhookReceiver, threading.Event]) -> None:
    server, nudged = receiver
    url = server.url("127.0.0.1")
    assert url.endswith(PATH)
    assert post(url, BODY, headers()) == (200, {"nudged": True})
    assert nudged.is_set()
    assert server.accepted == 1


def test_receiver_rejects_forgeries_and_ignores_other_events(receiver: tuple[WebhookReceiver, threading.Event]) -> None:
    server, nudged = receiver
    url = server.url("127.0.0.1")
    status, body = post(url, BODY, headers(secret="guess"))
    assert status == 401
    assert "bad signature" in str(body["error"])
    other = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "quotewatch"}}).encode()
    assert post(url, other, headers(body=other)) == (200, {"nudged": False})
    assert not nudged.is_set()
    assert (server.accepted, server.rejected) == (1, 1)
    # A huge Content-Length is refused from the headers, before any body is read.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        connection.putrequest("POST", PATH)
        connection.putheader("Content-Length", str(2 * 1024 * 1024))
        connection.endheaders()
        assert connection.getresponse().status == 413
    finally:
        connection.close()

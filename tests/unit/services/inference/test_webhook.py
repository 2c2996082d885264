"""Registry webhooks: MLflow's own signature scheme, and the receiver over real HTTP on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from mlflow.webhooks.delivery import _generate_hmac_signature

from quotewatch.core.clock import FakeClock
from quotewatch.core.errors import ConfigError
from quotewatch.domain.ml.registry import parse_model_uri
from quotewatch.domain.ml.webhooks import WebhookRejectedError, is_alias_change, verify_webhook, webhook_signature
from quotewatch.services.inference.webhook import PATH, READ_TIMEOUT_SECONDS, WebhookReceiver, content_length

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
        (headers(body=b"[1]"), b"[1]", "a JSON list, not an object"),
        (headers(body=b"[" * 5000), b"[" * 5000, "nested deeper than"),
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


# -- hostile clients ----------------------------------------------------------------------------------


def raw_request(port: int, head: bytes, timeout: float = 5.0) -> bytes:
    """Send ``head`` on a fresh socket and return what the server answers before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(head)
        chunks = []
        while True:
            try:
                chunk = connection.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    ("length", "status"),
    [(b"-1", b"400"), (b"+5", b"400"), (b"abc", b"400"), (b"99999999999999999999999", b"400")],
)
def test_a_content_length_that_is_not_a_length_is_refused_at_once(
    receiver: tuple[WebhookReceiver, threading.Event], length: bytes, status: bytes
) -> None:
    server, nudged = receiver
    # Before: Content-Length: -1 made rfile.read(-1) wait for the end of the stream, forever.
    started = time.monotonic()
    answer = raw_request(
        server.port, b"POST /mlflow-webhook HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.0 " + status) or answer.startswith(b"HTTP/1.1 " + status), answer[:80]
    assert time.monotonic() - started < 4, "answered without waiting for a body"
    assert not nudged.is_set()
    # The receiver still serves authentic requests.
    assert post(server.url("127.0.0.1"), BODY, headers()) == (200, {"nudged": True})


def test_no_content_length_is_411(receiver: tuple[WebhookReceiver, threading.Event]) -> None:
    server, _ = receiver
    answer = raw_request(server.port, b"POST /mlflow-webhook HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.split(b"\r\n", 1)[0].endswith(b"411 Length Required")


def test_a_client_that_stops_sending_is_dropped_after_the_read_timeout(
    receiver: tuple[WebhookReceiver, threading.Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = receiver
    with socket.create_connection(("127.0.0.1", server.port), timeout=READ_TIMEOUT_SECONDS + 10) as connection:
        # Announces 100 bytes, sends 3, then nothing: the server gives up after its read timeout.
        connection.sendall(b"POST /mlflow-webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        started = time.monotonic()
        assert connection.recv(1024) == b"", "the server closes the connection"
        waited = time.monotonic() - started
    assert READ_TIMEOUT_SECONDS - 1 < waited < READ_TIMEOUT_SECONDS + 8
    assert post(server.url("127.0.0.1"), BODY, headers()) == (200, {"nudged": True})


def test_content_length_parsing() -> None:
    assert content_length("0") == 0
    assert content_length("1048576") == 1048576
    for bad in (None, "", "-1", "+1", "1.0", " 1", "١", "1" * 20):
        assert content_length(bad) is None, bad


_bodies = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b":", b",", b"1e999", b'"data"']), max_size=3000).map(
        b"".join
    ),
    st.integers(min_value=1, max_value=200_000).map(lambda n: b"[" * n),
)


@hypothesis_settings(max_examples=200)
@given(body=_bodies)
def test_authentic_webhook_bodies_fuzz(body: bytes) -> None:
    """Even a correctly signed body (the secret leaked) is parsed bounded: a dict or a rejection."""
    try:
        payload = verify_webhook(SECRET, headers(body=body), body, NOW)
    except WebhookRejectedError:
        return
    assert isinstance(payload, dict)
    is_alias_change(payload, "quotewatch")

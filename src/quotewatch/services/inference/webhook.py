"""The MLflow registry webhook receiver: an authenticated nudge to check the model aliases now.

MLflow POSTs ``model_version_alias.created`` events here (registered by inference on start, see
:func:`quotewatch.domain.ml.webhooks.ensure_webhook`). A request is accepted only with a valid
HMAC signature (MLFLOW_WEBHOOK_SECRET) and a timestamp within 5 minutes (replay protection);
an accepted alias event of our model wakes the :class:`~quotewatch.services.inference.models.ModelManager`.
The event's version is not trusted or used: the manager resolves the alias itself, so a nudge
can at worst cause one extra registry lookup. Polling keeps working if webhooks never arrive.

Replies: 200 accepted (nudged or ignored), 401 rejected, 400 a Content-Length that is not a length
(negative, signed, not a number), 411 no Content-Length, 413 too large. Every socket read times out
after READ_TIMEOUT_SECONDS and at most MAX_CONNECTIONS connections are served at once, so no client
can hold the receiver's threads.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from quotewatch.core.clock import Clock
from quotewatch.domain.ml.registry import WEBHOOK_MAX_BODY_BYTES
from quotewatch.domain.ml.webhooks import WebhookRejectedError, is_alias_change, verify_webhook

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = WEBHOOK_MAX_BODY_BYTES
PATH = "/mlflow-webhook"
READ_TIMEOUT_SECONDS = 10.0
"""A socket read that waits longer than this ends the connection (a silent or trickling client)."""
MAX_CONNECTIONS = 16
"""Connections served at once; beyond this a new one is closed at once (MLflow sends one event at a time)."""


def content_length(value: str | None) -> int | None:
    """The body length a ``Content-Length`` header announces, or None when it is missing or not one.

    Only plain decimal digits are a length (``int()`` would take ``-1``, ``+5`` or `` 7``: a
    negative length makes ``rfile.read`` wait for the end of the stream, forever).
    """
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 19:
        return None
    return int(value)


class _BoundedThreadingHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that serves at most ``MAX_CONNECTIONS`` connections at once."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            logger.warning("webhook receiver busy: closing a connection", extra={"peer": client_address[0]})
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away mid-reply (reset, broken pipe) is its own business: no traceback on stderr.
        logger.debug("webhook connection from %s ended with an error", client_address[0], exc_info=True)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class WebhookReceiver:
    """HTTP server on a daemon thread; calls ``on_alias_change`` for authentic alias events."""

    def __init__(
        self, host: str, port: int, secret: str, model_name: str, clock: Clock, on_alias_change: Callable[[], None]
    ) -> None:
        self.accepted = 0
        self.rejected = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            # StreamRequestHandler sets this on the socket: every read (request line, headers,
            # body) gives up after it, so a client that stops sending cannot hold a thread.
            timeout = READ_TIMEOUT_SECONDS

            def do_POST(self) -> None:
                header = self.headers.get("Content-Length")
                length = content_length(header)
                if length is None:
                    outer.rejected += 1
                    self.close_connection = True
                    code = 411 if header is None else 400
                    self._reply(code, {"error": f"Content-Length {header!r:.40} is not a length"})
                    return
                if length > MAX_BODY_BYTES:
                    outer.rejected += 1
                    self.close_connection = True
                    self._reply(413, {"error": "body too large"})
                    return
                try:
                    body = self.rfile.read(length)
                except TimeoutError:
                    outer.rejected += 1
                    self.close_connection = True
                    logger.warning("webhook body not received in time", extra={"peer": self.client_address[0]})
                    return
                if len(body) != length:
                    outer.rejected += 1
                    self.close_connection = True
                    return  # the client closed the connection before sending the whole body
                try:
                    payload = verify_webhook(secret, self.headers, body, clock.now_ns() / 1e9)
                except WebhookRejectedError as exc:
                    outer.rejected += 1
                    logger.warning("rejected a webhook request: %s", exc, extra={"peer": self.client_address[0]})
                    self._reply(401, {"error": str(exc)})
                    return
                outer.accepted += 1
                if is_alias_change(payload, model_name):
                    data = payload.get("data") or {}
                    logger.info(
                        "alias %s of %s moved to v%s (webhook): checking now",
                        data.get("alias"),
                        data.get("name"),
                        data.get("version"),
                    )
                    on_alias_change()
                    self._reply(200, {"nudged": True})
                else:
                    self._reply(200, {"nudged": False})

            def _reply(self, code: int, body: dict[str, Any]) -> None:  # not a topic record: JSON reply
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("webhook http %s", format % args)

        self._server = _BoundedThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="mlflow-webhook", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, host: str) -> str:
        return f"http://{host}:{self.port}{PATH}"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

"""The MLflow model registry as QuoteWatch uses it: model URIs, aliases, loading, webhooks.

Shared by the trainer (champion comparison), inference (hot reload) and the backtest. A model
version is loaded from its pinned URI ``models:/<name>/<version>`` (never through the alias,
which may move between the lookup and the download) with its native flavor (scikit-learn or
XGBoost), and scored with :func:`quotewatch.domain.ml.models.positive_probability`, so the same
version gives the same p in every process.

A QuoteWatch model records the feature spec it was trained on in its MLmodel ``metadata``
(``feature_spec_id``, ``feature_names``); the signature's input columns are the same names. Its
calibration, when it has one, is the metadata's ``calibration`` entry (JSON numbers, see
:mod:`quotewatch.domain.ml.calibration`), applied by :meth:`LoadedModel.predict`.

Registry webhooks are signed as mlflow 3.17 signs them (``mlflow/webhooks/delivery.py``):
``X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret, "<delivery id>.<timestamp>.<body>")>``
with ``X-MLflow-Delivery-Id`` and ``X-MLflow-Timestamp`` (Unix seconds) headers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np
from numpy.typing import NDArray

from quotewatch.core.bounded import parse_json_object
from quotewatch.core.errors import ConfigError, QuoteWatchError, RetriableError, UntrustedInputError
from quotewatch.domain.ml.calibration import CalibrationError, Calibrator
from quotewatch.domain.ml.calibration import from_metadata as calibration_from_metadata
from quotewatch.domain.ml.models import positive_probability

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
ALIAS_CREATED_EVENT: Final = "model_version_alias.created"
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
WEBHOOK_MAX_BODY_BYTES: Final = 1024 * 1024
"""A webhook body larger than this is refused (MLflow's alias events are a few hundred bytes)."""
WEBHOOK_MAX_DEPTH: Final = 8
SUPPORTED_FLAVORS = ("xgboost", "sklearn")

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


class RegistryError(QuoteWatchError):
    """The registry answered with an error, or a model version could not be used."""


class RegistryUnavailableError(RetriableError):
    """The tracking server could not be reached (retry later)."""


class ModelLoadError(RegistryError):
    """A model version could not be downloaded or loaded (corrupt artifact, unsupported flavor)."""


@dataclass(frozen=True, slots=True)
class ModelUri:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"

    def pinned(self, version: str) -> str:
        """The URI of one version of this model."""
        return f"models:/{self.name}/{version}"


def parse_model_uri(uri: str) -> ModelUri:
    """Parse a registry model URI.

    Raises:
        ConfigError: not ``models:/<name>@<alias>`` nor ``models:/<name>/<version>``.
    """
    match = _URI.match(uri.strip())
    if match is None:
        raise ConfigError(f"model URI {uri!r} is not models:/<name>@<alias> or models:/<name>/<version>")
    return ModelUri(match["name"], match["alias"], match["version"])


def make_client(tracking_uri: str) -> MlflowClient:
    """An MLflow client for the tracking server and registry at ``tracking_uri``."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _is_missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def resolve_version(client: MlflowClient, uri: ModelUri) -> str | None:
    """The version ``uri`` points at now, or None when the model or the alias does not exist.

    Raises:
        RegistryUnavailableError: the server could not be reached.
        RegistryError: any other registry error.
    """
    from mlflow.exceptions import MlflowException

    if uri.version is not None:
        return uri.version
    assert uri.alias is not None
    try:
        return str(client.get_model_version_by_alias(uri.name, uri.alias).version)
    except MlflowException as exc:
        if _is_missing(exc):
            return None
        if getattr(exc, "error_code", "") in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE"):
            raise RegistryUnavailableError(f"{uri}: {exc.message}") from exc
        raise RegistryError(f"{uri}: {exc.message}") from exc
    except OSError as exc:  # requests' ConnectionError is an OSError
        raise RegistryUnavailableError(f"{uri}: tracking server unreachable: {exc}") from exc


@dataclass(frozen=True)
class LoadedModel:
    """One registered model version, loaded and ready to score."""

    name: str
    version: str
    flavor: str
    model: Any
    feature_spec_id: str | None
    feature_names: tuple[str, ...]
    run_id: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    calibrator: Calibrator | None = None
    """The model's calibration (its metadata's ``calibration`` entry), applied after scoring."""

    def predict(self, features: NDArray[np.float64]) -> NDArray[np.float64]:
        """P(y = 1) per row of ``features`` (see :func:`positive_probability`), calibrated if the model is."""
        p = positive_probability(self.model, features)
        return p if self.calibrator is None else self.calibrator.apply(p)


def load_model_version(tracking_uri: str, name: str, version: str, dst_dir: Path | None = None) -> LoadedModel:
    """Download ``models:/<name>/<version>`` and load it with its native flavor.

    Raises:
        RegistryUnavailableError: the server could not be reached.
        ModelLoadError: the artifacts are missing or corrupt, or the flavor is not supported.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    uri = f"models:/{name}/{version}"
    with tempfile.TemporaryDirectory(prefix="qw-model-", dir=dst_dir) as scratch:
        try:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=scratch, tracking_uri=tracking_uri, registry_uri=tracking_uri
            )
        except MlflowException as exc:
            raise ModelLoadError(f"{uri}: cannot download the model: {exc.message}") from exc
        except OSError as exc:
            raise RegistryUnavailableError(f"{uri}: tracking server unreachable: {exc}") from exc
        try:
            description = Model.load(path)
        except Exception as exc:  # a missing or garbled MLmodel file
            raise ModelLoadError(f"{uri}: no readable MLmodel: {exc}") from exc
        flavor = next((flavor for flavor in SUPPORTED_FLAVORS if flavor in description.flavors), None)
        if flavor is None:
            raise ModelLoadError(
                f"{uri}: flavors {sorted(description.flavors)} include none of {', '.join(SUPPORTED_FLAVORS)}"
            )
        try:
            if flavor == "xgboost":
                import mlflow.xgboost

                model = mlflow.xgboost.load_model(path)
                # Serving scores one vector at a time: OpenMP threads cost more than they give
                # (and spin against the Kafka client's threads on a small box).
                if hasattr(model, "get_booster"):
                    model.set_params(n_jobs=1)
                booster = model.get_booster() if hasattr(model, "get_booster") else model
                booster.set_param({"nthread": 1})
            else:
                import mlflow.sklearn

                model = mlflow.sklearn.load_model(path)
        except Exception as exc:  # corrupt artifacts raise anything, from zip to skops errors
            raise ModelLoadError(f"{uri}: cannot load the {flavor} model: {type(exc).__name__}: {exc}") from exc
    metadata = dict(description.metadata or {})
    try:
        calibrator = calibration_from_metadata(metadata)
    except CalibrationError as exc:
        raise ModelLoadError(f"{uri}: unusable calibration: {exc}") from exc
    names = metadata.get("feature_names")
    if not names and description.signature is not None:
        names = description.signature.inputs.input_names()
    return LoadedModel(
        name=name,
        version=str(version),
        flavor=flavor,
        model=model,
        feature_spec_id=str(metadata["feature_spec_id"]) if metadata.get("feature_spec_id") else None,
        feature_names=tuple(str(n) for n in (names or ())),
        run_id=description.run_id,
        metadata=metadata,
        calibrator=calibrator,
    )


# -- webhooks ---------------------------------------------------------------------------------------


class Headers(Protocol):
    """Request headers: a mapping or ``http.client.HTTPMessage`` (case-insensitive ``get``)."""

    def get(self, name: str, /) -> str | None: ...


class WebhookRejectedError(QuoteWatchError):
    """A webhook request is not authentic, too old, or malformed."""


def webhook_signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for ``body``."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def verify_webhook(
    secret: str, headers: Headers, body: bytes, now_seconds: float, tolerance_seconds: float = 300.0
) -> dict[str, Any]:
    """Check a webhook request's HMAC signature and freshness; return its JSON payload.

    Args:
        headers: the request headers (``http.client.HTTPMessage`` looks names up case-insensitively).
        now_seconds: the current Unix time (injected; the receiver passes its clock).

    Raises:
        WebhookRejectedError: missing headers, a bad signature, a timestamp outside
            ``now ± tolerance`` (a replayed request), or a body that is not a JSON object.
    """
    delivery_id = headers.get(DELIVERY_ID_HEADER)
    timestamp = headers.get(TIMESTAMP_HEADER)
    signature = headers.get(SIGNATURE_HEADER)
    if not delivery_id or not timestamp or not signature:
        raise WebhookRejectedError("missing MLflow webhook headers (delivery id, timestamp, signature)")
    expected = webhook_signature(secret, delivery_id, timestamp, body)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise WebhookRejectedError(f"bad signature for delivery {delivery_id}")
    try:
        sent = int(timestamp)
    except ValueError as exc:
        raise WebhookRejectedError(f"timestamp {timestamp!r} is not Unix seconds") from exc
    if abs(now_seconds - sent) > tolerance_seconds:
        raise WebhookRejectedError(f"delivery {delivery_id} is {now_seconds - sent:.0f}s old (replayed?)")
    try:
        return parse_json_object(
            body, what=f"delivery {delivery_id}: body", max_bytes=WEBHOOK_MAX_BODY_BYTES, max_depth=WEBHOOK_MAX_DEPTH
        )
    except UntrustedInputError as exc:
        raise WebhookRejectedError(str(exc)) from None


def is_alias_change(payload: Mapping[str, Any], model_name: str) -> bool:
    """True for a ``model_version_alias.created`` event of ``model_name``."""
    data = payload.get("data") or {}
    return (
        payload.get("entity") == "model_version_alias"
        and payload.get("action") == "created"
        and isinstance(data, Mapping)
        and data.get("name") == model_name
    )


def ensure_webhook(client: MlflowClient, name: str, url: str, secret: str) -> str:
    """Create (or update, matched by ``name``) a webhook on alias creation; return its id.

    Raises:
        RegistryUnavailableError: the server could not be reached.
        RegistryError: the server refused the webhook (e.g. http URLs not allowed on it).
    """
    from mlflow.exceptions import MlflowException

    try:
        existing = None
        page_token = None
        while existing is None:
            page = client.list_webhooks(max_results=100, page_token=page_token)
            existing = next((webhook for webhook in page if webhook.name == name), None)
            page_token = page.token
            if not page_token:
                break
        if existing is not None:
            webhook = client.update_webhook(
                existing.webhook_id, url=url, events=[ALIAS_CREATED_EVENT], secret=secret, status="ACTIVE"
            )
        else:
            webhook = client.create_webhook(name=name, url=url, events=[ALIAS_CREATED_EVENT], secret=secret)
    except MlflowException as exc:
        raise RegistryError(f"cannot register webhook {name} -> {url}: {exc.message}") from exc
    except OSError as exc:
        raise RegistryUnavailableError(f"cannot register webhook {name}: tracking server unreachable: {exc}") from exc
    return str(webhook.webhook_id)

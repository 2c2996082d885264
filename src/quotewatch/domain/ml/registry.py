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

**Nobody runs code through the registry** (docs/security.md has the trust model). A version is
loaded only when its tags vouch for its artifact -- :data:`DIGEST_TAG`, the SHA-256 the trainer
computed of what it uploaded, and with MODEL_SIGNING_KEY set :data:`SIGNATURE_TAG`, an HMAC of
that digest -- and the downloaded files have that digest. The files are then read by
:func:`load_model_dir` from formats that are data, not code (XGBoost JSON/UBJ; skops with a type
list fixed here), never through MLflow's loaders; pickle is refused, and
MLFLOW_ALLOW_PICKLE_DESERIALIZATION is forced to false (:func:`forbid_pickle`).

Registry webhooks are signed as mlflow 3.17 signs them (``mlflow/webhooks/delivery.py``):
``X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret, "<delivery id>.<timestamp>.<body>")>``
with ``X-MLflow-Delivery-Id`` and ``X-MLflow-Timestamp`` (Unix seconds) headers.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from numpy.typing import NDArray

from quotewatch.core.bounded import parse_json
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
    """An MLflow client for the tracking server and registry at ``tracking_uri`` (pickle forbidden first)."""
    forbid_pickle()
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
    metadata: Mapping[str, Any] = field(default_factory=dict)  # not a topic record: MLflow model metadata
    calibrator: Calibrator | None = None
    """The model's calibration (its metadata's ``calibration`` entry), applied after scoring."""
    digest: str | None = None
    """The SHA-256 of the artifact that was loaded (:func:`artifact_digest`)."""

    def predict(self, features: NDArray[np.float64]) -> NDArray[np.float64]:
        """P(y = 1) per row of ``features`` (see :func:`positive_probability`), calibrated if the model is."""
        p = positive_probability(self.model, features)
        return p if self.calibrator is None else self.calibrator.apply(p)


# -- what a model artifact may be ----------------------------------------------------------------------

DIGEST_TAG: Final = "quotewatch.model_sha256"
"""Model version tag: :func:`artifact_digest` of the version's artifact, recorded by the trainer."""
SIGNATURE_TAG: Final = "quotewatch.model_hmac_sha256"
"""Model version tag: :func:`model_signature` of the digest with MODEL_SIGNING_KEY (when the trainer has one)."""
PICKLE_ENV: Final = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"

SKOPS_TRUSTED_TYPES: Final = (
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.linear_model._logistic.LogisticRegression",
    "numpy.ndarray",
    "numpy.float64",
    "numpy.int64",
    "numpy.int32",
    "builtins.dict",
    "builtins.list",
    "builtins.tuple",
    "builtins.str",
    "builtins.int",
    "builtins.float",
    "builtins.bool",
    "builtins.NoneType",
)
"""Every type a scikit-learn model file (skops) may contain: the trainer's LR pipeline and plain data.

Fixed here, never read from the artifact (MLflow would take ``skops_trusted_types`` from the
model's own MLmodel file, which whoever writes the model writes too). A model needing another
type is refused until the type is added here, on purpose.
"""
_SKOPS_NODES: Final = frozenset(
    ("ObjectNode", "DictNode", "ListNode", "TupleNode", "JsonNode", "NdArrayNode", "TypeNode")
)
"""skops node kinds that build data only (no function, method, partial or reduce nodes)."""
XGBOOST_FORMATS: Final = {"ubj": ".ubj", "json": ".json"}
"""XGBoost's own model formats (data, no code), and the file suffix each must have."""
REFUSED_FORMATS: Final = frozenset(("pickle", "cloudpickle"))
MLMODEL_MAX_BYTES: Final = 1024 * 1024
SKOPS_SCHEMA_MAX_BYTES: Final = 16 * 1024 * 1024
MODEL_MAX_BYTES: Final = 512 * 1024 * 1024
"""An artifact larger than this (all files) is refused (the trainer's XGBoost model is a few MB at most)."""
_SIGNED_PREFIX: Final = b"quotewatch-model-v1:"
DOWNLOAD_ONLY_FILES: Final = frozenset(("registered_model_meta",))
"""Files MLflow adds to a downloaded model (the registered name and version), not part of the artifact."""


def forbid_pickle() -> None:
    """Set MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false in this process, whatever it was.

    MLflow 3 allows pickle by default (the variable defaults to true); set to false, its
    scikit-learn loader refuses every format, skops included (``mlflow/sklearn/__init__.py``).
    QuoteWatch never uses MLflow's loaders (:func:`load_model_dir` reads the files itself), so
    this is a second lock: any code path that would reach an MLflow loader (a pyfunc, an
    evaluation artifact) refuses to unpickle. Called whenever this module touches MLflow.
    """
    if os.environ.get(PICKLE_ENV, "").lower() != "false":
        if os.environ.get(PICKLE_ENV):
            logger.warning("overriding %s=%s: QuoteWatch never unpickles models", PICKLE_ENV, os.environ[PICKLE_ENV])
        os.environ[PICKLE_ENV] = "false"


def artifact_digest(model_dir: Path) -> str:
    """The SHA-256 of a model artifact directory: of every file's relative path and SHA-256.

    The manifest hashed is one line ``<relative posix path> NUL <sha256 hex> LF`` per regular file,
    in sorted path order, so adding, removing, renaming or changing any file changes the digest.
    :data:`DOWNLOAD_ONLY_FILES` are left out: MLflow writes them into the download, they are not
    in the store (and nothing reads them).

    Raises:
        ModelLoadError: the directory holds a symbolic link or something that is not a file,
            or more than :data:`MODEL_MAX_BYTES`.
    """
    root = model_dir.resolve()
    manifest = hashlib.sha256()
    total = 0
    for path in sorted(model_dir.rglob("*"), key=lambda p: p.relative_to(model_dir).as_posix()):
        relative = path.relative_to(model_dir).as_posix()
        if relative in DOWNLOAD_ONLY_FILES:
            continue
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ModelLoadError(f"model artifact entry {relative!r} is not a regular file")
        if path.is_dir():
            continue
        if root not in path.resolve().parents:
            raise ModelLoadError(f"model artifact entry {relative!r} is outside the artifact")
        total += path.stat().st_size
        if total > MODEL_MAX_BYTES:
            raise ModelLoadError(f"model artifact is larger than {MODEL_MAX_BYTES} bytes")
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1024 * 1024), b""):
                digest.update(block)
        manifest.update(relative.encode() + b"\0" + digest.hexdigest().encode() + b"\n")
    return manifest.hexdigest()


def model_signature(signing_key: str, digest: str) -> str:
    """HMAC-SHA256 (hex) of an artifact digest with MODEL_SIGNING_KEY."""
    return hmac.new(signing_key.encode(), _SIGNED_PREFIX + digest.encode(), hashlib.sha256).hexdigest()


def version_tags(digest: str, signing_key: str | None) -> dict[str, str]:
    """The tags that vouch for an artifact: its digest, and its signature when there is a key."""
    tags = {DIGEST_TAG: digest}
    if signing_key:
        tags[SIGNATURE_TAG] = model_signature(signing_key, digest)
    return tags


def check_vouched(uri: str, tags: Mapping[str, str], signing_key: str | None) -> str:
    """The digest a model version's tags vouch for; with a key, only when its signature verifies.

    Raises:
        ModelLoadError: no digest tag (not registered by the QuoteWatch trainer), or, with a
            signing key, no signature or one that does not verify.
    """
    digest = tags.get(DIGEST_TAG)
    if not digest or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ModelLoadError(
            f"{uri}: no valid {DIGEST_TAG} tag: not registered by the QuoteWatch trainer, refusing to load it"
        )
    if signing_key:
        signature = tags.get(SIGNATURE_TAG)
        if not signature:
            raise ModelLoadError(f"{uri}: unsigned ({SIGNATURE_TAG} missing) while MODEL_SIGNING_KEY is set")
        if not hmac.compare_digest(signature.encode(), model_signature(signing_key, digest).encode()):
            raise ModelLoadError(f"{uri}: the signature of its digest does not verify with MODEL_SIGNING_KEY")
    return digest


def load_model_version(
    tracking_uri: str, name: str, version: str, *, signing_key: str | None = None, dst_dir: Path | None = None
) -> LoadedModel:
    """Download ``models:/<name>/<version>``, check it is the artifact its tags vouch for, load it.

    Before anything is parsed: the version's :data:`DIGEST_TAG` (and, with ``signing_key``, its
    :data:`SIGNATURE_TAG`) must verify, and the downloaded files must have that digest. Then
    :func:`load_model_dir` reads the model from formats that cannot run code.

    Raises:
        RegistryUnavailableError: the server could not be reached.
        ModelLoadError: unvouched, unsigned (with a key), changed since registration, a format
            that could run code, or missing/corrupt files.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    forbid_pickle()
    uri = f"models:/{name}/{version}"
    client = make_client(tracking_uri)
    try:
        tags = dict(client.get_model_version(name, version).tags or {})
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE"):
            raise RegistryUnavailableError(f"{uri}: {exc.message}") from exc
        raise ModelLoadError(f"{uri}: cannot read the version: {exc.message}") from exc
    except OSError as exc:
        raise RegistryUnavailableError(f"{uri}: tracking server unreachable: {exc}") from exc
    expected = check_vouched(uri, tags, signing_key)
    with tempfile.TemporaryDirectory(prefix="qw-model-", dir=dst_dir) as scratch:
        try:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=scratch, tracking_uri=tracking_uri, registry_uri=tracking_uri
            )
        except MlflowException as exc:
            raise ModelLoadError(f"{uri}: cannot download the model: {exc.message}") from exc
        except OSError as exc:
            raise RegistryUnavailableError(f"{uri}: tracking server unreachable: {exc}") from exc
        actual = artifact_digest(Path(path))
        if not hmac.compare_digest(actual, expected):
            raise ModelLoadError(
                f"{uri}: the artifact's SHA-256 {actual[:16]}... is not the {expected[:16]}... recorded at "
                "registration: it was changed since"
            )
        return load_model_dir(Path(path), name=name, version=str(version), digest=actual)


def load_model_dir(model_dir: Path, *, name: str, version: str, digest: str | None = None) -> LoadedModel:
    """Load a downloaded model artifact from formats that cannot run code.

    Read directly, never through MLflow's loaders (which unpickle, take skops' trusted types from
    the artifact, and import the class named in it): XGBoost's own JSON/UBJ format into a
    ``Booster``; scikit-learn from skops with :data:`SKOPS_TRUSTED_TYPES`. ``pickle`` and
    ``cloudpickle`` are refused. Only the MLmodel keys needed are read (YAML, safe loader).

    Raises:
        ModelLoadError: the MLmodel file, the format or the model file is not acceptable.
    """
    uri = f"models:/{name}/{version}"
    description = _read_mlmodel(model_dir / "MLmodel", uri)
    flavors = description.get("flavors")
    if not isinstance(flavors, dict):
        raise ModelLoadError(f"{uri}: MLmodel has no flavors")
    flavor = next((flavor for flavor in SUPPORTED_FLAVORS if flavor in flavors), None)
    if flavor is None:
        raise ModelLoadError(
            f"{uri}: flavors {sorted(map(str, flavors))[:10]} include none of {', '.join(SUPPORTED_FLAVORS)}"
        )
    conf = flavors[flavor]
    if not isinstance(conf, dict):
        raise ModelLoadError(f"{uri}: the {flavor} flavor has no configuration")
    loader = _load_xgboost if flavor == "xgboost" else _load_skops
    try:
        model = loader(model_dir, conf, uri)
    except ModelLoadError:
        raise
    except Exception as exc:  # corrupt files raise anything, from zip to xgboost errors
        raise ModelLoadError(f"{uri}: cannot load the {flavor} model: {type(exc).__name__}: {exc}") from exc
    metadata = description.get("metadata") or {}
    if not isinstance(metadata, dict):
        metadata = {}
    try:
        calibrator = calibration_from_metadata(metadata)
    except CalibrationError as exc:
        raise ModelLoadError(f"{uri}: unusable calibration: {exc}") from exc
    names = metadata.get("feature_names") or _signature_inputs(description.get("signature"), uri)
    if not isinstance(names, list):
        raise ModelLoadError(f"{uri}: feature_names in the MLmodel metadata is not a list")
    spec = metadata.get("feature_spec_id")
    run_id = description.get("run_id")
    return LoadedModel(
        name=name,
        version=version,
        flavor=flavor,
        model=model,
        feature_spec_id=str(spec) if spec else None,
        feature_names=tuple(str(n) for n in names),
        run_id=str(run_id) if run_id else None,
        metadata=metadata,
        calibrator=calibrator,
        digest=digest,
    )


MLmodelConf = dict[str, Any]  # not a topic record: a parsed MLmodel file (or one flavor's section of it)


def _read_mlmodel(path: Path, uri: str) -> MLmodelConf:
    import yaml

    try:
        if path.is_symlink() or path.stat().st_size > MLMODEL_MAX_BYTES:
            raise ModelLoadError(f"{uri}: MLmodel is a link or larger than {MLMODEL_MAX_BYTES} bytes")
        loaded = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ModelLoadError(f"{uri}: no readable MLmodel: {exc}") from exc
    except (yaml.YAMLError, RecursionError, UnicodeDecodeError) as exc:  # PyYAML composes recursively
        raise ModelLoadError(f"{uri}: MLmodel is not valid YAML: {type(exc).__name__}") from exc
    if not isinstance(loaded, dict):
        raise ModelLoadError(f"{uri}: MLmodel is not a mapping")
    return loaded


def _model_file(model_dir: Path, conf: MLmodelConf, key: str, uri: str) -> Path:
    """The model file the flavor configuration names, which must be a plain file in ``model_dir``."""
    name = conf.get(key)
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ModelLoadError(f"{uri}: {key} {str(name)[:80]!r} is not a file name in the artifact")
    path = model_dir / name
    if path.is_symlink() or not path.is_file():
        raise ModelLoadError(f"{uri}: model file {name!r} is missing")
    return path


def _load_xgboost(model_dir: Path, conf: MLmodelConf, uri: str) -> Any:
    import xgboost

    model_format = conf.get("model_format")
    if model_format not in XGBOOST_FORMATS:
        raise ModelLoadError(
            f"{uri}: XGBoost model_format {str(model_format)[:40]!r} refused: only {', '.join(XGBOOST_FORMATS)} "
            "(XGBoost's own formats; anything else could be a pickle)"
        )
    path = _model_file(model_dir, conf, "data", uri)
    if path.suffix != XGBOOST_FORMATS[model_format]:
        raise ModelLoadError(f"{uri}: an XGBoost {model_format} model must be a {XGBOOST_FORMATS[model_format]} file")
    booster = xgboost.Booster()
    booster.load_model(str(path))
    # Serving scores one vector at a time: OpenMP threads cost more than they give (and spin
    # against the Kafka client's threads on a small box).
    booster.set_param({"nthread": 1})
    return booster


def _load_skops(model_dir: Path, conf: MLmodelConf, uri: str) -> Any:
    import skops.io

    serialization = conf.get("serialization_format")
    if serialization != "skops":
        kind = "a pickle" if serialization in REFUSED_FORMATS or serialization is None else "an unknown format"
        raise ModelLoadError(
            f"{uri}: scikit-learn serialization_format {str(serialization)[:40]!r} refused: it is {kind}, and "
            "loading it could run code; only skops is loaded"
        )
    path = _model_file(model_dir, conf, "pickled_model", uri)
    untrusted = skops_untrusted_types(path)
    if untrusted:
        raise ModelLoadError(
            f"{uri}: the skops file holds types QuoteWatch does not trust: {', '.join(untrusted[:10])}"
        )
    return skops.io.load(path, trusted=list(SKOPS_TRUSTED_TYPES))


def skops_untrusted_types(path: Path) -> list[str]:
    """The types (and node kinds) in a skops file that are not in :data:`SKOPS_TRUSTED_TYPES`.

    Read from the file's ``schema.json`` (bounded JSON) before skops builds anything: skops
    itself also trusts a default list (every scikit-learn estimator among them), wider than ours.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("schema.json")
            if info.file_size > MLMODEL_MAX_BYTES * 16:
                return [f"schema.json of {info.file_size} bytes"]
            schema = parse_json(
                archive.read(info), what="skops schema.json", max_bytes=MLMODEL_MAX_BYTES * 16, max_depth=64
            )
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelLoadError(f"not a skops file: {exc}") from exc
    except UntrustedInputError as exc:
        raise ModelLoadError(str(exc)) from exc
    found: set[str] = set()
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "__loader__" in node or "__class__" in node:
                loader = node.get("__loader__")
                type_name = f"{node.get('__module__')}.{node.get('__class__')}"
                if loader not in _SKOPS_NODES:
                    found.add(f"node {str(loader)[:60]}")
                if type_name not in SKOPS_TRUSTED_TYPES:
                    found.add(type_name[:120])
                if loader == "NdArrayNode" and node.get("type") != "numpy":
                    found.add(f"{type_name[:120]} stored as {str(node.get('type'))[:20]}")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return sorted(found)


def _signature_inputs(signature: Any, uri: str) -> list[str]:
    """The input column names of an MLmodel signature (its ``inputs`` is a JSON text), or []."""
    if not isinstance(signature, dict) or not isinstance(signature.get("inputs"), str):
        return []
    try:
        inputs = parse_json(
            signature["inputs"], what=f"{uri}: signature inputs", max_bytes=MLMODEL_MAX_BYTES, max_depth=4
        )
    except UntrustedInputError as exc:
        raise ModelLoadError(str(exc)) from exc
    if not isinstance(inputs, list):
        return []
    return [str(column["name"]) for column in inputs if isinstance(column, dict) and "name" in column]

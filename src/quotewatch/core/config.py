"""Typed, frozen settings: one object per service, built from environment variables.

Every field's docstring names its environment variable (the field name in upper case) and its
default. Unknown keys are rejected when settings are built from keyword arguments or from the
TOML file named by ``QUOTEWATCH_CONFIG_FILE`` (tables ``[common]`` and ``[<service>]``);
unrelated environment variables are ignored. Secrets are :class:`~pydantic.SecretStr` and print
masked. ``quotewatch config show SERVICE`` prints the effective settings.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from quotewatch.core.errors import ConfigError

CONFIG_FILE_ENV = "QUOTEWATCH_CONFIG_FILE"


class _TomlFileSource(PydanticBaseSettingsSource):
    """Reads ``[common]`` and ``[<service>]`` of the TOML file named by QUOTEWATCH_CONFIG_FILE."""

    def __init__(self, settings_cls: type[BaseSettings], service: str) -> None:
        super().__init__(settings_cls)
        self._service = service

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ is overridden; pydantic-settings never calls this here

    def __call__(self) -> dict[str, Any]:  # not a topic record: settings values
        path = os.environ.get(CONFIG_FILE_ENV)
        if not path:
            return {}
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{CONFIG_FILE_ENV}={path}: cannot read the file: {exc}") from exc
        merged: dict[str, Any] = {}  # not a topic record: settings values
        for table in ("common", self._service):
            section = data.get(table, {})
            if not isinstance(section, dict):
                raise ConfigError(f"{CONFIG_FILE_ENV}={path}: [{table}] must be a table")
            merged.update({key.lower(): value for key, value in section.items()})
        return merged


# -- value checks shared by several settings --------------------------------------------------------

_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*):")
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_\-]{1,63}(?<!-)$")
MIN_SIGNING_KEY_CHARS = 32
"""MODEL_SIGNING_KEY is at least this long (an HMAC-SHA256 key of 32 hex characters is 128 bits)."""
SASL_MECHANISMS = ("GSSAPI", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")
"""What librdkafka's sasl.mechanism accepts."""
MLFLOW_URI_SCHEMES = frozenset(
    {"http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc"}
)
"""Schemes of the tracking URIs MLflow accepts (a database URI may name a driver: postgresql+psycopg2)."""


def _no_whitespace(value: str) -> None:
    if any(character.isspace() for character in value):
        raise ValueError(f"{value!r} contains whitespace (a stray space or quote in an env file?)")


def check_url(value: str, schemes: tuple[str, ...]) -> str:
    """``value`` as a URL with one of ``schemes``, a host and a valid port (if any); else ValueError."""
    _no_whitespace(value)
    parts = urllib.parse.urlsplit(value)
    wanted = " or ".join(f"{scheme}://" for scheme in schemes)
    if value.partition(":")[0] not in schemes or not parts.netloc:  # lower case: the registry client insists
        raise ValueError(f"{value!r} is not a URL starting with {wanted} (e.g. {schemes[0]}://host:port)")
    if not parts.hostname:
        raise ValueError(f"{value!r} names no host")
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise ValueError(f"{value!r} has an invalid port: {exc}") from exc
    return value


def check_host(value: str) -> str:
    """``value`` as a bind address: an IP address or a host name, nothing around it; else ValueError."""
    _no_whitespace(value)
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not value or len(value) > 253 or not all(_HOST_LABEL.match(label) for label in value.split(".")):
        raise ValueError(f"{value!r} is neither an IP address nor a host name")
    return value


def is_loopback(host: str) -> bool:
    """True when the bind address ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_mlflow_tracking_uri(value: str) -> str:
    """A tracking URI MLflow accepts: http(s)://host[:port], file:, sqlite:, a database URI,
    databricks[://profile], or a plain local path; else ValueError.
    """
    _no_whitespace(value)
    if not value:
        raise ValueError("is empty")
    match = _SCHEME.match(value)
    if match is None or len(match["scheme"]) == 1:  # no scheme (or a drive letter): a local path
        return value
    scheme = match["scheme"].lower()
    if scheme in ("http", "https"):
        return check_url(value, ("http", "https"))
    if scheme.split("+", 1)[0] not in MLFLOW_URI_SCHEMES:
        hint = f" (did you mean http://{value}?)" if re.match(r"^[^/:]+:\d+", value) else ""
        raise ValueError(
            f"{value!r}: MLflow does not know the scheme {scheme!r}{hint}; use http(s)://host:port, file:/path, "
            "sqlite:///path, a database URI (postgresql://, mysql://, mssql://), databricks, or a local path"
        )
    return value


class CommonSettings(BaseSettings):
    """Settings every QuoteWatch process shares."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        case_sensitive=False,
        env_ignore_empty=True,
        use_attribute_docstrings=True,
    )
    service_name: ClassVar[str] = "common"

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    """KAFKA_BOOTSTRAP_SERVERS (default 127.0.0.1:9092): the Kafka-compatible brokers."""
    topic_prefix: str = Field(default="qw", pattern=r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
    """TOPIC_PREFIX (default qw): namespace of every topic, so a replay or a test can use its own."""
    symbols: Annotated[tuple[str, ...], NoDecode] = ("BTC-USD",)
    """SYMBOLS (default BTC-USD): comma-separated product ids."""
    instance_id: str = Field(default="0", pattern=r"^[A-Za-z0-9_\-]+$")
    """INSTANCE_ID (default 0): tells replicas of a service apart; part of its transactional id."""
    exchange: str = "coinbase"
    """EXCHANGE (default coinbase): exchange name stamped on every record."""
    tick_ms: int = Field(default=100, gt=0)
    """TICK_MS (default 100): the event-time grid step of features and labels, in ms."""
    delta_ms: int = Field(default=500, gt=0)
    """DELTA_MS (default 500): the label horizon, a multiple of TICK_MS."""
    model_uri: str = "models:/quotewatch@champion"
    """MODEL_URI (default models:/quotewatch@champion): the model inference serves."""
    mlflow_tracking_uri: str | None = None
    """MLFLOW_TRACKING_URI (default unset): the MLflow tracking and registry server, http(s)://host:port, or any
    tracking URI MLflow takes (file:, sqlite:, a database URI, databricks, a local path).
    """
    model_signing_key: SecretStr | None = None
    """MODEL_SIGNING_KEY (default unset): HMAC-SHA256 key of registered models, 32 characters or more. The trainer
    signs the digest of each model it registers; inference and the backtest then load only versions whose signature
    verifies. Unset: digests are checked, signatures are not (docs/security.md).
    """
    lake_uri: str = "data/lake"
    """LAKE_URI (default data/lake): root of the Parquet lake, a local path or s3://bucket/prefix."""
    schema_registry_url: str | None = None
    """SCHEMA_REGISTRY_URL (default unset): http(s)://host:port of the schema registry (several comma-separated); when
    set, records use the Confluent wire format and schemas are registered under <topic>-value.
    """
    schema_registry_basic_auth_user_info: SecretStr | None = None
    """SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO (default unset): user:password for the schema registry."""
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """KAFKA_SECURITY_PROTOCOL (default PLAINTEXT): librdkafka security.protocol."""
    kafka_sasl_mechanism: str | None = None
    """KAFKA_SASL_MECHANISM (default unset): librdkafka sasl.mechanism: GSSAPI, PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or
    OAUTHBEARER.
    """
    kafka_sasl_username: str | None = None
    """KAFKA_SASL_USERNAME (default unset): librdkafka sasl.username."""
    kafka_sasl_password: SecretStr | None = None
    """KAFKA_SASL_PASSWORD (default unset): librdkafka sasl.password."""
    kafka_ssl_ca_location: str | None = None
    """KAFKA_SSL_CA_LOCATION (default unset): librdkafka ssl.ca.location."""
    kafka_ssl_certificate_location: str | None = None
    """KAFKA_SSL_CERTIFICATE_LOCATION (default unset): librdkafka ssl.certificate.location."""
    kafka_ssl_key_location: str | None = None
    """KAFKA_SSL_KEY_LOCATION (default unset): librdkafka ssl.key.location."""
    kafka_ssl_key_password: SecretStr | None = None
    """KAFKA_SSL_KEY_PASSWORD (default unset): librdkafka ssl.key.password."""
    kafka_debug: str | None = Field(default=None, pattern=r"^[a-z]+(,[a-z]+)*$")
    """KAFKA_DEBUG (default unset): librdkafka debug contexts, e.g. cgrp,consumer, logged to stderr by every client."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """LOG_LEVEL (default INFO)."""
    log_format: Literal["text", "json"] = "text"
    """LOG_FORMAT (default text): text for people, json for log shippers."""
    metrics_host: str = "127.0.0.1"
    """METRICS_HOST (default 127.0.0.1): bind address of the /metrics and /health endpoint."""
    metrics_port: int = Field(default=0, ge=0, le=65535)
    """METRICS_PORT (default per service; 0 disables): port of the /metrics and /health endpoint."""
    health_stall_seconds: float = Field(default=30.0, gt=0)
    """HEALTH_STALL_SECONDS (default 30): /health turns unhealthy when processing has not advanced for this long while
    input is waiting.
    """
    stuck_exit_seconds: float = Field(default=120.0, ge=0)
    """STUCK_EXIT_SECONDS (default 120; 0 disables): a service whose processing loop has not turned for this long exits
    with status 70 so its supervisor restarts it (a hang a restart cures, e.g. in a transaction after a broker restart).
    """

    @field_validator("symbols", mode="before")
    @classmethod
    def _split_symbols(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        if isinstance(value, list | tuple):
            symbols = tuple(str(part).strip().upper() for part in value if str(part).strip())
            if not symbols:
                raise ValueError("SYMBOLS must name at least one product")
            return symbols
        return value

    @field_validator("schema_registry_url")
    @classmethod
    def _check_schema_registry_url(cls, value: str | None) -> str | None:
        # What the registry client accepts: comma-separated base URLs (mock:// is its in-memory test double).
        if value is not None:
            for url in value.split(","):
                url = url.strip()
                if not url.lower().startswith("mock://"):
                    check_url(url, ("http", "https"))
        return value

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _check_mlflow_tracking_uri(cls, value: str | None) -> str | None:
        return check_mlflow_tracking_uri(value) if value is not None else None

    @field_validator("kafka_sasl_mechanism")
    @classmethod
    def _check_sasl_mechanism(cls, value: str | None) -> str | None:
        if value is None:
            return None
        mechanism = value.upper()  # librdkafka compares case-sensitively, in upper case
        if mechanism not in SASL_MECHANISMS:
            raise ValueError(f"{value!r} is not one of {', '.join(SASL_MECHANISMS)}")
        return mechanism

    @field_validator("metrics_host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        return check_host(value)

    @field_validator("model_signing_key")
    @classmethod
    def _check_signing_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SIGNING_KEY_CHARS:
            raise ValueError(
                f"is shorter than {MIN_SIGNING_KEY_CHARS} characters (e.g. `python -c 'import secrets; "
                "print(secrets.token_hex(32))'`)"
            )
        return value

    @property
    def signing_key(self) -> str | None:
        """MODEL_SIGNING_KEY in clear, for the model registry code (never logged or printed)."""
        return self.model_signing_key.get_secret_value() if self.model_signing_key is not None else None

    @model_validator(mode="after")
    def _delta_is_a_multiple_of_tick(self) -> CommonSettings:
        if self.delta_ms % self.tick_ms != 0:
            raise ValueError(
                f"DELTA_MS={self.delta_ms} is not a multiple of TICK_MS={self.tick_ms}: "
                "labels compare two grid ticks, so the horizon must fall on the grid"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: keyword arguments > environment > QUOTEWATCH_CONFIG_FILE.
        return (init_settings, env_settings, _TomlFileSource(settings_cls, cls.service_name))

    def masked(self) -> dict[str, Any]:  # not a topic record: settings values
        """The effective settings as plain JSON-able values, secrets masked."""
        return self.model_dump(mode="json")


class IngestSettings(CommonSettings):
    """``quotewatch run ingest``: Coinbase WebSocket -> qw.md.raw + qw.md.events."""

    service_name: ClassVar[str] = "ingest"
    metrics_port: int = Field(default=9101, ge=0, le=65535)
    """METRICS_PORT (default 9101 for ingest)."""
    feed: Literal["coinbase-advanced", "coinbase-exchange"] = "coinbase-advanced"
    """FEED (default coinbase-advanced): which Coinbase protocol to speak."""
    coinbase_ws_url: str | None = None
    """COINBASE_WS_URL (default: the feed's public endpoint): WebSocket URL to connect to."""
    coinbase_api_key: SecretStr | None = None
    """COINBASE_API_KEY (default unset): Exchange API key; with secret and passphrase, subscribes to the authenticated
    level2 channel.
    """
    coinbase_api_secret: SecretStr | None = None
    """COINBASE_API_SECRET (default unset): base64 Exchange API secret."""
    coinbase_api_passphrase: SecretStr | None = None
    """COINBASE_API_PASSPHRASE (default unset): Exchange API passphrase."""
    coinbase_cdp_key_name: SecretStr | None = None
    """COINBASE_CDP_KEY_NAME (default unset): Advanced Trade CDP API key name (organizations/{org}/apiKeys/{id});
    with COINBASE_CDP_PRIVATE_KEY, every subscribe carries a fresh ES256 JWT (Coinbase recommends it).
    """
    coinbase_cdp_private_key: SecretStr | None = None
    """COINBASE_CDP_PRIVATE_KEY (default unset): the CDP API key's EC private key, PEM (newlines or \\n escapes)."""
    ingest_source: Literal["websocket", "topic"] = "websocket"
    """INGEST_SOURCE (default websocket): websocket reads the feed; topic re-normalises <prefix>.md.raw (replays)."""
    ws_max_frame_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    """WS_MAX_FRAME_BYTES (default 64 MiB): largest frame accepted (a BTC-USD snapshot is several MB)."""
    ingest_queue_max: int = Field(default=50_000, gt=0)
    """INGEST_QUEUE_MAX (default 50000): frames buffered between the socket reader and the broker writer; when full the
    ingest records a gap and resyncs.
    """
    ingest_queue_max_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    """INGEST_QUEUE_MAX_BYTES (default 256 MiB): characters of frame text buffered between the reader and the writer
    (a frame larger than this still fits in an empty queue); when full, as when INGEST_QUEUE_MAX is reached, the
    ingest stops keeping frames, closes the connection, logs an OVERFLOW record naming the frames not kept (a gap
    downstream) and resyncs.
    """
    heartbeat_timeout_seconds: float = Field(default=5.0, gt=0)
    """HEARTBEAT_TIMEOUT_SECONDS (default 5): silence longer than this is a dead connection."""
    subscribe_timeout_seconds: float = Field(default=5.0, gt=0)
    """SUBSCRIBE_TIMEOUT_SECONDS (default 5): the connect handshake, and any silence before the subscription is
    confirmed (every byte received resets it: Coinbase confirms level2 after its multi-MB snapshots).
    """
    subscribe_max_seconds: float = Field(default=120.0, gt=0)
    """SUBSCRIBE_MAX_SECONDS (default 120): hard cap on the time from connect to a confirmed subscription."""
    products_per_connection: int = Field(default=10, gt=0)
    """PRODUCTS_PER_CONNECTION (default 10): SYMBOLS are spread over connections of at most this many products
    (Coinbase's advice), each with its own state machine, sequence check and gaps.
    """
    reconnect_jitter_seconds: float = Field(default=1.0, ge=0)
    """RECONNECT_JITTER_SECONDS (default 1): a lost subscribed connection reconnects after a delay uniform in
    [0, this] (no thundering herd when the exchange restarts).
    """
    backoff_initial_seconds: float = Field(default=0.5, gt=0)
    """BACKOFF_INITIAL_SECONDS (default 0.5): first reconnect delay cap (full jitter)."""
    backoff_max_seconds: float = Field(default=30.0, gt=0)
    """BACKOFF_MAX_SECONDS (default 30): largest reconnect delay cap."""
    backoff_reset_seconds: float = Field(default=60.0, gt=0)
    """BACKOFF_RESET_SECONDS (default 60): a connection stable this long resets the backoff."""
    clock_events: bool = True
    """CLOCK_EVENTS (default true): write a clock event every TICK_MS of wall time so tick grids advance in quiet
    markets.
    """

    @field_validator("coinbase_ws_url")
    @classmethod
    def _check_ws_url(cls, value: str | None) -> str | None:
        return check_url(value, ("wss", "ws")) if value is not None else None

    @model_validator(mode="after")
    def _subscribe_timeout_is_at_most_the_cap(self) -> IngestSettings:
        if self.subscribe_timeout_seconds > self.subscribe_max_seconds:
            raise ValueError(
                f"SUBSCRIBE_TIMEOUT_SECONDS={self.subscribe_timeout_seconds} is above "
                f"SUBSCRIBE_MAX_SECONDS={self.subscribe_max_seconds}: the silence allowed before a confirmation cannot "
                "exceed the cap on the whole wait"
            )
        return self

    @model_validator(mode="after")
    def _backoff_initial_is_at_most_max(self) -> IngestSettings:
        if self.backoff_initial_seconds > self.backoff_max_seconds:
            raise ValueError(
                f"BACKOFF_INITIAL_SECONDS={self.backoff_initial_seconds} is above "
                f"BACKOFF_MAX_SECONDS={self.backoff_max_seconds}: the first reconnect delay cap cannot exceed the "
                "largest one"
            )
        return self


class BookSettings(CommonSettings):
    """``quotewatch run book``: qw.md.events -> qw.book.top3 + qw.features (exactly-once)."""

    service_name: ClassVar[str] = "book"
    metrics_port: int = Field(default=9102, ge=0, le=65535)
    """METRICS_PORT (default 9102 for book)."""


class LabelerSettings(CommonSettings):
    """``quotewatch run labeler``: qw.book.top3 -> qw.labels (exactly-once)."""

    service_name: ClassVar[str] = "labeler"
    metrics_port: int = Field(default=9103, ge=0, le=65535)
    """METRICS_PORT (default 9103 for labeler)."""


class InferenceSettings(CommonSettings):
    """``quotewatch run inference``: qw.features (+ qw.labels) -> qw.predictions + qw.snapshot."""

    service_name: ClassVar[str] = "inference"
    metrics_port: int = Field(default=9104, ge=0, le=65535)
    """METRICS_PORT (default 9104 for inference)."""
    challenger_uri: str = "models:/quotewatch@challenger"
    """CHALLENGER_URI (default models:/quotewatch@challenger): scored in shadow when the alias exists."""
    model_poll_seconds: float = Field(default=5.0, gt=0)
    """MODEL_POLL_SECONDS (default 5): how often the model alias is checked."""
    webhook_host: str = "127.0.0.1"
    """WEBHOOK_HOST (default 127.0.0.1): bind address of the MLflow webhook receiver."""
    webhook_port: int = Field(default=0, ge=0, le=65535)
    """WEBHOOK_PORT (default 0 = disabled): port of the MLflow webhook receiver."""
    mlflow_webhook_secret: SecretStr | None = None
    """MLFLOW_WEBHOOK_SECRET (default unset): HMAC secret of the MLflow registry webhook."""
    webhook_url: str | None = None
    """WEBHOOK_URL (default http://WEBHOOK_HOST:<port>/mlflow-webhook): the URL the MLflow server calls; with
    WEBHOOK_PORT set, inference registers it on the server as a webhook on model_version_alias.created.
    """
    live_metrics_window: int = Field(default=1000, gt=0)
    """LIVE_METRICS_WINDOW (default 1000): joined labels per model the rolling live metrics cover."""
    join_buffer_max: int = Field(default=100_000, gt=0)
    """JOIN_BUFFER_MAX (default 100000): predictions (and early labels) waiting for their match; the oldest is
    dropped (and counted) beyond it."""
    snapshot_interval_ms: int = Field(default=0, ge=0)
    """SNAPSHOT_INTERVAL_MS (default 0 = every tick): least event time between two snapshots of a symbol."""
    lift_every_ms: int = Field(default=10_000, gt=0)
    """LIFT_EVERY_MS (default 10000): least label event time between two computations of the champion's live lift
    over the rolling-frequency baseline (a block bootstrap of the live-metrics window)."""
    lift_alarm_ms: int = Field(default=1_800_000, gt=0)
    """LIFT_ALARM_MS (default 1800000 = 30 min): the champion is flagged (dashboard, /metrics) once its live lift has
    stayed below zero for this long in label event time."""
    lift_resamples: int = Field(default=200, gt=0)
    """LIFT_RESAMPLES (default 200): bootstrap resamples of each live lift computation."""

    @field_validator("webhook_host")
    @classmethod
    def _check_webhook_host(cls, value: str) -> str:
        return check_host(value)

    @field_validator("webhook_url")
    @classmethod
    def _check_webhook_url(cls, value: str | None) -> str | None:
        return check_url(value, ("http", "https")) if value is not None else None


class LakeSinkSettings(CommonSettings):
    """``quotewatch run lake-sink``: every topic -> Parquet datasets under LAKE_URI."""

    service_name: ClassVar[str] = "lake_sink"
    metrics_port: int = Field(default=9105, ge=0, le=65535)
    """METRICS_PORT (default 9105 for lake-sink)."""
    lake_flush_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    """LAKE_FLUSH_BYTES (default 64 MiB): flush a partition's buffer to a file at this size."""
    lake_flush_seconds: float = Field(default=60.0, gt=0)
    """LAKE_FLUSH_SECONDS (default 60): flush a partition's buffer at this age."""


class TrainerSettings(CommonSettings):
    """``quotewatch train``: lake -> models in the MLflow registry."""

    service_name: ClassVar[str] = "trainer"
    model_name: str = "quotewatch"
    """MODEL_NAME (default quotewatch): registered model name."""
    experiment_name: str = "quotewatch"
    """EXPERIMENT_NAME (default quotewatch): MLflow experiment of the training runs."""
    test_fraction: float = Field(default=0.25, gt=0, lt=1)
    """TEST_FRACTION (default 0.25): the last fraction of the time range is the test window."""
    split_gap_ms: int | None = Field(default=None, gt=0)
    """SPLIT_GAP_MS (default DELTA_MS, never less): time between the training and the test window."""
    baseline_window_ms: int = Field(default=10_000, gt=0)
    """BASELINE_WINDOW_MS (default 10000): window of the rolling change frequency baseline."""
    min_train_rows: int = Field(default=200, gt=0)
    """MIN_TRAIN_ROWS (default 200): refuse to train on fewer labelled vectors."""
    min_test_rows: int = Field(default=50, gt=0)
    """MIN_TEST_ROWS (default 50): refuse to judge on fewer test rows."""
    lr_c: float = Field(default=1.0, gt=0)
    """LR_C (default 1.0): inverse L2 regularisation strength of the logistic regression."""
    xgb_max_depth: int = Field(default=4, gt=0)
    """XGB_MAX_DEPTH (default 4): depth of the XGBoost trees."""
    xgb_n_estimators: int = Field(default=200, gt=0)
    """XGB_N_ESTIMATORS (default 200): XGBoost boosting rounds."""
    xgb_learning_rate: float = Field(default=0.1, gt=0)
    """XGB_LEARNING_RATE (default 0.1): XGBoost shrinkage."""
    xgb_threads: int = Field(default=2, gt=0)
    """XGB_THREADS (default 2): XGBoost training threads."""
    gate_min_auc: float = Field(default=0.5, ge=0, le=1)
    """GATE_MIN_AUC (default 0.5): a candidate's test AUC must reach this to be promoted."""
    gate_min_auc_lift: float = 0.0
    """GATE_MIN_AUC_LIFT (default 0): …and exceed the best naive baseline's test AUC by this."""
    gate_max_brier_ratio: float = Field(default=1.0, gt=0)
    """GATE_MAX_BRIER_RATIO (default 1): …and its test Brier must be below this x the base-rate baseline's."""
    gate_metric: Literal["auc", "brier", "log_loss"] = "auc"
    """GATE_METRIC (default auc): the metric that picks the candidate and on which it must beat the champion."""


class ReplaySettings(CommonSettings):
    """``quotewatch replay``: a past window of TOPIC_PREFIX (or the lake, a capture) -> a fresh namespace."""

    service_name: ClassVar[str] = "replay"


class BacktestSettings(CommonSettings):
    """``quotewatch backtest``: book -> features -> labels -> predictions in-process over a past window."""

    service_name: ClassVar[str] = "backtest"
    backtest_experiment: str = "quotewatch-backtest"
    """BACKTEST_EXPERIMENT (default quotewatch-backtest): MLflow experiment of the evaluation runs."""
    backtest_output_dir: str = "backtest-output"
    """BACKTEST_OUTPUT_DIR (default backtest-output): where the plots, metrics.json and table.md go."""
    baseline_window_ms: int = Field(default=10_000, gt=0)
    """BASELINE_WINDOW_MS (default 10000): window of the rolling change frequency baseline."""


class DashboardSettings(CommonSettings):
    """``quotewatch run dashboard``: qw.snapshot -> a Dash app."""

    service_name: ClassVar[str] = "dashboard"
    dash_host: str = "127.0.0.1"
    """DASH_HOST (default 127.0.0.1): bind address of the dashboard."""
    dash_port: int = Field(default=8050, ge=0, le=65535)
    """DASH_PORT (default 8050)."""
    dash_poll_ms: int = Field(default=300, gt=0)
    """DASH_POLL_MS (default 300): browser polling interval."""
    dash_stale_ms: int = Field(default=2000, gt=0)
    """DASH_STALE_MS (default 2000): show the stale indicator when no snapshot arrived for this long."""
    dash_history_seconds: float = Field(default=300.0, gt=0)
    """DASH_HISTORY_SECONDS (default 300): event-time window of the p_change and mid sparklines."""
    dash_threads: int = Field(default=8, gt=0)
    """DASH_THREADS (default 8): request threads of the production WSGI server (waitress)."""
    dash_debug: bool = False
    """DASH_DEBUG (default false): Dash's development server with the reloader and dev tools instead of waitress;
    refused unless DASH_HOST is a loopback address (the debugger runs code for whoever reaches it).
    """
    dash_push: bool = False
    """DASH_PUSH (default false): push KPI updates through Dash's WebSocket callbacks (FastAPI backend, uvicorn)
    instead of polling every DASH_POLL_MS.
    """

    @field_validator("dash_host")
    @classmethod
    def _check_dash_host(cls, value: str) -> str:
        return check_host(value)

    @model_validator(mode="after")
    def _debug_only_on_loopback(self) -> DashboardSettings:
        if self.dash_debug and not is_loopback(self.dash_host):
            raise ValueError(
                f"DASH_DEBUG=true with DASH_HOST={self.dash_host}: the development server's debugger runs code "
                "for whoever reaches it, so it only listens on a loopback address (127.0.0.1, ::1, localhost)"
            )
        return self


SERVICE_SETTINGS: dict[str, type[CommonSettings]] = {
    cls.service_name: cls
    for cls in (
        CommonSettings,
        IngestSettings,
        BookSettings,
        LabelerSettings,
        InferenceSettings,
        LakeSinkSettings,
        TrainerSettings,
        ReplaySettings,
        BacktestSettings,
        DashboardSettings,
    )
}


S = TypeVar("S", bound=CommonSettings)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build ``cls`` from the environment (and overrides); raise :class:`ConfigError` on a bad value.

    The error message names each offending setting by its environment variable.
    """
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]).upper() or cls.__name__
            problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
        raise ConfigError(f"invalid {cls.service_name} settings: " + "; ".join(problems)) from exc

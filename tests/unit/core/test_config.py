from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from quotewatch.core.config import (
    SERVICE_SETTINGS,
    CommonSettings,
    DashboardSettings,
    InferenceSettings,
    IngestSettings,
    load_settings,
)
from quotewatch.core.errors import ConfigError


def test_defaults_match_the_documented_names(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "TOPIC_PREFIX", "SYMBOLS", "TICK_MS", "DELTA_MS", "MODEL_URI"):
        monkeypatch.delenv(name, raising=False)
    settings = CommonSettings()
    assert settings.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert settings.topic_prefix == "qw"
    assert settings.symbols == ("BTC-USD",)
    assert (settings.tick_ms, settings.delta_ms) == (100, 500)
    assert settings.model_uri == "models:/quotewatch@champion"


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYMBOLS", "btc-usd, ETH-USD,")
    monkeypatch.setenv("TOPIC_PREFIX", "replay1")
    monkeypatch.setenv("TICK_MS", "50")
    monkeypatch.setenv("DELTA_MS", "250")
    settings = CommonSettings()
    assert settings.symbols == ("BTC-USD", "ETH-USD")
    assert settings.topic_prefix == "replay1"
    assert (settings.tick_ms, settings.delta_ms) == (50, 250)


def test_settings_are_frozen() -> None:
    settings = CommonSettings()
    with pytest.raises(ValueError, match="frozen"):
        settings.tick_ms = 5  # type: ignore[misc]


def test_unknown_keyword_is_rejected() -> None:
    with pytest.raises(ConfigError, match="TICKMS"):
        load_settings(CommonSettings, tickms=100)


def test_delta_must_be_a_multiple_of_tick() -> None:
    with pytest.raises(ConfigError, match="DELTA_MS=250 is not a multiple of TICK_MS=100"):
        load_settings(CommonSettings, delta_ms=250)


def test_unknown_key_in_config_file_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "quotewatch.toml"
    path.write_text('[common]\ntopic_prefix = "fromfile"\n[ingest]\nfeed = "coinbase-exchange"\nfeeed = "x"\n')
    monkeypatch.setenv("QUOTEWATCH_CONFIG_FILE", str(path))
    with pytest.raises(ConfigError, match="FEEED"):
        load_settings(IngestSettings)


def test_config_file_is_read_and_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "quotewatch.toml"
    path.write_text('[common]\ntopic_prefix = "fromfile"\nsymbols = "ETH-USD"\n[ingest]\nfeed = "coinbase-exchange"\n')
    monkeypatch.setenv("QUOTEWATCH_CONFIG_FILE", str(path))
    monkeypatch.setenv("TOPIC_PREFIX", "fromenv")
    settings = load_settings(IngestSettings)
    assert settings.topic_prefix == "fromenv"
    assert settings.feed == "coinbase-exchange"
    assert settings.symbols == ("ETH-USD",)


def test_secrets_are_masked_when_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("MLFLOW_WEBHOOK_SECRET", "s3cret")
    settings = load_settings(InferenceSettings)
    assert "hunter2" not in repr(settings)
    assert "s3cret" not in str(settings.masked())
    assert settings.kafka_sasl_password is not None
    assert settings.kafka_sasl_password.get_secret_value() == "hunter2"


def test_every_field_documents_its_environment_variable() -> None:
    for cls in SERVICE_SETTINGS.values():
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no docstring"
            assert field.description.startswith(name.upper()), f"{cls.__name__}.{name}: {field.description!r}"


def test_kafka_debug_reaches_every_client_and_librdkafka_accepts_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from confluent_kafka import Consumer

    from quotewatch.core.kafka import client_config, consumer_config, producer_config

    monkeypatch.delenv("KAFKA_DEBUG", raising=False)
    assert "debug" not in client_config(CommonSettings())
    monkeypatch.setenv("KAFKA_DEBUG", "cgrp,consumer")
    settings = CommonSettings()
    assert consumer_config(settings, "g", "c")["debug"] == "cgrp,consumer"
    assert producer_config(settings, "p")["debug"] == "cgrp,consumer"
    # librdkafka checks the contexts when the client is built (no broker needed for that).
    Consumer(consumer_config(settings, "g", "c")).close()


def test_kafka_debug_must_be_a_list_of_contexts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_DEBUG", "cgrp; rm -rf")
    with pytest.raises(ValueError, match="kafka_debug"):
        CommonSettings()


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        # A registry URL without its scheme used to pass here and crash every service in the client.
        (CommonSettings, {"schema_registry_url": "localhost:8081"}, r"SCHEMA_REGISTRY_URL: .*starting with http://"),
        (CommonSettings, {"schema_registry_url": "http://a:8081,b:8081"}, r"SCHEMA_REGISTRY_URL: .*'b:8081'"),
        (CommonSettings, {"schema_registry_url": "http://registry:80x1"}, r"SCHEMA_REGISTRY_URL: .*invalid port"),
        (CommonSettings, {"mlflow_tracking_uri": "not a url"}, r"MLFLOW_TRACKING_URI: .*whitespace"),
        (CommonSettings, {"mlflow_tracking_uri": "localhost:5000"}, r"did you mean http://localhost:5000"),
        (CommonSettings, {"mlflow_tracking_uri": "ftp://models"}, r"MLFLOW_TRACKING_URI: .*scheme 'ftp'"),
        (CommonSettings, {"mlflow_tracking_uri": "http://"}, r"MLFLOW_TRACKING_URI: .*http://"),
        (CommonSettings, {"kafka_sasl_mechanism": "BOGUS"}, r"KAFKA_SASL_MECHANISM: .*SCRAM-SHA-512"),
        (CommonSettings, {"metrics_host": "127.0.0.1 "}, r"METRICS_HOST: .*whitespace"),
        (
            DashboardSettings,
            {"dash_host": "0.0.0.0 "},
            r"^invalid dashboard settings: DASH_HOST: '0\.0\.0\.0 ' contains whitespace",
        ),
        (DashboardSettings, {"dash_host": "local host"}, r"DASH_HOST: .*whitespace"),
        (DashboardSettings, {"dash_host": "-bad-.example"}, r"DASH_HOST: .*neither an IP address nor a host name"),
        (InferenceSettings, {"webhook_host": "0.0.0.0\t"}, r"WEBHOOK_HOST: .*whitespace"),
        (InferenceSettings, {"webhook_url": "inference:8091/hook"}, r"WEBHOOK_URL: .*http://"),
        (IngestSettings, {"coinbase_ws_url": "ws-feed.exchange.coinbase.com"}, r"COINBASE_WS_URL: .*wss://"),
        (
            IngestSettings,
            {"backoff_initial_seconds": 40, "backoff_max_seconds": 30},
            r"BACKOFF_INITIAL_SECONDS=40.0 is above BACKOFF_MAX_SECONDS=30.0",
        ),
    ],
)
def test_malformed_values_are_one_clear_config_error(
    cls: type[CommonSettings], values: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QUOTEWATCH_CONFIG_FILE", raising=False)
    with pytest.raises(ConfigError, match=message):
        load_settings(cls, **values)


def test_malformed_values_are_rejected_from_the_environment_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASH_HOST", "0.0.0.0 ")
    with pytest.raises(ConfigError, match="DASH_HOST"):
        load_settings(DashboardSettings)
    monkeypatch.delenv("DASH_HOST")
    monkeypatch.setenv("SCHEMA_REGISTRY_URL", "localhost:8081")
    with pytest.raises(ConfigError, match="SCHEMA_REGISTRY_URL"):
        load_settings(DashboardSettings)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"schema_registry_url": "http://redpanda:8081"}, {}),
        ({"schema_registry_url": "https://a.example:8081/sr, http://b:8081"}, {}),
        ({"schema_registry_url": "mock://tests"}, {}),  # confluent-kafka's in-memory registry
        ({"mlflow_tracking_uri": "http://mlflow:5000"}, {}),
        ({"mlflow_tracking_uri": "https://user:pw@mlflow.example/prefix"}, {}),
        ({"mlflow_tracking_uri": "file:///var/mlruns"}, {}),
        ({"mlflow_tracking_uri": "sqlite:///mlflow.db"}, {}),
        ({"mlflow_tracking_uri": "postgresql+psycopg2://mlflow:pw@db:5432/mlflow"}, {}),
        ({"mlflow_tracking_uri": "databricks"}, {}),
        ({"mlflow_tracking_uri": "databricks://profile"}, {}),
        ({"mlflow_tracking_uri": "mlruns"}, {}),
        ({"mlflow_tracking_uri": "/srv/mlruns"}, {}),
        ({"kafka_sasl_mechanism": "scram-sha-512"}, {"kafka_sasl_mechanism": "SCRAM-SHA-512"}),
        ({"kafka_sasl_mechanism": "OAUTHBEARER"}, {}),
        ({"metrics_host": "0.0.0.0"}, {}),
        ({"metrics_host": "::"}, {}),
        ({"metrics_host": "metrics_host.internal"}, {}),
        ({"metrics_host": "localhost"}, {}),
    ],
)
def test_every_documented_form_is_accepted(
    values: dict[str, Any], expected: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QUOTEWATCH_CONFIG_FILE", raising=False)
    settings = load_settings(CommonSettings, **values)
    for name, value in (expected or values).items():
        assert getattr(settings, name) == value


def test_backoff_initial_may_equal_max() -> None:
    settings = load_settings(IngestSettings, backoff_initial_seconds=5, backoff_max_seconds=5)
    assert settings.backoff_initial_seconds == settings.backoff_max_seconds == 5


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "dashboard.example.com"])
def test_dash_debug_is_refused_off_loopback(host: str) -> None:
    # Before: accepted, putting the Werkzeug debugger (code execution) on the network.
    with pytest.raises(ConfigError, match=r"DASH_DEBUG=true with DASH_HOST=.*loopback"):
        load_settings(DashboardSettings, dash_debug=True, dash_host=host)
    assert load_settings(DashboardSettings, dash_host=host).dash_debug is False


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost"])
def test_dash_debug_on_loopback_is_accepted(host: str) -> None:
    assert load_settings(DashboardSettings, dash_debug=True, dash_host=host).dash_debug


def test_the_model_signing_key_is_a_masked_secret_of_some_length(monkeypatch: pytest.MonkeyPatch) -> None:
    key = "0123456789abcdef" * 4
    monkeypatch.setenv("MODEL_SIGNING_KEY", key)
    settings = load_settings(InferenceSettings)
    assert settings.signing_key == key
    assert key not in repr(settings)
    assert key not in str(settings.masked())
    monkeypatch.setenv("MODEL_SIGNING_KEY", "short")
    with pytest.raises(ConfigError, match="MODEL_SIGNING_KEY: is shorter than 32 characters"):
        load_settings(InferenceSettings)
    monkeypatch.setenv("MODEL_SIGNING_KEY", "")
    assert load_settings(InferenceSettings).signing_key is None

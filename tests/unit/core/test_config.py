from __future__ import annotations

from pathlib import Path

import pytest

from quotewatch.core.config import (
    SERVICE_SETTINGS,
    CommonSettings,
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

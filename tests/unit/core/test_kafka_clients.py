"""Kafka clients built from settings librdkafka refuses: one clear ConfigError, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from confluent_kafka import KafkaError, KafkaException

from quotewatch.cli import main
from quotewatch.core.config import CommonSettings
from quotewatch.core.errors import ConfigError, FatalError
from quotewatch.core.kafka import flush_or_fail, make_admin, make_consumer, make_producer


def refused(tmp_path: Path) -> CommonSettings:
    return CommonSettings(
        kafka_bootstrap_servers="127.0.0.1:9",
        kafka_security_protocol="SSL",
        kafka_ssl_ca_location=str(tmp_path / "no-such-ca.pem"),
    )


def test_every_client_factory_turns_a_refused_configuration_into_a_config_error(tmp_path: Path) -> None:
    settings = refused(tmp_path)
    with pytest.raises(ConfigError, match=r"cannot create a Kafka admin client with these settings: .*ssl.ca.location"):
        make_admin(settings)
    with pytest.raises(ConfigError, match="Kafka consumer"):
        make_consumer(settings, "group", "client")
    with pytest.raises(ConfigError, match="Kafka producer"):
        make_producer(settings, "client")


@pytest.mark.parametrize("command", [["topics", "list"], ["topics", "create"], ["topics", "tail", "qw.features"]])
def test_topic_commands_print_one_error_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("KAFKA_SSL_CA_LOCATION", str(tmp_path / "no-such-ca.pem"))
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 1, result.output
    assert "error: cannot create a Kafka" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


class _FencedProducer:
    """A transactional producer in librdkafka's fatal state: flush raises."""

    def flush(self, timeout: float) -> int:
        raise KafkaException(
            KafkaError(KafkaError._FENCED, "This instance has been fenced by a newer instance", fatal=True)
        )


def test_flushing_a_fenced_producer_is_a_fatal_error_naming_the_cause() -> None:
    with pytest.raises(FatalError, match=r"producer cannot flush: .*fenced"):
        flush_or_fail(_FencedProducer())  # type: ignore[arg-type]  # a stand-in with flush() only

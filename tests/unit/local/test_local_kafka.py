"""Clear one-line errors of the local broker manager (no broker started here)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from quotewatch.core.errors import BrokerError
from quotewatch.local import kafka as local_kafka
from quotewatch.local.kafka import LocalKafka, port_is_free


def test_missing_java_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_kafka.shutil, "which", lambda name: None)
    with pytest.raises(BrokerError, match="java not found on PATH") as info:
        local_kafka.java_version()
    assert "\n" not in str(info.value)


def test_missing_mvn_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUOTEWATCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(local_kafka.shutil, "which", lambda name: None)
    with pytest.raises(BrokerError, match="mvn not found on PATH"):
        local_kafka.ensure_jars()


def test_port_in_use_is_reported(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not port_is_free(port)
        with pytest.raises(BrokerError, match=f"port {port} is already in use"):
            LocalKafka(tmp_path / "kafka").start(port=port)


def test_status_of_an_unused_data_dir(tmp_path: Path) -> None:
    assert LocalKafka(tmp_path).status() is None
    assert LocalKafka(tmp_path).stop() is False


def test_cluster_ids_never_start_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """kafka-storage parses an id starting with "-" as an option (a CI run failed on one)."""
    import uuid

    dash_first = uuid.UUID(bytes=b"\xf8" + bytes(15))  # base64 "-A..."
    fine = uuid.UUID(bytes=bytes(16))
    draws = iter([dash_first, dash_first, fine])
    monkeypatch.setattr(local_kafka.uuid, "uuid4", lambda: next(draws))
    cluster_id = local_kafka._cluster_id()
    assert cluster_id == "AAAAAAAAAAAAAAAAAAAAAA"
    assert len(cluster_id) == 22

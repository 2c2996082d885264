"""The lake sink writing to ``s3://…`` through pyarrow's S3 filesystem, against a real HTTP S3 endpoint.

The endpoint is moto's server mode (``ThreadedMotoServer``: the S3 REST API over HTTP on a
loopback port, no AWS account). Under docker compose the same code writes to MinIO.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow.fs as pafs
import pytest
from moto.server import ThreadedMotoServer

from quotewatch.core import lake
from quotewatch.core.config import LakeSinkSettings
from quotewatch.core.topics import TopicNames
from quotewatch.local.kafka import free_port
from tests.broker.services.lake_sink.test_lake_sink import running_sink
from tests.helpers import wait_for
from tests.unit.services.lake_sink.factories import (
    assert_lake_holds_exactly,
    capture_records,
    committed_everything,
    produce_records,
)


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``host:port`` of an S3 server holding an empty bucket ``lake``."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "lake-test",
        "AWS_SECRET_ACCESS_KEY": "lake-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"{host}:{port}"
    pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir("lake")
    try:
        yield endpoint
    finally:
        server.stop()


def test_the_sink_writes_and_the_reader_reads_an_s3_lake(
    topics: Any, make_settings: Callable[..., Any], s3_endpoint: str
) -> None:
    uri = f"s3://lake/quotewatch?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    settings: LakeSinkSettings = make_settings(
        LakeSinkSettings, lake_uri=uri, lake_flush_bytes=128 * 1024, lake_flush_seconds=0.3
    )
    names = TopicNames(settings.topic_prefix)
    records = capture_records(300)
    produced = produce_records(settings, {s: records[s] for s in ("md.raw", "features", "labels")})
    topics_written = [names.md_raw, names.features, names.labels]
    with running_sink(settings):
        wait_for(lambda: committed_everything(settings, produced), interval=0.3, message="every record")
    assert_lake_holds_exactly(uri, produced)
    location = lake.lake_location(uri)
    assert location.filesystem.type_name == "s3"
    keys = [
        info.path
        for info in location.filesystem.get_file_info(pafs.FileSelector("lake/quotewatch", recursive=True))
        if info.is_file
    ]
    assert keys
    prefixes = tuple(f"lake/quotewatch/{topic}/" for topic in topics_written)
    assert all(key.startswith(prefixes) for key in keys)
    assert all(key.endswith(".parquet") for key in keys), "no temporary object is ever created on S3"
    infos = {info.topic: info for info in lake.lake_info(uri)}
    assert sorted(infos) == sorted(topics_written)
    assert all(info.healthy for info in infos.values()), lake.format_lake_info(list(infos.values()))
    features = lake.read_dataset(uri, names.features, columns=["symbol", "ts_event", "_offset"])
    assert len(features) == sum(1 for r in produced if r.topic == names.features)

"""``quotewatch run lake-sink`` (the service) and ``quotewatch lake info`` (what the lake holds).

The sink itself is :class:`quotewatch.services.lake_sink.sink.LakeSink`; the layout, the files and the
reading API are :mod:`quotewatch.core.lake`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click

from quotewatch.core.config import LakeSinkSettings, load_settings
from quotewatch.core.lake import format_lake_info, lake_info, lake_location
from quotewatch.core.service import service_context
from quotewatch.services.lake_sink.sink import SERVICE, LakeSink


@click.command("lake-sink")
def command() -> None:
    """Write every data topic of TOPIC_PREFIX to Parquet under LAKE_URI (exactly once per offset).

    Flushes a partition's buffer at LAKE_FLUSH_BYTES or LAKE_FLUSH_SECONDS; SIGTERM flushes,
    commits and exits 0.
    """
    settings = load_settings(LakeSinkSettings)
    with service_context(SERVICE, settings) as context:
        LakeSink.from_context(context).run()


@click.command("info")
@click.option("--lake-uri", default=None, help="The lake root (default: LAKE_URI, else data/lake).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per dataset instead of text.")
def info_command(lake_uri: str | None, as_json: bool) -> None:
    """Print per dataset: rows, files, ts_event range, offset coverage per partition and any holes.

    Exits 1 when a dataset has a hole, an overlap, an incomplete chunk or a foreign file.
    """
    uri = lake_uri or load_settings(LakeSinkSettings).lake_uri
    location = lake_location(uri)
    infos = lake_info(location)
    if as_json:
        for info in infos:
            click.echo(json.dumps({**asdict(info), "healthy": info.healthy}))
    else:
        click.echo(format_lake_info(infos, location.describe()))
    if not all(info.healthy for info in infos):
        sys.exit(1)

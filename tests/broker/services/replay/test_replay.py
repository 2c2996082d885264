"""``quotewatch replay`` on a real broker: the window search, the CONNECTED start, forwarding, pacing, refusals."""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from confluent_kafka import Producer

from quotewatch.core.clock import FakeClock
from quotewatch.core.config import CommonSettings
from quotewatch.core.errors import ConfigError
from quotewatch.core.kafka import ensure_topics, make_admin, producer_config
from quotewatch.core.records import MarketEvent, RawFrame, RawKind
from quotewatch.core.serde import AvroSerde
from quotewatch.core.topics import TopicNames
from quotewatch.domain.simulation.synthetic import SyntheticConfig, synthetic_raw_frames
from quotewatch.domain.venue.coinbase import FEED_ADVANCED
from quotewatch.domain.venue.normaliser import Normaliser, control_text
from quotewatch.services.replay.publisher import replay
from quotewatch.services.replay.sources import ReplayError, SourceSpec, TopicReader, Window, find_raw_start
from tests.helpers import read_topic
from tests.records import plain

SECOND = 1_000_000_000
S1 = 1_786_300_000_000_000_000
S2 = S1 + 20 * SECOND


def control_record(ts: int, connection: str = "", kind: RawKind = "CLOCK") -> RawFrame:
    return RawFrame(
        ts_event=ts,
        ts_init=ts,
        exchange="coinbase",
        feed=FEED_ADVANCED,
        symbols=("BTC-USD", "ETH-USD"),
        connection_id=connection,
        frame_index=-1,
        kind=kind,
        text="tick" if kind == "CLOCK" else control_text("RECONNECTING", "connection closed"),
    )


def connection(seed: int, start: int, seconds: int, connection_id: str) -> list[RawFrame]:
    config = SyntheticConfig(symbols=("BTC-USD", "ETH-USD"), seed=seed, start_ns=start)
    return list(synthetic_raw_frames(FEED_ADVANCED, config, seconds * SECOND, connection_id=connection_id))


TICK = 100_000_000


def raw_log() -> list[RawFrame]:
    """Clock records of no connection, then c1 (5 s), its loss, a failed attempt c2x, then c2 (10 s).

    Between the connections the CLOCK records are those of an ingest before CLOCKs carried the
    last connection that connected: the id of the attempt in progress, ahead of its CONNECTED
    (during the failed attempt and its backoff: c2x; during c2's 300 ms handshake: c2).
    """
    log = [control_record(S1 - 3 * SECOND + i * TICK) for i in range(3)]
    log += connection(1, S1, 5, "c1")
    lost = S1 + 5 * SECOND + 5 * TICK
    log += [control_record(lost, "c1", "DISCONNECTED"), control_record(lost + TICK, "c1")]
    log += [control_record(lost + 20 * TICK, "c2x"), control_record(lost + 21 * TICK, "c2x", "DISCONNECTED")]
    log += [control_record(lost + i * TICK, "c2x") for i in range(22, 50)]  # the backoff
    log += [control_record(S2 - i * TICK, "c2") for i in (3, 2, 1)]  # c2's handshake
    log += connection(2, S2, 10, "c2")
    assert all(a.ts_init < b.ts_init for a, b in itertools.pairwise(log))
    return log


def produce(settings: CommonSettings, topic: str, records: Sequence[RawFrame | MarketEvent]) -> None:
    """``records`` into ``topic`` keyed as the ingest keys them (raw frames by feed, events by symbol)."""
    serde = AvroSerde()
    producer = Producer(producer_config(settings, "replay-test"))
    for record in records:
        key = record.feed if isinstance(record, RawFrame) else record.symbol
        producer.produce(topic, serde.encode(topic, record), key=key.encode())
        producer.poll(0)
    assert producer.flush(60) == 0


@pytest.fixture
def source(make_settings: Callable[..., CommonSettings]) -> tuple[CommonSettings, list[RawFrame]]:
    settings = make_settings()
    ensure_topics(make_admin(settings), settings.topic_prefix)
    log = raw_log()
    produce(settings, TopicNames(settings.topic_prefix).md_raw, log)
    return settings, log


def raw_values(settings: CommonSettings, topic: str) -> list[bytes]:
    return [r["_raw"] for r in sorted(read_topic(settings, topic, decode=False), key=lambda r: r["_offset"])]


def test_a_raw_window_starts_at_the_connected_record_behind_it_and_is_forwarded_byte_for_byte(
    source: tuple[CommonSettings, list[RawFrame]],
) -> None:
    settings, log = source
    a = TopicNames(settings.topic_prefix)
    target = f"{settings.topic_prefix}-w"
    end_ns = S2 + 8 * SECOND
    window = Window(S2 + 5 * SECOND, end_ns)
    summary = replay(settings, SourceSpec("topic", a.prefix), window, target, progress=False)

    first = next(i for i, r in enumerate(log) if r.kind == "CONNECTED" and r.connection_id == "c2")
    end = next(i for i, r in enumerate(log) if r.ts_init >= end_ns)
    assert summary.start is not None
    assert (summary.start.offset, summary.start.connection_id) == (first, "c2")
    assert summary.records == end - first
    source_bytes = raw_values(settings, a.md_raw)
    assert raw_values(settings, TopicNames(target).md_raw) == source_bytes[first:end]

    # Replaying into a namespace that already holds records is refused.
    with pytest.raises(ReplayError, match="already holds records"):
        replay(settings, SourceSpec("topic", a.prefix), window, target, progress=False)
    with pytest.raises(ConfigError, match="source namespace"):
        replay(settings, SourceSpec("topic", a.prefix), window, a.prefix, progress=False)


def test_between_connections_the_window_starts_at_the_previous_one_and_before_any_connection_it_is_refused(
    source: tuple[CommonSettings, list[RawFrame]],
) -> None:
    settings, _ = source
    a = TopicNames(settings.topic_prefix)
    summary = replay(
        settings, SourceSpec("topic", a.prefix), Window(S1 + 10 * SECOND, S1 + 11 * SECOND), f"{a.prefix}-b",
        progress=False,
    )  # fmt: skip
    assert summary.start is not None
    assert summary.start.connection_id == "c1"
    assert summary.start.offset == 3  # after the three clock records of no connection
    with pytest.raises(ReplayError, match="not CONNECTED"):
        replay(settings, SourceSpec("topic", a.prefix), Window(S1 - 2 * SECOND, S1), f"{a.prefix}-c", progress=False)


def test_ticks_stamped_with_a_connection_ahead_of_its_connected_record_do_not_stop_a_window(
    source: tuple[CommonSettings, list[RawFrame]],
) -> None:
    """Logs of an ingest whose CLOCKs carried the connection being attempted: windows inside the
    failed attempt's backoff and inside the handshake start at c1, windows inside c2 at its CONNECTED."""
    settings, log = source
    a = TopicNames(settings.topic_prefix)
    with TopicReader(settings, a.md_raw, AvroSerde()) as reader:
        c2 = next(i for i, r in enumerate(log) if r.kind == "CONNECTED" and r.connection_id == "c2")
        starts = {
            name: find_raw_start(reader, log[index].ts_init)
            for name, index in (("backoff", c2 - 10), ("handshake", c2 - 2), ("c2", c2 + 30))
        }
    assert {name: (start.offset, start.connection_id) for name, start in starts.items()} == {
        "backoff": (3, "c1"),
        "handshake": (3, "c1"),
        "c2": (c2, "c2"),
    }
    window = Window(log[c2 + 30].ts_init, log[c2 + 60].ts_init)
    summary = replay(settings, SourceSpec("topic", a.prefix), window, f"{a.prefix}-h", progress=False)
    assert summary.start is not None
    assert (summary.start.offset, summary.records) == (c2, 60)


def test_an_events_window_starts_at_the_events_of_the_connected_record_in_every_partition(
    source: tuple[CommonSettings, list[RawFrame]], make_settings: Callable[..., CommonSettings]
) -> None:
    settings, log = source
    a = TopicNames(settings.topic_prefix)
    events, _ = Normaliser().process_all(log)
    produce(settings, a.md_events, events)
    target = TopicNames(f"{a.prefix}-e")
    end_ns = S2 + 6 * SECOND
    window = Window(S2 + 2 * SECOND, end_ns)
    summary = replay(settings, SourceSpec("topic", a.prefix), window, target.prefix, what="events", progress=False)

    assert summary.start is not None
    connected = summary.start.ts_init
    wanted: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        if connected <= event.ts_init < end_ns:
            wanted[event.symbol].append(plain(event))
    got: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in sorted(read_topic(settings, target.md_events), key=lambda r: (r["_partition"], r["_offset"])):
        got[record["_key"]].append({k: v for k, v in record.items() if not k.startswith("_")})
    assert summary.records == sum(len(v) for v in wanted.values())
    assert dict(got) == dict(wanted)
    assert wanted["BTC-USD"][0]["kind"] == "STATUS"  # the CONNECTED record's events come first


def test_pacing_follows_ts_init_divided_by_the_speed_from_the_window_start(
    source: tuple[CommonSettings, list[RawFrame]],
) -> None:
    settings, log = source
    clock = FakeClock()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(int(seconds * 1e9))

    # --from falls in c2's handshake: the replay starts at c1's CONNECTED, 20 s of warm-up earlier,
    # which goes out at full speed; the window's 4 s are paced at 4x.
    window = Window(S2, S2 + 4 * SECOND)
    summary = replay(
        settings, SourceSpec("topic", settings.topic_prefix), window, f"{settings.topic_prefix}-p", speed=4.0,
        clock=clock, sleep=sleep, progress=False,
    )  # fmt: skip
    assert summary.start is not None
    assert summary.first_ts_init == log[3].ts_init == summary.start.ts_init < S2 - 19 * SECOND
    assert summary.last_ts_init is not None
    assert sum(slept) == pytest.approx((summary.last_ts_init - S2) / 1e9 / 4, abs=1e-6)
    assert len(slept) > 10


def test_a_range_shorter_than_a_batch_comes_back_as_fetched_not_after_the_poll_timeout(
    source: tuple[CommonSettings, list[RawFrame]],
) -> None:
    settings, log = source
    topic = TopicNames(settings.topic_prefix).md_raw
    expected = [AvroSerde().encode(topic, record) for record in log[2:9]]
    # A poll timeout of a minute: a reader that waited for a full batch of 1000 would sit it out
    # (every --speed max replay from a topic used to lose its last second this way).
    with TopicReader(settings, topic, AvroSerde(), timeout=120, poll_timeout=60) as reader:
        started = time.monotonic()
        batches = list(reader.batches(0, 2, 9, batch=1000))
        elapsed = time.monotonic() - started
    assert [m.value() for batch in batches for m in batch] == expected
    assert [m.offset() for batch in batches for m in batch] == list(range(2, 9))
    assert elapsed < 30, f"the short range took {elapsed:.1f} s: the reader waited for a full batch"

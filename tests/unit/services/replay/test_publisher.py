"""The replay's pacing on a fake clock: the warm-up at full speed, the window at ``--speed``."""

from __future__ import annotations

import pytest

from quotewatch.core.clock import FakeClock
from quotewatch.core.kafka import DeliveryTracker
from quotewatch.core.serde import AvroSerde
from quotewatch.services.replay import publisher
from quotewatch.services.replay.sources import SourceSpec, Window, parse_time
from tests.helpers import shared_data_dir

CAPTURE = "exchange_level2_ticker_matches_10products_2021-04-17_cryptofeed.jsonl"


class ClockedProducer:
    """Records the (fake) monotonic time at which each record was produced."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sent: list[int] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> None:
        self.sent.append(self.clock.monotonic_ns())

    def poll(self, timeout: float = 0) -> int:
        return 0


class NoBar:
    def update(self, n: int) -> None:
        pass


@pytest.mark.parametrize("speed", [1.0, 4.0])
def test_the_warm_up_goes_at_full_speed_and_the_window_is_paced_from_its_start(speed: float) -> None:
    clock = FakeClock()

    def sleep(seconds: float) -> None:
        clock.advance(round(seconds * 1e9))

    # The capture starts at 16:43:37; a window from 16:44:05 has ~28 s of warm-up before it.
    window = Window(parse_time("2021-04-17T16:44:05Z"), parse_time("2021-04-17T16:44:07Z"))
    assert window.start_ns is not None
    _, _, source = publisher.open_source(
        None,  # type: ignore[arg-type]  # a capture needs no settings
        SourceSpec("capture", path=shared_data_dir() / CAPTURE),
        window,
        "raw",
        AvroSerde(),
    )
    records = list(source)
    ts = [int(r.value.ts_init) for r in records]
    first_in_window = next(i for i, t in enumerate(ts) if t >= window.start_ns)
    assert first_in_window > 1000
    assert ts[first_in_window] > window.start_ns
    assert ts[-1] - ts[0] > 25 * 10**9

    producer = ClockedProducer(clock)
    began = clock.monotonic_ns()
    pacer = publisher._Pacer(speed, clock, sleep, window.start_ns)
    count, _, _ = publisher._publish(
        producer,  # type: ignore[arg-type]  # only produce and poll are called
        "x.md.raw",
        "raw",
        records,
        pacer,
        NoBar(),
        DeliveryTracker(),
        AvroSerde(),
    )
    assert count == len(records)
    # The warm-up (the CONNECTED record up to --from) waits for nothing...
    assert set(producer.sent[:first_in_window]) == {began}
    # ...and from --from on, each record goes out its ts_init gap from --from divided by the speed.
    for sent, t in zip(producer.sent[first_in_window:], ts[first_in_window:], strict=True):
        assert sent - began == pytest.approx((t - window.start_ns) / speed, abs=2)


def test_without_a_window_start_pacing_starts_at_the_first_record() -> None:
    clock = FakeClock()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(round(seconds * 1e9))

    pacer = publisher._Pacer(2.0, clock, sleep)
    for ts_init in (10 * 10**9, 11 * 10**9, 11 * 10**9, 14 * 10**9):
        pacer.wait(ts_init)
    assert slept == [0.5, 1.5]

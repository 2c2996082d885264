"""Issue 21's done-when: ``quotewatch demo --capture <2026 Advanced Trade capture> --timestamps original``.

One run of the real command: its own Kafka broker, MLflow server, the feed server replaying the
recorded session at its own pace with its August 2026 exchange times (the host's clock is months
ahead), ingest, book, labeler, inference, lake sink and the dashboard, all real processes. No
champion is trained (``--bootstrap-interval`` longer than the test): inference serves its
built-in fallback model. Checked:

- ``book.top3``: ticks on the 100 ms grid, increasing per product, at the recording's exchange
  times, not the host's;
- the last top-3 of each product, once event time has passed the capture's last book update,
  equals the book rebuilt independently from the capture's raw JSON (``ReferenceBooks``);
- features, labels and predictions of each product, on the same grid; no dead letter;
- lake files for every dataset;
- the dashboard, in headless Chromium, shows the best bid of that last top-3.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from quotewatch.core.config import CommonSettings
from quotewatch.core.topics import TopicNames
from quotewatch.domain.venue.captures import read_capture
from quotewatch.services.dashboard.view import format_price
from tests.e2e.stack.demo_run import DemoRun, running_demo
from tests.helpers import read_topic, shared_data_dir, wait_for
from tests.records import plain
from tests.unit.domain.market.test_book_pipeline_captures import ReferenceBooks

pytestmark = pytest.mark.slow

CAPTURE = "advanced_trade_level2_BTC-USD_ETH-USD_2026-08-09_cryptofeed.jsonl.gz"
LAKE_TOPICS = ("md.raw", "md.events", "book.top3", "features", "labels", "predictions")
START_TIMEOUT = 180.0
TICK_NS = 100_000_000
SECOND = 1_000_000_000
DAY = 86_400 * SECOND


def iso_ns(text: str) -> int:
    """An ISO-8601 UTC time of the raw JSON in ns (to the microsecond: event times have six digits)."""
    whole, _, fraction = text.rstrip("Z").partition(".")
    micros = int((fraction + "000000")[:6])
    return int(datetime.fromisoformat(whole + "+00:00").timestamp()) * SECOND + micros * 1000


def last_book_changes(lines: list[str]) -> dict[str, int]:
    """The latest ``event_time`` of any book change per product, read from the raw Advanced Trade JSON."""
    latest: dict[str, int] = {}
    for line in lines:
        message = json.loads(line)
        if message.get("channel") != "l2_data":
            continue
        for event in message["events"]:
            for update in event["updates"]:
                product = event["product_id"]
                latest[product] = max(latest.get(product, 0), iso_ns(update["event_time"]))
    return latest


def by_symbol(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records per symbol in stream order (a symbol's records share one partition)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for record in sorted(records, key=lambda r: (r["_partition"], r["_offset"])):
        out.setdefault(record["symbol"], []).append(record)
    return out


@pytest.fixture(scope="module")
def capture_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    capture = shared_data_dir() / CAPTURE
    args = ["--capture", str(capture), "--timestamps", "original", "--bootstrap-interval", "7200"]
    with running_demo(tmp_path_factory.mktemp("capture-stack"), args) as run:
        yield run


def test_a_recording_with_its_original_timestamps_flows_to_the_dashboard(capture_demo: DemoRun) -> None:
    run = capture_demo
    capture = read_capture(shared_data_dir() / CAPTURE)
    products = capture.symbols
    assert set(products) == {"BTC-USD", "ETH-USD"}
    reference = ReferenceBooks()
    for line in capture.lines:
        reference.apply_line(line)
    last_change = last_book_changes(list(capture.lines))
    recording_start = min(iso_ns(json.loads(line)["timestamp"]) for line in capture.lines if '"timestamp"' in line)

    status = run.started(START_TIMEOUT)
    settings = CommonSettings(kafka_bootstrap_servers=status["kafka"], topic_prefix=status["topic_prefix"])
    names = TopicNames(status["topic_prefix"])

    # The whole recording went through: each product has a tick later than its last book change.
    def past_the_last_change() -> dict[str, list[dict[str, Any]]] | None:
        run.alive_or_fail()
        tops = by_symbol(read_topic(settings, names.book_top3, timeout=30))
        done = all(p in tops and tops[p][-1]["ts_event"] > last_change[p] + SECOND for p in products)
        return tops if done else None

    tops = wait_for(past_the_last_change, timeout=180, interval=2, message="ticks past the capture's last change")
    connections = sum(r["kind"] == "CONNECTED" for r in read_topic(settings, names.md_raw, timeout=30))
    for product in products:
        ticks = [top["ts_event"] for top in tops[product]]
        assert all(t % TICK_NS == 0 for t in ticks), product
        assert all(a < b for a, b in itertools.pairwise(ticks)), product
        # The exchange's clock, not the host's (which is months ahead of the recording).
        assert recording_start - SECOND <= ticks[0], product
        assert ticks[-1] <= last_change[product] + 600 * SECOND, product
        assert tops[product][-1]["ts_init"] - ticks[-1] > DAY, "the host's clock must be ahead for this test to mean it"
        last = tops[product][-1]
        bids, asks = reference.top3(product)
        assert (last["bids"], last["asks"]) == ([plain(level) for level in bids], [plain(level) for level in asks]), (
            f"{product}: the last top-3 differs from the raw JSON's book ({connections} connection(s))"
        )

    # Features, labels and predictions of each product, on the same grid.
    for topic, time_field in ((names.features, "ts_event"), (names.labels, "t_event"), (names.predictions, "ts_event")):

        def every_product(topic: str = topic) -> dict[str, list[dict[str, Any]]] | None:
            run.alive_or_fail()
            records = by_symbol(read_topic(settings, topic, timeout=30))
            return records if all(records.get(p) for p in products) else None

        records = wait_for(every_product, timeout=120, interval=2, message=f"records of every product on {topic}")
        for product in products:
            times = [record[time_field] for record in records[product]]
            assert all(t % TICK_NS == 0 and recording_start - SECOND <= t for t in times), (topic, product)
    assert read_topic(settings, names.dlq, timeout=30) == [], "dead letters in a clean replay"

    # Lake files for every dataset.
    lake = Path(status["lake"])
    for suffix in LAKE_TOPICS:
        dataset = lake / f"{names.prefix}.{suffix}"

        def lake_files(dataset: Path = dataset) -> list[Path]:
            run.alive_or_fail()
            return list(dataset.rglob("*.parquet"))

        wait_for(lake_files, timeout=90, interval=1, message=f"lake files in {dataset}")

    # The dashboard shows the best bid of the last top-3, in a real browser.
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    from tests.browser.chromium import chromium_options

    expected = {product: format_price(reference.top3(product)[0][0].price_e8) for product in products}
    browser = webdriver.Chrome(options=chromium_options())
    try:
        browser.get(status["dashboard"])

        def best_bid_on_screen() -> tuple[str, str] | None:
            try:  # Dash renders the layout in the browser: the cards appear after the first callbacks
                header = browser.find_element(By.ID, "snapshot-time").text
                best_bid = browser.find_element(By.ID, "kpi-best-bid").text
            except (NoSuchElementException, StaleElementReferenceException):
                return None
            shown = next((p for p in products if header.startswith(f"{p} ")), None)
            return (shown, best_bid) if shown is not None and best_bid == expected[shown] else None

        wait_for(best_bid_on_screen, timeout=90, interval=0.5, message=f"a best bid of {expected} on screen")
    finally:
        browser.quit()
